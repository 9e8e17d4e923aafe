"""Synthetic tasks with exact verifiers: the CoPE paper's toy tasks and a short sorting task.

Each task writes prompts and answers as space-separated words over a tiny vocabulary (so the
built-in :class:`~jaxselm.data.tokenizer_base.WordTokenizer` gives one id per word), generates
example ``i`` from ``(seed, split, i)`` alone (deterministic, independent of how many are
drawn), and can score any response from the prompt alone. The first word of every prompt names
the task, so :func:`score` is one programmatic judge for all of them (``jaxselm.data.tasks:score``).

Tasks (settings of *Contextual Position Encoding*, Golovneva et al. 2024, as defaults noted in
each class; the defaults here are small so CPU runs are quick):

* ``copy`` -- selective copy: data tokens scattered among blanks; answer = the data tokens in
  order. Paper: vocabulary 16, 256 data tokens, 256 blanks (OOD: 128 / 512 blanks).
* ``count`` -- counting as RAM's generator defines it: a program of ``x = 0 ;`` (reset),
  ``x ++;`` (increment a set variable, at most 10) and ``pass;`` statements drawn with weights
  1 / 7 / 50 over up to 3 variables, then ``print x``; answer = the value of x. Paper: 3 to 512
  statements.
* ``flipflop`` -- Flip-Flop language modelling (Liu et al. 2023): ``w b`` writes bit b, ``i b``
  is ignored, ``r b`` reads the last written bit; the prompt ends with a final ``r`` whose bit
  is the answer. In-distribution p(ignore) = 0.8; out of distribution 0.98 (sparse).
* ``sort`` -- the CPU demo task for online alignment: ``sort 3 1 2 =`` -> ``1 2 3``. Answers are
  at most ``max_items`` tokens; :meth:`SortTask.score` is graded (fraction of positions right)
  so a judge can rank imperfect samples, and :func:`make_demonstrations` writes imperfect
  demonstrations for a short SFT warm start.
* ``arithmetic`` -- a natural-language chat task for instruction-tuned models (in
  :mod:`jaxselm.data.chat_tasks`, registered here): ``Calculate 75 + 94. Reply with just the
  final number, nothing else.`` -> ``169``. Its examples carry a one-turn ``messages`` list for
  the model's chat template and it has no word tokenizer.

The base class and the per-example generator live in :mod:`jaxselm.data.task_base`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np

from jaxselm.data.chat_tasks import ArithmeticChatTask
from jaxselm.data.task_base import SPLIT_STREAMS, Task, check_setting
from jaxselm.data.task_base import example_rng as example_rng
from jaxselm.data.tokenizer_base import WordTokenizer
from jaxselm.errors import ConfigError, DataError


def _positional_score(answer: Sequence[str], response: Sequence[str]) -> float:
    """Fraction of positions right, normalised by the longer of answer and response."""
    n = max(len(answer), len(response))
    if n == 0:
        return 1.0
    return sum(a == r for a, r in zip(answer, response, strict=False)) / n


_check = check_setting


@dataclasses.dataclass(frozen=True)
class SortTask(Task):
    """``sort 3 1 2 =`` -> ``1 2 3``: ``min_items..max_items`` numbers in [0, max_value]."""

    name: ClassVar[str] = "sort"
    keyword: ClassVar[str] = "sort"
    min_items: int = 2
    max_items: int = 5
    max_value: int = 9
    distinct: bool = False  # draw the items without replacement (no duplicates to count)

    def __post_init__(self) -> None:
        _check(
            1 <= self.min_items <= self.max_items,
            "sort",
            "min_items",
            "need 1 <= min_items <= max_items",
        )
        _check(self.max_items <= 32, "sort", "max_items", "at most 32 (answers stay short)")
        _check(1 <= self.max_value <= 99, "sort", "max_value", "must be in [1, 99]")
        _check(
            not self.distinct or self.max_items <= self.max_value + 1,
            "sort",
            "distinct",
            "needs max_items <= max_value + 1",
        )

    def vocab(self) -> list[str]:
        return ["sort", "=", *(str(v) for v in range(self.max_value + 1))]

    def sample(self, rng: np.random.Generator) -> str:
        n = int(rng.integers(self.min_items, self.max_items + 1))
        if self.distinct:
            values = rng.choice(self.max_value + 1, size=n, replace=False)
        else:
            values = rng.integers(0, self.max_value + 1, size=n)
        return " ".join(["sort", *(str(v) for v in values), "="])

    def _items(self, prompt: str) -> list[int]:
        words = self._words(prompt)
        if not words or words[-1] != "=":
            raise DataError(f"sort prompt must end with '=': {prompt[:40]!r}")
        try:
            return [int(w) for w in words[:-1]]
        except ValueError:
            raise DataError(f"sort prompt has a non-number item: {prompt[:40]!r}") from None

    def reference(self, prompt: str) -> str:
        return " ".join(str(v) for v in sorted(self._items(prompt)))

    def score(self, prompt: str, response: str) -> float:
        return _positional_score(self.reference(prompt).split(), response.split())

    def corrupt(self, prompt: str, answer: str, rng: np.random.Generator) -> str:
        words = answer.split()
        distinct = sorted(set(words))
        if len(distinct) > 1 and rng.random() < 0.5:  # swap two different values
            while True:
                i, j = rng.choice(len(words), size=2, replace=False)
                if words[i] != words[j]:
                    break
            words[i], words[j] = words[j], words[i]
        else:  # replace one value
            i = int(rng.integers(len(words)))
            choices = [str(v) for v in range(self.max_value + 1) if str(v) != words[i]]
            words[i] = choices[int(rng.integers(len(choices)))]
        return " ".join(words)


@dataclasses.dataclass(frozen=True)
class SelectiveCopyTask(Task):
    """Selective copy: ``copy t3 _ _ t1 _ t7 =`` -> ``t3 t1 t7``.

    Paper settings: vocab_size=16, num_tokens=256, num_blanks=256 (OOD 128 / 512).
    """

    name: ClassVar[str] = "copy"
    keyword: ClassVar[str] = "copy"
    vocab_size: int = 16
    num_tokens: int = 8
    num_blanks: int = 8

    def __post_init__(self) -> None:
        _check(2 <= self.vocab_size <= 256, "copy", "vocab_size", "must be in [2, 256]")
        _check(self.num_tokens >= 1, "copy", "num_tokens", "must be >= 1")
        _check(self.num_blanks >= 0, "copy", "num_blanks", "must be >= 0")

    def vocab(self) -> list[str]:
        return ["copy", "=", "_", *(f"t{i}" for i in range(self.vocab_size))]

    def sample(self, rng: np.random.Generator) -> str:
        total = self.num_tokens + self.num_blanks
        is_data = np.zeros(total, dtype=bool)
        is_data[rng.choice(total, size=self.num_tokens, replace=False)] = True
        values = iter(rng.integers(0, self.vocab_size, size=self.num_tokens))
        seq = [f"t{next(values)}" if d else "_" for d in is_data]
        return " ".join(["copy", *seq, "="])

    def reference(self, prompt: str) -> str:
        words = self._words(prompt)
        if not words or words[-1] != "=":
            raise DataError(f"copy prompt must end with '=': {prompt[:40]!r}")
        return " ".join(w for w in words[:-1] if w != "_")

    def score(self, prompt: str, response: str) -> float:
        return _positional_score(self.reference(prompt).split(), response.split())

    def corrupt(self, prompt: str, answer: str, rng: np.random.Generator) -> str:
        words = answer.split()
        i = int(rng.integers(len(words)))
        choices = [f"t{v}" for v in range(self.vocab_size) if f"t{v}" != words[i]]
        words[i] = choices[int(rng.integers(len(choices)))]
        return " ".join(words)


_VAR_NAMES = "abcdefghjkmnpqrsuvwxyz"
_SET, _INC, _PASS = 0, 1, 2


class _GenerationFail(Exception):
    """A statement or a sample that RAM's generator would throw away and redraw."""


