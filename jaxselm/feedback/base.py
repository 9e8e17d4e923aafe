"""The judge interface shared by every source of AI feedback.

SELM labels each (prompt, response) the policy sampled with a judge, then turns the per-prompt
ranking into a (chosen, rejected) pair (:mod:`jaxselm.feedback.pairs`). Three very different
judges exist -- a Python function that verifies a synthetic task, a reward model in JAX, an LLM
behind an HTTP endpoint -- and the loop must not care which one it holds, so they share one small
interface:

* ``score(prompts, responses) -> float64 [N]``: one scalar per (prompt, response) item, higher is
  better, **NaN where no score could be obtained** (a failed request, an unparseable reply). A NaN
  is counted in the judge's counters and the caller drops the item; it never raises mid-batch,
  because one bad reply must not cost a whole iteration of generation.
* ``rank(prompt, responses) -> float64 [n]``: the scores of several responses to one prompt,
  derived from ``score``.
* ``compare_batch(prompts, responses_a, responses_b) -> float64 [N]`` (and the one-item
  ``compare``): the probability that ``a`` beats ``b``, used for win rates. The default derives a
  hard decision from ``score`` (1, 0, or 0.5 for a tie); judges with a calibrated notion (a
  Bradley-Terry reward model, a pairwise LLM) override it.
* ``stats() -> dict``: counters (calls, items, failures, unparseable replies, ...) for metrics.

Counters are plain ints guarded by a lock because the LLM judge updates them from worker threads.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxselm.errors import JudgeError

Response = Any  # a string, or a sequence of token ids for judges that take ids


class Judge(abc.ABC):
    """Scores (prompt, response) items; NaN marks an item that could not be scored."""

    #: Counter names every judge reports (subclasses add their own).
    base_counters: tuple[str, ...] = ("calls", "items", "failures", "unparseable")

    def __init__(self, extra_counters: Sequence[str] = ()) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, float] = {k: 0 for k in (*self.base_counters, *extra_counters)}

    # ----------------------------------------------------------------------------- counters
    def _count(self, name: str, by: float = 1) -> None:
        with self._lock:
            self._counters[name] = self._counters.get(name, 0) + by

    def _count_max(self, name: str, value: float) -> None:
        with self._lock:
            self._counters[name] = max(self._counters.get(name, 0), value)

    def stats(self) -> dict[str, float]:
        """A copy of the counters (cumulative since construction or the last ``reset_stats``)."""
        with self._lock:
            return dict(self._counters)

    def reset_stats(self) -> None:
        """Zero every counter (e.g. at the start of an iteration)."""
        with self._lock:
            for k in self._counters:
                self._counters[k] = 0

    def check(self) -> None:
        """Raise a one-line JudgeError if the judge cannot work at all (e.g. an endpoint nobody
        answers at); a run calls it once before any work. Nothing to check by default."""
        return None

    # ---------------------------------------------------------------------------- scoring
    def score(self, prompts: Sequence[str], responses: Sequence[Response]) -> np.ndarray:
        """Scores float64 [N] of the items ``(prompts[i], responses[i])``; NaN = not scored."""
        _check_lengths(prompts, responses)
        self._count("calls")
        self._count("items", len(prompts))
        if not len(prompts):
            return np.zeros((0,), np.float64)
        out = np.asarray(self._score(list(prompts), list(responses)), np.float64)
        if out.shape != (len(prompts),):
            raise JudgeError(
                f"judge {type(self).__name__}: returned {out.shape} scores for {len(prompts)} items"
            )
        return out

    @abc.abstractmethod
    def _score(self, prompts: list[str], responses: list[Response]) -> np.ndarray:
        """Implementation of :meth:`score` (inputs already checked, non-empty)."""

    def rank(self, prompt: str, responses: Sequence[Response]) -> np.ndarray:
        """Scores float64 [n] of several responses to one prompt (higher ranks first)."""
        return self.score([prompt] * len(responses), responses)

    def compare_batch(
        self,
        prompts: Sequence[str],
        responses_a: Sequence[Response],
        responses_b: Sequence[Response],
    ) -> np.ndarray:
        """P(a beats b) float64 [N] per item; NaN where either side could not be judged."""
        _check_lengths(prompts, responses_a)
        _check_lengths(prompts, responses_b)
        return self._compare(list(prompts), list(responses_a), list(responses_b))

    def _compare(self, prompts: list[str], a: list[Response], b: list[Response]) -> np.ndarray:
        """Implementation of :meth:`compare_batch` (lengths checked). Default: both sides scored
        in one ``score`` call; 1 if a scores higher, 0 if lower, 0.5 for a tie. Judges with a
        calibrated notion (a Bradley-Terry reward model, a pairwise LLM) override it."""
        sa, sb = self.score_both(prompts, a, b)
        out = np.where(sa > sb, 1.0, np.where(sa < sb, 0.0, 0.5))
        return np.where(np.isnan(sa) | np.isnan(sb), np.nan, out)

    def score_both(
        self, prompts: list[str], a: list[Response], b: list[Response]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores of ``a`` and of ``b`` (each [N]) from ONE ``score`` call."""
        s = self.score([*prompts, *prompts], [*a, *b])
        return s[: len(prompts)], s[len(prompts) :]

    def compare(self, prompt: str, a: Response, b: Response) -> float:
        """Probability in [0, 1] that response ``a`` beats ``b`` (NaN if it could not be judged)."""
        return float(self.compare_batch([prompt], [a], [b])[0])

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_lengths(prompts: Sequence[Any], responses: Sequence[Any]) -> None:
    if len(prompts) != len(responses):
        raise JudgeError(f"judge: got {len(prompts)} prompts but {len(responses)} responses")
