"""masked_attention's implementations against impl="xla" (the reference): outputs and gradients.

``blockwise`` is checked in float64 first (the same maths up to summation order, so agreement to
~1e-12 proves the online softmax, the skipped tiles and the hand-written backward exact), then in
float32 and bfloat16 over GQA, left padding with a row that has no valid key, holes, causal and
not, decoding against a cache (T = 1 and T = 3 queries at a traced q_offset into S = 40 keys) and
sliding windows. ``splash`` runs in Pallas interpret mode on CPU; ``cudnn`` needs a GPU (those
tests skip here, and the suite's conftest is CPU-only: benchmarks/gpu_all.sh imports this module
and runs CUDNN_CASES through cuDNN on one), but the translation of our masks into
jax.nn.dot_product_attention's arguments is checked on CPU through jax.nn's XLA path.

Tolerances, relative to max(1, max|ref|) per array: float64 1e-10 (summation order only);
float32 2e-5 (reordered sums of <= 40 terms, eps 1.2e-7, plus the online softmax's rescaling by
exp(m_old - m_new): worst seen 3.5e-7; the margin covers longer rows and other CPUs);
bfloat16 2e-2 (both paths round the probabilities and ds to bf16 before their matmuls, but at
different points: blockwise rounds the unnormalised exp(s - m_running), xla the normalised
softmax, so each P V / dS K term differs by up to 2^-8 relative, and the bf16 result itself is
rounded to 2^-8: a few bf16 epsilons; worst seen 7.3e-3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxselm.errors import ConfigError
from jaxselm.kernels import attention
from jaxselm.kernels.attention import (
    IMPLS,
    masked_attention,
    masked_attention_blockwise,
    masked_attention_cudnn,
    masked_attention_decode,
    masked_attention_xla,
    prefix_lengths,
    resolve_impl,
)
from jaxselm.kernels.cope import BlockSizes
from jaxselm.model import abstract_params, forward, get_preset

TOL = {"float64": 1e-10, "float32": 2e-5, "bfloat16": 2e-2}
ON_GPU = jax.default_backend() == "gpu"


def make_inputs(b, t, s, h, kv, d, dtype, *, mask=None, seed=0):
    """Random q, k, v and a kv_mask: None, "left" (left padding, row 0 without any valid key),
    "right" (right padding, every row keeps >= 1 key) or "holes" (random invalid keys)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, s, kv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, kv, d), jnp.float32).astype(dtype)
    pos = jnp.arange(s)[None]
    lens = jax.random.randint(ks[3], (b, 1), 1, s + 1)
    kv_mask = {
        None: None,
        "left": (pos >= s - lens).at[0].set(False),
        "right": pos < lens,
        "holes": jax.random.bernoulli(ks[3], 0.8, (b, s)),
    }[mask]
    return q, k, v, kv_mask


def run(fn, q, k, v, *, q_offset=None, **kw):
    """Output and gradients wrt (q, k, v) of sum(out * cotangent), in one jitted program (one
    compile); an integer ``q_offset`` is an argument of it (a traced int32, as in decoding)."""

    def f(q, k, v, off):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, q_offset=off, **kw), q, k, v)
        ct = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        return (out, *vjp(ct.astype(out.dtype)))

    return jax.jit(f)(q, k, v, q_offset)


def impl(name):
    return lambda q, k, v, **kw: masked_attention(q, k, v, impl=name, **kw)


def xla(q, k, v, **kw):
    """The reference: the jnp scores for any T (impl="xla" itself routes T = 1 to the decode
    formulation, checked against this below)."""
    return masked_attention_xla(q, k, v, **kw)


def assert_close(got, want, tol, names=("out", "dq", "dk", "dv")):
    for name, g, w in zip(names, got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype)
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert np.all(np.isfinite(g)), f"{name}: non-finite values"
        err = np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1.0)
        assert err <= tol, f"{name}: max error {err:.3g} x max|ref| > {tol:g}"


# b, t, s, h, kv, d, causal, mask, q_offset, window -- shared with benchmarks/gpu_all.sh
CASES = [
    (2, 37, 37, 4, 2, 16, True, "left", None, None),  # GQA, a row with no valid key, ragged tiles
    (2, 40, 40, 4, 4, 16, False, "holes", None, 9),  # non-causal window: left side only
    (2, 40, 40, 4, 2, 16, True, "left", None, 7),  # sliding window
    (2, 1, 40, 4, 2, 16, True, None, 25, None),  # a decode step against a cache (no mask)
    (2, 3, 40, 4, 1, 16, True, "left", 30, 6),  # 3 queries against a cache, window, MQA
]
SMALL_BLOCKS = BlockSizes(block_q=8, block_k=16)  # several tiles per row at these lengths


