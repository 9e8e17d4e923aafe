"""Multi-host helpers: start the distributed runtime, split the global batch, assemble it back.

On a TPU pod every host (process) runs the same program and loads only its share of each global
batch; :func:`make_global_batch` turns the per-process numpy arrays into global ``jax.Array``s laid
out by the batch sharding, without any host ever holding the whole batch
(``jax.make_array_from_process_local_data``). With one process (a laptop, one GPU machine, the
tests) the same calls work unchanged: the local batch is the global batch.

    initialize_distributed(enabled=cfg.multi_host)            # once, before any other jax call
    lo, hi = process_batch_rows(global_batch_size=256)         # rows this host loads
    batch = make_global_batch({"chosen_tokens": np_tokens[lo:hi], ...}, mesh)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxselm.errors import ConfigError
from jaxselm.parallel.rules import LOGICAL_AXIS_RULES, Rules, batch_sharding


def initialize_distributed(
    enabled: bool = True,
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Start JAX's multi-process runtime (no-op when ``enabled`` is False or it already runs).

    On Cloud TPU and SLURM/Open MPI clusters the arguments are detected automatically; elsewhere
    give the coordinator's ``host:port``, the number of processes and this process's id.
    """
    if not enabled:
        return
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def process_batch_rows(global_batch_size: int) -> tuple[int, int]:
    """The ``[lo, hi)`` rows of each global batch this process loads (contiguous, equal shares)."""
    n = jax.process_count()
    if global_batch_size % n:
        raise ConfigError(
            f"train.batch_size: {global_batch_size} is not divisible by the {n} processes"
        )
    per = global_batch_size // n
    return jax.process_index() * per, (jax.process_index() + 1) * per


def make_global_batch(
    local_batch: Mapping[str, Any],
    mesh: jax.sharding.Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
) -> dict[str, jax.Array]:
    """Global arrays (leading "batch" dim sharded per the rules) from this process's rows.

    Every process passes arrays with the same per-process leading size; the global leading size
    is that times ``jax.process_count()``. The sharding is the one the train step expects, so the
    result can be fed to it without resharding.
    """
    n = jax.process_count()
    out: dict[str, jax.Array] = {}
    for name, local in local_batch.items():
        local = np.asarray(local)
        if local.ndim == 0:
            raise ConfigError(f"batch.{name}: expected a leading batch dimension, got a scalar")
        global_shape = (local.shape[0] * n, *local.shape[1:])
        sharding = batch_sharding(global_shape, mesh, rules)
        if n > 1 and sharding.spec[:1] in ((), (None,)):
            raise ConfigError(
                f"batch.{name}: global batch {global_shape[0]} cannot be split over the batch "
                f"mesh axes {dict(mesh.shape)}"
            )
        out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out
