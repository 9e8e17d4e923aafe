"""Hugging Face safetensors checkpoints <-> jaxselm parameter pytrees, streamed.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards
``model-0000i-of-0000n.safetensors`` listed in ``model.safetensors.index.json`` (the layout of
``save_pretrained(safe_serialization=True)``). jaxselm stacks per-layer weights along a leading
"layers" axis, so loading fills one stacked parameter at a time: allocate it, copy the L per-layer
HF tensors into it (read one by one through ``safetensors.safe_open``, which memory-maps the file),
move it to its devices, free the host buffer, go on. Host memory therefore peaks at about one
stacked parameter above what is already on the devices: a 7-8B model never exists twice in host
memory. Saving streams the other way, one tensor at a time straight into the shard files, whose
headers are written first (safetensors' layout is a length-prefixed JSON header followed by the
raw little-endian bytes, so it is written here without building a shard in memory).

Layout (HF tensor [out, in] -> jaxselm kernel [in, ...]; RoPE uses HF's rotate-half convention,
so q/k need no permutation):

    HF tensor (P = model.layers.{l}.)       HF shape     jaxselm parameter (N = H or K)
    model.embed_tokens.weight               [V, E]       embed                        [V, E]
    P self_attn.{q,k,v}_proj.weight         [N*D, E]     layers/attn/{q,k,v}_proj/kernel [L,E,N,D]
    P self_attn.o_proj.weight               [E, H*D]     layers/attn/o_proj/kernel    [L, H, D, E]
    P input_layernorm.weight                [E]          layers/attn_norm/scale       [L, E]
    P post_attention_layernorm.weight       [E]          layers/mlp_norm/scale        [L, E]
    P mlp.{gate,up}_proj.weight             [F, E]       layers/mlp/{gate,up}_proj/kernel [L,E,F]
    P mlp.down_proj.weight                  [E, F]       layers/mlp/down_proj/kernel  [L, F, E]
    model.norm.weight                       [E]          final_norm/scale             [E]
    lm_head.weight                          [V, E]       lm_head (absent when tied)   [E, V]
    score.weight (reward models)            [N, E]       score                        [E, N]

    from jaxselm.hf import load_hf_checkpoint, save_hf_checkpoint
    cfg, params = load_hf_checkpoint("Meta-Llama-3-8B-Instruct", dtype="bfloat16")
    save_hf_checkpoint(cfg, params, "out/policy-iter1", dtype="bfloat16", max_shard_size="5GB")

Every problem with the files (missing or truncated file, missing or unexpected tensor, wrong
shape or dtype) raises a one-line CheckpointError naming the file and tensor; config problems a
ConfigError naming config.json and the key. Pickle-based ``.bin`` weights are never read.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxselm.errors import CheckpointError, ConfigError
from jaxselm.hf.config import (
    Head,
    hf_architecture,
    hf_config_to_model_config,
    model_config_to_hf_config,
)
from jaxselm.model.config import ModelConfig
from jaxselm.parallel.multihost import any_process, is_primary, to_host

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
GENERATION_CONFIG_NAME = "generation_config.json"

_NP_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# Buffers older checkpoints carry that HF itself recomputes and ignores.
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One jaxselm parameter and the HF tensor(s) it is made of."""

    path: tuple[str, ...]  # key path in the params pytree
    hf_name: str  # HF tensor name; "{}" is the layer index for stacked parameters
    hf_shape: tuple[int, ...]  # shape of one HF tensor
    shape: tuple[int, ...]  # shape of the jaxselm parameter (with the leading L if stacked)
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]

    @property
    def stacked(self) -> bool:
        return "{}" in self.hf_name

    def hf_names(self, num_layers: int) -> list[str]:
        return (
            [self.hf_name.format(i) for i in range(num_layers)] if self.stacked else [self.hf_name]
        )


