"""Optimizer config validation, the schedule, and one AdamW + clipping update by hand."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxselm.errors import ConfigError
from jaxselm.train.optimizer import (
    OptimizerConfig,
    TrainConfig,
    make_optimizer,
    make_schedule,
    schedule_hyper,
)


def test_warmup_cosine_schedule_values():
    cfg = OptimizerConfig(learning_rate=1e-3, total_steps=100, warmup_ratio=0.1)
    lr = make_schedule(cfg)
    assert cfg.resolved_warmup_steps == 10
    np.testing.assert_allclose(lr(0), 0.0)
    np.testing.assert_allclose(lr(5), 0.5e-3, rtol=1e-6)
    np.testing.assert_allclose(lr(10), 1e-3, rtol=1e-6)
    # Halfway through the 90 decay steps: cosine gives half the peak.
    np.testing.assert_allclose(lr(55), 0.5e-3 * (1 + math.cos(math.pi * 45 / 90)), rtol=1e-5)
    np.testing.assert_allclose(lr(100), 0.0, atol=1e-12)


def test_linear_and_constant_schedules():
    lin = make_schedule(
        OptimizerConfig(
            learning_rate=2.0, total_steps=10, warmup_steps=0, schedule="linear", final_lr_ratio=0.5
        )
    )
    np.testing.assert_allclose([lin(0), lin(5), lin(10)], [2.0, 1.5, 1.0], rtol=1e-6)
    const = make_schedule(
        OptimizerConfig(learning_rate=0.3, total_steps=10, warmup_steps=2, schedule="constant")
    )
    np.testing.assert_allclose([const(1), const(2), const(9)], [0.15, 0.3, 0.3], rtol=1e-6)


def test_one_update_matches_adamw_by_hand():
    lr, wd, clip = 0.1, 0.01, 1.0
    tx = make_optimizer(
        OptimizerConfig(
            learning_rate=lr,
            total_steps=5,
            warmup_steps=0,
            schedule="constant",
            weight_decay=wd,
            max_grad_norm=clip,
        )
    )
    params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([0.5])}
    grads = {"w": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}  # global norm 5 -> scaled by 1/5
    updates, _ = tx.update(grads, tx.init(params), params)
    # First Adam step: m_hat = g, v_hat = g^2 -> g / (|g| + eps) = sign(g); then decoupled decay.
    for name in params:
        g = np.asarray(grads[name]) / 5.0
        expected = -lr * (g / (np.abs(g) + 1e-8) + wd * np.asarray(params[name]))
        np.testing.assert_allclose(updates[name], expected, rtol=1e-5)


def test_no_clipping_and_bf16_moments():
    tx = make_optimizer(OptimizerConfig(max_grad_norm=None, mu_dtype="bfloat16", total_steps=3))
    state = tx.init({"w": jnp.zeros(3)})
    (adam,) = [
        s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")
    ]
    assert adam.mu["w"].dtype == jnp.bfloat16 and adam.nu["w"].dtype == jnp.float32


def _adam_by_hand(grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, start=1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        out.append(-lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps))
    return out


@pytest.mark.parametrize("clip", [None, 1.0])
def test_two_updates_with_and_without_clipping(clip):
    # Adam is scale-invariant on its first step only; a large then a small gradient shows
    # whether the first one was clipped. float32 rounding of (1 - b2) = 1e-3 and of the bias
    # corrections moves updates by ~1e-5 relative: rtol 1e-4.
    tx = make_optimizer(
        OptimizerConfig(
            max_grad_norm=clip,
            learning_rate=1.0,
            warmup_steps=0,
            schedule="constant",
            total_steps=3,
        )
    )
    params = {"w": jnp.zeros(1)}
    state = tx.init(params)
    raw = [10.0, 1.0]
    got = []
    for g in raw:
        updates, state = tx.update({"w": jnp.array([g])}, state, params)
        got.append(float(updates["w"][0]))
    seen = raw if clip is None else [min(g, clip) for g in raw]
    np.testing.assert_allclose(got, _adam_by_hand(seen, lr=1.0), rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(learning_rate=0.0), "optimizer.learning_rate"),
        (dict(total_steps=0), "optimizer.total_steps"),
        (dict(warmup_ratio=1.5), "optimizer.warmup_ratio"),
        (dict(warmup_steps=20, total_steps=10), "optimizer.warmup_steps"),
        (dict(b2=1.0), "optimizer.b2"),
        (dict(max_grad_norm=-1.0), "optimizer.max_grad_norm"),
        (dict(schedule="step"), "optimizer.schedule"),
        (dict(learning_rate="fast"), "optimizer.learning_rate"),
        (dict(lr=1e-3), "optimizer.lr"),
    ],
)
def test_optimizer_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        OptimizerConfig(**kwargs)
    msg = str(err.value)
    assert msg.startswith(field) and "\n" not in msg


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(beta=0.0), "train.beta"),
        (dict(alpha=-1e-3), "train.alpha"),
        (dict(micro_batches=0), "train.micro_batches"),
        (dict(label_smoothing=0.5), "train.label_smoothing"),
        (dict(loss="ipo", label_smoothing=0.1), "train.label_smoothing"),
        (dict(loss="kto"), "train.loss"),
        (dict(optimizer=dict(total_steps=0)), "optimizer.total_steps"),
    ],
)
def test_train_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**kwargs)
    assert field in str(err.value) and "\n" not in str(err.value)


def test_train_config_defaults_are_the_paper_settings():
    cfg = TrainConfig()
    assert (cfg.loss, cfg.beta, cfg.alpha) == ("selm", 0.01, 1e-3)
    assert cfg.optimizer.learning_rate == 5e-7 and cfg.optimizer.warmup_ratio == 0.1
    assert cfg.optimizer.schedule == "cosine"
    assert TrainConfig(optimizer={"total_steps": 7}).optimizer.total_steps == 7


def _optax_schedule(cfg: OptimizerConfig):
    """The schedule composed from optax's own schedules (the independent reference)."""
    peak, warmup = cfg.learning_rate, cfg.resolved_warmup_steps
    decay_steps = max(cfg.total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.final_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, peak * cfg.final_lr_ratio, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup,total,ratio", [(0, 7, 0.0), (3, 20, 0.1), (5, 5, 0.0)])
def test_schedule_matches_optax_and_takes_traced_values(kind, warmup, total, ratio):
    # One jitted schedule serves every peak / warm-up / length (the online loop's iterations):
    # given as traced hyperparameters it equals optax's schedules for each config. Tolerance:
    # float32 evaluation of the same formulas (1e-6 relative, 1e-12 absolute near zero).
    cfg = OptimizerConfig(
        learning_rate=3e-4,
        total_steps=total,
        warmup_steps=warmup,
        schedule=kind,
        final_lr_ratio=ratio,
    )
    steps = jnp.arange(total + 3)
    want = jax.vmap(_optax_schedule(cfg))(steps)
    np.testing.assert_allclose(make_schedule(cfg)(steps), want, rtol=1e-6, atol=1e-12)
    generic = OptimizerConfig(schedule=kind, final_lr_ratio=ratio)  # other numbers
    traced = jax.jit(lambda h, s: make_schedule(generic, h)(s))
    np.testing.assert_allclose(traced(schedule_hyper(cfg), steps), want, rtol=1e-6, atol=1e-12)
