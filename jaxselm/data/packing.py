"""Typed batches and the one packer: padding, masks, filler rows and length buckets.

Every batch the package feeds to a jitted function is built here, from token-id lists, on the
host (numpy). A jitted function compiles once per input shape, so lengths are *bucketed* (the next
power of two, or the next multiple of a step) and batches have a fixed number of rows: a short
last batch is completed with *filler rows* (one real token, ``pad_id``, whose outputs nobody
reads; a row with no real token at all would give an attention softmax over nothing).

The batches are ``flax.struct`` dataclasses, so they are pytrees that go through ``jax.jit``,
shardings and ``make_global_batch`` as they are (B rows, T tokens):

    PromptBatch      tokens [B, T] int32 LEFT-padded, mask [B, T] bool     -> sampling.generate
    Sequences        tokens, mask, loss_mask [B, T], RIGHT-padded prompt + response, loss_mask
                     True on the response tokens only                      -> SFT, reward model
    SFTBatch         = Sequences
    LogProbs         chosen, rejected, refresp: summed response log-probs [B] float32
    PreferenceBatch  chosen, rejected, refresp (y_ref, SELM / XPO only): Sequences of one common
                     T; ref_logps: the reference model's LogProbs (filled once per iteration)

    batch = pack_preferences(prompts, chosen, rejected, refresp, pad_id=0)
    batch = batch.replace(ref_logps=ref_fn(ref_params, batch))
    state, metrics = step(state, batch)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import flax.struct
import jax
import numpy as np

from jaxselm.errors import DataError

Array = Any  # numpy on the host, jax.Array once placed
Ids = Sequence[int]

PROMPT_MIN_BUCKET = 8  # prompts are padded to a power of two >= this (few generate compiles)
SEQUENCE_MULTIPLE = 8  # prompt + response rows are padded to a multiple of this


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
    t = 1 << (n - 1).bit_length() if multiple is None else -(-n // multiple) * multiple
    return min(t, max_length) if max_length is not None else t


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
    seqs: Sequence[Ids],
    pad_id: int,
    *,
    side: Literal["left", "right"] = "left",
    length: int | None = None,
    multiple: int | None = None,
    min_length: int = 1,
    max_length: int | None = None,
    truncate: Literal["left", "right"] | None = None,
    batch_size: int | None = None,
    filler: bool = False,
) -> PaddedBatch:
    """Pads token-id lists to ``[B, T]`` int32 with a mask: the package's one padding routine.

    Args:
      seqs: the rows, lists of token ids.
      pad_id: id written where the mask is False.
      side: "left" for generation prompts (right-aligned), "right" for training.
      length: T itself; default the bucket of the longest row (see :func:`bucket_length` for
        ``multiple`` / ``min_length`` / ``max_length``).
      truncate: rows longer than ``max_length``: None refuses them (DataError naming the row),
        "left" keeps their last ``max_length`` tokens, "right" the first.
      batch_size: complete the batch with extra rows up to this size: empty (fully masked) rows,
        or with ``filler`` one real ``pad_id`` token at the row's end of the padding side.
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
        rows += [[pad_id] if filler else [] for _ in range(batch_size - b)]
    longest = max((len(r) for r in rows), default=0)
    if length is None:
        length = bucket_length(
            longest, multiple=multiple, min_length=min_length, max_length=max_length
        )
    elif longest > length:
        i = next(i for i, r in enumerate(rows) if len(r) > length)
        raise DataError(f"row {i}: {len(rows[i])} tokens do not fit the padded length {length}")
    ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=bool)
    for i, r in enumerate(rows):
        if not r:
            continue
        cols = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        ids[i, cols] = r
        mask[i, cols] = True
    return PaddedBatch(ids=ids, mask=mask)


# -- typed batches ---------------------------------------------------------------------------


@flax.struct.dataclass
class PromptBatch:
    """Left-padded prompts: every row ends at the last column, so decoding appends on the right."""

    tokens: Array  # [B, T] int32; pad_id in padding slots
    mask: Array  # [B, T] bool; True on real prompt tokens


@flax.struct.dataclass
class Sequences:
    """Right-padded prompt + response rows; ``loss_mask`` marks the response tokens."""

    tokens: Array  # [B, T] int32
    mask: Array  # [B, T] bool, attention mask
    loss_mask: Array  # [B, T] bool, True on response tokens (prompt and padding False)


SFTBatch = Sequences


