"""Paper-exact CoPE attention in plain jnp (the ground truth for every other implementation).

Contextual Position Encoding (Golovneva et al., 2024), per query head, with P = pos_emb.shape[0]:

1. s_ij = q_i . k_j * scale; masked keys (future, padding) get -inf.
2. g_ij = sigmoid(s_ij); masked gates are 0; the diagonal j = i counts.
3. p_ij = sum_{k=j..i} g_ik (reverse cumulative sum over keys), clamped to P - 1.
4. z_i[n] = q_i . E[n] for n in [0, P) (not scaled).
5. w = p - floor(p); b_ij = w z_i[ceil p] + (1 - w) z_i[floor p] (floor/ceil carry no gradient).
6. out_i = softmax_j(s_ij + b_ij) V.

Query i sits at absolute key position ``q_offset + i`` (``q_offset`` defaults to S - T, so T < S
means decoding against a cache). Rows without any valid key output zeros. All arithmetic is done
in float32 (or float64 when the inputs are float64); the output has q's dtype.

This implementation materialises [B, H, T, S] tensors: it is meant for tests, short sequences and
decoding, not long-context training (see the blockwise and Pallas implementations).
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


def cope_logits(
    q: jax.Array,
    k: jax.Array,
    pos_emb: jax.Array,
    mask: jax.Array,
    scale: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention logits s + b, gates g and positions p, each [B, K, G, T, S] (G = H // K).

    ``q`` is [B, T, K, G, D], ``k`` [B, S, K, D], ``mask`` broadcastable to [B, 1, 1, T, S].
    Masked entries of the returned logits are -inf, of the gates 0.
    """
    dt = q.dtype
    npos = pos_emb.shape[0]
    s = jnp.einsum("btkgd,bskd->bkgts", q, k) * jnp.asarray(scale, dt)
    s = jnp.where(mask, s, -jnp.inf)
    gates = jnp.where(mask, jax.nn.sigmoid(s), 0.0)
    # Reverse cumulative sum along keys: p_ij = sum_{k >= j} g_ik (future gates are already 0).
    pos = jnp.flip(jnp.cumsum(jnp.flip(gates, -1), axis=-1), -1)
    pos = jnp.minimum(pos, npos - 1)
    z = jnp.einsum("btkgd,pd->bkgtp", q, pos_emb)
    pos_floor = jax.lax.stop_gradient(jnp.floor(pos))
    pos_ceil = jax.lax.stop_gradient(jnp.ceil(pos))
    w = pos - pos_floor
    z_ceil = jnp.take_along_axis(z, pos_ceil.astype(jnp.int32), axis=-1)
    z_floor = jnp.take_along_axis(z, pos_floor.astype(jnp.int32), axis=-1)
    bias = w * z_ceil + (1.0 - w) * z_floor
    return s + bias, gates, pos


def relative_bias(
    q: jax.Array, rel_emb: jax.Array, kv_len: int, q_offset: jax.Array | int | None
) -> jax.Array:
    """[B, K, G, T, S] bias q_i . rel_emb[min(i - j, R - 1)] for query slot ``q_offset + i`` and
    key slot j (RAM's RelPosEmb with ``extend``: keys further than R - 1 share the last row;
    future keys get row 0 and are masked by the caller). ``q`` is [B, T, K, G, D]."""
    t = q.shape[1]
    q_offset = kv_len - t if q_offset is None else q_offset
    dist = jnp.arange(t)[:, None] + q_offset - jnp.arange(kv_len)[None, :]
    dist = jnp.clip(dist, 0, rel_emb.shape[0] - 1)  # [T, S]
    z = jnp.einsum("btkgd,rd->bkgtr", q, rel_emb)  # [B, K, G, T, R]
    return jnp.take_along_axis(z, jnp.broadcast_to(dist, (*z.shape[:3], *dist.shape)), axis=-1)


def cope_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pos_emb: jax.Array,
    *,
    kv_mask: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_offset: jax.Array | int | None = None,
    rel_emb: jax.Array | None = None,
) -> jax.Array:
    """CoPE attention, exactly as the paper's listing. Shapes as in :func:`cope_attention`.

    ``rel_emb`` [R, D] adds RAM's relative-position bias (``cope+rel``): q_i . rel_emb[min(i - j,
    R - 1)], unscaled like the CoPE bias, after the gates (which see q.k only)."""
    out_dtype = q.dtype
    dt = compute_dtype(q.dtype)
    b, t, h, d = q.shape
    s_len = k.shape[1]
    qg = split_heads(q, k.shape[2]).astype(dt)
    mask = attention_mask(b, t, s_len, kv_mask=kv_mask, causal=causal, q_offset=q_offset)
    logits, _, _ = cope_logits(qg, k.astype(dt), pos_emb.astype(dt), mask, default_scale(scale, d))
    if rel_emb is not None:
        logits = logits + relative_bias(qg, rel_emb.astype(dt), s_len, q_offset)
    probs = masked_softmax(logits, mask)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(dt))
    return out.reshape(b, t, h, v.shape[-1]).astype(out_dtype)


def cope_positions(
    q: jax.Array,
    k: jax.Array,
    pos_emb: jax.Array,
    *,
    kv_mask: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_offset: jax.Array | int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Gates and clamped positions [B, H, T, S] for inspection (plots, notebooks)."""
    dt = compute_dtype(q.dtype)
    b, t, h, d = q.shape
    qg = split_heads(q, k.shape[2]).astype(dt)
    mask = attention_mask(b, t, k.shape[1], kv_mask=kv_mask, causal=causal, q_offset=q_offset)
    _, gates, pos = cope_logits(qg, k.astype(dt), pos_emb.astype(dt), mask, default_scale(scale, d))
    pos = jnp.where(mask, pos, 0.0)
    return gates.reshape(b, h, t, -1), pos.reshape(b, h, t, -1)
