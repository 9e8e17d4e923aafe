"""Helpers shared by every attention implementation: masks, softmax, head grouping, dtypes, scale,
input checks (used by the CoPE implementations and by :mod:`jaxselm.kernels.attention`)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def compute_dtype(dtype) -> jnp.dtype:
    """float64 stays float64 (tests); everything else is computed in float32."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def default_scale(scale: float | None, head_dim: int) -> float:
    """The logit scale: ``head_dim ** -0.5`` unless one is given."""
    return head_dim**-0.5 if scale is None else scale


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
    sliding_window: int | None = None,
) -> jax.Array:
    """Boolean mask [B or 1, 1, 1, T, S]: True where query i may attend to key j.

    Query i sits at absolute key position ``q_offset + i`` (default S - T). With a sliding window,
    key j is visible to query i only if their positions differ by less than ``sliding_window``.
    """
    q_offset = kv_len - q_len if q_offset is None else q_offset
    qpos = jnp.arange(q_len)[:, None] + q_offset
    kpos = jnp.arange(kv_len)[None, :]
    mask = jnp.ones((1, 1, 1, q_len, kv_len), dtype=bool)
    if causal:
        mask = mask & (kpos <= qpos)[None, None, None]
    if kv_mask is not None:
        mask = mask & kv_mask.astype(bool)[:, None, None, None, :]
    if sliding_window is not None:
        mask = mask & (qpos - kpos < sliding_window)[None, None, None]
    return mask


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis restricted to ``mask``, in the logits' dtype.

    ``logits`` must already be -inf where ``mask`` is False (so no gradient reaches those
    entries). Masked entries get probability 0; rows without any valid key are all zeros, never
    NaN. The row maximum is subtracted outside the gradient.
    """
    row_valid = jnp.any(mask, axis=-1, keepdims=True)
    m = jnp.where(
        row_valid, jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1, keepdims=True), 0.0
    )
    e = jnp.where(mask, jnp.exp(logits - jax.lax.stop_gradient(m)), 0.0)
    return e / jnp.where(row_valid, jnp.sum(e, axis=-1, keepdims=True), 1.0)


def check_inputs(q, k, v, pos_emb, kv_mask) -> None:
    """Shape checks at the public boundary; raise ValueError naming the argument."""
    chex.assert_rank([q, k, v], 4)
    chex.assert_rank(pos_emb, 2)
    b, _, h, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(
            f"cope_attention: batch of k {k.shape} / v {v.shape} != batch of q {q.shape}"
        )
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