@dataclasses.dataclass(frozen=True)
class CountingTask(Task):
    """Counting, as RAM's ``projects/cope/scripts/count_data_gen.py`` defines it.

    ``count a = 0 ; pass; a ++; pass; b = 0 ; a ++; print a`` -> ``2``. A program of
    ``min_ops..max_ops`` statements (RAM: 3..512), each drawn with weights set / inc / pass =
    1 / 7 / 50: ``x = 0 ;`` (re)sets a random variable to 0, ``x ++;`` increments a variable
    that has been set (never past ``max_value``, RAM's 10), ``pass;`` does nothing. A statement
    that cannot be made (an increment with nothing set, or past the limit) is redrawn, up to 100
    times; then ``print x`` asks for a variable that has been set, and a program with none is
    redrawn whole, up to 1000 times. The words are RAM's (its tokenizer splits on spaces), after
    the task keyword. The answer is the number of increments since x's last reset.
    """

    name: ClassVar[str] = "count"
    keyword: ClassVar[str] = "count"
    num_vars: int = 3
    min_ops: int = 3
    max_ops: int = 64
    max_value: int = 10
    weights: tuple[float, float, float] = (1.0, 7.0, 50.0)  # set, inc, pass

    def __post_init__(self) -> None:
        _check(
            1 <= self.num_vars <= len(_VAR_NAMES),
            "count",
            "num_vars",
            f"must be in [1, {len(_VAR_NAMES)}]",
        )
        _check(
            1 <= self.min_ops <= self.max_ops, "count", "min_ops", "need 1 <= min_ops <= max_ops"
        )
        _check(1 <= self.max_value <= 99, "count", "max_value", "must be in [1, 99]")
        _check(
            len(self.weights) == 3 and all(w >= 0 for w in self.weights) and self.weights[0] > 0,
            "count",
            "weights",
            "three non-negative weights (set, inc, pass), set > 0",
        )

    def vocab(self) -> list[str]:
        return [
            "count",
            "=",
            ";",
            "++;",
            "pass;",
            "print",
            *_VAR_NAMES[: self.num_vars],
            *(str(v) for v in range(self.max_value + 1)),
        ]

    def _statement(self, rng: np.random.Generator, p: np.ndarray, values: dict[str, int]):
        names = _VAR_NAMES[: self.num_vars]
        for _ in range(100):  # RAM: generate_statement's 100 trials
            op = int(rng.choice(3, p=p))
            if op == _SET:
                var = names[int(rng.integers(len(names)))]
                values[var] = 0
                return [var, "=", "0", ";"]
            if op == _PASS:
                return ["pass;"]
            if values:  # an increment of a variable that has been set
                var = sorted(values)[int(rng.integers(len(values)))]
                if values[var] + 1 <= self.max_value:
                    values[var] += 1
                    return [var, "++;"]
        raise _GenerationFail

    def sample(self, rng: np.random.Generator) -> str:
        p = np.asarray(self.weights, dtype=np.float64)
        p = p / p.sum()
        for _ in range(1000):  # RAM: generate_sample's 1000 trials
            values: dict[str, int] = {}
            words = ["count"]
            try:
                for _ in range(int(rng.integers(self.min_ops, self.max_ops + 1))):
                    words += self._statement(rng, p, values)
            except _GenerationFail:
                continue
            if values:
                return " ".join([*words, "print", sorted(values)[int(rng.integers(len(values)))]])
        raise DataError(f"count: no valid program in 1000 draws with settings {self}")

    def reference(self, prompt: str) -> str:
        words = self._words(prompt)
        values: dict[str, int] = {}
        i = 0
        try:
            while i < len(words):
                w = words[i]
                if w == "pass;":
                    i += 1
                elif w == "print" and i == len(words) - 2:
                    return str(values[words[i + 1]])
                elif words[i + 1] == "++;":
                    values[w] += 1
                    i += 2
                elif words[i + 1 : i + 4] == ["=", "0", ";"]:
                    values[w] = 0
                    i += 4
                else:
                    raise ValueError(w)
        except (IndexError, KeyError, ValueError):
            pass
        raise DataError(f"malformed count prompt at word {i + 2}: {prompt[:40]!r}")

    def corrupt(self, prompt: str, answer: str, rng: np.random.Generator) -> str:
        v = int(answer)
        choices = [c for c in range(self.max_value + 1) if c != v]
        return str(choices[int(rng.integers(len(choices)))])


