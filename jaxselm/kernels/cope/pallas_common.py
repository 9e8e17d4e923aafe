"""What the TPU (Mosaic) and GPU (Triton) CoPE kernels share: tile math, layout, custom VJP.

Both backends run the same three kernels (see docs/kernels.md):

* forward: per (batch, head, query block), key blocks from the diagonal backwards, carrying each
  row's gate sum ``c``; writes ``o``, ``lse`` [.., T, 1] and ``ctab`` [.., T, n_key_blocks] (the
  carry entering every key block, so the backward never redoes the right-to-left sweep);
* dq: per (batch, head, query block), key blocks from the left, carrying each row's prefix sum of
  ``dr`` (the gradient of a reverse cumsum is a prefix sum); writes ``dq`` (the ``ds k`` part),
  ``dz`` [.., T, P] and ``drtab`` [.., T, n_key_blocks] (the dr prefix entering every key block);
* dk/dv: per (batch, kv head, key block), all query blocks of all query heads of the group;
  rebuilds the tile's positions from ``ctab`` and its ``dg`` from ``drtab``.

``z = q E^T`` is computed by XLA outside the kernels (one [T, D] x [D, P] matmul per head, kept in
float32) and enters the custom VJP as an input: the kernels return ``dz`` and JAX's own autodiff of
that einsum adds ``dz E`` to dq and ``dz^T q`` to dE.

The tile functions below are written once and used by both backends; the two operations the
backends do differently are passed in: the cumulative sums along keys (TPU has no cumsum: a
matmul with a triangular ones matrix; Triton has a forward scan only) and the lookup of ``z`` at
integer positions (TPU: a loop over the few integer positions a tile spans; GPU: a pointer
gather).

:func:`cope_attention_pallas` is the one wrapper (layout, padding, custom VJP) around either
backend; a backend module describes itself with a :class:`PallasBackend` (its three
``pallas_call`` builders and its tiling rules). This module imports neither backend.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxselm.kernels.cope.blocks import BlockSizes, default_q_offset, key_validity, pad_axis
from jaxselm.kernels.cope.common import default_scale

NEG_INF = -1e30  # finite: masked logits never produce inf - inf
BIG = 1e9


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static configuration of one CoPE kernel call (hashable: a custom_vjp nondiff argument)."""

    causal: bool
    scale: float
    block_q: int
    block_k: int
    npos: int  # P (z is padded beyond it)
    group: int  # G = H // K
    interpret: bool


def default_interpret() -> bool:
    """Pallas interpret mode when there is no accelerator (the default backend is CPU)."""
    return jax.default_backend() == "cpu"


def last_key_block(qi, q_offset, cfg: KernelConfig, n_kb: int):
    """Scalar int32: last key block query block ``qi`` sees (-1 when it sees none)."""
    if not cfg.causal:
        return jnp.int32(n_kb - 1)
    last_q = q_offset + qi * cfg.block_q + (cfg.block_q - 1)
    blk = lax.div(jnp.maximum(last_q, 0), jnp.int32(cfg.block_k))
    return jnp.where(last_q < 0, -1, jnp.minimum(blk, n_kb - 1)).astype(jnp.int32)


def first_query_block(kb, q_offset, cfg: KernelConfig, n_qb: int):
    """Scalar int32: first query block that sees key block ``kb`` (n_qb when none)."""
    if not cfg.causal:
        return jnp.int32(0)
    # Query row t sees key kb*bk iff q_offset + t >= kb*bk.
    first_t = kb * cfg.block_k - q_offset
    blk = lax.div(jnp.maximum(first_t, 0), jnp.int32(cfg.block_q))
    return jnp.minimum(blk, n_qb).astype(jnp.int32)


