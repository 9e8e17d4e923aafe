"""Plain masked softmax attention (RoPE and NoPE layers): one entry point, several implementations.

    from jaxselm.kernels.attention import masked_attention
    out = masked_attention(q, k, v, kv_mask=mask, causal=True, impl="auto")   # [B, T, H, D]

Same interface as :func:`jaxselm.kernels.cope.cope_attention` minus the position embedding:
q [B, T, H, D], k and v [B, S, K, D] (GQA), kv_mask [B, S] (True = valid key), query i at key
position ``q_offset + i`` (default S - T), optional sliding window (key j visible to query i only
if i - j < window, as in Mistral). Rows without any valid key output zeros, never NaN.

Implementations (all differentiable wrt q, k, v; all equal to ``xla`` within rounding):

* ``"xla"``: jnp, materialises the [B, H, T, S] scores; the reference, and the fastest for short
  sequences and for decoding (T = 1).
* ``"blockwise"``: online softmax over key blocks with ``lax`` loops and a custom VJP
  (:mod:`jaxselm.kernels.attention_blockwise`), O(T * block) memory, any backend.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's flash attention
  on NVIDIA GPUs, bfloat16/float16 only. What it can express: causal with T == S (its causal mask
  is top-left aligned, so no ``q_offset``: not for KV-cache decoding), a causal sliding window
  (``local_window_size``), and padding as per-row key counts (``key_value_seq_lengths``), which
  is exact only for a *prefix* kv_mask (right padding, as training rows are packed). Passing a
  boolean ``mask`` instead would make cuDNN add a materialised [B, 1, T, S] bias (and compute its
  gradient), so it is not used: a batch whose kv_mask is not a prefix (left padding, holes, a row
  with no visible key) takes a ``lax.cond`` branch at run time to ``blockwise`` (S >= 1024) or
  ``xla``: the same result, within rounding. (XLA on GPU may read that predicate on
  the host: a small device-to-host copy per call, i.e. per layer.)
* ``"splash"``: JAX's splash attention Pallas kernel for TPU
  (:mod:`jaxselm.kernels.attention_splash`); static ``q_offset`` only (no KV-cache decoding);
  interpret mode on CPU (tests).
* ``"auto"``: GPU -> ``cudnn`` for 16-bit inputs when the call is expressible (no traced
  ``q_offset``, T == S when causal, a window only when causal, head dim a multiple of 8 up to
  256), else ``xla``; TPU -> ``splash`` when importable, ``q_offset`` is static and there is one
  device (GSPMD cannot partition the kernel; a shard_map wrapper is still to write), else ``xla``;
  CPU -> ``blockwise`` when S >= ``BLOCKWISE_MIN_KV_LEN`` (1024) and T > 1 (prefill, training),
  else ``xla``. As CoPE's ``auto`` does for its Pallas kernels, ``cudnn`` and ``splash`` are first
  self-checked once per (head dim, dtype, GQA group, causal, window) against ``xla`` on a small
  problem, forward and gradients; one that fails to compile or disagrees is not used (one
  warning, then the fallback). ``JAXSELM_ATTENTION_SELF_CHECK=0`` skips the check.
"""

from __future__ import annotations

import logging
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxselm.kernels import attention_splash
from jaxselm.kernels.attention_blockwise import masked_attention_blockwise
from jaxselm.kernels.cope.common import (
    attention_mask,
    compute_dtype,
    default_scale,
    masked_softmax,
    split_heads,
)
from jaxselm.kernels.self_check import compare_with_xla, run_outside_trace

IMPLS = ("auto", "xla", "blockwise", "cudnn", "splash")
#: ``auto`` takes ``blockwise`` on CPU from this many keys on (and so does cuDNN's fallback
#: branch). Measured on the project's 2-vCPU box (B=1, H=8, D=64, causal, float32, blockwise vs
#: xla): level at T = S = 512 (fwd 17 vs 18 ms), 5x faster at 1024 (fwd 83 vs 467 ms, fwd+bwd
#: 166 vs 974 ms), where the [H, T, S] scores outgrow the cache. Below it xla stays (one fused
#: program, today's numbers).
BLOCKWISE_MIN_KV_LEN = 1024
ENV_SELF_CHECK = "JAXSELM_ATTENTION_SELF_CHECK"
SELF_CHECK_LEN = 256
_FLASH_DTYPES = (jnp.bfloat16, jnp.float16)
_CHECKED: dict[tuple, bool] = {}

