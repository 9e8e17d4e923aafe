"""Deterministic shuffling, disjoint per-iteration slices, and a resumable read position.

SELM runs several online iterations over *disjoint* parts of the prompt set (the paper splits
UltraFeedback's prompts into thirds). We shuffle the split once with a seed, cut the shuffled
order into ``num_iterations`` contiguous slices that together cover every row exactly once, and
read iteration t's slice in order. Where we are is a small :class:`ReaderState` (seed, number of
iterations, iteration, position, number of rows) that serialises to JSON, so a run that stops
mid-iteration resumes with the next unread prompt; restoring against a dataset of a different
size is refused.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Protocol

import numpy as np

from jaxselm.errors import ConfigError, DataError


class RandomAccess(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


def shuffled_order(n_rows: int, seed: int) -> np.ndarray:
    """A permutation of ``range(n_rows)`` determined by ``seed`` alone, [n_rows] int64."""
    if n_rows < 0:
        raise ConfigError(f"n_rows: must be >= 0, got {n_rows}")
    return np.random.default_rng([int(seed), 0x5E1]).permutation(n_rows).astype(np.int64)


def iteration_slice(n_rows: int, num_iterations: int, t: int) -> range:
    """Positions (in the shuffled order) that iteration ``t`` reads.

    Contiguous, disjoint across t, covering ``range(n_rows)``; sizes differ by at most one.
    """
    if num_iterations < 1:
        raise ConfigError(f"num_iterations: must be >= 1, got {num_iterations}")
    if not 0 <= t < num_iterations:
        raise ConfigError(f"iteration: must be in [0, {num_iterations}), got {t}")
    return range(t * n_rows // num_iterations, (t + 1) * n_rows // num_iterations)


def iteration_indices(n_rows: int, num_iterations: int, t: int, seed: int) -> np.ndarray:
    """Row indices iteration ``t`` reads, in reading order, [len(slice)] int64."""
    s = iteration_slice(n_rows, num_iterations, t)
    return shuffled_order(n_rows, seed)[s.start : s.stop]


@dataclasses.dataclass(frozen=True)
class ReaderState:
    """Where reading stands: iteration ``iteration``, next position ``position`` in its slice."""

    seed: int
    num_iterations: int
    n_rows: int
    iteration: int = 0
    position: int = 0

    def __post_init__(self) -> None:
        iteration_slice(self.n_rows, self.num_iterations, self.iteration)  # validates
        if not 0 <= self.position <= len(self.slice):
            raise ConfigError(f"position: must be in [0, {len(self.slice)}], got {self.position}")

    @property
    def slice(self) -> range:
        return iteration_slice(self.n_rows, self.num_iterations, self.iteration)

    @property
    def remaining(self) -> int:
        """Rows of this iteration not read yet."""
        return len(self.slice) - self.position

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def next_iteration(self) -> ReaderState:
        """Start of the following iteration."""
        if self.iteration + 1 >= self.num_iterations:
            raise ConfigError(f"iteration: {self.iteration} is the last of {self.num_iterations}")
        return dataclasses.replace(self, iteration=self.iteration + 1, position=0)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "reader state") -> ReaderState:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) != fields:
            raise DataError(f"{where}: expected keys {sorted(fields)}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in d.values()):
            raise DataError(f"{where}: all values must be integers")
        try:
            return cls(**d)
        except ConfigError as e:
            raise DataError(f"{where}: {e}") from None

    def check_source(self, n_rows: int, where: str = "dataset") -> None:
        """Refuses to resume against a dataset whose size changed."""
        if n_rows != self.n_rows:
            raise DataError(
                f"{where}: has {n_rows} rows but the saved reader state was made for {self.n_rows}"
            )


def read_batch(
    source: RandomAccess, state: ReaderState, batch_size: int
) -> tuple[list[Any], ReaderState]:
    """The next up-to-``batch_size`` rows of the current iteration, and the advanced state.

    Pure: the same (source, state) always gives the same rows. Returns an empty list when the
    iteration is done.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
    state.check_source(len(source))
    s = state.slice
    take = min(batch_size, state.remaining)
    order = shuffled_order(state.n_rows, state.seed)
    idx = order[s.start + state.position : s.start + state.position + take]
    get_many = getattr(source, "get_many", None)  # one batched read where the source has it
    rows = list(get_many(idx)) if get_many is not None else [source[int(i)] for i in idx]
    return rows, dataclasses.replace(state, position=state.position + take)
