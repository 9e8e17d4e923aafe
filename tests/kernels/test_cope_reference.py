"""The jnp CoPE reference against an independent float64 NumPy transcription of the paper.

The NumPy version below follows the paper's PyTorch listing step by step (attn_logits += log(mask),
sigmoid gates, flip-cumsum-flip, clamp, ceil/floor gather, interpolation, softmax) with GQA done by
repeating kv heads. It shares no code with jaxselm.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxselm.kernels.cope import cope_attention, cope_positions


def numpy_cope(q, k, v, pos_emb, kv_mask=None, causal=True, q_offset=None):
    q, k, v, pos_emb = (np.asarray(a, np.float64) for a in (q, k, v, pos_emb))
    b, t, h, d = q.shape
    s = k.shape[1]
    g = h // k.shape[2]
    k = np.repeat(k, g, axis=2)
    v = np.repeat(v, g, axis=2)
    npos = pos_emb.shape[0]
    offset = s - t if q_offset is None else q_offset
    mask = np.ones((b, 1, t, s), bool)
    if causal:
        mask &= (np.arange(s)[None, :] <= np.arange(t)[:, None] + offset)[None, None]
    if kv_mask is not None:
        mask &= np.asarray(kv_mask, bool)[:, None, None, :]
    with np.errstate(divide="ignore"):
        attn_logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d) + np.log(mask)
    gates = 1.0 / (1.0 + np.exp(-attn_logits))
    pos = np.flip(np.cumsum(np.flip(gates, -1), -1), -1)
    pos = np.minimum(pos, npos - 1)
    pos_ceil = np.ceil(pos).astype(int)
    pos_floor = np.floor(pos).astype(int)
    logits_int = np.einsum("bthd,pd->bhtp", q, pos_emb)
    logits_ceil = np.take_along_axis(logits_int, pos_ceil, -1)
    logits_floor = np.take_along_axis(logits_int, pos_floor, -1)
    w = pos - pos_floor
    attn_logits = attn_logits + logits_ceil * w + logits_floor * (1 - w)
    out = np.zeros((b, h, t, v.shape[-1]))
    for bi in range(b):
        for hi in range(h):
            for ti in range(t):
                row = attn_logits[bi, hi, ti]
                if not np.isfinite(row).any():
                    continue  # no valid key: zeros
                p = np.exp(row - row[np.isfinite(row)].max())
                out[bi, hi, ti] = (p / p.sum()) @ v[bi, :, hi]
    return out.transpose(0, 2, 1, 3)


def _inputs(seed, b, t, s, h, kh, d, p, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, h, d)).astype(dtype)
    k = rng.normal(size=(b, s, kh, d)).astype(dtype)
    v = rng.normal(size=(b, s, kh, d)).astype(dtype)
    e = rng.normal(size=(p, d)).astype(dtype)
    return q, k, v, e


CASES = [
    # name, B, T, S, H, K, D, P, pad
    ("mha_square", 2, 9, 9, 2, 2, 8, 16, False),
    ("gqa_padded", 2, 11, 11, 4, 2, 8, 5, True),
    ("decode_T_lt_S", 2, 3, 12, 4, 1, 8, 32, True),
    ("P_one", 1, 6, 6, 2, 2, 4, 1, False),
    ("P_gt_T", 1, 5, 5, 2, 1, 16, 64, True),
]


# fp32 vs float64: inputs are O(1), logits O(sqrt(D)); softmax and a D-term dot product in fp32
# accumulate a few ulps each, so 1e-5 absolute / relative bounds the difference with margin.
FP32_TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,b,t,s,h,kh,d,p,pad", CASES, ids=[c[0] for c in CASES])
def test_reference_matches_numpy_transcription(name, b, t, s, h, kh, d, p, pad):
    q, k, v, e = _inputs(0, b, t, s, h, kh, d, p)
    kv_mask = None
    if pad:
        kv_mask = np.ones((b, s), bool)
        kv_mask[0, : s // 3] = False  # left padding
        kv_mask[-1, s // 2] = False  # a hole in the middle
    got = cope_attention(
        jnp.asarray(q),
        jnp.asarray(k),
        jnp.asarray(v),
        jnp.asarray(e),
        kv_mask=None if kv_mask is None else jnp.asarray(kv_mask),
    )
    want = numpy_cope(q, k, v, e, kv_mask)
    np.testing.assert_allclose(np.asarray(got), want, **FP32_TOL)


def test_non_causal_and_explicit_q_offset():
    q, k, v, e = _inputs(1, 2, 4, 10, 2, 2, 8, 8)
    kv_mask = np.ones((2, 10), bool)
    kv_mask[:, 7:] = False  # unwritten cache slots
    got = cope_attention(q, k, v, e, kv_mask=jnp.asarray(kv_mask), q_offset=3)
    want = numpy_cope(q, k, v, e, kv_mask, q_offset=3)
    np.testing.assert_allclose(np.asarray(got), want, **FP32_TOL)
    got = cope_attention(q, k, v, e, causal=False)
    np.testing.assert_allclose(np.asarray(got), numpy_cope(q, k, v, e, causal=False), **FP32_TOL)


def test_rows_without_valid_keys_are_zero_and_gradients_finite():
    q, k, v, e = _inputs(2, 1, 6, 6, 2, 2, 4, 4)
    kv_mask = jnp.asarray(np.array([[False, False, True, True, True, True]]))
    out = cope_attention(q, k, v, e, kv_mask=kv_mask)
    assert np.all(np.asarray(out[0, :2]) == 0.0)

    def loss(*a):
        return cope_attention(*a, kv_mask=kv_mask).sum()

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, e)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("name,b,t,s,h,kh,d,p,pad", CASES[1:4], ids=[c[0] for c in CASES[1:4]])
def test_gradients_against_finite_differences(name, b, t, s, h, kh, d, p, pad):
    with jax.enable_x64(True):
        q, k, v, e = (jnp.asarray(a) for a in _inputs(3, b, t, s, h, kh, d, p, np.float64))
        kv_mask = jnp.ones((b, s), bool).at[0, 0].set(not pad)
        w = jnp.asarray(np.random.default_rng(4).normal(size=(b, t, h, d)))

        def f(q, k, v, e):
            return jnp.sum(w * cope_attention(q, k, v, e, kv_mask=kv_mask))

        # float64 central differences with eps 1e-6 have error ~1e-10; positions are piecewise
        # smooth (kinks at integers and at the clamp), and a random point lies at distance >> eps
        # from a kink, so 1e-5 tolerances separate a wrong gradient from rounding.
        check_grads(f, (q, k, v, e), order=1, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-5)


def test_all_gates_one_is_relative_position_bias():
    """With every gate 1, p_ij = i - j + 1 (the diagonal counts): a relative-position bias."""
    b, t, h, d, p = 1, 7, 2, 8, 5
    rng = np.random.default_rng(5)
    # Identical unit keys u and q = 50 sqrt(D) u: every logit s_ij = 50, so each sigmoid gate is 1
    # to fp32 precision, while softmax over s + b only sees the position bias.
    u = rng.normal(size=(h, d))
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    k = np.tile(u[None, None], (b, t, 1, 1)).astype(np.float32)
    q = (50.0 * np.sqrt(d) * k).astype(np.float32)
    v = rng.normal(size=(b, t, h, d)).astype(np.float32)
    e = rng.normal(size=(p, d)).astype(np.float32)
    gates, pos = cope_positions(jnp.asarray(q), jnp.asarray(k), jnp.asarray(e))
    causal = np.tril(np.ones((t, t), bool))
    np.testing.assert_array_equal(np.asarray(gates)[0, 0][causal], 1.0)
    rel = np.arange(t)[:, None] - np.arange(t)[None, :] + 1.0
    np.testing.assert_array_equal(np.asarray(pos)[0, 0][causal], np.minimum(rel, p - 1)[causal])
    # Softmax over s + b with constant s: weights are softmax_j(z_i[min(i - j + 1, P - 1)]).
    z = np.einsum("thd,pd->htp", q[0], e)
    want = np.zeros((t, h, d))
    for i in range(t):
        for hh in range(h):
            idx = np.minimum(i - np.arange(i + 1) + 1, p - 1)
            logits = z[hh, i, idx]
            wts = np.exp(logits - logits.max())
            want[i, hh] = (wts / wts.sum()) @ v[0, : i + 1, hh]
    got = cope_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(e))
    np.testing.assert_allclose(np.asarray(got)[0], want, atol=1e-4, rtol=1e-4)


class JitVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree_with_numpy(self):
        q, k, v, e = _inputs(6, 2, 5, 5, 4, 2, 8, 6)
        kv_mask = np.ones((2, 5), bool)
        kv_mask[1, :2] = False
        fn = self.variant(lambda q, k, v, e, m: cope_attention(q, k, v, e, kv_mask=m))
        got = fn(q, k, v, e, jnp.asarray(kv_mask))
        np.testing.assert_allclose(np.asarray(got), numpy_cope(q, k, v, e, kv_mask), **FP32_TOL)


def test_bad_shapes_raise():
    q, k, v, e = (jnp.asarray(a) for a in _inputs(7, 1, 4, 4, 3, 2, 8, 4))
    with pytest.raises(ValueError, match="kv heads"):
        cope_attention(q, k, v, e)
    q, k, v, e = (jnp.asarray(a) for a in _inputs(7, 1, 4, 4, 2, 2, 8, 4))
    with pytest.raises(ValueError, match="pos_emb"):
        cope_attention(q, k, v, e[:, :4])
    with pytest.raises(ValueError, match="kv_mask"):
        cope_attention(q, k, v, e, kv_mask=jnp.ones((1, 3), bool))
