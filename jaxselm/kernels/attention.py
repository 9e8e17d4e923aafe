"""Plain masked softmax attention (for RoPE and NoPE layers), jnp, fp32 softmax.

Same interface as :func:`jaxselm.kernels.cope.cope_attention` minus the position embedding:
q [B, T, H, D], k and v [B, S, K, D] (GQA), kv_mask [B, S] (True = valid key), query i at key
position ``q_offset + i`` (default S - T), optional sliding window (key j visible to query i only
if i - j < window, as in Mistral). Rows without any valid key output zeros, never NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxselm.kernels.cope.common import attention_mask, compute_dtype, split_heads


def masked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_mask: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_offset: jax.Array | int | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """Softmax attention with padding / causal / sliding-window masks. Returns [B, T, H, D]."""
    b, t, h, d = q.shape
    s_len = k.shape[1]
    dt = compute_dtype(q.dtype)
    scale = d**-0.5 if scale is None else scale
    mask = attention_mask(b, t, s_len, kv_mask=kv_mask, causal=causal, q_offset=q_offset)
    if sliding_window is not None:
        off = s_len - t if q_offset is None else q_offset
        qpos = jnp.arange(t)[:, None] + off
        kpos = jnp.arange(s_len)[None, :]
        mask = mask & (qpos - kpos < sliding_window)[None, None, None]
    qg = split_heads(q, k.shape[2])
    # Matmuls in the input dtype with fp32 accumulation; softmax in fp32.
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=dt) * jnp.asarray(scale, dt)
    s = jnp.where(mask, s, -jnp.inf)
    row_valid = jnp.any(mask, axis=-1, keepdims=True)
    m = jnp.where(row_valid, jnp.max(s, axis=-1, keepdims=True), 0.0)
    e = jnp.where(mask, jnp.exp(s - jax.lax.stop_gradient(m)), 0.0)
    denom = jnp.where(row_valid, jnp.sum(e, axis=-1, keepdims=True), 1.0)
    probs = (e / denom).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=dt)
    return out.reshape(b, t, h, v.shape[-1]).astype(q.dtype)