def tile_mask(q_offset, qi, kb, valid_row, cfg: KernelConfig):
    """[bq, bk] bool: key visible from query and valid. ``valid_row`` is [1, bk] int32."""
    shape = (cfg.block_q, cfg.block_k)
    mask = jnp.broadcast_to(valid_row > 0, shape)
    if cfg.causal:
        qpos = q_offset + qi * cfg.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
        kpos = kb * cfg.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
        mask = mask & (kpos <= qpos)
    return mask


def band_positions(s, mask, c, npos, rcumsum):
    """Gates and the pieces of the interpolation for one tile.

    s, mask [bq, bk]; c [bq, 1] the gate sum of every key right of the tile. Returns g, floor,
    ceil, w = p - floor and ``unsat`` (valid entries whose position is below the clamp P - 1:
    the only ones that need a lookup of z; all others have bias z[P - 1]).
    """
    g = jnp.where(mask, jax.nn.sigmoid(s), 0.0)
    r = c + rcumsum(g)
    p = jnp.minimum(r, npos - 1.0)
    f = jnp.floor(p)
    ce = jnp.ceil(p)
    return g, f, ce, p - f, mask & (r < npos - 1.0)


def position_range(f, ce, unsat):
    """Scalars lo, hi (int32): integer positions the tile's unclamped entries touch."""
    lo = jnp.min(jnp.where(unsat, f, BIG)).astype(jnp.int32)
    hi = jnp.max(jnp.where(unsat, ce, -1.0)).astype(jnp.int32)
    return lo, hi


def band_forward(s, mask, c, npos, rcumsum, gather):
    """Logits of an unsaturated tile and the gate sum carried on to the next tile to the left.

    ``gather(floor, ceil, unsat)`` returns z[floor p], z[ceil p] per entry (z[P - 1] where not
    ``unsat``): the backend's lookup of the tile's rows of z.
    """
    g, f, ce, w, unsat = band_positions(s, mask, c, npos, rcumsum)
    zf, zc = gather(f, ce, unsat)
    return s + (w * zc + (1.0 - w) * zf), c + jnp.sum(g, axis=1, keepdims=True)


def tile_probs(logits, mask, lse, dpv, delta):
    """Probabilities a = exp(logits - lse) of one tile (0 where masked) and the softmax gradient
    dl = a * (dO.v - Delta)."""
    a = jnp.where(mask, jnp.exp(logits - lse), 0.0)
    return a, a * (dpv - delta)


def band_backward(s, mask, c, drc, lse, dpv, delta, npos, rcumsum, cumsum, gather):
    """Backward of one unsaturated tile: probabilities, ds, the pieces dz needs and the dr prefix
    carried on to the next tile to the right (``drc`` enters it). ``gather`` as in
    :func:`band_forward`; ``cumsum``/``rcumsum`` are the backend's sums along keys."""
    g, f, ce, w, unsat = band_positions(s, mask, c, npos, rcumsum)
    zf, zc = gather(f, ce, unsat)
    a, dl = tile_probs(s + (w * zc + (1.0 - w) * zf), mask, lse, dpv, delta)
    dr = dl * (zc - zf)  # zero where clamped (floor == ceil there)
    ds = dl + (drc + cumsum(dr)) * g * (1.0 - g)
    return a, dl, ds, (f, ce, w, unsat), drc + jnp.sum(dr, axis=1, keepdims=True)


def dz_columns(dl, f, ce, w, unsat):
    """dz[n] = sum_j dl_j hat(p_j - n) of one tile, in pieces: the clamped entries' sum (for
    column P - 1), the range lo..hi of other columns touched, and ``column(n)`` [bq, 1]."""
    clamped = jnp.sum(jnp.where(unsat, 0.0, dl), axis=1, keepdims=True)
    a = jnp.where(unsat, dl * (1.0 - w), 0.0)
    b = jnp.where(unsat, dl * w, 0.0)
    lo, hi = position_range(f, ce, unsat)

    def column(n):
        nf = n.astype(jnp.float32)
        return jnp.sum(jnp.where(f == nf, a, 0.0), axis=1, keepdims=True) + jnp.sum(
            jnp.where(ce == nf, b, 0.0), axis=1, keepdims=True
        )

    return clamped, lo, hi, column


