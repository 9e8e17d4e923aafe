"""The decoder: shapes, dtypes, padding invariance, KV-cache decoding == full forward, reward head,
learned absolute positions."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxselm.kernels.attention import masked_attention
from jaxselm.model import (
    apply_with_cache,
    forward,
    get_preset,
    init_cache,
    init_params,
    reward_scores,
    unstack_cache,
    unstack_layers,
)

MODES = ["rope", "cope", "cope+rel", "cope+rope", "none", "absolute"]


def _config(position, **kw):
    return get_preset("tiny", position=position, cope_npos_max=8, rel_npos_max=6, **kw)


@functools.cache
def _cached_params(cfg, seed, head):
    params = init_params(cfg, jax.random.key(seed), head=head)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)


def _params(cfg, seed=0, head="lm"):
    """Random params with noise everywhere, so CoPE's zero-initialised table is non-trivial.

    Cached per (config, seed, head), with fresh containers so a test cannot edit another's."""
    return jax.tree.map(lambda x: x, _cached_params(cfg, seed, head))


def _batch(b=3, t=12, vocab=64, pads=(0, 3, 7), seed=1):
    tokens = jax.random.randint(jax.random.key(seed), (b, t), 1, vocab)
    mask = jnp.arange(t)[None, :] >= jnp.asarray(pads)[:, None]  # left padding
    return tokens, mask


# fp32 end to end; cached and uncached paths do the same arithmetic in a different order
# (e.g. softmax over S padded slots vs T), so they agree to a few fp32 ulps of O(1) logits.
TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("position", MODES)
def test_shapes_and_dtypes(position):
    cfg = _config(position)
    params = _params(cfg)
    tokens, mask = _batch()
    logits = forward(params, cfg, tokens, mask)
    chex.assert_shape(logits, (3, 12, cfg.vocab_size))
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))
    hidden = forward(params, cfg, tokens, mask, return_hidden=True)
    chex.assert_shape(hidden, (3, 12, cfg.hidden_size))


@pytest.mark.parametrize("position", ["rope", "cope"])
def test_bf16_compute_gives_fp32_logits_close_to_fp32(position):
    cfg = _config(position)
    params = _params(cfg)
    tokens, mask = _batch()
    ref = forward(params, cfg, tokens, mask)
    low = forward(params, cfg.replace(dtype="bfloat16"), tokens, mask)
    assert low.dtype == jnp.float32
    # bf16 has 8 mantissa bits (rel. error 2^-8 per op); through two layers the logits (O(1-10))
    # move by a few percent of their scale at most.
    scale = float(jnp.abs(ref).max())
    assert float(jnp.abs(low - ref).max()) < 0.05 * scale


@pytest.mark.parametrize("position", MODES)
def test_left_padding_does_not_change_real_logits(position):
    cfg = _config(position)
    params = _params(cfg)
    tokens, mask = _batch()
    padded = forward(params, cfg, tokens, mask)
    for row, pad in enumerate((0, 3, 7)):
        alone = forward(params, cfg, tokens[row : row + 1, pad:])
        np.testing.assert_allclose(np.asarray(padded[row, pad:]), np.asarray(alone[0]), **TOL)


class IncrementalDecodingTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_cached_decoding_equals_full_forward(self):
        for position in MODES:
            cfg = _config(position)
            params = _params(cfg)
            tokens, mask = _batch(t=12)
            full = forward(params, cfg, tokens, mask)

            step = self.variant(lambda p, t, m, c, cfg=cfg: apply_with_cache(p, cfg, t, m, c))
            cache = init_cache(cfg, batch=3, max_len=16)
            logits, cache = step(params, tokens[:, :8], mask[:, :8], cache)  # prefill 8
            outs = [logits]
            for t in range(8, 12):  # then one token at a time
                logits, cache = step(params, tokens[:, t : t + 1], None, cache)
                outs.append(logits)
            inc = jnp.concatenate(outs, axis=1)
            real = np.asarray(mask)[..., None]
            np.testing.assert_allclose(
                np.where(real, inc, 0), np.where(real, full, 0), **TOL, err_msg=position
            )
            assert int(cache.index) == 12
            np.testing.assert_array_equal(np.asarray(cache.next_pos), 12 - np.array([0, 3, 7]))


