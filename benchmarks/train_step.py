"""Benchmark the sharded SELM train step; one JSON line per (preset, mesh) case.

    python benchmarks/train_step.py --presets tiny,small-100m --meshes 1x1x1,8x1x1 \\
        --batch 8 --seq-len 64 --iters 3

On CPU the script asks XLA for 8 host devices (before jax is imported) so 1-device and 8-device
meshes compare in one process; on an accelerator it uses the real devices (``--meshes auto``: one
data-parallel mesh over all of them). For each case it builds the train state directly sharded,
computes reference log-probs once (as the online loop does), compiles the step, runs one warm-up
call and times ``--iters`` calls, and prints

    {"case": "selm_step small-100m B=8 T=64", "impl": "mesh=8x1x1", "ms": ..., "tokens_per_s": ...,
     "mfu": ..., "peak_bytes": ..., "compile_s": ..., "params": ..., "devices": ..., ...}

``ms`` is the median step time; ``tokens_per_s`` counts the tokens the policy processes per step
(chosen, rejected and y_ref: 3 * B * T); ``mfu`` = (model FLOPs per token, from
``ModelConfig.flops_per_token(T, training=True)``, times those tokens / step time) / (device peak
bf16 FLOP/s x devices), printed only on an accelerator with a known or given peak
(``--peak-tflops``); ``peak_bytes`` is XLA's estimate for the compiled step on one device
(arguments + outputs + temporaries, ``compiled.memory_analysis()``).
"""

from __future__ import annotations

import argparse
import os
import sys

if "jax" not in sys.modules and "--xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):
    # Only affects the CPU backend; harmless on accelerators.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import json
import statistics
import time

import jax
import numpy as np

from jaxselm.data.packing import PreferenceBatch, pack_preferences
from jaxselm.model import get_preset
from jaxselm.parallel import make_mesh
from jaxselm.train import (
    OptimizerConfig,
    TrainConfig,
    init_train_state,
    make_optimizer,
    make_preference_step,
    make_reference_fn,
)

# Dense bf16 peak FLOP/s per chip (vendor figures), matched against jax's device_kind.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


def peak_flops(device: jax.Device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.platform == "cpu":
        return None
    kind = device.device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return tflops * 1e12
    return None


def random_batch(rng: np.random.Generator, vocab: int, batch: int, length: int) -> PreferenceBatch:
    """Preference rows: a prompt of T/4 tokens and a full-length response, right-padded."""
    prompt = max(1, length // 4)
    prompts = rng.integers(1, vocab, (batch, prompt)).tolist()

    def responses():
        return rng.integers(1, vocab, (batch, length - prompt)).tolist()

    return pack_preferences(prompts, responses(), responses(), responses(), pad_id=0, length=length)


def parse_mesh(text: str) -> tuple[int, int, int]:
    parts = tuple(int(x) for x in text.split("x"))
    if len(parts) != 3:
        raise SystemExit(f"--meshes: expected DATAxFSDPxTENSOR, got {text!r}")
    return parts


def run_case(args, preset: str, mesh_shape: tuple[int, int, int]) -> dict:
    config = get_preset(preset)
    if args.dtype:
        config = config.replace(dtype=args.dtype)
    if args.attention_impl:
        config = config.replace(attention_impl=args.attention_impl)
    n = int(np.prod(mesh_shape))
    mesh = make_mesh(mesh_shape, devices=jax.devices()[:n])
    train = TrainConfig(
        micro_batches=args.micro_batches,
        optimizer=OptimizerConfig(learning_rate=1e-6, total_steps=1000),
    )
    tx = make_optimizer(train.optimizer)
    state = init_train_state(config, tx, jax.random.key(0), mesh)
    batch = random_batch(np.random.default_rng(0), config.vocab_size, args.batch, args.seq_len)
    ref = make_reference_fn(config, mesh, micro_batches=args.micro_batches)(state.params, batch)
    full = batch.replace(ref_logps=jax.device_get(ref))
    step = make_preference_step(config, train, tx, mesh)
    full = jax.device_put(full, step.batch_shardings(full))

    t0 = time.perf_counter()
    hyper = {}  # a step without call-time hyperparameters still takes their (empty) dict
    compiled = step.lower(state, full, hyper).compile()
    compile_s = time.perf_counter() - t0
    peak_bytes = None
    try:
        mem = compiled.memory_analysis()
        peak_bytes = int(
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        )
    except Exception:  # not every backend reports it
        pass

    state, metrics = compiled(state, full, hyper)  # warm-up (also the first real update)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        state, metrics = compiled(state, full, hyper)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    tokens = 3 * args.batch * args.seq_len
    flops = config.flops_per_token(args.seq_len, training=True) * tokens
    peak = peak_flops(jax.devices()[0], args.peak_tflops)
    return {
        "case": f"selm_step {preset} B={args.batch} T={args.seq_len}",
        "impl": "mesh=" + "x".join(map(str, mesh_shape)),
        "ms": round(sec * 1e3, 3),
        "tokens_per_s": round(tokens / sec, 1),
        "mfu": None if peak is None else round(flops / sec / (peak * n), 4),
        "model_tflops_per_s": round(flops / sec / 1e12, 4),
        "peak_bytes": peak_bytes,
        "compile_s": round(compile_s, 2),
        "params": config.num_params(),
        "devices": n,
        "device_kind": jax.devices()[0].device_kind,
        "dtype": config.dtype,
        "attention_impl": config.attention_impl,
        "micro_batches": args.micro_batches,
        "iters": args.iters,
        "loss": float(metrics["loss"]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,small-100m")
    parser.add_argument(
        "--meshes",
        default="1x1x1,8x1x1",
        help="comma-separated DATAxFSDPxTENSOR, or 'auto' (all devices, data)",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--dtype", default=None, help="compute dtype override (e.g. bfloat16)")
    parser.add_argument(
        "--attention-impl", default=None, help="model.attention_impl override (default: auto)"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak FLOP/s per device for MFU, if the device is not in the table",
    )
    args = parser.parse_args(argv)
    if args.meshes == "auto":
        meshes = [(jax.device_count(), 1, 1)]
    else:
        meshes = [parse_mesh(m) for m in args.meshes.split(",")]
    for preset in args.presets.split(","):
        for shape in meshes:
            if int(np.prod(shape)) > jax.device_count():
                continue
            try:
                row = run_case(args, preset, shape)
            except Exception as err:  # report and go on with the next case
                row = {
                    "case": f"selm_step {preset} B={args.batch} T={args.seq_len}",
                    "impl": "mesh=" + "x".join(map(str, shape)),
                    "error": f"{type(err).__name__}: {err}".splitlines()[0][:300],
                }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
