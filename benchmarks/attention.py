"""Benchmark masked_attention's implementations (RoPE / NoPE layers); one JSON line per case.

    python benchmarks/attention.py --seq-lens 1024,4096 --batch 1 --heads 8 --head-dim 64
    python benchmarks/attention.py --seq-lens 4096 --batch 4 --heads 16 --head-dim 128 \\
        --dtype bfloat16 --impls xla,blockwise,cudnn --check          # on a GPU

For every sequence length T (T = S, causal) and every implementation (default: those that run on
the default backend: xla and blockwise, cudnn on GPU, splash on TPU), it times the jitted forward
("fwd") and forward + backward ("fwd_bwd", gradients wrt q, k, v) with benchmarks/cope.py's
``run_case`` (same timing, memory estimate and ``--max-bytes`` guard, same FLOP count), and prints

    {"case": "fwd_bwd T=4096", "impl": "cudnn", "ms": ..., "peak_bytes": ..., "tflops": ..., ...}

``--mask right`` passes a right-padding kv_mask (every row's last eighth padded; what training
rows look like, so cuDNN takes its key-length branch and the ``lax.cond`` is part of the timing);
``--mask left`` pads on the left (cuDNN then runs its fallback branch). ``--check`` also prints,
per implementation, the largest error of the output and of dq, dk, dv against ``xla`` on the same
inputs, relative to max(1, max|xla|), and ``ok`` against a tolerance of 2e-5 (float32) or 2e-2
(16-bit), the tolerances of tests/kernels/test_attention_impls.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cope import run_case  # noqa: E402  (the sibling benchmark: one timing harness)

from jaxselm.kernels.attention import masked_attention  # noqa: E402

TOL = {"float32": 2e-5, "bfloat16": 2e-2, "float16": 2e-2}


def default_impls(backend: str) -> list[str]:
    return ["xla", "blockwise"] + {"gpu": ["cudnn"], "tpu": ["splash"]}.get(backend, [])


def make_mask(kind: str, b: int, s: int):
    if kind == "none":
        return None
    pad = s // 8
    pos = np.arange(s)[None].repeat(b, 0)
    return jnp.asarray(pos < s - pad if kind == "right" else pos >= pad)


def outputs_and_grads(name, q, k, v, kv_mask):
    """out, dq, dk, dv (float64 numpy) of sum(out * cos(index)) under ``impl=name``."""

    def f(q, k, v):
        out = masked_attention(q, k, v, kv_mask=kv_mask, causal=True, impl=name)
        ct = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        return jnp.sum(out.astype(jnp.float32) * ct), out

    (_, out), g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(x, np.float64) for x in (out, *g)]


def check(got, want, dtype):
    """Largest error of out, dq, dk, dv relative to max(1, max|xla|), and ok vs TOL."""
    errors = {}
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        errors[name] = float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1.0))
    worst = max(errors.values())
    return {"errors": errors, "ok": bool(np.isfinite(worst) and worst <= TOL[dtype])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="1024,2048,4096")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=sorted(TOL))
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--impls", default=None, help="comma list; default: all on this backend")
    ap.add_argument("--modes", default="fwd,fwd_bwd")
    ap.add_argument("--mask", default="none", choices=["none", "right", "left"])
    ap.add_argument("--check", action="store_true", help="also compare against xla")
    ap.add_argument("--max-bytes", type=float, default=12e9)
    args = ap.parse_args(argv)

    backend = jax.default_backend()
    impls = args.impls.split(",") if args.impls else default_impls(backend)
    dtype = jnp.dtype(args.dtype)
    b, h, d = args.batch, args.heads, args.head_dim
    kv = args.kv_heads or h
    base = dict(backend=backend, B=b, H=h, K=kv, D=d, dtype=args.dtype, mask=args.mask)
    for t in [int(x) for x in args.seq_lens.split(",")]:
        ks = jax.random.split(jax.random.PRNGKey(t), 3)
        q = jax.random.normal(ks[0], (b, t, h, d), dtype)
        k = jax.random.normal(ks[1], (b, t, kv, d), dtype)
        v = jax.random.normal(ks[2], (b, t, kv, d), dtype)
        e = jnp.zeros((1, d), dtype)  # run_case's position table: unused here (zero gradient)
        kv_mask = make_mask(args.mask, b, t)
        for mode in args.modes.split(","):
            flops = 4 * b * h * t * t * d / 2 * (3.5 if mode == "fwd_bwd" else 1.0)
            for name in impls:

                def fwd(q, k, v, e, _impl=name, _mask=kv_mask):
                    return masked_attention(q, k, v, kv_mask=_mask, causal=True, impl=_impl)

                rec = run_case(name, fwd, (q, k, v, e), mode, flops, args.iters, args.max_bytes)
                rec.update(base, case=f"{mode} T={t}")
                print(json.dumps(rec), flush=True)
        if args.check:
            want = outputs_and_grads("xla", q, k, v, kv_mask)  # once per T: one compile
            for name in impls:
                if name == "xla":
                    continue
                rec = dict(base, case=f"check T={t}", impl=name, vs="xla")
                try:
                    rec.update(check(outputs_and_grads(name, q, k, v, kv_mask), want, args.dtype))
                except Exception as err:  # noqa: BLE001  (a failure is a result: report it)
                    rec.update(ok=False, error=f"{type(err).__name__}: {str(err)[:200]}")
                print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