@dataclasses.dataclass(frozen=True)
class FlipFlopTask(Task):
    """Flip-Flop: ``flipflop w 1 i 0 r 1 w 0 i 1 r`` -> ``0`` (the last written bit).

    ``length`` instruction/bit pairs; the first is a write and the last a read whose bit is the
    answer; the others are ignore with probability ``p_ignore`` and write / read with equal
    probability otherwise. Every inner read carries the right bit, so whole sequences are valid
    language-modelling data. Paper (after Liu et al. 2023): p_ignore 0.8 in distribution, 0.98
    out of distribution.

    ``loss_on_reads``: SFT trains on the bit of every inner read too (the language-modelling
    setting of Liu et al., where every read is a prediction), not only on the final answer.
    """

    name: ClassVar[str] = "flipflop"
    keyword: ClassVar[str] = "flipflop"
    length: int = 16
    p_ignore: float = 0.8
    loss_on_reads: bool = False

    def __post_init__(self) -> None:
        _check(self.length >= 2, "flipflop", "length", "must be >= 2")
        _check(0.0 <= self.p_ignore <= 1.0, "flipflop", "p_ignore", "must be in [0, 1]")

    def vocab(self) -> list[str]:
        return ["flipflop", "w", "i", "r", "0", "1"]

    def sample(self, rng: np.random.Generator) -> str:
        bit = int(rng.integers(2))
        words = ["flipflop", "w", str(bit)]
        q = (1.0 - self.p_ignore) / 2
        for _ in range(self.length - 2):
            op = rng.choice(3, p=[q, self.p_ignore, q])
            if op == 0:
                bit = int(rng.integers(2))
                words += ["w", str(bit)]
            elif op == 1:
                words += ["i", str(int(rng.integers(2)))]
            else:
                words += ["r", str(bit)]
        words.append("r")
        return " ".join(words)

    def reference(self, prompt: str) -> str:
        words = self._words(prompt)
        if len(words) < 3 or len(words) % 2 == 0 or words[-1] != "r":
            raise DataError(f"malformed flipflop prompt: {prompt[:40]!r}")
        last = None
        for op, b in zip(words[0:-1:2], words[1:-1:2], strict=True):
            if op not in ("w", "i", "r") or b not in ("0", "1"):
                raise DataError(f"malformed flipflop prompt: {prompt[:40]!r}")
            if op == "w":
                last = b
        if last is None:
            raise DataError(f"flipflop prompt has no write: {prompt[:40]!r}")
        return last

    def corrupt(self, prompt: str, answer: str, rng: np.random.Generator) -> str:
        return "0" if answer == "1" else "1"

    def prompt_loss_words(self, prompt: str) -> list[int]:
        """With ``loss_on_reads``: the word index (keyword = 0) of every inner read's bit."""
        if not self.loss_on_reads:
            return []
        words = prompt.split()
        return [i + 1 for i in range(1, len(words) - 1, 2) if words[i] == "r"]


