"""From judged samples to SELM preference pairs (chosen y_w, rejected y_l, reference sample y_ref).

SELM's data step, per prompt (Zhang et al. 2024, *Self-Exploring Language Models*): rank the n
responses the current policy sampled -- together with the dataset's own chosen / rejected
responses when given, as the authors did with UltraFeedback and PairRM -- take the best as chosen
and the worst as rejected, and keep one *policy* sample as y_ref, whose log-ratio the SELM loss's
optimism term pushes on. Kept apart from the judges so it is pure and cheap to test:

    scores, ds = score_samples(judge, prompts, samples, dataset_chosen=dc, dataset_rejected=dr,
                               decode=tokenizer.decode)
    pairs, stats = build_pairs(prompts, samples, scores, dataset_chosen=dc, dataset_rejected=dr,
                               dataset_scores=ds, min_margin=0.0, no_eos_penalty=1.0,
                               eos_flags=finished, refresp_choice="first")

Rules (each drop is counted in ``stats``):

* a prompt with a NaN score among its candidates is dropped (``dropped_nan``); with
  ``nan_policy="drop_response"`` only the NaN candidates go, and the prompt is dropped only when
  fewer than two candidates remain;
* ``no_eos_penalty`` is subtracted from the score of every policy sample whose ``eos_flags`` entry
  is False (it hit the length limit), before ranking; pairs carry these effective scores, while
  the ``*_sample_score`` stats report the judge's raw scores;
* best = first candidate with the highest score, worst = first with the lowest; if they tie, or
  are the same response, the prompt is dropped (``dropped_ties``); if the margin is positive but
  below ``min_margin``, too (``dropped_margin``);
* y_ref is policy sample 0 (``refresp_choice="first"``: the greedy sample, by the loop's
  convention) or a uniformly drawn one (``"random"``, from ``rng``; one draw per prompt, dropped
  or not, so the choice for a prompt does not depend on the others' fate).

Responses are opaque objects -- strings or token-id sequences -- so the loop can pair token ids
directly and never re-tokenize.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from jaxselm.errors import ConfigError, DataError
from jaxselm.feedback.base import Judge

Source = Literal["policy", "dataset_chosen", "dataset_rejected"]


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One training example of the SELM loss."""

    prompt_index: int
    prompt: Any
    chosen: Any
    rejected: Any
    ref: Any  # y_ref: a policy sample of this prompt
    chosen_score: float  # effective (after the no-EOS penalty) judge scores
    rejected_score: float
    ref_score: float  # raw judge score of y_ref (NaN if not scored)
    chosen_source: Source
    rejected_source: Source
    ref_index: int  # which policy sample is y_ref

    @property
    def margin(self) -> float:
        return self.chosen_score - self.rejected_score


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    try:
        return tuple(int(t) for t in a) == tuple(int(t) for t in b)
    except (TypeError, ValueError):
        return a is b


def _rows(values: Any, name: str, lengths: Sequence[int]) -> list[np.ndarray]:
    """A ragged [N][n_i] structure (or 2-D array) as a list of float/bool arrays, shape-checked."""
    if values is None:
        raise DataError(f"pairs: {name} is missing")
    if len(values) != len(lengths):
        raise DataError(f"pairs: {name} has {len(values)} rows for {len(lengths)} prompts")
    rows = [np.asarray(v) for v in values]
    for i, (row, n) in enumerate(zip(rows, lengths)):
        if row.shape != (n,):
            raise DataError(
                f"pairs: {name}[{i}] has shape {row.shape}; expected ({n},), one per sample"
            )
    return rows


