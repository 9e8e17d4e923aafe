"""HF config.json <-> ModelConfig: MISSION.md's model families, both RoPE spellings, refusals."""

import pytest

from jaxselm.errors import ConfigError
from jaxselm.hf import (
    hf_architecture,
    hf_config_to_model_config,
    model_config_to_hf_config,
    parse_size,
)
from jaxselm.model import ModelConfig, get_preset

SRC = "ckpt/config.json"

# The config.json files as published (transformers 4.x spelling), reduced to the keys that matter
# plus a few of the benign extras real files carry.
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
MISTRAL_7B_V01 = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}
MAP_NEO_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "initializer_range": 0.02,
    "intermediate_size": 24576,
    "max_position_embeddings": 8192,
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.38.2",
    "use_cache": True,
    "vocab_size": 64256,
}


def _arch_fields(cfg: ModelConfig) -> dict:
    d = cfg.model_dump()
    d["head_dim"] = cfg.resolved_head_dim
    return d


@pytest.mark.parametrize(
    "hf, preset",
    [
        (LLAMA31_8B, "llama3.1-8b"),
        (MISTRAL_7B_V01, "mistral-7b"),
        (MAP_NEO_7B, "map-neo-7b"),
    ],
)
def test_published_configs_map_to_presets(hf, preset):
    cfg = hf_config_to_model_config(hf, source=SRC)
    want = get_preset(preset, param_dtype="bfloat16")
    assert _arch_fields(cfg) == _arch_fields(want)


@pytest.mark.parametrize(
    "preset", ["tiny", "small-100m", "llama3.1-8b", "mistral-7b", "map-neo-7b"]
)
@pytest.mark.parametrize("head", ["lm", "reward"])
def test_round_trip(preset, head):
    cfg = get_preset(preset, num_labels=3 if head == "reward" else 1)
    hf = model_config_to_hf_config(cfg, head=head, pad_token_id=0)
    assert hf_architecture(hf) == ("mistral" if cfg.sliding_window else "llama", head)
    back = hf_config_to_model_config(hf, dtype=cfg.param_dtype)
    assert _arch_fields(back) == _arch_fields(cfg.replace(dtype=cfg.param_dtype))


def test_transformers5_rope_parameters_spelling():
    hf = {
        k: v
        for k, v in LLAMA31_8B.items()
        if k not in ("rope_theta", "rope_scaling", "torch_dtype")
    }
    hf["rope_parameters"] = {**LLAMA31_8B["rope_scaling"], "rope_theta": 500000.0}
    hf["dtype"] = "bfloat16"
    assert hf_config_to_model_config(hf) == hf_config_to_model_config(LLAMA31_8B)
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    cfg = hf_config_to_model_config(hf)
    assert cfg.rope_scaling is None and cfg.rope_theta == 1e6


def test_legacy_type_key_and_linear_scaling():
    hf = {**MAP_NEO_7B, "rope_scaling": {"type": "linear", "factor": 2}}
    sc = hf_config_to_model_config(hf).rope_scaling
    assert sc.rope_type == "linear" and sc.factor == 2.0


def test_optional_keys_follow_transformers_defaults():
    minimal = {
        k: MAP_NEO_7B[k]
        for k in (
            "architectures",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
    }
    cfg = hf_config_to_model_config(minimal)
    assert (cfg.num_kv_heads, cfg.rms_norm_eps, cfg.rope_theta, cfg.max_position_embeddings) == (
        16,
        1e-6,
        1e4,
        2048,
    )
    assert (
        cfg.tie_embeddings is False and cfg.sliding_window is None and cfg.param_dtype == "float32"
    )
    mistral = {**minimal, "architectures": ["MistralForCausalLM"]}
    assert hf_config_to_model_config(mistral).sliding_window == 4096
    assert hf_config_to_model_config({**mistral, "sliding_window": None}).sliding_window is None
    reward = {**minimal, "architectures": ["LlamaForSequenceClassification"]}
    assert hf_config_to_model_config(reward).num_labels == 2  # PretrainedConfig's default
    assert hf_config_to_model_config({**reward, "id2label": {"0": "LABEL_0"}}).num_labels == 1


def _one_line_error(hf, *words):
    with pytest.raises(ConfigError) as info:
        hf_config_to_model_config(hf, source=SRC)
    msg = str(info.value)
    assert "\n" not in msg and SRC in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.mark.parametrize(
    "change, key",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.low_freq_factor"),
        (
            {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
            "partial_rotary_factor",
        ),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ({"architectures": ["Qwen2ForCausalLM"]}, "architectures"),
        ({"architectures": ["LlamaForCausalLM"], "model_type": "mistral"}, "model_type"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": "4096"}, "hidden_size"),
        ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
        ({"rope_parameters": "llama3"}, "rope_parameters"),
        ({"rope_scaling": 8.0}, "rope_scaling"),
        (
            {"rope_scaling": {**LLAMA31_8B["rope_scaling"], "factor": -1.0}},
            "rope_scaling.factor: must be > 0",
        ),
    ],
)
def test_unsupported_settings_are_refused(change, key):
    _one_line_error({**LLAMA31_8B, **change}, key)


@pytest.mark.parametrize(
    "key",
    ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"],
)
def test_missing_required_key(key):
    hf = {k: v for k, v in LLAMA31_8B.items() if k != key}
    assert _one_line_error(hf, key).endswith("missing")


def test_missing_architecture_and_model_type():
    hf = {k: v for k, v in LLAMA31_8B.items() if k not in ("architectures", "model_type")}
    _one_line_error(hf, "architectures")
    assert hf_architecture({**hf, "model_type": "mistral"}) == ("mistral", "lm")


def test_export_refuses_cope_and_bad_arguments():
    with pytest.raises(ConfigError, match="model.position"):
        model_config_to_hf_config(get_preset("tiny-cope"))
    for position in ("absolute", "none", "cope+rope"):  # Llama/Mistral have no such positions
        with pytest.raises(ConfigError) as info:
            model_config_to_hf_config(get_preset("tiny", position=position))
        msg = str(info.value)
        assert msg.startswith("model.position:") and repr(position) in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="head"):
        model_config_to_hf_config(get_preset("tiny"), head="value")
    with pytest.raises(ConfigError, match="dtype"):
        model_config_to_hf_config(get_preset("tiny"), dtype="int8")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("20KB") == 20_000
    assert parse_size("1.5 MiB") == 3 * 2**19
    assert parse_size(1234) == 1234
    for bad in ("five", "0", -3, "3XB"):
        with pytest.raises(ConfigError, match="max_shard_size"):
            parse_size(bad)
