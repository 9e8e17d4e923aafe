"""The one logical-axis rule table and the NamedShardings it gives params, opt state, batches.

The model names every parameter and activation dimension with a *logical* axis ("vocab", "embed",
"mlp", "heads", "kv_heads", "head_dim", "layers", "cope_pos", "batch", "length");
:data:`LOGICAL_AXIS_RULES` maps those names to the *mesh* axes ("data", "fsdp", "tensor").
Rules are applied in order and a mesh axis is used at most once per array (Flax semantics), which
is what makes one table serve both parameters and activations:

- activations ``[batch, length, embed]``: ``batch`` comes first and takes ("data", "fsdp"), so
  ``embed`` finds "fsdp" taken and stays whole -> data parallelism over data x fsdp;
- parameters ``[embed, mlp]``: no batch dimension, so ``embed`` is sharded over "fsdp" (ZeRO-3)
  and ``mlp`` over "tensor" (Megatron).

A dimension that its mesh axes do not divide (a 4-head toy model on a 8-way tensor axis) is not an
error: :func:`logical_to_mesh_spec` keeps the longest prefix of those mesh axes that divides it and
replicates over the rest, so every preset runs on every mesh.

    mesh = make_mesh((2, 4, 1))
    p_shard = param_shardings(abstract_params, param_logical_axes(cfg), mesh)
    o_shard = opt_state_shardings(optimizer, abstract_params, p_shard, mesh)
    b_shard = batch_shardings(batch, mesh)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),  # first: activations take fsdp for the batch, not for embed
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("embed", "fsdp"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
    ("cope_pos", None),
)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def _axis_tuple(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def fit_spec_to_shape(
    spec: PartitionSpec, shape: Sequence[int], mesh: jax.sharding.Mesh
) -> PartitionSpec:
    """``spec`` with each dimension's mesh axes cut to the longest prefix that divides its size."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    out = []
    for size, entry in zip(shape, entries):
        axes = _axis_tuple(entry)
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def logical_to_mesh_spec(
    logical: PartitionSpec | Sequence[str | None],
    shape: Sequence[int],
    mesh: jax.sharding.Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """Mesh PartitionSpec for an array of ``shape`` whose dims carry the ``logical`` names."""
    names = tuple(logical) + (None,) * (len(shape) - len(tuple(logical)))
    mesh_spec = nn.logical_to_mesh_axes(names, rules)
    return fit_spec_to_shape(mesh_spec, shape, mesh)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """A fully replicated NamedSharding on ``mesh`` (scalars, step counters, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(
    params: Any, logical_axes: Any, mesh: jax.sharding.Mesh, rules: Rules = LOGICAL_AXIS_RULES
) -> Any:
    """NamedShardings for ``params`` (arrays or ShapeDtypeStructs) from their logical axis names.

    ``logical_axes`` has the structure of ``params`` with a ``PartitionSpec`` of logical names per
    leaf (what ``jaxselm.model.param_logical_axes`` returns).
    """

    def one(spec: PartitionSpec, leaf: Any) -> NamedSharding:
        return NamedSharding(mesh, logical_to_mesh_spec(spec, leaf.shape, mesh, rules))

    return jax.tree.map(one, logical_axes, params, is_leaf=_is_spec)


def opt_state_shardings(
    optimizer: optax.GradientTransformation,
    params: Any,
    params_shardings: Any,
    mesh: jax.sharding.Mesh,
) -> Any:
    """NamedShardings for ``optimizer.init(params)``: moments like their params, rest replicated.

    The state's structure comes from ``jax.eval_shape`` (nothing is allocated); optax's
    ``tree_map_params`` finds the sub-trees shaped like the params (Adam's mu and nu), which take
    the params' shardings; counters and other leaves are replicated.
    """
    abstract = jax.eval_shape(optimizer.init, params)
    return optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract,
        params_shardings,
        transform_non_params=lambda _: replicated(mesh),
    )


def path_name(path: tuple) -> str:
    """ "layers.attn.q_proj.kernel" from a pytree key path (dict keys, fields, indices)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def batch_sharding(
    shape: Sequence[int], mesh: jax.sharding.Mesh, rules: Rules = LOGICAL_AXIS_RULES
) -> NamedSharding:
    """Sharding of a batch array of ``shape``: leading dim is "batch", the rest replicated."""
    return NamedSharding(mesh, logical_to_mesh_spec(("batch",), shape, mesh, rules))


def batch_shardings(batch: Any, mesh: jax.sharding.Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """:func:`batch_sharding` for every leaf of a batch pytree (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda x: batch_sharding(x.shape, mesh, rules), batch)


def with_mesh_rules(
    mesh: jax.sharding.Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
    *,
    activation_constraints: bool = True,
) -> contextlib.ExitStack:
    """Context for tracing a step: the logical-axis ``rules`` and (optionally) ``mesh`` as ambient.

    With ``activation_constraints`` the mesh is installed with ``jax.set_mesh``, which is what makes
    Flax turn the model's ``with_logical_constraint`` calls into sharding constraints (the legacy
    ``with mesh:`` no longer does). Without it those calls are no-ops and XLA propagates the
    shardings of the jit inputs on its own.
    """
    stack = contextlib.ExitStack()
    if activation_constraints:
        stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    return stack