log = logging.getLogger(__name__)


def masked_attention_xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_mask: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_offset: jax.Array | int | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """The reference: full [B, H, T, S] scores in jnp. Returns [B, T, H, Dv] in q's dtype."""
    b, t, h, d = q.shape
    dt = compute_dtype(q.dtype)
    scale = default_scale(scale, d)
    mask = attention_mask(
        b,
        t,
        k.shape[1],
        kv_mask=kv_mask,
        causal=causal,
        q_offset=q_offset,
        sliding_window=sliding_window,
    )
    qg = split_heads(q, k.shape[2])
    # Matmuls in the input dtype with fp32 accumulation; softmax in fp32.
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=dt) * jnp.asarray(scale, dt)
    probs = masked_softmax(jnp.where(mask, s, -jnp.inf), mask).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=dt)
    return out.reshape(b, t, h, v.shape[-1]).astype(q.dtype)


def masked_attention_decode(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_mask: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_offset: jax.Array | int | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """``xla``'s math for one query per row (T = 1, KV-cache decoding), as two batched
    matrix-vector products over (batch, kv head) with k taken as [B, K, D, S] and v as
    [B, K, S, D].

    The model's KV cache stores keys [L, B, K, D, S] and values [L, B, K, S, D] and hands each
    layer's to attention as transposed [B, S, K, D] views; these einsums transpose them back, so
    XLA cancels the pairs and the matmuls read the cache where it lies.
    (:func:`masked_attention_xla`'s einsums, on XLA:CPU, made a transposed copy of each layer's
    keys and values for every decoded token: 30% of a decode step of SmolLM2-135M at batch 32.)
    Same result within float32 summation order.
    """
    b, t, h, d = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    if t != 1:
        raise ValueError(f"masked_attention_decode: one query per row (got T={t})")
    dt = compute_dtype(q.dtype)
    scale = default_scale(scale, d)
    mask = attention_mask(
        b, 1, s_len, kv_mask=kv_mask, causal=causal, q_offset=q_offset,
        sliding_window=sliding_window,
    )  # fmt: skip
    mask = mask.reshape(mask.shape[0], 1, 1, s_len)  # [B or 1, 1, 1, S]
    qg = q.reshape(b, kh, h // kh, d)  # [B, K, G, D]
    kt = jnp.transpose(k, (0, 2, 3, 1))  # [B, K, D, S]
    vt = jnp.transpose(v, (0, 2, 1, 3))  # [B, K, S, D]
    s = jnp.einsum("bkgd,bkds->bkgs", qg, kt, preferred_element_type=dt) * jnp.asarray(scale, dt)
    probs = masked_softmax(jnp.where(mask, s, -jnp.inf), mask).astype(v.dtype)
    out = jnp.einsum("bkgs,bksd->bkgd", probs, vt, preferred_element_type=dt)
    return out.reshape(b, 1, h, v.shape[-1]).astype(q.dtype)


def prefix_lengths(
    kv_mask: jax.Array, q_len: int, *, causal: bool, sliding_window: int | None
) -> tuple[jax.Array, jax.Array]:
    """Per-row valid-key counts [B] int32, and a scalar bool: every row's mask is a prefix (keys
    [0, n) valid, the rest not) and every query row sees at least one valid key (causal, T == S,
    so row i sees keys (i - window, i]: true when n > T - window). Only then do the lengths say
    exactly what the mask says, and no row depends on what a kernel does with an empty row."""
    s = kv_mask.shape[1]
    mask = kv_mask.astype(bool)
    n = jnp.sum(mask, axis=1, dtype=jnp.int32)
    prefix = jnp.all(mask == (jnp.arange(s, dtype=jnp.int32)[None] < n[:, None]), axis=1)
    need = 1 if (sliding_window is None or not causal) else max(1, q_len - sliding_window + 1)
    return n, jnp.all(prefix & (n >= need))


def _fallback(kv_len: int) -> str:
    return "blockwise" if kv_len >= BLOCKWISE_MIN_KV_LEN else "xla"


def _cudnn_unsupported(q_len, kv_len, causal, q_offset, sliding_window) -> str | None:
    """Why cuDNN (through jax.nn.dot_product_attention) cannot express this call, or None."""
    if causal and q_len != kv_len:
        return (
            f"causal attention needs T == S (cuDNN's causal mask is top-left), got {q_len}/{kv_len}"
        )
    if (
        causal
        and q_offset is not None
        and not (isinstance(q_offset, (int, np.integer)) and q_offset == 0)
    ):
        return "a q_offset (KV-cache decoding) is not expressible; use 'xla' or 'blockwise'"
    if sliding_window is not None and not causal:
        return "cuDNN supports a sliding window only with causal attention"
    return None


def masked_attention_cudnn(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_mask: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_offset: jax.Array | int | None = None,
    sliding_window: int | None = None,
    implementation: str = "cudnn",
) -> jax.Array:
    """cuDNN flash attention with the contract of :func:`masked_attention` (see the module doc
    for what it can express). ``implementation="xla"`` runs the same translation of the masks
    through jax.nn's XLA path (how the CPU tests check it)."""
    t, s = q.shape[1], k.shape[1]
    if implementation == "cudnn" and jnp.dtype(q.dtype) not in _FLASH_DTYPES:
        raise ValueError(
            f"masked_attention impl='cudnn' needs bfloat16 or float16 inputs, got "
            f"{jnp.dtype(q.dtype).name}; use impl='auto' or 'xla'"
        )
    why = _cudnn_unsupported(t, s, causal, q_offset, sliding_window)
    if why:
        raise ValueError(f"masked_attention impl='cudnn': {why}")
    # Our window: key j visible iff i - j < window, i.e. window - 1 keys left of the query.
    window = None if sliding_window is None else (int(sliding_window) - 1, 0)

    def flash(lengths):
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            scale=default_scale(scale, q.shape[-1]),
            is_causal=causal,
            key_value_seq_lengths=lengths,
            local_window_size=window,
            implementation=implementation,
        )

    if kv_mask is None:
        return flash(None)
    lengths, ok = prefix_lengths(kv_mask, t, causal=causal, sliding_window=sliding_window)
    kw = dict(kv_mask=kv_mask, causal=causal, scale=scale, sliding_window=sliding_window)
    other = masked_attention_blockwise if _fallback(s) == "blockwise" else masked_attention_xla
    return lax.cond(ok, flash, lambda _: other(q, k, v, **kw), lengths)


def _backend() -> str:
    return jax.default_backend()


def _device_count() -> int:
    return jax.device_count()


def resolve_impl(
    impl: str,
    *,
    dtype,
    q_len: int,
    kv_len: int,
    head_dim: int,
    causal: bool = True,
    q_offset: jax.Array | int | None = None,
    sliding_window: int | None = None,
) -> str:
    """The implementation ``impl`` stands for with these inputs on the default backend (before
    ``auto``'s self-check of the cuDNN / splash kernels)."""
    if impl not in IMPLS:
        raise ValueError(f"masked_attention: unknown impl {impl!r}; expected one of {IMPLS}")
    if impl != "auto":
        return impl
    backend = _backend()
    if backend == "gpu":
        ok = (
            jnp.dtype(dtype) in _FLASH_DTYPES
            and head_dim % 8 == 0
            and head_dim <= 256
            and _cudnn_unsupported(q_len, kv_len, causal, q_offset, sliding_window) is None
        )
        return "cudnn" if ok else "xla"
    if backend == "tpu":
        # One device only: splash is a Mosaic custom call that GSPMD cannot partition, so under
        # a multi-device mesh its inputs would be all-gathered (it needs a shard_map wrapper).
        static = q_offset is None or isinstance(q_offset, (int, np.integer))
        single = _device_count() == 1
        return "splash" if static and single and attention_splash.available() else "xla"
    return "blockwise" if kv_len >= BLOCKWISE_MIN_KV_LEN and q_len > 1 else "xla"


def self_check(name: str, head_dim: int, dtype, group: int, causal: bool, window: bool) -> bool:
    """Compile and run ``name`` ("cudnn" or "splash") on a small problem of this kind (right
    padding, a window of 100 when ``window``), forward and gradients wrt q, k, v, against ``xla``;
    True when it compiles and agrees (relative max error <= 2e-3 in float32, 5e-2 in 16-bit types:
    a check for broken lowering, not a precision test). Cached per process."""
    key = (name, _backend(), head_dim, jnp.dtype(dtype).name, group, causal, window)
    if key in _CHECKED:
        return _CHECKED[key]
    n = SELF_CHECK_LEN
    tol = 2e-3 if jnp.dtype(dtype) == jnp.float32 else 5e-2

    def check() -> tuple[bool, str]:
        rng = np.random.default_rng(0)
        args = [
            jnp.asarray(rng.standard_normal((1, n, heads, head_dim)), dtype)
            for heads in (group, 1, 1)
        ]
        w = jnp.asarray(rng.standard_normal((1, n, group, head_dim)), jnp.float32)
        kw = dict(
            kv_mask=jnp.asarray(np.arange(n) < n - 5)[None],
            causal=causal,
            sliding_window=100 if window else None,
        )

        def run(impl):
            def loss(a):
                out = masked_attention(*a, impl=impl, **kw)
                return jnp.sum(out.astype(jnp.float32) * w), out

            (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(args)
            return {"out": out, "dq": grads[0], "dk": grads[1], "dv": grads[2]}

        return compare_with_xla(run, name, tol)

    ok, why = run_outside_trace(check, "attn-self-check")
    if not ok:
        log.warning(
            "masked_attention impl=auto: %s failed its self-check on %s (head_dim=%d, %s, "
            "group=%d, causal=%s, window=%s): %s; using the fallback. Set "
            "model.attention_impl=%s to see the failure, or xla to skip the check.",
            name,
            _backend(),
            head_dim,
            jnp.dtype(dtype).name,
            group,
            causal,
            window,
            why,
            name,
        )
    _CHECKED[key] = ok
    return ok


def _check_inputs(q, k, v, kv_mask) -> None:
    chex.assert_rank([q, k, v], 4)
    if k.shape[:3] != v.shape[:3] or k.shape[0] != q.shape[0]:
        raise ValueError(f"masked_attention: q {q.shape}, k {k.shape}, v {v.shape} differ in B/S/K")
    if k.shape[-1] != q.shape[-1] or q.shape[2] % k.shape[2]:
        raise ValueError(f"masked_attention: q {q.shape} and k {k.shape}: need same D, H % K == 0")
    if kv_mask is not None and kv_mask.shape != k.shape[:2]:
        raise ValueError(
            f"masked_attention: kv_mask {kv_mask.shape} must be [B, S] = {k.shape[:2]}"
        )


def masked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_mask: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_offset: jax.Array | int | None = None,
    sliding_window: int | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Softmax attention with padding / causal / sliding-window masks. Returns [B, T, H, Dv] in
    q's dtype. ``impl``: see the module docstring (the model passes ``config.attention_impl``)."""
    _check_inputs(q, k, v, kv_mask)
    t, s, d = q.shape[1], k.shape[1], q.shape[-1]
    kw = dict(kv_mask=kv_mask, causal=causal, scale=scale, q_offset=q_offset)
    kw["sliding_window"] = sliding_window
    name = resolve_impl(
        impl, dtype=q.dtype, q_len=t, kv_len=s, head_dim=d, causal=causal, q_offset=q_offset,
        sliding_window=sliding_window,
    )  # fmt: skip
    if impl == "auto" and name in ("cudnn", "splash") and os.environ.get(ENV_SELF_CHECK) != "0":
        group = q.shape[2] // k.shape[2]
        if not self_check(name, d, q.dtype, group, bool(causal), sliding_window is not None):
            name = "xla"
    if name == "xla":
        if t == 1:
            return masked_attention_decode(q, k, v, **kw)
        return masked_attention_xla(q, k, v, **kw)
    if name == "blockwise":
        return masked_attention_blockwise(q, k, v, **kw)
    if name == "cudnn":
        if _backend() != "gpu":
            raise ValueError(
                f"masked_attention impl='cudnn' needs a GPU; the backend is {_backend()}"
            )
        return masked_attention_cudnn(q, k, v, **kw)
    if name == "splash":
        if _backend() == "gpu" or not attention_splash.available():
            raise ValueError(
                "masked_attention impl='splash' needs a TPU (or CPU, interpreted) and "
                "jax.experimental.pallas.ops.tpu.splash_attention"
            )
        return attention_splash.masked_attention_splash(q, k, v, **kw)
    raise AssertionError(name)  # unreachable: resolve_impl only returns known names


__all__ = [
    "BLOCKWISE_MIN_KV_LEN",
    "IMPLS",
    "masked_attention",
    "masked_attention_blockwise",
    "masked_attention_cudnn",
    "masked_attention_decode",
    "masked_attention_xla",
    "prefix_lengths",
    "resolve_impl",
    "self_check",
]
