"""GGUF (llama.cpp, ollama) checkpoints <-> jaxselm: config, streamed import and export.

A GGUF file holds a model's metadata (``llama.*`` sizes, RoPE, norm epsilon; ``tokenizer.*``) and
its tensors under llama.cpp's names, often quantized. Import reads the metadata into a
:class:`~jaxselm.model.ModelConfig`, dequantizes every tensor to float32 with llama.cpp's own
``gguf`` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K and the other types it knows) and
fills jaxselm's layout one stacked parameter at a time, as :func:`jaxselm.hf.load_hf_checkpoint`
does. Export (:mod:`jaxselm.hf.gguf_export`) writes an F32 / F16 / BF16 GGUF that llama.cpp and
ollama load, with the tokenizer's ``tokenizer.ggml.*`` metadata when one is given.

    from jaxselm.hf import gguf_tokenizer, load_gguf_checkpoint, save_gguf_checkpoint
    cfg, params = load_gguf_checkpoint("SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
    save_gguf_checkpoint(cfg, params, "out/policy.f16.gguf", dtype="float16", tokenizer=tok)

Names (the numpy arrays are [out, in], as HF's; the HF side is :mod:`jaxselm.hf.layout`'s):

    GGUF tensor                        HF tensor (P = model.layers.N.)
    token_embd.weight                  model.embed_tokens.weight
    blk.N.attn_norm.weight             P input_layernorm.weight
    blk.N.attn_{q,k,v,output}.weight   P self_attn.{q,k,v,o}_proj.weight   (q, k rows permuted)
    blk.N.ffn_norm.weight              P post_attention_layernorm.weight
    blk.N.ffn_{gate,up,down}.weight    P mlp.{gate,up,down}_proj.weight
    output_norm.weight                 model.norm.weight
    output.weight                      lm_head.weight (absent: tied embeddings)
    rope_freqs.weight                  Llama-3 RoPE scaling, as per-frequency divisors

llama.cpp's RoPE rotates adjacent pairs where HF's (and jaxselm's) rotates halves, so
convert_hf_to_gguf.py permutes the rows of q and k within each head,
``w.reshape(n, 2, D // 2, E).swapaxes(1, 2).reshape(n * D, E)`` (n: heads for q, kv heads for k);
import undoes it, export does it. Metadata problems raise a one-line ConfigError naming the file and
key, file and tensor problems a CheckpointError naming the file and tensor.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from jaxselm.data.tokenizer import HFTokenizer, load_gguf_tokenizer
from jaxselm.data.tokenizer_gguf import gguf_value, open_gguf
from jaxselm.errors import CheckpointError, ConfigError
from jaxselm.hf.layout import NP_DTYPES, TensorSpec, assemble_params, tensor_layout
from jaxselm.model.config import ModelConfig, RopeScaling
from jaxselm.model.rope import inverse_frequencies

#: HF tensor name -> llama.cpp's ("{}" is the layer).
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.layers.{}.input_layernorm.weight": "blk.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "blk.{}.attn_q.weight",
    "model.layers.{}.self_attn.k_proj.weight": "blk.{}.attn_k.weight",
    "model.layers.{}.self_attn.v_proj.weight": "blk.{}.attn_v.weight",
    "model.layers.{}.self_attn.o_proj.weight": "blk.{}.attn_output.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blk.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "blk.{}.ffn_gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "blk.{}.ffn_up.weight",
    "model.layers.{}.mlp.down_proj.weight": "blk.{}.ffn_down.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
ROPE_FREQS = "rope_freqs.weight"
_MISSING = object()


def gguf_name(spec: TensorSpec, layer: int = 0) -> str:
    """llama.cpp's name of a parameter's tensor (of ``layer`` for stacked ones)."""
    return GGUF_NAMES[spec.hf_name].format(layer)


def permuted_heads(spec: TensorSpec, cfg: ModelConfig) -> int | None:
    """Heads whose rows llama.cpp permutes in this tensor (q: H, k: K), else None."""
    return {"attn/q_proj/kernel": cfg.num_heads, "attn/k_proj/kernel": cfg.num_kv_heads}.get(
        "/".join(spec.path[1:])
    )


def permute_rows(w: np.ndarray, n: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp's (convert_hf_to_gguf.py's ``permute``)."""
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n: int) -> np.ndarray:
    """llama.cpp's q/k rows -> HF's (the inverse of :func:`permute_rows`)."""
    return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------------------------
