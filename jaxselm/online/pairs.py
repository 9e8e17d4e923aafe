"""An iteration's preference pairs as training data: judge.json's pairs -> PreferenceBatch rows.

``judge.json`` stores each pair by reference: policy samples by their flat index in
``generate.safetensors`` (so nothing is re-tokenized), dataset responses by their text (encoded
here, EOS appended, cut to ``online.max_new_tokens``). :class:`PairSet` packs the rows of one
global batch on demand, so a process packs only the rows it holds; every batch of an iteration
has the same padded length (one compilation of the train step per iteration).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxselm.data.packing import PreferenceBatch, pack_preferences, sequence_length
from jaxselm.feedback import PreferencePair

RESPONSES = ("chosen", "rejected", "refresp")


def pair_to_json(pair: PreferencePair) -> dict[str, Any]:
    """A pair from build_pairs as JSON: sample references are flat sample indices (ints),
    dataset responses are their text."""

    def ref(x: Any) -> int | str:
        return int(x) if isinstance(x, (int, np.integer)) else str(x)

    return {
        "prompt_index": int(pair.prompt_index),
        "chosen": ref(pair.chosen),
        "rejected": ref(pair.rejected),
        "refresp": ref(pair.ref),
        "chosen_score": float(pair.chosen_score),
        "rejected_score": float(pair.rejected_score),
    }


class PairSet:
    """Preference triples (prompt, chosen, rejected, y_ref) of token ids, packed on demand."""

    def __init__(
        self,
        pairs: Sequence[dict[str, Any]],
        prompts: Sequence[list[int]],
        samples: Sequence[list[int]],
        encode_response: Callable[[str], list[int]],
        pad_id: int,
    ):
        self.pad_id = pad_id
        texts: dict[str, list[int]] = {}

        def ids(ref: int | str) -> list[int]:
            if isinstance(ref, int):
                return samples[ref]
            if ref not in texts:
                texts[ref] = encode_response(ref)  # a dataset response (text)
            return texts[ref]

        self.prompts = [prompts[x["prompt_index"]] for x in pairs]
        self.responses = {k: [ids(x[k]) for x in pairs] for k in RESPONSES}
        self.length = sequence_length(self.prompts, *self.responses.values())

    @classmethod
    def of_sequences(
        cls, prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int
    ) -> PairSet:
        """(prompt, response) rows as chosen = rejected = y_ref (to score them with the
        log-prob machinery of pairs)."""
        pairs = [{"prompt_index": i, **dict.fromkeys(RESPONSES, i)} for i in range(len(prompts))]
        return cls(pairs, prompts, responses, lambda text: [], pad_id)

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, rows: np.ndarray, names: tuple[str, ...] = RESPONSES) -> PreferenceBatch:
        """Rows ``rows`` (indices into this set) with the responses ``names``."""
        prompts = [self.prompts[int(i)] for i in rows]

        def pick(name: str) -> list[list[int]] | None:
            return [self.responses[name][int(i)] for i in rows] if name in names else None

        return pack_preferences(
            prompts,
            pick("chosen"),
            pick("rejected"),
            pick("refresp"),
            pad_id=self.pad_id,
            length=self.length,
        )