@flax.struct.dataclass
class LogProbs:
    """Summed log-probabilities of each row's response, [B] float32 per response kind."""

    chosen: Array
    rejected: Array | None = None
    refresp: Array | None = None


@flax.struct.dataclass
class PreferenceBatch:
    """(chosen, rejected[, y_ref]) responses to the same prompts, all of one length T."""

    chosen: Sequences
    rejected: Sequences | None  # None only when scoring single responses (chosen)
    refresp: Sequences | None = None  # y_ref: the optimism term's response (SELM, XPO)
    ref_logps: LogProbs | None = None  # the reference model's log-probs of the responses

    @property
    def size(self) -> int:
        return int(self.chosen.tokens.shape[0])


def take_rows(batch: Any, rows: np.ndarray | Sequence[int]) -> Any:
    """The rows ``rows`` of every array of a batch (any of the typed batches, or a pytree)."""
    idx = np.asarray(rows, dtype=np.int64)
    return jax.tree.map(lambda x: np.asarray(x)[idx], batch)


# -- packing -----------------------------------------------------------------------------------


def pack_prompts(
    prompts: Sequence[Ids],
    pad_id: int,
    *,
    length: int | None = None,
    batch_size: int | None = None,
) -> PromptBatch:
    """Left-padded prompts; T = ``length`` or the power-of-two bucket (>= 8) of the longest.

    Filler rows (up to ``batch_size``) hold one ``pad_id`` token. An empty prompt is refused.
    """
    if not len(prompts) and not batch_size:
        raise DataError("prompts: empty batch (no prompts given)")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise DataError(f"prompts[{i}]: empty prompt (needs at least one token)")
        if length is not None and len(p) > length:
            raise DataError(f"prompts[{i}]: {len(p)} tokens do not fit the padded length {length}")
    padded = pad_batch(
        prompts,
        pad_id,
        side="left",
        length=length,
        min_length=PROMPT_MIN_BUCKET,
        batch_size=batch_size,
        filler=True,
    )
    return PromptBatch(tokens=padded.ids, mask=padded.mask)


def sequence_length(prompts: Sequence[Ids], *responses: Sequence[Ids]) -> int:
    """The padded T of prompt + response rows: the longest, rounded up to a multiple of 8."""
    longest = max(
        (len(p) + max((len(r[i]) for r in responses), default=0) for i, p in enumerate(prompts)),
        default=1,
    )
    return bucket_length(longest, multiple=SEQUENCE_MULTIPLE)


def pack_sequences(
    prompts: Sequence[Ids],
    responses: Sequence[Ids],
    pad_id: int,
    *,
    length: int | None = None,
    prompt_loss: Sequence[Sequence[int]] | None = None,
) -> Sequences:
    """Right-padded prompt + response rows, ``length`` long (default: :func:`sequence_length`).

    ``prompt_loss[i]``: positions in prompt i that are trained on too (a task's inner reads)."""
    if len(prompts) != len(responses):
        raise DataError(f"pack: {len(prompts)} prompts but {len(responses)} responses")
    length = sequence_length(prompts, responses) if length is None else length
    padded = pad_batch(
        [[*p, *r] for p, r in zip(prompts, responses)], pad_id, side="right", length=length
    )
    loss = np.zeros_like(padded.mask)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        loss[i, len(p) : len(p) + len(r)] = True
        for j in prompt_loss[i] if prompt_loss is not None else ():
            if not 0 < j < len(p):  # position 0 has nothing before it to predict from
                raise DataError(
                    f"pack: prompt_loss position {j} outside prompt {i} (1..{len(p) - 1})"
                )
            loss[i, j] = True
    return Sequences(tokens=padded.ids, mask=padded.mask, loss_mask=loss)


def pack_preferences(
    prompts: Sequence[Ids],
    chosen: Sequence[Ids],
    rejected: Sequence[Ids] | None,
    refresp: Sequence[Ids] | None = None,
    *,
    pad_id: int,
    length: int | None = None,
) -> PreferenceBatch:
    """Chosen, rejected (and y_ref) rows of one common length (default: the longest, bucketed)."""
    responses = [x for x in (chosen, rejected, refresp) if x is not None]
    length = sequence_length(prompts, *responses) if length is None else length

    def pack(rs: Sequence[Ids] | None) -> Sequences | None:
        return None if rs is None else pack_sequences(prompts, rs, pad_id, length=length)

    return PreferenceBatch(chosen=pack(chosen), rejected=pack(rejected), refresp=pack(refresp))