def build_pairs(
    prompts: Sequence[Any],
    samples: Sequence[Sequence[Any]],
    scores: Sequence[Sequence[float]] | np.ndarray,
    *,
    dataset_chosen: Sequence[Any | None] | None = None,
    dataset_rejected: Sequence[Any | None] | None = None,
    dataset_scores: Sequence[Sequence[float]] | np.ndarray | None = None,
    min_margin: float = 0.0,
    no_eos_penalty: float | None = None,
    eos_flags: Sequence[Sequence[bool]] | np.ndarray | None = None,
    refresp_choice: Literal["first", "random"] = "first",
    rng: np.random.Generator | int | None = None,
    nan_policy: Literal["drop_prompt", "drop_response"] = "drop_prompt",
    refs: Sequence[Any] | None = None,
) -> tuple[list[PreferencePair], dict[str, float]]:
    """Best-vs-worst preference pairs and a stats dict; see the module docstring.

    Args:
      prompts: N prompts (any objects; carried into the pairs).
      samples: N lists of policy samples (strings or token-id sequences), n_i >= 1 each.
      scores: judge scores of the samples, same ragged shape (or an [N, n] array); NaN = unscored.
      dataset_chosen / dataset_rejected: optional N dataset responses each (None entries skip
        that prompt's candidate); ranked together with the policy samples.
      dataset_scores: [N, 2] scores of (dataset_chosen, dataset_rejected); required with either.
      min_margin: pairs whose best-minus-worst score is below this are dropped.
      no_eos_penalty: subtracted from policy samples whose ``eos_flags`` entry is False.
      eos_flags: [N][n_i] booleans, True where the sample emitted EOS; required with the penalty.
      refresp_choice: "first" (sample 0) or "random" (needs ``rng``: a Generator or an int seed).
      nan_policy: "drop_prompt" (any NaN drops the prompt) or "drop_response".
      refs: y_ref of each prompt, given by the caller (e.g. pi_ref's greedy response, as the
        SELM authors use); then ``refresp_choice`` is not used and ``ref_index`` is -1.

    Returns:
      (pairs, stats) with stats keys n_prompts, n_pairs, pair_rate, dropped_ties, dropped_margin,
      dropped_nan, nan_scores, no_eos, chosen_from_dataset, rejected_from_dataset,
      mean_sample_score, best_sample_score, mean_margin, mean_chosen_score, mean_rejected_score.
    """
    n_prompts = len(prompts)
    if len(samples) != n_prompts:
        raise DataError(f"pairs: {len(samples)} sample lists for {n_prompts} prompts")
    lengths = [len(s) for s in samples]
    for i, n in enumerate(lengths):
        if n < 1:
            raise DataError(f"pairs: prompt {i} has no policy samples")
    if not (isinstance(min_margin, (int, float)) and min_margin >= 0):
        raise ConfigError(f"pairs.min_margin: must be a number >= 0, got {min_margin!r}")
    if refresp_choice not in ("first", "random"):
        raise ConfigError(
            f"pairs.refresp_choice: must be 'first' or 'random', got {refresp_choice!r}"
        )
    if nan_policy not in ("drop_prompt", "drop_response"):
        raise ConfigError(
            f"pairs.nan_policy: must be 'drop_prompt' or 'drop_response', got {nan_policy!r}"
        )
    if no_eos_penalty is not None and not (
        isinstance(no_eos_penalty, (int, float)) and no_eos_penalty >= 0
    ):
        raise ConfigError(f"pairs.no_eos_penalty: must be a number >= 0, got {no_eos_penalty!r}")

    score_rows = [r.astype(np.float64) for r in _rows(scores, "scores", lengths)]
    eos_rows = None
    if no_eos_penalty is not None or eos_flags is not None:
        eos_rows = [r.astype(bool) for r in _rows(eos_flags, "eos_flags", lengths)]
    use_dataset = dataset_chosen is not None or dataset_rejected is not None
    ds_rows = None
    if use_dataset:
        for name, col in (
            ("dataset_chosen", dataset_chosen),
            ("dataset_rejected", dataset_rejected),
        ):
            if col is not None and len(col) != n_prompts:
                raise DataError(f"pairs: {name} has {len(col)} rows for {n_prompts} prompts")
        ds_rows = [
            r.astype(np.float64) for r in _rows(dataset_scores, "dataset_scores", [2] * n_prompts)
        ]

    if refs is not None and len(refs) != n_prompts:
        raise DataError(f"pairs: refs has {len(refs)} rows for {n_prompts} prompts")
    if refresp_choice == "random" and refs is None:
        if rng is None:
            raise ConfigError(
                "pairs.refresp_choice: 'random' needs rng (a numpy Generator or an int seed)"
            )
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        ref_idx = [int(gen.integers(n)) for n in lengths]
    else:
        ref_idx = [0] * n_prompts

    pairs: list[PreferencePair] = []
    c = dict(
        dropped_ties=0,
        dropped_margin=0,
        dropped_nan=0,
        nan_scores=0,
        no_eos=0,
        chosen_from_dataset=0,
        rejected_from_dataset=0,
    )
    sample_scores: list[float] = []
    best_scores: list[float] = []
    for i in range(n_prompts):
        raw = score_rows[i]
        eff = raw.copy()
        if eos_rows is not None:
            c["no_eos"] += int((~eos_rows[i]).sum())
            if no_eos_penalty:
                eff = np.where(eos_rows[i], eff, eff - float(no_eos_penalty))
        finite = raw[~np.isnan(raw)]
        sample_scores.extend(finite.tolist())
        if finite.size:
            best_scores.append(float(finite.max()))

        cands: list[tuple[Any, float, Source]] = [
            (samples[i][j], float(eff[j]), "policy") for j in range(lengths[i])
        ]
        if use_dataset:
            for k, (col, src) in enumerate(
                ((dataset_chosen, "dataset_chosen"), (dataset_rejected, "dataset_rejected"))
            ):
                if col is not None and col[i] is not None:
                    cands.append((col[i], float(ds_rows[i][k]), src))
        nan = [math.isnan(s) for _, s, _ in cands]
        c["nan_scores"] += sum(nan)
        if any(nan):
            if nan_policy == "drop_prompt":
                c["dropped_nan"] += 1
                continue
            cands = [x for x, bad in zip(cands, nan) if not bad]
            if len(cands) < 2:
                c["dropped_nan"] += 1
                continue
        if len(cands) < 2:
            c["dropped_ties"] += 1  # a single candidate cannot be ranked against anything
            continue
        vals = [s for _, s, _ in cands]
        b, w = int(np.argmax(vals)), int(np.argmin(vals))
        margin = vals[b] - vals[w]
        if margin <= 0 or _same(cands[b][0], cands[w][0]):
            c["dropped_ties"] += 1
            continue
        if margin < min_margin:
            c["dropped_margin"] += 1
            continue
        r = ref_idx[i] if refs is None else -1
        pair = PreferencePair(
            prompt_index=i,
            prompt=prompts[i],
            chosen=cands[b][0],
            rejected=cands[w][0],
            ref=samples[i][r] if refs is None else refs[i],
            chosen_score=vals[b],
            rejected_score=vals[w],
            ref_score=float(raw[r]) if refs is None else float("nan"),
            chosen_source=cands[b][2],
            rejected_source=cands[w][2],
            ref_index=r,
        )
        c["chosen_from_dataset"] += pair.chosen_source != "policy"
        c["rejected_from_dataset"] += pair.rejected_source != "policy"
        pairs.append(pair)

    def mean(xs: Sequence[float]) -> float:
        return float(np.mean(xs)) if len(xs) else float("nan")

    stats: dict[str, float] = {
        "n_prompts": n_prompts,
        "n_pairs": len(pairs),
        "pair_rate": len(pairs) / n_prompts if n_prompts else 0.0,
        **c,
        "mean_sample_score": mean(sample_scores),
        "best_sample_score": mean(best_scores),
        "mean_margin": mean([p.margin for p in pairs]),
        "mean_chosen_score": mean([p.chosen_score for p in pairs]),
        "mean_rejected_score": mean([p.rejected_score for p in pairs]),
    }
    return pairs, stats


