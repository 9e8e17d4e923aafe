"""Masked attention through JAX's splash attention kernel for TPU (``impl="splash"``).

``jax.experimental.pallas.ops.tpu.splash_attention`` is a block-sparse flash attention with a
forward and two backward Mosaic kernels. Its masks are *static* (numpy, built at trace time), so:

* causal and sliding-window masks become a ``CausalMask`` / ``LocalMask`` with the static offset
  ``S - T`` (a traced ``q_offset``, i.e. decoding against a KV cache, is not expressible: use
  ``xla`` or ``blockwise`` there; ``auto`` does);
* the dynamic padding mask ``kv_mask`` becomes segment ids: every query has segment 1, a valid key
  segment 1 and an invalid one segment 0, so left padding and holes are exact;
* GQA is the kernel's MQA form, vmapped over the kv heads and the batch.

It is one Mosaic custom call: GSPMD cannot partition it, so under a multi-device mesh it needs a
``shard_map`` over batch and heads (not written yet; ``auto`` uses it on a single device only).

Splash gives a row without any visible key a finite average instead of zeros; those rows are set
to zero afterwards (their cotangent is then zero, so they add nothing to the gradients either).
Sequences are padded to the kernel's 128-wide tiles with zero queries and invalid keys.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxselm.kernels.cope.blocks import key_validity, pad_axis
from jaxselm.kernels.cope.common import default_scale, split_heads

#: Tile of the splash kernels along both sequence axes (its default block sizes).
TILE = 128


def available() -> bool:
    """Whether this jax ships the splash attention kernel."""
    try:
        from jax.experimental.pallas.ops.tpu import splash_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=64)
def _kernel(tp: int, sp: int, offset: int, causal: bool, window: int | None, group: int, interp):
    """The splash MQA kernel for one static mask (cached: building its block tables is numpy work
    at trace time, proportional to the number of tiles)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if window is not None:
        # Key j is visible from query i (at position i + offset) iff i + offset - j < window
        # (and j <= i + offset when causal): a left window of window - 1 keys.
        mask = sa.LocalMask((tp, sp), (window - 1, 0 if causal else None), offset=offset)
    elif causal:
        mask = sa.CausalMask((tp, sp), offset=offset)
    else:
        mask = sa.FullMask((tp, sp))
    return sa.make_splash_mqa_single_device(
        sa.MultiHeadMask([mask] * group),
        block_sizes=sa.BlockSizes.get_default(),
        interpret=interp,
    )


def rows_with_keys(
    kv_mask: jax.Array, q_len: int, *, causal: bool, q_offset, sliding_window: int | None
) -> jax.Array:
    """[B, T] bool: query i (at key position ``q_offset + i``) sees at least one valid key.

    Counts valid keys in the visible range [lo, hi] with one cumulative sum: O(B * (T + S)).
    """
    b, s = kv_mask.shape
    counts = jnp.cumsum(kv_mask.astype(jnp.int32), axis=1)  # valid keys in [0, j]
    counts = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), counts], axis=1)  # [0, j)
    qpos = jnp.arange(q_len, dtype=jnp.int32) + jnp.asarray(q_offset, jnp.int32)
    hi = jnp.clip(qpos + 1, 0, s) if causal else jnp.full_like(qpos, s)  # exclusive
    lo = jnp.zeros_like(qpos) if sliding_window is None else qpos - sliding_window + 1
    lo = jnp.clip(lo, 0, s)
    n = jnp.take(counts, hi, axis=1) - jnp.take(counts, lo, axis=1)
    return (n > 0) & (hi > lo)[None]


def masked_attention_splash(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_mask: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_offset: int | None = None,
    sliding_window: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Splash attention with the contract of :func:`jaxselm.kernels.attention.masked_attention`
    (``q_offset`` must be static). Interpret mode by default on CPU (tests)."""
    b, t, h, d = q.shape
    s, nkv = k.shape[1], k.shape[2]
    if q_offset is not None and not isinstance(q_offset, (int, np.integer)):
        raise ValueError(
            "masked_attention impl='splash': q_offset must be a Python int (splash masks are "
            "static); decode against a KV cache with impl='xla' or 'blockwise'"
        )
    offset = s - t if q_offset is None else int(q_offset)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    window = None if sliding_window is None else int(sliding_window)
    g = h // nkv
    valid = key_validity(kv_mask, b, s, TILE)
    tp, sp = -(-t // TILE) * TILE, valid.shape[1]
    kernel = _kernel(tp, sp, offset, bool(causal), window, g, bool(interpret))
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    # The kernel does not scale the logits: scale q (in its dtype, as a fused kernel would).
    qg = split_heads(q * jnp.asarray(default_scale(scale, d), q.dtype), nkv)
    qg = jnp.einsum("btkgd->bkgtd", pad_axis(qg, 1, TILE))
    kt = jnp.einsum("bskd->bksd", pad_axis(k, 1, TILE))
    vt = jnp.einsum("bskd->bksd", pad_axis(v, 1, TILE))
    seg_q = jnp.ones((b, tp), jnp.int32)
    seg_kv = valid.astype(jnp.int32)

    def one(qh, kh, vh, sq, skv):
        return kernel(qh, kh, vh, segment_ids=SegmentIds(q=sq, kv=skv))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))
    out = jax.vmap(per_head)(qg, kt, vt, seg_q, seg_kv)  # [B, K, G, Tp, Dv]
    out = jnp.einsum("bkgtd->btkgd", out[:, :, :, :t]).reshape(b, t, h, v.shape[-1])
    has_key = rows_with_keys(valid[:, :s], t, causal=causal, q_offset=offset, sliding_window=window)
    return jnp.where(has_key[:, :, None, None], out, 0).astype(q.dtype)
