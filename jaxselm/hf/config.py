"""Hugging Face ``config.json`` <-> :class:`~jaxselm.model.ModelConfig`.

The meaning of an HF checkpoint is whatever `transformers` computes from it, so the mapping mirrors
`transformers`' own defaults (``LlamaConfig`` / ``MistralConfig``) for optional keys and refuses
every setting the jaxselm decoder cannot reproduce exactly (biases, activations other than SiLU,
RoPE scalings other than llama3 / linear, quantized weights, unknown architectures). Keys that HF
Llama/Mistral themselves ignore (``use_cache``, ``transformers_version``...) are ignored here too.

Both spellings of RoPE settings are read: the classic top-level ``rope_theta`` + ``rope_scaling``
(``type`` or ``rope_type``) of transformers 4.x checkpoints and the ``rope_parameters`` dict of
transformers 5. Export writes the classic spelling, which both generations (and vLLM & co.) read.

    from jaxselm.hf import hf_config_to_model_config, model_config_to_hf_config
    cfg = hf_config_to_model_config(json.load(open("config.json")), source="ckpt/config.json")
    hf = model_config_to_hf_config(cfg, head="reward", pad_token_id=0)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from jaxselm.errors import ConfigError
from jaxselm.model.config import ModelConfig

Head = Literal["lm", "reward"]

# (model_type, head) <-> HF architecture class name.
ARCHITECTURES: dict[str, tuple[str, Head]] = {
    "LlamaForCausalLM": ("llama", "lm"),
    "LlamaForSequenceClassification": ("llama", "reward"),
    "MistralForCausalLM": ("mistral", "lm"),
    "MistralForSequenceClassification": ("mistral", "reward"),
}

# transformers' class defaults for the optional keys that change the numerics.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        sliding_window=None,
    ),
    "mistral": dict(
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=4096 * 32,
        tie_word_embeddings=False,
        sliding_window=4096,
    ),
}
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# Settings HF Llama/Mistral support but jaxselm does not: key -> the only accepted values.
_MUST_BE: dict[str, tuple[Any, ...]] = {
    "attention_bias": (False, None),
    "mlp_bias": (False, None),
    "hidden_act": ("silu", "swish"),
    "quantization_config": (None,),
}


# ModelConfig field -> the HF key it comes from, where the names differ.
_HF_KEYS = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "tie_embeddings": "tie_word_embeddings",
    "num_labels": "id2label",
    "param_dtype": "torch_dtype",
    "dtype": "torch_dtype",
}


def _fail(source: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {msg}", path=(key,), detail=msg)


def hf_architecture(hf: Mapping[str, Any], *, source: str = "config.json") -> tuple[str, Head]:
    """``(model_type, head)`` of an HF config: ``("llama" | "mistral", "lm" | "reward")``."""
    archs = hf.get("architectures")
    model_type = hf.get("model_type")
    if archs:
        if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
            raise _fail(
                source,
                "architectures",
                f"unsupported {archs!r}; supported: {', '.join(ARCHITECTURES)}",
            )
        arch_type, head = ARCHITECTURES[archs[0]]
        if model_type is not None and model_type != arch_type:
            raise _fail(
                source, "model_type", f"{model_type!r} does not match architectures {archs!r}"
            )
        return arch_type, head
    if model_type is None:
        raise _fail(source, "architectures", "missing (and no model_type either)")
    if model_type not in _DEFAULTS:
        raise _fail(source, "model_type", f"unsupported {model_type!r}; supported: llama, mistral")
    return model_type, "lm"


def _rope(
    hf: Mapping[str, Any], source: str, default_theta: float
) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, RopeScaling kwargs or None) from either spelling of the RoPE settings."""
    params = hf.get("rope_parameters")
    key = "rope_parameters"
    if params is None:
        params, key = hf.get("rope_scaling"), "rope_scaling"
        theta = hf.get("rope_theta", default_theta)
    elif isinstance(params, Mapping):
        theta = params.get("rope_theta", hf.get("rope_theta", default_theta))
    else:
        raise _fail(source, key, f"must be an object (got {params!r})")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise _fail(source, "rope_theta", f"must be a number (got {theta!r})")
    if params is None:
        return float(theta), None
    if not isinstance(params, Mapping):
        raise _fail(source, key, f"must be an object or null (got {params!r})")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise _fail(
            source, f"{key}.partial_rotary_factor", "partial rotary embeddings are not supported"
        )
    if rope_type == "default":
        return float(theta), None
    if rope_type not in ("llama3", "linear"):
        raise _fail(
            source,
            f"{key}.rope_type",
            f"unsupported {rope_type!r}; supported: default, llama3, linear",
        )
    if params.get("attention_factor") not in (None, 1.0):
        raise _fail(source, f"{key}.attention_factor", "only 1.0 is supported")
    fields = ["factor"]
    if rope_type == "llama3":
        fields += ["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
    scaling: dict[str, Any] = {"rope_type": rope_type}
    for f in fields:
        if f not in params:
            raise _fail(source, f"{key}.{f}", "missing")
        v = params[f]
        scaling[f] = (
            int(v)
            if f == "original_max_position_embeddings" and isinstance(v, (int, float))
            else (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
        )
    return float(theta), scaling


def hf_dtype(hf: Mapping[str, Any]) -> str | None:
    """The checkpoint's stored float dtype named in config.json (``torch_dtype`` / ``dtype``)."""
    for key in ("dtype", "torch_dtype"):
        v = hf.get(key)
        if isinstance(v, str):
            v = v.removeprefix("torch.")
            if v in _FLOAT_DTYPES:
                return v
    return None


def hf_num_labels(hf: Mapping[str, Any]) -> int:
    """Number of labels as transformers counts them (``id2label``, else ``num_labels``, else 2)."""
    id2label = hf.get("id2label")
    if isinstance(id2label, Mapping) and id2label:
        return len(id2label)
    n = hf.get("num_labels", 2)
    return n if isinstance(n, int) else 2


def _head_dim(hf: Mapping[str, Any]) -> Any:
    """``head_dim`` or None when it is the default hidden_size // num_attention_heads."""
    d = hf.get("head_dim")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    if (
        isinstance(hidden, int)
        and isinstance(heads, int)
        and heads > 0
        and d == hidden // heads
        and not hidden % heads
    ):
        return None
    return d


def hf_config_to_model_config(
    hf: Mapping[str, Any], *, source: str = "config.json", dtype: str | None = None
) -> ModelConfig:
    """A :class:`ModelConfig` equivalent to an HF Llama / Mistral config dict.

    ``dtype`` sets both the parameter and compute dtype (default: the config's ``torch_dtype``,
    else float32). Raises a one-line ConfigError naming ``source`` and the offending key.
    """
    if not isinstance(hf, Mapping):
        raise ConfigError(f"{source}: must be a JSON object")
    model_type, head = hf_architecture(hf, source=source)
    for key, allowed in _MUST_BE.items():
        if key in hf and hf[key] not in allowed:
            raise _fail(
                source, key, f"unsupported value {hf[key]!r}; jaxselm supports {allowed[0]!r}"
            )
    for key in _REQUIRED:
        if key not in hf:
            raise _fail(source, key, "missing")
    defaults = _DEFAULTS[model_type]
    theta, scaling = _rope(hf, source, defaults["rope_theta"])
    if model_type == "mistral":
        sliding_window = hf.get("sliding_window", defaults["sliding_window"])
    else:
        # HF Llama has no sliding window; a stray key would be ignored there, so it is here too.
        sliding_window = None
    dt = dtype or hf_dtype(hf) or "float32"
    kwargs: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=_head_dim(hf),
        intermediate_size=hf["intermediate_size"],
        rms_norm_eps=hf.get("rms_norm_eps", defaults["rms_norm_eps"]),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=hf.get(
            "max_position_embeddings", defaults["max_position_embeddings"]
        ),
        tie_embeddings=hf.get("tie_word_embeddings", defaults["tie_word_embeddings"]),
        sliding_window=sliding_window,
        position="rope",
        dtype=dt,
        param_dtype=dt,
        num_labels=hf_num_labels(hf) if head == "reward" else 1,
    )
    if isinstance(kwargs["rms_norm_eps"], int) and not isinstance(kwargs["rms_norm_eps"], bool):
        kwargs["rms_norm_eps"] = float(kwargs["rms_norm_eps"])
    try:
        return ModelConfig(**kwargs)
    except ConfigError as err:
        # Name the HF key (num_kv_heads -> num_key_value_heads) and the file.
        if err.path:
            key = ".".join((_HF_KEYS.get(err.path[0], err.path[0]), *err.path[1:]))
            raise _fail(source, key, err.detail or str(err)) from None
        raise ConfigError(f"{source}: {err}") from None


def model_config_to_hf_config(
    config: ModelConfig,
    *,
    head: Head = "lm",
    dtype: str | None = None,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
) -> dict[str, Any]:
    """The HF config dict (classic spelling) of a RoPE-only ``config``.

    Architecture: Mistral when the config has a sliding window, else Llama; ``head="reward"``
    gives the SequenceClassification class with ``config.num_labels`` labels. HF's classifier
    pools at the last token that is not ``pad_token_id``, so reward models need one for batches.
    """
    if config.position != "rope":
        raise ConfigError(
            f"model.position: HF Llama/Mistral checkpoints need 'rope' (got {config.position!r})"
        )
    if head not in ("lm", "reward"):
        raise ConfigError(f"head: must be 'lm' or 'reward' (got {head!r})")
    model_type = "mistral" if config.sliding_window is not None else "llama"
    arch = {
        ("llama", "lm"): "LlamaForCausalLM",
        ("llama", "reward"): "LlamaForSequenceClassification",
        ("mistral", "lm"): "MistralForCausalLM",
        ("mistral", "reward"): "MistralForSequenceClassification",
    }[(model_type, head)]
    dt = dtype or config.param_dtype
    if dt not in _FLOAT_DTYPES:
        raise ConfigError(f"dtype: must be one of {', '.join(_FLOAT_DTYPES)} (got {dt!r})")
    sc = config.rope_scaling
    scaling = None
    if sc is not None:
        scaling = {"rope_type": sc.rope_type, "factor": sc.factor}
        if sc.rope_type == "llama3":
            scaling.update(
                low_freq_factor=sc.low_freq_factor,
                high_freq_factor=sc.high_freq_factor,
                original_max_position_embeddings=sc.original_max_position_embeddings,
            )
    hf: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": dt,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }
    if model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        hf["sliding_window"] = config.sliding_window
    if head == "reward":
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
    return hf
