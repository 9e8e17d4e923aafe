"""Where every jaxselm parameter sits in a Hugging Face safetensors checkpoint, and the file names.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards
``model-0000i-of-0000n.safetensors`` listed in ``model.safetensors.index.json`` (the layout of
``save_pretrained(safe_serialization=True)``). jaxselm stacks per-layer weights along a leading
"layers" axis; :func:`tensor_layout` lists, in HF's tensor order, each parameter with the HF
tensor(s) it is made of and the conversions both ways. Loading (:mod:`jaxselm.hf.checkpoint`)
and saving (:mod:`jaxselm.hf.export`) both follow it.

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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np

from jaxselm.errors import CheckpointError, ConfigError
from jaxselm.hf.config import Head
from jaxselm.model.config import ModelConfig

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
GENERATION_CONFIG_NAME = "generation_config.json"

#: numpy dtype of each supported parameter dtype name.
NP_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
#: safetensors dtype tag -> dtype name, and back.
ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
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


def tensor_layout(cfg: ModelConfig, head: Head) -> list[TensorSpec]:
    """Every parameter of a RoPE model with the given head, in HF's tensor order."""
    v, e, f, L = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim

    # (to_ours, to_hf) conversions.
    same = (lambda w: w), (lambda w: w)
    transpose = (lambda w: w.T), (lambda w: w.T)

    def in_proj(n):  # [n*D, E] <-> [E, n, D]
        return (lambda w: w.T.reshape(e, n, d)), (lambda w: w.reshape(e, n * d).T)

    out_proj = (lambda w: w.T.reshape(h, d, e)), (lambda w: w.reshape(h * d, e).T)
    # Per-layer tensors: (path under layers/, HF name under model.layers.{l}., HF shape, shape of
    # one layer's slice of the stacked jaxselm parameter, conversions).
    per_layer = [
        ("attn_norm/scale", "input_layernorm.weight", (e,), (e,), same),
        ("attn/q_proj/kernel", "self_attn.q_proj.weight", (h * d, e), (e, h, d), in_proj(h)),
        ("attn/k_proj/kernel", "self_attn.k_proj.weight", (k * d, e), (e, k, d), in_proj(k)),
        ("attn/v_proj/kernel", "self_attn.v_proj.weight", (k * d, e), (e, k, d), in_proj(k)),
        ("attn/o_proj/kernel", "self_attn.o_proj.weight", (e, h * d), (h, d, e), out_proj),
        ("mlp_norm/scale", "post_attention_layernorm.weight", (e,), (e,), same),
        ("mlp/gate_proj/kernel", "mlp.gate_proj.weight", (f, e), (e, f), transpose),
        ("mlp/up_proj/kernel", "mlp.up_proj.weight", (f, e), (e, f), transpose),
        ("mlp/down_proj/kernel", "mlp.down_proj.weight", (e, f), (f, e), transpose),
    ]
    specs = [TensorSpec(("embed",), "model.embed_tokens.weight", (v, e), (v, e), *same)]
    specs += [
        TensorSpec(
            ("layers", *path.split("/")), "model.layers.{}." + name, hf_shape, (L, *shape), *conv
        )
        for path, name, hf_shape, shape, conv in per_layer
    ]
    specs.append(TensorSpec(("final_norm", "scale"), "model.norm.weight", (e,), (e,), *same))
    if head == "lm":
        if not cfg.tie_embeddings:
            specs.append(TensorSpec(("lm_head",), "lm_head.weight", (v, e), (e, v), *transpose))
    else:
        n = cfg.num_labels
        specs.append(TensorSpec(("score",), "score.weight", (n, e), (e, n), *transpose))
    return specs


def tree_get(
    tree: Any, path: tuple[str, ...], what: str, error: type[Exception] = CheckpointError
) -> Any:
    """``tree[path[0]][path[1]]...``; ``error`` naming ``what`` and the missing prefix if absent."""
    for i, key in enumerate(path):
        if not isinstance(tree, Mapping) or key not in tree:
            raise error(f"{what}: missing {'/'.join(path[: i + 1])}")
        tree = tree[key]
    return tree


def assemble_params(
    specs: list[TensorSpec],
    num_layers: int,
    dtype: np.dtype,
    read: Callable[[TensorSpec, int], np.ndarray],
    shardings: Any = None,
) -> dict:
    """The params pytree, one parameter at a time: ``read(spec, layer)`` gives the checkpoint's
    tensor (layer 0 for unstacked ones) already in our layout; each parameter is placed with its
    sharding (a Sharding, or a pytree of them like the params; default: the default device) as
    soon as it is assembled, so host memory holds at most one parameter beyond the devices'."""
    params: dict = {}
    for spec in specs:
        sharding = shardings
        if shardings is not None and not isinstance(shardings, jax.sharding.Sharding):
            sharding = tree_get(shardings, spec.path, "shardings", ConfigError)
        if spec.stacked:
            buf = np.empty(spec.shape, dtype)
            for i in range(num_layers):
                buf[i] = read(spec, i)
        else:
            buf = np.ascontiguousarray(read(spec, 0), dtype=dtype)
        node = params
        for key in spec.path[:-1]:
            node = node.setdefault(key, {})
        if sharding is None:
            node[spec.path[-1]] = jax.device_put(buf)
        else:
            node[spec.path[-1]] = jax.make_array_from_callback(
                buf.shape, sharding, lambda idx, buf=buf: buf[idx]
            )
        del buf
    return params


def param_leaves(params: Mapping, specs: list[TensorSpec]) -> dict[tuple[str, ...], Any]:
    """{path: array} of every parameter the specs name, each checked against its shape."""
    leaves = {}
    for spec in specs:
        leaf = tree_get(params, spec.path, "params")
        if tuple(leaf.shape) != spec.shape:
            raise CheckpointError(
                f"params: {'/'.join(spec.path)}: shape {list(leaf.shape)} does not match the "
                f"config's {list(spec.shape)}"
            )
        leaves[spec.path] = leaf
    return leaves