# Metadata -> ModelConfig
# --------------------------------------------------------------------------------------------


def _llama3_scaling(factors: np.ndarray, cfg: ModelConfig, where: str) -> RopeScaling | None:
    """The Llama-3 scaling whose frequencies equal llama.cpp's ``base freqs / rope_freqs``.

    convert_hf_to_gguf.py stores Llama-3 scaling only as these divisors. They fix the factor and
    the ratios of (original context, low, high factor), not their scale: Llama-3.1's (8192, 1, 4)
    is tried first, else the ratios are fitted with low = 1; the frequencies are then checked.
    """
    inv = inverse_frequencies(cfg.replace(rope_scaling=None)).astype(np.float64)
    f = np.asarray(factors, np.float64).reshape(-1)
    if f.shape != inv.shape:
        raise CheckpointError(
            f"{where}: tensor {ROPE_FREQS}: shape {list(f.shape)} is not [{inv.size}]"
        )
    if np.allclose(f, 1.0, rtol=0, atol=1e-6):
        return None
    factor = float(np.float32(f.max()))
    candidates = [(4.0, 8192.0)]
    wavelen = 2 * math.pi / inv
    mid = (f > 1 + 1e-4) & (f < factor * (1 - 1e-4))
    if mid.sum() >= 2 and factor > 1:
        smooth = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)  # = old/(h-l) / wavelen - l/(h-l)
        slope, icpt = np.polyfit(1 / wavelen[mid], smooth, 1)
        if slope > 0 and icpt < 0:
            high = round(1 - 1 / icpt, 4)
            candidates.append((high, slope * (high - 1)))
    target = inv / f
    for high, old in candidates:
        try:
            sc = RopeScaling(
                rope_type="llama3",
                factor=factor,
                low_freq_factor=1.0,
                high_freq_factor=high,
                original_max_position_embeddings=max(1, round(old)),
            )
        except ConfigError:
            continue
        if np.allclose(inverse_frequencies(cfg.replace(rope_scaling=sc)), target, rtol=1e-5):
            return sc
    raise ConfigError(f"{where}: {ROPE_FREQS}: the factors are not a Llama-3 RoPE scaling")


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not
    9.999999747378752e-06), so that a config written to GGUF reads back equal."""
    return float(str(np.float32(value)))


def _config(reader: Any, where: str, dtype: str | None) -> ModelConfig:
    def get(key: str, kind: Any, default: Any = _MISSING, array: bool | None = False) -> Any:
        optional = {} if default is _MISSING else {"default": default}
        return gguf_value(
            reader, key, kind, array=array, where=where, error=ConfigError, **optional
        )

    arch = get("general.architecture", str)
    if arch != "llama":
        raise ConfigError(f"{where}: general.architecture: unsupported {arch!r}; supported: llama")

    def uniform(key: str, default: Any = _MISSING) -> Any:
        value = get(f"llama.{key}", int, default, array=None)
        if isinstance(value, list):  # per-layer values (OpenELM-style); fine when all equal
            if len(set(value)) != 1:
                raise ConfigError(f"{where}: llama.{key}: per-layer values are not supported")
            value = value[0]
        return value

    tensors = {t.name: t for t in reader.tensors}
    hidden, heads = get("llama.embedding_length", int), uniform("attention.head_count")
    vocab = get("llama.vocab_size", int, None)
    if vocab is None and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if vocab is None and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])  # GGUF lists dimensions reversed
    if vocab is None:
        raise ConfigError(f"{where}: llama.vocab_size: missing (and no tokenizer.ggml.tokens)")
    head_dim = get("llama.attention.key_length", int, None)
    rot = get("llama.rope.dimension_count", int, None)
    d = head_dim or rot or (hidden // heads if heads else 0)
    if get("llama.attention.value_length", int, d) != d:
        raise ConfigError(f"{where}: llama.attention.value_length: must equal the key length {d}")
    if rot not in (None, d):
        raise ConfigError(
            f"{where}: llama.rope.dimension_count: partial rotary embeddings ({rot} of {d} "
            "dimensions) are not supported"
        )
    scaling = None
    kind = get("llama.rope.scaling.type", str, None)
    linear = get("llama.rope.scale_linear", (float, int), None)  # the older spelling
    if kind not in (None, "none", "linear"):
        raise ConfigError(
            f"{where}: llama.rope.scaling.type: unsupported {kind!r}; supported: none, linear "
            "(and Llama-3's rope_freqs)"
        )
    if kind == "linear" or linear is not None:
        factor = linear if linear is not None else get("llama.rope.scaling.factor", (float, int))
        if factor != 1:
            scaling = {"rope_type": "linear", "factor": _f32(factor)}
    dt = dtype or {1: "float16", 32: "bfloat16"}.get(get("general.file_type", int, 0), "float32")
    try:
        cfg = ModelConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=get("llama.block_count", int),
            num_heads=heads,
            num_kv_heads=uniform("attention.head_count_kv", heads),
            head_dim=None if heads and not hidden % heads and d == hidden // heads else d,
            intermediate_size=uniform("feed_forward_length"),
            rms_norm_eps=_f32(get("llama.attention.layer_norm_rms_epsilon", (float, int))),
            rope_theta=_f32(get("llama.rope.freq_base", (float, int), 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=get("llama.context_length", int),
            tie_embeddings="output.weight" not in tensors,
            position="rope",
            dtype=dt,
            param_dtype=dt,
        )
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    if ROPE_FREQS in tensors:
        if scaling is not None:
            raise ConfigError(f"{where}: {ROPE_FREQS}: cannot be combined with linear scaling")
        freqs = _dequantize(tensors[ROPE_FREQS], where)
        cfg = cfg.replace(rope_scaling=_llama3_scaling(freqs, cfg, where))
    return cfg


def read_gguf_model_config(path: str | os.PathLike) -> ModelConfig:
    """The :class:`ModelConfig` of a GGUF llama file, from its metadata (no tensor is read but
    ``rope_freqs``). The dtype is the file's (F16 / BF16 files) or float32 (F32, quantized)."""
    return _config(open_gguf(path, CheckpointError), str(path), None)


