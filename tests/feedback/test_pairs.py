"""build_pairs / score_samples: best-vs-worst selection, drops and counts, y_ref, penalties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxselm.errors import ConfigError, DataError
from jaxselm.feedback import ProgrammaticJudge, build_pairs, score_samples


def test_best_becomes_chosen_worst_rejected_and_ref_is_first_sample():
    prompts = ["p0", "p1"]
    samples = [["a", "b", "c"], [(1, 2), (3,), (4, 5, 6)]]  # strings or token-id tuples
    scores = [[0.2, 0.9, 0.1], [0.5, -1.0, 2.0]]
    pairs, st = build_pairs(prompts, samples, scores)
    assert [(p.prompt_index, p.chosen, p.rejected, p.ref) for p in pairs] == [
        (0, "b", "c", "a"),
        (1, (4, 5, 6), (3,), (1, 2)),
    ]
    assert (
        pairs[0].chosen_score == 0.9
        and pairs[0].rejected_score == 0.1
        and pairs[0].ref_score == 0.2
    )
    assert pairs[1].margin == 3.0 and pairs[1].ref_index == 0
    assert all(p.chosen_source == p.rejected_source == "policy" for p in pairs)
    assert st["n_prompts"] == 2 and st["n_pairs"] == 2 and st["pair_rate"] == 1.0
    np.testing.assert_allclose(st["mean_sample_score"], np.mean([0.2, 0.9, 0.1, 0.5, -1.0, 2.0]))
    np.testing.assert_allclose(st["best_sample_score"], (0.9 + 2.0) / 2)
    np.testing.assert_allclose(st["mean_margin"], (0.8 + 3.0) / 2)
    np.testing.assert_allclose(st["mean_chosen_score"], (0.9 + 2.0) / 2)
    assert st["dropped_ties"] == st["dropped_margin"] == st["dropped_nan"] == 0


def test_ties_and_margins_below_threshold_are_dropped_and_counted():
    samples = [["a", "b"], ["c", "d"], ["e", "f"], ["g", "h"], ["i", "i"]]
    scores = np.array([[1.0, 1.0], [1.0, 1.05], [0.0, 1.0], [0.3, 0.0], [0.0, 1.0]])
    pairs, st = build_pairs(list("pqrst"), samples, scores, min_margin=0.1)
    assert [p.prompt_index for p in pairs] == [2, 3]
    # exact tie (0) and identical responses with different scores (4) are ties; 1 is below margin
    assert st["dropped_ties"] == 2 and st["dropped_margin"] == 1 and st["n_pairs"] == 2
    # with no threshold the small margin is kept, ties still are not
    pairs, st = build_pairs(list("pqrst"), samples, scores)
    assert [p.prompt_index for p in pairs] == [1, 2, 3] and st["dropped_ties"] == 2


def test_nan_scores_drop_the_prompt_or_the_response():
    samples = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]]
    scores = [[0.1, np.nan, 0.9], [0.5, 0.2, 0.4], [np.nan, np.nan, 0.3]]
    pairs, st = build_pairs(["p", "q", "r"], samples, scores)
    assert [p.prompt_index for p in pairs] == [1]
    assert st["dropped_nan"] == 2 and st["nan_scores"] == 3
    np.testing.assert_allclose(st["mean_sample_score"], np.mean([0.1, 0.9, 0.5, 0.2, 0.4, 0.3]))
    pairs, st = build_pairs(["p", "q", "r"], samples, scores, nan_policy="drop_response")
    assert [(p.prompt_index, p.chosen, p.rejected) for p in pairs] == [(0, "c", "a"), (1, "d", "e")]
    assert st["dropped_nan"] == 1  # r has a single scored response left
    # y_ref needs no score: a NaN-scored first sample is still the reference
    pairs, _ = build_pairs(
        ["r"], [["g", "h", "i"]], [[np.nan, 0.0, 0.3]], nan_policy="drop_response"
    )
    assert pairs[0].ref == "g" and math.isnan(pairs[0].ref_score)


def test_dataset_responses_are_ranked_with_policy_samples():
    samples = [["s0", "s1"], ["t0", "t1"], ["u0", "u1"]]
    scores = [[0.5, 0.4], [0.5, 0.4], [0.5, 0.4]]
    ds_scores = np.array([[0.9, 0.1], [0.45, 0.42], [np.nan, 0.0]])
    pairs, st = build_pairs(
        ["p", "q", "r"],
        samples,
        scores,
        dataset_chosen=["C0", "C1", None],
        dataset_rejected=["R0", "R1", "R2"],
        dataset_scores=ds_scores,
    )
    got = [(p.chosen, p.chosen_source, p.rejected, p.rejected_source, p.ref) for p in pairs]
    assert got == [
        ("C0", "dataset_chosen", "R0", "dataset_rejected", "s0"),
        ("t0", "policy", "t1", "policy", "t0"),  # dataset responses in between: policy pair
        ("u0", "policy", "R2", "dataset_rejected", "u0"),  # no dataset chosen for r: NaN ignored
    ]
    assert (
        st["chosen_from_dataset"] == 1
        and st["rejected_from_dataset"] == 2
        and st["dropped_nan"] == 0
    )
    # the sample-score stats describe the policy only
    np.testing.assert_allclose(st["best_sample_score"], 0.5)
    with pytest.raises(DataError, match="dataset_scores is missing"):
        build_pairs(["p"], [["a"]], [[1.0]], dataset_chosen=["c"])
    # a single policy sample is enough once the dataset supplies a second candidate
    pairs, _ = build_pairs(
        ["p"], [["a"]], [[1.0]], dataset_rejected=["r"], dataset_scores=[[np.nan, 0.0]]
    )
    assert (pairs[0].chosen, pairs[0].rejected, pairs[0].ref) == ("a", "r", "a")


def test_no_eos_penalty_demotes_truncated_samples():
    samples = [["long", "short", "mid"]]
    scores = [[1.0, 0.8, 0.5]]
    eos = [[False, True, True]]
    pairs, st = build_pairs(["p"], samples, scores, no_eos_penalty=1.0, eos_flags=eos)
    assert (pairs[0].chosen, pairs[0].rejected) == ("short", "long")
    assert pairs[0].rejected_score == 0.0 and st["no_eos"] == 1
    np.testing.assert_allclose(st["best_sample_score"], 1.0)  # raw judge reward, before the penalty
    pairs, _ = build_pairs(["p"], samples, scores)
    assert (pairs[0].chosen, pairs[0].rejected) == ("long", "mid")
    with pytest.raises(DataError, match="eos_flags is missing"):
        build_pairs(["p"], samples, scores, no_eos_penalty=1.0)


def test_random_ref_is_a_seeded_policy_sample():
    n_prompts, n = 40, 4
    samples = [[f"x{i}_{j}" for j in range(n)] for i in range(n_prompts)]
    scores = np.tile(np.arange(n, dtype=float), (n_prompts, 1))
    dc = [f"C{i}" for i in range(n_prompts)]
    kw = dict(
        dataset_chosen=dc, dataset_scores=np.full((n_prompts, 2), 10.0), refresp_choice="random"
    )
    a, _ = build_pairs(list(range(n_prompts)), samples, scores, rng=7, **kw)
    b, _ = build_pairs(list(range(n_prompts)), samples, scores, rng=np.random.default_rng(7), **kw)
    c, _ = build_pairs(list(range(n_prompts)), samples, scores, rng=8, **kw)
    refs = [p.ref for p in a]
    assert refs == [p.ref for p in b] and refs != [p.ref for p in c]
    assert all(p.ref == samples[p.prompt_index][p.ref_index] for p in a)  # never a dataset response
    assert len({p.ref_index for p in a}) > 1
    with pytest.raises(ConfigError, match="needs rng"):
        build_pairs(["p"], [["a", "b"]], [[0.0, 1.0]], refresp_choice="random")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(scores=[[1.0]]), DataError, r"scores\[0\] has shape \(1,\)"),
        (dict(samples=[[]], scores=[[]]), DataError, "prompt 0 has no policy samples"),
        (dict(min_margin=-1.0), ConfigError, r"^pairs\.min_margin"),
        (dict(refresp_choice="last"), ConfigError, r"^pairs\.refresp_choice"),
        (
            dict(no_eos_penalty=-0.5, eos_flags=[[True, True]]),
            ConfigError,
            r"^pairs\.no_eos_penalty",
        ),
    ],
)
def test_bad_inputs_raise(kwargs, error, match):
    args = dict(prompts=["p"], samples=[["a", "b"]], scores=[[0.0, 1.0]])
    args.update(kwargs)
    with pytest.raises(error, match=match):
        build_pairs(args.pop("prompts"), args.pop("samples"), args.pop("scores"), **args)


class CountingJudge(ProgrammaticJudge):
    def __init__(self):
        super().__init__(lambda p, r: float(len(r)) if r != "?" else math.nan, name="len")
        self.batches = []

    def _score(self, prompts, responses):
        self.batches.append(list(zip(prompts, responses)))
        return super()._score(prompts, responses)


def test_score_samples_judges_everything_in_one_call():
    judge = CountingJudge()
    prompts = [(7, 8), "q"]
    samples = [[(1, 2, 3), (4,)], ["xx", "?", "y"]]

    def decode(ids):
        return "".join(chr(96 + i) for i in ids)

    scores, ds = score_samples(
        judge, prompts, samples, dataset_chosen=["abcd", None], decode=decode
    )
    assert len(judge.batches) == 1 and judge.batches[0][0] == ("gh", "abc")
    np.testing.assert_array_equal(scores[0], [3.0, 1.0])
    np.testing.assert_array_equal(scores[1][[0, 2]], [2.0, 1.0])
    assert math.isnan(scores[1][1])
    assert ds.shape == (2, 2) and ds[0, 0] == 4.0 and np.isnan(ds[0, 1]) and np.isnan(ds[1]).all()
    pairs, st = build_pairs(
        prompts,
        samples,
        scores,
        dataset_chosen=["abcd", None],
        dataset_scores=ds,
        nan_policy="drop_response",
    )
    assert [(p.chosen, p.rejected) for p in pairs] == [("abcd", (4,)), ("xx", "y")]
    assert st["nan_scores"] == 1
    scores, ds = score_samples(judge, ["p"], [["a", "bb"]])
    assert ds is None and scores[0].tolist() == [1.0, 2.0]
