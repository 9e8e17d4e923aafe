"""The sharded train steps on 8 host CPU devices, with the real model (tiny preset).

- the SELM step gives the same loss, metrics and updated params on one device and on meshes
  (8,1,1), (2,4,1), (2,2,2), and lays params / optimizer state out as the rule table says;
- its gradient norm and updated params equal jax.grad of the directly computed loss followed by
  the optimizer's update;
- gradient accumulation over 4 micro-batches equals one big batch;
- reference log-probs (micro-batched, sharded) equal a direct forward;
- DPO / IPO / XPO, SFT and reward-model steps compute their loss from the model's outputs;
- bf16 compute keeps fp32 master weights.

Tolerance for cross-mesh / accumulation comparisons: every quantity is float32 and the only
differences are the order of reductions (psum over shards, micro-batch sums): a few ulps, ~1e-6
relative, so gradients differ by delta <~ 1e-7 absolute and metrics (log-probs ~ -40) by ~1e-5.
Adam's update lr * g / (|g| + eps) amplifies a gradient error by up to lr / eps where g ~ 0, so
the test optimizer uses eps = 1e-3 (not 1e-8, which would turn 1e-9 noise on a vanishing
gradient into a 1e-3 parameter change): params then agree to lr * delta / eps ~ 1e-6.
rtol 1e-5 / atol 2e-5 allows that and catches any real sharding mistake (a dropped shard or a
double-counted micro-batch changes log-probs by whole nats and params by ~lr = 1e-2).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxselm.data.packing import LogProbs, PreferenceBatch, Sequences, SFTBatch
from jaxselm.errors import ConfigError
from jaxselm.model import forward, get_preset, init_params, reward_scores
from jaxselm.parallel import make_mesh, single_device_mesh
from jaxselm.train import (
    OptimizerConfig,
    TrainConfig,
    create_train_state,
    init_train_state,
    make_optimizer,
    make_preference_step,
    make_reference_fn,
    make_reward_model_step,
    make_sft_step,
    policy_logprobs,
    shard_train_state,
)
from jaxselm.train import losses as L
from jaxselm.train.step import preference_hyper, responses_for

RTOL, ATOL = 1e-5, 2e-5
CFG = get_preset("tiny")
B, T = 8, 10
OPT = OptimizerConfig(
    learning_rate=1e-2, total_steps=10, warmup_steps=0, schedule="constant", eps=1e-3
)
TRAIN = TrainConfig(loss="selm", beta=0.1, alpha=0.05, optimizer=OPT)
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]


def make_batch(seed: int, batch: int = B, length: int = T) -> PreferenceBatch:
    """Preference rows with varied prompt/response lengths; even rows right-, odd left-padded."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name in ("chosen", "rejected", "refresp"):
        tokens = np.zeros((batch, length), np.int32)
        mask = np.zeros((batch, length), np.int32)
        loss_mask = np.zeros((batch, length), np.int32)
        for b in range(batch):
            p = int(rng.integers(1, 4))
            r = int(rng.integers(2, length - p + 1))
            start = 0 if b % 2 == 0 else length - p - r
            tokens[b, start : start + p + r] = rng.integers(1, CFG.vocab_size, p + r)
            mask[b, start : start + p + r] = 1
            loss_mask[b, start + p : start + p + r] = 1
        out[name] = Sequences(tokens=tokens, mask=mask, loss_mask=loss_mask)
    return PreferenceBatch(**out)


# Eager flax applies are slow (every op dispatched); reference computations run jitted.
init_jit = jax.jit(init_params, static_argnums=0, static_argnames="head")
policy_logprobs_jit = jax.jit(policy_logprobs, static_argnums=(1, 3))


@jax.jit
def direct_ref_logprobs(params, batch):
    """Per-response forward + sequence_logprobs, one response at a time (no interleaving)."""
    out = {}
    for name in ("chosen", "rejected", "refresp"):
        seqs = getattr(batch, name)
        logits = forward(params, CFG, seqs.tokens, seqs.mask)
        out[name] = L.sequence_logprobs(logits, seqs.tokens, seqs.loss_mask)
    return LogProbs(**out)


def mesh_of(shape):
    return single_device_mesh() if shape is None else make_mesh(shape)


