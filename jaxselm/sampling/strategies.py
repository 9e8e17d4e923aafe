"""Sampling strategies as pure functions over logits [..., V] (fp32).

Each filter takes logits and returns logits of the same shape in which the tokens it removes are
set to -inf; the survivors keep their values, so ``softmax`` of the result is the original
distribution restricted to the survivors and renormalised. Filters compose by chaining, and
:func:`process_logits` chains them in one fixed order (the order of HF's logits warpers):

    temperature  ->  top-k  ->  top-p (nucleus)  ->  min-p

Every filter after the first sees the distribution left by the previous ones (top-p measures mass
under the temperature-scaled, top-k-restricted distribution; min-p compares with the most likely
survivor, which no earlier filter removes). Every filter always keeps the most likely token, so the
result is never empty. Ties at a threshold are all kept (top-k with tied k-th logits may keep more
than k tokens), as HF does.

    from jaxselm.sampling import sample_logits
    tok, processed = sample_logits(key, logits, temperature=0.7, top_p=0.9)   # tok [B] int32

``top_k`` and ``greedy`` are Python values (they pick the code path); ``temperature``, ``top_p``
and ``min_p`` may be Python floats or traced arrays (broadcastable to logits[..., :1]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxselm.errors import ConfigError

Array = jax.Array


def check_sampling_params(
    *, temperature: float, top_k: int, top_p: float, min_p: float, vocab_size: int | None = None
) -> None:
    """Raise a one-line ConfigError naming the first out-of-range sampling parameter."""
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 0:
        raise ConfigError(f"sampling.top_k: must be an int >= 0, 0 = off (got {top_k!r})")
    if vocab_size is not None and top_k > vocab_size:
        raise ConfigError(f"sampling.top_k: {top_k} exceeds the vocabulary size {vocab_size}")
    if not temperature > 0:
        raise ConfigError(
            f"sampling.temperature: must be > 0, use greedy=True for argmax (got {temperature!r})"
        )
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"sampling.top_p: must be in (0, 1], 1 = off (got {top_p!r})")
    if not 0.0 <= min_p <= 1.0:
        raise ConfigError(f"sampling.min_p: must be in [0, 1], 0 = off (got {min_p!r})")


def apply_temperature(logits: Array, temperature: float | Array) -> Array:
    """Logits divided by ``temperature`` (> 0), in fp32."""
    return logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)


def top_k_filter(logits: Array, k: int) -> Array:
    """Keep the ``k`` largest logits (and any tied with the k-th); ``k == 0`` keeps everything."""
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits: Array, p: float | Array) -> Array:
    """Nucleus: keep the smallest set of most likely tokens whose probability mass reaches ``p``.

    A token survives if the mass of the tokens strictly more likely than it is below ``p``
    (so the most likely token always survives and ``p == 1`` keeps every token of nonzero mass).
    """
    logits = logits.astype(jnp.float32)
    order = jnp.flip(jnp.argsort(logits, axis=-1), axis=-1)  # descending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < jnp.asarray(p, jnp.float32)
    keep_sorted = keep_sorted.at[..., 0].set(True)
    # The smallest surviving logit is the threshold; ties with it survive too.
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def min_p_filter(logits: Array, min_p: float | Array) -> Array:
    """Keep tokens whose probability is at least ``min_p`` times that of the most likely token."""
    logits = logits.astype(jnp.float32)
    top = jnp.max(logits, axis=-1, keepdims=True)
    threshold = top + jnp.log(jnp.asarray(min_p, jnp.float32))  # log(0) = -inf: keeps all
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def process_logits(
    logits: Array,
    *,
    temperature: float | Array = 1.0,
    top_k: int = 0,
    top_p: float | Array = 1.0,
    min_p: float | Array = 0.0,
) -> Array:
    """The logits of the sampling distribution: temperature, then top-k, top-p, min-p filters.

    Filters whose parameter is a Python value meaning "off" (top_k 0, top_p 1, min_p 0) are skipped
    at trace time; traced values always run the filter (which is then a no-op).
    """
    x = apply_temperature(logits, temperature)
    x = top_k_filter(x, top_k)
    if not (isinstance(top_p, (int, float)) and top_p >= 1.0):
        x = top_p_filter(x, top_p)
    if not (isinstance(min_p, (int, float)) and min_p <= 0.0):
        x = min_p_filter(x, min_p)
    return x


# Vocabularies above this are sampled in two stages (see :func:`categorical`).
TWO_STAGE_MIN_VOCAB = 1024
TWO_STAGE_BLOCK = 256


def categorical(key: Array, logits: Array) -> Array:
    """One draw per row of ``softmax(logits)`` [..., V] (int32 [...]), the distribution of
    ``jax.random.categorical`` (which it is for V <= TWO_STAGE_MIN_VOCAB).

    For large vocabularies it draws in two stages: a block of ``TWO_STAGE_BLOCK`` ids from the
    blocks' masses (``logsumexp`` of each block), then an id within the block; P(block) *
    P(id | block) = p(id) exactly (up to float rounding in the block masses). It needs V / 256 +
    256 random numbers per row instead of V: on CPU the threefry bits of Gumbel-max sampling over
    SmolLM2's 49k vocabulary cost more than the LM head's matmul (55 ms against 47 ms at B=32),
    this draw about 2 ms. Written here because jax.random has no such sampler.
    """
    v = logits.shape[-1]
    if v <= TWO_STAGE_MIN_VOCAB:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    blk = TWO_STAGE_BLOCK
    nb = -(-v // blk)
    pad = [(0, 0)] * (logits.ndim - 1) + [(0, nb * blk - v)]
    blocks = jnp.pad(logits, pad, constant_values=-jnp.inf).reshape(*logits.shape[:-1], nb, blk)
    k_block, k_id = jax.random.split(key)
    b = jax.random.categorical(k_block, jax.nn.logsumexp(blocks, axis=-1), axis=-1)
    inside = jnp.take_along_axis(blocks, b[..., None, None], axis=-2)[..., 0, :]
    i = jax.random.categorical(k_id, inside, axis=-1)
    return (b * blk + i).astype(jnp.int32)


def sample_logits(
    rng: Array,
    logits: Array,
    *,
    temperature: float | Array = 1.0,
    top_k: int = 0,
    top_p: float | Array = 1.0,
    min_p: float | Array = 0.0,
    greedy: bool = False,
) -> tuple[Array, Array]:
    """Draw one token per row of ``logits`` [..., V]: (tokens [...] int32, processed logits).

    With ``greedy`` the token is the argmax of the raw logits (ties -> lowest id) and the processed
    logits are a point mass on it (0 there, -inf elsewhere). Otherwise the token is drawn from
    ``softmax(process_logits(logits, ...))`` with one key for the whole array (rows are independent
    draws).
    """
    logits = logits.astype(jnp.float32)
    if greedy:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
        processed = jnp.where(ids == tok[..., None], 0.0, -jnp.inf).astype(jnp.float32)
        return tok, processed
    processed = process_logits(
        logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p
    )
    return categorical(rng, processed), processed


def token_logprobs(logits: Array, tokens: Array) -> Array:
    """``log_softmax(logits)`` at ``tokens``: logits [..., V], tokens [...] -> [...] fp32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
