"""Benchmark the generation engine against a naive recompute loop; one JSON line per case.

    python benchmarks/generate.py --presets tiny,small-100m --batches 1,8,64 --new-tokens 256
    python benchmarks/generate.py --presets llama-1b --batches 64 --new-tokens 256   # on a GPU

For every preset and batch size B it prints

    {"case": "tiny B=8 T=32 M=256", "impl": "kv_cache", "ms": ..., "tokens_per_s": ..., ...}
    {"case": "tiny B=8 T=32 M=256", "impl": "naive_recompute", "ms": ..., "speedup": ...}

- ``kv_cache``: :func:`jaxselm.sampling.generate` (prefill once, jitted while-loop decode;
  temperature-1 sampling, no stop token, so every sample runs the full M tokens). ``ms`` is the
  median of ``--iters`` calls after a compile call; ``tokens_per_s`` = B * M / time;
  ``peak_bytes`` is XLA's estimate for the compiled program (arguments + outputs + temporaries).
- ``naive_recompute``: a Python loop that, for each new token, runs the full forward pass over the
  whole sequence so far (padded up to a multiple of 64 so only a few shapes compile; compiles
  happen in a warm-up pass and are not timed) and takes the argmax. With ``--naive-estimate`` (on
  by default above ``--naive-max-params`` parameters, where the real loop would take minutes on a
  CPU) the loop is not run: each padded length is timed once (``--iters`` calls, median) and the
  step times are summed over the M steps - the same work the loop would do, minus Python overhead
  (so the estimate favours the naive loop). Batches above ``--naive-max-batch`` skip the naive
  loop. ``speedup`` is naive time / kv_cache time at the same (preset, B, T, M).
- ``roofline`` (on a GPU/TPU, or with ``--roofline``): the decode step time, measured as
  (time(M) - time(M=1)) / (M - 1), against the HBM roofline (parameter bytes + KV-cache bytes
  of the tokens written so far, averaged over the steps) / ``--bandwidth`` (default 4.8e12 B/s,
  an H200). ``roofline_fraction`` = roofline step time / measured step time (1.0 = at the roof).

On accelerators parameters are cast to ``--param-dtype`` (default bfloat16 there: inference needs
no fp32 master weights); on CPU they stay in the preset's dtype.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxselm.model import forward, get_preset, init_params
from jaxselm.sampling import generate, lower_generate

PAD_MULTIPLE = 64


def _time(fn, iters: int) -> float:
    """Median wall seconds of ``iters`` calls of fn (each blocks until its result is ready)."""
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _param_bytes(params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def _prompts(cfg, batch: int, prompt_len: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(1, cfg.vocab_size, size=(batch, prompt_len), dtype=np.int32)


def _naive_step_fn(cfg):
    @functools.partial(jax.jit, static_argnames=("length",))
    def step(params, seq, mask, pos, *, length):
        # Full forward over the first `length` slots: the sequence so far plus masked padding.
        logits = forward(params, cfg, seq[:, :length], mask[:, :length])
        nxt = jnp.argmax(jnp.take(logits, pos - 1, axis=1), axis=-1).astype(jnp.int32)
        seq = jax.lax.dynamic_update_slice(seq, nxt[:, None], (0, pos))
        mask = jax.lax.dynamic_update_slice(mask, jnp.ones_like(nxt, bool)[:, None], (0, pos))
        return seq, mask

    return step


def _padded(n: int) -> int:
    return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


def naive_loop(params, cfg, prompts: np.ndarray, new_tokens: int, step=None) -> np.ndarray:
    """Greedy generation recomputing the full forward each token (right-padded buffer)."""
    b, t = prompts.shape
    step = step or _naive_step_fn(cfg)
    total = _padded(t + new_tokens)
    seq = jnp.zeros((b, total), jnp.int32).at[:, :t].set(prompts)
    mask = jnp.zeros((b, total), bool).at[:, :t].set(True)
    for pos in range(t, t + new_tokens):
        # Causal attention and masked padding: the first _padded(pos) slots are the sequence so far.
        seq, mask = step(params, seq, mask, jnp.int32(pos), length=_padded(pos))
    return jax.block_until_ready(seq)


def naive_estimate(params, cfg, prompts: np.ndarray, new_tokens: int, iters: int) -> float:
    """Seconds the naive loop would take: per-padded-length step times summed over the steps."""
    b, t = prompts.shape
    step = _naive_step_fn(cfg)
    per_len = {}
    total = _padded(t + new_tokens)
    seq = jnp.zeros((b, total), jnp.int32).at[:, :t].set(prompts)
    mask = jnp.zeros((b, total), bool).at[:, :t].set(True)
    for length in sorted({_padded(pos) for pos in range(t, t + new_tokens)}):
        jax.block_until_ready(step(params, seq, mask, jnp.int32(t), length=length))  # compile
        call = functools.partial(step, params, seq, mask, jnp.int32(t), length=length)
        per_len[length] = _time(call, iters)
    return sum(per_len[_padded(pos)] for pos in range(t, t + new_tokens))


def run_case(preset: str, batch: int, args, rec_base: dict) -> None:
    backend = jax.default_backend()
    cfg = get_preset(preset)
    if backend != "cpu" and args.param_dtype:
        cfg = cfg.replace(param_dtype=args.param_dtype)
    if cfg.max_position_embeddings < args.prompt_len + args.new_tokens:  # "tiny" has 256
        cfg = cfg.replace(max_position_embeddings=args.prompt_len + args.new_tokens)
    params = init_params(cfg, jax.random.key(0))
    prompts = _prompts(cfg, batch, args.prompt_len)
    m = args.new_tokens
    case = f"{preset} B={batch} T={args.prompt_len} M={m}"
    base = dict(
        rec_base,
        case=case,
        preset=preset,
        batch=batch,
        prompt_len=args.prompt_len,
        new_tokens=m,
        params=cfg.num_params(),
        param_dtype=cfg.param_dtype,
        dtype=cfg.dtype,
    )
    kw = dict(rng=jax.random.key(1), max_new_tokens=m, n=1, temperature=1.0)

    def engine(max_new=m):
        return generate(params, cfg, prompts, **dict(kw, max_new_tokens=max_new))

    t0 = time.perf_counter()
    jax.block_until_ready(engine())
    compile_s = time.perf_counter() - t0
    secs = _time(engine, args.iters)
    try:
        mem = lower_generate(params, cfg, prompts, **kw).compile().memory_analysis()
        peak = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - memory_analysis is not implemented on every backend
        peak = None
    rec = dict(
        base,
        impl="kv_cache",
        ms=secs * 1e3,
        tokens_per_s=batch * m / secs,
        peak_bytes=peak,
        first_call_s=compile_s,
    )
    print(json.dumps(rec), flush=True)

    nparams = cfg.num_params()
    if batch <= args.naive_max_batch and not args.no_naive:
        estimate = args.naive_estimate or nparams > args.naive_max_params
        if estimate:
            naive_s = naive_estimate(params, cfg, prompts, m, args.iters)
        else:
            step = _naive_step_fn(cfg)
            naive_loop(params, cfg, prompts, m, step)  # warm-up: compiles every padded length
            iters = max(1, args.iters // 2)
            naive_s = _time(lambda: naive_loop(params, cfg, prompts, m, step), iters)
        print(
            json.dumps(
                dict(
                    base,
                    impl="naive_recompute",
                    ms=naive_s * 1e3,
                    tokens_per_s=batch * m / naive_s,
                    speedup=naive_s / secs,
                    estimated=estimate,
                )
            ),
            flush=True,
        )

    if backend != "cpu" or args.roofline:
        one = _time(lambda: engine(1), args.iters)  # prefill + first token (compiles on 1st call)
        one = _time(lambda: engine(1), args.iters)
        step_s = (secs - one) / max(m - 1, 1)
        d, k, layers = cfg.resolved_head_dim, cfg.num_kv_heads, cfg.num_layers
        itemsize = jnp.dtype(cfg.dtype).itemsize
        avg_len = args.prompt_len + (m - 1) / 2  # cache tokens read per decode step, on average
        cache_bytes = 2 * layers * batch * avg_len * k * d * itemsize
        pbytes = _param_bytes(params)
        roof_s = (pbytes + cache_bytes) / args.bandwidth
        print(
            json.dumps(
                dict(
                    base,
                    impl="roofline",
                    ms=step_s * 1e3,
                    decode_step_ms=step_s * 1e3,
                    prefill_ms=one * 1e3,
                    roofline_step_ms=roof_s * 1e3,
                    roofline_fraction=roof_s / step_s if step_s > 0 else math.nan,
                    param_bytes=pbytes,
                    cache_bytes_per_step=cache_bytes,
                    bandwidth=args.bandwidth,
                    decode_tokens_per_s=batch / step_s if step_s > 0 else math.nan,
                )
            ),
            flush=True,
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--presets", default="tiny,small-100m")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--naive-max-batch", type=int, default=1)
    p.add_argument(
        "--naive-max-params",
        type=int,
        default=10_000_000,
        help="above this many parameters the naive loop is estimated, not run",
    )
    p.add_argument("--naive-estimate", action="store_true", help="always estimate the naive loop")
    p.add_argument("--no-naive", action="store_true")
    p.add_argument("--roofline", action="store_true", help="also report the roofline on CPU")
    p.add_argument("--bandwidth", type=float, default=4.8e12, help="memory bandwidth, bytes/s")
    p.add_argument(
        "--param-dtype",
        default="bfloat16",
        help="parameter dtype on accelerators ('' keeps the preset's)",
    )
    args = p.parse_args(argv)
    dev = jax.devices()[0]
    base = dict(
        backend=jax.default_backend(),
        device=getattr(dev, "device_kind", str(dev)),
        cpus=os.cpu_count(),
        machine=platform.processor() or platform.machine(),
        jax=jax.__version__,
    )
    for preset in args.presets.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            try:
                run_case(preset, batch, args, base)
            except Exception as err:  # noqa: BLE001 - e.g. out of memory: report, go on
                print(
                    json.dumps(
                        dict(
                            base,
                            case=f"{preset} B={batch}",
                            impl="kv_cache",
                            error=f"{type(err).__name__}: {err}"[:300],
                        )
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    sys.exit(main())
