"""The CLI subcommands other than `online`: generate, eval, offline train, train-rm, convert.

Each takes a validated :class:`RunConfig` and reuses the loop's pieces (prompt sets, the sampler,
the judge, the train steps), so one config file describes a model, its data and its judge for
every command.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxselm.data.batching import bucket_length
from jaxselm.errors import CheckpointError, ConfigError, DataError
from jaxselm.online.config import RunConfig
from jaxselm.online.io import write_json
from jaxselm.online.loop import OnlineRun, _pack, _progress, abstract_sharding
from jaxselm.train import (
    abstract_train_state,
    create_train_state,
    load_params,
    make_optimizer,
    make_reward_model_step,
    save_params,
)


def _load_policy_params(run: OnlineRun, path: str):
    p = Path(path)
    if (p / "config.json").is_file():
        from jaxselm.hf import load_hf_checkpoint

        _, params = load_hf_checkpoint(p, head="lm")
        return jax.device_put(params, run.params_sharding)
    return load_params(p, run._abstract_params())


def _read_prompt_jsonl(path: str, run: OnlineRun) -> list[dict[str, Any]]:
    recs = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{i}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)):
            raise DataError(f"{path}:{i}: needs a 'prompt' string or a 'messages' list")
        prompt = row.get("prompt") or row["messages"][-1].get("content", "")
        messages = row.get("messages") or [{"role": "user", "content": prompt}]
        rec = {"id": str(row.get("id", row.get("prompt_id", i))), "prompt": prompt, "messages": messages}
        rec["prompt_ids"] = run.prompts.encode_prompt(rec)
        recs.append(rec)
    if not recs:
        raise DataError(f"{path}: no prompts")
    return recs


def _greedy_texts(run: OnlineRun, params, recs, *, greedy: bool = True, key_index: int = 0) -> list[str]:
    out, _ = run._gen(params, len(recs), lambda pos: [recs[int(i)] for i in pos],
                      key=jax.random.fold_in(run.key, 1000 + key_index), n=1, greedy=greedy,
                      temperature=run.cfg.online.temperature, flag=None, desc="generate")
    resp = run._responses(out["tokens"][:, 0], out["lengths"][:, 0])
    return [run._text(r) for r in resp]


def generate_command(cfg: RunConfig, checkpoint: str, prompts_path: str | None, output: str, *,
                     greedy: bool) -> int:
    run = OnlineRun(cfg)
    params = _load_policy_params(run, checkpoint)
    recs = _read_prompt_jsonl(prompts_path, run) if prompts_path else run.prompts.evaluation()
    texts = _greedy_texts(run, params, recs, greedy=greedy)
    lines = [json.dumps({"id": r.get("id"), "prompt": r["prompt"], "response": t}) for r, t in zip(recs, texts)]
    _write_text(output, "".join(x + "\n" for x in lines))
    print(f"wrote {len(lines)} responses to {output}")
    return 0


def eval_command(cfg: RunConfig, checkpoint: str, baseline: str | None, alpaca_eval: str | None) -> int:
    run = OnlineRun(cfg)
    recs = run.prompts.evaluation()
    prompts = [r["prompt"] for r in recs]
    texts = _greedy_texts(run, _load_policy_params(run, checkpoint), recs)
    scores = run.judge.score(prompts, texts)
    result: dict[str, Any] = {"checkpoint": checkpoint, "n": len(recs),
                              "reward": float(np.nanmean(scores)),
                              "accuracy": float(np.mean(scores >= 1.0 - 1e-9))}
    if baseline:
        base = _greedy_texts(run, _load_policy_params(run, baseline), recs)
        wins = run.judge.compare_batch(prompts, texts, base)
        result.update(baseline=baseline, win_rate=float(np.nanmean(wins)),
                      judged=int(np.isfinite(wins).sum()))
    print(json.dumps(result, indent=1))
    if alpaca_eval:
        generator = Path(checkpoint).name or "jaxselm"
        rows = [{"instruction": p, "output": t, "generator": generator, "dataset": "jaxselm"}
                for p, t in zip(prompts, texts)]
        _write_text(alpaca_eval, json.dumps(rows, indent=1, ensure_ascii=False))
        print(f"wrote AlpacaEval outputs to {alpaca_eval}")
    return 0


def offline_train_command(cfg: RunConfig) -> int:
    """One SELM/DPO/IPO pass over the dataset's (chosen, rejected) pairs, pi_ref = the start model."""
    if cfg.data.source != "prompts":
        raise ConfigError("data.source: offline training needs a preference file (data.source: prompts)")
    return OnlineRun(cfg).run_offline()