TASKS: dict[str, type[Task]] = {
    t.name: t for t in (SortTask, SelectiveCopyTask, CountingTask, FlipFlopTask, ArithmeticChatTask)
}
_BY_KEYWORD: dict[str, type[Task]] = {t.keyword: t for t in TASKS.values()}


def make_task(name: str, **settings: Any) -> Task:
    """The task ``name`` with the given settings; unknown names or settings raise ConfigError."""
    if name not in TASKS:
        raise ConfigError(f"task: unknown task {name!r} (expected one of {sorted(TASKS)})")
    cls = TASKS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    for key in settings:
        if key not in known:
            raise ConfigError(f"tasks.{name}.{key}: unknown setting (known: {sorted(known)})")
    if "weights" in settings:
        settings["weights"] = tuple(settings["weights"])
    try:
        return cls(**settings)
    except TypeError as e:
        raise ConfigError(f"tasks.{name}: {e}") from None


def task_tokenizer(task: str | Task) -> WordTokenizer:
    """The word tokenizer of a task (a name means its default settings)."""
    return (make_task(task) if isinstance(task, str) else task).tokenizer()


def generate_examples(
    task: Task, n: int, *, seed: int, split: str = "train", start: int = 0
) -> Iterator[dict[str, Any]]:
    """Examples ``start .. start + n - 1`` of ``split``: dicts with id, prompt and answer (and
    messages, for a chat task)."""
    for i in range(start, start + n):
        yield task.example(seed, split, i)


