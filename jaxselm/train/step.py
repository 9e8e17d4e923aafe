"""Sharded train steps: SELM / DPO / IPO / XPO, SFT, reward model.

One call of a step = one optimizer update over the whole batch: the batch is split into
``micro_batches`` pieces, gradients are summed in a ``lax.scan`` and divided once by the batch's
weight (pairs, or tokens for SFT), so accumulation equals the big batch exactly, up to float
summation order. Each step compiles as one ``jax.jit`` with explicit ``in_shardings`` /
``out_shardings`` (the state's from the rule table, the batch's along "batch") and donates the
old state. It is traced inside the logical-axis rules and, with ``activation_constraints``, inside
``jax.set_mesh(mesh)`` so the model's ``with_logical_constraint`` calls pin activation shardings
too (``ACTIVATION_CONSTRAINTS``, on by default); parameters, optimizer state and batch are laid
out by the rule table and XLA propagates from there.

Batches are the typed ones of :mod:`jaxselm.data.packing`: a ``PreferenceBatch`` (chosen,
rejected and, for SELM / XPO, y_ref ``Sequences`` of one length T, plus the reference model's
``LogProbs`` from :mod:`jaxselm.train.reference` with the iteration-start params) for the preference
losses and the reward model (which reads chosen / rejected only), ``Sequences`` (``SFTBatch``) for
SFT. The policy runs once per micro-batch over the responses interleaved as [b, 3, T] -> [3b, T]
(interleaving, not concatenating, keeps each device's rows on that device when the batch is
sharded).

    mesh = make_mesh((2, 4, 1))
    tx = make_optimizer(train_cfg.optimizer)
    state = init_train_state(model_cfg, tx, rng, mesh)
    ref = make_reference_fn(model_cfg, mesh)(ref_params, batch)        # once per iteration
    step = make_preference_step(model_cfg, train_cfg, tx, mesh)
    state, metrics = step(state, batch.replace(ref_logps=ref))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from jaxselm import metric_names as M
from jaxselm.errors import ConfigError
from jaxselm.model import ModelConfig, reward_scores
from jaxselm.parallel.rules import (
    LOGICAL_AXIS_RULES,
    Rules,
    batch_shardings,
    logical_to_mesh_spec,
    path_name,
    replicated,
    with_mesh_rules,
)
from jaxselm.train.objectives import (
    Batch,
    LossFn,
    Metrics,
    policy_logprobs,
    preference_loss_fn,
    responses_for,
    reward_loss_fn,
    sft_loss_fn,
)
from jaxselm.train.optimizer import TrainConfig, make_optimizer, make_schedule, schedule_hyper
from jaxselm.train.state import TrainState, state_shardings

# Scalars given to a step at call time (traced, so new values do not recompile): for the
# preference step, alpha and the schedule's numbers (see :func:`preference_hyper`).
Hyper = Mapping[str, Any]


class StepParts(NamedTuple):
    """What one update is made of: the loss, the optimizer and the reported schedule."""

    loss_fn: LossFn
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule | None


# Whether steps are traced under jax.set_mesh, which turns the model's logical activation
# constraints into sharding constraints (batch over data x fsdp, heads / mlp over tensor). The
# results are the same either way (tested on several meshes); the constraints pin the layouts
# XLA would otherwise have to guess.
ACTIVATION_CONSTRAINTS = True


def split_micro_batches(batch: Batch, n: int, mesh: jax.sharding.Mesh, rules: Rules) -> Batch:
    """[B, ...] -> [n, B/n, ...], micro-batch m = rows m, m+n, m+2n... (device-local slices)."""

    def split(path: Any, x: jax.Array) -> jax.Array:
        if x.shape[0] % n:
            raise ConfigError(
                f"train.micro_batches: {n} does not divide the batch size {x.shape[0]} "
                f"(batch.{path_name(path)})"
            )
        y = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        spec = logical_to_mesh_spec((None, "batch"), y.shape, mesh, rules)
        return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(split, batch)


def _accumulate(
    loss_fn: LossFn, params: Any, batch: Batch, micro_batches: int, mesh, rules, param_shards
) -> tuple[jax.Array, jax.Array, Metrics, Any]:
    """Summed loss, weight, metrics and gradients over the micro-batches (one scan)."""
    grad_fn = jax.value_and_grad(lambda p, mb: _pack(loss_fn(p, mb)), has_aux=True)
    if micro_batches == 1:
        (loss, (weight, metrics)), grads = grad_fn(params, batch)
        return loss, weight, metrics, grads
    mbs = split_micro_batches(batch, micro_batches, mesh, rules)

    def body(carry, mb):
        (loss, (weight, metrics)), grads = grad_fn(params, mb)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)  # accumulate in fp32
        acc = (loss, weight, metrics, grads)
        return jax.tree.map(jnp.add, carry, acc), None

    first = jax.tree.map(lambda x: x[0], mbs)
    shapes = jax.eval_shape(grad_fn, params, first)
    (l0, (w0, m0)), g0 = shapes
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (l0, w0, m0))
    zeros = (*zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), g0))
    zeros = (*zeros[:3], jax.lax.with_sharding_constraint(zeros[3], param_shards))
    # (the constraint keeps the accumulator sharded like the params, not replicated)
    (loss, weight, metrics, grads), _ = jax.lax.scan(body, zeros, mbs)
    return loss, weight, metrics, grads


def _pack(out: tuple[jax.Array, jax.Array, Metrics]):
    loss, weight, metrics = out
    return loss, (weight, metrics)


def _global_norm(tree: Any) -> jax.Array:
    """L2 norm of all leaves together, in float32 (what clip_by_global_norm compares)."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def signature(batch: Batch) -> tuple:
    """What a compilation depends on: the batch's structure, shapes and dtypes."""
    leaves, treedef = jax.tree.flatten(batch)
    return treedef, tuple((jnp.shape(x), jnp.result_type(x).name) for x in leaves)


