"""Device meshes from config: three named axes ``("data", "fsdp", "tensor")``.

    from jaxselm.parallel import MeshConfig, make_mesh
    mesh = make_mesh(MeshConfig(data=-1, fsdp=4, tensor=1))   # 8 devices -> (2, 4, 1)

Why three axes: ``data`` replicates parameters and splits the batch (cheap, needs memory for a whole
model copy per group), ``fsdp`` splits the batch *and* shards parameters and optimizer state along
their ``embed`` dimension (ZeRO-3: all-gathered per layer in the forward), ``tensor`` shards the
inner dimensions of attention and MLP (Megatron style, for models whose layers do not fit a chip).
One entry may be ``-1``: it takes whatever is left of the device count. A shape whose product does
not match the devices raises :class:`~jaxselm.errors.ConfigError` naming the field.

The device order comes from :func:`jax.make_mesh`, which lays the last mesh axis along the fastest
interconnect (ICI on TPU), so ``tensor`` (the most communication-hungry axis) gets it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import jax
import numpy as np
from pydantic import field_validator

from jaxselm.config_base import FrozenConfig
from jaxselm.errors import ConfigError

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")


class MeshConfig(FrozenConfig):
    """Sizes of the three mesh axes; ``-1`` (at most one) means "the rest of the devices"."""

    _error_prefix: ClassVar[str] = "mesh"

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    @field_validator("data", "fsdp", "tensor")
    @classmethod
    def _size(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be >= 1 or -1 (the rest of the devices)")
        return v

    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


def resolve_mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """The concrete (data, fsdp, tensor) sizes for ``num_devices`` devices."""
    sizes = dict(zip(MESH_AXES, config.shape()))
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh.{free[1]}: only one axis may be -1 (also mesh.{free[0]})")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh.{free[0]}: -1 cannot fill {num_devices} devices, the other axes use {fixed}"
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        shown = " * ".join(f"{n}={s}" for n, s in sizes.items())
        raise ConfigError(f"mesh: {shown} uses {fixed} devices but {num_devices} are available")
    return (sizes["data"], sizes["fsdp"], sizes["tensor"])


def make_mesh(
    config: MeshConfig | Sequence[int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> jax.sharding.Mesh:
    """A ``Mesh`` with axes ("data", "fsdp", "tensor") over ``devices`` (default: all devices).

    ``config`` is a :class:`MeshConfig`, a ``(data, fsdp, tensor)`` tuple, or None (pure data
    parallelism). The axes use ``AxisType.Auto`` so XLA's partitioner propagates shardings from
    the ``in_shardings`` and the model's logical constraints.
    """
    if config is None:
        config = MeshConfig()
    elif not isinstance(config, MeshConfig):
        config = MeshConfig(**dict(zip(MESH_AXES, (int(s) for s in config))))
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(config, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    # A subset of the devices (tests, benchmarks): keep the given order.
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def single_device_mesh(device: jax.Device | None = None) -> jax.sharding.Mesh:
    """A (1, 1, 1) mesh over one device: the same code path as a pod, on a laptop."""
    return make_mesh((1, 1, 1), devices=[device if device is not None else jax.devices()[0]])
