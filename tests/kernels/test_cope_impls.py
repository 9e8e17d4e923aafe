"""Every CoPE implementation against the paper-exact reference: outputs and gradients.

``xla`` (blockwise jnp + custom VJP) is checked in float64 (same algorithm up to summation
order, so agreement to ~1e-12 proves the blockwise carry and the hand-written backward exact),
then in float32 / bfloat16 over the support matrix. The Pallas kernels run in interpret mode on
CPU (a handful of tiny cases, they are slow to interpret) and are also lowered for their real
targets (Mosaic TPU, Triton) to catch operations those compilers do not accept.

Tolerances are relative to the largest entry of each reference array, with a floor of 1,
max|got - ref| <= tol * max(1, max|ref|) (the floor makes arrays whose exact value is zero, such
as dE when P = 1 -- a constant bias per row, and softmax gradients sum to zero -- compare
absolutely instead of dividing rounding noise by rounding noise):

* float64, 1e-10: only the order of summations differs (errors ~1e-15 per term);
* float32, 1e-4: float32 rounding (eps 1.2e-7) accumulated over softmax sums and gate cumsums of
  at most a few hundred terms, and -- the largest effect -- a position that rounds across an
  integer moves ``w`` by ~1e-6 and changes dp = z[ceil] - z[floor] for that entry;
* bfloat16 for ``xla``, 1e-2: identical bf16 inputs, float32 math, then the bf16 rounding of the
  result (2^-8 relative);
* bfloat16 for the Pallas kernels, 3e-2: additionally the probabilities and ds are rounded to
  bf16 before the P V, dS K, dS^T Q and P^T dO matmuls (bf16 MXU / tensor-core operands with float32
  accumulation), each a 2^-8 relative error per term.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxselm.kernels.cope import IMPLS, BlockSizes, cope_attention, resolve_impl

TOL = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 1e-2}
PALLAS_BF16_TOL = 3e-2


def make_inputs(b, t, s, h, kv, d, npos, dtype, *, mask=None, seed=0, dv=None):
    """Random q, k, v, E; ``mask``: None, "lengths" (random per-row lengths, row 0 fully
    masked when b > 1) or "holes" (random padding anywhere)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, s, kv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, kv, dv or d), jnp.float32).astype(dtype)
    e = (0.5 * jax.random.normal(ks[3], (npos, d), jnp.float32)).astype(dtype)
    kv_mask = None
    if mask == "lengths":
        lens = jax.random.randint(ks[4], (b,), 1, s + 1)
        kv_mask = jnp.arange(s)[None] < lens[:, None]
        if b > 1:
            kv_mask = kv_mask.at[0].set(False)  # a sequence with no valid key at all
    elif mask == "holes":
        kv_mask = jax.random.bernoulli(ks[4], 0.8, (b, s))
    return q, k, v, e, kv_mask


def run(impl, q, k, v, e, *, jit=True, q_offset=None, **kw):
    """Output and gradients wrt (q, k, v, E) of sum(out * cotangent), with one forward.

    Under ``jit`` an integer ``q_offset`` is an argument of the jitted function, i.e. a traced
    int32 scalar, as in the model's decode step.
    """

    def f(q, k, v, e, q_offset):
        return cope_attention(q, k, v, e, impl=impl, q_offset=q_offset, **kw)

    if jit:
        f = jax.jit(f)
    out, vjp = jax.vjp(lambda q, k, v, e: f(q, k, v, e, q_offset), q, k, v, e)
    ct = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape)).astype(out.dtype)
    return (out,) + vjp(ct)


def assert_close(got, want, tol, names=("out", "dq", "dk", "dv", "dE")):
    for name, g, w in zip(names, got, want, strict=False):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype)
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert np.all(np.isfinite(g)), f"{name}: non-finite values"
        scale = max(np.max(np.abs(w)), 1.0)
        err = np.max(np.abs(g - w)) / scale
        assert err <= tol, f"{name}: max error {err:.3g} x max|ref| > {tol:g}"


# --------------------------------------------------------------------------------------------
# impl="xla"

