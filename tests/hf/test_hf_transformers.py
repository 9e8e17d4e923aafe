"""Parity with `transformers` (optional test dependency, with torch CPU): tiny random models saved
with ``save_pretrained`` load into jaxselm with the same logits / reward scores, and jaxselm's
export loads back into transformers with the same logits.

Tolerance: both sides compute in float32 on the same weights; they differ only in the order of
floating-point reductions (matmul accumulation, softmax, RMSNorm means), which for these 2-layer
models with reductions of <= 64 terms stays at a few 1e-6 absolute on logits of magnitude ~1-10
(observed max 7e-6). ``ATOL = RTOL = 1e-4`` leaves >10x headroom while any mapping mistake
(transposed or swapped weights, wrong RoPE scaling, wrong head split, wrong mask) moves logits by
O(1). Round trips through the files are compared exactly.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxselm.hf import load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
from jaxselm.hf.config import _DEFAULTS  # noqa: E402
from jaxselm.model import forward, reward_scores  # noqa: E402

ATOL = RTOL = 1e-4
V, B, T = 100, 3, 12
BASE = dict(
    vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)

CAUSAL_CASES = {
    # name: (config class, kwargs, max_shard_size of save_pretrained)
    "mha_tied_linear_rope": (
        transformers.LlamaConfig,
        dict(
            num_key_value_heads=4,
            tie_word_embeddings=True,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
        "5GB",
    ),
    # Llama-3 scaling with original_max_position_embeddings=8: with head_dim 8 and theta 1e4 every
    # frequency but the highest is rescaled, so positions up to 11 really exercise it.
    "gqa_untied_llama3_rope": (
        transformers.LlamaConfig,
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        ),
        "20KB",
    ),
    # MAP-Neo-like: untied, MHA, head_dim (12) != hidden_size / heads (8).
    "map_neo_like_head_dim": (
        transformers.LlamaConfig,
        dict(num_key_value_heads=4, head_dim=12, tie_word_embeddings=False),
        "20KB",
    ),
    # Mistral v0.1: sliding window shorter than the sequence (4 < 12) and longer (16).
    "mistral_window_4": (
        transformers.MistralConfig,
        dict(num_key_value_heads=2, sliding_window=4),
        "5GB",
    ),
    "mistral_window_16": (
        transformers.MistralConfig,
        dict(num_key_value_heads=2, sliding_window=16),
        "5GB",
    ),
}


def _randomize(model, seed=0):
    """Weights ~ N(0, 0.3), norm scales ~ 1 + N(0, 0.2): activations of order 1, all distinct."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.3 * noise)
    return model.eval()


def _batch():
    """Row 0 full, row 1 right-padded, row 2 left-padded; token 0 is the pad id (never real)."""
    rng = np.random.default_rng(0)
    mask = np.ones((B, T), bool)
    mask[1, 9:] = False
    mask[2, :4] = False
    tokens = np.where(mask, rng.integers(1, V, (B, T)), 0)
    return tokens, mask


def _hf_run(model, tokens, mask):
    """HF forward with position_ids counted over real tokens, as `generate` does (left padding)."""
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(positions),
        )
    return out.logits.float().numpy()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("case", list(CAUSAL_CASES))
def test_causal_lm_parity_and_round_trip(tmp_path, case):
    config_cls, kwargs, shard = CAUSAL_CASES[case]
    model_cls = (
        transformers.MistralForCausalLM
        if config_cls is transformers.MistralConfig
        else transformers.LlamaForCausalLM
    )
    hf_model = _randomize(model_cls(config_cls(**BASE, **kwargs)))
    src = tmp_path / "hf"
    hf_model.save_pretrained(src, safe_serialization=True, max_shard_size=shard)
    if shard == "20KB":
        assert len(list(src.glob("model-*.safetensors"))) > 2

    cfg, params = load_hf_checkpoint(src)
    assert cfg.tie_embeddings == kwargs.get("tie_word_embeddings", False)
    assert ("lm_head" in params) != cfg.tie_embeddings
    assert cfg.sliding_window == kwargs.get("sliding_window")
    tokens, mask = _batch()
    want = _hf_run(hf_model, tokens, mask)
    got = np.asarray(forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask)))
    assert got.shape == (B, T, V)
    np.testing.assert_allclose(got[mask], want[mask], atol=ATOL, rtol=RTOL)

    dst = tmp_path / "jaxselm-export"
    save_hf_checkpoint(cfg, params, dst, max_shard_size="20KB")
    assert len(list(dst.glob("model-*.safetensors"))) > 2
    back = model_cls.from_pretrained(dst).eval()
    assert type(back.config) is config_cls
    _assert_same_state(_state(back), _state(hf_model))
    np.testing.assert_array_equal(_hf_run(back, tokens, mask), want)


