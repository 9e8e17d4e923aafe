#!/usr/bin/env bash
# Every accelerator measurement still to do, in one command (one H200: about 8 minutes at most):
#
#   bash benchmarks/gpu_all.sh                # -> ${OUT:-bench_out}/gpu_all.json
#   bash benchmarks/gpu_all.sh --cpu-smoke    # same Python code paths, tiny shapes, CPU, < 2 min
#
# Parts, in order, each under its own timeout (seconds in PARTS below): a part that fails or times
# out is recorded with its exit status and the tail of its stderr, and the next part runs.
#
#   env               jax / jaxlib versions, the device, whether Pallas' Triton and Mosaic GPU
#                     backends import (jax 0.11 deprecates Triton in favour of Mosaic GPU: the
#                     CoPE pallas_gpu kernel is Triton; if it no longer lowers, cope_check fails
#                     and cope_bench reports its rows as errors, the other parts are unaffected)
#   cope_check        benchmarks/gpu_cope.sh check: CoPE pallas_gpu and xla vs the reference
#   cope_bench        benchmarks/gpu_cope.sh bench: CoPE vs cuDNN flash attention, bf16,
#                     B=4, H=16, T=4096, D=128, P=64, forward and forward+backward
#   attention_check   tests/kernels/test_attention_impls.py's cuDNN cases (key lengths + window,
#                     non-causal, left padding -> fallback) through cuDNN, bf16 and fp16, and
#                     its blockwise cases, outputs and gradients vs xla, the tests' tolerances
#   attention         benchmarks/attention.py, same shape: masked_attention xla / blockwise /
#                     cudnn / auto, timings plus each one's parity with xla (out, dq, dk, dv)
#   attention_padded  cudnn with right-padded rows (its key-length branch and the lax.cond) and
#                     with left-padded rows (the fallback branch), forward+backward, vs xla
#   mfu               benchmarks/train_step.py: the llama-1b SELM train step in bf16 (B=4,
#                     T=2048, attention_impl=auto), its MFU against the H200's 989 TFLOP/s
#   decode            benchmarks/generate.py: llama-1b, B=64, 256 new tokens, decode step time
#                     against the HBM roofline (4.8 TB/s)
#
# Every part's JSON lines, the part's rc / seconds / stderr tail, the jax version and the device
# are merged into ONE file, $OUT/gpu_all.json; the raw files stay in $OUT/gpu_all/.
# GPU_ALL_ONLY="mfu decode" runs only those parts (env always runs: the file names the device);
# GPU_ALL_TIMEOUT_PCT=150 scales every timeout (e.g. on a slower device, or with more budget).
set -uo pipefail # no -e: a failing part must not stop the others
cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-bench_out}"
PY="${PYTHON:-python}"
SMOKE=0
case "${1:-}" in
    --cpu-smoke) SMOKE=1 ;;
    "") ;;
    *)
        echo "usage: bash benchmarks/gpu_all.sh [--cpu-smoke]" >&2
        exit 2
        ;;
esac
DIR="$OUT/gpu_all"
rm -rf "$DIR"
mkdir -p "$DIR"
if [[ "$SMOKE" == 1 ]]; then
    export JAX_PLATFORMS=cpu
else
    export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export COPE_SMOKE="$SMOKE"

# name:timeout_seconds, in order; the timeouts add up to 480 s (8 minutes).
PARTS=(env:20 cope_check:90 cope_bench:70 attention_check:40 attention:70 attention_padded:40
    mfu:90 decode:60)

# The command of each part (full size, or tiny shapes with --cpu-smoke).
part_command() {
    local big=$((1 - SMOKE))
    case "$1" in
        env) cmd=("$PY" -c "$ENV_PY") ;;
        cope_check) cmd=(env OUT="$DIR/cope" bash benchmarks/gpu_cope.sh check) ;;
        cope_bench) cmd=(env OUT="$DIR/cope" bash benchmarks/gpu_cope.sh bench) ;;
        attention_check) cmd=("$PY" -c "$ATTENTION_CHECK_PY") ;;
        attention | attention_padded)
            if ((big)); then
                cmd=("$PY" benchmarks/attention.py --seq-lens 4096 --batch 4 --heads 16
                    --head-dim 128 --dtype bfloat16 --iters 10 --check)
                impls=xla,blockwise,cudnn,auto padded=cudnn
            else
                cmd=("$PY" benchmarks/attention.py --seq-lens 256 --batch 1 --heads 4
                    --kv-heads 2 --head-dim 32 --dtype float32 --iters 1 --check)
                impls=xla,blockwise,auto padded=blockwise
            fi
            if [[ "$1" == attention ]]; then
                cmd+=(--impls "$impls")
            else
                # Two runs in one part: right padding (cuDNN's own branch), then left padding
                # (its lax.cond fallback), forward+backward only, each checked against xla.
                cmd=(bash -c '"$@" --mask right && "$@" --mask left' _ "${cmd[@]}"
                    --modes fwd_bwd --impls "$padded")
            fi
            ;;
        mfu)
            if ((big)); then
                cmd=("$PY" benchmarks/train_step.py --presets llama-1b --meshes auto --batch 4
                    --seq-len 2048 --dtype bfloat16 --iters 3)
            else
                cmd=("$PY" benchmarks/train_step.py --presets tiny --meshes 1x1x1 --batch 2
                    --seq-len 32 --iters 1)
            fi
            ;;
        decode)
            if ((big)); then
                cmd=("$PY" benchmarks/generate.py --presets llama-1b --batches 64
                    --new-tokens 256 --iters 2 --no-naive)
            else
                cmd=("$PY" benchmarks/generate.py --presets tiny --batches 2 --new-tokens 8
                    --iters 1 --no-naive --roofline)
            fi
            ;;
        *) return 1 ;;
    esac
}

