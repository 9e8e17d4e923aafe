"""Hugging Face interop: ``config.json`` mapping and streamed safetensors import/export.

Llama / Mistral CausalLM checkpoints (Llama-3 with llama3 RoPE scaling, Mistral with a sliding
window, MAP-Neo with untied embeddings) and their SequenceClassification reward models load into
jaxselm's params pytree and save back to a directory `transformers.from_pretrained` reads.

    from jaxselm.hf import load_hf_checkpoint, save_hf_checkpoint
    cfg, params = load_hf_checkpoint("path/to/hf-model", dtype="bfloat16")
    save_hf_checkpoint(cfg, params, "out/hf-model", dtype="bfloat16")
"""

from jaxselm.hf.checkpoint import load_hf_checkpoint, read_hf_config
from jaxselm.hf.config import (
    ARCHITECTURES,
    hf_architecture,
    hf_config_to_model_config,
    hf_dtype,
    hf_num_labels,
    model_config_to_hf_config,
)
from jaxselm.hf.export import iter_hf_tensors, parse_size, save_hf_checkpoint

__all__ = [
    "ARCHITECTURES",
    "hf_architecture",
    "hf_config_to_model_config",
    "hf_dtype",
    "hf_num_labels",
    "iter_hf_tensors",
    "load_hf_checkpoint",
    "model_config_to_hf_config",
    "parse_size",
    "read_hf_config",
    "save_hf_checkpoint",
]
