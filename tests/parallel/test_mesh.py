"""Meshes from config, the rule table, shardings of params / optimizer state / batches (8 CPUs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxselm.errors import ConfigError
from jaxselm.model import abstract_params, get_preset, param_logical_axes
from jaxselm.parallel import (
    MeshConfig,
    batch_sharding,
    fit_spec_to_shape,
    local_batch_rows,
    logical_to_mesh_spec,
    make_global_batch,
    make_mesh,
    opt_state_shardings,
    param_shardings,
    resolve_mesh_shape,
)
from jaxselm.train.optimizer import OptimizerConfig, make_optimizer


@pytest.mark.parametrize(
    "cfg, shape",
    [
        (MeshConfig(), (8, 1, 1)),
        (MeshConfig(data=-1, fsdp=4), (2, 4, 1)),
        (MeshConfig(data=2, fsdp=-1, tensor=2), (2, 2, 2)),
        (MeshConfig(data=1, fsdp=1, tensor=-1), (1, 1, 8)),
        (MeshConfig(data=2, fsdp=2, tensor=2), (2, 2, 2)),
    ],
)
def test_resolve_mesh_shape(cfg, shape):
    assert resolve_mesh_shape(cfg, 8) == shape
    mesh = make_mesh(cfg)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(data=-1, fsdp=-1), "mesh.fsdp"),
        (dict(data=-1, fsdp=3), "mesh.data"),
        (dict(data=2, fsdp=2, tensor=1), "mesh"),
        (dict(data=0), "mesh.data"),
        (dict(tensor=-2), "mesh.tensor"),
        (dict(pipeline=2), "mesh.pipeline"),
    ],
)
def test_bad_mesh_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        make_mesh(MeshConfig(**kwargs))
    msg = str(err.value)
    assert msg.startswith(field) and "\n" not in msg


def test_mesh_over_a_subset_of_devices():
    mesh = make_mesh((1, 2, 1), devices=jax.devices()[:2])
    assert mesh.devices.shape == (1, 2, 1)
    with pytest.raises(ConfigError):
        make_mesh((2, 2, 1), devices=jax.devices()[:2])


def test_rules_shard_params_and_activations_differently():
    mesh = make_mesh((2, 2, 2))
    # Activations: batch takes data+fsdp, so embed stays whole.
    assert logical_to_mesh_spec(("batch", "length", "embed"), (8, 4, 32), mesh) == P(
        ("data", "fsdp")
    )
    assert logical_to_mesh_spec(("batch", "length", "heads", "head_dim"), (8, 4, 4, 8), mesh) == P(
        ("data", "fsdp"), None, "tensor"
    )
    # Parameters: embed over fsdp, inner dims over tensor.
    assert logical_to_mesh_spec(("embed", "mlp"), (32, 64), mesh) == P("fsdp", "tensor")
    assert logical_to_mesh_spec(("vocab", "embed"), (64, 32), mesh) == P("tensor", "fsdp")
    assert logical_to_mesh_spec(("layers", "embed", "heads", "head_dim"), (2, 32, 4, 8), mesh) == P(
        None, "fsdp", "tensor"
    )


def test_non_divisible_dims_fall_back_to_replication():
    mesh = make_mesh((2, 4, 1))
    assert fit_spec_to_shape(P(("data", "fsdp")), (8,), mesh) == P(("data", "fsdp"))
    assert fit_spec_to_shape(P(("data", "fsdp")), (6,), mesh) == P("data")  # 6 % 8, 6 % 2 == 0
    assert fit_spec_to_shape(P(("data", "fsdp")), (3,), mesh) == P()
    assert fit_spec_to_shape(P(None, "fsdp"), (5, 6), mesh) == P()
    mesh = make_mesh((1, 1, 8))
    # 4 heads on an 8-way tensor axis: replicated; size-1 axes always divide and are kept.
    assert logical_to_mesh_spec(("embed", "heads", "head_dim"), (32, 4, 8), mesh) == P("fsdp")


def test_param_and_opt_state_shardings_follow_the_rules():
    cfg = get_preset("tiny")  # vocab 64, embed 32, mlp 64, 4 heads, 2 kv heads
    mesh = make_mesh((2, 2, 2))
    p_abs = abstract_params(cfg)
    shards = param_shardings(p_abs, param_logical_axes(cfg), mesh)
    assert shards["embed"].spec == P("tensor", "fsdp")
    assert shards["lm_head"].spec == P("fsdp", "tensor")
    assert shards["layers"]["mlp"]["gate_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert shards["layers"]["mlp"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
    assert shards["layers"]["attn"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert shards["layers"]["attn"]["o_proj"]["kernel"].spec == P(None, "tensor", None, "fsdp")
    assert shards["final_norm"]["scale"].spec == P("fsdp")

    tx = make_optimizer(OptimizerConfig(total_steps=10))
    o_shards = opt_state_shardings(tx, p_abs, shards, mesh)
    adam = [
        s for s in jax.tree.leaves(o_shards, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")
    ]
    assert len(adam) == 1
    assert jax.tree.map(lambda s: s.spec, adam[0].mu) == jax.tree.map(lambda s: s.spec, shards)
    assert jax.tree.map(lambda s: s.spec, adam[0].nu) == jax.tree.map(lambda s: s.spec, shards)
    assert adam[0].count.spec == P()
    # Every leaf of the real optimizer state gets a sharding of matching structure.
    state = jax.eval_shape(tx.init, p_abs)
    assert jax.tree.structure(state) == jax.tree.structure(o_shards)


def test_batch_sharding():
    mesh = make_mesh((2, 4, 1))
    assert batch_sharding((16, 5), mesh).spec == P(("data", "fsdp"))
    assert batch_sharding((2, 5), mesh).spec == P("data")
    assert batch_sharding((3, 5), mesh).spec == P()


def test_make_global_batch_single_process():
    mesh = make_mesh((2, 4, 1))
    # One process holds every row; the batch is handed back for the step to place (as before).
    np.testing.assert_array_equal(local_batch_rows(16, mesh), np.arange(16))
    local = {
        "tokens": np.arange(16 * 3, dtype=np.int32).reshape(16, 3),
        "logps": np.linspace(-1, 0, 16, dtype=np.float32),
    }
    glob = make_global_batch(local, mesh, 16)
    for name, arr in local.items():
        np.testing.assert_array_equal(np.asarray(glob[name]), arr)
    with pytest.raises(ConfigError, match="batch.x: expected a leading batch dimension"):
        make_global_batch({"x": np.float32(1.0)}, mesh, 16)
    with pytest.raises(
        ConfigError, match="batch.tokens: this process holds 16 of the 16 rows, got 8"
    ):
        make_global_batch({"tokens": local["tokens"][:8]}, mesh, 16)


def test_arrays_placed_with_param_shardings_have_those_specs():
    cfg = get_preset("tiny")
    mesh = make_mesh((2, 4, 1))
    p_abs = abstract_params(cfg)
    shards = param_shardings(p_abs, param_logical_axes(cfg), mesh)
    placed = jax.device_put(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), p_abs), shards)
    emb = placed["embed"]
    assert emb.sharding.spec == P("tensor", "fsdp")
    assert emb.addressable_shards[0].data.shape == (64, 8)


def test_with_mesh_rules_turns_logical_constraints_into_shardings():
    import flax.linen as nn

    from jaxselm.parallel import with_mesh_rules

    mesh = make_mesh((2, 2, 2))

    def f(x):
        return nn.with_logical_constraint(x * 2.0, ("batch", "length", "mlp"))

    x = jnp.ones((8, 4, 6))
    with with_mesh_rules(mesh):
        text = jax.jit(f).lower(x).as_text()
        out = jax.jit(f)(x)
    assert "sharding_constraint" in text
    assert out.sharding.spec == P(("data", "fsdp"), None, "tensor")
    with with_mesh_rules(mesh, activation_constraints=False):
        text = jax.jit(f).lower(x).as_text()
    assert "sharding_constraint" not in text


def test_initialize_distributed_disabled_is_a_no_op():
    from jaxselm.parallel import initialize_distributed

    initialize_distributed(enabled=False)
    assert jax.process_count() == 1