def _layout(cfg: ModelConfig, head: Head) -> list[_Spec]:
    """Every parameter of a RoPE model with the given head, in HF's tensor order."""
    v, e, f, L = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim

    def ident(w):
        return w

    def transpose(w):
        return w.T

    def in_proj(n):  # [n*D, E] <-> [E, n, D]
        return (lambda w: w.T.reshape(e, n, d)), (lambda w: w.reshape(e, n * d).T)

    q_in, q_out = in_proj(h)
    kv_in, kv_out = in_proj(k)
    pre = "model.layers.{}."
    specs = [
        _Spec(("embed",), "model.embed_tokens.weight", (v, e), (v, e), ident, ident),
        _Spec(
            ("layers", "attn_norm", "scale"),
            pre + "input_layernorm.weight",
            (e,),
            (L, e),
            ident,
            ident,
        ),
        _Spec(
            ("layers", "attn", "q_proj", "kernel"),
            pre + "self_attn.q_proj.weight",
            (h * d, e),
            (L, e, h, d),
            q_in,
            q_out,
        ),
        _Spec(
            ("layers", "attn", "k_proj", "kernel"),
            pre + "self_attn.k_proj.weight",
            (k * d, e),
            (L, e, k, d),
            kv_in,
            kv_out,
        ),
        _Spec(
            ("layers", "attn", "v_proj", "kernel"),
            pre + "self_attn.v_proj.weight",
            (k * d, e),
            (L, e, k, d),
            kv_in,
            kv_out,
        ),
        _Spec(
            ("layers", "attn", "o_proj", "kernel"),
            pre + "self_attn.o_proj.weight",
            (e, h * d),
            (L, h, d, e),
            lambda w: w.T.reshape(h, d, e),
            lambda w: w.reshape(h * d, e).T,
        ),
        _Spec(
            ("layers", "mlp_norm", "scale"),
            pre + "post_attention_layernorm.weight",
            (e,),
            (L, e),
            ident,
            ident,
        ),
        _Spec(
            ("layers", "mlp", "gate_proj", "kernel"),
            pre + "mlp.gate_proj.weight",
            (f, e),
            (L, e, f),
            transpose,
            transpose,
        ),
        _Spec(
            ("layers", "mlp", "up_proj", "kernel"),
            pre + "mlp.up_proj.weight",
            (f, e),
            (L, e, f),
            transpose,
            transpose,
        ),
        _Spec(
            ("layers", "mlp", "down_proj", "kernel"),
            pre + "mlp.down_proj.weight",
            (e, f),
            (L, f, e),
            transpose,
            transpose,
        ),
        _Spec(("final_norm", "scale"), "model.norm.weight", (e,), (e,), ident, ident),
    ]
    if head == "lm":
        if not cfg.tie_embeddings:
            specs.append(
                _Spec(("lm_head",), "lm_head.weight", (v, e), (e, v), transpose, transpose)
            )
    else:
        n = cfg.num_labels
        specs.append(_Spec(("score",), "score.weight", (n, e), (e, n), transpose, transpose))
    return specs


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


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
        dtype = _NP_DTYPES[_ST_DTYPES[info["dtype"]]].newbyteorder("<")
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
        if st_dtype not in _ST_DTYPES:
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


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(
    tree: Any, path: tuple[str, ...], what: str, error: type[Exception] = CheckpointError
) -> Any:
    for i, key in enumerate(path):
        if not isinstance(tree, Mapping) or key not in tree:
            raise error(f"{what}: missing {'/'.join(path[: i + 1])}")
        tree = tree[key]
    return tree


