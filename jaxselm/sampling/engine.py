"""Batched generation with a KV cache: prefill once per prompt, n samples per prompt, stop tokens.

SELM spends most of an online iteration sampling responses from the current policy, so this is the
hot loop of the package. One call:

    from jaxselm.sampling import generate
    res = generate(params, cfg, [[1, 5, 7], [1, 9]], rng=jax.random.key(0), max_new_tokens=128,
                   n=4, temperature=0.8, top_p=0.95, stop_token_ids=(2,))
    res.tokens        # [B, N, M] int32, pad_id after each sample's end
    res.logprobs      # [B, N, M] f32, log-softmax of the model's temperature-1 logits
    res.lengths       # [B, N] int32, generated tokens (the stop token included)

How it runs (one jitted function per static setting):

1. Prompts are left-padded to a bucketed length (powers of two, at least 8; by
   :func:`jaxselm.data.packing.pack_prompts`, or given as a ``PromptBatch``) so that batches of
   different prompt lengths reuse one compilation; an int array [B, T] with its mask is used as is.
2. Prefill: one call of the model over the padded prompts writes their keys/values into a cache of
   ``T + max_new_tokens - 1`` slots and gives the next-token logits. Only the last position goes
   through the LM head (a [B, T, V] logits tensor would dwarf the cache for real vocabularies).
3. The prompt's cache rows are repeated n times (the prompt is *not* recomputed per sample), and
   the first token of every sample is drawn from the same logits with the sample's own key.
4. Decode: a ``lax.while_loop`` feeds the last token, samples the next, writes it, and exits early
   once every sample has emitted a stop token. Shapes are fixed: [B * n, M] buffers, filled with
   ``pad_id`` (log-probs 0) after each sample's end.

Randomness: the key of sample j of prompt b is ``fold_in(fold_in(rng, b), j)`` and of its step t
``fold_in(that, t)``. So results are deterministic given ``rng``, samples are independent, and a
prompt's samples do not depend on which other prompts share its batch (up to the float rounding of
a different batch shape).

Log-probs: ``logprobs`` is ``log_softmax`` of the raw (temperature-1, unfiltered) model logits at
the sampled token - the policy's own log-probability, the quantity SELM/DPO sum over a response.
``sampling_logprobs`` is the log-probability under the distribution actually sampled from
(temperature and filters applied; 0 for greedy), what importance weights need.

Sharding: pass ``mesh`` (axes such as ("data", "fsdp", "tensor")) and optionally ``logical_rules``
(the logical-name -> mesh-axes table; a default is provided). Parameters are laid out by
``param_logical_axes``, the cache by ``cache_logical_axes``, the batch over the data axes; a
dimension that its mesh axes do not divide keeps the longest dividing prefix of them (replicated
in the worst case), so any batch size runs on any mesh.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxselm.data.packing import PromptBatch
from jaxselm.errors import ConfigError
from jaxselm.model import (
    KVCache,
    ModelConfig,
    apply_with_cache,
    cache_logical_axes,
    init_cache,
    param_logical_axes,
    unstack_cache,
)
from jaxselm.model import unstack_layers as unstack_layer_params
from jaxselm.parallel.rules import LOGICAL_AXIS_RULES, param_shardings
from jaxselm.sampling.prompts import prompt_arrays
from jaxselm.sampling.strategies import (
    apply_temperature,
    categorical,
    check_sampling_params,
    min_p_filter,
    token_logprobs,
    top_k_filter,
    top_p_filter,
)

Array = jax.Array
Rules = tuple[tuple[str, Any], ...]

# The training side's table (batch first so activations give "fsdp" to the batch, not embed).
DEFAULT_LOGICAL_RULES: Rules = LOGICAL_AXIS_RULES


class FinishReason(enum.IntEnum):
    """Why a sample ended (the values of ``GenerationResult.finish_reason``)."""

    STOP = 0  # emitted one of stop_token_ids (included in the sample)
    LENGTH = 1  # reached max_new_tokens without a stop token


class GenerationResult(NamedTuple):
    """Output of :func:`generate` (a pytree). B prompts, N samples each, M = max_new_tokens."""

    tokens: Array  # [B, N, M] int32; pad_id after the end of each sample
    logprobs: Array  # [B, N, M] f32; log_softmax(temperature-1 model logits)[token]; 0 after end
    sampling_logprobs: Array  # [B, N, M] f32; log-prob under the sampling distribution; 0 after end
    lengths: Array  # [B, N] int32; generated tokens, stop token included
    finish_reason: Array  # [B, N] int32; FinishReason values
    prompt_tokens: Array  # [B, T] int32; the left-padded prompts (pad_id in padding slots)
    prompt_mask: Array  # [B, T] bool; True on real prompt tokens


# -- prompts -------------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# -- sharding ------------------------------------------------------------------------------------


def _shardings(logical: Any, shapes: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
    """NamedShardings of a pytree of arrays/ShapeDtypeStructs from a pytree of logical specs
    (dims their mesh axes do not divide fall back to replication: any batch runs on any mesh)."""
    return param_shardings(shapes, logical, mesh, rules)


class _Layout:
    """Sharding constraints for the loop state; every method is the identity without a mesh."""

    def __init__(self, mesh: jax.sharding.Mesh | None, rules: Rules):
        self.mesh, self.rules = mesh, rules

    def constrain(self, x: Any, logical: Any) -> Any:
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, _shardings(logical, x, self.mesh, self.rules))

    def batch(self, x: Array) -> Array:
        return self.constrain(x, PartitionSpec("batch"))

    def cache(self, cache: KVCache) -> KVCache:
        return self.constrain(cache, cache_logical_axes())


# -- the jitted core -----------------------------------------------------------------------------


def _repeat_rows(cache: KVCache, n: int) -> KVCache:
    """Each prompt's cache row repeated n times (row b * n + j is sample j of prompt b)."""
    if n == 1:
        return cache
    return KVCache(
        k=jnp.repeat(cache.k, n, axis=1),
        v=jnp.repeat(cache.v, n, axis=1),
        mask=jnp.repeat(cache.mask, n, axis=0),
        index=cache.index,
        next_pos=jnp.repeat(cache.next_pos, n, axis=0),
    )


