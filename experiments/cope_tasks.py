"""CoPE paper's toy tasks at CPU scale: RoPE vs NoPE vs CoPE vs CoPE+rel (and CoPE+RoPE, learned
absolute positions), ID and OOD.

    python experiments/cope_tasks.py                      # the full run (docs/results.md)
    python experiments/cope_tasks.py --quick --out /tmp/q # tiny: one task, one seed, few steps
    python experiments/cope_tasks.py --table-only         # rebuild the markdown table from the JSON
    python experiments/cope_tasks.py --merge OTHER/cope_tasks.json  # add a parallel sweep's runs

For every (task, position, seed) it trains the model of ``configs/cope-<task>.yaml`` with
supervised learning (``jaxselm sft`` through the library: ``jaxselm.online.run_sft(cfg)``) on
the task's in-distribution (ID) settings, evaluates greedy answers on held-out test prompts (the
run's own ``eval/accuracy``), then evaluates the same trained parameters on each
out-of-distribution (OOD) setting: a run with ``init.checkpoint`` = the trained policy,
``sft.steps=0`` and the OOD task settings (same vocabulary, so the same tokenizer). Test error =
100 * (1 - exact-answer accuracy).

The tasks follow the official code: counting is RAM's generator (count_data_gen.py); selective
copy has 32 data tokens among 32 blanks, OOD 16 and 64 blanks; Flip-Flop has 128 instructions
and is trained on the bit of every read. CoPE is RAM's default (scaled) variant; ``cope+rel``
is RAM's CoPE plus a learned relative bias.

Outputs (``--out``, default ``experiments/results``): ``cope_tasks.json`` (every run, written
after each run so an interrupted sweep keeps what it finished and resumes) and
``cope_tasks.md`` (the table, generated from the JSON only). Runs live in ``--work-dir``
(default ``runs/experiments/cope``, git-ignored).

The paper's "absolute" baseline is ``--positions absolute`` (``model.position=absolute``: a learned
``[max_position_embeddings, hidden]`` table added to the token embeddings, GPT-2 style, indexed
by the same real-token position ids as RoPE).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# In-distribution settings (the configs' own) and the out-of-distribution ones (same vocabulary).
TASKS: dict[str, dict[str, Any]] = {
    "count": {
        "config": "configs/cope-count.yaml",
        # RAM's generator (count_data_gen.py), 3 variables, programs of 3-32 statements
        "id": {"num_vars": 3, "min_ops": 3, "max_ops": 32},
        # longer programs: 33-64 statements
        "ood": {"longer": {"num_vars": 3, "min_ops": 33, "max_ops": 64}},
        "id_desc": "3 vars, 3-32 statements",
    },
    "copy": {
        "config": "configs/cope-copy.yaml",
        "id": {"vocab_size": 16, "num_tokens": 32, "num_blanks": 32},
        # the paper: 256 data tokens, 256 blanks ID, 128 and 512 OOD
        "ood": {
            "fewer": {"vocab_size": 16, "num_tokens": 32, "num_blanks": 16},
            "more": {"vocab_size": 16, "num_tokens": 32, "num_blanks": 64},
        },
        "id_desc": "32 data tokens, 32 blanks",
    },
    "flipflop": {
        "config": "configs/cope-flipflop.yaml",
        # 128 instructions, loss on the bit of every read (Liu et al.'s language-modelling setup)
        "id": {"length": 128, "p_ignore": 0.8, "loss_on_reads": True},
        # sparser: the paper's OOD p(ignore) = 0.98
        "ood": {"sparse": {"length": 128, "p_ignore": 0.98, "loss_on_reads": True}},
        "id_desc": "128 instructions, p(ignore) 0.8",
    },
}
OOD_DESC = {
    "longer": "33-64 statements",
    "fewer": "16 blanks",
    "more": "64 blanks",
    "sparse": "p(ignore) 0.98",
}

# The paper's test error (%), as restated in MISSION.md (Golovneva et al. 2024). Only what the
# paper reports for these settings; "relative" is the paper's relative-position baseline.
PAPER = {
    "copy": "ID (256 + 256): absolute 16.9, RoPE 40.1, CoPE 0.0",
    "count": "3 variables, up to 512 statements: absolute 67.6, relative 17.8, CoPE 1.2",
    "flipflop": "OOD: absolute 21.7, RoPE 20.3, CoPE 4.9",
}
PAPER_BY_POS = {
    ("copy", "rope"): "40.1 (ID)",
    ("copy", "cope"): "0.0 (ID)",
    ("copy", "absolute"): "16.9 (ID)",
    ("count", "rope"): "17.8 (relative)",
    ("count", "cope"): "1.2",
    ("count", "absolute"): "67.6",
    ("flipflop", "rope"): "20.3 (OOD)",
    ("flipflop", "cope"): "4.9 (OOD)",
    ("flipflop", "absolute"): "21.7 (OOD)",
}
POS_NAMES = {
    "rope": "RoPE",
    "none": "NoPE",
    "cope": "CoPE",
    "cope+rel": "CoPE+rel",
    "cope+rope": "CoPE+RoPE",
    "absolute": "absolute",
}


def _run_key(r: dict[str, Any]) -> tuple:
    return (r["task"], r["position"], r["seed"], r["steps"])


def _overrides(
    task: str,
    settings: dict[str, Any],
    out_dir: Path,
    seed: int,
    position: str,
    steps: int,
    num_eval: int,
    extra: list[str],
) -> list[str]:
    return [
        f"run.output_dir={out_dir}",
        f"run.seed={seed}",
        "run.progress=false",
        "run.tensorboard=false",
        f"model.position={position}",
        f"data.task_settings={json.dumps(settings)}",
        f"data.num_eval_prompts={num_eval}",
        f"sft.steps={steps}",
        f"online.checkpoint_every={max(steps, 1) * 10}",  # no mid-run checkpoints: plain timing
        *extra,
    ]


def _eval_metric(run_dir: Path, key: str = "eval/accuracy") -> float:
    """A metric of the run's evaluation (iteration 0): exact accuracy, or ``eval/reward``, the
    task's graded score (copy: the fraction of positions right; count, flipflop: exact)."""
    recs = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line
    ]
    it0 = [r for r in recs if r.get("kind") == "iteration" and r.get("iteration") == 0]
    if not it0:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no iteration-0 record")
    return float(it0[-1][key])


