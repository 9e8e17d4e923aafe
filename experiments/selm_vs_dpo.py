"""Iterative DPO (alpha = 0) vs SELM (alpha > 0) on one run config, same budget, several seeds.

    python experiments/selm_vs_dpo.py                        # the CPU demo (docs/results.md)
    python experiments/selm_vs_dpo.py --config configs/smollm2-arithmetic.yaml --alphas 0,1e-3
                                                             # SmolLM2-135M-Instruct (real model)
    python experiments/selm_vs_dpo.py --quick --out /tmp/q   # tiny: 2 alphas, 1 seed, 1 iteration
    python experiments/selm_vs_dpo.py --table-only           # rebuild table + plots from the JSON

Every run is ``jaxselm online --config <config>`` through the library
(``jaxselm.online.run_online(cfg)``) with ``train.alpha`` and ``run.seed`` overridden (and the
config's first learning rate for every iteration), so every setting gets exactly the same budget
(warm start, prompts per iteration, samples, epochs, learning rates); only the optimism weight
alpha differs. SELM's loss adds ``alpha * beta * (log pi(y_ref) - log pi_ref(y_ref))`` to the
DPO loss. The outputs are named after the config (``selm_vs_dpo`` for the demo).

Per iteration it collects, from the run's own ``metrics.jsonl``: sample accuracy and reward (one
sample per held-out prompt at the config's temperature), greedy accuracy, the win rate of this
iteration's samples against the previous iteration's, KL(pi || pi_ref), diversity (distinct
bigrams of the training samples), and an exploration measure, the mean implicit reward of y_ref
during training (``rewards/refresp`` = beta * (log pi(y_ref) - log pi_ref(y_ref)), averaged over
train steps).

Outputs (``--out``, default ``experiments/results``), NAME = ``selm_vs_dpo`` for the demo config,
else the config's stem: ``NAME.json`` (every run's per-iteration metrics; written after each run,
and an interrupted sweep resumes), ``NAME.md`` (tables generated from the JSON) and ``NAME.png``
(plots).
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

METRICS = [  # (key in the iteration record, column name)
    ("eval/sample_accuracy", "sample-acc"),
    ("eval/sample_reward", "sample-reward"),
    ("eval/accuracy", "greedy-acc"),
    ("eval/sample_win_rate", "win-rate"),
    ("eval/kl", "KL"),
    ("samples/distinct_2", "dist-2"),
    ("train/rewards_refresp", "y_ref reward"),
]


def _label(alpha: float) -> str:
    return "DPO (alpha=0)" if alpha == 0 else f"SELM alpha={alpha:g}"


def _iteration_records(run_dir: Path) -> list[dict[str, Any]]:
    recs = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line
    ]
    its = {r["iteration"]: r for r in recs if r.get("kind") == "iteration"}
    out = []
    for t in sorted(its):
        row = {"iteration": t}
        for key, _ in METRICS:
            if key == "train/rewards_refresp":
                vals = [
                    r["rewards/refresp"]
                    for r in recs
                    if r.get("kind") == "train"
                    and r.get("iteration") == t
                    and r.get("rewards/refresp") is not None
                ]
                row[key] = float(sum(vals) / len(vals)) if vals else None
            else:
                row[key] = its[t].get(key)
        out.append(row)
    return out


def run_one(
    alpha: float,
    seed: int,
    iterations: int,
    work_dir: Path,
    extra: list[str],
    config: Path = REPO / "configs" / "demo.yaml",
) -> dict[str, Any]:
    from jaxselm.config_io import load_config
    from jaxselm.online import run_online
    from jaxselm.online.config import RunConfig

    out_dir = work_dir / f"alpha{alpha:g}-s{seed}-it{iterations}"
    shutil.rmtree(out_dir, ignore_errors=True)
    lr = load_config(RunConfig, str(config), extra).online.learning_rate(1)
    lrs = "[" + ", ".join([repr(lr)] * iterations) + "]"
    cfg = load_config(
        RunConfig,
        str(config),
        [
            f"run.output_dir={out_dir}",
            f"run.seed={seed}",
            "run.progress=false",
            "run.tensorboard=false",
            f"train.alpha={alpha!r}",
            # the DPO baseline (alpha 0) scores y_ref too: its y_ref reward is a column
            "train.refresp_metrics=true",
            f"online.iterations={iterations}",
            f"online.learning_rates={lrs}",
            *extra,
        ],
    )
    t0 = time.time()
    run_online(cfg, config_dir=str(config.parent))
    done = json.loads((out_dir / "run.json").read_text())["completed_iterations"]
    if done != iterations:  # e.g. stopped by SIGTERM: it returns 0 with the state saved
        raise SystemExit(
            f"{out_dir}: stopped after iteration {done} of {iterations}; not recorded "
            "(run the same command again)"
        )
    return {
        "alpha": alpha,
        "seed": seed,
        "iterations": iterations,
        "config": config.name,
        "extra_overrides": extra,
        "beta": cfg.train.beta,
        "wall_s": round(time.time() - t0, 1),
        "per_iteration": _iteration_records(out_dir),
        "run_dir": str(out_dir),
    }


def _agg(vals: list[float | None]) -> tuple[float, float] | None:
    xs = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def _curves(results: dict[str, Any]) -> dict[float, dict[str, list[tuple[int, float, float]]]]:
    """alpha -> metric -> [(iteration, mean over seeds, std)], from the JSON only."""
    out: dict[float, dict[str, list[tuple[int, float, float]]]] = {}
    for alpha in sorted({r["alpha"] for r in results["runs"]}):
        runs = [r for r in results["runs"] if r["alpha"] == alpha]
        iters = sorted({p["iteration"] for r in runs for p in r["per_iteration"]})
        out[alpha] = {}
        for key, _ in METRICS:
            pts = []
            for t in iters:
                a = _agg(
                    [p.get(key) for r in runs for p in r["per_iteration"] if p["iteration"] == t]
                )
                if a is not None:
                    pts.append((t, a[0], a[1]))
            out[alpha][key] = pts
    return out


def make_table(results: dict[str, Any]) -> str:
    runs = results["runs"]
    curves = _curves(results)
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        (
            f"Mean over seeds {seeds} (± std over seeds); iteration 0 = the SFT warm start "
            "(identical for every alpha of a seed)."
        ),
        "",
        "| setting | iter | " + " | ".join(c for _, c in METRICS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in METRICS) + " |",
    ]
    for alpha, by_key in curves.items():
        iters = sorted({t for pts in by_key.values() for t, _, _ in pts})
        for t in iters:
            cells = []
            for key, _ in METRICS:
                v = [(m, s) for tt, m, s in by_key[key] if tt == t]
                cells.append(f"{v[0][0]:.3f} ± {v[0][1]:.3f}" if v else "-")
            lines.append(f"| {_label(alpha)} | {t} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Final iteration, per seed (sample-acc / greedy-acc):",
        "",
        "| setting | " + " | ".join(f"seed {s}" for s in seeds) + " | wall s (mean) |",
        "| --- | " + " | ".join("---" for _ in seeds) + " | --- |",
    ]
    for alpha in curves:
        cells = []
        for s in seeds:
            r = [r for r in runs if r["alpha"] == alpha and r["seed"] == s]
            if r and r[0]["per_iteration"]:
                last = r[0]["per_iteration"][-1]
                cells.append(f"{last['eval/sample_accuracy']:.3f} / {last['eval/accuracy']:.3f}")
            else:
                cells.append("-")
        walls = [r["wall_s"] for r in runs if r["alpha"] == alpha]
        lines.append(
            f"| {_label(alpha)} | " + " | ".join(cells) + f" | {sum(walls) / len(walls):.0f} |"
        )
    lines += [
        "",
        (
            f"{len(runs)} runs, {sum(r['wall_s'] for r in runs) / 60:.1f} min of run wall "
            f"time in total (machine: {results.get('machine', '?')})."
        ),
    ]
    return "\n".join(lines) + "\n"


def make_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _curves(results)
    ncols = 4
    nrows = math.ceil(len(METRICS) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.7 * nrows), squeeze=False)
    flat = axes.ravel()
    for ax in flat[len(METRICS) :]:
        ax.axis("off")
    for ax, (key, name) in zip(flat, METRICS):
        for alpha, by_key in curves.items():
            pts = by_key[key]
            if not pts:
                continue
            xs, ms, ss = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
            ax.errorbar(xs, ms, yerr=ss, marker="o", ms=3, capsize=2, label=_label(alpha))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    flat[0].legend(fontsize=6)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=70)
    plt.close(fig)
    os.replace(tmp, path)


def output_name(config: Path) -> str:
    return "selm_vs_dpo" if config.name == "demo.yaml" else config.stem


def write_outputs(results: dict[str, Any], out: Path, name: str = "selm_vs_dpo") -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{name}.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / f"{name}.json")
    (out / f"{name}.md").write_text(make_table(results))
    make_plot(results, out / f"{name}.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny: alpha 0 and 1e-3, one seed, one iteration of 32 prompts",
    )
    ap.add_argument("--alphas", default="0,1e-3,1e-2,1e-1")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "experiments" / "results"))
    ap.add_argument("--work-dir", default=None, help="default: runs/experiments/<name>")
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument(
        "--table-only", action="store_true", help="rebuild table and plot from the JSON"
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    config = Path(args.config).resolve()
    name = output_name(config)
    work_dir = Path(args.work_dir or REPO / "runs" / "experiments" / name)
    if args.table_only:
        results = json.loads((out / f"{name}.json").read_text())
        write_outputs(results, out, name)
        print(make_table(results))
        return 0
    extra: list[str] = []
    if args.quick:
        args.alphas, args.seeds, args.iterations = "0,1e-3", "0", 1
        extra = [
            "sft.steps=20",
            "online.prompts_per_iteration=32",
            "data.num_eval_prompts=32",
            "online.epochs=1",
        ]
    alphas = [float(a) for a in args.alphas.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    path = out / f"{name}.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"runs": []}
    results["machine"] = f"{os.cpu_count()}-core CPU ({sys.platform}), JAX CPU backend"
    results["config"] = config.name
    done = {
        (r["alpha"], r["seed"], r["iterations"], tuple(r["extra_overrides"]))
        for r in results["runs"]
    }
    for seed in seeds:  # seed-major: a cut-short sweep still has every alpha for seed 0
        for alpha in alphas:
            if (alpha, seed, args.iterations, tuple(extra)) in done:
                print(f"[{name}] skip alpha {alpha:g} seed {seed} (in {path})", flush=True)
                continue
            rec = run_one(alpha, seed, args.iterations, work_dir, extra, config)
            last = rec["per_iteration"][-1]
            print(
                f"[{name}] {_label(alpha)} seed {seed}: sample-acc "
                f"{last['eval/sample_accuracy']:.3f} greedy-acc {last['eval/accuracy']:.3f} "
                f"({rec['wall_s']} s)",
                flush=True,
            )
            results["runs"].append(rec)
            write_outputs(results, out, name)
    write_outputs(results, out, name)
    print(make_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