@pytest.mark.parametrize("position", ["rope", "cope+rel", "absolute"])
def test_unstacked_layers_equal_the_scan(position):
    """Parameters split per layer (the unrolled loop generation uses on CPU) give the scan's
    logits, without a cache, with the stacked cache and with per-layer cache buffers; the cache
    written per layer equals the stacked one."""
    cfg = _config(position, num_layers=3)
    params = _params(cfg)
    flat = unstack_layers(params, cfg.num_layers)
    assert isinstance(flat["layers"], tuple) and len(flat["layers"]) == 3
    tokens, mask = _batch(t=10)
    np.testing.assert_allclose(
        forward(flat, cfg, tokens, mask), forward(params, cfg, tokens, mask), **TOL
    )
    step = jax.jit(lambda p, t, m, c: apply_with_cache(p, cfg, t, m, c))
    cache = init_cache(cfg, batch=3, max_len=12)
    _, cache = step(params, tokens[:, :8], mask[:, :8], cache)  # prefill on the scan
    want, want_cache = step(params, tokens[:, 8:9], None, cache)
    for got, got_cache in (
        step(flat, tokens[:, 8:9], None, cache),
        step(flat, tokens[:, 8:9], None, unstack_cache(cache)),
    ):
        np.testing.assert_allclose(got, want, **TOL)
        for name in ("k", "v"):
            g = getattr(got_cache, name)
            g = jnp.stack(g) if isinstance(g, tuple) else g
            np.testing.assert_allclose(g, getattr(want_cache, name), **TOL)
        np.testing.assert_array_equal(got_cache.mask, want_cache.mask)
        assert int(got_cache.index) == int(want_cache.index) == 9


def test_chunked_prefill_equals_full_forward():
    cfg = _config("cope+rope")
    params = _params(cfg)
    tokens, mask = _batch(t=12)
    full = forward(params, cfg, tokens, mask)
    cache = init_cache(cfg, batch=3, max_len=12)
    a, cache = apply_with_cache(params, cfg, tokens[:, :5], mask[:, :5], cache)
    b, cache = apply_with_cache(params, cfg, tokens[:, 5:], mask[:, 5:], cache)
    real = np.asarray(mask)[..., None]
    np.testing.assert_allclose(
        np.where(real, jnp.concatenate([a, b], 1), 0), np.where(real, full, 0), **TOL
    )


def test_shared_cope_table_and_remat():
    cfg = _config("cope", cope_shared_across_layers=True, remat=True)
    params = _params(cfg)
    assert params["cope_pos_emb"].shape == (8, cfg.resolved_head_dim)
    assert "cope_pos_emb" not in params["layers"]["attn"]
    tokens, mask = _batch()

    def loss(p):
        return jnp.mean(forward(p, cfg, tokens, mask) ** 2)

    grads = jax.grad(loss)(params)
    assert float(jnp.abs(grads["cope_pos_emb"]).sum()) > 0
    # remat changes memory, not values
    ref = jax.grad(lambda p: jnp.mean(forward(p, cfg.replace(remat=False), tokens, mask) ** 2))(
        params
    )
    chex.assert_trees_all_close(grads, ref, atol=1e-6, rtol=1e-5)


def test_tied_embeddings_have_no_lm_head():
    cfg = _config("rope", tie_embeddings=True)
    params = _params(cfg)
    assert "lm_head" not in params
    tokens, mask = _batch()
    hidden = forward(params, cfg, tokens, mask, return_hidden=True)
    np.testing.assert_allclose(
        np.asarray(forward(params, cfg, tokens, mask)),
        np.asarray(hidden @ params["embed"].T),
        atol=1e-5,
        rtol=1e-5,
    )


def test_reward_head_scores_last_real_token():
    cfg = _config("rope")
    params = _params(cfg, head="reward")
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 1, 64)
    right_mask = jnp.arange(8)[None, :] < jnp.asarray([8, 5])[:, None]  # right padding
    scores = reward_scores(params, cfg, tokens, right_mask)
    chex.assert_shape(scores, (2,))
    alone = reward_scores(params, cfg, tokens[1:, :5])
    np.testing.assert_allclose(float(scores[1]), float(alone[0]), atol=1e-5, rtol=1e-5)
    # score = hidden state of the last real token . score weights
    hidden = forward(
        {k: v for k, v in params.items() if k != "score"}, cfg, tokens[1:, :5], return_hidden=True
    )
    np.testing.assert_allclose(
        float(alone[0]), float(hidden[0, -1] @ params["score"][:, 0]), atol=1e-5, rtol=1e-5
    )


def test_sliding_window_masks_distant_keys():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 6, 2, 4)).astype(np.float32)
    k = rng.normal(size=(1, 6, 2, 4)).astype(np.float32)
    v = rng.normal(size=(1, 6, 2, 4)).astype(np.float32)
    out = np.asarray(masked_attention(q, k, v, sliding_window=2))
    for i in range(6):
        lo = max(0, i - 1)  # window 2: keys i-1 and i
        for h in range(2):
            s = q[0, i, h] @ k[0, lo : i + 1, h].T / 2.0
            w = np.exp(s - s.max())
            np.testing.assert_allclose(
                out[0, i, h], (w / w.sum()) @ v[0, lo : i + 1, h], atol=1e-5, rtol=1e-5
            )