def to_np(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module")
def batch():
    return make_batch(0)


@pytest.fixture(scope="module")
def params0():
    return init_jit(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def pol0(params0, batch):
    """Policy log-probs of the initial params (what the first step's loss is made of)."""
    return to_np(policy_logprobs_jit(params0, CFG, batch, ("chosen", "rejected", "refresp")))


@pytest.fixture(scope="module")
def runs(batch, params0):
    """Two SELM steps per mesh: {shape: dict(ref, metrics1, params1, metrics2, params2, specs)}."""
    tx = make_optimizer(OPT)
    ref_params = init_jit(CFG, jax.random.key(1))
    ref = make_reference_fn(CFG, make_mesh((2, 2, 2)))(ref_params, batch)
    # numpy leaves: device_put copies them (jax arrays already on device 0 would be aliased by
    # the one-device placement and then deleted by the step's donation).
    host_state = to_np(create_train_state(params0, tx))
    out = {}
    for shape in [None, *MESHES]:
        mesh = mesh_of(shape)
        if shape == (2, 4, 1):  # initialised in place, sharded; the others placed from host
            state = init_train_state(CFG, tx, jax.random.key(0), mesh)
            chex.assert_trees_all_equal(to_np(state), host_state)
        else:
            state = shard_train_state(host_state, CFG, tx, mesh)
        step = make_preference_step(CFG, TRAIN, tx, mesh)
        state, m1 = step(state, batch.replace(ref_logps=ref))
        params1 = to_np(state.params)
        state, m2 = step(state, batch.replace(ref_logps=ref))
        out[shape] = dict(
            ref=to_np(ref),
            metrics1=to_np(m1),
            params1=params1,
            metrics2=to_np(m2),
            params2=to_np(state.params),
            step=int(state.step),
            specs=jax.tree.map(lambda x: x.sharding.spec, state.params),
            opt_specs=jax.tree.map(lambda x: x.sharding.spec, state.opt_state),
            metric_shardings={k: v.sharding for k, v in m2.items()},
        )
    return out


@pytest.mark.parametrize("shape", MESHES)
def test_selm_step_same_on_every_mesh(runs, shape):
    base, got = runs[None], runs[shape]
    for key in ("metrics1", "metrics2"):
        assert set(got[key]) == set(base[key])
        chex.assert_trees_all_close(got[key], base[key], rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_close(got["params1"], base["params1"], rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_close(got["params2"], base["params2"], rtol=RTOL, atol=ATOL)
    assert got["step"] == 2


def test_selm_step_metrics_and_progress(runs):
    m1, m2 = runs[None]["metrics1"], runs[None]["metrics2"]
    for key in (
        "loss",
        "grad_norm",
        "learning_rate",
        "pairs",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "logps/refresp",
        "rewards/refresp",
        "selm/exploration",
        "loss/dpo",
    ):
        assert key in m1 and np.isfinite(m1[key]), key
    np.testing.assert_allclose(m1["learning_rate"], 1e-2, rtol=1e-6)
    assert m1["pairs"] == B
    np.testing.assert_allclose(
        m1["loss"], m1["loss/dpo"] + m1["selm/exploration"], rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(
        m1["selm/exploration"], TRAIN.alpha * m1["rewards/refresp"], rtol=RTOL, atol=1e-7
    )
    assert m2["loss"] < m1["loss"]  # one update on the same batch lowers the loss
    assert runs[None]["metrics1"]["grad_norm"] > 0


def test_selm_step_loss_matches_direct_computation(runs, pol0):
    pol = pol0
    ref = runs[None]["ref"]
    loss, metrics = L.selm_loss(
        pol["chosen"],
        pol["rejected"],
        ref.chosen,
        ref.rejected,
        pol["refresp"],
        ref.refresp,
        beta=TRAIN.beta,
        alpha=TRAIN.alpha,
    )
    np.testing.assert_allclose(runs[None]["metrics1"]["loss"], loss, rtol=RTOL, atol=ATOL)
    for key, value in metrics.items():
        np.testing.assert_allclose(runs[None]["metrics1"][key], value, rtol=RTOL, atol=ATOL)


def test_gradients_and_update_match_jax_grad_of_the_direct_loss(runs, batch, params0):
    """Independent of the step's plumbing (interleaved forward, summed loss / weight, psum,
    micro-batch scan): jax.grad of the SELM batch-mean loss computed from one forward per
    response, then the optimizer's own update. A wrong constant factor in the step's loss or
    gradients shows in grad_norm (and, through Adam's eps, in the params)."""
    import optax

    ref = runs[None]["ref"]

    @jax.jit
    def direct_loss(params):
        pol = direct_ref_logprobs(params, batch)
        loss, _ = L.selm_loss(
            pol.chosen,
            pol.rejected,
            ref.chosen,
            ref.rejected,
            pol.refresp,
            ref.refresp,
            beta=TRAIN.beta,
            alpha=TRAIN.alpha,
        )
        return loss

    grads = jax.jit(jax.grad(direct_loss))(params0)
    norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(g))) for g in jax.tree.leaves(grads))))
    tx = make_optimizer(OPT)
    updates, _ = tx.update(grads, tx.init(params0), params0)
    want = to_np(optax.apply_updates(params0, updates))
    for shape in [None, *MESHES]:
        got = runs[shape]
        np.testing.assert_allclose(got["metrics1"]["grad_norm"], norm, rtol=RTOL, atol=ATOL)
        chex.assert_trees_all_close(got["params1"], want, rtol=RTOL, atol=ATOL)