def case_inputs(case, dtype):
    b, t, s, h, kv, d, causal, mask, q_offset, window = case
    q, k, v, kv_mask = make_inputs(b, t, s, h, kv, d, jnp.dtype(dtype), mask=mask)
    return (q, k, v), dict(kv_mask=kv_mask, causal=causal, q_offset=q_offset, sliding_window=window)


def _blockwise(q, k, v, **kw):
    return masked_attention_blockwise(q, k, v, block_sizes=SMALL_BLOCKS, **kw)


def test_blockwise_float64_matches_xla():
    """Decode-shaped (3 queries at a traced q_offset), left padding with an empty row, a window,
    MQA, several tiles: every feature of the tiling at once, where only summation order differs."""
    with jax.enable_x64(True):
        args, kw = case_inputs(CASES[4], "float64")
        assert_close(run(_blockwise, *args, **kw), run(xla, *args, **kw), TOL["float64"])


@pytest.mark.parametrize(
    "case,dtype",
    [(c, "float32") for c in CASES] + [(CASES[i], "bfloat16") for i in (0, 2, 4)],
)
def test_blockwise_matches_xla(case, dtype):
    args, kw = case_inputs(case, dtype)
    got = run(_blockwise, *args, **kw)
    assert_close(got, run(xla, *args, **kw), TOL[dtype])
    if case[7] == "left":  # row 0 has no valid key: zeros out, zero gradient, never NaN
        assert np.all(np.asarray(got[0][0]) == 0) and np.all(np.asarray(got[1][0]) == 0)


# --------------------------------------------------------------------------------------------
# decode: one query per row, k / v as the transposed views of the model's KV cache

# b, s, h, kv, d, mask, q_offset, window
DECODE_CASES = [
    (3, 40, 4, 2, 16, "left", 25, None),  # GQA, row 0 without any valid key
    (2, 40, 4, 4, 16, "holes", 39, 9),  # MHA, holes, a sliding window
    (2, 33, 6, 1, 8, "right", 17, None),  # MQA, odd lengths
]


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_matches_xla(case, dtype):
    """``impl="xla"`` at T = 1 (masked_attention_decode) against the jnp scores, outputs and
    gradients, with k / v given as the model hands them over: transposed views of the cache's
    [B, K, D, S] keys and [B, K, S, D] values."""
    b, s, h, kv, d, mask, q_offset, window = case
    with jax.enable_x64(dtype == "float64"):
        q, k, v, kv_mask = make_inputs(b, 1, s, h, kv, d, jnp.dtype(dtype), mask=mask)
        kw = dict(kv_mask=kv_mask, causal=True, q_offset=q_offset, sliding_window=window)
        k_cache, v_cache = jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 1, 3))

        def decode(q, k_cache, v_cache, **kw):  # the views, inside the traced function
            k = jnp.transpose(k_cache, (0, 3, 1, 2))
            v = jnp.transpose(v_cache, (0, 2, 1, 3))
            return impl("xla")(q, k, v, **kw)

        got = run(decode, q, k_cache, v_cache, **kw)
        got = (got[0], got[1], jnp.transpose(got[2], (0, 3, 1, 2)), jnp.swapaxes(got[3], 1, 2))
        assert_close(got, run(xla, q, k, v, **kw), TOL[dtype])
        direct = run(masked_attention_decode, q, k, v, **kw)
        assert_close(direct, got, TOL[dtype])
        if mask == "left":  # no valid key: zeros, never NaN
            assert np.all(np.asarray(got[0][0]) == 0)


def test_decode_refuses_several_queries():
    q, k, v, _ = make_inputs(1, 2, 8, 2, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="one query per row"):
        masked_attention_decode(q, k, v)


# --------------------------------------------------------------------------------------------
# splash (Pallas interpret mode on CPU: slow, so one case)