def train_and_eval(
    task: str, position: str, seed: int, steps: int, num_eval: int, work_dir: Path
) -> dict[str, Any]:
    """One (task, position, seed): SFT + ID eval, then each OOD eval of the same parameters."""
    from jaxselm.config_io import load_config
    from jaxselm.data.tasks import make_task
    from jaxselm.online import run_sft
    from jaxselm.online.config import RunConfig

    spec = TASKS[task]
    for ood in spec["ood"].values():
        if make_task(task, **spec["id"]).vocab() != make_task(task, **ood).vocab():
            raise RuntimeError(f"{task}: OOD settings change the vocabulary")

    name = f"{task}-{position.replace('+', '_')}-s{seed}-n{steps}"
    id_dir = work_dir / name
    ood_dirs = {k: work_dir / f"{name}-ood-{k}" for k in spec["ood"]}
    for d in (id_dir, *ood_dirs.values()):  # always fresh (a stale dir with other settings is
        shutil.rmtree(d, ignore_errors=True)  # refused)
    cfg_path = str(REPO / spec["config"])

    t0 = time.time()
    cfg = load_config(
        RunConfig,
        cfg_path,
        _overrides(task, spec["id"], id_dir, seed, position, steps, num_eval, []),
    )
    run_sft(cfg)
    t1 = time.time()
    # OOD: the trained policy, no training, OOD prompts (same vocabulary and answer length, so
    # the same tokenizer and max_new_tokens).
    for k, settings in spec["ood"].items():
        init = [f"init.checkpoint={id_dir / 'policy' / 'iter_00'}"]
        run_sft(
            load_config(
                RunConfig,
                cfg_path,
                _overrides(task, settings, ood_dirs[k], seed, position, 0, num_eval, init),
            )
        )
    t2 = time.time()
    id_acc = _eval_metric(id_dir)
    ood_acc = {k: _eval_metric(d) for k, d in ood_dirs.items()}
    return {
        "task": task,
        "position": position,
        "seed": seed,
        "steps": steps,
        "num_eval_prompts": num_eval,
        "id_settings": spec["id"],
        "ood_settings": spec["ood"],
        "id_accuracy": id_acc,
        "ood_accuracy": ood_acc,
        "id_error": 100.0 * (1.0 - id_acc),
        "ood_error": {k: 100.0 * (1.0 - a) for k, a in ood_acc.items()},
        # the graded score: for copy, the share of answer positions right
        "id_score": _eval_metric(id_dir, "eval/reward"),
        "ood_score": {k: _eval_metric(d, "eval/reward") for k, d in ood_dirs.items()},
        "train_wall_s": round(t1 - t0, 1),
        "ood_eval_wall_s": round(t2 - t1, 1),
        "run_dir": str(id_dir),
    }


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{m:.1f}"
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return f"{m:.1f} ± {sd:.1f}"


