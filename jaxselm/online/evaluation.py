"""The evaluation phase: how good the policy after iteration t is, on fixed held-out prompts.

Scores come from ``eval_judge`` when the run config names one, else from the judge.

* greedy responses: the judge's reward (``eval/reward``), exact-answer accuracy (``eval/accuracy``,
  score 1 from a verifier), length and diversity, and the win rate against iteration t-1's
  greedy responses to the same prompts (``eval/win_rate``);
* one sample per prompt at ``online.temperature``, the distribution the loop samples from (what
  the preference updates move): ``eval/sample_reward``, ``eval/sample_accuracy``,
  ``eval/sample_win_rate``, and KL(pi || pi_ref) ~ E_y~pi[log pi(y|x) - log pi_ref(y|x)]
  (``eval/kl``, importance-weighted when that temperature is not 1);
* for t > 0, the iteration's generation/judging statistics (``samples/*``) and the means of its
  training metrics (``train/*``), so the iteration record summarises the whole iteration.

It writes ``iter_t/eval.json`` (the record and the responses, which iteration t+1 compares
against) and appends the record to the metrics file. The judge runs on process 0; the other
processes generate their rows and wait.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxselm import metric_names as M
from jaxselm.files import read_json
from jaxselm.online.context import RunContext
from jaxselm.online.metrics import distinct_n
from jaxselm.online.pairs import PairSet
from jaxselm.online.phases import judge_stats, sequence_logprobs
from jaxselm.online.rollout import Generation, rollout, share_records, shared_records
from jaxselm.parallel.multihost import is_primary
from jaxselm.preemption import fault_point

EVAL = "eval.json"
CORRECT = 1.0 - 1e-9  # a verifier's score of a right answer (1.0, up to float rounding)


def evaluate(ctx: RunContext, t: int, params: Any, ref_params: Any | None) -> dict[str, Any]:
    """Evaluate the policy after iteration t (``ref_params``: pi_ref of iteration t, for the KL;
    None for t = 0); writes eval.json and the metrics record, and returns the record."""
    count = ctx.prompts.evaluation_size()
    key = jax.random.fold_in(jax.random.fold_in(ctx.key, t), 2)
    greedy, recs = rollout(
        ctx,
        params,
        count,
        ctx.prompts.evaluation,
        key=key,
        n=1,
        greedy=True,
        temperature=1.0,
        desc=f"iter {t} eval",
    )
    folder = ctx.iter_dir(t) / "eval_prompts"
    share_records(folder, recs)
    # The texts the judge reads (process 0 only; the others' rows are NaN, never written), and
    # which prompts count (those skipped as too long, data.long_prompts: skip, do not).
    shared = shared_records(folder, count) if is_primary() else [{"prompt": ""}] * count
    prompts = [r["prompt"] for r in shared]
    valid = np.array([not r.get("skipped") for r in shared])
    resp = greedy.responses()
    texts = [ctx.text(r) for r in resp]
    scores = _scores(ctx, prompts, texts, valid)
    row: dict[str, Any] = {
        M.EVAL_REWARD: _mean(scores),
        M.EVAL_ACCURACY: _accuracy(scores, valid),
        M.EVAL_LENGTH: float(np.mean([len(r) for r, ok in zip(resp, valid) if ok] or [0])),
        M.EVAL_DISTINCT_2: distinct_n(resp, 2),
    }
    sampled, _ = rollout(
        ctx,
        params,
        count,
        lambda pos: [recs[int(i)] for i in pos],
        key=jax.random.fold_in(key, 1),
        n=1,
        greedy=False,
        temperature=ctx.cfg.online.temperature,
        desc=f"iter {t} sample",
    )
    s_resp = sampled.responses()
    s_texts = [ctx.text(r) for r in s_resp]
    s_scores = _scores(ctx, prompts, s_texts, valid)
    row[M.EVAL_SAMPLE_REWARD] = _mean(s_scores)
    row[M.EVAL_SAMPLE_ACCURACY] = _accuracy(s_scores, valid)
    if t > 0:  # against the previous iteration's policy, on the same prompts
        prev = read_json(ctx.iter_dir(t - 1) / EVAL)
        for name, cur, old in (
            (M.EVAL_WIN_RATE, texts, prev["responses"]),
            (M.EVAL_SAMPLE_WIN_RATE, s_texts, prev.get("sampled_responses")),
        ):
            if old is not None:
                wins = np.full(len(prompts), np.nan)
                if is_primary() and valid.any():
                    rows = np.flatnonzero(valid)
                    wins[rows] = ctx.evaluator.compare_batch(
                        [prompts[i] for i in rows], [cur[i] for i in rows], [old[i] for i in rows]
                    )
                row[name] = _mean(wins)
        row[M.EVAL_KL] = _kl(ctx, sampled, s_resp, ref_params, valid)
        row.update(judge_stats(ctx, t))
        row.update(train_summary(ctx, t))
    fault_point(f"iter{t}/eval")
    ctx.write_json(
        ctx.iter_dir(t) / EVAL, {"metrics": row, "responses": texts, "sampled_responses": s_texts}
    )
    ctx.metrics.write("iteration", t, row, iteration=t)
    return row


def evaluation_record(ctx: RunContext, t: int) -> dict[str, Any]:
    """The record of an evaluation done before (eval.json)."""
    return read_json(ctx.iter_dir(t) / EVAL)["metrics"]


def train_summary(ctx: RunContext, t: int) -> dict[str, float]:
    """Means of iteration t's training metrics (``train/loss``, ``train/rewards_accuracies``...)."""
    steps = [r for r in ctx.metrics.read("train") if r.get("iteration") == t]
    out = {}
    for name in M.TRAIN_SUMMARY:
        vals = [r[name] for r in steps if r.get(name) is not None]
        if vals:
            out[M.train_summary_name(name)] = float(np.mean(vals))
    return out