def online_softmax_step(logits, mask, m, l_sum, acc, v, pv_dot):
    """One flash-attention update with masked logits; m, l_sum [bq, 1], acc [bq, D]."""
    logits = jnp.where(mask, logits, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))
    corr = jnp.exp(m - m_new)
    pr = jnp.where(mask, jnp.exp(logits - m_new), 0.0)
    l_sum = l_sum * corr + jnp.sum(pr, axis=1, keepdims=True)
    acc = acc * corr + pv_dot(pr, v)
    return m_new, l_sum, acc


def finalize(m, l_sum, acc):
    """Output rows (zeros for rows without a valid key) and log-sum-exp (+inf there)."""
    has_key = l_sum > 0
    safe_l = jnp.where(has_key, l_sum, 1.0)
    out = jnp.where(has_key, acc / safe_l, 0.0)
    lse = jnp.where(has_key, m + jnp.log(safe_l), jnp.inf)
    return out, lse


def dot_nt(a, b):
    """a [m, d] . b [n, d]^T in float32 (full float32 precision for float32 inputs)."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=prec
    )


def dot_nn(a, b):
    """a [m, k] . b [k, n] in float32; ``a`` is cast to b's dtype (probabilities x V)."""
    a = a.astype(b.dtype)
    prec = lax.Precision.HIGHEST if b.dtype == jnp.float32 else None
    return lax.dot_general(
        a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=prec
    )


def dot_tn(a, b):
    """a [k, m]^T . b [k, n] in float32; ``a`` is cast to b's dtype (ds^T q, a^T dO)."""
    a = a.astype(b.dtype)
    prec = lax.Precision.HIGHEST if b.dtype == jnp.float32 else None
    return lax.dot_general(
        a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=prec
    )


def _f32(shape) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.float32)


def forward_out_shape(q, v, n_cols: int) -> list[jax.ShapeDtypeStruct]:
    """The forward kernel's outputs: o [B, H, Tp, Dv] (float32: for dO . O in the backward),
    lse [B, H, Tp, 1] and ctab [B, H, Tp, n_cols] (n_cols >= the number of key blocks)."""
    rows = q.shape[:3]
    return [_f32((*rows, v.shape[-1])), _f32((*rows, 1)), _f32((*rows, n_cols))]


def dq_out_shape(q, z, n_cols: int) -> list[jax.ShapeDtypeStruct]:
    """The dq kernel's outputs: dq like q, dz like z and drtab [B, H, Tp, n_cols]."""
    return [_f32(q.shape), _f32(z.shape), _f32((*q.shape[:3], n_cols))]


def dkv_out_shape(k, v) -> list[jax.ShapeDtypeStruct]:
    """The dk/dv kernel's outputs: dk like k, dv like v (float32)."""
    return [_f32(k.shape), _f32(v.shape)]


# --------------------------------------------------------------------------------------------
# Wrapper: layout, padding, custom VJP.


@dataclasses.dataclass(frozen=True)
class PallasBackend:
    """One backend's kernels and tiling rules (hashable: a custom_vjp nondiff argument).

    The three builders take ``(cfg, q, k, v, z, valid, q_offset)`` (forward: returns o, lse,
    ctab), ``(..., d_out, lse, delta, ctab)`` (dq: returns dq, dz, drtab) and
    ``(..., d_out, lse, delta, ctab, drtab)`` (dk/dv: returns dk, dv), all in [B, N, L, D] layout.
    """

    impl: str  # "pallas_tpu" or "pallas_gpu": the name of its default BlockSizes
    forward_call: Callable
    dq_call: Callable
    dkv_call: Callable
    block_multiple: int  # blocks are fitted to multiples of this (8 sublanes, 16 for GPU dots)
    power_of_two: bool  # Triton: block sizes must be powers of two (>= block_multiple)
    pad_head_dim: Callable[[int], int]  # padded head dim (q, k, v last axis)
    pad_npos: Callable[[int], int]  # padded P (z's last axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _core(q, k, v, z, valid, q_offset, cfg, backend):
    return backend.forward_call(cfg, q, k, v, z, valid, q_offset)[0]


