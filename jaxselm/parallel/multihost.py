"""Multi-host helpers: start the distributed runtime, keep every process's host-side view equal.

JAX on a TPU pod slice (or a multi-node GPU cluster) is multi-controller: every host runs the same
program on its own devices, and a jitted function over a global mesh runs only when *every*
process calls it. These helpers are what the online loop needs to stay in lockstep:

    initialize_distributed()                   # once, before any other jax call (the CLI does it)
    mesh = make_mesh(cfg.mesh)                 # over jax.devices(): all hosts' devices
    x = jax.device_put(np_batch, sharding)     # identical host data on every process -> global
    out = to_host(jitted(params, x))           # every process gets the full numpy result
    if is_primary(): write_json(path, out)     # files, logs, metrics: process 0 only
    barrier("wrote-" + path.name)              # ... then the others may read them
    if any_process(sigterm_flag.raised): ...   # decisions that lead to collectives, agreed

Where the processes come from:

* Cloud TPU VM: ``jax.distributed.initialize()`` detects everything from the TPU metadata.
* GPU clusters under SLURM (or Open MPI): also detected by JAX (``srun`` one process per node or
  per GPU); see docs/multinode-gpu.md.
* Anywhere else, explicitly: ``JAXSELM_COORDINATOR=host:port``, ``JAXSELM_NUM_PROCESSES``,
  ``JAXSELM_PROCESS_ID`` (and optionally ``JAXSELM_LOCAL_DEVICE_IDS=0,1``). On CPU
  (``JAX_PLATFORMS=cpu``) the collectives go through gloo, so two processes on one machine
  (127.0.0.1) form a real multi-process run: that is how the tests exercise these code paths.

A process started without its peers would wait inside JAX's connect call and then abort the whole
interpreter with a C++ stack trace. Instead the connection runs in a helper thread that the main
thread waits for at most ``JAXSELM_INIT_TIMEOUT`` seconds (default 300); past that it raises
:class:`DistributedError` (one line naming the coordinator and the missing peers), which the CLI
prints before exiting with status 2 (at once, with ``os._exit``: the blocked runtime cannot be shut
down cleanly).

With one process (a laptop, one GPU machine, the tests) every helper is a no-op or the identity,
so single-process code paths and results are untouched.

:func:`local_batch_rows` / :func:`make_global_batch` serve the data path: each host loads only
the rows of a global batch its devices hold, and the global array is assembled from those.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxselm.errors import ConfigError, JaxselmError
from jaxselm.parallel.rules import LOGICAL_AXIS_RULES, Rules, batch_sharding, path_name

ENV_COORDINATOR = "JAXSELM_COORDINATOR"
ENV_NUM_PROCESSES = "JAXSELM_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXSELM_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAXSELM_LOCAL_DEVICE_IDS"
ENV_INIT_TIMEOUT = "JAXSELM_INIT_TIMEOUT"
ENV_CPU_COLLECTIVES = "JAXSELM_CPU_COLLECTIVES"
DEFAULT_INIT_TIMEOUT_S = 300.0
# JAX's own connect timeout is set this much longer than ours, so ours always fires first (JAX's
# ends in a process abort, ours in a clean error).
_JAX_TIMEOUT_MARGIN_S = 60


class DistributedError(JaxselmError):
    """The multi-process runtime cannot start (bad settings, no peers, no cluster detected)."""

    #: True when JAX's connect call is still blocked in a helper thread: the process cannot tear
    #: the half-started runtime down cleanly (its C++ service logs and may abort at interpreter
    #: exit), so the CLI leaves with ``os._exit`` right after printing the error line.
    abandon_process: bool = False


def wants_distributed(env: Mapping[str, str] | None = None) -> bool:
    """True when the environment asks for explicit multi-process mode (JAXSELM_COORDINATOR or
    JAXSELM_NUM_PROCESSES is set)."""
    env = os.environ if env is None else env
    return bool(env.get(ENV_COORDINATOR) or env.get(ENV_NUM_PROCESSES))


def _env_int(env: Mapping[str, str], name: str, *, minimum: int) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise DistributedError(f"{name}: expected an integer, got {raw!r}") from None
    if value < minimum:
        raise DistributedError(f"{name}: must be >= {minimum}, got {value}")
    return value


def _env_float(env: Mapping[str, str], name: str) -> float | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise DistributedError(f"{name}: expected a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise DistributedError(f"{name}: must be > 0 seconds, got {raw}")
    return value


def settings_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The explicit-mode settings from JAXSELM_* environment variables (None where unset)."""
    env = os.environ if env is None else env
    ids = env.get(ENV_LOCAL_DEVICE_IDS)
    local_ids = None
    if ids:
        try:
            local_ids = [int(x) for x in ids.split(",") if x.strip()]
        except ValueError:
            raise DistributedError(
                f"{ENV_LOCAL_DEVICE_IDS}: expected e.g. 0,1,2,3, got {ids!r}"
            ) from None
    return {
        "coordinator_address": env.get(ENV_COORDINATOR) or None,
        "num_processes": _env_int(env, ENV_NUM_PROCESSES, minimum=1),
        "process_id": _env_int(env, ENV_PROCESS_ID, minimum=0),
        "local_device_ids": local_ids,
        "timeout_s": _env_float(env, ENV_INIT_TIMEOUT),
    }


