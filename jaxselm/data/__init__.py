"""Data for online alignment: prompt datasets, synthetic tasks, tokenizers, batching.

Modules:
  builders   TFDS builders (array_record, no TensorFlow): prompts from JSONL/Parquet files and
             synthetic tasks; ``PromptSource`` gives random access to a prepared split.
  rows       reading and validating prompt rows (UltraFeedback-binarized layout and plain).
  hygiene    exact / near-duplicate removal (MinHash) and decontamination against eval prompts.
  iteration  seeded shuffling, disjoint per-iteration slices, resumable ``ReaderState``.
  tasks      selective copy, counting, Flip-Flop (CoPE paper) and the sorting demo task, with
             verifiers; ``jaxselm.data.tasks:score`` is a programmatic judge.
  tokenizer_base  the ``Tokenizer`` interface and the built-in byte / word tokenizers.
  tokenizer  tokenizer.json and SentencePiece tokenizers; ``load_tokenizer`` picks one.
  chat_template  Jinja chat templates rendered as Hugging Face does.
  packing    the typed batches (PromptBatch, Sequences / SFTBatch, PreferenceBatch, LogProbs)
             and the one packer: padding, masks, filler rows, length buckets.

The builders import tensorflow_datasets; they load on first use of their names here, so code
that only needs tokenizers or packing does not pay for it.
"""

from __future__ import annotations

import importlib
from typing import Any

from jaxselm.data.iteration import (
    ReaderState,
    iteration_indices,
    iteration_slice,
    read_batch,
    shuffled_order,
)
from jaxselm.data.packing import (
    LogProbs,
    PaddedBatch,
    PreferenceBatch,
    PromptBatch,
    Sequences,
    SFTBatch,
    bucket_length,
    pack_preferences,
    pack_prompts,
    pack_sequences,
    pad_batch,
)
from jaxselm.data.tasks import Task, make_demonstrations, make_task, score, task_tokenizer
from jaxselm.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    load_gguf_tokenizer,
    load_tokenizer,
)
from jaxselm.data.tokenizer_base import ByteTokenizer, Tokenizer, WordTokenizer

_LAZY = {
    name: "jaxselm.data.builders"
    for name in (
        "PromptsBuilder",
        "PromptsConfig",
        "PromptSource",
        "SyntheticConfig",
        "SyntheticTaskBuilder",
        "prepare_prompts",
        "prepare_synthetic",
    )
}

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "LogProbs",
    "PaddedBatch",
    "PreferenceBatch",
    "PromptBatch",
    "ReaderState",
    "SFTBatch",
    "SentencePieceTokenizer",
    "Sequences",
    "Task",
    "Tokenizer",
    "WordTokenizer",
    "bucket_length",
    "iteration_indices",
    "iteration_slice",
    "load_gguf_tokenizer",
    "load_tokenizer",
    "make_demonstrations",
    "make_task",
    "pack_preferences",
    "pack_prompts",
    "pack_sequences",
    "pad_batch",
    "read_batch",
    "score",
    "shuffled_order",
    "task_tokenizer",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxselm.data' has no attribute {name!r}")
