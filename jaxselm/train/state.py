"""The train state (step, params, optimizer state) and its shardings on a mesh.

A plain pytree (a Flax ``struct`` dataclass) so it goes through ``jax.jit``, donation and orbax
unchanged; the optax transformation itself is not part of the state (it is code, not data) and is
passed to the step builders. The state is created *directly sharded*: ``init_train_state`` jits
the initialiser with the target ``out_shardings``, so a model that does not fit one device is
never materialised whole.

    shardings = state_shardings(model_cfg, optimizer, mesh)
    state = init_train_state(model_cfg, optimizer, rng, mesh)   # laid out as `shardings`
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxselm.model import ModelConfig, abstract_params, init_params, param_logical_axes
from jaxselm.parallel.rules import (
    LOGICAL_AXIS_RULES,
    Rules,
    opt_state_shardings,
    param_shardings,
    replicated,
)


@flax.struct.dataclass
class TrainState:
    """``step``: int32 scalar count of optimizer updates; ``params``; ``opt_state``."""

    step: jax.Array
    params: Any
    opt_state: Any


def create_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh state (step 0) around existing ``params`` (e.g. loaded from a checkpoint)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
    )


def params_shardings_for(
    config: ModelConfig,
    mesh: jax.sharding.Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
    *,
    head: str = "lm",
) -> Any:
    """NamedShardings of the model's params (``head``: "lm" or "reward") on ``mesh``."""
    return param_shardings(
        abstract_params(config, head=head), param_logical_axes(config, head=head), mesh, rules
    )


def state_shardings(
    config: ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
    *,
    head: str = "lm",
) -> TrainState:
    """NamedShardings of a TrainState: params per the rules, moments alike, the rest replicated."""
    p_abs = abstract_params(config, head=head)
    p_shard = param_shardings(p_abs, param_logical_axes(config, head=head), mesh, rules)
    return TrainState(
        step=replicated(mesh),
        params=p_shard,
        opt_state=opt_state_shardings(optimizer, p_abs, p_shard, mesh),
    )


def abstract_train_state(
    config: ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
    *,
    head: str = "lm",
) -> TrainState:
    """ShapeDtypeStructs (with shardings) of a train state: the target for checkpoint restores."""
    shapes = jax.eval_shape(
        lambda key: create_train_state(init_params(config, key, head=head), optimizer),
        jax.random.key(0),
    )
    shards = state_shardings(config, optimizer, mesh, rules, head=head)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shards
    )


def init_train_state(
    config: ModelConfig,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    mesh: jax.sharding.Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
    *,
    head: str = "lm",
) -> TrainState:
    """Initialise params and optimizer state directly in their shardings on ``mesh``."""
    shards = state_shardings(config, optimizer, mesh, rules, head=head)
    init = jax.jit(
        lambda key: create_train_state(init_params(config, key, head=head), optimizer),
        out_shardings=shards,
    )
    return init(rng)


def shard_train_state(
    state: TrainState,
    config: ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
    *,
    head: str = "lm",
) -> TrainState:
    """``state`` moved onto ``mesh`` with the shardings of :func:`state_shardings`.

    Arrays already laid out that way are not copied, so the result may share buffers with
    ``state``; the steps donate their state, so keep using the result, not ``state``.
    """
    return jax.device_put(state, state_shardings(config, optimizer, mesh, rules, head=head))