def _check_explicit(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> None:
    given = {
        ENV_COORDINATOR: coordinator,
        ENV_NUM_PROCESSES: num_processes,
        ENV_PROCESS_ID: process_id,
    }
    if all(v is None for v in given.values()):
        return  # auto-detection (TPU, SLURM, Open MPI)
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise DistributedError(
            f"{missing[0]}: required when {ENV_COORDINATOR} / {ENV_NUM_PROCESSES} / "
            f"{ENV_PROCESS_ID} are used (set all three)"
        )
    host, sep, port = str(coordinator).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DistributedError(f"{ENV_COORDINATOR}: expected host:port, got {coordinator!r}")
    if process_id >= num_processes:  # type: ignore[operator]
        raise DistributedError(
            f"{ENV_PROCESS_ID}: {process_id} is not below {ENV_NUM_PROCESSES}={num_processes}"
        )


def _use_cpu_collectives(cpu_collectives: str | None, env: Mapping[str, str]) -> str | None:
    if cpu_collectives is not None:
        return cpu_collectives or None
    if env.get(ENV_CPU_COLLECTIVES):
        return env[ENV_CPU_COLLECTIVES]
    platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    return "gloo" if platforms == ["cpu"] else None


def initialize_distributed(
    enabled: bool = True,
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
    timeout_s: float | None = None,
    cpu_collectives: str | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Start JAX's multi-process runtime (no-op when ``enabled`` is False or it already runs).

    Arguments left None come from the JAXSELM_* environment variables; with none of them set JAX
    auto-detects the cluster (Cloud TPU, SLURM, Open MPI). ``cpu_collectives`` ("gloo", or "" for
    none) defaults to gloo when ``JAX_PLATFORMS=cpu``. Raises :class:`DistributedError` when the
    settings are inconsistent, no cluster is detected, or the peers do not all connect within
    ``timeout_s`` (default ``JAXSELM_INIT_TIMEOUT`` or 300 s). Must run before any other JAX call.
    """
    if not enabled or jax.distributed.is_initialized():
        return
    env = os.environ if env is None else env
    from_env = settings_from_env(env)
    coordinator_address = coordinator_address or from_env["coordinator_address"]
    num_processes = num_processes if num_processes is not None else from_env["num_processes"]
    process_id = process_id if process_id is not None else from_env["process_id"]
    local_device_ids = (
        local_device_ids if local_device_ids is not None else from_env["local_device_ids"]
    )
    timeout = (
        timeout_s if timeout_s is not None else (from_env["timeout_s"] or DEFAULT_INIT_TIMEOUT_S)
    )
    _check_explicit(coordinator_address, num_processes, process_id)

    collectives = _use_cpu_collectives(cpu_collectives, env)
    if collectives:
        try:
            jax.config.update("jax_cpu_collectives_implementation", collectives)
        except (AttributeError, KeyError, ValueError) as err:  # option renamed in a later JAX
            raise DistributedError(
                f"{ENV_CPU_COLLECTIVES}: this JAX does not accept "
                f"{collectives!r} CPU collectives ({err})"
            ) from err

    result: dict[str, BaseException] = {}

    def connect() -> None:
        try:
            jax.distributed.initialize(
                coordinator_address=coordinator_address,
                num_processes=num_processes,
                process_id=process_id,
                local_device_ids=local_device_ids,
                initialization_timeout=int(timeout) + _JAX_TIMEOUT_MARGIN_S,
            )
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            result["error"] = err

    # A daemon thread: if the peers never come, the main thread raises and the process exits
    # while JAX is still waiting (its own timeout would abort the interpreter instead).
    worker = threading.Thread(target=connect, name="jaxselm-distributed-init", daemon=True)
    worker.start()
    worker.join(timeout)
    where = coordinator_address or "the auto-detected coordinator"
    if worker.is_alive():
        who = f"process {process_id} of {num_processes}" if num_processes else "this process"
        err = DistributedError(
            f"distributed init: {who} waited {timeout:g}s at {where} and not all processes "
            f"connected (start every process with the same {ENV_COORDINATOR} and "
            f"{ENV_NUM_PROCESSES}, or raise {ENV_INIT_TIMEOUT})"
        )
        err.abandon_process = True
        raise err
    err = result.get("error")
    if err is not None:
        text = " ".join(str(err).split())[:300]
        if coordinator_address is None and isinstance(err, ValueError):
            raise DistributedError(
                f"distributed init: no TPU / SLURM / Open MPI cluster detected ({text}); set "
                f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}"
            ) from err
        raise DistributedError(
            f"distributed init at {where} failed: {type(err).__name__}: {text}"
        ) from err


def is_primary() -> bool:
    """True on the process that writes files, logs and metrics (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches ``barrier(name)`` (no-op with one process).

    Every process must call it with the same names in the same order."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is True on at least one (identity with one process).

    Used for decisions that lead to collectives (e.g. "SIGTERM seen: checkpoint now"), which all
    processes must take together."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))
    return bool(np.asarray(flags).any())


def from_primary(value: int) -> int:
    """Process 0's ``value`` on every process (identity with one process).

    For decisions read from shared storage ("is this phase's file already there?") that lead to
    collectives: each process looking for itself races with process 0 writing the file (a host
    that looks a moment later skips a phase the others run, and the pair waits in different
    collectives for ever). Every process must call it at the same point."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.asarray(int(value), np.int32)))


def _leaf_to_host(x: Any) -> Any:
    if not isinstance(x, jax.Array):
        return x
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x) if x.is_fully_addressable else x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_host(tree: Any) -> Any:
    """``jax.device_get`` that also works for global arrays spanning other hosts' devices.

    Sharded leaves are all-gathered (every process gets the whole value), so every process must
    call it on the same arrays. With one process it is ``jax.device_get``."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return jax.tree.map(_leaf_to_host, tree)


def process_max(value: int) -> int:
    """The largest ``value`` over all processes (identity with one process)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(
        np.asarray(multihost_utils.process_allgather(np.asarray([int(value)], np.int64))).max()
    )


def local_batch_rows(
    global_size: int, mesh: jax.sharding.Mesh, rules: Rules = LOGICAL_AXIS_RULES
) -> np.ndarray:
    """Rows ``[k]`` (sorted, int64) of a global batch of ``global_size`` rows that this process's
    devices hold under the batch sharding; the only rows this process must load.

    Read from the sharding itself, so it is right for any mesh layout (hosts need not own
    contiguous blocks). When the batch cannot be split over the batch mesh axes it is
    replicated and every process holds (and loads) every row. With one process: all rows.
    """
    if global_size < 1:
        raise ConfigError(f"batch size: must be >= 1, got {global_size}")
    if jax.process_count() == 1:
        return np.arange(global_size, dtype=np.int64)
    sharding = batch_sharding((global_size,), mesh, rules)
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((global_size,)).values():
        rows.update(range(*index[0].indices(global_size)))
    return np.asarray(sorted(rows), dtype=np.int64)


def make_global_batch(
    local_batch: Any,
    mesh: jax.sharding.Mesh,
    global_size: int,
    rules: Rules = LOGICAL_AXIS_RULES,
) -> Any:
    """Global batch arrays (leading "batch" dim sharded per the rules) from this process's rows.

    ``local_batch`` is a pytree (a typed batch of :mod:`jaxselm.data.packing`, or a dict) whose
    arrays hold the rows ``local_batch_rows(global_size, mesh, rules)`` of the global batch, in
    that order; no process ever materialises the others' rows. The sharding is the one the train
    step expects, so the result feeds it without resharding. With one process the (whole) numpy
    batch is returned unchanged: the step places it as before.
    """
    rows = local_batch_rows(global_size, mesh, rules)

    def check(path: Any, local: Any) -> None:
        name = ".".join(("batch", path_name(path)))
        if np.ndim(local) == 0:
            raise ConfigError(f"{name}: expected a leading batch dimension, got a scalar")
        if np.shape(local)[0] != len(rows):
            raise ConfigError(
                f"{name}: this process holds {len(rows)} of the {global_size} "
                f"rows, got {np.shape(local)[0]}"
            )

    jax.tree_util.tree_map_with_path(check, local_batch)
    if jax.process_count() == 1:
        return local_batch
    where = {int(r): i for i, r in enumerate(rows)}

    def assemble(local: Any) -> jax.Array:
        local = np.asarray(local)
        shape = (global_size, *local.shape[1:])

        def shard(index: tuple) -> np.ndarray:
            picked = [where[r] for r in range(*index[0].indices(global_size))]
            return local[picked][(slice(None), *index[1:])]

        return jax.make_array_from_callback(shape, batch_sharding(shape, mesh, rules), shard)

    return jax.tree.map(assemble, local_batch)
