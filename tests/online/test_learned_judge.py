"""The learned reward-model judge: labels from the annotator's budget only, a reward model refitted
on all labels so far, resume without asking the annotator again, and a whole online run."""

from __future__ import annotations

import json

import chex
import jax
import numpy as np
import pytest

from jaxselm.data import tasks
from jaxselm.errors import ConfigError, JudgeError
from jaxselm.feedback import make_judge, parse_judge_config
from jaxselm.online.learned_judge import LABELS, LearnedRewardJudge

TASK = tasks.make_task("sort", min_items=3, max_items=4, max_value=9)
TOK = TASK.tokenizer()
RM = {"preset": "tiny", "hidden_size": 32, "num_layers": 1, "intermediate_size": 64}


class CountingAnnotator:
    def __init__(self):
        self.calls = 0

    def __call__(self, prompt, response):
        self.calls += 1
        return tasks.score(prompt, response)


def _config(**kw):
    return parse_judge_config(
        {
            "kind": "learned_reward_model",
            "annotator": "jaxselm.data.tasks:score",
            "labels_per_iteration": 48,
            "model": RM,
            "steps": 60,
            "batch_size": 16,
            "learning_rate": 3e-3,
            **kw,
        }
    )


def _samples(seed: int, n_prompts: int = 64):
    """Per prompt: the answer, two corruptions of it, and the answer again (a duplicate)."""
    rng = np.random.default_rng(seed)
    prompts, responses = [], []
    for ex in tasks.generate_examples(TASK, n_prompts, seed=seed):
        bad = [TASK.corrupt(ex["prompt"], ex["answer"], rng) for _ in range(2)]
        prompts.append(ex["prompt"])
        responses.append([ex["answer"], *bad, ex["answer"]])
    return prompts, responses


def test_labels_follow_the_annotator_and_the_model_learns_them(tmp_path):
    ann = CountingAnnotator()
    judge = LearnedRewardJudge(_config(), TOK, ann)
    # before any label: no information, every sample ties
    np.testing.assert_array_equal(judge.score(["sort 2 1 ="], ["1 2"]), [0.0])

    prompts, responses = _samples(0)
    judge.reset_stats()
    judge.begin_iteration(1, prompts, responses, tmp_path / "iter_01", None)
    saved = json.loads((tmp_path / "iter_01" / LABELS).read_text())
    labels = saved["labels"]
    assert 0 < len(labels) <= 48 and saved["new"] == len(labels)
    assert ann.calls == 2 * 48  # the budget: 48 pairs, two annotations each
    for r in labels:
        assert tasks.score(r["prompt"], r["chosen"]) > tasks.score(r["prompt"], r["rejected"])
        assert r["chosen"] != r["rejected"]
    st = judge.stats()
    assert st["gold_labels"] == 48 and st["gold_labels"] - st["gold_ties"] == len(labels)
    assert judge.fit_metrics["rm/accuracy"] >= 0.8  # it fits its labels (last batch of 16)

    # On 256 held-out prompts the refitted model prefers the right answer more often than not:
    # a reward model that learnt nothing would be at 0.5 +- 0.03 (one standard error); from ~45
    # labels it generalises only partly (about 0.6 here), the uncertainty this judge is for.
    hp, hr = _samples(1, 256)
    good = judge.score(hp, [r[0] for r in hr])
    bad = judge.score(hp, [r[1] for r in hr])
    print("held-out agreement", np.mean(good > bad))
    assert np.mean(good > bad) > 0.56

    # Iteration 2 adds its labels to iteration 1's.
    p2, r2 = _samples(2)
    judge.begin_iteration(2, p2, r2, tmp_path / "iter_02", tmp_path / "iter_01")
    both = json.loads((tmp_path / "iter_02" / LABELS).read_text())["labels"]
    assert both[: len(labels)] == labels and len(both) > len(labels)


def test_resume_reads_the_labels_and_refits_the_same_model(tmp_path):
    prompts, responses = _samples(3)
    first = LearnedRewardJudge(_config(), TOK, CountingAnnotator())
    first.begin_iteration(1, prompts, responses, tmp_path, None)
    items = [r for rs in responses for r in rs]
    ps = [p for p, rs in zip(prompts, responses) for _ in rs]

    ann = CountingAnnotator()
    again = LearnedRewardJudge(_config(), TOK, ann)
    again.begin_iteration(1, prompts, responses, tmp_path, None)
    assert ann.calls == 0  # the labels were read back, not asked for again
    np.testing.assert_array_equal(first.score(ps, items), again.score(ps, items))


def test_prompts_whose_samples_are_all_alike_give_no_label(tmp_path):
    ann = CountingAnnotator()
    judge = LearnedRewardJudge(_config(), TOK, ann)
    prompts, responses = _samples(4, 8)
    same = [[rs[0]] * 4 for rs in responses]
    judge.begin_iteration(1, prompts, same, tmp_path, None)
    assert ann.calls == 0 and json.loads((tmp_path / LABELS).read_text())["labels"] == []
    np.testing.assert_array_equal(judge.score(prompts, [rs[1] for rs in responses]), 0.0)


