"""The online data path, unit by unit, on a hand-written judge output: judge.json's pairs ->
PairSet -> training batches (which response is chosen, rejected and y_ref in every row; masks),
reference log-probs aligned with the shuffled rows the train step sees, and the evaluation KL.

Every expectation is computed here independently: token lists written by hand, log-probs from
one plain forward per sequence. Log-probs are float32 sums over a few tokens of a tiny model,
computed in different batch shapes: they agree to ~1e-6; 1e-5 is the tolerance (a row taken from
the wrong pair differs by whole nats).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxselm.config_io import load_config
from jaxselm.data.packing import take_rows
from jaxselm.model import forward, init_params
from jaxselm.online import phases
from jaxselm.online.config import RunConfig
from jaxselm.online.context import RunContext
from jaxselm.online.evaluation import _kl
from jaxselm.online.metrics import MetricsWriter
from jaxselm.online.pairs import PairSet
from jaxselm.online.phases import sequence_logprobs
from jaxselm.online.rollout import rollout

TOL = 1e-5
PAD = 0
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
SAMPLES = [[20, 21], [22], [23, 24, 25], [26, 27], [28], [29, 30, 31]]  # 2 per prompt
DATASET_TEXT = "\x03\x04"  # a dataset response (text), encoded below as [3, 4]
# What a judge writes: best vs worst per prompt, y_ref by sample index (or a dataset text).
JUDGED = [
    {"prompt_index": 2, "chosen": 5, "rejected": 4, "refresp": 4},
    {"prompt_index": 0, "chosen": DATASET_TEXT, "rejected": 1, "refresp": 0},
    {"prompt_index": 1, "chosen": 2, "rejected": 3, "refresp": 3},
]


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("datapath")
    cfg = tmp / "run.yaml"
    cfg.write_text(
        f"run: {{output_dir: {tmp / 'run'}, progress: false}}\n"
        "model: {preset: tiny}\n"
        "data: {source: task, task: sort, num_eval_prompts: 4}\n"
        "online: {batch_size: 2, max_new_tokens: 4, generation_batch_size: 4}\n"
        "judge: {kind: programmatic, function: 'jaxselm.data.tasks:score'}\n"
        "mesh: {data: -1}\n"
    )
    return RunContext.create(load_config(RunConfig, cfg))


@pytest.fixture(scope="module")
def params(ctx):
    return init_params(ctx.model, jax.random.key(0))


def direct_logprob(params, cfg, prompt, response) -> float:
    """log pi(response | prompt) from one forward over prompt + response (no padding)."""
    seq = jnp.asarray([prompt + response], jnp.int32)
    logp = jax.nn.log_softmax(forward(params, cfg, seq)[0, :-1], axis=-1)
    return float(sum(logp[len(prompt) - 1 + i, tok] for i, tok in enumerate(response)))


def test_batches_hold_the_judged_responses_in_every_row():
    pairs = PairSet(JUDGED, PROMPTS, SAMPLES, encode, PAD)
    rows = np.array([2, 0, 1, 0])  # shuffled, with a repeat (the last batch wraps around)
    batch = pairs.batch(rows)
    want = {
        "chosen": [SAMPLES[5], [3, 4], SAMPLES[2]],
        "rejected": [SAMPLES[4], SAMPLES[1], SAMPLES[3]],
        "refresp": [SAMPLES[4], SAMPLES[0], SAMPLES[3]],
    }
    prompts = [PROMPTS[2], PROMPTS[0], PROMPTS[1]]
    for name, responses in want.items():
        seqs = getattr(batch, name)
        for b, row in enumerate(rows):
            p, r = prompts[row], responses[row]
            n = len(p) + len(r)
            np.testing.assert_array_equal(seqs.tokens[b, :n], p + r, err_msg=f"{name} {b}")
            assert (seqs.tokens[b, n:] == PAD).all()
            np.testing.assert_array_equal(seqs.mask[b], np.arange(seqs.mask.shape[1]) < n)
            loss = np.zeros(seqs.mask.shape[1], bool)
            loss[len(p) : n] = True  # the response's tokens only, never the prompt's
            np.testing.assert_array_equal(seqs.loss_mask[b].astype(bool), loss)
    # Without y_ref (DPO / IPO) the batch carries no third response.
    assert pairs.batch(rows, ("chosen", "rejected")).refresp is None


def test_reference_logprobs_follow_the_shuffled_rows(ctx, params):
    pairs = PairSet(JUDGED, PROMPTS, SAMPLES, encode, PAD)
    ref = sequence_logprobs(ctx, params, pairs, ("chosen", "rejected", "refresp"))
    want = {
        "chosen": [SAMPLES[5], [3, 4], SAMPLES[2]],
        "rejected": [SAMPLES[4], SAMPLES[1], SAMPLES[3]],
        "refresp": [SAMPLES[4], SAMPLES[0], SAMPLES[3]],
    }
    prompts = [PROMPTS[2], PROMPTS[0], PROMPTS[1]]
    direct = {
        k: np.array([direct_logprob(params, ctx.model, p, r) for p, r in zip(prompts, v)])
        for k, v in want.items()
    }
    for k in want:
        np.testing.assert_allclose(getattr(ref, k), direct[k], atol=TOL, rtol=0, err_msg=k)
    rows = np.array([1, 2, 0, 2])  # what the train step's batch_at takes for one batch
    taken = take_rows(ref, rows)
    for k in want:
        np.testing.assert_allclose(getattr(taken, k), direct[k][rows], atol=TOL, rtol=0)


def test_eval_kl_is_the_mean_log_ratio_of_the_samples(ctx, params):
    """At temperature 1 (every importance weight 1) the evaluation KL is the plain mean over
    samples of log pi(y|x) - log pi_ref(y|x), each term computed here by direct forwards; and
    it is 0 against the policy itself."""
    recs = [{"prompt_ids": p} for p in PROMPTS]
    gen, _ = rollout(
        ctx,
        params,
        len(recs),
        lambda pos: [recs[int(i)] for i in pos],
        key=jax.random.key(3),
        n=1,
        greedy=False,
        temperature=1.0,
        desc="kl",
    )
    responses = gen.responses()
    valid = np.ones(len(recs), bool)
    ref_params = init_params(ctx.model, jax.random.key(1))
    pol = [direct_logprob(params, ctx.model, p, r) for p, r in zip(PROMPTS, responses)]
    ref = [direct_logprob(ref_params, ctx.model, p, r) for p, r in zip(PROMPTS, responses)]
    np.testing.assert_allclose(gen.logprobs[:, 0].sum(-1), pol, atol=TOL, rtol=0)
    kl = _kl(ctx, gen, responses, ref_params, valid)
    assert kl == pytest.approx(float(np.mean(np.array(pol) - np.array(ref))), abs=TOL)
    assert _kl(ctx, gen, responses, params, valid) == pytest.approx(0.0, abs=TOL)


def test_train_phase_compiles_once_across_iterations(tmp_path, params):
    # Each iteration has its own learning rate, alpha and length (steps); the step is built and
    # compiled once per run (alpha and the schedule are call-time inputs), and alpha = 0 drops
    # y_ref from the reference pass and the batches.
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"run: {{output_dir: {tmp_path / 'run'}, progress: false, tensorboard: false}}\n"
        "model: {preset: tiny}\n"
        "data: {source: task, task: sort, num_eval_prompts: 4}\n"
        "online: {iterations: 3, batch_size: 2, max_new_tokens: 4, generation_batch_size: 4,\n"
        "  learning_rates: [1.0e-3, 5.0e-4, 2.0e-4], alphas: [1.0e-3, 0.1, 0.0], epochs: 1}\n"
        "judge: {kind: programmatic, function: 'jaxselm.data.tasks:score'}\n"
        "mesh: {data: -1}\n"
    )
    ctx = RunContext.create(load_config(RunConfig, cfg))
    ctx.metrics = MetricsWriter(tmp_path / "run", tensorboard=False)
    pairs = PairSet(JUDGED, PROMPTS, SAMPLES, encode, PAD)
    steps = []
    for t in (1, 2, 3):
        ref = phases.reference(ctx, t, pairs, params)
        assert (ref.refresp is None) == (t == 3)
        start = jax.tree.map(jnp.copy, params)
        phases.train(ctx, t, pairs, ref, start)
        # pi_ref's buffers became the train state's (donated): no second copy while training.
        assert all(x.is_deleted() for x in jax.tree.leaves(start))
        steps.append(ctx.preference_step(phases.train_config(ctx, t)))
    assert steps[0] is steps[1] and steps[0].compilations == 1
    assert steps[2] is not steps[0] and steps[2].compilations == 1  # pairs only
    assert not phases.greedy_refresp(ctx, 3) and phases.greedy_refresp(ctx, 1)