XLA_F64_CASES = [
    # b, t, s, h, kv, d, P, causal, mask, q_offset, blocks
    (2, 19, 19, 4, 2, 8, 6, True, "lengths", None, (8, 8)),
    (2, 19, 19, 4, 2, 8, 6, False, "holes", None, (8, 4)),
    (2, 5, 23, 4, 2, 8, 3, True, "holes", 7, (4, 8)),
    (1, 33, 33, 2, 2, 16, 1, True, None, None, (8, 8)),  # P = 1: every bias is z[0]
    (1, 40, 40, 2, 2, 16, 200, True, None, None, (16, 8)),  # P > T: never saturated
    (1, 64, 64, 2, 1, 8, 2, False, None, None, (8, 8)),  # saturated tiles (flash branch)
]


@pytest.mark.parametrize("case", XLA_F64_CASES)
def test_xla_float64_matches_reference(case):
    b, t, s, h, kv, d, npos, causal, mask, q_offset, blocks = case
    with jax.enable_x64(True):
        q, k, v, e, kv_mask = make_inputs(b, t, s, h, kv, d, npos, jnp.float64, mask=mask)
        kw = {"kv_mask": kv_mask, "causal": causal, "q_offset": q_offset}
        want = run("reference", q, k, v, e, **kw)
        got = run("xla", q, k, v, e, block_sizes=BlockSizes(*blocks), **kw)
        assert_close(got, want, TOL["float64"])


@pytest.mark.parametrize(
    "d,npos,dtype,causal,mask",
    [
        (64, 64, "float32", True, "lengths"),
        (128, 16, "float32", False, "holes"),
        (192, 4096, "float32", True, None),
        (128, 8, "bfloat16", True, "lengths"),
        (192, 32, "bfloat16", False, None),
    ],
)
def test_xla_head_dims_and_dtypes(d, npos, dtype, causal, mask):
    q, k, v, e, kv_mask = make_inputs(2, 70, 70, 4, 2, d, npos, jnp.dtype(dtype), mask=mask)
    kw = {"kv_mask": kv_mask, "causal": causal}
    want = run("reference", q, k, v, e, **kw)
    got = run("xla", q, k, v, e, block_sizes=BlockSizes(32, 16), **kw)
    assert_close(got, want, TOL[dtype])


def test_xla_default_blocks_long_enough_to_saturate():
    """Default blocks, T = 600 (not a multiple): the saturated branch and the band mix."""
    q, k, v, e, _ = make_inputs(1, 600, 600, 2, 1, 16, 8, jnp.float32)
    want = run("reference", q, k, v, e)
    got = run("xla", q, k, v, e)
    assert_close(got, want, TOL["float32"])


def test_xla_traced_q_offset_decoding_into_a_cache():
    """The model's decode step: T = 3 queries written at a traced cache index of a 40-slot
    buffer whose unwritten tail is masked out."""
    q, k, v, e, _ = make_inputs(2, 3, 40, 4, 2, 8, 5, jnp.float32)
    index = jnp.int32(21)
    kv_mask = jnp.broadcast_to(jnp.arange(40) < index + 3, (2, 40))

    @jax.jit
    def both(q, k, v, e, index):
        kw = {"kv_mask": kv_mask, "q_offset": index}
        return (
            cope_attention(q, k, v, e, impl="reference", **kw),
            cope_attention(q, k, v, e, impl="xla", block_sizes=BlockSizes(2, 16), **kw),
        )

    want, got = both(q, k, v, e, index)
    assert_close((got,), (want,), TOL["float32"])


def test_rows_without_keys_are_zero_with_finite_gradients():
    q, k, v, e, _ = make_inputs(2, 8, 8, 2, 2, 8, 4, jnp.float32)
    kv_mask = jnp.zeros((2, 8), bool).at[1, 3:].set(True)  # batch 0: nothing; batch 1: rows 0-2
    for impl in ("xla",):
        out, *grads = run(impl, q, k, v, e, kv_mask=kv_mask)
        assert np.all(np.asarray(out[0]) == 0) and np.all(np.asarray(out[1, :3]) == 0)
        assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_auto_is_xla_on_cpu_and_differentiable():
    assert jax.default_backend() == "cpu"
    assert resolve_impl("auto") == "xla"
    assert set(IMPLS) == {"reference", "xla", "pallas_tpu", "pallas_gpu", "auto"}
    q, k, v, e, kv_mask = make_inputs(1, 12, 12, 2, 1, 8, 4, jnp.float32, mask="holes")
    want = run("reference", q, k, v, e, kv_mask=kv_mask)
    got = run("auto", q, k, v, e, kv_mask=kv_mask, jit=False)
    assert_close(got, want, TOL["float32"])


