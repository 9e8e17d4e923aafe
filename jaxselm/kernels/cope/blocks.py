"""Block sizes for the blockwise CoPE implementations, and the padding they need.

Every fused implementation (``xla``, ``pallas_tpu``, ``pallas_gpu``) tiles the [T, S] score matrix
into [block_q, block_k] tiles. Sequences that are not multiples of the block sizes are padded
with zero queries and *invalid* keys (the key-validity mask is extended with False), so padding
never changes a result; padded query rows are sliced off at the end.

Defaults differ per implementation because the hardware differs: the CPU path wants large tiles
(loop overhead, big GEMMs) but not so large that the diagonal band (the unsaturated keys, ~2P
per row) drags whole tiles through the expensive branch (256 measured best on CPU); the TPU
kernel wants lane-aligned multiples of 128; the GPU kernel wants tiles that fit in registers
and shared memory (64 x 64 for head dims up to 256).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query and key tile sizes of a blockwise CoPE implementation.

    ``block_q`` rows of queries are processed against ``block_k`` keys at a time; both the
    forward and the backward passes use the same tiling (the backward recomputes the forward's
    positions tile by tile, which must give bit-identical values).
    """

    block_q: int
    block_k: int

    def __post_init__(self):
        if self.block_q < 1 or self.block_k < 1:
            raise ValueError(f"BlockSizes must be positive, got {self}")

    @classmethod
    def default(cls, impl: str) -> BlockSizes:
        """Default tiling of ``impl`` ("xla", "pallas_tpu" or "pallas_gpu")."""
        if impl == "xla":
            return cls(block_q=256, block_k=256)
        if impl == "pallas_tpu":
            return cls(block_q=128, block_k=128)
        if impl == "pallas_gpu":
            return cls(block_q=64, block_k=64)
        raise ValueError(f"no default block sizes for impl {impl!r}")

    def fit(
        self, q_len: int, kv_len: int, *, multiple: int = 1, power_of_two: bool = False
    ) -> BlockSizes:
        """Shrink the blocks to the (rounded-up) sequence lengths, keeping them multiples of
        ``multiple`` (8 sublanes on TPU, 16 for GPU dot operands) and, for Triton, powers of
        two, so short inputs are not padded to a huge tile."""

        def shrink(block: int, length: int) -> int:
            rounded = -(-length // multiple) * multiple
            if power_of_two:
                rounded = 1 << (rounded - 1).bit_length()
            return max(multiple, min(block, rounded))

        return BlockSizes(shrink(self.block_q, q_len), shrink(self.block_k, kv_len))


def pad_axis(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    """Pad ``x`` along ``axis`` at the end up to a multiple of ``multiple``."""
    size = x.shape[axis]
    extra = -size % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def key_validity(kv_mask: jax.Array | None, batch: int, kv_len: int, block_k: int) -> jax.Array:
    """[B, S_pad] bool: user mask (or all True) padded with False up to a multiple of block_k."""
    valid = jnp.ones((batch, kv_len), bool) if kv_mask is None else kv_mask.astype(bool)
    return pad_axis(valid, 1, block_k, value=False)


def default_q_offset(q_offset, q_len: int, kv_len: int) -> jax.Array:
    """int32 scalar: absolute key position of query 0 (default S - T)."""
    if q_offset is None:
        q_offset = kv_len - q_len
    return jnp.asarray(q_offset, jnp.int32).reshape(())