def test_rope_llama3_scaling_matches_transcription():
    """inverse_frequencies vs the published Llama-3.1 scaling rule, written out independently."""
    import math

    from jaxselm.model.rope import inverse_frequencies

    cfg = get_preset("llama3.1-8b")
    d, theta = cfg.resolved_head_dim, cfg.rope_theta
    want = []
    for i in range(0, d, 2):
        f = 1.0 / theta ** (i / d)
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:
            want.append(f)
        elif wavelen > 8192 / 1.0:
            want.append(f / 8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            want.append((1 - smooth) * f / 8.0 + smooth * f)
    np.testing.assert_allclose(inverse_frequencies(cfg), np.array(want), rtol=1e-6)


# -- learned absolute positions (position="absolute") -------------------------------------------


def _rms_norm(x, scale, eps):
    return scale * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def test_absolute_positions_numpy_reference_of_the_input_stage():
    """With every residual branch's output projection zeroed, the layers are the identity, so the
    logits are RMSNorm(embed[token] + pos_embed[position]) @ lm_head: checked against NumPy with
    position = (index among the row's real tokens), i.e. clip(cumsum(mask) - 1, 0)."""
    cfg = _config("absolute")
    params = _params(cfg)
    assert params["pos_embed"].shape == (cfg.max_position_embeddings, cfg.hidden_size)
    layers = dict(params["layers"])
    layers["attn"] = {
        **layers["attn"],
        "o_proj": {"kernel": jnp.zeros_like(layers["attn"]["o_proj"]["kernel"])},
    }
    layers["mlp"] = {
        **layers["mlp"],
        "down_proj": {"kernel": jnp.zeros_like(layers["mlp"]["down_proj"]["kernel"])},
    }
    params = {**params, "layers": layers}
    tokens, mask = _batch()
    got = np.asarray(forward(params, cfg, tokens, mask))

    tok, m = np.asarray(tokens), np.asarray(mask)
    pos = np.clip(np.cumsum(m, axis=1) - 1, 0, None)
    np.testing.assert_array_equal(pos[2], [0] * 7 + [0, 1, 2, 3, 4])  # 7 pads, then 0..4
    p = {k: np.asarray(params[k], np.float64) for k in ("embed", "pos_embed", "lm_head")}
    scale = np.asarray(params["final_norm"]["scale"], np.float64)
    x = p["embed"][tok] + p["pos_embed"][pos]
    want = _rms_norm(x, scale, cfg.rms_norm_eps) @ p["lm_head"]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_absolute_table_matters_and_only_used_rows_do():
    cfg = _config("absolute")
    params = _params(cfg)
    tokens, mask = _batch()  # row 0 is unpadded: positions 0..11 are used, none beyond
    ref = forward(params, cfg, tokens, mask)
    table = params["pos_embed"]
    zeroed = forward({**params, "pos_embed": jnp.zeros_like(table)}, cfg, tokens, mask)
    assert float(jnp.abs(ref - zeroed).max()) > 1e-2
    unused_changed = forward({**params, "pos_embed": table.at[12:].set(5.0)}, cfg, tokens, mask)
    np.testing.assert_array_equal(np.asarray(unused_changed), np.asarray(ref))


@pytest.mark.parametrize("position, changes", [("absolute", True), ("none", False)])
def test_shifted_position_ids_change_only_absolute(position, changes):
    """The same tokens at position ids shifted by 5: NoPE ignores them, the absolute table not."""
    cfg = _config(position)
    params = _params(cfg)
    tokens, mask = _batch(pads=(0, 0, 0))
    a = forward(params, cfg, tokens, mask)
    b = forward(params, cfg, tokens, mask, positions=jnp.broadcast_to(jnp.arange(12) + 5, (3, 12)))
    assert (float(jnp.abs(a - b).max()) > 1e-2) == changes


def test_absolute_positions_outside_the_table_are_nan_not_reused():
    """Callers refuse sequences longer than the context (sampling, judge; padding does not count,
    positions are real-token indices). If a row's ids still pass max_position_embeddings (256),
    they give NaN (which attention spreads along the row), never a silently reused table row."""
    cfg = _config("absolute")
    params = _params(cfg)
    tokens, mask = _batch(pads=(0, 0, 0))
    ids = jnp.stack([jnp.arange(12) + 250, jnp.arange(12) + 244, jnp.arange(12)])  # row 0: 250..261
    logits = np.asarray(forward(params, cfg, tokens, mask, positions=ids))
    assert np.all(np.isfinite(logits[1:])) and np.all(np.isnan(logits[0, 6:]))