def _place(buf: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    if sharding is None:
        return jax.device_put(buf)
    return jax.make_array_from_callback(buf.shape, sharding, lambda idx: buf[idx])


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
    if dtype is not None and dtype not in _NP_DTYPES:
        raise ConfigError(f"dtype: must be one of {', '.join(_NP_DTYPES)} (got {dtype!r})")
    _, arch_head = hf_architecture(hf, source=source)
    if head is not None and head != arch_head:
        raise ConfigError(
            f"{source}: architectures: {hf.get('architectures')} has a {arch_head!r} head, "
            f"but head={head!r} was requested"
        )
    cfg = hf_config_to_model_config(hf, source=source, dtype=dtype)
    specs = _layout(cfg, arch_head)
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

    np_dtype = _NP_DTYPES[cfg.param_dtype]
    params: dict = {}
    with contextlib.ExitStack() as stack:
        reader = _Reader(files, stack)
        for spec in specs:
            sharding = shardings
            if shardings is not None and not isinstance(shardings, jax.sharding.Sharding):
                sharding = _get(shardings, spec.path, "shardings", ConfigError)
            if spec.stacked:
                buf = np.empty(spec.shape, np_dtype)
                for i, name in enumerate(spec.hf_names(cfg.num_layers)):
                    buf[i] = spec.to_ours(reader.read(name, spec.hf_shape))
            else:
                buf = np.ascontiguousarray(
                    spec.to_ours(reader.read(spec.hf_name, spec.hf_shape)), dtype=np_dtype
                )
            _set(params, spec.path, _place(buf, sharding))
            del buf
    return cfg, params


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------

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
    cfg: ModelConfig, params: Mapping, specs: list[_Spec], np_dtype: np.dtype
) -> tuple[list[tuple[str, tuple[int, ...]]], Callable[[str], np.ndarray]]:
    """(HF name, shape) of every tensor in HF order, and a function producing one tensor."""
    leaves, owner = {}, {}
    for spec in specs:
        leaf = _get(params, spec.path, "params")
        if tuple(leaf.shape) != spec.shape:
            raise CheckpointError(
                f"params: {'/'.join(spec.path)}: shape {list(leaf.shape)} does not match "
                f"the config's {list(spec.shape)}"
            )
        leaves[spec.path] = leaf
        for i, name in enumerate(spec.hf_names(cfg.num_layers)):
            owner[name] = (spec, i)
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
    itemsize = _NP_DTYPES[dtype].itemsize
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in names:
        nbytes = math.prod(shape) * itemsize
        header[name] = {
            "dtype": _ST_NAMES[dtype],
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
    overwrite: bool = False,
) -> Path:
    """Write ``params`` as an HF checkpoint directory that ``from_pretrained`` loads.

    Shards ``model-0000i-of-0000n.safetensors`` of at most ``max_shard_size`` plus
    ``model.safetensors.index.json`` (a single ``model.safetensors`` when everything fits), and
    ``config.json`` (+ ``generation_config.json`` when token ids are given, for ``head="lm"``).
    dtype: dtype of the written tensors (default ``config.param_dtype``). Everything is written to
    a temporary directory beside ``path`` and renamed into place, so a failure leaves nothing
    half-written; an existing non-empty ``path`` is replaced only with ``overwrite=True``.
    Parameters are fetched to the host one tensor at a time. In a multi-process run (a pod slice)
    every process must call this with the same arguments: each tensor sharded across hosts is
    all-gathered (one at a time, so host memory holds one tensor), process 0 writes, and all
    processes return once the directory is in place (``path`` on a filesystem all hosts share).
    """
    dest = Path(path)
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
    specs = _layout(config, head)
    names, produce = _tensors(config, params, specs, _NP_DTYPES[out_dtype])
    if jax.process_count() == 1:
        _write_checkpoint_dir(dest, hf, names, produce, out_dtype, max_bytes, head,
                              bos_token_id, eos_token_id, pad_token_id)
        return dest
    failed: BaseException | None = None
    done: list[str] = []

    def counted(name: str) -> np.ndarray:
        arr = produce(name)
        done.append(name)
        return arr

    if is_primary():
        try:
            _write_checkpoint_dir(dest, hf, names, counted, out_dtype, max_bytes, head,
                                  bos_token_id, eos_token_id, pad_token_id)
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the others know
            failed = err
    # Every process runs every gather in the writer's order (the others write nothing; a failed
    # writer finishes the gathers it skipped, so the collectives stay matched).
    for name, _ in names[len(done):]:
        produce(name)
    if any_process(failed is not None):  # also the barrier: the directory is in place after it
        if failed is not None:
            raise failed
        raise CheckpointError(f"{dest}: writing the HF checkpoint failed on process 0 (its error says why)")
    return dest


def _write_checkpoint_dir(dest: Path, hf: dict[str, Any], names, produce, out_dtype: str, max_bytes: int,
                          head: Head, bos_token_id, eos_token_id, pad_token_id) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        shards = _shard(names, _NP_DTYPES[out_dtype].itemsize, max_bytes)
        if len(shards) == 1:
            _write_safetensors(tmp / SINGLE_NAME, shards[0], out_dtype, produce)
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                _write_safetensors(tmp / fname, shard, out_dtype, produce)
                for name, shape in shard:
                    weight_map[name] = fname
                    total += math.prod(shape) * _NP_DTYPES[out_dtype].itemsize
            index = {
                "metadata": {"total_size": total},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_NAME).write_text(json.dumps(hf, indent=2) + "\n")
        gen = {
            k: v
            for k, v in (
                ("bos_token_id", bos_token_id),
                ("eos_token_id", eos_token_id),
                ("pad_token_id", pad_token_id),
            )
            if v is not None
        }
        if head == "lm" and gen:
            (tmp / GENERATION_CONFIG_NAME).write_text(json.dumps(gen, indent=2) + "\n")
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
    if out_dtype not in _NP_DTYPES:
        raise ConfigError(f"dtype: must be one of {', '.join(_NP_DTYPES)} (got {out_dtype!r})")
    names, produce = _tensors(config, params, _layout(config, head), _NP_DTYPES[out_dtype])
    for name, _ in names:
        yield name, produce(name)
