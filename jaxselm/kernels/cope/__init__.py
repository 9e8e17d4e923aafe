"""CoPE attention: one public entry point, several implementations behind ``impl``.

    from jaxselm.kernels.cope import cope_attention
    out = cope_attention(q, k, v, pos_emb, kv_mask=mask, causal=True)   # [B, T, H, D]

q is [B, T, H, D]; k and v [B, S, K, D] with H % K == 0 (GQA); pos_emb [P, D] (shared by all heads
of a layer); kv_mask [B, S] bool (True = valid key). Query i sits at absolute key position
``q_offset + i`` (default S - T, so T < S is decoding against a cache; may be a traced scalar).

Implementations (all differentiable wrt q, k, v and pos_emb, all matching the reference):

* ``"reference"``: paper-exact jnp, materialises [B, H, T, S] (tests, short sequences); the only
  one with ``rel_emb`` (RAM's cope+rel relative bias).
* ``"xla"``: blockwise jnp with a custom VJP, O(T * block) memory (CPU, portable fallback).
* ``"pallas_tpu"``: Mosaic TPU Pallas kernels (forward, dq and dk/dv backward kernels).
* ``"pallas_gpu"``: Triton-backend Pallas kernels for NVIDIA GPUs (same three kernels).
* ``"auto"``: ``pallas_tpu`` on TPU, ``pallas_gpu`` on GPU, ``xla`` otherwise. On an accelerator
  the Pallas kernel is first self-checked, once per (head dim, dtype, GQA group, P, causal): a
  small problem of that kind is compiled and run, forward and gradients, against ``xla``. A
  kernel that fails to compile or disagrees is not used: ``auto`` logs one warning and takes
  ``xla``. (``JAXSELM_COPE_SELF_CHECK=0`` skips the check; naming an impl never checks.)

The Pallas kernels run in interpret mode when the default backend is CPU (so the same kernels
are tested on a laptop); pass ``interpret=True/False`` to force it.

Modules: ``common`` (masks, softmax, input checks: shared by every implementation and by
:mod:`jaxselm.kernels.attention`), ``blocks`` (tiling), ``reference``, ``blockwise`` (``xla``),
``pallas_common`` (what both Pallas backends share; it imports neither), ``pallas_tpu`` and
``pallas_gpu``. This module dispatches and self-checks; it imports the blockwise and Pallas
implementations when they are first used.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxselm.kernels.cope.blocks import BlockSizes
from jaxselm.kernels.cope.common import check_inputs
from jaxselm.kernels.cope.reference import cope_attention_reference, cope_positions
from jaxselm.kernels.self_check import compare_with_xla, run_outside_trace

IMPLS = ("reference", "xla", "pallas_tpu", "pallas_gpu", "auto")


log = logging.getLogger(__name__)

ENV_SELF_CHECK = "JAXSELM_COPE_SELF_CHECK"
#: Query/key length of the self-check problem (two default tiles, so tile boundaries are crossed).
SELF_CHECK_LEN = 256
_CHECKED: dict[tuple, bool] = {}


def _backend() -> str:
    return jax.default_backend()


def resolve_impl(impl: str) -> str:
    """Name of the implementation ``impl`` stands for on the current default backend (before
    ``auto``'s self-check of the Pallas kernels)."""
    if impl not in IMPLS:
        raise ValueError(f"cope_attention: unknown impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        return {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(_backend(), "xla")
    return impl


def self_check(name: str, head_dim: int, dtype, group: int, npos: int, causal: bool) -> bool:
    """Compile and run Pallas implementation ``name`` on a small problem of this kind, forward and
    gradients of q, k, v and the position table, against ``xla``; True when it compiles and
    agrees (relative max error <= 2e-3 in float32, 5e-2 in 16-bit types: a check for broken
    lowering or tiling, not a precision test). Cached per process; logs why when it fails."""
    key = (name, _backend(), head_dim, jnp.dtype(dtype).name, group, npos, causal)
    if key in _CHECKED:
        return _CHECKED[key]
    n = SELF_CHECK_LEN
    rng = np.random.default_rng(0)
    shapes = {
        "q": (1, n, group, head_dim),
        "k": (1, n, 1, head_dim),
        "v": (1, n, 1, head_dim),
        "pos_emb": (npos, head_dim),
    }
    tol = 2e-3 if jnp.dtype(dtype) == jnp.float32 else 5e-2

    def check() -> tuple[bool, str]:
        args = {
            k: jnp.asarray(rng.standard_normal(s) * (0.5 if k == "pos_emb" else 1.0), dtype)
            for k, s in shapes.items()
        }
        mask = jnp.asarray(np.arange(n) >= 3)[None]  # a few padded keys
        w = jnp.asarray(rng.standard_normal((1, n, group, head_dim)), jnp.float32)

        def loss(impl_name, a):
            out = cope_attention(
                a["q"], a["k"], a["v"], a["pos_emb"], kv_mask=mask, causal=causal, impl=impl_name
            )
            return jnp.sum(out.astype(jnp.float32) * w), out

        def run(impl_name):
            fn = jax.jit(jax.value_and_grad(functools.partial(loss, impl_name), has_aux=True))
            (_, out), grads = fn(args)
            return {"out": out, **{f"d{k}": g for k, g in grads.items()}}

        return compare_with_xla(run, name, tol)

    ok, why = run_outside_trace(check, "cope-self-check")
    if not ok:
        log.warning(
            "cope_attention impl=auto: %s failed its self-check on %s (head_dim=%d, %s, group=%d, "
            "P=%d, causal=%s): %s; using xla. Set model.cope_impl=%s to see the failure, or xla "
            "to skip the check.",
            name,
            _backend(),
            head_dim,
            jnp.dtype(dtype).name,
            group,
            npos,
            causal,
            why,
            name,
        )
    _CHECKED[key] = ok
    return ok


def _auto(q: jax.Array, k: jax.Array, pos_emb: jax.Array, causal: bool) -> str:
    name = resolve_impl("auto")
    if name == "xla" or os.environ.get(ENV_SELF_CHECK, "1") == "0":
        return name
    ok = self_check(
        name, q.shape[-1], q.dtype, q.shape[2] // k.shape[2], pos_emb.shape[0], bool(causal)
    )
    return name if ok else "xla"


def cope_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pos_emb: jax.Array,
    *,
    kv_mask: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_offset: jax.Array | int | None = None,
    impl: str = "reference",
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    rel_emb: jax.Array | None = None,
) -> jax.Array:
    """CoPE attention (Golovneva et al., 2024). Returns [B, T, H, D] in q's dtype.

    ``block_sizes`` overrides an implementation's default tiling (ignored by "reference");
    ``interpret`` forces Pallas interpret mode on or off (default: on when the backend is CPU).
    ``rel_emb`` [R, D]: RAM's ``cope+rel`` relative-position bias (see
    :func:`~jaxselm.kernels.cope.reference.relative_bias`); only the reference implements it,
    so ``auto`` takes the reference and any other impl is refused.
    """
    check_inputs(q, k, v, pos_emb, kv_mask)
    if rel_emb is not None:
        if rel_emb.ndim != 2 or rel_emb.shape[1] != q.shape[-1]:
            raise ValueError(f"cope_attention: rel_emb {rel_emb.shape} must be [R, {q.shape[-1]}]")
        if impl not in ("auto", "reference"):
            raise ValueError(
                f"cope_attention: rel_emb (cope+rel) is implemented by impl='reference' only, "
                f"not {impl!r}"
            )
        impl = "reference"
    name = _auto(q, k, pos_emb, causal) if impl == "auto" else resolve_impl(impl)
    kw = {"kv_mask": kv_mask, "causal": causal, "scale": scale, "q_offset": q_offset}
    if name == "reference":
        return cope_attention_reference(q, k, v, pos_emb, rel_emb=rel_emb, **kw)
    if name == "xla":
        from jaxselm.kernels.cope.blockwise import cope_attention_blockwise

        return cope_attention_blockwise(q, k, v, pos_emb, block_sizes=block_sizes, **kw)
    if name == "pallas_tpu":
        from jaxselm.kernels.cope.pallas_tpu import cope_attention_pallas_tpu

        return cope_attention_pallas_tpu(
            q, k, v, pos_emb, block_sizes=block_sizes, interpret=interpret, **kw
        )
    if name == "pallas_gpu":
        from jaxselm.kernels.cope.pallas_gpu import cope_attention_pallas_gpu

        return cope_attention_pallas_gpu(
            q, k, v, pos_emb, block_sizes=block_sizes, interpret=interpret, **kw
        )
    raise AssertionError(name)  # unreachable: resolve_impl only returns known names


__all__ = [
    "IMPLS",
    "BlockSizes",
    "cope_attention",
    "cope_attention_reference",
    "cope_positions",
    "resolve_impl",
    "self_check",
]