@pytest.mark.skipif(ON_GPU, reason="splash is a TPU kernel (interpreted on CPU)")
def test_splash_matches_xla():
    """GQA, left padding with a row that has no valid key (splash averages such a row; the
    wrapper zeroes it), a sliding window."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    args, kw = case_inputs(CASES[2], "float32")
    assert_close(run(impl("splash"), *args, **kw), run(xla, *args, **kw), TOL["float32"])


@pytest.mark.skipif(ON_GPU, reason="splash is a TPU kernel (interpreted on CPU)")
def test_splash_refuses_a_traced_q_offset():
    args, kw = case_inputs(CASES[3], "float32")
    with pytest.raises(ValueError, match="q_offset must be a Python int"):
        run(impl("splash"), *args, **kw)


# --------------------------------------------------------------------------------------------
# cudnn: the mask translation on CPU (jax.nn's XLA path), the kernel itself on a GPU


def test_prefix_lengths():
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]], bool)
    n, ok = prefix_lengths(mask, 4, causal=True, sliding_window=None)
    assert n.tolist() == [2, 4, 3, 0] and not bool(ok)  # left padding and an empty row
    n, ok = prefix_lengths(mask[:2], 4, causal=True, sliding_window=None)
    assert bool(ok)
    # Window 2 over T = 4 causal queries: query 3 sees keys {2, 3}, both padding in row 0.
    assert not bool(prefix_lengths(mask[:2], 4, causal=True, sliding_window=2)[1])
    assert bool(prefix_lengths(mask[:2], 4, causal=True, sliding_window=3)[1])


# What cuDNN can express (T == S, no q_offset, a window only when causal); shared with
# benchmarks/gpu_all.sh, which runs them through cuDNN itself.
CUDNN_CASES = [
    (2, 40, 40, 4, 2, 16, True, "right", None, 30),  # key lengths + local_window_size
    (2, 40, 40, 4, 4, 16, False, "right", None, None),
    CASES[0],  # left padding: the lax.cond fallback branch
]


def cudnn_via_jax_nn_xla(q, k, v, **kw):
    """Our translation of the masks into jax.nn.dot_product_attention's arguments, run by its
    XLA implementation (cuDNN's semantics, any backend)."""
    return masked_attention_cudnn(q, k, v, implementation="xla", **kw)


@pytest.mark.parametrize("case", CUDNN_CASES)
def test_cudnn_mask_translation_via_jax_nn_xla(case):
    args, kw = case_inputs(case, "float32")
    if case[7] == "right":  # the flash branch is the one taken (and so the one checked)
        ok = prefix_lengths(kw["kv_mask"], case[1], causal=case[6], sliding_window=case[9])[1]
        assert bool(ok)
    assert_close(run(cudnn_via_jax_nn_xla, *args, **kw), run(xla, *args, **kw), TOL["float32"])


def test_cudnn_refuses_what_it_cannot_express():
    q, k, v, mask = make_inputs(1, 8, 8, 2, 2, 16, jnp.bfloat16, mask="right")
    with pytest.raises(ValueError, match="needs bfloat16 or float16"):
        masked_attention_cudnn(q.astype(jnp.float32), k, v)
    with pytest.raises(ValueError, match="T == S"):
        masked_attention_cudnn(q[:, :3], k, v)
    with pytest.raises(ValueError, match="q_offset"):
        masked_attention_cudnn(q, k, v, q_offset=jnp.int32(2))
    with pytest.raises(ValueError, match="only with causal"):
        masked_attention_cudnn(q, k, v, causal=False, sliding_window=4)
    if not ON_GPU:
        with pytest.raises(ValueError, match="needs a GPU"):
            masked_attention(q, k, v, kv_mask=mask, impl="cudnn")


@pytest.mark.skipif(not ON_GPU, reason="cuDNN flash attention needs a GPU")
@pytest.mark.parametrize("case", CUDNN_CASES)
def test_cudnn_matches_xla(case):
    args, kw = case_inputs(case, "bfloat16")
    assert_close(run(impl("cudnn"), *args, **kw), run(xla, *args, **kw), TOL["bfloat16"])


# --------------------------------------------------------------------------------------------
# auto


def test_auto_on_cpu():
    assert jax.default_backend() == "cpu"
    kw = dict(dtype=jnp.float32, head_dim=64)
    assert resolve_impl("auto", q_len=512, kv_len=512, **kw) == "xla"
    assert resolve_impl("auto", q_len=1024, kv_len=1024, **kw) == "blockwise"
    assert resolve_impl("auto", q_len=1, kv_len=4096, q_offset=jnp.int32(7), **kw) == "xla"
    assert resolve_impl("blockwise", q_len=4, kv_len=4, **kw) == "blockwise"
    with pytest.raises(ValueError, match="unknown impl 'flash'"):
        resolve_impl("flash", q_len=4, kv_len=4, **kw)
    assert set(IMPLS) == {"auto", "xla", "blockwise", "cudnn", "splash"}
    # Short S: auto is today's xla path, bit for bit.
    args, kw = case_inputs(CASES[0], "float32")
    for got, want in zip(run(impl("auto"), *args, **kw), run(xla, *args, **kw), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_auto_choice_on_gpu_and_tpu(monkeypatch):
    """What auto would pick on the other backends (the choice is static; no kernel runs)."""
    kw = dict(q_len=4096, kv_len=4096, head_dim=128)
    monkeypatch.setattr(attention, "_backend", lambda: "gpu")
    assert resolve_impl("auto", dtype=jnp.bfloat16, **kw) == "cudnn"
    assert resolve_impl("auto", dtype=jnp.bfloat16, sliding_window=64, **kw) == "cudnn"
    assert resolve_impl("auto", dtype=jnp.float32, **kw) == "xla"  # cuDNN: 16-bit only
    assert resolve_impl("auto", dtype=jnp.bfloat16, q_offset=jnp.int32(0), **kw) == "xla"
    assert resolve_impl("auto", dtype=jnp.bfloat16, **dict(kw, q_len=1)) == "xla"  # decode
    assert resolve_impl("auto", dtype=jnp.bfloat16, **dict(kw, head_dim=100)) == "xla"
    assert resolve_impl("auto", dtype=jnp.bfloat16, causal=False, sliding_window=8, **kw) == "xla"
    monkeypatch.setattr(attention, "_backend", lambda: "tpu")
    assert resolve_impl("auto", dtype=jnp.float32, **kw) == "xla"  # 8 devices: not partitionable
    monkeypatch.setattr(attention, "_device_count", lambda: 1)
    want = "splash" if attention.attention_splash.available() else "xla"
    assert resolve_impl("auto", dtype=jnp.float32, **kw) == want
    assert resolve_impl("auto", dtype=jnp.float32, q_offset=jnp.int32(3), **kw) == "xla"


def test_self_check_accepts_a_correct_kernel_and_rejects_a_wrong_one(monkeypatch, caplog):
    """The machinery auto runs before trusting cudnn / splash, shown with blockwise (any backend):
    right -> True; broken (zeros) -> False with one warning naming it."""
    monkeypatch.setattr(attention, "_CHECKED", {})
    assert attention.self_check("blockwise", 16, jnp.float32, 2, True, False)
    monkeypatch.setattr(attention, "_CHECKED", {})
    monkeypatch.setattr(attention, "masked_attention_blockwise", lambda q, k, v, **_: q * 0)
    assert not attention.self_check("blockwise", 16, jnp.float32, 2, True, False)
    assert "blockwise failed its self-check" in caplog.text


# --------------------------------------------------------------------------------------------
# the model


def test_model_blockwise_logits_match_xla():
    """A tiny RoPE model (GQA, a sliding window) on left-padded rows: the same logits."""
    cfg = get_preset("tiny", sliding_window=5)
    # Random leaves of the right shapes (init_params would compile the initialiser: seconds).
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), abstract_params(cfg)
    )
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 24)), jnp.int32)
    mask = jnp.arange(24)[None] >= jnp.array([[0], [9]])
    logits = {
        name: jax.jit(forward, static_argnums=1)(
            params, cfg.replace(attention_impl=name), tokens, mask
        )
        for name in ("xla", "blockwise")
    }
    assert_close((logits["blockwise"],), (logits["xla"],), TOL["float32"], names=("logits",))


def test_config_attention_impl_is_a_runtime_field():
    cfg = get_preset("tiny")
    assert cfg.attention_impl == "auto"
    assert cfg.architecture_differences(cfg.replace(attention_impl="blockwise")) == []
    with pytest.raises(ConfigError, match="model.attention_impl"):
        cfg.replace(attention_impl="flash")
    with pytest.raises(ConfigError, match="'cudnn' needs dtype bfloat16"):
        cfg.replace(attention_impl="cudnn")
    assert cfg.replace(dtype="bfloat16", attention_impl="cudnn").attention_impl == "cudnn"
