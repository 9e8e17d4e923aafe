"""The base of every synthetic task (:mod:`jaxselm.data.tasks`, :mod:`jaxselm.data.chat_tasks`).

A task is a frozen dataclass of settings that generates example ``i`` of a split from
``(seed, split, i)`` alone and scores any response from the prompt alone. Its prompts start with
the task's ``keyword``, which is how ``jaxselm.data.tasks:score`` finds the task of a prompt.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import numpy as np

from jaxselm.data.tokenizer_base import WordTokenizer
from jaxselm.errors import ConfigError, DataError

SPLIT_STREAMS = {"train": 0, "test": 1, "validation": 2}


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for example ``index`` of ``split``: independent of the other examples."""
    if split not in SPLIT_STREAMS:
        raise ConfigError(
            f"split: unknown split {split!r} (expected one of {sorted(SPLIT_STREAMS)})"
        )
    return np.random.default_rng([int(seed), SPLIT_STREAMS[split], int(index)])


def check_setting(cond: bool, name: str, field: str, msg: str) -> None:
    """Raise ``ConfigError("tasks.<name>.<field>: <msg>")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"tasks.{name}.{field}: {msg}")


@dataclasses.dataclass(frozen=True)
class Task(abc.ABC):
    """Base class: a task's settings; subclasses implement the generation and the answer.

    ``chat`` tasks write natural-language prompts for an instruction-tuned model: their examples
    carry a one-turn ``messages`` list (for the model's chat template) and they have no word
    tokenizer (a run uses the model's own).
    """

    name: ClassVar[str] = ""
    keyword: ClassVar[str] = ""
    chat: ClassVar[bool] = False

    @abc.abstractmethod
    def vocab(self) -> list[str]:
        """The words prompts and answers use (fixed by the settings)."""

    @abc.abstractmethod
    def sample(self, rng: np.random.Generator) -> str:
        """One prompt."""

    @abc.abstractmethod
    def reference(self, prompt: str) -> str:
        """The exact answer, computed from the prompt alone."""

    def score(self, prompt: str, response: str) -> float:
        """1.0 for the exact answer, less otherwise (graded for some tasks), in [0, 1]."""
        return float(response.split() == self.reference(prompt).split())

    @abc.abstractmethod
    def corrupt(self, prompt: str, answer: str, rng: np.random.Generator) -> str:
        """A wrong answer close to ``answer`` (changes one or two positions)."""

    def prompt_loss_words(self, prompt: str) -> list[int]:
        """Indices of the prompt's words that SFT also trains on (beside the response): none by
        default; Flip-Flop's inner reads with ``loss_on_reads``."""
        return []

    def example(self, seed: int, split: str, index: int) -> dict[str, Any]:
        """Example ``index``: {"id", "prompt", "answer"}, and "messages" for a chat task."""
        prompt = self.sample(example_rng(seed, split, index))
        out: dict[str, Any] = {
            "id": f"{self.name}/{split}/{index}",
            "prompt": prompt,
            "answer": self.reference(prompt),
        }
        if self.chat:
            out["messages"] = [{"role": "user", "content": prompt}]
        return out

    def tokenizer(self) -> WordTokenizer:
        return WordTokenizer(self.vocab(), name=f"task:{self.name}")

    def _words(self, prompt: str) -> list[str]:
        words = prompt.split()
        if not words or words[0] != self.keyword:
            raise DataError(f"prompt does not start with {self.keyword!r}: {prompt[:40]!r}")
        return words[1:]