def train_rm_command(cfg: RunConfig, *, steps: int | None) -> int:
    """Fit a scalar-head reward model with the Bradley-Terry loss on (prompt, chosen, rejected)."""
    if cfg.data.source != "prompts":
        raise ConfigError("data.source: reward-model training needs a preference file (data.source: prompts)")
    run = OnlineRun(cfg, with_judge=False)
    rows = [r for r in run.prompts.iteration_all() if r.get("chosen") and r.get("rejected")]
    if not rows:
        raise DataError(f"{cfg.data.prompts_path}: no rows with both 'chosen' and 'rejected'")
    from jaxselm.online.prompts import _text_of

    mcfg = run.model_cfg
    prompt_ids = [r["prompt_ids"] for r in rows]
    chosen = [run.prompts.encode_response(_text_of(r["chosen"])) for r in rows]
    rejected = [run.prompts.encode_response(_text_of(r["rejected"])) for r in rows]
    length = bucket_length(max(len(p) + max(len(c), len(x)) for p, c, x in zip(prompt_ids, chosen, rejected)),
                           multiple=8)
    cs = _pack(prompt_ids, chosen, length, run.pad)
    rs = _pack(prompt_ids, rejected, length, run.pad)
    bs = cfg.online.batch_size
    total = steps or math.ceil(len(rows) / bs) * cfg.online.epochs
    opt_cfg = cfg.train.optimizer.replace(learning_rate=cfg.online.learning_rate(1), total_steps=total)
    tx = make_optimizer(opt_cfg)
    from jaxselm.model import init_params
    from jaxselm.train import params_shardings_for

    shard = params_shardings_for(mcfg, run.mesh, head="reward")
    if cfg.init.checkpoint and (Path(cfg.init.checkpoint) / "config.json").is_file():
        from jaxselm.hf import load_hf_checkpoint

        _, params = load_hf_checkpoint(cfg.init.checkpoint)
        if "score" not in params:  # a CausalLM: keep the trunk, add a fresh score head
            params = dict(params)
            params.pop("lm_head", None)
            fresh = init_params(mcfg, jax.random.fold_in(run.key, 7), head="reward")
            params["score"] = fresh["score"]
        params = jax.device_put(params, shard)
    else:
        params = jax.jit(lambda k: init_params(mcfg, k, head="reward"), out_shardings=shard)(run.key)
    step_fn = make_reward_model_step(mcfg, cfg.train.replace(optimizer=opt_cfg), tx, run.mesh)
    target = abstract_train_state(mcfg, tx, run.mesh, head="reward")
    state = jax.device_put(create_train_state(params, tx), abstract_sharding(target))
    rng = np.random.default_rng([cfg.run.seed, 0xB7])
    order = np.concatenate([rng.permutation(len(rows)) for _ in range(math.ceil(total * bs / len(rows)) + 1)])
    from jaxselm.online.metrics import MetricsWriter

    metrics = MetricsWriter(Path(cfg.run.output_dir) / "reward_model", tensorboard=cfg.run.tensorboard)
    for s in _progress(range(total), total=total, desc="train-rm", enabled=cfg.run.progress):
        rws = order[s * bs : (s + 1) * bs]
        batch = {"chosen_tokens": cs.tokens[rws], "chosen_mask": cs.mask[rws],
                 "rejected_tokens": rs.tokens[rws], "rejected_mask": rs.mask[rws]}
        state, m = step_fn(state, batch)
        metrics.write("train_rm", s + 1, jax.device_get(m))
    metrics.close()
    out = Path(cfg.run.output_dir) / "reward_model" / "params"
    save_params(out, state.params, overwrite=True)
    last = metrics.read("train_rm")[-1]
    print(f"reward model: {total} steps, final loss {last.get('loss'):.4f}, "
          f"accuracy {last.get('rewards/accuracies', last.get('accuracy', float('nan')))}; saved to {out}")
    return 0


def convert_command(src: str, inp: str, output: str, cfg: RunConfig | None, *, dtype: str | None,
                    head: str) -> int:
    from jaxselm.hf import load_hf_checkpoint, save_hf_checkpoint

    if src == "hf":
        mcfg, params = load_hf_checkpoint(inp, dtype=dtype)
        save_params(output, params)
        write_json(Path(output).with_suffix(".model.json"), mcfg.model_dump(mode="json"))
        print(f"converted {inp} -> {output} ({mcfg.num_params():,} params); model config in "
              f"{Path(output).with_suffix('.model.json')}")
        return 0
    assert cfg is not None
    mcfg = cfg.model
    params = load_params(inp)
    if head == "lm" and "lm_head" not in params and not mcfg.tie_embeddings:
        raise CheckpointError(f"{inp}: params have no lm_head but model.tie_embeddings is false")
    save_hf_checkpoint(mcfg, params, output, dtype=dtype, head=head)
    print(f"converted {inp} -> {output} (HF {head} checkpoint)")
    return 0


def _write_text(path: str, text: str) -> None:
    from jaxselm.online.io import _atomic

    _atomic(Path(path), lambda f: f.write(text.encode("utf-8")))
