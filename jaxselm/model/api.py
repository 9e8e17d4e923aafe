"""Pure-function entry points over :class:`~jaxselm.model.transformer.Transformer`.

    import jax
    from jaxselm.model import get_preset, init_params, forward
    cfg = get_preset("tiny-cope")
    params = init_params(cfg, jax.random.key(0))
    logits = forward(params, cfg, tokens, attention_mask)       # [B, T, V] float32

Decoding with a KV cache:

    cache = init_cache(cfg, batch=B, max_len=S)
    logits, cache = apply_with_cache(params, cfg, prompt, prompt_mask, cache)   # prefill
    logits, cache = apply_with_cache(params, cfg, next_tok[:, None], None, cache)  # one step
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxselm.model.config import ModelConfig
from jaxselm.model.transformer import KVCache, Transformer

Params = dict


@functools.lru_cache(maxsize=64)
def _module(config: ModelConfig, head: str) -> Transformer:
    return Transformer(config, head=head)


def _boxed_init(config: ModelConfig, rng: jax.Array, head: str):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return _module(config, head).init(rng, tokens)["params"]


def init_params(config: ModelConfig, rng: jax.Array, *, head: str = "lm") -> Params:
    """Randomly initialised parameters (plain pytree of arrays in ``config.param_dtype``)."""
    return nn.unbox(_boxed_init(config, rng, head))


def with_score_head(lm_params: Params, reward_params: Params) -> Params:
    """A reward model started from a causal LM: the LM's trunk (its ``lm_head`` dropped) under
    ``reward_params``' score head (e.g. a fresh ``init_params(..., head="reward")``)."""
    return {
        **{k: v for k, v in lm_params.items() if k != "lm_head"},
        "score": reward_params["score"],
    }


def param_logical_axes(config: ModelConfig, *, head: str = "lm") -> Params:
    """Pytree (like the params) of PartitionSpecs of logical axis names."""
    boxed = jax.eval_shape(lambda: _boxed_init(config, jax.random.key(0), head))
    return nn.get_partition_spec(boxed)


def abstract_params(config: ModelConfig, *, head: str = "lm", shardings: Any = None) -> Params:
    """Pytree of ShapeDtypeStructs of the parameters, without allocating them.

    With ``shardings`` (a pytree of Shardings like the params, e.g. from
    :func:`jaxselm.parallel.param_shardings`) each struct carries its sharding: the target of a
    checkpoint restore.
    """
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0), head=head))
    if shardings is None:
        return shapes
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def _check_tokens(tokens, attention_mask):
    chex.assert_rank(tokens, 2)
    if attention_mask is not None:
        chex.assert_equal_shape([tokens, attention_mask])


def forward(
    params: Params,
    config: ModelConfig,
    tokens: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    positions: jax.Array | None = None,
    return_hidden: bool = False,
    last_only: bool = False,
) -> jax.Array:
    """Logits [B, T, V] float32 (or final hidden states [B, T, E] with ``return_hidden``).

    ``last_only``: only the last position, [B, 1, V] (with left padding, every row's last token).
    """
    _check_tokens(tokens, attention_mask)
    return _module(config, "lm").apply(
        {"params": params}, tokens, attention_mask, positions, None, return_hidden, last_only
    )


def lm_head(params: Params, config: ModelConfig) -> jax.Array:
    """The output projection [E, V] that ``forward`` applies to the final hidden states (the
    embedding's transpose with tied embeddings), in its stored dtype."""
    return params["embed"].T if config.tie_embeddings else params["lm_head"]


def reward_scores(
    params: Params, config: ModelConfig, tokens: jax.Array, attention_mask: jax.Array | None = None
) -> jax.Array:
    """Scalar rewards [B] float32 of a reward model (``head="reward"``), first label."""
    _check_tokens(tokens, attention_mask)
    scores = _module(config, "reward").apply({"params": params}, tokens, attention_mask)
    return scores[:, 0]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty KV cache of ``max_len`` slots (keys/values in ``dtype``, default config.dtype)."""
    dtype = jnp.dtype(dtype or config.dtype)
    lbk = (config.num_layers, batch, config.num_kv_heads)
    d = config.resolved_head_dim
    return KVCache(
        k=jnp.zeros((*lbk, d, max_len), dtype),
        v=jnp.zeros((*lbk, max_len, d), dtype),
        mask=jnp.zeros((batch, max_len), bool),
        index=jnp.zeros((), jnp.int32),
        next_pos=jnp.zeros((batch,), jnp.int32),
    )


def cache_logical_axes() -> KVCache:
    """Logical axis names of each cache field (batch over data, kv heads over tensor)."""
    return KVCache(
        k=PartitionSpec("layers", "batch", "kv_heads", "head_dim", "length"),
        v=PartitionSpec("layers", "batch", "kv_heads", "length", "head_dim"),
        mask=PartitionSpec("batch", "length"),
        index=PartitionSpec(),
        next_pos=PartitionSpec("batch"),
    )


def apply_with_cache(
    params: Params,
    config: ModelConfig,
    tokens: jax.Array,
    attention_mask: jax.Array | None,
    cache: KVCache,
    *,
    last_only: bool = False,
) -> tuple[jax.Array, KVCache]:
    """Run T new tokens against the cache: logits [B, T, V] and the cache with them written.

    ``last_only``: logits of the last position only, [B, 1, V] (a prefill over left-padded
    prompts needs nothing else). The caller keeps ``cache.index + T <= cache.max_len`` (slots past
    the end would be dropped).
    """
    _check_tokens(tokens, attention_mask)
    return _module(config, "lm").apply(
        {"params": params}, tokens, attention_mask, None, cache, False, last_only
    )
