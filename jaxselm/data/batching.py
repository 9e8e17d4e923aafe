"""Padding token-id lists into fixed-shape int32 batches, with lengths bucketed to avoid recompiles.

A jitted step recompiles for every new input shape. Prompts and responses have all kinds of
lengths, so we pad each batch to a *bucketed* length (the next power of two, or the next
multiple of a step) and, optionally, to a fixed batch size. Generation wants prompts padded on
the left (so every prompt ends at the same column and decoding appends on the right); training
usually pads on the right. Either way the mask says which positions are real.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

from jaxselm.errors import DataError


def bucket_length(
    n: int, *, multiple: int | None = None, min_length: int = 1, max_length: int | None = None
) -> int:
    """The padded length for a longest sequence of ``n`` tokens.

    With ``multiple=None``: the next power of two >= max(n, min_length); otherwise the next
    multiple of ``multiple``. Capped at ``max_length`` (callers truncate or refuse longer rows).
    """
    if n < 0:
        raise ValueError(f"bucket_length: n must be >= 0, got {n}")
    if multiple is not None and multiple <= 0:
        raise ValueError(f"bucket_length: multiple must be positive, got {multiple}")
    n = max(n, min_length, 1)
    if multiple is None:
        t = 1 << (n - 1).bit_length()
    else:
        t = -(-n // multiple) * multiple
    if max_length is not None:
        t = min(t, max_length)
    return t


@dataclasses.dataclass(frozen=True)
class PaddedBatch:
    """``ids[B, T]`` int32 (pad where masked) and ``mask[B, T]`` bool (True on real tokens)."""

    ids: np.ndarray
    mask: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        """Real tokens per row, [B] int32."""
        return self.mask.sum(axis=1).astype(np.int32)


def pad_batch(
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    *,
    side: Literal["left", "right"] = "left",
    multiple: int | None = None,
    min_length: int = 1,
    max_length: int | None = None,
    truncate: Literal["left", "right"] | None = None,
    batch_size: int | None = None,
) -> PaddedBatch:
    """Pads token-id lists to ``[B, T]`` int32 with a mask; T is bucketed (see bucket_length).

    Args:
      seqs: the rows, lists of token ids.
      pad_id: id written where the mask is False.
      side: "left" for generation prompts (right-aligned), "right" for training.
      multiple / min_length / max_length: length bucketing (power of two when multiple is None).
      truncate: what to do with rows longer than ``max_length``: None refuses them (DataError
        naming the row), "left" keeps their last ``max_length`` tokens, "right" the first.
      batch_size: pad the batch with empty (fully masked) rows up to this size.
    """
    if side not in ("left", "right"):
        raise ValueError(f"pad_batch: side must be 'left' or 'right', got {side!r}")
    rows = [list(map(int, s)) for s in seqs]
    if max_length is not None:
        for i, r in enumerate(rows):
            if len(r) > max_length:
                if truncate is None:
                    raise DataError(f"row {i}: {len(r)} tokens exceed max_length {max_length}")
                rows[i] = r[-max_length:] if truncate == "left" else r[:max_length]
    b = len(rows)
    if batch_size is not None:
        if batch_size < b:
            raise ValueError(f"pad_batch: {b} rows exceed batch_size {batch_size}")
        b = batch_size
    longest = max((len(r) for r in rows), default=0)
    t = bucket_length(longest, multiple=multiple, min_length=min_length, max_length=max_length)
    ids = np.full((b, t), pad_id, dtype=np.int32)
    mask = np.zeros((b, t), dtype=bool)
    for i, r in enumerate(rows):
        if not r:
            continue
        if side == "left":
            ids[i, t - len(r) :] = r
            mask[i, t - len(r) :] = True
        else:
            ids[i, : len(r)] = r
            mask[i, : len(r)] = True
    return PaddedBatch(ids=ids, mask=mask)