def _core_fwd(q, k, v, z, valid, q_offset, cfg, backend):
    o, lse, ctab = backend.forward_call(cfg, q, k, v, z, valid, q_offset)
    return o, (q, k, v, z, valid, q_offset, o, lse, ctab)


def _core_bwd(cfg, backend, res, d_out):
    q, k, v, z, valid, q_offset, o, lse, ctab = res
    # o is kept in float32 (the user gets it cast to q's dtype), so Delta = dO . O matches the
    # reference; with a bf16 O the per-row error of Delta would not cancel in dE = sum dz^T q.
    delta = jnp.sum(d_out.astype(jnp.float32) * o, axis=-1, keepdims=True)
    d_out = d_out.astype(q.dtype)  # the cotangent of a cast from q.dtype: exact
    dq, dz, drtab = backend.dq_call(cfg, q, k, v, z, valid, q_offset, d_out, lse, delta, ctab)
    dk, dv = backend.dkv_call(cfg, q, k, v, z, valid, q_offset, d_out, lse, delta, ctab, drtab)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dz, None, None


_core.defvjp(_core_fwd, _core_bwd)


def cope_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pos_emb: jax.Array,
    *,
    backend: PallasBackend,
    kv_mask: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_offset: jax.Array | int | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """CoPE attention with ``backend``'s kernels; contract of ``cope_attention``.

    [B, T, H, D] -> [B, H, T, D] layout, padding, z = q E^T, custom VJP.
    """
    blocks = block_sizes or BlockSizes.default(backend.impl)
    if backend.power_of_two:
        for size in (blocks.block_q, blocks.block_k):
            if size < backend.block_multiple or size & (size - 1):
                raise ValueError(
                    f"{backend.impl} block sizes must be powers of two >= "
                    f"{backend.block_multiple}, got {blocks}"
                )
    b, t, h, d = q.shape
    s_len, nkv = k.shape[1], k.shape[2]
    npos = pos_emb.shape[0]
    scale = float(default_scale(scale, d))
    blocks = blocks.fit(
        t, s_len, multiple=backend.block_multiple, power_of_two=backend.power_of_two
    )
    bq, bk = blocks.block_q, blocks.block_k
    interpret = default_interpret() if interpret is None else bool(interpret)
    cfg = KernelConfig(bool(causal), scale, bq, bk, npos, h // nkv, interpret)
    q_off = default_q_offset(q_offset, t, s_len)
    valid = key_validity(kv_mask, b, s_len, bk).astype(jnp.int32)[:, None, :]  # [B, 1, Sp]
    d_v = v.shape[-1]

    def layout(x, block):  # [B, L, N, D] -> [B, N, Lp, Dp]
        x = pad_axis(jnp.swapaxes(x, 1, 2), 2, block)
        return pad_axis(x, 3, backend.pad_head_dim(x.shape[-1]))

    qt, kt, vt = layout(q, bq), layout(k, bk), layout(v, bk)
    z = jnp.einsum(
        "bthd,pd->bhtp",
        q.astype(jnp.float32),
        pos_emb.astype(jnp.float32),
        precision=lax.Precision.HIGHEST,
    )
    z = pad_axis(pad_axis(z, 2, bq), 3, backend.pad_npos(npos))
    o = _core(qt, kt, vt, z, valid, q_off, cfg, backend)
    return jnp.swapaxes(o[:, :, :t, :d_v], 1, 2).astype(q.dtype)
