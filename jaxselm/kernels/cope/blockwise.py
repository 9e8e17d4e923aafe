"""Blockwise CoPE attention in plain jnp with a custom VJP (``impl="xla"``).

Memory is O(T * block) instead of the reference's O(T * S): the [T, S] gates, positions and
biases are never materialised. It is the CPU path and the portable fallback on any backend.

Forward, for each block of ``block_q`` queries (a sequential ``lax.map``):

* visit key blocks from the last one the block can see (the causal diagonal, or the end) down
  to key block 0, carrying each row's running gate sum ``c`` (the sum of gates of all keys to the
  right of the current block), together with the online-softmax state (max, sum, accumulator);
* inside a tile, positions are ``p = min(c + reverse_cumsum(g), P - 1)``, the bias is the linear
  interpolation of ``z = q E^T`` (a [block_q, P] tile) at ``p`` (two ``take_along_axis``);
* once every row's carry has reached P - 1, every key further left has position P - 1, so the
  tile's bias is the constant ``z[:, P - 1]``: the ``lax.cond`` takes a plain flash-attention
  branch (no sigmoid, no cumsum, no gather);
* the carry entering each key block is saved ([.., block_q, n_key_blocks] per query block, i.e.
  T * S / block_k floats) so the backward can rebuild bit-identical positions without a second
  right-to-left sweep.

Backward, per query block, key blocks from left to right (see docs/kernels.md for the
derivation): with ``dl = a * (dO.v - Delta)`` (the usual softmax gradient),
``dz[n] += sum_j dl_j hat(p_j - n)``, ``dr = dl * (z[ceil p] - z[floor p])`` (zero where clamped),
``dg_k = sum_{j <= k} dr_j`` (a prefix sum: the transpose of the reverse cumsum, carried from
the left) and ``ds = dl + dg * g * (1 - g)``; then ``dq += scale ds k + dz E``,
``dk += scale ds^T q``, ``dv += a^T dO``, ``dE += dz^T q``.

All arithmetic is in float32 (float64 for float64 inputs), exactly like the reference.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxselm.kernels.cope.blocks import BlockSizes, default_q_offset, key_validity, pad_axis
from jaxselm.kernels.cope.common import compute_dtype, default_scale, split_heads

# Finite "minus infinity" for masked logits: keeps every intermediate finite (no inf - inf).
NEG_INF = -1e30


def _tile_mask(qpos, kpos, valid, causal):
    """[B, 1, 1, bq, bk] bool: key kpos visible from query qpos and valid."""
    mask = valid[:, None, None, None, :]
    if causal:
        mask = mask & (kpos[None, :] <= qpos[:, None])[None, None, None]
    return mask


def _last_key_block(qi, q_offset, block_q, block_k, n_kb, causal):
    """Index of the last key block query block ``qi`` can see (-1 when none)."""
    if not causal:
        return jnp.int32(n_kb - 1)
    last_q = q_offset + qi * block_q + block_q - 1
    return jnp.clip(jnp.floor_divide(last_q, block_k), -1, n_kb - 1).astype(jnp.int32)


def _cumsum(x, reverse=False):
    """Inclusive cumulative sum along the last axis (reversed: suffix sums)."""
    return lax.cumsum(x, axis=x.ndim - 1, reverse=reverse)


def _band_positions(s, mask, c, npos):
    """Gates, clamped positions and the carry leaving the tile (to the left).

    s, mask [..., bq, bk]; c [..., bq] is the gate sum of every key right of this tile.
    """
    g = jnp.where(mask, jax.nn.sigmoid(s), 0.0)
    r = c[..., None] + _cumsum(g, reverse=True)
    p = jnp.minimum(r, npos - 1)
    return g, p, r[..., 0]


def _interp(z, p):
    """Bias w z[ceil p] + (1 - w) z[floor p] (as the reference), with its pieces."""
    f = jnp.floor(p)
    fi = f.astype(jnp.int32)
    ci = jnp.ceil(p).astype(jnp.int32)
    w = p - f
    # Indices are in [0, P - 1] by construction: skip the bounds handling of the default mode.
    zf = jnp.take_along_axis(z, fi, axis=-1, mode="promise_in_bounds")
    zc = jnp.take_along_axis(z, ci, axis=-1, mode="promise_in_bounds")
    return w * zc + (1.0 - w) * zf, fi, ci, w, zf, zc


def _scatter_rows(vals, idx, npos):
    """out[..., n] = sum_j vals[..., j] [idx[..., j] == n]  (vals, idx [..., bk]; out [..., P])."""
    lead = vals.shape[:-1]
    rows = math.prod(lead)
    seg = (jnp.arange(rows, dtype=jnp.int32)[:, None] * npos + idx.reshape(rows, -1)).reshape(-1)
    out = jax.ops.segment_sum(vals.reshape(-1), seg, num_segments=rows * npos)
    return out.reshape(*lead, npos)


def _query_block(q_blk, e, qi, q_offset, bq, bk, nk, causal):
    """z = q E^T of a query block, its clamped column z[P - 1], the block's query positions and
    the last key block it sees (the forward and the backward set up a block identically)."""
    npos = e.shape[0]
    z = jnp.einsum("bqkgd,pd->bkgqp", q_blk, e)
    z_last = z[..., npos - 1 : npos]
    qpos = q_offset + qi * bq + jnp.arange(bq, dtype=jnp.int32)
    return z, z_last, qpos, _last_key_block(qi, q_offset, bq, bk, nk, causal)


def _key_tile(q_blk, k, v, valid, qpos, kb, bk, causal, scale):
    """Key block ``kb``: its keys and values, the tile's mask and scaled scores [.., bq, bk]
    (the backward must rebuild exactly the forward's tiles)."""
    k_blk = lax.dynamic_slice_in_dim(k, kb * bk, bk, 1)
    v_blk = lax.dynamic_slice_in_dim(v, kb * bk, bk, 1)
    val = lax.dynamic_slice_in_dim(valid, kb * bk, bk, 1)
    mask = _tile_mask(qpos, kb * bk + jnp.arange(bk, dtype=jnp.int32), val, causal)
    s = jnp.einsum("bqkgd,bskd->bkgqs", q_blk, k_blk) * jnp.asarray(scale, q_blk.dtype)
    return k_blk, v_blk, mask, s


def _forward(q, k, v, e, valid, q_offset, causal, scale, bq, bk):
    """q [B, Tp, K, G, D], k/v [B, Sp, K, D*], e [P, D], valid [B, Sp] -> out, lse, ctab."""
    b, tp, nkv, g, _ = q.shape
    sp = k.shape[1]
    nq, nk = tp // bq, sp // bk
    npos = e.shape[0]
    dv = v.shape[-1]
    dt = q.dtype
    q_blocks = jnp.moveaxis(q.reshape(b, nq, bq, nkv, g, -1), 1, 0)

    def per_qblock(args):
        qi, q_blk = args
        z, z_last, qpos, kb_hi = _query_block(q_blk, e, qi, q_offset, bq, bk, nk, causal)

        def body(it, carry):
            m, l_sum, acc, c, ctab = carry
            kb = kb_hi - it
            _, v_blk, mask, s = _key_tile(q_blk, k, v, valid, qpos, kb, bk, causal, scale)
            ctab = lax.dynamic_update_index_in_dim(ctab, c, kb, axis=ctab.ndim - 1)

            def saturated():
                return s + z_last, c

            def band():
                _, p, c_left = _band_positions(s, mask, c, npos)
                return s + _interp(z, p)[0], c_left

            logits, c = lax.cond(jnp.all(c >= npos - 1), saturated, band)
            logits = jnp.where(mask, logits, NEG_INF)
            m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
            corr = jnp.exp(m - m_new)
            pr = jnp.where(mask, jnp.exp(logits - m_new[..., None]), 0.0)
            l_sum = l_sum * corr + jnp.sum(pr, axis=-1)
            acc = acc * corr[..., None] + jnp.einsum("bkgqs,bskd->bkgqd", pr, v_blk)
            return m_new, l_sum, acc, c, ctab

        init = (
            jnp.full((b, nkv, g, bq), NEG_INF, dt),
            jnp.zeros((b, nkv, g, bq), dt),
            jnp.zeros((b, nkv, g, bq, dv), dt),
            jnp.zeros((b, nkv, g, bq), dt),
            jnp.zeros((b, nkv, g, bq, nk), dt),
        )
        m, l_sum, acc, _, ctab = lax.fori_loop(0, kb_hi + 1, body, init)
        has_key = l_sum > 0
        out = jnp.where(has_key[..., None], acc / jnp.where(has_key, l_sum, 1.0)[..., None], 0.0)
        lse = jnp.where(has_key, m + jnp.log(jnp.where(has_key, l_sum, 1.0)), jnp.inf)
        return jnp.einsum("bkgqd->bqkgd", out), lse, ctab

    out, lse, ctab = lax.map(per_qblock, (jnp.arange(nq, dtype=jnp.int32), q_blocks))
    out = jnp.moveaxis(out, 0, 1).reshape(b, tp, nkv, g, dv)
    return out, lse, ctab  # lse [nq, B, K, G, bq], ctab [nq, B, K, G, bq, nk]


def _backward(res, d_out, causal, scale, bq, bk):
    q, k, v, e, valid, q_offset, out, lse, ctab = res
    b, tp, nkv, g, _d = q.shape
    sp = k.shape[1]
    nq, nk = tp // bq, sp // bk
    npos = e.shape[0]
    dt = q.dtype
    d_out = d_out.astype(dt)
    delta = jnp.einsum("btkgd,btkgd->bkgt", d_out, out)

    def blocks(x):  # [B, Tp, K, G, D] -> [nq, B, bq, K, G, D]
        return jnp.moveaxis(x.reshape(b, nq, bq, *x.shape[2:]), 1, 0)

    delta_b = jnp.moveaxis(delta.reshape(b, nkv, g, nq, bq), 3, 0)

    def per_qblock(carry, xs):
        dk_acc, dv_acc, de_acc = carry
        qi, q_blk, do_blk, lse_blk, delta_blk, ctab_blk = xs
        z, z_last, qpos, kb_hi = _query_block(q_blk, e, qi, q_offset, bq, bk, nk, causal)

        def body(kb, c2):
            dq, dz, drc, dk_acc, dv_acc = c2
            k_blk, v_blk, mask, s = _key_tile(q_blk, k, v, valid, qpos, kb, bk, causal, scale)
            dpv = jnp.einsum("bqkgd,bskd->bkgqs", do_blk, v_blk)
            c = lax.dynamic_index_in_dim(ctab_blk, kb, axis=ctab_blk.ndim - 1, keepdims=False)

            def probs(logits):
                a = jnp.where(mask, jnp.exp(logits - lse_blk[..., None]), 0.0)
                return a, a * (dpv - delta_blk[..., None])

            def saturated():
                a, dl = probs(s + z_last)
                dz_new = dz.at[..., npos - 1].add(jnp.sum(dl, axis=-1))
                return a, dl, dz_new, drc

            def band():
                gates, p, _ = _band_positions(s, mask, c, npos)
                bias, fi, ci, w, zf, zc = _interp(z, p)
                a, dl = probs(s + bias)
                dz_new = dz + _scatter_rows(dl * (1.0 - w), fi, npos)
                dz_new = dz_new + _scatter_rows(dl * w, ci, npos)
                dr = dl * (zc - zf)  # zero where p is clamped (floor == ceil there)
                dgate = drc[..., None] + _cumsum(dr)
                ds = dl + dgate * gates * (1.0 - gates)
                return a, ds, dz_new, dgate[..., -1]

            a, ds, dz, drc = lax.cond(jnp.all(c >= npos - 1), saturated, band)
            ds = ds * jnp.asarray(scale, dt)
            dq = dq + jnp.einsum("bkgqs,bskd->bqkgd", ds, k_blk)
            dk_blk = jnp.einsum("bkgqs,bqkgd->bskd", ds, q_blk)
            dv_blk = jnp.einsum("bkgqs,bqkgd->bskd", a, do_blk)
            start = kb * bk
            dk_acc = lax.dynamic_update_slice_in_dim(
                dk_acc, lax.dynamic_slice_in_dim(dk_acc, start, bk, 1) + dk_blk, start, 1
            )
            dv_acc = lax.dynamic_update_slice_in_dim(
                dv_acc, lax.dynamic_slice_in_dim(dv_acc, start, bk, 1) + dv_blk, start, 1
            )
            return dq, dz, drc, dk_acc, dv_acc

        init = (
            jnp.zeros_like(q_blk),
            jnp.zeros(z.shape, dt),
            jnp.zeros((b, nkv, g, bq), dt),
            dk_acc,
            dv_acc,
        )
        dq, dz, _, dk_acc, dv_acc = lax.fori_loop(0, kb_hi + 1, body, init)
        dq = dq + jnp.einsum("bkgqp,pd->bqkgd", dz, e)
        de_acc = de_acc + jnp.einsum("bkgqp,bqkgd->pd", dz, q_blk)
        return (dk_acc, dv_acc, de_acc), dq

    xs = (jnp.arange(nq, dtype=jnp.int32), blocks(q), blocks(d_out), lse, delta_b, ctab)
    init = (jnp.zeros_like(k), jnp.zeros_like(v), jnp.zeros_like(e))
    (dk, dv, de), dq = lax.scan(per_qblock, init, xs)
    dq = jnp.moveaxis(dq, 0, 1).reshape(q.shape)
    return dq, dk, dv, de


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _cope_blockwise(q, k, v, e, valid, q_offset, causal, scale, bq, bk):
    return _forward(q, k, v, e, valid, q_offset, causal, scale, bq, bk)[0]


def _cope_fwd(q, k, v, e, valid, q_offset, causal, scale, bq, bk):
    out, lse, ctab = _forward(q, k, v, e, valid, q_offset, causal, scale, bq, bk)
    return out, (q, k, v, e, valid, q_offset, out, lse, ctab)


def _cope_bwd(causal, scale, bq, bk, res, d_out):
    dq, dk, dv, de = _backward(res, d_out, causal, scale, bq, bk)
    return dq, dk, dv, de, None, None


_cope_blockwise.defvjp(_cope_fwd, _cope_bwd)


def cope_attention_blockwise(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pos_emb: jax.Array,
    *,
    kv_mask: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_offset: jax.Array | int | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Blockwise CoPE attention; same contract as :func:`jaxselm.kernels.cope.cope_attention`."""
    out_dtype = q.dtype
    dt = compute_dtype(q.dtype)
    b, t, h, d = q.shape
    s_len, nkv = k.shape[1], k.shape[2]
    scale = float(default_scale(scale, d))
    blocks = (block_sizes or BlockSizes.default("xla")).fit(t, s_len)
    bq, bk = blocks.block_q, blocks.block_k
    q_off = default_q_offset(q_offset, t, s_len)
    valid = key_validity(kv_mask, b, s_len, bk)
    qg = pad_axis(split_heads(q, nkv).astype(dt), 1, bq)
    kp = pad_axis(k.astype(dt), 1, bk)
    vp = pad_axis(v.astype(dt), 1, bk)
    out = _cope_blockwise(qg, kp, vp, pos_emb.astype(dt), valid, q_off, bool(causal), scale, bq, bk)
    return out[:, :t].reshape(b, t, h, v.shape[-1]).astype(out_dtype)
