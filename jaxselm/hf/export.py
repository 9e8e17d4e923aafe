"""jaxselm parameter pytrees -> Hugging Face safetensors checkpoints, streamed.

Saving writes one tensor at a time straight into the shard files, whose headers are written
first (safetensors' layout is a length-prefixed JSON header followed by the raw little-endian
bytes, so it is written here without building a shard in memory). Shards are
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` (a single
``model.safetensors`` when everything fits), beside ``config.json``; the tensor names and
conversions are :func:`jaxselm.hf.layout.tensor_layout`'s. Loading is
:mod:`jaxselm.hf.checkpoint`.

    from jaxselm.hf import save_hf_checkpoint
    save_hf_checkpoint(cfg, params, "out/policy-iter1", dtype="bfloat16", max_shard_size="5GB")
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxselm.errors import CheckpointError, ConfigError
from jaxselm.hf.config import Head, model_config_to_hf_config
from jaxselm.hf.layout import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    INDEX_NAME,
    NP_DTYPES,
    SINGLE_NAME,
    ST_NAMES,
    TensorSpec,
    param_leaves,
    tensor_layout,
)
from jaxselm.model.config import ModelConfig
from jaxselm.parallel.multihost import any_process, is_primary, to_host

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes of an int or a string like "5GB" (10^9, as transformers counts) or "512MiB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = _SIZE.match(str(size))
        if not m:
            raise ConfigError(
                f"max_shard_size: cannot parse {size!r} (e.g. '5GB', '500MB', 1000000)"
            )
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if value < 1:
        raise ConfigError(f"max_shard_size: must be >= 1 byte (got {size!r})")
    return value


def _tensors(
    cfg: ModelConfig, params: Mapping, specs: list[TensorSpec], np_dtype: np.dtype
) -> tuple[list[tuple[str, tuple[int, ...]]], Callable[[str], np.ndarray]]:
    """(HF name, shape) of every tensor in HF order, and a function producing one tensor."""
    leaves = param_leaves(params, specs)
    owner = {
        name: (spec, i) for spec in specs for i, name in enumerate(spec.hf_names(cfg.num_layers))
    }
    order = []
    # HF order: embeddings, then layer by layer, then the final norm and the head.
    order.append("model.embed_tokens.weight")
    for layer in range(cfg.num_layers):
        order += [s.hf_name.format(layer) for s in specs if s.stacked]
    order += [
        s.hf_name for s in specs if not s.stacked and s.hf_name != "model.embed_tokens.weight"
    ]

    def produce(name: str) -> np.ndarray:
        spec, i = owner[name]
        leaf = leaves[spec.path]
        part = leaf[i] if spec.stacked else leaf
        arr = np.asarray(to_host(part))  # gathered from the other hosts when sharded across them
        return np.ascontiguousarray(spec.to_hf(arr).astype(np_dtype, copy=False))

    return [(n, owner[n][0].hf_shape) for n in order], produce


def _write_safetensors(
    path: Path,
    names: list[tuple[str, tuple[int, ...]]],
    dtype: str,
    produce: Callable[[str], np.ndarray],
) -> None:
    """Write one safetensors file, tensor by tensor (header first: all shapes are known)."""
    itemsize = NP_DTYPES[dtype].itemsize
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in names:
        nbytes = math.prod(shape) * itemsize
        header[name] = {
            "dtype": ST_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (
        -len(blob) % 8
    )  # the format allows space padding; keeps the data 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, shape in names:
            arr = produce(name)
            assert arr.shape == tuple(shape), (name, arr.shape, shape)
            if sys.byteorder != "little":
                arr = arr.byteswap().view(arr.dtype.newbyteorder("<"))
            fh.write(arr.reshape(-1).view(np.uint8).data)
        fh.flush()
        os.fsync(fh.fileno())


def _shard(
    names: list[tuple[str, tuple[int, ...]]], itemsize: int, max_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split in order; a tensor bigger than the limit gets its own shard (as in HF)."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in names:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def save_hf_checkpoint(
    config: ModelConfig,
    params: Mapping,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    dtype: str | None = None,
    head: Head = "lm",
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write ``params`` as an HF checkpoint directory that ``from_pretrained`` loads.

    Shards ``model-0000i-of-0000n.safetensors`` of at most ``max_shard_size`` plus
    ``model.safetensors.index.json`` (a single ``model.safetensors`` when everything fits), and
    ``config.json`` (+ ``generation_config.json`` when token ids are given, for ``head="lm"``).
    With a ``tokenizer`` (a jaxselm file tokenizer: HF, SentencePiece or GGUF-built) its files
    (``tokenizer.json`` or ``tokenizer.model``, ``tokenizer_config.json`` with the chat template,
    ``special_tokens_map.json``) go in too and the bos / eos / pad ids default to its own, so
    ``AutoModelForCausalLM`` and ``AutoTokenizer`` both load the directory.
    dtype: dtype of the written tensors (default ``config.param_dtype``). Everything is written to
    a temporary directory beside ``path`` and renamed into place, so a failure leaves nothing
    half-written; an existing non-empty ``path`` is replaced only with ``overwrite=True``.
    Parameters are fetched to the host one tensor at a time. In a multi-process run (a pod slice)
    every process must call this with the same arguments: each tensor sharded across hosts is
    all-gathered (one at a time, so host memory holds one tensor), process 0 writes, and all
    processes return once the directory is in place (``path`` on a filesystem all hosts share).
    """
    dest = Path(path)
    if tokenizer is not None:
        bos_token_id = tokenizer.bos_id if bos_token_id is None else bos_token_id
        eos_token_id = tokenizer.eos_id if eos_token_id is None else eos_token_id
        pad_token_id = tokenizer.pad_id if pad_token_id is None else pad_token_id
    hf = model_config_to_hf_config(
        config,
        head=head,
        dtype=dtype,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    out_dtype = hf["torch_dtype"]
    max_bytes = parse_size(max_shard_size)
    if dest.exists() and not dest.is_dir():
        raise CheckpointError(f"{dest}: exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise CheckpointError(
            f"{dest}: directory exists and is not empty (pass overwrite=True to replace it)"
        )
    specs = tensor_layout(config, head)
    names, produce = _tensors(config, params, specs, NP_DTYPES[out_dtype])
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    generation = {k: v for k, v in ids.items() if v is not None} if head == "lm" else {}
    if jax.process_count() == 1:
        _write_checkpoint_dir(dest, hf, generation, names, produce, out_dtype, max_bytes, tokenizer)
        return dest
    failed: BaseException | None = None
    done: list[str] = []

    def counted(name: str) -> np.ndarray:
        arr = produce(name)
        done.append(name)
        return arr

    if is_primary():
        try:
            _write_checkpoint_dir(
                dest, hf, generation, names, counted, out_dtype, max_bytes, tokenizer
            )
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the others know
            failed = err
    # Every process runs every gather in the writer's order (the others write nothing; a failed
    # writer finishes the gathers it skipped, so the collectives stay matched).
    for name, _ in names[len(done) :]:
        produce(name)
    if any_process(failed is not None):  # also the barrier: the directory is in place after it
        if failed is not None:
            raise failed
        raise CheckpointError(
            f"{dest}: writing the HF checkpoint failed on process 0 (its error says why)"
        )
    return dest


def _write_checkpoint_dir(
    dest: Path,
    hf: dict[str, Any],
    generation: dict[str, Any],
    names: list[tuple[str, tuple[int, ...]]],
    produce: Callable[[str], np.ndarray],
    out_dtype: str,
    max_bytes: int,
    tokenizer: Any = None,
) -> None:
    """Shards, index, config.json, (when not empty) generation_config.json and the tokenizer's
    files, written to a temporary directory beside ``dest`` and renamed into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        shards = _shard(names, NP_DTYPES[out_dtype].itemsize, max_bytes)
        if len(shards) == 1:
            _write_safetensors(tmp / SINGLE_NAME, shards[0], out_dtype, produce)
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                _write_safetensors(tmp / fname, shard, out_dtype, produce)
                for name, shape in shard:
                    weight_map[name] = fname
                    total += math.prod(shape) * NP_DTYPES[out_dtype].itemsize
            index = {
                "metadata": {"total_size": total},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_NAME).write_text(json.dumps(hf, indent=2) + "\n")
        if generation:
            (tmp / GENERATION_CONFIG_NAME).write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if dest.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.rename(dest, old / "x")
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def iter_hf_tensors(
    config: ModelConfig, params: Mapping, *, head: Head = "lm", dtype: str | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy tensor) pairs of ``params``, one at a time, in HF order."""
    out_dtype = dtype or config.param_dtype
    if out_dtype not in NP_DTYPES:
        raise ConfigError(f"dtype: must be one of {', '.join(NP_DTYPES)} (got {out_dtype!r})")
    names, produce = _tensors(config, params, tensor_layout(config, head), NP_DTYPES[out_dtype])
    for name, _ in names:
        yield name, produce(name)
