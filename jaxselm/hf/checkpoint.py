"""Hugging Face safetensors checkpoints -> jaxselm parameter pytrees, streamed.

The directory layout and which HF tensor fills which parameter are in :mod:`jaxselm.hf.layout`.
jaxselm stacks per-layer weights along a leading "layers" axis, so loading fills one stacked
parameter at a time: allocate it, copy the L per-layer HF tensors into it (read one by one
through ``safetensors.safe_open``, which memory-maps the file), move it to its devices, free the
host buffer, go on. Host memory therefore peaks at about one stacked parameter above what is
already on the devices: a 7-8B model never exists twice in host memory. Saving, the other way,
is :mod:`jaxselm.hf.export`.

    from jaxselm.hf import load_hf_checkpoint, save_hf_checkpoint
    cfg, params = load_hf_checkpoint("Meta-Llama-3-8B-Instruct", dtype="bfloat16")
    save_hf_checkpoint(cfg, params, "out/policy-iter1", dtype="bfloat16", max_shard_size="5GB")

Every problem with the files (missing or truncated file, missing or unexpected tensor, wrong
shape or dtype) raises a one-line CheckpointError naming the file and tensor; config problems a
ConfigError naming config.json and the key. Pickle-based ``.bin`` weights are never read.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from jaxselm.errors import CheckpointError, ConfigError
from jaxselm.hf.config import Head, hf_architecture, hf_config_to_model_config
from jaxselm.hf.layout import (
    CONFIG_NAME,
    INDEX_NAME,
    NP_DTYPES,
    SINGLE_NAME,
    ST_DTYPES,
    TensorSpec,
    assemble_params,
    tensor_layout,
)
from jaxselm.model.config import ModelConfig

# Buffers older checkpoints carry that HF itself recomputes and ignores.
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def _read_json(path: Path, error: type[Exception]) -> Any:
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(
            f"{path}: not valid JSON ({err.__class__.__name__}: {str(err).splitlines()[0]})"
        ) from None


def _weight_map(root: Path) -> dict[str, Path]:
    """HF tensor name -> the file that holds it."""
    index_path, single = root / INDEX_NAME, root / SINGLE_NAME
    if index_path.is_file():
        index = _read_json(index_path, CheckpointError)
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(f, str) for f in wm.values()):
            raise CheckpointError(
                f"{index_path}: weight_map: missing or not an object of file names"
            )
        files = {}
        for name, fname in wm.items():
            if "/" in fname or "\\" in fname or fname in ("", ".", ".."):
                raise CheckpointError(
                    f"{index_path}: weight_map[{name!r}]: bad file name {fname!r}"
                )
            files[name] = root / fname
        for p in sorted(set(files.values())):
            if not p.is_file():
                raise CheckpointError(f"{p}: file not found (listed in {index_path.name})")
        return files
    if single.is_file():
        with _open(single) as fh:
            return dict.fromkeys(fh.keys(), single)
    pickled = sorted(p.name for p in root.glob("*.bin")) + sorted(
        p.name for p in root.glob("*.pt*")
    )
    hint = (
        f" (found {pickled[0]}: pickle-based weights are never loaded; convert them to safetensors)"
        if pickled
        else ""
    )
    raise CheckpointError(f"{root}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")


@contextlib.contextmanager
def _open(path: Path):
    try:
        handle = safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({_one_line(err)})"
        ) from None
    with handle as fh:
        yield fh


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{err.__class__.__name__}: {text[0]}" if text else err.__class__.__name__


def _read_raw(path: Path, name: str) -> np.ndarray:
    """A tensor read straight from the file's header and byte range, for any float dtype.

    The fallback for safetensors versions whose numpy backend does not know bfloat16.
    """
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        info = header[name]
        start, end = info["data_offsets"]
        dtype = NP_DTYPES[ST_DTYPES[info["dtype"]]].newbyteorder("<")
        fh.seek(8 + n + start)
        buf = fh.read(end - start)
    if len(buf) != end - start:
        raise CheckpointError(f"{path}: tensor {name}: file is truncated")
    return np.frombuffer(buf, dtype=dtype).reshape(info["shape"])


class _Reader:
    """Opens each shard once, lazily, and reads tensors by name with checks."""

    def __init__(self, files: Mapping[str, Path], stack: contextlib.ExitStack):
        self._files = files
        self._stack = stack
        self._handles: dict[Path, Any] = {}

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(_open(path))
        return self._handles[path]

    def read(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        path = self._files[name]
        fh = self._handle(path)
        try:
            sl = fh.get_slice(name)
        except SafetensorError:
            raise CheckpointError(
                f"{path}: tensor {name} not found in the file (the index lists it there)"
            ) from None
        st_dtype, got_shape = sl.get_dtype(), tuple(sl.get_shape())
        if st_dtype not in ST_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name}: unsupported dtype {st_dtype} (float32/bfloat16/float16)"
            )
        if got_shape != shape:
            raise CheckpointError(
                f"{path}: tensor {name}: shape {list(got_shape)} does not match "
                f"the config's {list(shape)}"
            )
        try:
            return fh.get_tensor(name)
        except TypeError:  # old safetensors: numpy backend without bfloat16
            return _read_raw(path, name)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: tensor {name}: unreadable ({_one_line(err)})") from None


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The raw ``config.json`` dict of a checkpoint directory (ConfigError if unreadable)."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    hf = _read_json(root / CONFIG_NAME, ConfigError)
    if not isinstance(hf, dict):
        raise ConfigError(f"{root / CONFIG_NAME}: must be a JSON object")
    return hf


def load_hf_checkpoint(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    head: Head | None = None,
    shardings: Any = None,
) -> tuple[ModelConfig, dict]:
    """``(ModelConfig, params)`` of an HF Llama / Mistral checkpoint directory.

    dtype: parameter (and compute) dtype, "float32" | "bfloat16" | "float16"; default the
        config's ``torch_dtype`` (else float32). Tensors are cast one by one while loading.
    head: "lm" (CausalLM) or "reward" (SequenceClassification, ``score`` head); default from
        the config's ``architectures``; a mismatch is refused.
    shardings: optional ``jax.sharding.Sharding``, or a pytree of them like the params; each
        parameter is placed with it as soon as it is assembled (default: the default device).
        Every process reads the whole parameter and keeps the pieces its devices hold.
    """
    root = Path(path)
    hf = read_hf_config(root)
    source = str(root / CONFIG_NAME)
    if dtype is not None and dtype not in NP_DTYPES:
        raise ConfigError(f"dtype: must be one of {', '.join(NP_DTYPES)} (got {dtype!r})")
    _, arch_head = hf_architecture(hf, source=source)
    if head is not None and head != arch_head:
        raise ConfigError(
            f"{source}: architectures: {hf.get('architectures')} has a {arch_head!r} head, "
            f"but head={head!r} was requested"
        )
    cfg = hf_config_to_model_config(hf, source=source, dtype=dtype)
    specs = tensor_layout(cfg, arch_head)
    files = _weight_map(root)

    expected = {n for s in specs for n in s.hf_names(cfg.num_layers)}
    for name in sorted(expected):
        if name not in files:
            where = INDEX_NAME if (root / INDEX_NAME).is_file() else SINGLE_NAME
            raise CheckpointError(f"{root / where}: missing tensor {name}")
    allowed_extra = (
        {"lm_head.weight"} if cfg.tie_embeddings else set()
    )  # some exports keep a tied copy
    for name in sorted(files):
        if name not in expected and name not in allowed_extra and not _IGNORED.match(name):
            raise CheckpointError(
                f"{files[name]}: unexpected tensor {name} (not part of a {cfg.num_layers}-layer "
                f"{hf.get('architectures', ['model'])[0]} with this config)"
            )

    with contextlib.ExitStack() as stack:
        reader = _Reader(files, stack)

        def read(spec: TensorSpec, layer: int) -> np.ndarray:
            name = spec.hf_name.format(layer) if spec.stacked else spec.hf_name
            return spec.to_ours(reader.read(name, spec.hf_shape))

        params = assemble_params(specs, cfg.num_layers, NP_DTYPES[cfg.param_dtype], read, shardings)
    return cfg, params
