"""Can SELM's optimism show exploration? DPO vs SELM (alpha grid, greedy vs sampled y_ref) vs DPO
plus an entropy bonus, with a judge that is actually uncertain.

    python experiments/selm_explore.py                       # the study (docs/results.md)
    python experiments/selm_explore.py --quick --out /tmp/q  # tiny: 2 settings, 1 seed, 1 iteration
    python experiments/selm_explore.py --table-only          # rebuild table + plot from the JSON

Every run is ``jaxselm online --config configs/explore.yaml`` (through
``jaxselm.online.run_online``) with only the setting's keys and ``run.seed`` changed: a harder
sort after a short warm start on mostly wrong demonstrations (low initial accuracy), training
pairs judged by a reward model started from the warm-start policy and refitted each iteration
on a labelling budget (``judge.kind: learned_reward_model``, ``init: policy``), evaluation by
the exact verifier (``eval_judge``).

Settings: DPO (alpha = 0); SELM for each alpha of ``--alphas`` with y_ref the iteration-start
policy's greedy response (``online.refresp: greedy``, the authors' choice), and for each of
``--sampled-alphas`` with y_ref a temperature-1 sample (``first``); DPO plus
``train.entropy_bonus`` for each eta of ``--etas`` (more randomness without optimism; the table
shows their KL next to SELM's, to compare at matched KL); and, as a reference, DPO with the
exact verifier as judge (what a judge without uncertainty gives; ``--no-exact`` leaves it out).

Runs share one process and XLA's persistent compilation cache (in ``--work-dir``), so only the
first run of a shape pays for compiling it.

After each run, every iteration's policy (``policy/iter_t``) is measured with the verifier,
from ``--k`` fresh temperature-1 samples per held-out prompt:

* **reward**: mean verifier score (graded: fraction of positions right) of the samples;
* **pass@1 / pass@k**: a sample right / any of the k right;
* **KL0**: KL(pi_t || pi_0) to the warm start, the mean of log pi_t(y) - log pi_0(y) over the
  samples (true reward against KL is the trade-off SELM claims to improve);
* **unexplored**: on iteration t's own training prompts, the fraction of pi_t's samples that are
  neither that prompt's chosen nor its rejected response (the mass the optimism term is meant to
  push towards responses the judge has not ranked);
* **judge agreement**: how often the learned judge's chosen response is also the verifier's
  better one (ties count half): the judge's reliability.

Tables report the mean and a 95% confidence interval (Student t over seeds). Outputs (``--out``,
default ``experiments/results``): ``selm_explore.json`` (every run; written after each, so an
interrupted study resumes), ``selm_explore.md`` and ``selm_explore.png`` (generated from the JSON
only). Runs live in ``--work-dir`` (default ``runs/experiments/explore``, git-ignored).
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
CONFIG = REPO / "configs" / "explore.yaml"
# Student t quantiles t_{0.975, n-1}, n = number of seeds (1 seed: no interval)
T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 10: 2.262}
EXACT_JUDGE = {"kind": "programmatic", "function": "jaxselm.data.tasks:score"}
COLUMNS = [
    ("reward", "reward"),
    ("pass1", "pass@1"),
    ("passk", "pass@k"),
    ("kl0", "KL0"),
    ("unexplored", "unexplored"),
    ("judge_agreement", "judge agreement"),
]


def settings(
    alphas: list[float], sampled_alphas: list[float], etas: list[float], exact: bool = True
) -> dict[str, dict]:
    """Setting name -> the run-config overrides that make it."""
    out: dict[str, dict] = {"DPO": {"train.alpha": 0.0}}
    for refresp, alist in (("greedy", alphas), ("first", sampled_alphas)):
        for a in alist:
            if a > 0:
                y = "greedy" if refresp == "greedy" else "sampled"
                out[f"SELM a={a:g} y_ref={y}"] = {"train.alpha": a, "online.refresp": refresp}
    for eta in etas:
        out[f"DPO+entropy eta={eta:g}"] = {
            "train.loss": "dpo",
            "train.alpha": 0.0,
            "train.entropy_bonus": eta,
        }
    if exact:  # the reference: what a judge that knows the answer everywhere gives
        out["DPO, exact judge"] = {"train.alpha": 0.0, "judge": EXACT_JUDGE}
    return out


def _overrides(run_dir: Path, seed: int, setting: dict, extra: list[str]) -> list[str]:
    return [
        f"run.output_dir={run_dir}",
        f"run.seed={seed}",
        "run.progress=false",
        "run.tensorboard=false",
        *(f"{k}={json.dumps(v)}" for k, v in setting.items()),
        *extra,
    ]


def analyse(cfg: Any, run_dir: Path, k: int) -> list[dict[str, float]]:
    """The verifier's measures of every iteration's policy (see the module docstring)."""
    import jax
    import numpy as np

    from jaxselm.data import tasks
    from jaxselm.files import read_json
    from jaxselm.online.context import RunContext
    from jaxselm.online.pairs import PairSet
    from jaxselm.online.phases import sequence_logprobs
    from jaxselm.online.rollout import Generation, rollout

    ctx = RunContext.create(cfg, with_judge=False, log=lambda *a, **kw: None)
    p0 = ctx.load_params(run_dir / "policy" / "iter_00")
    evals = ctx.prompts.evaluation()
    out = []
    for t in range(cfg.online.iterations + 1):
        params = p0 if t == 0 else ctx.load_params(run_dir / "policy" / f"iter_{t:02d}")

        def sample(recs, key, params=params):
            gen, _ = rollout(
                ctx,
                params,
                len(recs),
                lambda pos, recs=recs: [recs[int(i)] for i in pos],
                key=key,
                n=k,
                greedy=False,
                temperature=1.0,
                desc="analyse",
            )
            return gen

        gen = sample(evals, jax.random.key(1000 + t))
        resp = gen.responses()  # prompt-major, k per prompt
        texts = [ctx.text(r) for r in resp]
        scores = np.array(
            [tasks.score(evals[i // k]["prompt"], x) for i, x in enumerate(texts)]
        ).reshape(-1, k)
        prompts = [p for p in gen.prompt_ids() for _ in range(k)]
        logp0 = sequence_logprobs(
            ctx, p0, PairSet.of_sequences(prompts, resp, ctx.pad_id), ("chosen",)
        )
        row = {
            "iteration": t,
            "reward": float(scores.mean()),
            "pass1": float((scores >= 1.0 - 1e-9).mean()),
            "passk": float((scores >= 1.0 - 1e-9).any(axis=1).mean()),
            "kl0": float(np.mean(gen.logprobs.sum(-1).reshape(-1) - logp0.chosen)),
        }
        if t > 0:
            d = run_dir / f"iter_{t:02d}"
            judged = read_json(d / "judge.json")
            seen = Generation.load(d / "generate.safetensors").responses()
            n_it = ctx.prompts.iteration_size(t)
            recs = ctx.prompts.iteration(t, list(range(n_it)))
            pairs = {p["prompt_index"]: p for p in judged["pairs"]}
            mine = sample(recs, jax.random.key(2000 + t)).responses()
            fresh = [
                tuple(mine[i * k + j])
                not in {tuple(seen[pairs[i][c]]) for c in ("chosen", "rejected")}
                for i in pairs
                for j in range(k)
            ]
            agree = []
            for i, p in pairs.items():
                sc, sr = (
                    tasks.score(recs[i]["prompt"], ctx.text(seen[p[c]]))
                    for c in ("chosen", "rejected")
                )
                agree.append(1.0 if sc > sr else 0.5 if sc == sr else 0.0)
            row["unexplored"] = float(np.mean(fresh)) if fresh else float("nan")
            row["judge_agreement"] = float(np.mean(agree)) if agree else float("nan")
        out.append(row)
    return out


def run_one(name: str, setting: dict, seed: int, work_dir: Path, k: int, extra: list[str]):
    from jaxselm.config_io import load_config
    from jaxselm.online import run_online
    from jaxselm.online.config import RunConfig

    run_dir = work_dir / f"{name.replace(' ', '_').replace('=', '')}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # always fresh: a stale dir may hold other settings
    cfg = load_config(RunConfig, CONFIG, _overrides(run_dir, seed, setting, extra))
    t0 = time.time()
    run_online(cfg, log=lambda *a, **kw: None)
    t1 = time.time()
    iters = analyse(cfg, run_dir, k)
    return {
        "setting": name,
        "overrides": setting,
        "seed": seed,
        "k": k,
        "iterations": iters,
        "run_wall_s": round(t1 - t0, 1),
        "analyse_wall_s": round(time.time() - t1, 1),
        "run_dir": str(run_dir),
    }


def _ci(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{m:.3f}"
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    t = T975.get(len(xs), 1.96)
    return f"{m:.3f} ± {t * sd / math.sqrt(len(xs)):.3f}"


def make_table(results: dict[str, Any]) -> str:
    runs = results["runs"]
    names = list(dict.fromkeys(r["setting"] for r in runs))
    last = max(len(r["iterations"]) for r in runs) - 1
    lines = [
        f"Final iteration ({last}), mean ± 95% CI over seeds; k = {runs[0]['k']} samples per "
        "held-out prompt. reward - DPO: the difference from DPO's final reward on the same seed "
        "(the same warm start), mean ± 95% CI over seeds: the paired comparison.",
        "",
        "| setting | seeds | " + " | ".join(c for _, c in COLUMNS) + " | reward - DPO |",
        "| --- | --- | " + " | ".join("---" for _ in COLUMNS) + " | --- |",
    ]
    dpo = {r["seed"]: r["iterations"][-1]["reward"] for r in runs if r["setting"] == "DPO"}
    for name in names:
        rs = [r for r in runs if r["setting"] == name]
        cells = [_ci([r["iterations"][-1].get(key) for r in rs]) for key, _ in COLUMNS]
        paired = [r["iterations"][-1]["reward"] - dpo[r["seed"]] for r in rs if r["seed"] in dpo]
        cells.append("-" if name == "DPO" else _ci(paired))
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
    lines += ["", "Per iteration (mean over seeds): true reward / KL0.", ""]
    lines.append("| setting | " + " | ".join(f"iter {t}" for t in range(last + 1)) + " |")
    lines.append("| --- | " + " | ".join("---" for _ in range(last + 1)) + " |")
    for name in names:
        rs = [r for r in runs if r["setting"] == name]
        cells = []
        for t in range(last + 1):
            rw = [r["iterations"][t]["reward"] for r in rs if len(r["iterations"]) > t]
            kl = [r["iterations"][t]["kl0"] for r in rs if len(r["iterations"]) > t]
            cells.append(f"{sum(rw) / len(rw):.3f} / {sum(kl) / len(kl):.3f}" if rw else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    total = sum(r["run_wall_s"] + r["analyse_wall_s"] for r in runs)
    lines += [
        "",
        f"{len(runs)} runs, {total / 60:.1f} min of wall time in total "
        f"(machine: {results.get('machine', '?')}).",
    ]
    return "\n".join(lines) + "\n"


def make_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in dict.fromkeys(r["setting"] for r in results["runs"]):
        rs = [r for r in results["runs"] if r["setting"] == name]
        n = min(len(r["iterations"]) for r in rs)
        kl = [sum(r["iterations"][t]["kl0"] for r in rs) / len(rs) for t in range(n)]
        rw = [sum(r["iterations"][t]["reward"] for r in rs) / len(rs) for t in range(n)]
        ax.plot(kl, rw, marker="o", label=name)
    ax.set_xlabel("KL(pi_t || pi_0)")
    ax.set_ylabel("true reward (verifier)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "selm_explore.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "selm_explore.json")
    (out / "selm_explore.md").write_text(make_table(results))
    make_plot(results, out / "selm_explore.png")


def _floats(csv: str) -> list[float]:
    return [float(x) for x in csv.split(",") if x]


def _compilation_cache(path: Path) -> None:
    """Every run of the study compiles the same steps anew (each run builds its own jitted
    functions); XLA's persistent cache makes that a file read after the first run (on this CPU
    it halves a run's wall time). An explicit JAX_COMPILATION_CACHE_DIR wins."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny: 2 settings, 1 seed, 1 iteration")
    ap.add_argument("--alphas", default="1e-3,1e-2,1e-1,1")
    ap.add_argument(
        "--sampled-alphas",
        default="1e-1,1",
        help="the alphas also run with y_ref a temperature-1 sample (online.refresp: first)",
    )
    ap.add_argument("--etas", default="0.01,0.1")
    ap.add_argument(
        "--no-exact", action="store_true", help="leave out the exact-judge DPO reference"
    )
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "experiments" / "results"))
    ap.add_argument("--work-dir", default=str(REPO / "runs" / "experiments" / "explore"))
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.table_only:
        results = json.loads((out / "selm_explore.json").read_text())
        write_outputs(results, out)
        print(make_table(results))
        return 0
    extra: list[str] = []
    if args.quick:
        args.alphas, args.sampled_alphas, args.etas, args.seeds, args.k = "1", "", "0.1", "0", 2
        args.no_exact = True
        extra = [
            "online.iterations=1",
            "online.learning_rates=[3.0e-4]",
            "online.prompts_per_iteration=16",
            "data.num_eval_prompts=8",
            "sft.steps=10",
            "judge.labels_per_iteration=8",
            "judge.steps=20",
        ]
    grid = settings(
        _floats(args.alphas), _floats(args.sampled_alphas), _floats(args.etas), not args.no_exact
    )
    if args.quick:  # the optimism and the entropy control; DPO is the same code path
        grid.pop("DPO")
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.quick:  # (the quick mode runs inside the tests' process: leave its config be)
        _compilation_cache(Path(args.work_dir) / "xla_cache")
    path = out / "selm_explore.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"runs": []}
    results["machine"] = f"{os.cpu_count()}-core CPU ({sys.platform}), JAX CPU backend"
    done = {(r["setting"], r["seed"]) for r in results["runs"]}
    for seed in seeds:  # seed-major: a cut-short study still has every setting for seed 0
        for name, setting in grid.items():
            if (name, seed) in done:
                print(f"[selm_explore] skip {name} seed {seed} (in {path})", flush=True)
                continue
            rec = run_one(name, setting, seed, Path(args.work_dir), args.k, extra)
            last = rec["iterations"][-1]
            print(
                f"[selm_explore] {name} seed {seed}: reward {last['reward']:.3f} "
                f"pass@{args.k} {last['passk']:.3f} KL0 {last['kl0']:.3f} "
                f"({rec['run_wall_s']} s + {rec['analyse_wall_s']} s)",
                flush=True,
            )
            results["runs"].append(rec)
            write_outputs(results, out)
    write_outputs(results, out)
    print(make_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