class _Static(NamedTuple):
    config: ModelConfig
    max_new_tokens: int
    n: int
    top_k: int
    use_top_p: bool
    use_min_p: bool
    greedy: bool
    stop_token_ids: tuple[int, ...]
    pad_id: int
    cache_dtype: str | None
    mesh: jax.sharding.Mesh | None
    rules: Rules
    unstack: bool


def _sampler(s: _Static, temperature, top_p, min_p):
    """(keys [R], logits [R, V], step) -> tokens, model log-probs, sampling log-probs (each [R])."""

    def sample(keys, logits, step):
        logits = logits.astype(jnp.float32)
        if s.greedy:
            tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return tok, token_logprobs(logits, tok), jnp.zeros(tok.shape, jnp.float32)
        x = apply_temperature(logits, temperature)
        x = top_k_filter(x, s.top_k)
        if s.use_top_p:
            x = top_p_filter(x, top_p)
        if s.use_min_p:
            x = min_p_filter(x, min_p)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        tok = jax.vmap(categorical)(step_keys, x)
        return tok, token_logprobs(logits, tok), token_logprobs(x, tok)

    return sample


@functools.partial(jax.jit, static_argnames=("s",))
def _generate_core(params, tokens, mask, rng, temperature, top_p, min_p, *, s: _Static):
    """Prefill, repeat the cache n times, decode in a while-loop; tokens/mask [B, T] validated."""
    cfg, m, n = s.config, s.max_new_tokens, s.n
    lay = _Layout(s.mesh, s.rules)
    b, t = tokens.shape
    r = b * n
    tokens, mask = lay.batch(tokens), lay.batch(mask)

    # Prefill once per prompt, then share its cache across its n samples.
    cache = init_cache(cfg, b, t + m - 1, dtype=s.cache_dtype)
    cache = lay.cache(cache)
    # Left padding: the last slot is every row's last real token, the only logits needed.
    logits, cache = apply_with_cache(params, cfg, tokens, mask, cache, last_only=True)
    cache = lay.cache(_repeat_rows(cache, n))
    logits = lay.batch(jnp.repeat(logits[:, 0], n, axis=0))
    dec_params = params
    if s.unstack:  # one buffer per layer for the decoding loop (see unstack_layers)
        dec_params, cache = unstack_layer_params(params, cfg.num_layers), unstack_cache(cache)

    prompt_ids = jnp.repeat(jnp.arange(b, dtype=jnp.int32), n)
    sample_ids = jnp.tile(jnp.arange(n, dtype=jnp.int32), b)
    fold = jax.random.fold_in
    keys = jax.vmap(lambda i, j: fold(fold(rng, i), j))(prompt_ids, sample_ids)
    keys = lay.batch(keys)
    stop_ids = jnp.asarray(s.stop_token_ids, jnp.int32)
    sample = _sampler(s, temperature, top_p, min_p)

    def is_stop(tok):
        if not s.stop_token_ids:
            return jnp.zeros(tok.shape, bool)
        return jnp.any(tok[:, None] == stop_ids[None, :], axis=1)

    tok0, lp0, slp0 = sample(keys, logits, 0)
    out_tok = jnp.full((r, m), s.pad_id, jnp.int32).at[:, 0].set(tok0)
    out_lp = jnp.zeros((r, m), jnp.float32).at[:, 0].set(lp0)
    out_slp = jnp.zeros((r, m), jnp.float32).at[:, 0].set(slp0)
    lengths = jnp.ones((r,), jnp.int32)
    stopped = is_stop(tok0)
    state = (jnp.asarray(1, jnp.int32), cache, tok0, out_tok, out_lp, out_slp, lengths, stopped)

    def cond(st):
        i, *_, stopped = st
        return (i < m) & ~jnp.all(stopped)

    def body(st):
        i, cache, prev, out_tok, out_lp, out_slp, lengths, stopped = st
        # Finished rows keep running on a valid id (pad_id may lie outside the vocabulary).
        feed = jnp.clip(prev, 0, cfg.vocab_size - 1)
        logits, cache = apply_with_cache(dec_params, cfg, feed[:, None], None, cache)
        cache = lay.cache(cache)
        tok, lp, slp = sample(keys, lay.batch(logits[:, 0]), i)
        active = ~stopped
        tok = jnp.where(active, tok, s.pad_id)
        lp = jnp.where(active, lp, 0.0)
        slp = jnp.where(active, slp, 0.0)
        out_tok = jax.lax.dynamic_update_slice(out_tok, tok[:, None], (0, i))
        out_lp = jax.lax.dynamic_update_slice(out_lp, lp[:, None], (0, i))
        out_slp = jax.lax.dynamic_update_slice(out_slp, slp[:, None], (0, i))
        lengths = lengths + active.astype(jnp.int32)
        stopped = stopped | (active & is_stop(tok))
        return (i + 1, cache, tok, out_tok, out_lp, out_slp, lengths, stopped)

    _, _, _, out_tok, out_lp, out_slp, lengths, stopped = jax.lax.while_loop(cond, body, state)
    reason = jnp.where(stopped, int(FinishReason.STOP), int(FinishReason.LENGTH)).astype(jnp.int32)
    res = GenerationResult(
        tokens=out_tok.reshape(b, n, m),
        logprobs=out_lp.reshape(b, n, m),
        sampling_logprobs=out_slp.reshape(b, n, m),
        lengths=lengths.reshape(b, n),
        finish_reason=reason.reshape(b, n),
        prompt_tokens=jnp.where(mask, tokens, s.pad_id),
        prompt_mask=mask,
    )
    return GenerationResult(*(lay.batch(x) for x in res))


