"""CoPE attention: one public entry point, several implementations behind ``impl``.

    from jaxselm.kernels.cope import cope_attention
    out = cope_attention(q, k, v, pos_emb, kv_mask=mask, causal=True)   # [B, T, H, D]

q is [B, T, H, D]; k and v [B, S, K, D] with H % K == 0 (GQA); pos_emb [P, D] (shared by all heads
of a layer); kv_mask [B, S] bool (True = valid key). Query i sits at absolute key position
``q_offset + i`` (default S - T, so T < S is decoding against a cache).
"""

from __future__ import annotations

import jax

from jaxselm.kernels.cope.common import check_inputs
from jaxselm.kernels.cope.reference import cope_attention_reference, cope_positions

IMPLS = ("reference", "auto")


def resolve_impl(impl: str) -> str:
    """Name of the implementation ``impl`` stands for on the current default backend."""
    if impl not in IMPLS:
        raise ValueError(f"cope_attention: unknown impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        return "reference"
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
) -> jax.Array:
    """CoPE attention (Golovneva et al., 2024). Returns [B, T, H, D] in q's dtype."""
    check_inputs(q, k, v, pos_emb, kv_mask)
    name = resolve_impl(impl)
    if name == "reference":
        return cope_attention_reference(
            q, k, v, pos_emb, kv_mask=kv_mask, causal=causal, scale=scale, q_offset=q_offset
        )
    raise AssertionError(name)  # unreachable: resolve_impl only returns known names


__all__ = ["IMPLS", "cope_attention", "cope_attention_reference", "cope_positions", "resolve_impl"]
