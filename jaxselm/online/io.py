"""Atomic files: every phase output is written to a temporary name in the same folder, flushed,
fsynced and renamed, so a run killed at any moment leaves either the old file or the new one,
never half of one. Arrays go to safetensors (no pickle), everything else to JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from jaxselm.errors import CheckpointError


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    data = json.dumps(obj, indent=1, sort_keys=True).encode()
    _atomic(Path(path), lambda f: f.write(data))


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
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(arrays, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    try:
        return load_file(os.fspath(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as err:  # safetensors raises its own error types for truncated headers
        raise CheckpointError(f"{path}: unreadable safetensors file ({err.__class__.__name__})") from None