def test_params_and_opt_state_laid_out_by_the_rules(runs):
    specs = runs[(2, 2, 2)]["specs"]
    assert specs["embed"] == P("tensor", "fsdp")
    assert specs["lm_head"] == P("fsdp", "tensor")
    assert specs["layers"]["attn"]["q_proj"]["kernel"] == P(None, "fsdp", "tensor")
    assert specs["layers"]["attn"]["k_proj"]["kernel"] == P(None, "fsdp", "tensor")
    assert specs["layers"]["attn"]["o_proj"]["kernel"] == P(None, "tensor", None, "fsdp")
    assert specs["layers"]["mlp"]["up_proj"]["kernel"] == P(None, "fsdp", "tensor")
    assert specs["layers"]["mlp"]["down_proj"]["kernel"] == P(None, "tensor", "fsdp")
    assert specs["layers"]["attn_norm"]["scale"] == P(None, "fsdp")
    adam = [
        s
        for s in jax.tree.leaves(runs[(2, 2, 2)]["opt_specs"], is_leaf=lambda x: hasattr(x, "mu"))
        if hasattr(s, "mu")
    ]
    assert adam[0].mu == specs and adam[0].nu == specs and adam[0].count == P()
    specs = runs[(2, 4, 1)]["specs"]
    assert specs["layers"]["mlp"]["gate_proj"]["kernel"] == P(None, "fsdp", "tensor")
    for sharding in runs[(2, 4, 1)]["metric_shardings"].values():
        assert sharding.is_fully_replicated


