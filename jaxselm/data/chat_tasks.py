"""Verifiable natural-language chat tasks for instruction-tuned models (registered in tasks.py).

Unlike the word-level toy tasks of :mod:`jaxselm.data.tasks`, a chat task's prompt is one user
message in plain English for a real chat model: its examples carry
``messages = [{"role": "user", "content": prompt}]`` so a run applies the model's chat template,
and the task has no word tokenizer (``data.tokenizer`` must name the model's). ``prompt`` is the
user text the judge sees; its first word is the task's keyword, so ``jaxselm.data.tasks:score``
dispatches to it like to the other tasks.

* ``arithmetic`` -- ``Calculate 75 + 94. Reply with just the final number, nothing else.`` ->
  ``169``. The verifier reads one number from a free-form reply (see
  :func:`extract_answer`) and compares it exactly. Defaults (two-digit addition) were chosen on
  SmolLM2-135M-Instruct (GGUF Q4_1, its chat template, 240 test prompts): greedy accuracy 0.33,
  replies typically 12 tokens with EOS (``75 + 94 = 169``), prompts 50 tokens. Sample at a low
  temperature: at 1.0 most of its samples wander off (3.7% right, pass@4 0.12); at 0.5, 18%
  right and pass@4 0.42.
"""

from __future__ import annotations

import dataclasses
import re
from decimal import Decimal
from typing import ClassVar

import numpy as np

from jaxselm.data.task_base import Task, check_setting
from jaxselm.errors import ConfigError, DataError

# A number: optional minus sign, digits with optional thousands commas, optional decimals; not
# part of a word or a longer number ("x5", "1.5.2" and "A1" do not count; "94." is 94).
_NUMBER = re.compile(r"(?<![\w.])(-?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\d])")
# What announces a final answer; a number must follow it (after spaces, ':', '*', '$').
# The problem's expression (``echo``) is blanked to _ECHO first, so "75 + 94 is 169" is marked too.
_ECHO = "\x00"
_MARKER = re.compile(
    r"(?:=|\bequals?\b|\b(?:answer|result|sum|total|product|difference|number)\b\s*(?:is\b|:)"
    r"|\x00\s*(?:is|makes|gives)\b)[\s:*$]*",
    re.IGNORECASE,
)
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_OP_SPELLINGS = {"+": r"\+", "-": r"[-\u2212]", "*": r"[*x\u00d7]"}


def _value(m: re.Match[str]) -> Decimal:
    sign, digits, frac = m.groups()
    return Decimal(sign + digits.replace(",", "") + (frac or ""))


def extract_answer(response: str, echo: str | None = None) -> Decimal | None:
    """The number a free-form reply gives as its answer, or None.

    Rules, in order: every occurrence of ``echo`` (a regex for the problem's own expression,
    e.g. ``75 + 94``) is blanked, so restating the question gives no number; then the number
    right after the last answer marker is the answer: ``=``, ``equals``, one of ``answer``,
    ``result``, ``sum``, ``total``, ``product``, ``difference``, ``number`` followed by ``is`` or
    ``:``, or the problem's expression followed by ``is``, ``makes`` or ``gives``; without a
    marker, the last number of the reply. Numbers may carry a minus sign, thousands commas and
    decimals (``1,325``, ``169.0``); spelled-out numbers do not count.
    """
    text = re.sub(echo, f" {_ECHO} ", response.replace(_ECHO, " ")) if echo else response
    marked = [n for m in _MARKER.finditer(text) if (n := _NUMBER.match(text, m.end()))]
    if marked:
        return _value(marked[-1])
    numbers = list(_NUMBER.finditer(text))
    return _value(numbers[-1]) if numbers else None


@dataclasses.dataclass(frozen=True)
class ArithmeticChatTask(Task):
    """``Calculate 75 + 94. Reply with just the final number, nothing else.`` -> ``169``.

    Each example draws an operation from ``ops`` (any of ``+ - *``) and two operands in
    [min_value, max_value]; a subtraction puts the larger operand first (answers are never
    negative). Score: 1.0 when the reply's answer (:func:`extract_answer`) equals the exact
    result, else 0.0 -- a binary verifier, as SELM's pairs need a right and a wrong sample.
    """

    name: ClassVar[str] = "arithmetic"
    keyword: ClassVar[str] = "Calculate"
    chat: ClassVar[bool] = True
    instruction: ClassVar[str] = "Reply with just the final number, nothing else."
    min_value: int = 10
    max_value: int = 99
    ops: str = "+"

    _PROMPT: ClassVar[re.Pattern[str]] = re.compile(r"\s*Calculate\s+(\d+)\s*([-+*])\s*(\d+)\s*\.")

    def __post_init__(self) -> None:
        name = self.name
        check_setting(0 <= self.min_value, name, "min_value", "must be >= 0")
        check_setting(
            self.min_value <= self.max_value <= 9999,
            name,
            "max_value",
            "need min_value <= max_value <= 9999",
        )
        check_setting(
            bool(self.ops) and set(self.ops) <= set(_OPS) and len(set(self.ops)) == len(self.ops),
            name,
            "ops",
            f"a string of distinct operations from {''.join(_OPS)!r}, e.g. '+' or '+-'",
        )

    def vocab(self) -> list[str]:
        raise ConfigError(
            f"tasks.{self.name}: a chat task has no word tokenizer; set data.tokenizer to the "
            "model's tokenizer (and keep data.chat_template on)"
        )

    def sample(self, rng: np.random.Generator) -> str:
        op = self.ops[int(rng.integers(len(self.ops)))]
        a, b = (int(v) for v in rng.integers(self.min_value, self.max_value + 1, size=2))
        if op == "-" and a < b:
            a, b = b, a
        return f"{self.keyword} {a} {op} {b}. {self.instruction}"

    def _problem(self, prompt: str) -> tuple[int, str, int]:
        m = self._PROMPT.match(prompt)
        if not m:
            raise DataError(f"not an arithmetic prompt ('Calculate A op B.'): {prompt[:40]!r}")
        return int(m.group(1)), m.group(2), int(m.group(3))

    def reference(self, prompt: str) -> str:
        a, op, b = self._problem(prompt)
        return str(_OPS[op](a, b))

    def score(self, prompt: str, response: str) -> float:
        a, op, b = self._problem(prompt)
        echo = rf"(?<![\w.]){a}\s*{_OP_SPELLINGS[op]}\s*{b}(?![\d])"
        got = extract_answer(response, echo)
        return float(got is not None and got == _OPS[op](a, b))

    def corrupt(self, prompt: str, answer: str, rng: np.random.Generator) -> str:
        """A nearby wrong number: off by 1, 2 or 10 (the usual slips), never negative."""
        v = int(answer)
        delta = int(rng.choice([1, 2, 10]))
        if v - delta >= 0 and rng.random() < 0.5:
            delta = -delta
        return str(v + delta)
