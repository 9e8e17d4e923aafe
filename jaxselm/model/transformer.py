"""The Llama-family decoder as Flax linen modules, used as pure functions.

Layout (names chosen to map one-to-one onto HF LlamaForCausalLM tensors):

    embed                          [V, E]        ("vocab", "embed")
    pos_embed                      [C, E]        (None, "embed")  learned absolute positions
                                                 (position="absolute"; C = max_position_embeddings)
    layers/attn_norm/scale         [L, E]        ("layers", "embed")
    layers/attn/q_proj/kernel      [L, E, H, D]  ("layers", "embed", "heads", "head_dim")
    layers/attn/k_proj/kernel      [L, E, K, D]  ("layers", "embed", "kv_heads", "head_dim")
    layers/attn/v_proj/kernel      [L, E, K, D]
    layers/attn/o_proj/kernel      [L, H, D, E]  ("layers", "heads", "head_dim", "embed")
    layers/attn/cope_pos_emb       [L, P, D]     ("layers", "cope_pos", "head_dim") per-layer CoPE
    cope_pos_emb                   [P, D]        shared CoPE table (cope_shared_across_layers)
    rel_pos_emb                    [R, D]        ("cope_pos", "head_dim") cope+rel relative table,
                                                 shared by every layer and head (RAM's layout)
    layers/mlp_norm/scale          [L, E]
    layers/mlp/{gate,up}_proj/kernel [L, E, F]   ("layers", "embed", "mlp")
    layers/mlp/down_proj/kernel    [L, F, E]     ("layers", "mlp", "embed")
    final_norm/scale               [E]
    lm_head                        [E, V]        ("embed", "vocab"); absent with tied embeddings
    score                          [E, num_labels] reward head, instead of lm_head

Layers are stacked by `nn.scan` (one compiled layer, a leading "layers" axis). Inputs are token ids
[B, T] with an attention mask [B, T] (True = real token; left padding for batched prompts);
RoPE positions are counted over real tokens only, as HF does with position_ids. The KV cache is
an explicit pytree (:class:`KVCache`) so prefill and decode are pure functions too.
``position="absolute"`` looks up the same position ids (the cache's ``next_pos`` plus the
real-token count) in a learned table added to the token embeddings, as GPT-2 does.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxselm.kernels.attention import masked_attention
from jaxselm.kernels.cope import cope_attention
from jaxselm.model.config import ModelConfig
from jaxselm.model.rope import apply_rope, inverse_frequencies

Array = jax.Array
_INIT_STD = 0.02  # HF `initializer_range` default for Llama


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def _init(axes: tuple[str | None, ...], init=None):
    return nn.with_logical_partitioning(init or nn.initializers.normal(_INIT_STD), axes)


@flax.struct.dataclass
class KVCache:
    """Per-layer keys and values in a fixed-size buffer, shared write index for the batch.

    k:        [L, B, K, D, S]  ("layers", "batch", "kv_heads", "head_dim", "length")
    v:        [L, B, K, S, D]  ("layers", "batch", "kv_heads", "length", "head_dim")
              (keys with the slot axis last so decoding's q.k products are plain matmuls)
    mask:     [B, S] bool      slots written with a real (non-padding) token
    index:    [] int32         next slot to write (the same for every row: prompts are left-padded)
    next_pos: [B] int32        RoPE position of the next real token of each row
    """

    k: Array
    v: Array
    mask: Array
    index: Array
    next_pos: Array

    @property
    def max_len(self) -> int:
        return self.v.shape[3]


class Linear(nn.Module):
    """y = x . W over the last ``len(in_shape)`` axes of x; W is [*in_shape, *out_shape].

    Written out (instead of nn.DenseGeneral) so the kernel is created directly in its final
    N-d shape with its logical axis names: DenseGeneral initialises a flattened 2-d kernel,
    which clashes with 3-d logical constraints when sharding rules are installed.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(
            "kernel", _init(self.axes), (*self.in_shape, *self.out_shape), self.param_dtype
        )
        n_in = len(self.in_shape)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            (contract, ((), ())),
            preferred_element_type=jnp.float32,
        )
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale", _init(("embed",), nn.initializers.ones), (x.shape[-1],), self.param_dtype
        )
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, kv_mask, layer_cache, cache_index, shared_tables):
        cfg = self.config
        h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)

        def proj(name, feats, axes):
            return Linear((cfg.hidden_size,), feats, axes, dt, pdt, name=name)(x)

        q = proj("q_proj", (h, d), ("embed", "heads", "head_dim"))
        key = proj("k_proj", (k, d), ("embed", "kv_heads", "head_dim"))
        val = proj("v_proj", (k, d), ("embed", "kv_heads", "head_dim"))
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        key = nn.with_logical_constraint(key, ("batch", "length", "kv_heads", "head_dim"))
        if cfg.uses_rope:
            inv_freq = inverse_frequencies(cfg)
            q = apply_rope(q, positions, inv_freq)
            key = apply_rope(key, positions, inv_freq)

        new_cache = None
        q_offset = None
        if layer_cache is not None:
            # The whole [L, B, ...] cache travels in the scan carry and this layer writes its
            # slice in place (a per-layer scan input/output would copy the cache every step).
            ck, cv, li = layer_cache

            # Keys are kept [L, B, K, D, S], values [L, B, K, S, D]: attention gets this layer's
            # [B, S, K, D] views and, decoding, transposes them back, so XLA folds the pair and
            # its matmuls read the cache in place (see masked_attention_decode).
            def write(c, x, perm, at):  # x [B, T, K, D] into this layer's slots of c
                x = jnp.transpose(x.astype(c.dtype), perm)[None]
                return jax.lax.dynamic_update_slice(c, x, (li, 0, 0, *at))

            def read(c, perm):  # this layer's [B, S, K, D] view
                layer = jax.lax.dynamic_index_in_dim(c, li, axis=0, keepdims=False)
                return jnp.transpose(layer, perm).astype(dt)

            ck = write(ck, key, (0, 2, 3, 1), (0, cache_index))
            cv = write(cv, val, (0, 2, 1, 3), (cache_index, 0))
            new_cache = (ck, cv, li + 1)
            key, val = read(ck, (0, 3, 1, 2)), read(cv, (0, 2, 1, 3))
            q_offset = cache_index

        if cfg.uses_cope:
            shared_pos_emb, rel_emb = shared_tables
            if cfg.cope_shared_across_layers:
                pos_emb = shared_pos_emb
            else:
                pos_emb = self.param(
                    "cope_pos_emb",
                    _init(("cope_pos", "head_dim"), nn.initializers.zeros),
                    (cfg.cope_npos_max, d),
                    pdt,
                )
            # RAM's default divides the position logits by sqrt(d) with the content logits
            # (cope_scaled); scaling the table is the same function (z is linear in it). The
            # relative bias of cope+rel is always scaled, as in RAM.
            scale = d**-0.5
            pos_emb = pos_emb.astype(dt)
            if cfg.cope_scaled:
                pos_emb = pos_emb * jnp.asarray(scale, dt)
            out = cope_attention(
                q,
                key,
                val,
                pos_emb,
                kv_mask=kv_mask,
                causal=True,
                q_offset=q_offset,
                impl=cfg.cope_impl,
                rel_emb=None if rel_emb is None else rel_emb.astype(dt) * jnp.asarray(scale, dt),
            )
        else:
            out = masked_attention(
                q,
                key,
                val,
                kv_mask=kv_mask,
                causal=True,
                q_offset=q_offset,
                sliding_window=cfg.sliding_window,
                impl=cfg.attention_impl,
            )
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        y = Linear(
            (h, d), (cfg.hidden_size,), ("heads", "head_dim", "embed"), dt, pdt, name="o_proj"
        )(out)
        return y, new_cache


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)

        e, f = cfg.hidden_size, cfg.intermediate_size
        gate = Linear((e,), (f,), ("embed", "mlp"), dt, pdt, name="gate_proj")(x)
        up = Linear((e,), (f,), ("embed", "mlp"), dt, pdt, name="up_proj")(x)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return Linear((f,), (e,), ("mlp", "embed"), dt, pdt, name="down_proj")(hidden)


