"""Prompt hygiene: exact and near-duplicate removal, and decontamination against eval prompts.

In the spirit of MAP-Neo's open data pipeline: repeated prompts waste an online iteration's
sampling budget and over-weight a few topics, and prompts that overlap the evaluation set
inflate the reported win rates. We therefore

* drop **exact duplicates** after normalisation (Unicode NFKC, case-folding, collapsed
  whitespace);
* drop **near duplicates** with MinHash + LSH (``datasketch``) over word shingles, confirming
  each LSH candidate with the estimated Jaccard similarity against the threshold;
* drop prompts **contaminated** by a user-given file of evaluation prompts: a prompt is
  contaminated when it shares an n-gram of ``ngram`` units with an evaluation prompt, or
  contains a shorter evaluation prompt whole.

Text is split into *units*: runs of letters/digits, and single CJK characters (Chinese has no
spaces, and MAP-Neo is bilingual). The first occurrence of a duplicate is kept, so results are
deterministic for a given input order. Counts of what was removed are reported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator
from typing import Any

from jaxselm.data.rows import conversation_text
from jaxselm.errors import ConfigError

_CJK = (
    r"\u2e80-\u2eff\u2f00-\u2fdf\u3040-\u30ff\u3100-\u312f\u3400-\u4dbf\u4e00-\u9fff"
    r"\uac00-\ud7af\uf900-\ufaff"
)
_UNIT_RE = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def normalize_text(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: the key for exact duplicates."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def text_units(text: str) -> list[str]:
    """Words (letter/digit runs) and single CJK characters of the normalised text."""
    return _UNIT_RE.findall(normalize_text(text))


def _ngrams(units: list[str], n: int) -> Iterator[tuple[str, ...]]:
    for i in range(len(units) - n + 1):
        yield tuple(units[i : i + n])


@dataclasses.dataclass
class HygieneCounts:
    """What hygiene did to one split."""

    exact_duplicates: int = 0
    near_duplicates: int = 0
    contaminated: int = 0
    kept: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class HygieneSettings:
    """Switches and thresholds for :func:`clean_records`.

    Attributes:
      exact_dedup: drop exact duplicates (normalised text).
      near_dup_threshold: estimated Jaccard similarity of shingle sets at which a prompt is a
        near duplicate of an earlier one; None disables near-duplicate removal.
      num_perm: MinHash permutations (more = more accurate, slower).
      shingle: words per shingle for MinHash.
      ngram: units per n-gram for decontamination.
      seed: MinHash seed.
    """

    exact_dedup: bool = True
    near_dup_threshold: float | None = 0.8
    num_perm: int = 128
    shingle: int = 3
    ngram: int = 13
    seed: int = 1

    def __post_init__(self) -> None:
        if self.near_dup_threshold is not None and not 0.0 < self.near_dup_threshold <= 1.0:
            raise ConfigError("hygiene.near_dup_threshold: must be in (0, 1] or null")
        if self.num_perm < 16:
            raise ConfigError("hygiene.num_perm: must be >= 16")
        if self.shingle < 1:
            raise ConfigError("hygiene.shingle: must be >= 1")
        if self.ngram < 1:
            raise ConfigError("hygiene.ngram: must be >= 1")


class NearDuplicateIndex:
    """MinHash LSH index: ``add(text)`` says whether text is a near duplicate of an earlier one."""

    def __init__(self, threshold: float, num_perm: int = 128, shingle: int = 3, seed: int = 1):
        from datasketch import MinHashLSH

        self._threshold = threshold
        self._num_perm = num_perm
        self._shingle = shingle
        self._seed = seed
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._sigs: dict[int, Any] = {}

    def _minhash(self, text: str) -> Any:
        from datasketch import MinHash

        units = text_units(text) or list(normalize_text(text))
        n = min(self._shingle, max(len(units), 1))
        shingles = {" ".join(g).encode("utf-8") for g in _ngrams(units, n)} or {b""}
        m = MinHash(num_perm=self._num_perm, seed=self._seed)
        m.update_batch(sorted(shingles))
        return m

    def add(self, text: str) -> bool:
        """True (and not indexed) if ``text`` is a near duplicate of an indexed text."""
        m = self._minhash(text)
        for key in self._lsh.query(m):
            if m.jaccard(self._sigs[key]) >= self._threshold:
                return True
        key = len(self._sigs)
        self._sigs[key] = m
        self._lsh.insert(key, m)
        return False


class Decontaminator:
    """Flags prompts that overlap any of the evaluation prompts (see module docstring)."""

    def __init__(self, eval_texts: Iterable[str], ngram: int = 13):
        self.ngram = ngram
        self._grams: set[tuple[str, ...]] = set()
        self._short: dict[int, set[tuple[str, ...]]] = {}
        for text in eval_texts:
            units = text_units(text)
            if len(units) >= ngram:
                self._grams.update(_ngrams(units, ngram))
            elif units:
                self._short.setdefault(len(units), set()).add(tuple(units))

    def __call__(self, text: str) -> bool:
        units = text_units(text)
        if any(g in self._grams for g in _ngrams(units, self.ngram)):
            return True
        return any(any(g in grams for g in _ngrams(units, k)) for k, grams in self._short.items())


def clean_records(
    records: Iterable[dict[str, Any]],
    settings: HygieneSettings,
    decontaminate: Decontaminator | None = None,
    counts: HygieneCounts | None = None,
) -> Iterator[dict[str, Any]]:
    """Filters prompt records (see rows.py) in order; fills ``counts`` as it goes.

    Order of checks: decontamination, exact duplicate, near duplicate. A contaminated prompt is
    counted as contaminated even if it is also a duplicate.
    """
    counts = counts if counts is not None else HygieneCounts()
    seen: set[bytes] = set()
    near = (
        NearDuplicateIndex(
            settings.near_dup_threshold, settings.num_perm, settings.shingle, settings.seed
        )
        if settings.near_dup_threshold is not None
        else None
    )
    for rec in records:
        text = conversation_text(rec["messages"])
        if decontaminate is not None and decontaminate(text):
            counts.contaminated += 1
            continue
        if settings.exact_dedup:
            key = hashlib.sha256(normalize_text(text).encode("utf-8")).digest()
            if key in seen:
                counts.exact_duplicates += 1
                continue
            seen.add(key)
        if near is not None and near.add(text):
            counts.near_duplicates += 1
            continue
        counts.kept += 1
        yield rec