def test_gradient_accumulation_equals_big_batch(runs, batch, params0):
    shape = (2, 2, 2)
    mesh = make_mesh(shape)
    tx = make_optimizer(OPT)
    state = shard_train_state(to_np(create_train_state(params0, tx)), CFG, tx, mesh)
    step = make_preference_step(CFG, TRAIN.replace(micro_batches=4), tx, mesh)
    state, metrics = step(state, batch.replace(ref_logps=runs[shape]["ref"]))
    chex.assert_trees_all_close(to_np(metrics), runs[shape]["metrics1"], rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_close(to_np(state.params), runs[shape]["params1"], rtol=RTOL, atol=ATOL)
    with pytest.raises(ConfigError, match="train.micro_batches"):
        make_preference_step(CFG, TRAIN.replace(micro_batches=3), tx, mesh)(
            state, batch.replace(ref_logps=runs[shape]["ref"])
        )


@pytest.mark.parametrize("shape, micro", [((2, 2, 2), 1), ((8, 1, 1), 2)])
def test_reference_fn_matches_forward(runs, batch, shape, micro):
    params = init_jit(CFG, jax.random.key(1))
    if micro == 1:
        got = runs[None]["ref"]  # computed by the fixture on (2, 2, 2)
    else:
        got = make_reference_fn(CFG, make_mesh(shape), micro_batches=micro)(params, batch)
        assert got.chosen.sharding.spec == P(("data", "fsdp"))
    chex.assert_trees_all_close(
        to_np(got), to_np(direct_ref_logprobs(params, batch)), rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("loss", ["dpo", "ipo", "xpo"])
def test_other_preference_losses(loss, runs, batch, params0, pol0):
    train = TRAIN.replace(loss=loss)
    tx = make_optimizer(OPT)
    mesh = single_device_mesh()
    state = shard_train_state(to_np(create_train_state(params0, tx)), CFG, tx, mesh)
    ref = runs[None]["ref"]
    if loss == "xpo":  # y_ref's policy log-prob but no reference one
        ref = ref.replace(refresp=None)
        step_batch = batch.replace(ref_logps=ref)
    else:  # pairs only: no y_ref in the batch at all
        step_batch = batch.replace(refresp=None, ref_logps=ref.replace(refresp=None))
    _, metrics = make_preference_step(CFG, train, tx, mesh)(state, step_batch)
    pol = pol0
    args = (pol["chosen"], pol["rejected"], ref.chosen, ref.rejected)
    if loss == "dpo":
        want, _ = L.dpo_loss(*args, beta=train.beta)
    elif loss == "ipo":
        want, _ = L.ipo_loss(*args, beta=train.beta)
    else:
        want, _ = L.xpo_loss(*args, pol["refresp"], beta=train.beta, alpha=train.alpha)
    np.testing.assert_allclose(metrics["loss"], want, rtol=RTOL, atol=ATOL)


def _sft_batch(seed: int) -> SFTBatch:
    return make_batch(seed).chosen


def test_sft_step_and_accumulation(params0):
    sft = _sft_batch(3)
    tx = make_optimizer(OPT)
    mesh = make_mesh((1, 2, 1), devices=jax.devices()[:2])
    want, _ = jax.jit(
        lambda p, b: L.sft_loss(forward(p, CFG, b.tokens, b.mask), b.tokens, b.loss_mask)
    )(params0, sft)
    results = []
    for micro in (1, 4):
        state = shard_train_state(to_np(create_train_state(params0, tx)), CFG, tx, mesh)
        state, metrics = make_sft_step(CFG, TRAIN.replace(micro_batches=micro), tx, mesh)(
            state, sft
        )
        results.append((to_np(metrics), to_np(state.params)))
        np.testing.assert_allclose(metrics["loss"], want, rtol=RTOL, atol=ATOL)
        assert metrics["sft/tokens"] == sft.loss_mask[:, 1:].sum()
    # Token-weighted accumulation: micro-batches with different token counts still match.
    chex.assert_trees_all_close(results[0], results[1], rtol=RTOL, atol=ATOL)


def test_reward_model_step():
    b = make_batch(4)
    rm_batch = b.replace(refresp=None)
    tx = make_optimizer(OPT)
    mesh = make_mesh((2, 4, 1))
    state = init_train_state(CFG, tx, jax.random.key(2), mesh, head="reward")
    params = to_np(state.params)

    @jax.jit
    def direct(p, b):
        return L.reward_model_loss(
            reward_scores(p, CFG, b.chosen.tokens, b.chosen.mask),
            reward_scores(p, CFG, b.rejected.tokens, b.rejected.mask),
        )

    want, _ = direct(params, rm_batch)
    step = make_reward_model_step(CFG, TRAIN, tx, mesh)
    state, m1 = step(state, rm_batch)
    state, m2 = step(state, rm_batch)
    np.testing.assert_allclose(m1["loss"], want, rtol=RTOL, atol=ATOL)
    assert {"rm/accuracy", "rm/margin", "grad_norm", "learning_rate"} <= set(m1)
    assert m2["loss"] < m1["loss"] and int(state.step) == 2


def test_bf16_compute_keeps_fp32_master_weights(runs, batch, params0):
    cfg = CFG.replace(dtype="bfloat16")  # param_dtype stays float32: same params as CFG
    tx = make_optimizer(OPT)
    mesh = single_device_mesh()
    state = shard_train_state(to_np(create_train_state(params0, tx)), cfg, tx, mesh)
    step = make_preference_step(cfg, TRAIN, tx, mesh)
    state, metrics = step(state, batch.replace(ref_logps=runs[None]["ref"]))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert metrics["loss"].dtype == jnp.float32
    # bf16 matmuls (8-bit mantissa) move summed log-probs by ~1e-2 relative.
    np.testing.assert_allclose(
        metrics["logps/chosen"], runs[None]["metrics1"]["logps/chosen"], rtol=2e-2
    )


def test_cope_step_sharded_equals_one_device(batch):
    """CoPE's own parameters (the position table) train sharded too: a SELM step of the CoPE
    model on meshes (2, 2, 2) and (1, 8, 1) (FSDP) equals the step on one device."""
    cfg = get_preset("tiny-cope")
    tx = make_optimizer(OPT)
    params = init_jit(cfg, jax.random.key(0))
    # A non-zero position table (CoPE's is zero-initialised), so its gradient path matters.
    params = jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), params)
    ref = make_reference_fn(cfg, single_device_mesh())(init_jit(cfg, jax.random.key(1)), batch)
    host_state = to_np(create_train_state(params, tx))
    results = {}
    for shape in [None, (2, 2, 2), (1, 8, 1)]:
        mesh = mesh_of(shape)
        state = shard_train_state(host_state, cfg, tx, mesh)
        state, metrics = make_preference_step(cfg, TRAIN, tx, mesh)(
            state, batch.replace(ref_logps=ref)
        )
        results[shape] = (to_np(metrics), to_np(state.params))
    assert any(
        "cope" in jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)
    )
    for shape in [(2, 2, 2), (1, 8, 1)]:
        chex.assert_trees_all_close(results[shape][0], results[None][0], rtol=RTOL, atol=ATOL)
        chex.assert_trees_all_close(results[shape][1], results[None][1], rtol=RTOL, atol=ATOL)