class Block(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, carry, positions, kv_mask, cache_index, shared_tables):
        x, layer_cache = carry
        cfg = self.config
        dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="attn_norm")(x)
        a, new_cache = Attention(cfg, name="attn")(
            h, positions, kv_mask, layer_cache, cache_index, shared_tables
        )
        x = x + a
        h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="mlp_norm")(x)
        x = x + MLP(cfg, name="mlp")(h)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return (x, new_cache), None


def unstack_layers(params: Any, num_layers: int) -> Any:
    """``params`` with the stacked ``layers`` subtree (leading axis L) split into a tuple of L
    per-layer trees; the model then runs its layers as an unrolled loop over them.

    Why: inside ``nn.scan``, XLA:CPU copies each layer's weights out of the stacked arrays
    (a dynamic slice) before every matmul, so a decode step moves every weight twice; with one
    buffer per layer the matmuls read them in place. The split itself is one copy of the layer
    weights (do it once, outside the decoding loop). Only for applying, never for training.
    """
    layers = params["layers"]
    split = tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(num_layers))
    return {**params, "layers": split}


def unstack_cache(cache: KVCache) -> KVCache:
    """The cache with k / v split into tuples of per-layer buffers (the unrolled layers write
    them in place); :meth:`KVCache` otherwise unchanged."""
    num_layers = cache.k.shape[0]
    return cache.replace(
        k=tuple(cache.k[i] for i in range(num_layers)),
        v=tuple(cache.v[i] for i in range(num_layers)),
    )


