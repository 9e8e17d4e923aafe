"""Benchmark CoPE attention implementations against plain attention; one JSON line per case.

    python benchmarks/cope.py --seq-lens 1024,4096 --batch 1 --heads 8 --head-dim 64 --npos 64

For every sequence length T (T = S, causal) and every implementation available on the default
backend ("reference", "xla", the Pallas kernel of the backend) plus plain attention
(``jax.nn.dot_product_attention``, XLA's and, on GPU, cuDNN's flash attention; tokamax's flash
attention when it is installed), it times the jitted forward ("fwd") and forward + backward
("fwd_bwd", gradients wrt q, k, v and pos_emb) and prints

    {"case": "fwd_bwd T=4096", "impl": "xla", "ms": ..., "peak_bytes": ..., "tflops": ..., ...}

``ms`` is the median of ``--iters`` timed calls after a warm-up call; ``peak_bytes`` is XLA's
own estimate of the compiled program's temporary buffers plus its arguments and outputs
(``compiled.memory_analysis()``); ``tflops`` counts the useful attention FLOPs (4 T S D H B,
halved for causal; x 3.5 for fwd+bwd, the backward counted as 2.5 forwards as FlashAttention
does). A case whose estimate exceeds ``--max-bytes`` is not run (so it cannot wake the OOM
killer) and, like a case that fails, prints an "error" field instead of a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jaxselm.kernels.cope import cope_attention


def _impls(backend: str) -> list[str]:
    impls = ["reference", "xla"]
    if backend == "tpu":
        impls.append("pallas_tpu")
    if backend == "gpu":
        impls.append("pallas_gpu")
    return impls


def _plain(name: str):
    if name == "tokamax":
        import tokamax  # optional

        def f(q, k, v, e):
            return tokamax.dot_product_attention(q, k, v, is_causal=True)

        return f
    impl = {"plain_xla": "xla", "plain_cudnn": "cudnn"}[name]

    def f(q, k, v, e):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

    return f


def _timed(fn, args, iters):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_bytes(compiled):
    try:
        ma = compiled.memory_analysis()
        return int(
            ma.temp_size_in_bytes
            + ma.argument_size_in_bytes
            + ma.output_size_in_bytes
            - ma.alias_size_in_bytes
        )
    except Exception:  # noqa: BLE001  (memory_analysis is best effort on some backends)
        return None


def run_case(name, fwd, args, mode, flops, iters, max_bytes):
    """Compile, check the memory estimate against ``max_bytes`` (so a case that cannot fit is
    reported instead of triggering the OOM killer), then time the compiled executable."""
    if mode == "fwd":
        fn = jax.jit(fwd)
    else:

        def loss(q, k, v, e):
            return jnp.sum(fwd(q, k, v, e).astype(jnp.float32))

        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    rec = {"case": None, "impl": name, "ms": None}
    try:
        compiled = fn.lower(*args).compile()
        rec["peak_bytes"] = _peak_bytes(compiled)
        if rec["peak_bytes"] is not None and rec["peak_bytes"] > max_bytes:
            rec["error"] = f"skipped: needs {rec['peak_bytes'] / 1e9:.1f} GB > --max-bytes"
            return rec
        rec["ms"] = round(_timed(compiled, args, iters), 3)
        rec["tflops"] = round(flops / (rec["ms"] * 1e-3) / 1e12, 4)
    except Exception as err:  # noqa: BLE001  (a failure, e.g. OOM at long T, is a result)
        rec["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="512,1024,2048,4096")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--npos", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--impls", default=None, help="comma list; default: all on this backend")
    ap.add_argument("--modes", default="fwd,fwd_bwd")
    ap.add_argument(
        "--max-bytes",
        type=float,
        default=12e9,
        help="skip a case whose compiled memory estimate exceeds this",
    )
    args = ap.parse_args(argv)

    backend = jax.default_backend()
    impls = (
        args.impls.split(",")
        if args.impls
        else _impls(backend) + ["plain_xla"] + (["plain_cudnn"] if backend == "gpu" else [])
    )
    if args.impls is None:
        try:
            import tokamax  # noqa: F401

            impls.append("tokamax")
        except ImportError:
            pass
    dtype = jnp.dtype(args.dtype)
    b, h, d, npos = args.batch, args.heads, args.head_dim, args.npos
    kv = args.kv_heads or h
    for t in [int(x) for x in args.seq_lens.split(",")]:
        ks = jax.random.split(jax.random.PRNGKey(t), 4)
        q = jax.random.normal(ks[0], (b, t, h, d), dtype)
        k = jax.random.normal(ks[1], (b, t, kv, d), dtype)
        v = jax.random.normal(ks[2], (b, t, kv, d), dtype)
        e = (0.1 * jax.random.normal(ks[3], (npos, d))).astype(dtype)
        for mode in args.modes.split(","):
            flops = 4 * b * h * t * t * d / 2 * (3.5 if mode == "fwd_bwd" else 1.0)
            for name in impls:
                if name.startswith("plain") or name == "tokamax":
                    fwd = _plain(name)
                else:

                    def fwd(q, k, v, e, _impl=name):
                        return cope_attention(q, k, v, e, causal=True, impl=_impl)

                rec = run_case(name, fwd, (q, k, v, e), mode, flops, args.iters, args.max_bytes)
                rec["case"] = f"{mode} T={t}"
                rec.update(backend=backend, B=b, H=h, K=kv, D=d, P=npos, dtype=args.dtype)
                print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
