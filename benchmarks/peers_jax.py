"""The jaxselm side of benchmarks/peers.py (one role per worker process): generation with
jaxselm's sampler, the DPO/SELM train step, one online iteration. Imports jax, never torch."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import peers_common as C

from jaxselm.hf import load_hf_checkpoint


def _versions() -> dict[str, Any]:
    import flax
    import optax

    dev = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "devices": jax.device_count(),
    }


def _load(model_dir: str):
    t0 = time.perf_counter()
    cfg, params = load_hf_checkpoint(model_dir, dtype="float32")
    jax.block_until_ready(params)
    return cfg, params, time.perf_counter() - t0


# -- generation ----------------------------------------------------------------------------------


def gen(spec: dict[str, Any]) -> dict[str, Any]:
    from jaxselm.sampling import generate

    cfg, params, load_s = _load(spec["model_dir"])
    prompts = C.read_json(Path(spec["model_dir"]) / "prompts.json")
    rows = prompts["ids"][: spec["batch"]]
    m = spec["new_tokens"]

    last: list = []

    def call(seed: int) -> int:
        res = generate(
            params,
            cfg,
            rows,  # left-padded here to a power-of-two bucket
            rng=jax.random.key(seed),
            max_new_tokens=m,
            n=1,
            temperature=1.0,
            greedy=spec["greedy"],
            stop_token_ids=(),  # no stop token: every row generates all M tokens
            pad_id=prompts["pad_id"],
        )
        last[:] = [np.asarray(jax.block_until_ready(res.tokens))[:, 0].tolist()]
        return int(np.asarray(res.lengths).sum())

    timed = C.timed_generation(call, spec["iters"])  # the first call compiles
    return {
        **timed,
        "compile_s": max(timed["first_call_s"] - timed["s"], 0.0),
        "load_s": load_s,
        "peak_rss_mb": C.peak_rss_mb(),
        "tokens": last[0] if spec["greedy"] else None,
        **_versions(),
    }


# -- the preference step -------------------------------------------------------------------------


def step(spec: dict[str, Any]) -> dict[str, Any]:
    from jaxselm.data.packing import pack_preferences
    from jaxselm.parallel import single_device_mesh
    from jaxselm.train import (
        OptimizerConfig,
        TrainConfig,
        create_train_state,
        make_optimizer,
        make_preference_step,
        make_reference_fn,
        responses_for,
        shard_train_state,
    )

    cfg, params, load_s = _load(spec["model_dir"])
    loss = spec["loss"]
    train = TrainConfig(
        loss=loss,
        beta=spec["beta"],
        alpha=spec["alpha"],
        optimizer=OptimizerConfig(
            learning_rate=spec["lr"],
            total_steps=1000,
            schedule="constant",
            warmup_steps=0,
            weight_decay=0.0,
            eps=1e-8,
            max_grad_norm=1.0,
        ),
    )
    b = C.step_batch(spec["seed"], spec["pairs"], spec["length"], cfg.vocab_size)
    batch = pack_preferences(
        b["prompt"].tolist(),
        b["chosen"].tolist(),
        b["rejected"].tolist(),
        b["refresp"].tolist() if loss == "selm" else None,
        pad_id=0,
        length=spec["length"],
    )
    mesh = single_device_mesh()
    tx = make_optimizer(train.optimizer)
    # The reference log-probs, once, with the starting params (as the online loop does).
    ref = make_reference_fn(cfg, mesh, responses=responses_for(loss))(params, batch)
    batch = batch.replace(ref_logps=jax.device_get(ref))
    # The step donates its state (its buffers may be the loaded params'): params are not used
    # after this line. No host copy, so peak RSS holds one set of params, grads and moments.
    state = shard_train_state(create_train_state(params, tx), cfg, tx, mesh)
    del params
    step_fn = make_preference_step(cfg, train, tx, mesh)
    losses, logps, times = [], [], []
    for _ in range(1 + spec["steps"]):  # the first call compiles (and is a real update)
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batch)
        metrics = jax.device_get(jax.block_until_ready(metrics))
        times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
        logps.append(float(metrics["logps/chosen"]))
    s = C.median(times[1:])
    k = len(responses_for(loss))
    return {
        "s": s,
        "times_s": times[1:],
        "tokens_per_s": k * spec["pairs"] * spec["length"] / s,
        "first_step_s": times[0],
        "compile_s": max(times[0] - s, 0.0),
        "load_s": load_s,
        "losses": losses,
        "logps_chosen": logps,
        "peak_rss_mb": C.peak_rss_mb(),
        **_versions(),
    }


# -- the online iteration ------------------------------------------------------------------------


def online(spec: dict[str, Any]) -> dict[str, Any]:
    """One `jaxselm online` iteration (no SFT) from the model folder, the judge = C.reward."""
    import yaml

    from jaxselm.config_io import load_config
    from jaxselm.online import RunConfig, run_online
    from jaxselm.online.metrics import MetricsWriter, phase_times

    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    train_file, eval_file = run_dir / "prompts.jsonl", run_dir / "eval_prompts.jsonl"
    train_file.write_text(
        "".join(json.dumps({"prompt": t}) + "\n" for t in C.prompt_texts(spec["prompts"]))
    )
    eval_file.write_text(
        "".join(json.dumps({"prompt": t}) + "\n" for t in C.eval_prompt_texts()[: spec["eval"]])
    )
    config = {
        "run": {
            "output_dir": str(run_dir / "run"),
            "seed": 0,
            "tensorboard": False,
            "progress": False,
        },
        "init": {"checkpoint": spec["model_dir"]},
        # TRL's OnlineDPOConfig checkpoints gradients by default; model.remat is the same trade.
        "model": {"dtype": "float32", "remat": True},
        "data": {
            "source": "prompts",
            "prompts_path": str(train_file),
            "eval_prompts_path": str(eval_file),
            "num_eval_prompts": spec["eval"],
            "chat_template": True,
        },
        "sft": {"steps": 0},
        "online": {
            "iterations": 1,
            "prompts_per_iteration": spec["prompts"],
            "samples_per_prompt": 2,
            "max_new_tokens": spec["new_tokens"],
            "temperature": 1.0,
            "generation_batch_size": spec["prompts"],
            "refresp": "first",  # DPO needs no y_ref: no extra greedy generation
            "epochs": 1,
            "batch_size": spec["batch_size"],
            "learning_rates": spec["lr"],
        },
        "train": {
            "loss": "dpo",
            "beta": spec["beta"],
            "alpha": 0.0,
            "optimizer": {
                "schedule": "constant",
                "warmup_steps": 0,
                "weight_decay": 0.0,
                "max_grad_norm": 1.0,
            },
        },
        "judge": {"kind": "programmatic", "function": "peers_common:reward"},
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
    }
    config_file = run_dir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    cfg = load_config(RunConfig, config_file)
    log: list[str] = []
    t0 = time.perf_counter()
    run_online(cfg, log=log.append, config_dir=str(run_dir))
    run_s = time.perf_counter() - t0
    metrics = MetricsWriter(run_dir / "run", tensorboard=False)
    times = phase_times(metrics.read("time"))
    it1 = times.get(1, {})
    record = next((r for r in metrics.read("iteration") if r.get("iteration") == 1), {})
    train_recs = [r for r in metrics.read("train") if r.get("iteration") == 1]
    work = ("generate", "judge", "reference", "train")  # what TRL's train() does too
    # Keep the metrics, drop the run's checkpoints (two float32 copies of the model).
    shutil.copy(metrics.path, run_dir / "metrics.jsonl")
    shutil.rmtree(run_dir / "run", ignore_errors=True)
    return {
        "iteration_s": sum(it1.get(k, 0.0) for k in work),
        "run_s": run_s,
        "phases_s": {str(t): p for t, p in times.items()},
        "pairs": record.get("samples/n_pairs"),
        "steps": len(train_recs),
        "losses": [r.get("loss") for r in train_recs],
        "peak_rss_mb": C.peak_rss_mb(),
        **_versions(),
    }


ROLES = {"gen": gen, "step": step, "online": online}
