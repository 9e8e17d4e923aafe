#!/usr/bin/env bash
# One-command GPU run of the CoPE kernels (e.g. on the H200): correctness, then the benchmark.
#
#   bash benchmarks/gpu_cope.sh            # writes into ${OUT:-bench_out}/
#   bash benchmarks/gpu_cope.sh check      # one step only (check or bench; benchmarks/gpu_all.sh
#                                          # runs them as separate parts)
#
# 1. gpu_check.jsonl: impl="pallas_gpu" (compiled by Triton, not interpreted) and impl="xla" on
#    the GPU against the reference, outputs and gradients wrt q, k, v, E, with the tolerances of
#    tests/kernels/test_cope_impls.py (the test suite itself is CPU-only: its conftest forces 8
#    host devices; this script imports its helpers, so pytest must be installed). Exits
#    non-zero on the first mismatch.
# 2. gpu_cope.jsonl: benchmarks/cope.py at bf16, B=4, H=16, T=4096, D=128, P=64, causal:
#    forward and forward+backward of pallas_gpu, xla, XLA attention and cuDNN flash attention
#    (jax.nn.dot_product_attention), then one ratio line per CoPE impl vs cuDNN flash attention.
#
# COPE_SMOKE=1 (benchmarks/gpu_all.sh --cpu-smoke) runs the same code on any backend with the
# first check case only and a tiny float32 benchmark without the GPU-only impls.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench_out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STEP="${1:-all}"
case "$STEP" in
    all | check | bench) ;;
    *) echo "usage: bash benchmarks/gpu_cope.sh [all|check|bench]" >&2; exit 2 ;;
esac
SMOKE="${COPE_SMOKE:-0}"
export COPE_SMOKE="$SMOKE"

if [[ "$STEP" != bench ]]; then
"$PY" - <<'PYEOF' | tee "$OUT/gpu_check.jsonl"
import json, os, sys, time
import jax, jax.numpy as jnp
sys.path.insert(0, "tests/kernels")
from test_cope_impls import PALLAS_BF16_TOL, TOL, assert_close, make_inputs, run
from jaxselm.kernels.cope import BlockSizes

smoke = os.environ["COPE_SMOKE"] == "1"
assert smoke or jax.default_backend() == "gpu", jax.default_backend()
cases = [
    # b, t, s, h, kv, d, P, dtype, causal, mask, q_offset
    (2, 19, 19, 4, 2, 64, 1, "float32", True, "lengths", None),
    (2, 5, 37, 2, 1, 128, 300, "float32", True, "holes", 9),
    (1, 20, 20, 2, 2, 192, 5, "bfloat16", False, None, None),
    (2, 1000, 1000, 8, 2, 128, 64, "bfloat16", True, "lengths", None),
    (1, 777, 1500, 4, 4, 192, 4096, "float32", False, "holes", None),
    (1, 1024, 1024, 4, 1, 64, 64, "float32", True, None, None),
]
if smoke:
    cases = cases[:1]  # the Pallas GPU kernel runs interpreted off a GPU: one small case
for b, t, s, h, kv, d, npos, dtype, causal, mask, q_offset in cases:
    q, k, v, e, kv_mask = make_inputs(b, t, s, h, kv, d, npos, jnp.dtype(dtype), mask=mask)
    kw = dict(kv_mask=kv_mask, causal=causal, q_offset=q_offset)
    want = run("reference", q, k, v, e, **kw)
    for impl in ("pallas_gpu", "xla"):
        t0 = time.perf_counter()
        got = run(impl, q, k, v, e, **kw)
        tol = PALLAS_BF16_TOL if (dtype == "bfloat16" and impl != "xla") else TOL[dtype]
        assert_close(got, want, tol)  # raises on mismatch
        print(json.dumps({"case": f"check b{b} t{t} s{s} h{h}/{kv} d{d} P{npos} {dtype} "
                          f"causal={causal} mask={mask} q_offset={q_offset}", "impl": impl,
                          "ok": True, "s": round(time.perf_counter() - t0, 2)}), flush=True)
PYEOF
fi
[[ "$STEP" == check ]] && exit 0

if [[ "$SMOKE" == 1 ]]; then
    bench=(--seq-lens 128 --batch 1 --heads 2 --head-dim 32 --dtype float32 --iters 1
        --impls "xla,plain_xla")
else
    bench=(--seq-lens "${SEQ_LENS:-4096}" --batch 4 --heads 16 --head-dim 128 --dtype bfloat16
        --iters 10 --impls "pallas_gpu,xla,plain_xla,plain_cudnn")
fi
"$PY" benchmarks/cope.py --npos 64 "${bench[@]}" | tee "$OUT/gpu_cope.jsonl"

"$PY" - "$OUT/gpu_cope.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
base = {r["case"]: r["ms"] for r in rows if r["impl"] == "plain_cudnn" and r.get("ms")}
for r in rows:
    if r["impl"] in ("pallas_gpu", "xla") and r.get("ms") and r["case"] in base:
        print(json.dumps({"case": r["case"], "impl": r["impl"], "vs": "plain_cudnn",
                          "ratio": round(r["ms"] / base[r["case"]], 3), "tflops": r["tflops"]}))
PYEOF