def make_table(results: dict[str, Any]) -> str:
    """The markdown table, computed from the JSON results only."""
    runs = results["runs"]
    lines = [
        "| task | ID setting | position | seeds | steps | ID error % | OOD error % "
        "| per-seed ID / OOD | positions right % ID / OOD | paper (test error %) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    tasks = [t for t in TASKS if any(r["task"] == t for r in runs)]
    for task in tasks:
        positions = [
            p for p in POS_NAMES if any(r["task"] == task and r["position"] == p for r in runs)
        ]
        groups = [
            (n, p)
            for n in sorted({r["steps"] for r in runs if r["task"] == task})
            for p in positions
        ]
        for steps, pos in groups:  # one row per (steps, position): seeds are averaged, nothing else
            rs = sorted(
                (
                    r
                    for r in runs
                    if r["task"] == task and r["position"] == pos and r["steps"] == steps
                ),
                key=lambda r: r["seed"],
            )
            if not rs:
                continue
            oods = list(rs[0]["ood_error"])
            ood_cell = "; ".join(
                f"{OOD_DESC.get(k, k)}: {_mean_std([r['ood_error'][k] for r in rs])}" for k in oods
            )
            per_seed = ", ".join(
                f"{r['id_error']:.1f} / " + " / ".join(f"{r['ood_error'][k]:.1f}" for k in oods)
                for r in rs
            )
            scored = [r for r in rs if "id_score" in r]
            score = "-"
            if task == "copy" and scored:  # graded: only copy's answers have several positions
                score = f"{_mean_std([100 * r['id_score'] for r in scored])} / " + " / ".join(
                    _mean_std([100 * r["ood_score"][k] for r in scored]) for k in oods
                )
            lines.append(
                f"| {task} | {TASKS[task]['id_desc']} | {POS_NAMES[pos]} | "
                f"{','.join(str(r['seed']) for r in rs)} | {steps} | "
                f"{_mean_std([r['id_error'] for r in rs])} | {ood_cell} | "
                f"{per_seed} | {score} | {PAPER_BY_POS.get((task, pos), '-')} |"
            )
    lines.append("")
    lines.append(
        "Paper's numbers (restated in MISSION.md), full scale: "
        + "; ".join(f"{t}: {PAPER[t]}" for t in tasks)
        + ". CoPE is RAM's default (position logits scaled with the content logits, "
        "model.cope_scaled=true); CoPE+rel adds RAM's learned relative-position bias."
    )
    lines.append("")
    total = sum(r["train_wall_s"] + r["ood_eval_wall_s"] for r in runs)
    lines.append(
        f"{len(runs)} runs, {total / 60:.1f} min of run wall time in total "
        f"(machine: {results.get('machine', '?')})."
    )
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "cope_tasks.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "cope_tasks.json")
    (out / "cope_tasks.md").write_text(make_table(results))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny: count task, RoPE and CoPE, one seed, 20 steps, 32 eval prompts",
    )
    ap.add_argument("--tasks", default="count,copy,flipflop")
    ap.add_argument("--positions", default="rope,none,cope,cope+rel")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--num-eval", type=int, default=256)
    ap.add_argument("--out", default=str(REPO / "experiments" / "results"))
    ap.add_argument("--work-dir", default=str(REPO / "runs" / "experiments" / "cope"))
    ap.add_argument("--table-only", action="store_true", help="rebuild cope_tasks.md from the JSON")
    ap.add_argument(
        "--merge",
        metavar="OTHER_JSON",
        help="add the runs of another cope_tasks.json (a sweep run in parallel into "
        "another --out) that are not in --out's JSON, and rebuild the table",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.merge:
        results = json.loads((out / "cope_tasks.json").read_text())
        have = {_run_key(r) for r in results["runs"]}
        new = [
            r for r in json.loads(Path(args.merge).read_text())["runs"] if _run_key(r) not in have
        ]
        results["runs"].extend(new)
        write_outputs(results, out)
        print(f"[cope_tasks] merged {len(new)} runs from {args.merge}")
        print(make_table(results))
        return 0
    if args.table_only:
        results = json.loads((out / "cope_tasks.json").read_text())
        (out / "cope_tasks.md").write_text(make_table(results))
        print(make_table(results))
        return 0
    if args.quick:
        args.tasks, args.positions, args.seeds, args.steps, args.num_eval = (
            "count",
            "rope,cope",
            "0",
            20,
            32,
        )
    tasks = args.tasks.split(",")
    positions = args.positions.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    for t in tasks:
        if t not in TASKS:
            ap.error(f"--tasks: unknown task {t!r} (known: {sorted(TASKS)})")
    for p in positions:
        if p not in POS_NAMES:
            ap.error(f"--positions: unknown position {p!r} (known: {sorted(POS_NAMES)})")

    path = out / "cope_tasks.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"runs": []}
    results["machine"] = f"{os.cpu_count()}-core CPU ({sys.platform}), JAX CPU backend"
    done = {_run_key(r) for r in results["runs"]}
    for seed in seeds:  # seed-major: a cut-short sweep still has every task and position for seed 0
        for task in tasks:
            for pos in positions:
                if (task, pos, seed, args.steps) in done:
                    print(f"[cope_tasks] skip {task} {pos} seed {seed} (in {path})", flush=True)
                    continue
                rec = train_and_eval(
                    task, pos, seed, args.steps, args.num_eval, Path(args.work_dir)
                )
                oods = "  ".join(f"OOD {k} {e:.1f}%" for k, e in rec["ood_error"].items())
                print(
                    f"[cope_tasks] {task} {pos} seed {seed}: ID error {rec['id_error']:.1f}%  "
                    f"{oods}  ({rec['train_wall_s']} s + {rec['ood_eval_wall_s']} s)",
                    flush=True,
                )
                results["runs"].append(rec)
                write_outputs(results, out)
    write_outputs(results, out)
    print(make_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
