"""Helpers shared by every CoPE implementation: masks, head grouping, dtypes, input checks."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def compute_dtype(dtype) -> jnp.dtype:
    """float64 stays float64 (tests); everything else is computed in float32."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def split_heads(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """[B, T, H, D] -> [B, T, K, G, D] with G = H // K query heads per kv head."""
    b, t, h, d = q.shape
    return q.reshape(b, t, num_kv_heads, h // num_kv_heads, d)


def attention_mask(
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    kv_mask: jax.Array | None,
    causal: bool,
    q_offset: jax.Array | int | None,
) -> jax.Array:
    """Boolean mask [B or 1, 1, 1, T, S]: True where query i may attend to key j.

    Query i sits at absolute key position ``q_offset + i`` (default S - T).
    """
    q_offset = kv_len - q_len if q_offset is None else q_offset
    mask = jnp.ones((1, 1, 1, q_len, kv_len), dtype=bool)
    if causal:
        qpos = jnp.arange(q_len)[:, None] + q_offset
        kpos = jnp.arange(kv_len)[None, :]
        mask = mask & (kpos <= qpos)[None, None, None]
    if kv_mask is not None:
        mask = mask & kv_mask.astype(bool)[:, None, None, None, :]
    return mask


def check_inputs(q, k, v, pos_emb, kv_mask) -> None:
    """Shape checks at the public boundary; raise ValueError naming the argument."""
    chex.assert_rank([q, k, v], 4)
    chex.assert_rank(pos_emb, 2)
    b, _, h, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"cope_attention: batch of k {k.shape} / v {v.shape} != batch of q {q.shape}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"cope_attention: k {k.shape} and v {v.shape} differ in [B, S, K]")
    if k.shape[-1] != d:
        raise ValueError(f"cope_attention: head dim of k {k.shape} != head dim of q {q.shape}")
    if h % k.shape[2]:
        raise ValueError(f"cope_attention: query heads {h} not a multiple of kv heads {k.shape[2]}")
    if pos_emb.shape[1] != d:
        raise ValueError(f"cope_attention: pos_emb {pos_emb.shape} must be [P, {d}]")
    if pos_emb.shape[0] < 1:
        raise ValueError("cope_attention: pos_emb needs at least one position (P >= 1)")
    if kv_mask is not None and kv_mask.shape != k.shape[:2]:
        raise ValueError(f"cope_attention: kv_mask {kv_mask.shape} must be [B, S] = {k.shape[:2]}")