def test_hyper_step_compiles_once_and_equals_the_static_steps(runs, batch, params0):
    # The online loop's step: alpha and the schedule are call-time inputs, so two iterations
    # with different learning rates, lengths, warm-ups and alphas share one compilation, and
    # each equals the step built for its own settings (same float32 math: RTOL / ATOL above).
    tx = make_optimizer(OPT)
    mesh = make_mesh((2, 2, 2))
    ref = runs[None]["ref"]
    settings = [
        TRAIN.replace(alpha=0.05, optimizer=OPT.replace(learning_rate=1e-2, total_steps=10)),
        TRAIN.replace(
            alpha=0.3,
            optimizer=OPT.replace(
                learning_rate=3e-3, total_steps=3, warmup_steps=1, schedule="cosine"
            ),
        ),
    ]
    hyper_step = make_preference_step(CFG, settings[0], None, mesh, hyper=True)
    for train in settings:
        got_state = shard_train_state(to_np(create_train_state(params0, tx)), CFG, tx, mesh)
        want_state = shard_train_state(to_np(create_train_state(params0, tx)), CFG, tx, mesh)
        static = make_preference_step(CFG, train, make_optimizer(train.optimizer), mesh)
        bound = hyper_step.bind(preference_hyper(train))
        for _ in range(2):
            got_state, got = bound(got_state, batch.replace(ref_logps=ref))
            want_state, want = static(want_state, batch.replace(ref_logps=ref))
            chex.assert_trees_all_close(to_np(got), to_np(want), rtol=RTOL, atol=ATOL)
        chex.assert_trees_all_close(
            to_np(got_state.params), to_np(want_state.params), rtol=RTOL, atol=ATOL
        )
    assert hyper_step.compilations == 1
    with pytest.raises(ValueError, match="hyper=True"):
        make_preference_step(CFG, TRAIN, tx, mesh, hyper=True)


