"""CoPE attention: one public entry point, several implementations behind ``impl``.

    from jaxselm.kernels.cope import cope_attention
    out = cope_attention(q, k, v, pos_emb, kv_mask=mask, causal=True)   # [B, T, H, D]

q is [B, T, H, D]; k and v [B, S, K, D] with H % K == 0 (GQA); pos_emb [P, D] (shared by all heads
of a layer); kv_mask [B, S] bool (True = valid key). Query i sits at absolute key position
``q_offset + i`` (default S - T, so T < S is decoding against a cache; may be a traced scalar).

Implementations (all differentiable wrt q, k, v and pos_emb, all matching the reference):

* ``"reference"``: paper-exact jnp, materialises [B, H, T, S] (tests, short sequences).
* ``"xla"``: blockwise jnp with a custom VJP, O(T * block) memory (CPU, portable fallback).
* ``"pallas_tpu"``: Mosaic TPU Pallas kernels (forward, dq and dk/dv backward kernels).
* ``"pallas_gpu"``: Triton-backend Pallas kernels for NVIDIA GPUs (same three kernels).
* ``"auto"``: ``pallas_tpu`` on TPU, ``pallas_gpu`` on GPU, ``xla`` otherwise.

The Pallas kernels run in interpret mode when the default backend is CPU (so the same kernels
are tested on a laptop); pass ``interpret=True/False`` to force it.
"""

from __future__ import annotations

import jax

from jaxselm.kernels.cope.blocks import BlockSizes
from jaxselm.kernels.cope.common import check_inputs
from jaxselm.kernels.cope.reference import cope_attention_reference, cope_positions

IMPLS = ("reference", "xla", "pallas_tpu", "pallas_gpu", "auto")


def resolve_impl(impl: str) -> str:
    """Name of the implementation ``impl`` stands for on the current default backend."""
    if impl not in IMPLS:
        raise ValueError(f"cope_attention: unknown impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        backend = jax.default_backend()
        return {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(backend, "xla")
    return impl


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
) -> jax.Array:
    """CoPE attention (Golovneva et al., 2024). Returns [B, T, H, D] in q's dtype.

    ``block_sizes`` overrides an implementation's default tiling (ignored by "reference");
    ``interpret`` forces Pallas interpret mode on or off (default: on when the backend is CPU).
    """
    check_inputs(q, k, v, pos_emb, kv_mask)
    name = resolve_impl(impl)
    kw = {"kv_mask": kv_mask, "causal": causal, "scale": scale, "q_offset": q_offset}
    if name == "reference":
        return cope_attention_reference(q, k, v, pos_emb, **kw)
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
]
