"""Checkpoint formats: Hugging Face safetensors and GGUF, config mapping, streamed import/export.

Llama / Mistral CausalLM checkpoints (Llama-3 with llama3 RoPE scaling, Mistral with a sliding
window, MAP-Neo with untied embeddings) and their SequenceClassification reward models load into
jaxselm's params pytree and save back to a directory `transformers.from_pretrained` reads. GGUF
llama files (llama.cpp, ollama; quantized or not) load the same way and export as F32/F16/BF16
GGUF with their tokenizer (:mod:`jaxselm.hf.gguf`).

    from jaxselm.hf import load_gguf_checkpoint, load_hf_checkpoint, save_hf_checkpoint
    cfg, params = load_hf_checkpoint("path/to/hf-model", dtype="bfloat16")
    save_hf_checkpoint(cfg, params, "out/hf-model", dtype="bfloat16")
    cfg, params = load_gguf_checkpoint("SmolLM2-135M-Instruct.Q4_1.gguf")
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
from jaxselm.hf.gguf import gguf_tokenizer, load_gguf_checkpoint, read_gguf_model_config
from jaxselm.hf.gguf_export import save_gguf_checkpoint

__all__ = [
    "ARCHITECTURES",
    "gguf_tokenizer",
    "hf_architecture",
    "hf_config_to_model_config",
    "hf_dtype",
    "hf_num_labels",
    "iter_hf_tensors",
    "load_gguf_checkpoint",
    "load_hf_checkpoint",
    "model_config_to_hf_config",
    "parse_size",
    "read_gguf_model_config",
    "read_hf_config",
    "save_gguf_checkpoint",
    "save_hf_checkpoint",
]
