"""The CLI subcommands other than the loop's: generate, eval, train-rm, convert.

Each takes a validated :class:`RunConfig` (one config file describes a model, its data and its
judge for every command) and is built from the public pieces of the loop: the run context, the
rollout, the training driver, the checkpoint loader.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxselm import metric_names as M
from jaxselm.checkpoints import checkpoint_kind, checkpoint_tokenizer, load_checkpoint
from jaxselm.data import rows
from jaxselm.data.packing import pack_preferences, take_rows
from jaxselm.data.tokenizer import load_tokenizer
from jaxselm.errors import CheckpointError, ConfigError, DataError
from jaxselm.files import check_writable_file, write_text
from jaxselm.hf import save_gguf_checkpoint, save_hf_checkpoint
from jaxselm.model import ModelConfig, init_params, with_score_head
from jaxselm.online.config import RunConfig
from jaxselm.online.context import RunContext
from jaxselm.online.metrics import MetricsWriter
from jaxselm.online.prompts import PromptSet, text_of
from jaxselm.online.rollout import rollout
from jaxselm.parallel.multihost import to_host
from jaxselm.train import (
    TrainLoop,
    make_optimizer,
    make_reward_model_step,
    params_shardings_for,
    save_params,
)


def read_prompts_file(path: str, prompts: PromptSet) -> list[dict[str, Any]]:
    """Prompt records of a JSONL/JSON/Parquet file (rows with a 'prompt' string or a 'messages'
    list), checked like a run's prompts file: any bad row (a missing or empty prompt, a number
    where text belongs, bytes that are not UTF-8) is a DataError naming file and line."""
    recs = []
    for where, row in rows.iter_raw_rows(path):
        ids = "id" if isinstance(row, dict) and "id" in row else "prompt_id"
        fmt = rows.RowFormat(id_field=ids, max_prompt_chars=1 << 62)
        try:
            rec = rows.parse_row(row, fmt)
        except rows.BadRow as err:
            raise DataError(f"{where}: {err.detail}") from None
        rec["prompt_ids"] = prompts.encode_prompt(rec)
        recs.append(rec)
    if not recs:
        raise DataError(f"{path}: no prompts (the file holds no rows)")
    return recs


def check_checkpoint(path: str, what: str) -> None:
    """A checkpoint argument that is no checkpoint at all: one line naming the option."""
    try:
        checkpoint_kind(path)
    except CheckpointError as err:
        raise CheckpointError(f"{what}: {err}") from None


def respond(ctx: RunContext, params: Any, recs: list[dict[str, Any]], *, greedy: bool) -> list[str]:
    """One response (text) of the policy to each prompt record."""
    gen, _ = rollout(
        ctx,
        params,
        len(recs),
        lambda pos: [recs[int(i)] for i in pos],
        key=jax.random.fold_in(ctx.key, 1000),
        n=1,
        greedy=greedy,
        temperature=ctx.cfg.online.temperature,
        desc="generate",
    )
    return [ctx.text(r) for r in gen.responses()]


def generate_command(
    cfg: RunConfig,
    checkpoint: str,
    prompts_path: str | None,
    output: str,
    *,
    greedy: bool,
    config_dir: str | None = None,
) -> int:
    check_writable_file(output, "--output")  # before any work
    check_checkpoint(checkpoint, "--checkpoint")
    ctx = RunContext.create(cfg, config_dir=config_dir)
    recs = (
        read_prompts_file(prompts_path, ctx.prompts) if prompts_path else ctx.prompts.evaluation()
    )
    params = ctx.load_params(checkpoint)
    texts = respond(ctx, params, recs, greedy=greedy)
    lines = [
        json.dumps({"id": r.get("id"), "prompt": r["prompt"], "response": t})
        for r, t in zip(recs, texts)
    ]
    write_text(output, "".join(x + "\n" for x in lines))
    print(f"wrote {len(lines)} responses to {output}")
    return 0


def eval_command(
    cfg: RunConfig,
    checkpoint: str,
    baseline: str | None,
    alpaca_eval: str | None,
    *,
    config_dir: str | None = None,
) -> int:
    check_checkpoint(checkpoint, "--checkpoint")  # all inputs and outputs before any work
    if baseline:
        check_checkpoint(baseline, "--baseline")
    if alpaca_eval:
        check_writable_file(alpaca_eval, "--alpaca-eval")
    ctx = RunContext.create(cfg, config_dir=config_dir)
    recs = ctx.prompts.evaluation()
    prompts = [r["prompt"] for r in recs]
    texts = respond(ctx, ctx.load_params(checkpoint), recs, greedy=True)
    scores = ctx.evaluator.score(prompts, texts)
    result: dict[str, Any] = {
        "checkpoint": checkpoint,
        "n": len(recs),
        "reward": float(np.nanmean(scores)),
        "accuracy": float(np.mean(scores >= 1.0 - 1e-9)),
    }
    if baseline:
        base = respond(ctx, ctx.load_params(baseline), recs, greedy=True)
        wins = ctx.evaluator.compare_batch(prompts, texts, base)
        result.update(
            baseline=baseline, win_rate=float(np.nanmean(wins)), judged=int(np.isfinite(wins).sum())
        )
    print(json.dumps(result, indent=1))
    if alpaca_eval:
        generator = Path(checkpoint).name or "jaxselm"
        rows = [
            {"instruction": p, "output": t, "generator": generator, "dataset": "jaxselm"}
            for p, t in zip(prompts, texts)
        ]
        write_text(alpaca_eval, json.dumps(rows, indent=1, ensure_ascii=False))
        print(f"wrote AlpacaEval outputs to {alpaca_eval}")
    return 0


def train_rm_command(cfg: RunConfig, *, steps: int | None) -> int:
    """Fit a scalar-head reward model with the Bradley-Terry loss on (prompt, chosen, rejected)
    rows; saved (with its model config) to OUTPUT_DIR/reward_model/params."""
    if cfg.data.source != "prompts":
        raise ConfigError(
            "data.source: reward-model training needs a preference file (data.source: prompts)"
        )
    ctx = RunContext.create(cfg, with_judge=False)
    rows = [r for r in ctx.prompts.training_rows() if r.get("chosen") and r.get("rejected")]
    if not rows:
        raise DataError(f"{cfg.data.prompts_path}: no rows with both 'chosen' and 'rejected'")
    prompts = [r["prompt_ids"] for r in rows]
    chosen = [ctx.prompts.encode_response(text_of(r["chosen"])) for r in rows]
    rejected = [ctx.prompts.encode_response(text_of(r["rejected"])) for r in rows]
    data = pack_preferences(prompts, chosen, rejected, pad_id=ctx.pad_id)
    bs = cfg.online.batch_size
    total = steps or math.ceil(len(rows) / bs) * cfg.online.epochs
    opt = cfg.train.optimizer.replace(learning_rate=cfg.online.learning_rate(1), total_steps=total)
    tx = make_optimizer(opt)
    step = make_reward_model_step(ctx.model, cfg.train.replace(optimizer=opt), tx, ctx.mesh)
    rng = ctx.rng(0xB7)
    order = np.concatenate(
        [rng.permutation(len(rows)) for _ in range(math.ceil(total * bs / len(rows)) + 1)]
    )
    out = ctx.out / "reward_model"
    metrics = MetricsWriter(out, tensorboard=cfg.run.tensorboard)
    loop = TrainLoop(step, total, name="train-rm", show_progress=cfg.run.progress)
    loop.add_hook(lambda s, m: metrics.write("train_rm", s, to_host(m)))
    try:
        params = _reward_model_start(ctx)
        state = loop.run(
            lambda: params, tx, lambda s: take_rows(data, order[s * bs : (s + 1) * bs])
        )
    finally:
        metrics.close()
    save_params(out / "params", state.params, model_config=ctx.model, head="reward", overwrite=True)
    last = metrics.read("train_rm")[-1]
    print(
        f"reward model: {total} steps, final loss {last[M.LOSS]:.4f}, "
        f"accuracy {last[M.RM_ACCURACY]:.3f}; saved to {out / 'params'}"
    )
    return 0


def _reward_model_start(ctx: RunContext) -> Any:
    """The reward model's start: ``init.checkpoint`` (a CausalLM keeps its trunk and gets a
    fresh score head) or a random init, laid out on the mesh."""
    model, shardings = ctx.model, params_shardings_for(ctx.model, ctx.mesh, head="reward")
    fresh = jax.jit(lambda k: init_params(model, k, head="reward"), out_shardings=shardings)
    if ctx.cfg.init.checkpoint is None:
        return fresh(ctx.key)
    _, params = load_checkpoint(
        ctx.cfg.init.checkpoint, head=None, model_config=model, mesh=ctx.mesh
    )
    if "score" not in params:  # a CausalLM: keep the trunk, add a fresh score head
        params = with_score_head(params, fresh(jax.random.fold_in(ctx.key, 7)))
    return params


def convert_command(
    inp: str,
    output: str,
    *,
    to: str | None = None,
    src: str | None = None,
    cfg: RunConfig | None = None,
    tokenizer: str | None = None,
    dtype: str | None = None,
    head: str | None = None,
) -> int:
    """Any checkpoint (HF directory, GGUF file, params export) -> a params export (``to`` =
    "jaxselm", the default for HF / GGUF input), an HF directory ("hf", the default for an
    export) or a GGUF file ("gguf"). HF and GGUF outputs are complete models: with the
    tokenizer (``tokenizer``, else the input's own, else the one an export recorded, else the run
    config's) and its chat template and special ids. ``cfg``: a run config whose model the input
    must be (needed only for an export saved without its model config)."""
    kind = checkpoint_kind(inp)
    if src is not None and src != {"export": "jaxselm"}.get(kind, kind):
        raise ConfigError(f"--from: {inp} is a {kind} checkpoint, not {src}")
    to = to or ("hf" if kind == "export" else "jaxselm")
    model: ModelConfig | None = cfg.model if cfg is not None else None
    mcfg, params = load_checkpoint(inp, head=head, model_config=model)
    found = "reward" if "score" in params else "lm"
    spec = tokenizer or checkpoint_tokenizer(inp)
    if spec is None and cfg is not None:
        spec = cfg.data.tokenizer or checkpoint_tokenizer(cfg.init.checkpoint)
    if to == "jaxselm":
        if dtype is not None:
            params = jax.tree.map(lambda x: x.astype(dtype), params)
            mcfg = mcfg.replace(param_dtype=dtype, dtype=dtype)
        path = None if spec is None or spec.startswith("builtin:") else os.path.abspath(spec)
        save_params(output, params, model_config=mcfg, head=found, tokenizer=path)
        print(f"converted {inp} -> {output} ({mcfg.num_params(head=found):,} params)")
        return 0
    tok = load_tokenizer(spec) if spec is not None else None
    if to == "hf":
        save_hf_checkpoint(mcfg, params, output, dtype=dtype, head=found, tokenizer=tok)
    else:
        save_gguf_checkpoint(mcfg, params, output, dtype=dtype or "float32", tokenizer=tok)
    note = "" if tok is not None else " (no tokenizer: give --tokenizer to include one)"
    print(f"converted {inp} -> {output} ({to} {found} checkpoint){note}")
    return 0
