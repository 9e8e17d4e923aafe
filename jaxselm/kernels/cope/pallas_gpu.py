"""CoPE attention as Pallas GPU kernels on the Triton backend (``impl="pallas_gpu"``).

Why Triton and not Mosaic GPU (docs/kernels.md has the long version): the Triton backend runs on
every NVIDIA GPU JAX supports (Ampere, Ada, Hopper, Blackwell) and on jax 0.10.2 as well as 0.11.x,
it lowers (and interprets on CPU) the operations CoPE needs beyond flash attention -- a scan
(``cumsum``), gathers through pointer tensors and dynamic column updates -- and it keeps the
kernel in the same array-level style as the TPU kernel, so both share their tile math
(``pallas_common``). Mosaic GPU is Hopper-and-newer only and its programming model (warpgroup
MMAs, explicit TMA pipelines, no in-register gather) would make the CoPE band a separate, much
larger kernel; it is the path to revisit when the Triton backend is removed.

Layout [B, H, T, D] (head dim padded to a power of two, P padded to a power of two); three
``pallas_call``s with in-kernel loops over key (or query) blocks, like JAX's GPU flash attention:

* forward, grid (B, H, query blocks): key blocks from the diagonal backwards with the gate-sum
  carry; ``z[floor p]``, ``z[ceil p]`` are pointer gathers from the [block_q, P] rows of z (cost
  independent of P); tiles whose rows are all saturated take the flash-attention branch;
* dq, grid (B, H, query blocks): key blocks from the left with the dr prefix carry; dz is
  accumulated column by column over the few integer positions a tile spans;
* dk/dv, grid (B, kv heads, key blocks): loops over the query heads of the group and the query
  blocks that see the key block; no atomics (each program owns its dk/dv rows).

:data:`BACKEND` is what this module hands ``pallas_common`` (layout, padding, custom VJP). On CPU
the same kernels run with ``interpret=True`` (the default there).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxselm.kernels.cope import pallas_common as pc

_F32 = jnp.float32


def _cumsum(x):
    return jnp.cumsum(x, axis=1)


def _rcumsum(x):
    """Reverse inclusive cumsum along keys (Triton has a forward scan only)."""
    return jnp.sum(x, axis=1, keepdims=True) - jnp.cumsum(x, axis=1) + x


def _gather(z_at, npos):
    """``gather(floor, ceil, unsat)`` for :func:`pc.band_forward`: z[floor p], z[ceil p] per entry
    (z[P - 1] where not ``unsat``) by pointer gathers.

    ``z_at(rows, cols)`` loads z at integer arrays of row and column indices.
    """

    def gather(f, ce, unsat):
        rows = lax.broadcasted_iota(jnp.int32, f.shape, 0)
        fi = jnp.where(unsat, f, npos - 1.0).astype(jnp.int32)
        ci = jnp.where(unsat, ce, npos - 1.0).astype(jnp.int32)
        return z_at(rows, fi), z_at(rows, ci)

    return gather


def _scatter(dz_ref, dl, f, ce, w, unsat, npos):
    """dz[:, n] += sum_j dl_j hat(p_j - n), one column update per integer position touched."""
    clamped, lo, hi, column = pc.dz_columns(dl, f, ce, w, unsat)
    col_last = pl.ds(npos - 1, 1)
    dz_ref[:, col_last] = dz_ref[:, col_last] + clamped

    def body(n, carry):
        dz_ref[:, pl.ds(n, 1)] = dz_ref[:, pl.ds(n, 1)] + column(n)
        return carry

    lax.fori_loop(lo, hi + 1, body, jnp.int32(0))


def _band_bwd(s, mask, c, drc, z_at, lse, dpv, delta, cfg):
    gather = _gather(z_at, cfg.npos)
    return pc.band_backward(s, mask, c, drc, lse, dpv, delta, cfg.npos, _rcumsum, _cumsum, gather)


def _barrier(cfg):
    """Order the zero-initialisation of an output block (stored in one thread layout) before
    the column read-modify-writes that follow (another layout, possibly other threads of the
    program). Interpret mode runs sequentially and has no barrier primitive."""
    if not cfg.interpret:
        pltriton.debug_barrier()


def _params(d):
    return pltriton.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2)


def _query_major_specs(cfg, sp, d, dv, pp):
    """BlockSpecs of q_offset, q, k, v, z and valid for a (B, H, query block) grid (whole key
    sequences: the kernel loops over key blocks), and the index map of per-query-row blocks."""
    bq, grp = cfg.block_q, cfg.group

    def row(b_, h_, i):
        return b_, h_, i, 0

    def seq(b_, h_, i):
        return b_, h_ // grp, 0, 0

    specs = [
        pl.BlockSpec((1,), lambda b_, h_, i: (0,)),
        pl.BlockSpec((None, None, bq, d), row),
        pl.BlockSpec((None, None, sp, d), seq),
        pl.BlockSpec((None, None, sp, dv), seq),
        pl.BlockSpec((None, None, bq, pp), row),
        pl.BlockSpec((None, 1, sp), lambda b_, h_, i: (b_, 0, 0)),
    ]
    return specs, row


# --------------------------------------------------------------------------------------------
# Forward


def _fwd_kernel(
    qoff_ref, q_ref, k_ref, v_ref, z_ref, valid_ref, o_ref, lse_ref, ctab_ref, *, cfg, nk
):
    i = pl.program_id(2)
    qoff = qoff_ref[0]
    bq, bk = cfg.block_q, cfg.block_k
    q = q_ref[...]
    z_last = z_ref[:, pl.ds(cfg.npos - 1, 1)]
    kb_hi = pc.last_key_block(i, qoff, cfg, nk)
    ctab_ref[...] = jnp.zeros(ctab_ref.shape, _F32)
    _barrier(cfg)

    def body(it, carry):
        m, l_sum, acc, c = carry
        kb = kb_hi - it
        keys = pl.ds(kb * bk, bk)
        s = pc.dot_nt(q, k_ref[keys, :]) * cfg.scale
        mask = pc.tile_mask(qoff, i, kb, valid_ref[:, keys], cfg)
        ctab_ref[:, pl.ds(kb, 1)] = c

        def saturated():
            return s + z_last, c

        def band():
            gather = _gather(lambda r, col: z_ref[r, col], cfg.npos)
            return pc.band_forward(s, mask, c, cfg.npos, _rcumsum, gather)

        logits, c = lax.cond(jnp.min(c) >= cfg.npos - 1, saturated, band)
        m, l_sum, acc = pc.online_softmax_step(
            logits, mask, m, l_sum, acc, v_ref[keys, :], pc.dot_nn
        )
        return m, l_sum, acc, c

    init = (
        jnp.full((bq, 1), pc.NEG_INF, _F32),
        jnp.zeros((bq, 1), _F32),
        jnp.zeros((bq, v_ref.shape[-1]), _F32),
        jnp.zeros((bq, 1), _F32),
    )
    m, l_sum, acc, _ = lax.fori_loop(0, kb_hi + 1, body, init)
    out, lse = pc.finalize(m, l_sum, acc)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def forward_call(cfg, q, k, v, z, valid, q_offset):
    b, h, tp, d = q.shape
    sp, dv = k.shape[2], v.shape[-1]
    nq, nk = tp // cfg.block_q, sp // cfg.block_k
    pp = z.shape[-1]
    bq = cfg.block_q
    nkp = _next_pow2(nk, 1)  # Triton tensors must have power-of-two sizes
    in_specs, row = _query_major_specs(cfg, sp, d, dv, pp)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, nk=nk),
        grid=(b, h, nq),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bq, dv), row),
            pl.BlockSpec((None, None, bq, 1), row),
            pl.BlockSpec((None, None, bq, nkp), row),
        ],
        out_shape=pc.forward_out_shape(q, v, nkp),
        compiler_params=_params(d),
        interpret=cfg.interpret,
        name="cope_fwd_gpu",
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
    *,
    cfg,
    nk,
):
    i = pl.program_id(2)
    qoff = qoff_ref[0]
    bk = cfg.block_k
    q, d_out = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    z_last = z_ref[:, pl.ds(cfg.npos - 1, 1)]
    chunk = min(dz_ref.shape[1], 64)  # zero dz in [bq, 64] pieces (P may be 4096)
    for start in range(0, dz_ref.shape[1], chunk):
        dz_ref[:, pl.ds(start, chunk)] = jnp.zeros((dz_ref.shape[0], chunk), _F32)
    drtab_ref[...] = jnp.zeros(drtab_ref.shape, _F32)
    _barrier(cfg)

    def body(kb, carry):
        dq, drc = carry
        keys = pl.ds(kb * bk, bk)
        k = k_ref[keys, :]
        s = pc.dot_nt(q, k) * cfg.scale
        dpv = pc.dot_nt(d_out, v_ref[keys, :])
        mask = pc.tile_mask(qoff, i, kb, valid_ref[:, keys], cfg)
        c = ctab_ref[:, pl.ds(kb, 1)]
        drtab_ref[:, pl.ds(kb, 1)] = drc

        def saturated():
            _, dl = pc.tile_probs(s + z_last, mask, lse, dpv, delta)
            col = pl.ds(cfg.npos - 1, 1)
            dz_ref[:, col] = dz_ref[:, col] + jnp.sum(dl, axis=1, keepdims=True)
            return dl, drc

        def band():
            _, dl, ds, (f, ce, w, unsat), drc_new = _band_bwd(
                s, mask, c, drc, lambda r, col: z_ref[r, col], lse, dpv, delta, cfg
            )
            _scatter(dz_ref, dl, f, ce, w, unsat, cfg.npos)
            return ds, drc_new

        ds, drc = lax.cond(jnp.min(c) >= cfg.npos - 1, saturated, band)
        return dq + pc.dot_nn(ds * cfg.scale, k), drc

    init = (jnp.zeros(q.shape, _F32), jnp.zeros((q.shape[0], 1), _F32))
    dq, _ = lax.fori_loop(0, pc.last_key_block(i, qoff, cfg, nk) + 1, body, init)
    dq_ref[...] = dq


def dq_call(cfg, q, k, v, z, valid, q_offset, d_out, lse, delta, ctab):
    b, h, tp, d = q.shape
    sp, dv = k.shape[2], v.shape[-1]
    nq, nk = tp // cfg.block_q, sp // cfg.block_k
    pp = z.shape[-1]
    bq = cfg.block_q
    nkp = ctab.shape[-1]
    in_specs, row = _query_major_specs(cfg, sp, d, dv, pp)
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, nk=nk),
        grid=(b, h, nq),
        in_specs=in_specs
        + [
            pl.BlockSpec((None, None, bq, dv), row),
            pl.BlockSpec((None, None, bq, 1), row),
            pl.BlockSpec((None, None, bq, 1), row),
            pl.BlockSpec((None, None, bq, nkp), row),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, d), row),
            pl.BlockSpec((None, None, bq, pp), row),
            pl.BlockSpec((None, None, bq, nkp), row),
        ],
        out_shape=pc.dq_out_shape(q, z, nkp),
        compiler_params=_params(d),
        interpret=cfg.interpret,
        name="cope_dq_gpu",
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
    *,
    cfg,
    nq,
    nk,
):
    kb = pl.program_id(2)
    qoff = qoff_ref[0]
    bq = cfg.block_q
    k, v = k_ref[...], v_ref[...]
    valid_row = valid_ref[...]
    qi_lo = pc.first_query_block(kb, qoff, cfg, nq)
    n_q = nq - qi_lo

    def body(step, carry):
        dk, dv = carry
        gi = lax.div(step, n_q)
        qi = qi_lo + lax.rem(step, n_q)
        rows = pl.ds(qi * bq, bq)
        q = q_ref[gi, rows, :]
        d_out = do_ref[gi, rows, :]
        s = pc.dot_nt(q, k) * cfg.scale
        dpv = pc.dot_nt(d_out, v)
        mask = pc.tile_mask(qoff, qi, kb, valid_row, cfg)
        lse, delta = lse_ref[gi, rows, :], delta_ref[gi, rows, :]
        c = ctab_ref[gi, rows, pl.ds(kb, 1)]
        drc = drtab_ref[gi, rows, pl.ds(kb, 1)]

        def saturated():
            z_last = z_ref[gi, rows, pl.ds(cfg.npos - 1, 1)]
            return pc.tile_probs(s + z_last, mask, lse, dpv, delta)

        def band():
            def z_at(r, col):
                return z_ref[gi, qi * bq + r, col]

            a, _, ds, _, _ = _band_bwd(s, mask, c, drc, z_at, lse, dpv, delta, cfg)
            return a, ds

        a, ds = lax.cond(jnp.min(c) >= cfg.npos - 1, saturated, band)
        return dk + pc.dot_tn(ds * cfg.scale, q), dv + pc.dot_tn(a, d_out)

    init = (jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32))
    dk, dv = lax.fori_loop(0, cfg.group * n_q, body, init)
    dk_ref[...] = dk
    dv_ref[...] = dv


def dkv_call(cfg, q, k, v, z, valid, q_offset, d_out, lse, delta, ctab, drtab):
    b, _h, tp, d = q.shape
    nkv, sp, dv = k.shape[1], k.shape[2], v.shape[-1]
    nq, nk = tp // cfg.block_q, sp // cfg.block_k
    pp = z.shape[-1]
    bk, grp = cfg.block_k, cfg.group

    def group(b_, kh, kb):
        return b_, kh, 0, 0

    def kv(b_, kh, kb):
        return b_, kh, kb, 0

    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, nq=nq, nk=nk),
        grid=(b, nkv, nk),
        in_specs=[
            pl.BlockSpec((1,), lambda b_, kh, kb: (0,)),
            pl.BlockSpec((None, grp, tp, d), group),
            pl.BlockSpec((None, None, bk, d), kv),
            pl.BlockSpec((None, None, bk, dv), kv),
            pl.BlockSpec((None, grp, tp, pp), group),
            pl.BlockSpec((None, 1, bk), lambda b_, kh, kb: (b_, 0, kb)),
            pl.BlockSpec((None, grp, tp, dv), group),
            pl.BlockSpec((None, grp, tp, 1), group),
            pl.BlockSpec((None, grp, tp, 1), group),
            pl.BlockSpec((None, grp, tp, ctab.shape[-1]), group),
            pl.BlockSpec((None, grp, tp, ctab.shape[-1]), group),
        ],
        out_specs=[pl.BlockSpec((None, None, bk, d), kv), pl.BlockSpec((None, None, bk, dv), kv)],
        out_shape=pc.dkv_out_shape(k, v),
        compiler_params=_params(d),
        interpret=cfg.interpret,
        name="cope_dkv_gpu",
    )(q_offset.reshape(1), q, k, v, z, valid, d_out, lse, delta, ctab, drtab)


def _next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


def _next_pow2_positions(npos: int) -> int:
    return _next_pow2(npos, 2)


#: The GPU kernels for :func:`~jaxselm.kernels.cope.pallas_common.cope_attention_pallas`: blocks
#: powers of two >= 16 (Triton dot operands), head dims and P padded to powers of two.
BACKEND = pc.PallasBackend(
    impl="pallas_gpu",
    forward_call=forward_call,
    dq_call=dq_call,
    dkv_call=dkv_call,
    block_multiple=16,
    power_of_two=True,
    pad_head_dim=_next_pow2,
    pad_npos=_next_pow2_positions,
)


def cope_attention_pallas_gpu(q: jax.Array, k: jax.Array, v: jax.Array, pos_emb: jax.Array, **kw):
    """CoPE attention with the Triton-backend GPU kernels; contract of ``cope_attention``
    (keyword arguments of :func:`~jaxselm.kernels.cope.pallas_common.cope_attention_pallas`)."""
    return pc.cope_attention_pallas(q, k, v, pos_emb, backend=BACKEND, **kw)
