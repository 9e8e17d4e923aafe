"""The one checkpoint loader: any model directory a user points jaxselm at -> (ModelConfig, params).

    from jaxselm.checkpoints import load_checkpoint
    cfg, params = load_checkpoint("runs/demo/policy/iter_03")            # a jaxselm params export
    cfg, params = load_checkpoint("/ckpt/Meta-Llama-3-8B-Instruct", mesh=mesh)   # an HF directory
    cfg, params = load_checkpoint("SmolLM2-135M-Instruct.Q4_1.gguf")              # a GGUF file

Kinds, recognised from the files (:func:`checkpoint_kind`):

* ``hf``: ``config.json`` + safetensors (LlamaForCausalLM / MistralForCausalLM, or a
  LlamaForSequenceClassification reward model), read by :func:`jaxselm.hf.load_hf_checkpoint`;
* ``export``: a jaxselm params export (orbax; ``policy/iter_NN`` of a run, ``jaxselm convert``,
  ``jaxselm train-rm``), which carries its model config in its metadata
  (:func:`jaxselm.train.save_params`); an export written without one needs ``model_config``;
* ``gguf``: a ``.gguf`` file (llama.cpp / ollama; a llama, quantized or not), dequantized by
  :func:`jaxselm.hf.load_gguf_checkpoint`.

``model_config``, when given, is what the caller expects (the run config's model section): a
checkpoint that describes another network is refused with a one-line error naming the first key
that differs; the runtime fields (dtypes, CoPE implementation, remat) are taken from
``model_config`` and the parameters cast to its ``param_dtype``. A training checkpoint directory
(orbax steps of a train state) is not a model: it is named as such in the error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import jax

from jaxselm.errors import CheckpointError
from jaxselm.hf import (
    hf_architecture,
    hf_config_to_model_config,
    load_gguf_checkpoint,
    load_hf_checkpoint,
    read_gguf_model_config,
    read_hf_config,
)
from jaxselm.model import ModelConfig, abstract_params
from jaxselm.model.config import RUNTIME_FIELDS
from jaxselm.train.checkpoint import export_metadata, export_tokenizer, load_params
from jaxselm.train.state import params_shardings_for

Kind = Literal["hf", "export", "gguf"]
Head = Literal["lm", "reward"]


def checkpoint_kind(path: str | os.PathLike) -> Kind:
    """What ``path`` holds; a one-line CheckpointError when it is no model checkpoint."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: not found")
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return "gguf"
        raise CheckpointError(f"{p}: is a file; expected a checkpoint directory or a .gguf file")
    if (p / "config.json").is_file():
        return "hf"
    if (p / "_CHECKPOINT_METADATA").is_file() or (p / "_METADATA").is_file():
        return "export"
    if any(c.name.isdigit() and c.is_dir() for c in p.iterdir()):
        raise CheckpointError(
            f"{p}: a training checkpoint directory (numbered steps of a train state), not a model "
            "export; use the run's policy/iter_NN (or an HF directory)"
        )
    raise CheckpointError(
        f"{p}: neither an HF checkpoint (config.json + safetensors) nor a jaxselm params export"
    )


def check_same_model(expected: ModelConfig, found: ModelConfig, where: str) -> None:
    """One-line error naming the first architecture key in which ``found`` differs."""
    diff = expected.architecture_differences(found)
    if diff:
        key = diff[0]
        raise CheckpointError(
            f"{where}: the checkpoint's {key} is {getattr(found, key)!r} but the run config's "
            f"model.{key} is {getattr(expected, key)!r}"
            + (f" (and {len(diff) - 1} more keys differ)" if len(diff) > 1 else "")
        )


def load_checkpoint(
    path: str | os.PathLike,
    *,
    head: Head | None = "lm",
    model_config: ModelConfig | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[ModelConfig, Any]:
    """``(ModelConfig, params)`` of an HF directory, a jaxselm params export or a GGUF file.

    head: "lm" or "reward" (refused if the checkpoint has the other), or None for whichever it
        has (an HF CausalLM or SequenceClassification; an export says which).
    mesh: params are placed with the rule table's shardings on it (default: one device).
    """
    where = os.fspath(path)
    kind = checkpoint_kind(path)
    if kind == "hf":
        cfg = read_model_config(path)
        found_head = hf_architecture(read_hf_config(path), source=f"{where}/config.json")[1]
    elif kind == "gguf":
        cfg, found_head = read_gguf_model_config(path), "lm"
    else:
        meta = export_metadata(path)
        if meta is None and model_config is None:
            raise CheckpointError(
                f"{where}: this params export carries no model config; give the run config's "
                "model section (--config)"
            )
        cfg, found_head = meta if meta is not None else (model_config, head or "lm")
    if head is not None and found_head != head:
        raise CheckpointError(f"{where}: has a {found_head!r} head, expected {head!r}")
    if model_config is not None:
        check_same_model(model_config, cfg, where)
        cfg = cfg.replace(**{k: getattr(model_config, k) for k in RUNTIME_FIELDS})
    if mesh is not None:
        shardings = params_shardings_for(cfg, mesh, head=found_head)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract_params(cfg, head=found_head))
    if kind == "hf":
        dtype = None if model_config is None else cfg.param_dtype
        cfg_loaded, params = load_hf_checkpoint(
            path, head=found_head, dtype=dtype, shardings=shardings
        )
        return (cfg_loaded if model_config is None else cfg), params
    if kind == "gguf":
        dtype = None if model_config is None else cfg.param_dtype
        cfg_loaded, params = load_gguf_checkpoint(path, dtype=dtype, shardings=shardings)
        return (cfg_loaded if model_config is None else cfg), params
    return cfg, load_params(path, abstract_params(cfg, head=found_head, shardings=shardings))


def read_model_config(path: str | os.PathLike) -> ModelConfig | None:
    """The model config a checkpoint describes, without reading its weights (None: an export
    saved without one)."""
    kind = checkpoint_kind(path)
    if kind == "hf":
        return hf_config_to_model_config(read_hf_config(path), source=f"{path}/config.json")
    if kind == "gguf":
        return read_gguf_model_config(path)
    meta = export_metadata(path)
    return None if meta is None else meta[0]


def checkpoint_tokenizer(path: str | os.PathLike | None) -> str | None:
    """Where the tokenizer of a checkpoint is, when it has one: an HF directory with tokenizer
    files, a GGUF file, or the tokenizer a params export recorded (if it still exists)."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return os.fspath(p)
    if not p.is_dir():
        return None
    if any((p / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        return os.fspath(p)
    if checkpoint_kind(p) == "export":
        recorded = export_tokenizer(p)
        return recorded if recorded and os.path.exists(recorded) else None
    return None