@pytest.mark.parametrize("loss", ["selm", "xpo"])
def test_alpha_zero_trains_without_y_ref(loss, runs, batch, params0):
    # alpha = 0 makes the exploration term exactly zero: y_ref is not packed, scored or trained
    # on, and the step is DPO's (the same computation, so bit-identical), with the exploration
    # metric reported as 0.
    assert responses_for(loss, 0.0) == ("chosen", "rejected")
    assert responses_for(loss, 1e-3) == ("chosen", "rejected", "refresp")
    # ... unless y_ref's log-ratio is wanted as a diagnostic (a DPO baseline in a comparison)
    assert responses_for(loss, 0.0, refresp_metrics=True) == ("chosen", "rejected", "refresp")
    tx = make_optimizer(OPT)
    mesh = single_device_mesh()
    ref = runs[None]["ref"]
    pairs = batch.replace(refresp=None, ref_logps=ref.replace(refresp=None))
    out = {}
    for name, train in (
        ("zero", TRAIN.replace(loss=loss, alpha=0.0)),
        ("dpo", TRAIN.replace(loss="dpo")),
    ):
        state = shard_train_state(to_np(create_train_state(params0, tx)), CFG, tx, mesh)
        state, metrics = make_preference_step(CFG, train, tx, mesh)(state, pairs)
        out[name] = (to_np(state.params), to_np(metrics))
    chex.assert_trees_all_equal(out["zero"][0], out["dpo"][0])
    metrics = out["zero"][1]
    exploration = "selm/exploration" if loss == "selm" else "xpo/exploration"
    assert metrics[exploration] == 0.0
    assert metrics["loss/dpo"] == metrics["loss"] == out["dpo"][1]["loss"]


def test_logprob_chunks_give_the_same_step(runs, batch, params0):
    # model.logprob_chunk computes the log-probs from the hidden states a few positions at a
    # time (no [B, T, V] logits); the step's metrics and update are the unchunked ones.
    tx = make_optimizer(OPT)
    mesh = make_mesh((2, 2, 2))
    ref = runs[None]["ref"]
    out = []
    for cfg in (CFG, CFG.replace(logprob_chunk=4)):
        state = shard_train_state(to_np(create_train_state(params0, tx)), cfg, tx, mesh)
        state, metrics = make_preference_step(cfg, TRAIN, tx, mesh)(
            state, batch.replace(ref_logps=ref)
        )
        out.append((to_np(state.params), to_np(metrics)))
    chex.assert_trees_all_close(out[0], out[1], rtol=RTOL, atol=ATOL)


def test_entropy_bonus_equals_the_direct_dpo_minus_entropy(runs, batch, params0):
    """DPO + entropy bonus (the exploration control): the step's loss, entropy metric and
    gradient norm against jax.grad of DPO minus eta x each pair's mean next-token entropy over
    its chosen and rejected response tokens, computed with numpy-style log-softmax per response."""
    eta = 0.3
    train = TrainConfig(loss="dpo", beta=0.1, entropy_bonus=eta, optimizer=OPT)
    ref = runs[None]["ref"]

    def mean_entropy(params):
        tot, n = 0.0, 0.0
        for name in ("chosen", "rejected"):
            s = getattr(batch, name)
            logp = jax.nn.log_softmax(forward(params, CFG, s.tokens, s.mask)[:, :-1], axis=-1)
            m = jnp.asarray(s.loss_mask[:, 1:], jnp.float32)
            tot = tot + jnp.sum(-jnp.sum(jnp.exp(logp) * logp, -1) * m, -1)
            n = n + jnp.sum(m, -1)
        return tot / n

    @jax.jit
    def direct(params):
        pol = direct_ref_logprobs(params, batch)
        loss, _ = L.dpo_loss(pol.chosen, pol.rejected, ref.chosen, ref.rejected, beta=0.1)
        ent = mean_entropy(params)
        return loss - eta * jnp.mean(ent), ent

    (want_loss, ent), grads = jax.jit(jax.value_and_grad(direct, has_aux=True))(params0)
    norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(g))) for g in jax.tree.leaves(grads))))
    assert 0.5 < float(jnp.mean(ent)) < np.log(CFG.vocab_size)  # a real entropy, in nats
    tx = make_optimizer(OPT)
    state = shard_train_state(to_np(create_train_state(params0, tx)), CFG, tx, single_device_mesh())
    step = make_preference_step(CFG, train, tx, single_device_mesh())
    _, m = step(state, batch.replace(ref_logps=ref))
    np.testing.assert_allclose(m["loss"], want_loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["policy/entropy"], np.mean(ent), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["grad_norm"], norm, rtol=RTOL, atol=ATOL)
    with pytest.raises(ConfigError, match="train.entropy_bonus: needs model.logprob_chunk=0"):
        bad = make_preference_step(CFG.replace(logprob_chunk=4), train, tx, single_device_mesh())
        bad(state, batch.replace(ref_logps=ref))