def test_config_errors_are_one_line_and_name_the_field():
    from jaxselm.config_io import load_config
    from jaxselm.online.config import RunConfig

    with pytest.raises(ConfigError, match=r"eval_judge.kind: learned_reward_model learns"):
        load_config(RunConfig, None, ["eval_judge=" + json.dumps(_config().model_dump())])
    with pytest.raises(ConfigError, match=r"eval_judge.function: must look like"):
        load_config(RunConfig, None, ['eval_judge={"kind": "programmatic", "function": "x"}'])
    with pytest.raises(ConfigError, match=r"judge.annotator: must look like"):
        _config(annotator="not a spec")
    with pytest.raises(ConfigError, match=r"judge.model: .*vocab_size: taken from the run"):
        _config(model={"preset": "tiny", "vocab_size": 10})
    with pytest.raises(ConfigError, match=r"judge.model: .*num_heads"):
        LearnedRewardJudge(_config(model={"preset": "tiny", "num_heads": 3}), TOK, lambda p, r: 0)
    with pytest.raises(JudgeError, match="judge.annotator"):
        LearnedRewardJudge.from_config(_config(annotator="jaxselm.data.tasks:no_such"), TOK)
    with pytest.raises(JudgeError, match="online loop builds it"):
        make_judge(_config())
    with pytest.raises(ConfigError, match=r"judge.model: with init: policy .*leave model out"):
        _config(init="policy")
    with pytest.raises(ConfigError, match=r"judge.init: policy needs the run's model"):
        LearnedRewardJudge(_config(init="policy", model=None), TOK, lambda p, r: 0)
    # a dumped run config (what run.json / config.json hold) loads back
    again = parse_judge_config(_config(init="policy", model=None).model_dump())
    assert again.init == "policy" and again.model is None


def test_init_policy_starts_from_the_policy_trunk(tmp_path):
    """``init: policy``: the reward model is the policy's architecture, starts from its trunk
    (LM head dropped) under the seeded score head, and the same start every iteration."""
    from jaxselm.model import ModelConfig, init_params
    from jaxselm.train.checkpoint import save_params

    policy_model = ModelConfig(**{**RM, "vocab_size": TOK.vocab_size})
    policy = init_params(policy_model, jax.random.key(3))
    save_params(tmp_path / "policy", policy, model_config=policy_model)
    cfg = _config(init="policy", model=None)
    judge = LearnedRewardJudge(cfg, TOK, CountingAnnotator(), policy_model=policy_model)
    prompts, responses = _samples(5)
    judge.begin_iteration(1, prompts, responses, tmp_path / "i1", None, tmp_path / "policy")
    start = judge._start
    trunk = {k: v for k, v in policy.items() if k != "lm_head"}
    chex.assert_trees_all_equal({k: v for k, v in start.items() if k != "score"}, trunk)
    fresh = init_params(policy_model, jax.random.key(cfg.seed), head="reward")
    chex.assert_trees_all_equal(start["score"], fresh["score"])
    assert judge.fit_metrics["rm/accuracy"] >= 0.8  # it fits its labels
    judge.begin_iteration(2, *_samples(6), tmp_path / "i2", tmp_path / "i1", tmp_path / "policy")
    assert judge._start is start  # loaded once: every refit starts from the same params


@pytest.mark.slow
def test_online_run_with_the_learned_judge(tmp_path):
    """Two iterations of the tiny demo with the learned judge: each iteration's labels on disk,
    cumulative; the judge's counters in the metrics; a second call resumes without re-asking."""
    from jaxselm.config_io import load_config
    from jaxselm.online import run_online
    from jaxselm.online.config import RunConfig

    overrides = [
        f"run.output_dir={tmp_path / 'run'}",
        "run.progress=false",
        "run.tensorboard=false",
        "online.iterations=2",
        "online.learning_rates=3.0e-4",
        "online.prompts_per_iteration=16",
        "sft.steps=20",
        "data.num_eval_prompts=16",
        # init: policy, the study's choice (and the path through the loop's policy_dir)
        "judge="
        + json.dumps(
            {
                **_config(init="policy", model=None).model_dump(),
                "labels_per_iteration": 8,
                "steps": 30,
            }
        ),
        'eval_judge={"kind": "programmatic", "function": "jaxselm.data.tasks:score"}',
    ]
    cfg = load_config(RunConfig, "configs/demo.yaml", overrides)
    assert run_online(cfg, log=lambda *a: None) == 0
    run = tmp_path / "run"
    l1 = json.loads((run / "iter_01" / LABELS).read_text())["labels"]
    l2 = json.loads((run / "iter_02" / LABELS).read_text())["labels"]
    assert 0 < len(l1) < len(l2) and l2[: len(l1)] == l1
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    it = [r for r in recs if r.get("kind") == "iteration" and r.get("iteration") == 2][-1]
    assert it["samples/judge_gold_labels"] == 8
    assert it["samples/judge_rm_labels"] == len(l2) and "samples/judge_rm_fit_accuracy" in it
    # the evaluation is the verifier's (eval_judge): accuracies are exact-answer rates, the
    # reward its graded score in [0, 1] (the learned model's scores are unbounded)
    ev = json.loads((run / "iter_02" / "eval.json").read_text())
    prompts = json.loads((run / "iter_02" / "eval_prompts" / "part-00000.json").read_text())
    assert 0.0 <= it["eval/reward"] <= 1.0
    want = np.mean([tasks.score(p["prompt"], r) for p, r in zip(prompts, ev["responses"])])
    np.testing.assert_allclose(it["eval/reward"], want, rtol=1e-9)
    before = (run / "metrics.jsonl").read_text()
    assert run_online(cfg, log=lambda *a: None) == 0  # finished: nothing is redone
    assert (run / "metrics.jsonl").read_text() == before
