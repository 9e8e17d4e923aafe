"""The model's CoPE attention against RAM's code (facebookresearch/RAM, projects/cope:
src/cope/context_position.py ContextPosSelfAttn and src/models/relative_position.py RelPosEmb),
restated here in numpy float64 operation by operation, layouts included (RAM keeps the tables as
[head_dim, npos] and turns relative logits into absolute ones with its pad-and-reshape
``rel2abs``). Compared: one attention layer of ours (its own projections and tables) against
RAM's arithmetic on the same projections in float64. Ours runs in float32 (the model's compute
dtypes have no float64): on outputs of size 1-10 from sums over 32 features its rounding stays
below 2e-5 absolute, while the variants differ from each other by more than 1e-2.

Covers ``cope_scaled`` (RAM's default, softmax((q.k + z) / sqrt(d))), its ``--cope-nodiv``
(False: softmax(q.k / sqrt(d) + z)) and ``cope+rel`` with a relative table shorter than the
sequence (RAM's ``rel_pos_extend``: far keys share the last row) and as long as it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxselm.model import get_preset
from jaxselm.model.transformer import Attention


def _rel2abs(x: np.ndarray) -> np.ndarray:
    b, length, m = x.shape
    x = np.pad(x, ((0, 0), (0, 0), (0, length)))
    x = x.reshape(b, -1)[:, :-length]
    return x.reshape(b, length, m + length - 1)


def _ram_rel(query: np.ndarray, key: np.ndarray, emb: np.ndarray) -> np.ndarray:
    """RelPosEmb.forward with extend=True; ``emb`` is RAM's [1, D, npos]."""
    _, lk, _ = key.shape
    npos = emb.shape[-1]
    pos_logits = query @ emb  # B x Lq x npos
    if npos < lk:
        pos_logits = np.concatenate(
            [np.repeat(pos_logits[..., :1], lk - npos, axis=-1), pos_logits], axis=-1
        )
    pos_logits = _rel2abs(pos_logits)
    return pos_logits[:, :, -lk:]


def _ram_cope(query, key, val, pos_emb, *, nodiv, rel_emb=None):
    """ContextPosSelfAttn.forward (no separate gate key, no value gates, causal mask)."""
    _, length, d = key.shape
    npos = pos_emb.shape[-1]
    mask = np.tril(np.ones((length, length)))[None]
    gate_logits = query @ key.transpose(0, 2, 1)
    gates = 1 / (1 + np.exp(-gate_logits / np.sqrt(d))) * mask
    positions = np.flip(np.cumsum(np.flip(gates, -1), -1), -1)
    positions = np.minimum(positions, npos - 1)
    fixed = query @ pos_emb  # B x L x npos
    ceil, floor = np.ceil(positions).astype(int), np.floor(positions).astype(int)
    w = positions - floor
    pos_logits = np.take_along_axis(fixed, ceil, -1) * w + np.take_along_axis(fixed, floor, -1) * (
        1 - w
    )
    attn = gate_logits.copy()
    if rel_emb is not None:
        attn = attn + _ram_rel(query, key, rel_emb)
    if nodiv:
        attn = attn / np.sqrt(d) + pos_logits
    else:
        attn = (attn + pos_logits) / np.sqrt(d)
    with np.errstate(divide="ignore"):
        attn = attn + np.log(mask)
    attn = np.exp(attn - attn.max(-1, keepdims=True))
    attn = attn / attn.sum(-1, keepdims=True)
    return attn @ val


def _ours_and_ram(position: str, scaled: bool, rel_npos: int | None, t: int = 11):
    cfg = get_preset(
        "tiny",
        position=position,
        cope_npos_max=6,
        cope_scaled=scaled,
        rel_npos_max=rel_npos,
        cope_impl="reference",
    )
    h, kvh, d, e = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.hidden_size
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, t, e)), jnp.float32)
    rel = None
    if cfg.uses_rel:
        rel = jnp.asarray(rng.standard_normal((cfg.resolved_rel_npos, d)), jnp.float32)
    mod = Attention(cfg)
    positions = jnp.broadcast_to(jnp.arange(t), (2, t))
    kv_mask = jnp.ones((2, t), bool)
    params = nn.unbox(mod.init(jax.random.key(0), x, positions, kv_mask, None, None, (None, rel)))
    params = jax.tree.map(  # a non-zero CoPE table and O(1) projections
        lambda p: jnp.asarray(rng.standard_normal(p.shape) * (0.4 if p.ndim > 2 else 1.0), p.dtype),
        params,
    )
    ours, _ = mod.apply(params, x, positions, kv_mask, None, None, (None, rel))

    p = jax.tree.map(np.asarray, params["params"])
    xn = np.asarray(x)
    q = np.einsum("bte,ehd->bhtd", xn, p["q_proj"]["kernel"])
    k = np.repeat(np.einsum("bte,ekd->bktd", xn, p["k_proj"]["kernel"]), h // kvh, axis=1)
    v = np.repeat(np.einsum("bte,ekd->bktd", xn, p["v_proj"]["kernel"]), h // kvh, axis=1)
    flat = lambda a: a.reshape(-1, t, d)  # noqa: E731  (RAM's split_heads: B*H x L x D)
    out = _ram_cope(
        flat(q),
        flat(k),
        flat(v),
        p["cope_pos_emb"].T[None],  # RAM's [1, D, npos]
        nodiv=not scaled,
        rel_emb=None if rel is None else np.asarray(rel)[::-1].T[None],  # RAM: index R-1 = 0
    ).reshape(2, h, t, d)
    ram = np.einsum("bhtd,hde->bte", out, p["o_proj"]["kernel"])
    return np.asarray(ours), ram


TOL = dict(rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("scaled", [True, False])
def test_cope_matches_ram_default_and_nodiv(scaled):
    ours, ram = _ours_and_ram("cope", scaled, None)
    np.testing.assert_allclose(ours, ram, **TOL)


def test_scaled_and_unscaled_differ():
    a, _ = _ours_and_ram("cope", True, None)
    b, _ = _ours_and_ram("cope", False, None)
    assert np.max(np.abs(a - b)) > 1e-2


@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("rel_npos", [4, 11])
def test_cope_rel_matches_ram(scaled, rel_npos):
    ours, ram = _ours_and_ram("cope+rel", scaled, rel_npos)
    without, _ = _ours_and_ram("cope", scaled, None)
    assert np.max(np.abs(ours - without)) > 1e-2
    np.testing.assert_allclose(ours, ram, **TOL)