@pytest.mark.parametrize("family, num_kv_heads", [("Llama", 4), ("Llama", 2), ("Mistral", 2)])
def test_reward_model_parity_and_round_trip(tmp_path, family, num_kv_heads):
    extra = {"sliding_window": 8} if family == "Mistral" else {}
    config = getattr(transformers, f"{family}Config")(
        **BASE, num_key_value_heads=num_kv_heads, pad_token_id=0, num_labels=1, **extra
    )
    model_cls = getattr(transformers, f"{family}ForSequenceClassification")
    hf_model = _randomize(model_cls(config))
    src = tmp_path / "rm"
    hf_model.save_pretrained(src, safe_serialization=True)

    cfg, params = load_hf_checkpoint(src)
    assert cfg.num_labels == 1 and "score" in params and "lm_head" not in params
    tokens, mask = _batch()
    want = _hf_run(hf_model, tokens, mask)[:, 0]  # HF pools at the last non-pad token
    got = np.asarray(reward_scores(params, cfg, jnp.asarray(tokens), jnp.asarray(mask)))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)

    dst = tmp_path / "rm-export"
    save_hf_checkpoint(cfg, params, dst, head="reward", pad_token_id=0)
    back = transformers.AutoModelForSequenceClassification.from_pretrained(dst).eval()
    assert type(back) is model_cls and back.config.pad_token_id == 0
    _assert_same_state(_state(back), _state(hf_model))
    np.testing.assert_array_equal(_hf_run(back, tokens, mask)[:, 0], want)


def test_bf16_checkpoint_round_trip(tmp_path):
    config = transformers.LlamaConfig(**BASE, num_key_value_heads=2, tie_word_embeddings=False)
    hf_model = _randomize(transformers.LlamaForCausalLM(config)).to(torch.bfloat16)
    src = tmp_path / "bf16"
    hf_model.save_pretrained(src, safe_serialization=True, max_shard_size="10KB")

    cfg, params = load_hf_checkpoint(src)  # keeps the stored dtype
    assert (
        cfg.param_dtype == "bfloat16"
        and params["layers"]["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    )
    dst = tmp_path / "bf16-export"
    save_hf_checkpoint(cfg, params, dst, max_shard_size="10KB")
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = transformers.LlamaForCausalLM.from_pretrained(dst, dtype="auto")
    assert back.dtype == torch.bfloat16
    _assert_same_state(_state(back), _state(hf_model))

    # The same weights upcast to float32 on both sides compute the same logits. (Reloaded rather
    # than hf_model.float(): casting the model to bf16 also rounded its RoPE inv_freq buffer.)
    cfg32, params32 = load_hf_checkpoint(src, dtype="float32")
    assert cfg32.param_dtype == cfg32.dtype == "float32"
    tokens, mask = _batch()
    hf32 = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    want = _hf_run(hf32, tokens, mask)
    got = np.asarray(forward(params32, cfg32, jnp.asarray(tokens), jnp.asarray(mask)))
    np.testing.assert_allclose(got[mask], want[mask], atol=ATOL, rtol=RTOL)


def test_optional_key_defaults_match_transformers():
    """Keys a config.json may omit default to what transformers assumes for them."""
    for model_type, cls in (
        ("llama", transformers.LlamaConfig),
        ("mistral", transformers.MistralConfig),
    ):
        hf = cls().to_dict()
        ours = _DEFAULTS[model_type]
        theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
        assert theta == ours["rope_theta"], model_type
        for key in ("rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):
            assert hf[key] == ours[key], (model_type, key)
        if model_type == "mistral":
            assert hf["sliding_window"] == ours["sliding_window"]


def test_exported_llama_config_is_read_by_transformers(tmp_path):
    """transformers reads the classic spelling jaxselm writes (rope_theta + rope_scaling)."""
    from jaxselm.hf import model_config_to_hf_config
    from jaxselm.model import get_preset

    cfg = get_preset("llama3.1-8b")
    (tmp_path / "config.json").write_text(json.dumps(model_config_to_hf_config(cfg)))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    rope = getattr(hf, "rope_parameters", None) or {**hf.rope_scaling, "rope_theta": hf.rope_theta}
    assert (
        rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0 and rope["factor"] == 8.0
    )
    assert (hf.num_key_value_heads, hf.head_dim, hf.max_position_embeddings) == (8, 128, 131072)
    assert not os.path.exists(tmp_path / "model.safetensors")
