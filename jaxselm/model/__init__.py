"""Llama-family decoder (RoPE / CoPE / both / none / learned absolute), pure functions of params."""

from jaxselm.model.api import (
    abstract_params,
    apply_with_cache,
    cache_logical_axes,
    forward,
    init_cache,
    init_params,
    lm_head,
    param_logical_axes,
    reward_scores,
    with_score_head,
)
from jaxselm.model.config import PRESETS, ModelConfig, RopeScaling, get_preset
from jaxselm.model.transformer import KVCache, Transformer, unstack_cache, unstack_layers

__all__ = [
    "abstract_params",
    "PRESETS",
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "apply_with_cache",
    "cache_logical_axes",
    "forward",
    "get_preset",
    "init_cache",
    "init_params",
    "lm_head",
    "param_logical_axes",
    "reward_scores",
    "unstack_cache",
    "unstack_layers",
    "with_score_head",
]
