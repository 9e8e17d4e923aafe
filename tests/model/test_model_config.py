"""ModelConfig validation, presets, parameter counts and FLOPs."""

import jax
import numpy as np
import pydantic
import pytest

from jaxselm import ConfigError
from jaxselm.model import PRESETS, abstract_params, get_preset, param_logical_axes


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_builds_and_counts_its_params(name):
    cfg = get_preset(name)
    shapes = abstract_params(cfg)  # eval_shape: no memory even for 8B
    counted = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert counted == cfg.num_params()
    axes = param_logical_axes(cfg)
    for spec, shape in zip(
        jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
        jax.tree.leaves(shapes),
    ):
        assert len(spec) == len(shape.shape)


@pytest.mark.parametrize(
    "changes",
    [
        dict(position="absolute"),
        dict(position="absolute", tie_embeddings=True),
        dict(position="cope", cope_npos_max=8),
        dict(position="cope+rope", cope_npos_max=8, cope_shared_across_layers=True),
        dict(position="none"),
    ],
)
def test_every_position_mode_counts_its_params(changes):
    cfg = get_preset("tiny", **changes)
    shapes = abstract_params(cfg)
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == cfg.num_params()
    if cfg.uses_absolute:
        assert shapes["pos_embed"].shape == (cfg.max_position_embeddings, cfg.hidden_size)
        # a replicated first dim and the token embedding's "embed": no new sharding rule needed
        assert tuple(param_logical_axes(cfg)["pos_embed"]) == (None, "embed")
        # a lookup like the token embedding: no matmul FLOPs
        base = cfg.replace(position="none")
        assert cfg.num_params() == base.num_params() + cfg.max_position_embeddings * cfg.hidden_size
        assert cfg.flops_per_token(64) == base.flops_per_token(64)
    else:
        assert "pos_embed" not in shapes


def test_published_parameter_counts():
    # Llama-3-8B: 8.03B; MAP-Neo-7B: 7.79B (both from their model cards / papers).
    assert get_preset("llama3-8b").num_params() == pytest.approx(8.03e9, rel=5e-3)
    assert get_preset("map-neo-7b").num_params() == pytest.approx(7.79e9, rel=5e-3)
    assert get_preset("mistral-7b").num_params() == pytest.approx(7.24e9, rel=5e-3)
    assert get_preset("map-neo-7b").resolved_head_dim == 192


def test_reward_head_param_count():
    cfg = get_preset("tiny")
    shapes = abstract_params(cfg, head="reward")
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == cfg.num_params(
        head="reward"
    )


def test_flops_per_token_is_six_n_plus_attention():
    cfg = get_preset("llama3-8b")
    n_matmul = (
        cfg.num_params()
        - cfg.vocab_size * cfg.hidden_size
        - (2 * cfg.num_layers + 1) * cfg.hidden_size
    )
    attn = 12 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * 4096
    assert cfg.flops_per_token(4096) == pytest.approx(6 * n_matmul + attn)
    assert cfg.flops_per_token(4096, training=False) == pytest.approx((6 * n_matmul + attn) / 3)


def test_replace_validates():
    cfg = get_preset("tiny").replace(position="cope", cope_npos_max=8)
    assert cfg.uses_cope and not cfg.uses_rope
    with pytest.raises(ConfigError, match="model.num_kv_heads"):
        cfg.replace(num_kv_heads=3)


def test_config_is_hashable_and_frozen():
    a, b = get_preset("tiny"), get_preset("tiny")
    assert a == b and hash(a) == hash(b)
    with pytest.raises(pydantic.ValidationError):  # frozen
        a.num_layers = 3


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(hidden_size=30), "model.num_heads"),  # heads do not divide hidden
        (dict(num_kv_heads=3), "model.num_kv_heads"),  # kv heads do not divide heads
        (dict(position="alibi"), "model.position"),
        (dict(cope_npos_max=0), "model.cope_npos_max"),
        (dict(num_layers=0), "model.num_layers"),
        (dict(rms_norm_eps=-1.0), "model.rms_norm_eps"),
        (dict(hidden_size="32"), "model.hidden_size"),  # wrong type, not coerced
        (dict(dtype="float8"), "model.dtype"),
        (dict(hiden_size=32), "model.hiden_size"),  # unknown key
        (dict(rope_scaling=dict(factor=-2.0)), "model.rope_scaling.factor"),
        (dict(rope_scaling=dict(rope_type="yarn")), "model.rope_scaling.rope_type"),
        (dict(position="cope", sliding_window=16), "model.sliding_window"),
    ],
)
def test_bad_values_name_the_field(changes, field):
    with pytest.raises(ConfigError) as info:
        get_preset("tiny", **changes)
    msg = str(info.value)
    assert msg.startswith(field + ":"), msg
    assert "\n" not in msg


def test_unknown_preset():
    with pytest.raises(ConfigError, match="model.preset"):
        get_preset("gpt-5")