# -- public entry point --------------------------------------------------------------------------


def _unstack(requested: bool | None, mesh: jax.sharding.Mesh | None) -> bool:
    """Whether the decoding loop runs on per-layer weight and cache buffers: by default on the
    CPU backend without a mesh (where XLA copies each scanned layer's weights out of the stacked
    arrays every step); never under a mesh (the stacked layout carries the shardings)."""
    if mesh is not None:
        return False
    if requested is None:
        return jax.default_backend() == "cpu"
    return bool(requested)


def _prepare(
    params: Any,
    config: ModelConfig,
    prompts: Sequence[Sequence[int]] | PromptBatch | Array | np.ndarray,
    prompt_mask: Array | np.ndarray | None = None,
    *,
    rng: Array,
    max_new_tokens: int,
    n: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    greedy: bool = False,
    stop_token_ids: Sequence[int] = (),
    pad_id: int = 0,
    cache_dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    logical_rules: Sequence[tuple[str, Any]] | None = None,
    unstack_layers: bool | None = None,
) -> tuple[tuple, _Static]:
    """Validate the inputs; the arguments and static settings of the jitted core."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: must be an int >= 1 (got {max_new_tokens!r})")
    if not _is_int(n) or n < 1:
        raise ConfigError(f"n: samples per prompt must be an int >= 1 (got {n!r})")
    if not greedy:
        check_sampling_params(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            vocab_size=config.vocab_size,
        )
    stop = tuple(int(x) for x in stop_token_ids)
    for x in stop:
        if not 0 <= x < config.vocab_size:
            raise ConfigError(
                f"stop_token_ids: {x} is outside the vocabulary [0, {config.vocab_size})"
            )
    tok_arr, mask_arr = prompt_arrays(
        config, prompts, prompt_mask, max_new_tokens=max_new_tokens, pad_id=pad_id
    )

    rules: Rules = tuple(
        (name, tuple(axes) if isinstance(axes, list) else axes)
        for name, axes in (DEFAULT_LOGICAL_RULES if logical_rules is None else logical_rules)
    )
    s = _Static(
        config=config,
        max_new_tokens=int(max_new_tokens),
        n=int(n),
        top_k=0 if greedy else int(top_k),
        use_top_p=not greedy and top_p < 1.0,
        use_min_p=not greedy and min_p > 0.0,
        greedy=bool(greedy),
        stop_token_ids=stop,
        pad_id=int(pad_id),
        cache_dtype=cache_dtype,
        mesh=mesh,
        rules=rules if mesh is not None else (),
        unstack=_unstack(unstack_layers, mesh),
    )
    scalars = [jnp.asarray(v, jnp.float32) for v in (temperature, top_p, min_p)]
    if mesh is not None:
        # Inputs are placed by the rules and the loop state is constrained explicitly; XLA's
        # propagation lays out the model's activations from there. (Installing the rules with
        # nn.logical_axis_rules while tracing the model fails: Flax's param shape check re-runs
        # DenseGeneral's boxed init, whose flat 2-D kernel then meets a 3-D logical constraint.)
        p_sh = _shardings(param_logical_axes(config), params, mesh, rules)
        params = jax.device_put(params, p_sh)
        b_sh = _shardings(PartitionSpec("batch"), tok_arr, mesh, rules)
        tok_arr, mask_arr = jax.device_put(tok_arr, b_sh), jax.device_put(mask_arr, b_sh)
    return (params, tok_arr, mask_arr, rng, *scalars), s


def generate(
    params: Any,
    config: ModelConfig,
    prompts: Sequence[Sequence[int]] | PromptBatch | Array | np.ndarray,
    prompt_mask: Array | np.ndarray | None = None,
    *,
    rng: Array,
    max_new_tokens: int,
    n: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    greedy: bool = False,
    stop_token_ids: Sequence[int] = (),
    pad_id: int = 0,
    cache_dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    logical_rules: Sequence[tuple[str, Any]] | None = None,
    unstack_layers: bool | None = None,
) -> GenerationResult:
    """Sample ``n`` continuations of ``max_new_tokens`` tokens for every prompt.

    ``prompts`` is a list of token-id lists (left-padded here to a bucketed length), a
    :class:`~jaxselm.data.packing.PromptBatch`, or a left-padded
    int array [B, T] with ``prompt_mask`` [B, T] (True on real tokens; all True if omitted).
    Sampling: ``greedy`` takes the argmax of the raw logits; otherwise tokens are drawn from
    softmax(logits / temperature) restricted by top_k (0 = off), top_p (1 = off) and min_p
    (0 = off),
    see :mod:`jaxselm.sampling.strategies`. A sample ends after its first token in
    ``stop_token_ids`` (kept in the output) or after ``max_new_tokens`` tokens.

    Changing temperature/top_p/min_p values reuses the compilation; changing whether top_p/min_p
    are on, top_k, greedy, n, max_new_tokens, the stop ids, the batch size or the prompt bucket
    compiles anew. ``unstack_layers``: decode on one weight / cache buffer per layer (an
    unrolled layer loop; one extra copy of the layer weights for the call); default: on the CPU
    backend without a mesh, where it saves XLA:CPU copying every layer's weights out of the
    stacked arrays at every step. Raises ConfigError for bad settings and DataError for bad
    prompts (one line, naming the culprit).
    """
    args, s = _prepare(
        params,
        config,
        prompts,
        prompt_mask,
        rng=rng,
        max_new_tokens=max_new_tokens,
        n=n,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        greedy=greedy,
        stop_token_ids=stop_token_ids,
        pad_id=pad_id,
        cache_dtype=cache_dtype,
        mesh=mesh,
        logical_rules=logical_rules,
        unstack_layers=unstack_layers,
    )
    res = _generate_core(*args, s=s)
    b = args[1].shape[0]
    chex.assert_shape([res.tokens, res.logprobs, res.sampling_logprobs], (b, n, max_new_tokens))
    return res


def lower_generate(
    params: Any,
    config: ModelConfig,
    prompts: Sequence[Sequence[int]] | Array | np.ndarray,
    prompt_mask: Array | np.ndarray | None = None,
    **kwargs: Any,
) -> jax.stages.Lowered:
    """The lowered (not yet compiled) program :func:`generate` runs with the same arguments.

    For ahead-of-time compilation and cost/memory analysis (``.compile().memory_analysis()``).
    """
    args, s = _prepare(params, config, prompts, prompt_mask, **kwargs)
    return _generate_core.lower(*args, s=s)