ENV_PY='
import importlib, json, platform
import jax, jaxlib

def imports(name):
    try:
        importlib.import_module(name)
        return True
    except Exception as err:  # ImportError, or a backend that fails to initialise
        return f"{type(err).__name__}: {err}"[:200]

dev = jax.devices()[0]
print(json.dumps({"case": "env", "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                  "backend": jax.default_backend(), "device": dev.device_kind,
                  "devices": jax.device_count(), "python": platform.python_version(),
                  "pallas_triton": imports("jax.experimental.pallas.triton"),
                  "pallas_mosaic_gpu": imports("jax.experimental.pallas.mosaic_gpu"),
                  "splash": imports("jax.experimental.pallas.ops.tpu.splash_attention")}))
'

if [[ -n "${GPU_ALL_ONLY:-}" ]]; then
    chosen=(env:20)
    for entry in "${PARTS[@]}"; do
        [[ " ${GPU_ALL_ONLY//,/ } " == *" ${entry%%:*} "* && "$entry" != env:* ]] && chosen+=("$entry")
    done
    PARTS=("${chosen[@]}")
fi

# masked_attention parity on the device: the test module's cases (it is CPU-only under pytest).
ATTENTION_CHECK_PY='
import json, os, sys, time
import jax
sys.path.insert(0, "tests/kernels")
import test_attention_impls as t

on_gpu = jax.default_backend() == "gpu"
cudnn = t.impl("cudnn") if on_gpu else t.cudnn_via_jax_nn_xla  # off a GPU: the translation only
dtypes = ["bfloat16"] if on_gpu else ["float32"]
runs = [("cudnn" if on_gpu else "cudnn_via_jax_nn_xla", cudnn, case, dtype)
        for case in t.CUDNN_CASES for dtype in dtypes]
if on_gpu:
    runs.append(("cudnn", cudnn, t.CUDNN_CASES[0], "float16"))
runs += [("blockwise", t.impl("blockwise"), t.CASES[i], "bfloat16") for i in (0, 4)]
failed = 0
for name, fn, case, dtype in runs:
    t0 = time.perf_counter()
    rec = {"case": f"check {case} {dtype}", "impl": name, "vs": "xla"}
    try:
        args, kw = t.case_inputs(case, dtype)
        tol = t.TOL.get(dtype, t.TOL["bfloat16"])  # float16 (eps 2^-10): the bfloat16 one, looser
        t.assert_close(t.run(fn, *args, **kw), t.run(t.xla, *args, **kw), tol)
        rec["ok"] = True
    except Exception as err:  # report every case, then fail the part
        rec.update(ok=False, error=f"{type(err).__name__}: {str(err)[:300]}")
        failed += 1
    rec["s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(rec), flush=True)
sys.exit(1 if failed else 0)
'

for entry in "${PARTS[@]}"; do
    name="${entry%%:*}"
    limit=$((${entry##*:} * ${GPU_ALL_TIMEOUT_PCT:-100} / 100))
    cmd=()
    part_command "$name"
    echo "== gpu_all: $name (timeout ${limit}s)" >&2
    start=$SECONDS
    timeout --kill-after=10 "$limit" "${cmd[@]}" >"$DIR/$name.jsonl" 2>"$DIR/$name.err"
    rc=$?
    echo "$rc $((SECONDS - start)) $limit" >"$DIR/$name.status"
    cat "$DIR/$name.jsonl"
    echo "== gpu_all: $name rc=$rc ($((SECONDS - start)) s)$( ((rc == 124)) && echo ', timed out')" >&2
done

# One JSON file: {"jax", "device", ..., "parts": {name: {"rc", "seconds", "rows", ...}}}.
"$PY" - "$DIR" "$OUT/gpu_all.json" "$SMOKE" "${PARTS[@]}" <<'PYEOF'
import json, sys, time
from pathlib import Path

folder, dest, smoke, entries = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]
result = {"smoke": smoke, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "parts": {}}
for entry in entries:
    name = entry.split(":")[0]
    status = folder / f"{name}.status"
    rc, seconds, limit = map(int, status.read_text().split()) if status.exists() else [None] * 3
    rows, other = [], []
    out = folder / f"{name}.jsonl"
    for line in out.read_text().splitlines() if out.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            other.append(line)  # not a JSON line (a print from a library): keep it, apart
    err = folder / f"{name}.err"
    tail = err.read_text(errors="replace").splitlines()[-20:] if err.exists() else []
    bad = [r for r in rows if "error" in r or r.get("ok") is False]
    part = {"rc": rc, "seconds": seconds, "timeout_s": limit, "timed_out": rc in (124, 137),
            "rows_with_errors": len(bad), "rows": rows, "stderr_tail": tail}
    if other:
        part["other_stdout"] = other[-20:]
    result["parts"][name] = part
env = next(iter(result["parts"].get("env", {}).get("rows", [])), {})
for key in ("jax", "jaxlib", "backend", "device", "devices"):
    result[key] = env.get(key)
dest.write_text(json.dumps(result, indent=1) + "\n")
failed = [n for n, p in result["parts"].items() if p["rc"] != 0 or p["rows_with_errors"]]
print(json.dumps({"case": "gpu_all", "file": str(dest), "device": result["device"],
                  "jax": result["jax"], "failed_parts": failed}))
PYEOF