def gguf_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    """The tokenizer of a GGUF file (:func:`jaxselm.data.load_gguf_tokenizer`)."""
    return load_gguf_tokenizer(path)


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------


def _dequantize(t: Any, where: str) -> np.ndarray:
    """A tensor as float32 numpy, [out, in] (llama.cpp's dimensions reversed)."""
    import gguf

    try:
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    except NotImplementedError:
        raise CheckpointError(
            f"{where}: tensor {t.name}: unsupported type {t.tensor_type.name} (the gguf package "
            "cannot dequantize it)"
        ) from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(
            f"{where}: tensor {t.name}: unreadable ({type(e).__name__})"
        ) from None


def load_gguf_checkpoint(
    path: str | os.PathLike, *, dtype: str | None = None, shardings: Any = None
) -> tuple[ModelConfig, dict]:
    """``(ModelConfig, params)`` of a GGUF llama file, dequantized.

    dtype: parameter (and compute) dtype, "float32" | "bfloat16" | "float16"; default the file's
        (F16 / BF16 files), else float32, in which every quantized block dequantizes exactly.
    shardings: optional ``jax.sharding.Sharding``, or a pytree of them like the params; each
        parameter is placed with it as soon as it is assembled (default: the default device).
    """
    where = str(path)
    if dtype is not None and dtype not in NP_DTYPES:
        raise ConfigError(f"dtype: must be one of {', '.join(NP_DTYPES)} (got {dtype!r})")
    reader = open_gguf(path, CheckpointError)
    cfg = _config(reader, where, dtype)
    tensors = {t.name: t for t in reader.tensors}
    specs = tensor_layout(cfg, "lm")
    L = cfg.num_layers
    expected = {gguf_name(s, i) for s in specs for i in range(L if s.stacked else 1)}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected - {ROPE_FREQS})
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]}")
    if extra:
        raise CheckpointError(
            f"{where}: unexpected tensor {extra[0]} (not in a {L}-layer llama with this config)"
        )

    def read(spec: TensorSpec, layer: int) -> np.ndarray:
        t = tensors[gguf_name(spec, layer)]
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        if shape != spec.hf_shape:
            raise CheckpointError(
                f"{where}: tensor {t.name}: shape {list(shape)} does not match the config's "
                f"{list(spec.hf_shape)}"
            )
        w = _dequantize(t, where).reshape(shape)
        n = permuted_heads(spec, cfg)
        return spec.to_ours(unpermute_rows(w, n) if n else w)

    params = assemble_params(specs, L, NP_DTYPES[cfg.param_dtype], read, shardings)
    return cfg, params