class ShardedStep:
    """A jitted, sharded ``(state, batch) -> (state, metrics)`` with the mesh/rules context.

    One compiled function per batch signature (names, shapes, dtypes): its batch shardings are
    derived from the shapes (non-divisible batch sizes fall back to replication). Numpy batches
    are placed with those shardings; with several processes pass global arrays from
    :func:`jaxselm.parallel.make_global_batch` (already laid out, so nothing moves).
    """

    def __init__(
        self,
        fn: Callable[[TrainState, Batch], tuple[TrainState, Metrics]],
        mesh: jax.sharding.Mesh,
        rules: Rules,
        state_shardings: TrainState,
        *,
        donate: bool = True,
        activation_constraints: bool = ACTIVATION_CONSTRAINTS,
    ):
        self.fn = fn
        self.activation_constraints = activation_constraints
        self.mesh = mesh
        self.rules = rules
        self.state_shardings = state_shardings
        self.donate = donate
        self._compiled: dict[tuple, Any] = {}

    def _context(self):
        return with_mesh_rules(
            self.mesh, self.rules, activation_constraints=self.activation_constraints
        )

    def batch_shardings(self, batch: Batch) -> Any:
        return batch_shardings(batch, self.mesh, self.rules)

    def jitted(self, batch: Batch, hyper: Hyper):
        key = (signature(batch), signature(dict(hyper)))
        if key not in self._compiled:
            rep = replicated(self.mesh)
            self._compiled[key] = jax.jit(
                self.fn,
                in_shardings=(self.state_shardings, self.batch_shardings(batch), rep),
                out_shardings=(self.state_shardings, rep),
                donate_argnums=(0,) if self.donate else (),
            )
        return self._compiled[key]

    def __call__(
        self, state: TrainState, batch: Batch, hyper: Hyper | None = None
    ) -> tuple[TrainState, Metrics]:
        hyper = _hyper_arrays(hyper)
        batch = jax.device_put(batch, self.batch_shardings(batch))
        with self._context():
            return self.jitted(batch, hyper)(state, batch, hyper)

    def bind(self, hyper: Hyper) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
        """``(state, batch) -> step(state, batch, hyper)``: what a training driver calls; the
        compiled functions stay this step's, shared by every ``hyper``."""
        return BoundStep(self, _hyper_arrays(hyper))

    def lower(self, state: TrainState, batch: Batch, hyper: Hyper | None = None):
        """The lowered computation (for cost analysis and HLO inspection)."""
        hyper = _hyper_arrays(hyper)
        with self._context():
            return self.jitted(batch, hyper).lower(state, batch, hyper)

    @property
    def compilations(self) -> int:
        """How many functions this step has compiled (one per batch signature)."""
        return len(self._compiled)


