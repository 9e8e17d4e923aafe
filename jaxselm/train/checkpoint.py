"""Checkpoints with orbax: the train state plus a JSON of loop metadata, keep-N, async, any mesh.

    ckpt = Checkpointer("/runs/selm/ckpt", max_to_keep=3)          # async saves by default
    ckpt.save(state, metadata={"iteration": 1, "phase": "train"})   # step = int(state.step)
    ...
    target = abstract_train_state(model_cfg, tx, new_mesh)          # shapes + target shardings
    state, meta = ckpt.restore(target)                              # latest step, resharded
    ckpt.close()

    save_params("/runs/selm/export/iter1", state.params, model_config=cfg)  # params alone
    params = load_params("/runs/selm/export/iter1", target=abstract_params_with_shardings)

Each array is written by the devices that hold it (tensorstore/zarr, no pickle) and read back
directly into the *target* shardings, so a state saved on a (2, 4, 1) mesh restores onto (8, 1, 1)
or one device. Orbax writes to a temporary directory and renames it when complete, so a crash
never leaves a half-written step that looks valid. A missing or damaged checkpoint raises
:class:`~jaxselm.errors.CheckpointError` with one line naming the path, instead of orbax's
internals (chained as ``__cause__`` for debugging).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxselm.errors import CheckpointError, ConfigError
from jaxselm.model import ModelConfig
from jaxselm.parallel.rules import path_name

_STATE = "state"
_METADATA = "metadata"
_EXPORT_KEY = "jaxselm"  # a params export's custom metadata: {"model": {...}, "head": "lm"}


def _one_line(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _abs(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.fspath(path)))


class Checkpointer:
    """Numbered checkpoints of a train state under one directory (an orbax CheckpointManager)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        create: bool = True,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise CheckpointError(f"checkpoint.max_to_keep: must be >= 1 (got {max_to_keep})")
        self.directory = _abs(directory)
        if not create and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {self.directory}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=create,
        )
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                item_handlers={
                    _STATE: ocp.StandardCheckpointHandler(),
                    _METADATA: ocp.JsonCheckpointHandler(),
                },
            )
        except Exception as err:  # e.g. a file where the directory should be
            raise CheckpointError(
                f"cannot open checkpoint directory {self.directory} ({_one_line(err)})"
            ) from err

    # -- writing ------------------------------------------------------------------------------
    def save(
        self,
        state: Any,
        *,
        step: int | None = None,
        metadata: dict[str, Any] | None = None,
        force: bool = True,
    ) -> bool:
        """Start saving ``state`` (any pytree; a TrainState by default numbered by ``state.step``).

        Returns whether a save was started. With async saving it returns once the arrays are
        copied to host memory; call :meth:`wait` (or :meth:`close`) before relying on the files.
        """
        if step is None:
            step = int(jax.device_get(state.step))
        try:
            return self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{
                        _STATE: ocp.args.StandardSave(state),
                        _METADATA: ocp.args.JsonSave(dict(metadata or {})),
                    }
                ),
                force=force,
            )
        except ocp.checkpoint_manager.StepAlreadyExistsError as err:
            raise CheckpointError(f"{self.directory}: step {step} already exists") from err

    def wait(self) -> None:
        """Block until pending asynchronous saves are written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Completed steps on disk, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _step_dir(self, step: int) -> Path:
        return Path(os.fspath(self._manager.directory)) / str(step)

    def _resolve_step(self, step: int | None) -> int:
        if not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {self.directory}")
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(
                f"checkpoint step {step} not found in {self.directory} (have {steps})"
            )
        return step

    def restore(self, target: Any, *, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """(state, metadata) of ``step`` (default: latest), laid out like ``target``.

        ``target`` is the abstract state: ShapeDtypeStructs carrying the *target* shardings (e.g.
        ``abstract_train_state(config, optimizer, mesh)``) or concrete arrays, whose shardings are
        then used.
        """
        step = self._resolve_step(step)
        where = self._step_dir(step)
        abstract = jax.tree.map(_abstract_leaf, target)
        self._check_matches(step, abstract)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        _STATE: ocp.args.StandardRestore(abstract),
                        _METADATA: ocp.args.JsonRestore(),
                    }
                ),
            )
        except Exception as err:
            raise CheckpointError(
                f"checkpoint {where} is unreadable, corrupted or does not match the target "
                f"({_one_line(err)})"
            ) from err
        return restored[_STATE], dict(restored[_METADATA] or {})

    def saved_shapes(self, step: int | None = None) -> dict[str, tuple[int, ...]]:
        """{"params.embed": shape, ...} of the arrays saved at ``step`` (default: latest)."""
        step = self._resolve_step(step)
        try:
            meta = self._manager.item_metadata(step)[_STATE]
            tree = getattr(meta, "tree", meta)
            if tree is None:
                raise ValueError("no array metadata")
            flat = jax.tree_util.tree_flatten_with_path(tree)[0]
            return {path_name(path): tuple(leaf.shape) for path, leaf in flat}
        except Exception as err:
            raise CheckpointError(
                f"checkpoint {self._step_dir(step)} is unreadable or corrupted ({_one_line(err)})"
            ) from err

    def _check_matches(self, step: int, abstract: Any) -> None:
        """Compare names and shapes with the target before reading any data (clear errors)."""
        saved = self.saved_shapes(step)
        wanted = {
            path_name(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
        }
        where = self._step_dir(step)
        for name in sorted(wanted):
            if name not in saved:
                raise CheckpointError(f"checkpoint {where} does not match the target: no {name!r}")
            if saved[name] != wanted[name]:
                raise CheckpointError(
                    f"checkpoint {where} does not match the target: {name} has shape "
                    f"{saved[name]}, expected {wanted[name]}"
                )
        extra = sorted(set(saved) - set(wanted))
        if extra:
            raise CheckpointError(
                f"checkpoint {where} does not match the target: unexpected {extra[0]!r}"
                + (f" and {len(extra) - 1} more" if len(extra) > 1 else "")
            )

    def restore_metadata(self, *, step: int | None = None) -> dict[str, Any]:
        """The loop metadata JSON of ``step`` (default: latest) without reading any array."""
        step = self._resolve_step(step)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()})
            )
        except Exception as err:
            raise CheckpointError(
                f"checkpoint metadata {self._step_dir(step) / _METADATA} is unreadable "
                f"({_one_line(err)})"
            ) from err
        return dict(restored[_METADATA] or {})


def latest_step(directory: str | os.PathLike) -> int | None:
    """The latest completed step of a checkpoint directory; None when there is none (or no
    directory)."""
    if not _abs(directory).is_dir():
        return None
    with Checkpointer(directory, create=False) as ck:
        return ck.latest_step()


def _abstract_leaf(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


def save_params(
    path: str | os.PathLike,
    params: Any,
    *,
    model_config: ModelConfig | None = None,
    head: str = "lm",
    tokenizer: str | None = None,
    overwrite: bool = False,
) -> None:
    """Write ``params`` alone: a params export (for sampling, evaluation, the next pi_ref).

    With ``model_config`` the export carries it (and ``head``) in its orbax metadata, written in
    the same atomic step as the arrays, so :func:`jaxselm.checkpoints.load_checkpoint` needs
    nothing else to load it; ``tokenizer`` (where the model's tokenizer is: a path) is recorded
    too, for exports to HF or GGUF. Synchronous; ``path`` must not exist unless ``overwrite``.
    """
    where = _abs(path)
    if where.exists() and not overwrite:
        raise CheckpointError(f"params export already exists: {where}")
    meta = None
    if model_config is not None:
        meta = {
            _EXPORT_KEY: {
                "model": model_config.model_dump(mode="json"),
                "head": head,
                "tokenizer": tokenizer,
            }
        }
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(where, params, force=overwrite, custom_metadata=meta)
        ckptr.wait_until_finished()


def _export_meta(path: str | os.PathLike) -> dict[str, Any]:
    where = _abs(path)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            custom = ckptr.metadata(where).custom_metadata or {}
    except Exception as err:
        raise CheckpointError(
            f"params checkpoint {where} is unreadable ({_one_line(err)})"
        ) from err
    return custom.get(_EXPORT_KEY) or {}


def export_tokenizer(path: str | os.PathLike) -> str | None:
    """Where the tokenizer of a params export's model is (recorded when it was saved), or None."""
    return _export_meta(path).get("tokenizer")


def export_metadata(path: str | os.PathLike) -> tuple[ModelConfig, str] | None:
    """(model config, head) a params export carries, or None (an export saved without them)."""
    meta = _export_meta(path)
    if not meta:
        return None
    try:
        # An export written before cope_scaled existed used unscaled CoPE position logits.
        return ModelConfig(**{"cope_scaled": False, **meta["model"]}), str(meta.get("head", "lm"))
    except ConfigError as err:
        raise CheckpointError(f"{_abs(path)}: its model config is invalid ({err})") from None


def load_params(
    path: str | os.PathLike,
    target: Any = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
) -> Any:
    """Params written by :func:`save_params`, laid out like ``target`` (see Checkpointer.restore).

    Without ``target`` the saved tree is read with every array replicated on ``mesh`` (default:
    the first device).
    """
    where = _abs(path)
    if not where.is_dir():
        raise CheckpointError(f"params checkpoint not found: {where}")
    with ocp.StandardCheckpointer() as ckptr:
        try:
            if target is None:
                meta = ckptr.metadata(where)
                tree = getattr(meta, "item_metadata", meta)
                tree = getattr(tree, "tree", tree)
                if mesh is None:
                    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
                else:
                    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
                target = jax.tree.map(
                    lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree
                )
            return ckptr.restore(where, jax.tree.map(_abstract_leaf, target))
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(
                f"params checkpoint {where} is unreadable, corrupted or does not match the "
                f"target ({_one_line(err)})"
            ) from err