def _kl(
    ctx: RunContext, sampled: Generation, responses: list[list[int]], ref_params, valid: np.ndarray
) -> float | None:
    """KL(pi || pi_ref) = E_y~pi[log pi(y|x) - log pi_ref(y|x)], from the evaluation samples.

    They are drawn at ``online.temperature``, so each is weighted by pi(y) / pi_T(y)
    (self-normalised importance sampling); at temperature 1 every weight is exactly 1 and this
    is the plain mean.
    """
    logp_pol = sampled.logprobs[:, 0].sum(-1)
    log_w = logp_pol - sampled.sampling_logprobs[:, 0].sum(-1)
    rows = PairSet.of_sequences(sampled.prompt_ids(), responses, ctx.pad_id)
    logp_ref = sequence_logprobs(ctx, ref_params, rows, ("chosen",)).chosen
    if not valid.any():
        return None
    w = np.exp(log_w[valid] - log_w[valid].max())
    return float(np.sum(w * (logp_pol - logp_ref)[valid]) / np.sum(w))


def _scores(ctx: RunContext, prompts: list[str], texts: list[str], valid: np.ndarray) -> np.ndarray:
    """Judge scores of the valid rows, on process 0; NaN elsewhere (the other processes'
    evaluation rows are never written)."""
    out = np.full(len(texts), np.nan)
    if is_primary() and valid.any():
        rows = np.flatnonzero(valid)
        out[rows] = ctx.evaluator.score([prompts[i] for i in rows], [texts[i] for i in rows])
    return out


def _accuracy(scores: np.ndarray, valid: np.ndarray) -> float | None:
    """Fraction of the valid rows a verifier scored right (NaN: wrong)."""
    return float(np.mean(scores[valid] >= CORRECT)) if valid.any() else None


def _mean(x: np.ndarray) -> float | None:
    return float(np.nanmean(x)) if np.isfinite(x).any() else None