def score_samples(
    judge: Judge,
    prompts: Sequence[Any],
    samples: Sequence[Sequence[Any]],
    *,
    dataset_chosen: Sequence[Any | None] | None = None,
    dataset_rejected: Sequence[Any | None] | None = None,
    decode: Callable[[Any], str] | None = None,
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Judge every policy sample (and dataset response) of every prompt in ONE ``judge.score`` call.

    One call lets an HTTP judge keep ``concurrency`` requests in flight across the whole batch,
    and puts all candidates of a prompt together (a pairwise judge ranks them against each
    other). ``decode`` turns non-string prompts / responses (token ids) into text for the judge.

    Returns ``(scores, dataset_scores)``: a list of N float arrays [n_i], and an [N, 2] array of
    (dataset_chosen, dataset_rejected) scores (NaN where absent), or None without dataset responses.
    """
    if len(samples) != len(prompts):
        raise DataError(f"pairs: {len(samples)} sample lists for {len(prompts)} prompts")

    def text(x: Any) -> Any:
        return decode(x) if decode is not None and not isinstance(x, str) else x

    flat_p: list[Any] = []
    flat_r: list[Any] = []
    sample_at: list[list[int]] = []  # flat indices of each prompt's samples
    ds_at: list[tuple[int, int, int]] = []  # (prompt, column, flat index) of dataset responses
    for i, (p, ss) in enumerate(zip(prompts, samples)):
        pt = text(p)
        sample_at.append(list(range(len(flat_p), len(flat_p) + len(ss))))
        for s in ss:
            flat_p.append(pt)
            flat_r.append(text(s))
        for k, col in enumerate((dataset_chosen, dataset_rejected)):
            if col is not None and col[i] is not None:
                ds_at.append((i, k, len(flat_p)))
                flat_p.append(pt)
                flat_r.append(text(col[i]))
    flat = judge.score(flat_p, flat_r)
    scores = [flat[idx] for idx in sample_at]
    if dataset_chosen is None and dataset_rejected is None:
        return scores, None
    ds_scores = np.full((len(prompts), 2), np.nan)
    for i, k, j in ds_at:
        ds_scores[i, k] = flat[j]
    return scores, ds_scores
