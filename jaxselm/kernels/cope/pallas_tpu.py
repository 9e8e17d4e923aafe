"""CoPE attention as Mosaic TPU Pallas kernels (``impl="pallas_tpu"``), forward and backward.

Layout [B, H, T, D]; three ``pallas_call``s (forward, dq, dk/dv), each with the key (or query)
blocks as the innermost, sequential ("arbitrary") grid axis and the running state in VMEM
scratch, as in JAX's TPU flash attention. The query offset (decoding into a KV cache) is a scalar
prefetch argument, so the index maps can skip the key blocks a causal query block never sees
(their block index repeats, so no DMA is issued, and ``pl.when`` skips the compute).

TPU-specific choices:

* no cumsum on TPU: the reverse cumulative sum of gates inside a tile is ``g @ U`` with the
  upper-triangular ones matrix U (and the prefix sum of the backward ``dr @ L``), on the MXU at
  full float32 precision;
* no lane gather: ``z[floor p]`` and ``z[ceil p]`` are built by a loop over the integer
  positions the tile's unclamped entries span (usually a few dozen: a key block adds at most
  ``block_k`` to a position), each step extracting one column of the [block_q, P] tile of z with
  a masked lane reduction; ``dz`` is accumulated the same way. Entries clamped at P - 1 use
  ``z[:, P - 1]`` directly;
* once every row of a tile has a carry >= P - 1 a ``lax.cond`` takes the plain flash-attention
  branch (bias ``z[:, P - 1]``), so far from the diagonal the kernel is flash attention plus one
  broadcast add;
* block sizes default to 128 x 128 (lane-aligned), P is padded to a multiple of 128.

The tile math shared with the GPU kernels, the layout and the custom VJP are in
``pallas_common``; :data:`BACKEND` is what this module hands it. The same kernels run on CPU with
``interpret=True`` (the default when the backend is CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxselm.kernels.cope import pallas_common as pc

_F32 = jnp.float32


def _rcumsum(x):
    """Reverse inclusive cumsum along keys as x @ U, U[k, j] = (k >= j)."""
    n = x.shape[1]
    u = lax.broadcasted_iota(jnp.int32, (n, n), 0) >= lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return jnp.dot(x, u.astype(_F32), precision=lax.Precision.HIGHEST, preferred_element_type=_F32)


def _cumsum(x):
    """Inclusive prefix sum along keys as x @ L, L[k, j] = (k <= j)."""
    n = x.shape[1]
    lower = lax.broadcasted_iota(jnp.int32, (n, n), 0) <= lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return jnp.dot(
        x, lower.astype(_F32), precision=lax.Precision.HIGHEST, preferred_element_type=_F32
    )


def _column(x, idx):
    """x[:, idx] as [rows, 1] via a masked lane reduction (idx a traced scalar)."""
    iota = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return jnp.sum(jnp.where(iota == idx, x, 0.0), axis=1, keepdims=True)


def _set_column(x, idx, col):
    iota = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return jnp.where(iota == idx, col, x)


def _gather(z, z_last):
    """``gather(floor, ceil, unsat)`` for :func:`pc.band_forward`: z[floor p], z[ceil p] per
    entry (z[P - 1] where not ``unsat``), by a loop over the integer positions the tile spans."""

    def gather(f, ce, unsat):
        lo, hi = pc.position_range(f, ce, unsat)
        init = jnp.broadcast_to(z_last, f.shape)

        def body(n, carry):
            zf, zc = carry
            col = _column(z, n)
            nf = n.astype(_F32)
            zf = jnp.where(unsat & (f == nf), col, zf)
            zc = jnp.where(unsat & (ce == nf), col, zc)
            return zf, zc

        return lax.fori_loop(lo, hi + 1, body, (init, init))

    return gather


def _scatter(dl, f, ce, w, unsat, npos, pp):
    """dz[n] = sum_j dl_j hat(p_j - n) for one tile, as a [bq, pp] array."""
    clamped, lo, hi, column = pc.dz_columns(dl, f, ce, w, unsat)
    iota = lax.broadcasted_iota(jnp.int32, (dl.shape[0], pp), 1)
    dz = jnp.where(iota == npos - 1, clamped, 0.0)

    def body(n, dz):
        return dz + jnp.where(iota == n, column(n), 0.0)

    return lax.fori_loop(lo, hi + 1, body, dz)


def _band_bwd(s, mask, c, drc, z, z_last, lse, dpv, delta, cfg):
    gather = _gather(z, z_last)
    return pc.band_backward(s, mask, c, drc, lse, dpv, delta, cfg.npos, _rcumsum, _cumsum, gather)


def _compiler_params(n_parallel):
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel + ("arbitrary",))


def _query_major_specs(cfg, d, dv, pp, key_block):
    """BlockSpecs of q, k, v, z and valid for a (B, H, query block, key step) grid, and the
    index map of per-query-row blocks. ``key_block(i, j, q_offset)`` is the key block that step
    ``j`` of query block ``i`` loads (steps a causal block never needs repeat a block index, so
    no DMA is issued for them)."""
    bq, bk, grp = cfg.block_q, cfg.block_k, cfg.group

    def kv_block(b_, h_, i, j, qoff):
        return b_, h_ // grp, key_block(i, j, qoff[0]), 0

    def valid_block(b_, h_, i, j, qoff):
        return b_, 0, key_block(i, j, qoff[0])

    def row_block(b_, h_, i, j, qoff):
        return b_, h_, i, 0

    specs = [
        pl.BlockSpec((None, None, bq, d), row_block),
        pl.BlockSpec((None, None, bk, d), kv_block),
        pl.BlockSpec((None, None, bk, dv), kv_block),
        pl.BlockSpec((None, None, bq, pp), row_block),
        pl.BlockSpec((None, 1, bk), valid_block),
    ]
    return specs, row_block


# --------------------------------------------------------------------------------------------
# Forward


def _fwd_kernel(
    qoff_ref,
    q_ref,
    k_ref,
    v_ref,
    z_ref,
    valid_ref,
    o_ref,
    lse_ref,
    ctab_ref,
    m_sc,
    l_sc,
    acc_sc,
    c_sc,
    *,
    cfg,
    nk,
):
    i, j = pl.program_id(2), pl.program_id(3)
    qoff = qoff_ref[0]
    kb = pc.last_key_block(i, qoff, cfg, nk) - j

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, pc.NEG_INF, _F32)
        l_sc[...] = jnp.zeros(l_sc.shape, _F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)
        c_sc[...] = jnp.zeros(c_sc.shape, _F32)
        ctab_ref[...] = jnp.zeros(ctab_ref.shape, _F32)

    @pl.when(kb >= 0)
    def _step():
        s = pc.dot_nt(q_ref[...], k_ref[...]) * cfg.scale
        mask = pc.tile_mask(qoff, i, kb, valid_ref[...], cfg)
        z = z_ref[...]
        z_last = _column(z, cfg.npos - 1)
        c = c_sc[...]
        ctab_ref[...] = _set_column(ctab_ref[...], kb, c)

        def saturated():
            return s + z_last, c

        def band():
            return pc.band_forward(s, mask, c, cfg.npos, _rcumsum, _gather(z, z_last))

        logits, c_sc[...] = lax.cond(jnp.min(c) >= cfg.npos - 1, saturated, band)
        m, l_sum, acc = pc.online_softmax_step(
            logits, mask, m_sc[...], l_sc[...], acc_sc[...], v_ref[...], pc.dot_nn
        )
        m_sc[...], l_sc[...], acc_sc[...] = m, l_sum, acc

    @pl.when(j == nk - 1)
    def _finish():
        out, lse = pc.finalize(m_sc[...], l_sc[...], acc_sc[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def forward_call(cfg, q, k, v, z, valid, q_offset):
    b, h, tp, d = q.shape
    dv = v.shape[-1]
    nq, nk = tp // cfg.block_q, k.shape[2] // cfg.block_k
    pp = z.shape[-1]
    bq = cfg.block_q

    def key_block(i, j, qoff):  # right to left from the last key block the query block sees
        return jnp.maximum(pc.last_key_block(i, qoff, cfg, nk) - j, 0)

    in_specs, row_block = _query_major_specs(cfg, d, dv, pp, key_block)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, h, nq, nk),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bq, dv), row_block),
            pl.BlockSpec((None, None, bq, 1), row_block),
            pl.BlockSpec((None, None, bq, nk), row_block),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, 1), _F32),
            pltpu.VMEM((bq, 1), _F32),
            pltpu.VMEM((bq, dv), _F32),
            pltpu.VMEM((bq, 1), _F32),
        ],
    )
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, nk=nk),
        grid_spec=grid_spec,
        out_shape=pc.forward_out_shape(q, v, nk),
        compiler_params=_compiler_params(3),
        interpret=cfg.interpret,
        name="cope_fwd_tpu",
    )(q_offset.reshape(1), q, k, v, z, valid)


# --------------------------------------------------------------------------------------------
# Backward: dq (and dz, drtab)


def _dq_kernel(
    qoff_ref,
    q_ref,
    k_ref,
    v_ref,
    z_ref,
    valid_ref,
    do_ref,
    lse_ref,
    delta_ref,
    ctab_ref,
    dq_ref,
    dz_ref,
    drtab_ref,
    dq_sc,
    drc_sc,
    *,
    cfg,
    nk,
):
    i, kb = pl.program_id(2), pl.program_id(3)
    qoff = qoff_ref[0]
    kb_hi = pc.last_key_block(i, qoff, cfg, nk)

    @pl.when(kb == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, _F32)
        drc_sc[...] = jnp.zeros(drc_sc.shape, _F32)
        dz_ref[...] = jnp.zeros(dz_ref.shape, _F32)
        drtab_ref[...] = jnp.zeros(drtab_ref.shape, _F32)

    @pl.when(kb <= kb_hi)
    def _step():
        k = k_ref[...]
        s = pc.dot_nt(q_ref[...], k) * cfg.scale
        dpv = pc.dot_nt(do_ref[...], v_ref[...])
        mask = pc.tile_mask(qoff, i, kb, valid_ref[...], cfg)
        z = z_ref[...]
        z_last = _column(z, cfg.npos - 1)
        lse, delta = lse_ref[...], delta_ref[...]
        c = _column(ctab_ref[...], kb)
        drc = drc_sc[...]
        drtab_ref[...] = _set_column(drtab_ref[...], kb, drc)
        dz = dz_ref[...]

        def saturated():
            _, dl = pc.tile_probs(s + z_last, mask, lse, dpv, delta)
            last = _column(dz, cfg.npos - 1) + jnp.sum(dl, axis=1, keepdims=True)
            return dl, _set_column(dz, cfg.npos - 1, last), drc

        def band():
            _, dl, ds, (f, ce, w, unsat), drc_new = _band_bwd(
                s, mask, c, drc, z, z_last, lse, dpv, delta, cfg
            )
            return ds, dz + _scatter(dl, f, ce, w, unsat, cfg.npos, z.shape[1]), drc_new

        ds, dz_ref[...], drc_sc[...] = lax.cond(jnp.min(c) >= cfg.npos - 1, saturated, band)
        dq_sc[...] += pc.dot_nn(ds * cfg.scale, k)

    @pl.when(kb == nk - 1)
    def _finish():
        dq_ref[...] = dq_sc[...]


def dq_call(cfg, q, k, v, z, valid, q_offset, d_out, lse, delta, ctab):
    b, h, tp, d = q.shape
    dv = v.shape[-1]
    nq, nk = tp // cfg.block_q, k.shape[2] // cfg.block_k
    pp = z.shape[-1]
    bq = cfg.block_q

    def key_block(i, j, qoff):  # left to right, up to the last key block the query block sees
        return jnp.clip(j, 0, jnp.maximum(pc.last_key_block(i, qoff, cfg, nk), 0))

    in_specs, row_block = _query_major_specs(cfg, d, dv, pp, key_block)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, h, nq, nk),
        in_specs=in_specs
        + [
            pl.BlockSpec((None, None, bq, dv), row_block),
            pl.BlockSpec((None, None, bq, 1), row_block),
            pl.BlockSpec((None, None, bq, 1), row_block),
            pl.BlockSpec((None, None, bq, nk), row_block),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, d), row_block),
            pl.BlockSpec((None, None, bq, pp), row_block),
            pl.BlockSpec((None, None, bq, nk), row_block),
        ],
        scratch_shapes=[pltpu.VMEM((bq, d), _F32), pltpu.VMEM((bq, 1), _F32)],
    )
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, nk=nk),
        grid_spec=grid_spec,
        out_shape=pc.dq_out_shape(q, z, nk),
        compiler_params=_compiler_params(3),
        interpret=cfg.interpret,
        name="cope_dq_tpu",
    )(q_offset.reshape(1), q, k, v, z, valid, d_out, lse, delta, ctab)


# --------------------------------------------------------------------------------------------
# Backward: dk, dv


def _dkv_kernel(
    qoff_ref,
    q_ref,
    k_ref,
    v_ref,
    z_ref,
    valid_ref,
    do_ref,
    lse_ref,
    delta_ref,
    ctab_ref,
    drtab_ref,
    dk_ref,
    dv_ref,
    dk_sc,
    dv_sc,
    *,
    cfg,
    nq,
    nk,
):
    kb, step = pl.program_id(2), pl.program_id(3)
    qi = lax.rem(step, nq)
    qoff = qoff_ref[0]

    @pl.when(step == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, _F32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, _F32)

    @pl.when(kb <= pc.last_key_block(qi, qoff, cfg, nk))
    def _step():
        q = q_ref[...]
        d_out = do_ref[...]
        s = pc.dot_nt(q, k_ref[...]) * cfg.scale
        dpv = pc.dot_nt(d_out, v_ref[...])
        mask = pc.tile_mask(qoff, qi, kb, valid_ref[...], cfg)
        z = z_ref[...]
        z_last = _column(z, cfg.npos - 1)
        lse, delta = lse_ref[...], delta_ref[...]
        c = _column(ctab_ref[...], kb)
        drc = _column(drtab_ref[...], kb)

        def saturated():
            return pc.tile_probs(s + z_last, mask, lse, dpv, delta)

        def band():
            a, _, ds, _, _ = _band_bwd(s, mask, c, drc, z, z_last, lse, dpv, delta, cfg)
            return a, ds

        a, ds = lax.cond(jnp.min(c) >= cfg.npos - 1, saturated, band)
        dv_sc[...] += pc.dot_tn(a, d_out)
        dk_sc[...] += pc.dot_tn(ds * cfg.scale, q)

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = dk_sc[...]
        dv_ref[...] = dv_sc[...]


def dkv_call(cfg, q, k, v, z, valid, q_offset, d_out, lse, delta, ctab, drtab):
    b, _h, tp, d = q.shape
    nkv, sp, dv = k.shape[1], k.shape[2], v.shape[-1]
    nq, nk = tp // cfg.block_q, sp // cfg.block_k
    pp = z.shape[-1]
    bq, bk, grp = cfg.block_q, cfg.block_k, cfg.group

    def row_block(b_, kh, kb, step, qoff):
        return b_, kh * grp + lax.div(step, nq), lax.rem(step, nq), 0

    def kv_block(b_, kh, kb, step, qoff):
        return b_, kh, kb, 0

    def valid_block(b_, kh, kb, step, qoff):
        return b_, 0, kb

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, nkv, nk, grp * nq),
        in_specs=[
            pl.BlockSpec((None, None, bq, d), row_block),
            pl.BlockSpec((None, None, bk, d), kv_block),
            pl.BlockSpec((None, None, bk, dv), kv_block),
            pl.BlockSpec((None, None, bq, pp), row_block),
            pl.BlockSpec((None, 1, bk), valid_block),
            pl.BlockSpec((None, None, bq, dv), row_block),
            pl.BlockSpec((None, None, bq, 1), row_block),
            pl.BlockSpec((None, None, bq, 1), row_block),
            pl.BlockSpec((None, None, bq, nk), row_block),
            pl.BlockSpec((None, None, bq, nk), row_block),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bk, d), kv_block),
            pl.BlockSpec((None, None, bk, dv), kv_block),
        ],
        scratch_shapes=[pltpu.VMEM((bk, d), _F32), pltpu.VMEM((bk, dv), _F32)],
    )
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, nq=nq, nk=nk),
        grid_spec=grid_spec,
        out_shape=pc.dkv_out_shape(k, v),
        compiler_params=_compiler_params(3),
        interpret=cfg.interpret,
        name="cope_dkv_tpu",
    )(q_offset.reshape(1), q, k, v, z, valid, d_out, lse, delta, ctab, drtab)


def _pad_lanes(npos: int) -> int:
    return -(-npos // 128) * 128


def _same(head_dim: int) -> int:
    return head_dim


#: The TPU kernels for :func:`~jaxselm.kernels.cope.pallas_common.cope_attention_pallas`: blocks
#: in multiples of 8 sublanes, head dims as they are, P padded to a multiple of 128 lanes.
BACKEND = pc.PallasBackend(
    impl="pallas_tpu",
    forward_call=forward_call,
    dq_call=dq_call,
    dkv_call=dkv_call,
    block_multiple=8,
    power_of_two=False,
    pad_head_dim=_same,
    pad_npos=_pad_lanes,
)


def cope_attention_pallas_tpu(q: jax.Array, k: jax.Array, v: jax.Array, pos_emb: jax.Array, **kw):
    """CoPE attention with the Mosaic TPU kernels; contract of ``cope_attention`` (keyword
    arguments of :func:`~jaxselm.kernels.cope.pallas_common.cope_attention_pallas`)."""
    return pc.cope_attention_pallas(q, k, v, pos_emb, backend=BACKEND, **kw)