def test_unknown_impl_and_bad_blocks_raise():
    q, k, v, e, _ = make_inputs(1, 4, 4, 2, 1, 8, 4, jnp.float32)
    with pytest.raises(ValueError, match="unknown impl"):
        cope_attention(q, k, v, e, impl="cuda")
    with pytest.raises(ValueError, match="powers of two"):
        cope_attention(q, k, v, e, impl="pallas_gpu", block_sizes=BlockSizes(24, 16))
    with pytest.raises(ValueError, match="positive"):
        BlockSizes(0, 8)


# --------------------------------------------------------------------------------------------
# Pallas kernels in interpret mode (tiny cases: interpretation is slow)

# P = 1 is tested in float32 only: every bias is then z[0], constant per row, so dE is a sum of
# terms that cancel exactly (softmax gradients sum to zero) and in bf16 it would be pure rounding
# noise of the bf16 P.V product, not a measure of the kernel.
PALLAS_CASES = [
    # b, t, s, h, kv, d, P, dtype, causal, mask, q_offset
    pytest.param(2, 19, 19, 4, 2, 64, 1, "float32", True, "lengths", None, id="gqa-mask-odd-T-P1"),
    pytest.param(2, 5, 37, 2, 1, 128, 300, "float32", True, "holes", 9, id="decode-qoffset-bigP"),
    pytest.param(1, 20, 20, 2, 2, 192, 5, "bfloat16", False, None, None, id="bf16-noncausal-d192"),
]


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("b,t,s,h,kv,d,npos,dtype,causal,mask,q_offset", PALLAS_CASES)
def test_pallas_interpret_matches_reference(
    impl, b, t, s, h, kv, d, npos, dtype, causal, mask, q_offset
):
    q, k, v, e, kv_mask = make_inputs(b, t, s, h, kv, d, npos, jnp.dtype(dtype), mask=mask)
    kw = {"kv_mask": kv_mask, "causal": causal}
    kw["q_offset"] = q_offset  # traced inside the jitted call when not None
    want = run("reference", q, k, v, e, **kw)
    blocks = BlockSizes(16, 16) if impl == "pallas_gpu" else BlockSizes(8, 8)
    got = run(impl, q, k, v, e, block_sizes=blocks, interpret=True, **kw)
    assert_close(got, want, PALLAS_BF16_TOL if dtype == "bfloat16" else TOL[dtype])


# --------------------------------------------------------------------------------------------
# Pallas kernels lowered for their real targets (no accelerator needed)


def _lower_for(platform, impl, d, dtype):
    b, t, h, kv, npos = 1, 320, 6, 2, 64  # G = 3 and 5 key blocks: not powers of two
    q = jax.ShapeDtypeStruct((b, t, h, d), dtype)
    k = jax.ShapeDtypeStruct((b, t, kv, d), dtype)
    e = jax.ShapeDtypeStruct((npos, d), dtype)
    mask = jax.ShapeDtypeStruct((b, t), bool)

    def loss(q, k, v, e, mask):
        out = cope_attention(q, k, v, e, kv_mask=mask, impl=impl, interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    return grad.trace(q, k, k, e, mask).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("d,dtype", [(64, jnp.float32), (192, jnp.bfloat16)])
def test_pallas_gpu_lowers_to_triton(d, dtype):
    text = _lower_for("cuda", "pallas_gpu", d, dtype)
    assert text.count("triton") >= 3  # forward, dq and dk/dv kernels


@pytest.mark.parametrize("d,dtype", [(128, jnp.float32), (192, jnp.bfloat16)])
def test_pallas_tpu_lowers_to_mosaic(d, dtype, monkeypatch):
    # Lowering asks for the TPU generation; on a CPU-only host give it a v5e description.
    tpu_info = pytest.importorskip("jax._src.pallas.mosaic.tpu_info")
    try:  # a private API: skip (not fail) where a jax version reorganised it
        info = tpu_info._get_tpu_info_impl(tpu_info.ChipVersion.TPU_V5E, 1)
    except AttributeError as err:
        pytest.skip(f"cannot describe a TPU to the Mosaic lowering on this jax: {err}")
    monkeypatch.setattr(tpu_info, "get_tpu_info", lambda: info)
    text = _lower_for("tpu", "pallas_tpu", d, dtype)
    assert text.count("tpu_custom_call") >= 3