def _unrolled_layers(cfg, layer_params, x, cache, positions, kv_mask, cache_index, shared):
    """The decoder layers as a Python loop over per-layer parameter trees (``unstack_layers``);
    returns the hidden states and the new (k, v) per-layer tuples, or None without a cache."""
    block = Block(cfg, parent=None)
    stacked = cache is not None and not isinstance(cache.k, (tuple, list))
    ks, vs = [], []
    for i, p in enumerate(layer_params):
        lc = None
        if cache is not None:
            if stacked:
                lc = (cache.k, cache.v, jnp.asarray(i, jnp.int32))
            else:  # this layer's own buffers, as a stack of one (index 0: no copy)
                lc = (cache.k[i][None], cache.v[i][None], jnp.zeros((), jnp.int32))
        (x, new), _ = block.apply({"params": p}, (x, lc), positions, kv_mask, cache_index, shared)
        if cache is not None:
            if stacked:
                cache = cache.replace(k=new[0], v=new[1])
            else:
                ks.append(new[0][0])
                vs.append(new[1][0])
    if cache is None:
        return x, None
    if stacked:
        return x, (cache.k, cache.v)
    return x, (tuple(ks), tuple(vs))


class Transformer(nn.Module):
    """Decoder with an LM head (``head="lm"``) or a scalar reward head (``head="reward"``)."""

    config: ModelConfig
    head: str = "lm"

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        attention_mask: Array | None = None,
        positions: Array | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        last_only: bool = False,
    ):
        cfg = self.config
        if self.head not in ("lm", "reward"):
            raise ValueError(f"Transformer.head must be 'lm' or 'reward', got {self.head!r}")
        dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        b, t = tokens.shape
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        counts = jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1
        if cache is None:
            kv_mask, cache_index, layer_caches = mask, None, None
            base_pos = jnp.zeros((b, 1), jnp.int32)
        else:
            cache_index = cache.index
            kv_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, cache_index))
            layer_caches = None
            if not isinstance(cache.k, (tuple, list)):
                layer_caches = (cache.k, cache.v, jnp.zeros((), jnp.int32))
            base_pos = cache.next_pos[:, None]
        if positions is None:
            positions = base_pos + jnp.maximum(counts, 0)

        embedding = self.param(
            "embed", _init(("vocab", "embed")), (cfg.vocab_size, cfg.hidden_size), pdt
        )
        x = jnp.take(embedding, tokens, axis=0)
        if cfg.uses_absolute:
            # GPT-2's wpe: the position ids RoPE would use (real tokens counted, cache offset
            # added). The first dim is replicated (like the CoPE tables), the second follows embed.
            # Ids outside the table give NaN (jnp.take's fill mode), never a silently reused row.
            pos_table = self.param(
                "pos_embed",
                _init((None, "embed")),
                (cfg.max_position_embeddings, cfg.hidden_size),
                pdt,
            )
            x = x + jnp.take(pos_table, positions, axis=0, mode="fill", fill_value=jnp.nan)
        x = x.astype(dt)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        shared_pos_emb = None
        if cfg.uses_cope and cfg.cope_shared_across_layers:
            shared_pos_emb = self.param(
                "cope_pos_emb",
                _init(("cope_pos", "head_dim"), nn.initializers.zeros),
                (cfg.cope_npos_max, cfg.resolved_head_dim),
                pdt,
            )
        rel_emb = None
        if cfg.uses_rel:  # RAM's RelPosEmb: randn * head_dim ** -0.5
            rel_emb = self.param(
                "rel_pos_emb",
                _init(
                    ("cope_pos", "head_dim"),
                    nn.initializers.normal(cfg.resolved_head_dim**-0.5),
                ),
                (cfg.resolved_rel_npos, cfg.resolved_head_dim),
                pdt,
            )

        shared = (shared_pos_emb, rel_emb)
        unstacked = None if self.is_initializing() else self.variables["params"].get("layers")
        if isinstance(unstacked, (tuple, list)):
            # Parameters given one tree per layer (see unstack_layers): the layers run as an
            # unrolled Python loop over them, each with its own cache buffers when the cache is
            # unstacked too.
            x, new_layer_caches = _unrolled_layers(
                cfg, unstacked, x, cache, positions, kv_mask, cache_index, shared
            )
        else:
            block = Block
            if cfg.remat:
                block = nn.remat(Block, prevent_cse=False)
            layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, name="layers")
            (x, new_layer_caches), _ = layers(
                (x, layer_caches), positions, kv_mask, cache_index, shared
            )
        x = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="final_norm")(x)
        if last_only and self.head == "lm":
            # Only the last position (every row's last real token with left padding): what
            # decoding needs; a [B, T, V] logits tensor would dwarf the KV cache.
            x = x[:, -1:]

        if return_hidden:
            out = x
        elif self.head == "lm":
            if cfg.tie_embeddings:
                w = embedding.T
            else:
                w = self.param(
                    "lm_head", _init(("embed", "vocab")), (cfg.hidden_size, cfg.vocab_size), pdt
                )
            out = jnp.dot(x, w.astype(dt), preferred_element_type=jnp.float32).astype(jnp.float32)
            out = nn.with_logical_constraint(out, ("batch", "length", "vocab"))
        else:
            w = self.param("score", _init(("embed", None)), (cfg.hidden_size, cfg.num_labels), pdt)
            scores = jnp.dot(x, w.astype(dt), preferred_element_type=jnp.float32).astype(
                jnp.float32
            )
            # Score of the last real token of each row (HF LlamaForSequenceClassification pooling).
            last = jnp.max(jnp.where(mask, jnp.arange(t)[None, :], 0), axis=1)
            out = jnp.take_along_axis(scores, last[:, None, None], axis=1)[:, 0, :]

        if cache is None:
            return out
        new_cache = KVCache(
            k=new_layer_caches[0],
            v=new_layer_caches[1],
            mask=kv_mask,
            index=cache.index + t,
            next_pos=cache.next_pos + jnp.sum(mask, axis=1, dtype=jnp.int32),
        )
        return out, new_cache
