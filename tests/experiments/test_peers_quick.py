"""benchmarks/peers.py --quick (jaxselm vs transformers / hand-written PyTorch / TRL on one tiny
random Llama): every line is JSON, nothing fails, the docs table comes from the results file, and
the preference steps of both frameworks compute the same losses step by step.

Timing is not checked (benchmarks measure, tests do not). Tolerance of the loss comparison: both
sides start from the same float32 weights and batch; they differ only in summation order (XLA vs
ATen matmuls, logsumexp over the 49152-word vocabulary, sums over the response tokens). Summed
log-probs (~ -260) agree to ~5e-5 (observed); the loss moves by at most beta = 0.1 times the
error of the 4-log-prob margin, ~2e-5, and AdamW at lr 1e-3 keeps the next two steps in that
range (observed <= 2e-6 over three steps). LOSS_ATOL = 1e-4 leaves that margin, while a real
mismatch - a missing or mis-scaled SELM term (alpha = 0.1 in --quick), a mean taken as a sum,
no clipping, a different AdamW - changes the second step's loss by > 1e-3.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOSS_ATOL = 1e-4

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.mark.slow
def test_peers_quick_gen_and_step(tmp_path):
    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, str(REPO / "benchmarks" / "peers.py"), "--quick"]
    cmd += ["--cases", "gen,step", "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=dict(os.environ)
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.strip()]
    assert [json.loads(x) for x in out.read_text().splitlines()] == lines  # stdout == --out

    for rec in lines:
        assert "error" not in rec, rec
        assert rec["bench"] == "peers" and rec["quick"] is True
    meas = [r for r in lines if r["kind"] == "measurement"]
    sums = {r["case"]: r for r in lines if r["kind"] == "summary"}
    assert set(sums) == {"gen B=2 M=8 sample", "dpo_step pairs=2 T=32", "selm_step pairs=2 T=32"}
    try:
        import trl  # noqa: F401

        has_trl = True
    except ImportError:
        has_trl = False

    for case, s in sums.items():
        impls = {r["impl"] for r in meas if r["case"] == case}
        expected = {"jaxselm", "torch"} | ({"trl"} if has_trl and case.startswith("dpo") else set())
        assert impls == expected, (case, impls)
        for impl in expected:
            v = s["impls"][impl]
            assert v["n"] == 1 and v["tokens_per_s"] > 0 and v["peak_rss_mb"] > 0, (case, impl)
    gen = [r for r in meas if r["case"].startswith("gen")]
    assert all(r["generated_tokens"] == 2 * 8 for r in gen)  # EOS ignored on both sides

    for case in ("dpo_step pairs=2 T=32", "selm_step pairs=2 T=32"):
        s = sums[case]
        jax_losses = s["jaxselm_losses"]
        assert len(jax_losses) == 3 and jax_losses[2] < jax_losses[0]  # it trains
        others = ["torch"] + (["trl"] if has_trl and case.startswith("dpo") else [])
        for impl in others:
            agree = s["agreement"][impl]
            assert agree["steps_compared"] == 3, (case, impl, agree)
            assert agree["loss_max_abs_diff"] < LOSS_ATOL, (case, impl, agree, jax_losses)
    # The SELM term is visible: SELM and DPO losses part after the first update.
    dpo, selm = sums["dpo_step pairs=2 T=32"], sums["selm_step pairs=2 T=32"]
    assert abs(dpo["jaxselm_losses"][1] - selm["jaxselm_losses"][1]) > 10 * LOSS_ATOL

    table = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "peers.py"), "--table", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert table.returncode == 0, table.stderr
    assert "| gen B=2 M=8 sample | jaxselm |" in table.stdout
    assert "| selm_step pairs=2 T=32 | torch |" in table.stdout
