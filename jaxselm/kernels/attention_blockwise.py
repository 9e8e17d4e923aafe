"""Blockwise masked attention in plain jnp with a custom VJP (``impl="blockwise"``).

The flash-attention recurrence written with ``lax`` loops, for any backend: the [B, H, T, S]
scores are never materialised, forward or backward; memory is O(T * block_k) per head.

Forward, for each block of ``block_q`` queries (a sequential ``lax.map``): visit the key blocks the
block can see (from the first one inside the sliding window to the last one left of the causal
diagonal; the masked tiles outside that range are skipped) keeping the online-softmax state
(row max ``m``, row sum ``l``, accumulator). Rows without any valid key end with ``l = 0``: they
output zeros and get ``lse = +inf``, so the backward's ``exp(s - lse)`` is 0 there, never NaN.

Backward, per query block, the same key blocks: ``p = exp(s - lse)``, ``ds = p * (dO.v - Delta)``
with ``Delta = rowsum(dO * O)``; ``dq += scale ds k``, ``dk += scale ds^T q``, ``dv += p^T dO``
(dk and dv accumulate across query blocks in the ``lax.scan`` carry).

Precision follows :func:`jaxselm.kernels.attention.masked_attention_xla`: matmuls in the input
dtype with float32 accumulation (float64 for float64 inputs), softmax statistics in float32,
probabilities cast to the value dtype before the weighted sum.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxselm.kernels.cope.blocks import BlockSizes, default_q_offset, key_validity, pad_axis
from jaxselm.kernels.cope.blockwise import NEG_INF
from jaxselm.kernels.cope.common import compute_dtype, default_scale, split_heads

#: Query x key tile. Larger key blocks mean fewer loop steps (the loop overhead dominates short
#: tiles on CPU) at block_q * block_k floats per head of working memory.
DEFAULT_BLOCKS = BlockSizes(block_q=256, block_k=512)


def _key_block_range(qi, q_offset, bq, bk, n_kb, causal, window):
    """First and last key block query block ``qi`` can see (``lo > hi`` when none)."""
    first_q = q_offset + qi * bq
    hi = jnp.int32(n_kb - 1)
    if causal:
        hi = jnp.clip(jnp.floor_divide(first_q + bq - 1, bk), -1, n_kb - 1).astype(jnp.int32)
    lo = jnp.int32(0)
    if window is not None:
        lo = jnp.clip(jnp.floor_divide(first_q - window + 1, bk), 0, n_kb).astype(jnp.int32)
    return lo, hi


def _tile(q_blk, k, v, valid, qpos, kb, bk, causal, window, scale, dt):
    """Key block ``kb``: keys, values, the tile's mask [B, 1, 1, bq, bk] and scaled scores
    [B, K, G, bq, bk] (the backward rebuilds exactly the forward's tiles)."""
    k_blk = lax.dynamic_slice_in_dim(k, kb * bk, bk, 1)
    v_blk = lax.dynamic_slice_in_dim(v, kb * bk, bk, 1)
    kpos = kb * bk + jnp.arange(bk, dtype=jnp.int32)
    mask = lax.dynamic_slice_in_dim(valid, kb * bk, bk, 1)[:, None, None, None, :]
    if causal:
        mask = mask & (kpos[None, :] <= qpos[:, None])[None, None, None]
    if window is not None:
        mask = mask & (qpos[:, None] - kpos[None, :] < window)[None, None, None]
    s = jnp.einsum("bqkgd,bskd->bkgqs", q_blk, k_blk, preferred_element_type=dt)
    return k_blk, v_blk, mask, s * jnp.asarray(scale, dt)


def _forward(q, k, v, valid, q_offset, causal, window, scale, bq, bk):
    """q [B, Tp, K, G, D], k/v [B, Sp, K, D*], valid [B, Sp] -> out [B, Tp, K, G, Dv] (float32),
    lse [nq, B, K, G, bq]."""
    b, tp, nkv, g, _ = q.shape
    nq, nk = tp // bq, k.shape[1] // bk
    dv = v.shape[-1]
    dt = compute_dtype(q.dtype)
    q_blocks = jnp.moveaxis(q.reshape(b, nq, bq, nkv, g, -1), 1, 0)

    def per_qblock(args):
        qi, q_blk = args
        qpos = q_offset + qi * bq + jnp.arange(bq, dtype=jnp.int32)
        lo, hi = _key_block_range(qi, q_offset, bq, bk, nk, causal, window)

        def body(kb, carry):
            m, l_sum, acc = carry
            _, v_blk, mask, s = _tile(q_blk, k, v, valid, qpos, kb, bk, causal, window, scale, dt)
            s = jnp.where(mask, s, NEG_INF)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            corr = jnp.exp(m - m_new)
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            l_sum = l_sum * corr + jnp.sum(p, axis=-1)
            pv = jnp.einsum(
                "bkgqs,bskd->bkgqd", p.astype(v.dtype), v_blk, preferred_element_type=dt
            )
            return m_new, l_sum, acc * corr[..., None] + pv

        init = (
            jnp.full((b, nkv, g, bq), NEG_INF, dt),
            jnp.zeros((b, nkv, g, bq), dt),
            jnp.zeros((b, nkv, g, bq, dv), dt),
        )
        m, l_sum, acc = lax.fori_loop(lo, hi + 1, body, init)
        has_key = l_sum > 0
        safe_l = jnp.where(has_key, l_sum, 1.0)
        out = jnp.where(has_key[..., None], acc / safe_l[..., None], 0.0)
        lse = jnp.where(has_key, m + jnp.log(safe_l), jnp.inf)
        return jnp.einsum("bkgqd->bqkgd", out), lse

    out, lse = lax.map(per_qblock, (jnp.arange(nq, dtype=jnp.int32), q_blocks))
    return jnp.moveaxis(out, 0, 1).reshape(b, tp, nkv, g, dv), lse


def _backward(res, d_out, causal, window, scale, bq, bk):
    q, k, v, valid, q_offset, out, lse = res
    b, tp, nkv, g, _ = q.shape
    nq, nk = tp // bq, k.shape[1] // bk
    dt = compute_dtype(q.dtype)
    d_out = d_out.astype(dt)
    delta = jnp.einsum("btkgd,btkgd->bkgt", d_out, out)
    delta_b = jnp.moveaxis(delta.reshape(b, nkv, g, nq, bq), 3, 0)
    d_out = d_out.astype(q.dtype)  # matmul operands in the input dtype, as the forward's

    def blocks(x):  # [B, Tp, ...] -> [nq, B, bq, ...]
        return jnp.moveaxis(x.reshape(b, nq, bq, *x.shape[2:]), 1, 0)

    def per_qblock(carry, xs):
        dk_acc, dv_acc = carry
        qi, q_blk, do_blk, lse_blk, delta_blk = xs
        qpos = q_offset + qi * bq + jnp.arange(bq, dtype=jnp.int32)
        lo, hi = _key_block_range(qi, q_offset, bq, bk, nk, causal, window)

        def body(kb, c):
            dq, dk_acc, dv_acc = c
            k_blk, v_blk, mask, s = _tile(
                q_blk, k, v, valid, qpos, kb, bk, causal, window, scale, dt
            )
            p = jnp.where(mask, jnp.exp(s - lse_blk[..., None]), 0.0)
            dp = jnp.einsum("bqkgd,bskd->bkgqs", do_blk, v_blk, preferred_element_type=dt)
            ds = (p * (dp - delta_blk[..., None]) * jnp.asarray(scale, dt)).astype(q.dtype)
            p = p.astype(q.dtype)
            dq = dq + jnp.einsum("bkgqs,bskd->bqkgd", ds, k_blk, preferred_element_type=dt)
            dk_blk = jnp.einsum("bkgqs,bqkgd->bskd", ds, q_blk, preferred_element_type=dt)
            dv_blk = jnp.einsum("bkgqs,bqkgd->bskd", p, do_blk, preferred_element_type=dt)
            start = kb * bk

            def add(acc, blk):
                old = lax.dynamic_slice_in_dim(acc, start, bk, 1)
                return lax.dynamic_update_slice_in_dim(acc, old + blk, start, 1)

            return dq, add(dk_acc, dk_blk), add(dv_acc, dv_blk)

        dq0 = jnp.zeros(q_blk.shape, dt)
        dq, dk_acc, dv_acc = lax.fori_loop(lo, hi + 1, body, (dq0, dk_acc, dv_acc))
        return (dk_acc, dv_acc), dq

    xs = (jnp.arange(nq, dtype=jnp.int32), blocks(q), blocks(d_out), lse, delta_b)
    init = (jnp.zeros(k.shape, dt), jnp.zeros(v.shape, dt))
    (dk, dv), dq = lax.scan(per_qblock, init, xs)
    dq = jnp.moveaxis(dq, 0, 1).reshape(q.shape)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _blockwise(q, k, v, valid, q_offset, causal, window, scale, bq, bk):
    return _forward(q, k, v, valid, q_offset, causal, window, scale, bq, bk)[0]


def _blockwise_fwd(q, k, v, valid, q_offset, causal, window, scale, bq, bk):
    out, lse = _forward(q, k, v, valid, q_offset, causal, window, scale, bq, bk)
    return out, (q, k, v, valid, q_offset, out, lse)


def _blockwise_bwd(causal, window, scale, bq, bk, res, d_out):
    return (*_backward(res, d_out, causal, window, scale, bq, bk), None, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def masked_attention_blockwise(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_mask: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_offset: jax.Array | int | None = None,
    sliding_window: int | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Blockwise masked attention; same contract as
    :func:`jaxselm.kernels.attention.masked_attention`. Returns [B, T, H, Dv] in q's dtype."""
    b, t, h, d = q.shape
    s_len, nkv = k.shape[1], k.shape[2]
    scale = float(default_scale(scale, d))
    blocks = (block_sizes or DEFAULT_BLOCKS).fit(t, s_len)
    bq, bk = blocks.block_q, blocks.block_k
    q_off = default_q_offset(q_offset, t, s_len)
    valid = key_validity(kv_mask, b, s_len, bk)  # padded keys are invalid: they never count
    qg = pad_axis(split_heads(q, nkv), 1, bq)
    kp, vp = pad_axis(k, 1, bk), pad_axis(v, 1, bk)
    window = None if sliding_window is None else int(sliding_window)
    out = _blockwise(qg, kp, vp, valid, q_off, bool(causal), window, scale, bq, bk)
    return out[:, :t].reshape(b, t, h, v.shape[-1]).astype(q.dtype)
