"""Programmatic judge: a Python function ``fn(prompt, response) -> float``, ``module:function``.

Synthetic verifiable tasks (sorting, counting, copying; :mod:`jaxselm.data.tasks`) know the right
answer from the prompt alone, so their "AI feedback" is an exact verifier -- no model, no network,
fully deterministic, which is what makes the CPU demo and its resume tests reproducible.

The function is resolved when the judge is built (:func:`resolve_callable`), so a typo in the
config fails before generation starts with one line such as
``judge.function: cannot import module 'mytasks' (No module named 'mytasks')``.
Scoring semantics:

* a bool counts as 0 / 1 (a pass/fail verifier);
* a returned NaN means "cannot score this one" -- counted as a failure, the caller drops it;
* an exception, or a value that is not a real number, is a bug in the user's function and raises
  a one-line JudgeError naming the function and the item, rather than silently losing data.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxselm.errors import JudgeError
from jaxselm.feedback.base import Judge, Response
from jaxselm.feedback.config import SPEC_RE, ProgrammaticJudgeConfig


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_callable(
    spec: str, *, field: str = "judge.function", search_dirs: Sequence[str | os.PathLike] = ()
) -> Callable[..., Any]:
    """Import ``package.module:attr[.attr]`` and return it; one-line JudgeError if that fails.

    A module found neither on ``sys.path`` nor among the installed packages is looked for in
    ``search_dirs`` (the CLI passes the run config's folder, so a judge file next to the config
    needs no PYTHONPATH).
    """
    if not isinstance(spec, str) or not SPEC_RE.match(spec):
        raise JudgeError(f"{field}: must look like 'package.module:function', got {spec!r}")
    module_name, attr_path = spec.split(":", 1)
    try:
        obj: Any = _import(module_name, search_dirs)
    except Exception as err:  # ImportError, or anything the module raises while importing
        raise JudgeError(
            f"{field}: cannot import module {module_name!r} ({_one_line(err)})"
        ) from None
    for i, attr in enumerate(attr_path.split(".")):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            owner = module_name if i == 0 else f"{module_name}:{'.'.join(attr_path.split('.')[:i])}"
            raise JudgeError(f"{field}: {owner!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise JudgeError(f"{field}: {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def _import(module_name: str, search_dirs: Sequence[str | os.PathLike]) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        top = module_name.split(".")[0]
        if err.name != top:  # the module exists but something it imports does not
            raise
        for folder in map(os.fspath, search_dirs):
            if os.path.isfile(os.path.join(folder, top + ".py")) or os.path.isfile(
                os.path.join(folder, top, "__init__.py")
            ):
                sys.path.insert(0, folder)
                try:
                    return importlib.import_module(module_name)
                finally:
                    sys.path.remove(folder)
        raise


class ProgrammaticJudge(Judge):
    """Scores each item with ``fn(prompt, response) -> float`` (NaN = could not score)."""

    def __init__(self, fn: Callable[[str, Response], float], *, name: str | None = None) -> None:
        if not callable(fn):
            raise JudgeError(f"judge.function: {fn!r} is not callable")
        super().__init__()
        self.fn = fn
        self.name = (
            name or f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
        )

    @classmethod
    def from_config(
        cls, config: ProgrammaticJudgeConfig, *, search_dirs: Sequence[str | os.PathLike] = ()
    ) -> ProgrammaticJudge:
        """Resolve ``config.function`` now (one-line JudgeError if it does not import)."""
        fn = resolve_callable(config.function, search_dirs=search_dirs)
        return cls(fn, name=config.function)

    def _score(self, prompts: list[str], responses: list[Response]) -> np.ndarray:
        out = np.empty(len(prompts), np.float64)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            try:
                value = self.fn(p, r)
            except Exception as err:
                raise JudgeError(
                    f"judge.function: {self.name} raised on item {i} ({_one_line(err)})"
                ) from None
            if not isinstance(
                value, (numbers.Real, np.floating, np.integer, np.bool_)
            ):  # bools count as 0/1
                raise JudgeError(
                    f"judge.function: {self.name} returned {type(value).__name__} on item {i}; "
                    "expected a float"
                )
            value = float(value)
            if math.isnan(value):
                self._count("failures")
            elif math.isinf(value):
                raise JudgeError(
                    f"judge.function: {self.name} returned {value} on item {i}; "
                    "expected a finite float"
                )
            out[i] = value
        return out

    def __repr__(self) -> str:
        return f"ProgrammaticJudge({self.name})"