class BoundStep:
    """A :class:`ShardedStep` with its call-time hyperparameters fixed (see ``bind``)."""

    def __init__(self, step: ShardedStep, hyper: dict[str, np.ndarray]):
        self.step, self.hyper = step, hyper
        self.state_shardings = step.state_shardings

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        return self.step(state, batch, self.hyper)

    def lower(self, state: TrainState, batch: Batch):
        return self.step.lower(state, batch, self.hyper)


def _hyper_arrays(hyper: Hyper | None) -> dict[str, np.ndarray]:
    """float32 host scalars (one compiled function for every value, and no weak types)."""
    return {k: np.asarray(v, np.float32) for k, v in (hyper or {}).items()}


def make_step(
    parts: StepParts | Callable[[Hyper], StepParts],
    config: ModelConfig,
    mesh: jax.sharding.Mesh,
    *,
    micro_batches: int = 1,
    weight_name: str = M.PAIRS,
    rules: Rules = LOGICAL_AXIS_RULES,
    shardings: TrainState | None = None,
    donate: bool = True,
    activation_constraints: bool = ACTIVATION_CONSTRAINTS,
) -> ShardedStep:
    """A :class:`ShardedStep` applying one ``parts.optimizer`` update from ``parts.loss_fn``'s
    gradients. ``parts`` may be a function of the call-time ``hyper`` scalars (traced: one
    compilation serves every value); then ``shardings`` must be given.

    Metrics: ``loss``, every metric of the loss (batch means), ``grad_norm`` (before clipping),
    ``learning_rate`` (``schedule`` at the pre-update step; absent if None) and ``weight_name``
    (the batch's total weight: pairs, or scored tokens for SFT).
    """
    if micro_batches < 1:
        raise ConfigError(f"train.micro_batches: must be >= 1 (got {micro_batches})")
    if shardings is None:
        if not isinstance(parts, StepParts):
            raise ValueError("make_step: give `shardings` when `parts` depends on hyper")
        shardings = state_shardings(config, parts.optimizer, mesh, rules)
    shards = shardings

    def step(state: TrainState, batch: Batch, hyper: Hyper) -> tuple[TrainState, Metrics]:
        loss_fn, optimizer, schedule = parts if isinstance(parts, StepParts) else parts(hyper)
        loss, weight, metrics, grads = _accumulate(
            loss_fn, state.params, batch, micro_batches, mesh, rules, shards.params
        )
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
        out = {k: v / denom for k, v in metrics.items()}
        out[M.LOSS] = loss / denom
        out[weight_name] = weight
        out[M.GRAD_NORM] = _global_norm(grads)
        if schedule is not None:
            out[M.LEARNING_RATE] = jnp.asarray(schedule(state.step), jnp.float32)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, out

    return ShardedStep(
        step, mesh, rules, shards, donate=donate, activation_constraints=activation_constraints
    )


def preference_hyper(train: TrainConfig) -> dict[str, np.ndarray]:
    """The call-time values of a step made with ``hyper=True``: ``train.alpha`` and the
    optimizer's peak learning rate, warm-up and length."""
    return {"alpha": np.float32(train.alpha), **schedule_hyper(train.optimizer)}