def task_for_prompt(prompt: str, task: Task | None = None) -> Task:
    """The task a prompt belongs to (by its first word), with default settings unless given."""
    if task is not None:
        return task
    words = prompt.split(maxsplit=1)
    if not words or words[0] not in _BY_KEYWORD:
        raise DataError(
            f"prompt does not start with a task keyword {sorted(_BY_KEYWORD)}: {prompt[:40]!r}"
        )
    return _BY_KEYWORD[words[0]]()


def score(prompt: str, response: str) -> float:
    """Programmatic judge for every task here: the score of ``response`` in [0, 1].

    Use as ``jaxselm.data.tasks:score``. The task is read from the prompt's first word;
    scoring needs no task settings (the answer follows from the prompt).
    """
    return task_for_prompt(prompt).score(prompt, response)


def verify(prompt: str, response: str) -> bool:
    """True when ``response`` is exactly the answer."""
    return score(prompt, response) == 1.0


def make_demonstrations(
    task: Task, n: int, *, seed: int, corrupt_prob: float, split: str = "train", start: int = 0
) -> list[dict[str, Any]]:
    """Imperfect demonstrations for a short SFT warm start.

    Each of examples ``start .. start + n - 1`` gets its reference answer, replaced by a
    corrupted one with probability ``corrupt_prob``. Returns dicts with id, prompt, response
    and ``corrupted`` (bool), a chat task's ``messages``, and ``prompt_loss_words`` (indices of
    prompt words SFT trains on too) when the task has any. Deterministic in ``seed``.
    """
    if not 0.0 <= corrupt_prob <= 1.0:
        raise ConfigError(f"corrupt_prob: must be in [0, 1], got {corrupt_prob}")
    out = []
    for ex in generate_examples(task, n, seed=seed, split=split, start=start):
        rng = np.random.default_rng(
            [int(seed), 7919, SPLIT_STREAMS[split], int(ex["id"].rsplit("/", 1)[1])]
        )
        corrupted = bool(rng.random() < corrupt_prob)
        response = task.corrupt(ex["prompt"], ex["answer"], rng) if corrupted else ex["answer"]
        demo = {"id": ex["id"], "prompt": ex["prompt"], "response": response}
        loss_words = task.prompt_loss_words(ex["prompt"])
        if loss_words:  # prompt words trained on too (Flip-Flop's inner reads)
            demo["prompt_loss_words"] = loss_words
        if "messages" in ex:  # a chat task: the prompt as the chat template wants it
            demo["messages"] = ex["messages"]
        out.append({**demo, "corrupted": corrupted})
    return out
