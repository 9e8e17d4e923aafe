"""Plain masked softmax attention (for RoPE and NoPE layers), jnp, fp32 softmax.

Same interface as :func:`jaxselm.kernels.cope.cope_attention` minus the position embedding:
q [B, T, H, D], k and v [B, S, K, D] (GQA), kv_mask [B, S] (True = valid key), query i at key
position ``q_offset + i`` (default S - T), optional sliding window (key j visible to query i only
if i - j < window, as in Mistral). Rows without any valid key output zeros, never NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxselm.kernels.cope.common import (
    attention_mask,
    compute_dtype,
    default_scale,
    masked_softmax,
    split_heads,
)


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
    dt = compute_dtype(q.dtype)
    scale = default_scale(scale, d)
    mask = attention_mask(
        b,
        t,
        k.shape[1],
        kv_mask=kv_mask,
        causal=causal,
        q_offset=q_offset,
        sliding_window=sliding_window,
    )
    qg = split_heads(q, k.shape[2])
    # Matmuls in the input dtype with fp32 accumulation; softmax in fp32.
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=dt) * jnp.asarray(scale, dt)
    probs = masked_softmax(jnp.where(mask, s, -jnp.inf), mask).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=dt)
    return out.reshape(b, t, h, v.shape[-1]).astype(q.dtype)