def make_preference_step(
    config: ModelConfig,
    train: TrainConfig,
    optimizer: optax.GradientTransformation | None,
    mesh: jax.sharding.Mesh,
    *,
    hyper: bool = False,
    **options: Any,
) -> ShardedStep:
    """The SELM (or DPO/IPO/XPO, per ``train.loss``) step; batch layout in the module docstring.

    ``optimizer`` None: ``make_optimizer(train.optimizer)``. With ``hyper=True`` the step is
    called as ``step(state, batch, preference_hyper(train_t))``: alpha and the schedule's peak,
    warm-up and length are inputs, so one compilation serves every online iteration
    (``optimizer`` must then be None; the update is AdamW per ``train.optimizer`` with those
    values). Whether y_ref is in the batch follows ``train.alpha`` (:func:`train_responses`).
    ``options``: ``rules``, ``donate``, ``activation_constraints`` (as for :func:`make_step`).
    """
    if not hyper:
        tx = make_optimizer(train.optimizer) if optimizer is None else optimizer
        parts = StepParts(preference_loss_fn(config, train), tx, make_schedule(train.optimizer))
        return _train_step(parts, M.PAIRS, config, train, mesh, **options)
    if optimizer is not None:
        raise ValueError("make_preference_step: hyper=True builds its optimizer (pass None)")

    def parts_of(h: Hyper) -> StepParts:
        loss_fn = preference_loss_fn(config, train, alpha=h["alpha"])
        return StepParts(
            loss_fn, make_optimizer(train.optimizer, h), make_schedule(train.optimizer, h)
        )

    rules = options.get("rules", LOGICAL_AXIS_RULES)
    shards = state_shardings(config, make_optimizer(train.optimizer), mesh, rules)
    return _train_step(parts_of, M.PAIRS, config, train, mesh, shardings=shards, **options)


def make_sft_step(
    config: ModelConfig,
    train: TrainConfig,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    **options: Any,
) -> ShardedStep:
    """Supervised fine-tuning step: mean NLL over all loss-masked tokens of the whole batch."""
    parts = StepParts(sft_loss_fn(config), optimizer, make_schedule(train.optimizer))
    return _train_step(parts, M.SFT_TOKENS, config, train, mesh, **options)


def _train_step(parts, weight_name, config, train, mesh, **options) -> ShardedStep:
    """:func:`make_step` with ``train``'s micro-batches."""
    return make_step(
        parts,
        config,
        mesh,
        micro_batches=train.micro_batches,
        weight_name=weight_name,
        **options,
    )


def make_reward_model_step(
    config: ModelConfig,
    train: TrainConfig,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    *,
    score_fn: Callable[[Any, jax.Array, jax.Array], jax.Array] | None = None,
    rules: Rules = LOGICAL_AXIS_RULES,
    shardings: TrainState | None = None,
    **options: Any,
) -> ShardedStep:
    """Bradley-Terry reward-model step over params with the reward head (``head="reward"``).

    ``score_fn(params, tokens, mask) -> float32 [N]`` defaults to the model's ``reward_scores``;
    the state is laid out like ``state_shardings(config, optimizer, mesh, head="reward")``
    unless ``shardings`` says otherwise.
    """
    if score_fn is None:

        def score_fn(params, tokens, mask):
            return reward_scores(params, config, tokens, mask)

    if shardings is None:
        shardings = state_shardings(config, optimizer, mesh, rules, head="reward")
    parts = StepParts(reward_loss_fn(score_fn), optimizer, make_schedule(train.optimizer))
    return _train_step(
        parts,
        M.PAIRS,
        config,
        train,
        mesh,
        rules=rules,
        shardings=shardings,
        **options,
    )


__all__ = [
    "Batch",
    "BoundStep",
    "Hyper",
    "LossFn",
    "ShardedStep",
    "StepParts",
    "make_preference_step",
    "make_reward_model_step",
    "make_sft_step",
    "make_step",
    "policy_logprobs",
    "preference_hyper",
    "preference_loss_fn",
    "responses_for",
    "signature",
    "split_micro_batches",
    "reward_loss_fn",
    "sft_loss_fn",
]
