"""Rotary position embedding, HF Llama convention (rotate-half), with Llama-3 / linear scaling.

Matches `transformers`' LlamaRotaryEmbedding: inv_freq = 1 / theta^(2i/D) in float32, angles =
position * inv_freq in float32, x' = x cos + rotate_half(x) sin with cos/sin of [freqs, freqs].
HF checkpoints therefore load without permuting q/k projections.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxselm.model.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """[D/2] float32 inverse frequencies, with rope_scaling applied as HF does."""
    d = config.resolved_head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    inv = inv.astype(np.float32)
    sc = config.rope_scaling
    if sc is None:
        return inv
    if sc.rope_type == "linear":
        return (inv / sc.factor).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    old = sc.original_max_position_embeddings
    low_wavelen = old / sc.low_freq_factor
    high_wavelen = old / sc.high_freq_factor
    wavelen = 2 * math.pi / inv
    inv_l = np.where(wavelen > low_wavelen, inv / sc.factor, inv)
    smooth = (old / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
    smoothed = (1 - smooth) * inv_l / sc.factor + smooth * inv_l
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, inv_l).astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate x [B, T, H, D] by integer positions [B, T]; angles in float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    return x * cos + rotate_half(x) * sin
