"""Preemption: a run killed (SIGKILL) while generating, judging or training, and one stopped with
SIGTERM, resumes and ends with exactly the parameters and metrics of an uninterrupted run.

Faults are injected with JAXSELM_FAULT_AT (the process signals itself at a named point), so the
kill lands in the intended phase on any machine speed. CPU runs are deterministic, so equality is
exact.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_run import write_tiny_run


def _write_config(tmp: Path, name: str) -> Path:
    return write_tiny_run(tmp, name, tmp / name, judge="resume_judge")


def _run(
    cfg: Path, fault: str | None = None, signal_name: str | None = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # No PYTHONPATH: the judge module next to the config file is found there.
    env.pop("JAXSELM_FAULT_AT", None)
    env.pop("JAXSELM_FAULT_SIGNAL", None)
    if fault:
        env["JAXSELM_FAULT_AT"] = fault
    if signal_name:
        env["JAXSELM_FAULT_SIGNAL"] = signal_name
    return subprocess.run(
        [sys.executable, "-m", "jaxselm", "online", "--config", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _params(run_dir: Path, t: int) -> dict[str, np.ndarray]:
    import jax

    from jaxselm.train import load_params

    tree = load_params(run_dir / "policy" / f"iter_{t:02d}")
    return {
        jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def _metrics(run_dir: Path) -> list[dict]:
    """The metric records that must be reproduced exactly: all but the phases' wall times."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] != "time"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("online")
    cfg = _write_config(tmp, "ref")
    res = _run(cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "ref", res


@pytest.mark.slow
def test_end_to_end_outputs(uninterrupted):
    out, res = uninterrupted
    for t in range(3):
        assert (out / "policy" / f"iter_{t:02d}").is_dir()
        assert (out / f"iter_{t:02d}" / "eval.json").is_file()
    assert (out / "metrics.png").is_file() and (out / "metrics.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    recs = _metrics(out)
    its = [r for r in recs if r["kind"] == "iteration"]
    assert [r["iteration"] for r in its] == [0, 1, 2]
    assert (
        all("eval/reward" in r for r in its) and "eval/win_rate" in its[1] and "eval/kl" in its[2]
    )
    assert len([r for r in recs if r["kind"] == "train"]) > 0
    assert "sample-acc" in res.stdout and "win-rate" in res.stdout  # the printed table


@pytest.mark.slow
def test_killed_in_every_phase_then_resumed_equals_uninterrupted(uninterrupted, tmp_path):
    ref_dir, _ = uninterrupted
    cfg = _write_config(tmp_path, "chain")
    run_dir = tmp_path / "chain"

    res = _run(cfg, fault="iter0/sft/done")  # the warm start trained, its policy not saved
    assert res.returncode == -9, res.stderr[-2000:]
    assert not (run_dir / "policy" / "iter_00").exists()

    res = _run(cfg, fault="iter0/eval")  # the warm start saved, evaluating it
    assert res.returncode == -9, res.stderr[-2000:]
    assert (run_dir / "policy" / "iter_00").is_dir()
    assert not (run_dir / "iter_00" / "eval.json").exists()

    res = _run(cfg, fault="iter1/generate")  # during generation
    assert res.returncode == -9, res.stderr[-2000:]
    assert (run_dir / "policy" / "iter_00").is_dir()
    assert not (run_dir / "iter_01" / "generate.safetensors").exists()

    res = _run(cfg, fault="iter1/judge")  # during judging
    assert res.returncode == -9, res.stderr[-2000:]
    assert (run_dir / "iter_01" / "generate.safetensors").exists()
    assert not (run_dir / "iter_01" / "judge.json").exists()

    res = _run(cfg, fault="iter1/reference/done")  # reference log-probs written, no training
    assert res.returncode == -9, res.stderr[-2000:]
    assert (run_dir / "iter_01" / "reference.safetensors").exists()

    res = _run(cfg, fault="iter1/train/step1", signal_name="TERM")  # SIGTERM while training
    assert res.returncode == 0, res.stderr[-2000:]
    assert "SIGTERM" in res.stdout
    assert (run_dir / "iter_01" / "ckpt" / "1").is_dir()
    assert not (run_dir / "policy" / "iter_01").exists()

    # After the policy export, before its evaluation: training is not redone, so its metric
    # records must survive the resume (they were lost once).
    res = _run(cfg, fault="iter1/saved")
    assert res.returncode == -9, res.stderr[-2000:]
    assert (run_dir / "policy" / "iter_01").is_dir()

    res = _run(cfg, fault="iter1/eval")  # during that evaluation
    assert res.returncode == -9, res.stderr[-2000:]
    assert not (run_dir / "iter_01" / "eval.json").exists()

    res = _run(cfg, fault="iter2/train/step2")  # killed mid-training, checkpoint at step 1
    assert res.returncode == -9, res.stderr[-2000:]
    assert (run_dir / "iter_02" / "ckpt" / "1").is_dir()

    res = _run(cfg, fault="iter2/eval/done")  # evaluated, iteration not yet marked complete
    assert res.returncode == -9, res.stderr[-2000:]
    assert (run_dir / "iter_02" / "eval.json").exists()

    res = _run(cfg)
    assert res.returncode == 0, res.stderr[-2000:]

    got, want = _params(run_dir, 2), _params(ref_dir, 2)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert _metrics(run_dir) == _metrics(ref_dir)
    # Wall times: at most one record per phase (a phase is timed when done, and done once).
    times = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    phases = [
        (r["iteration"], k) for r in times if r["kind"] == "time" for k in r if k[-2:] == "_s"
    ]
    assert len(phases) == len(set(phases)) and (2, "train_s") in phases
    assert {k for _, k in phases} >= {"sft_s", "save_s", "eval_s", "generate_s", "judge_s"}
    for t in range(3):  # the per-iteration files too
        for name in ("eval.json", "judge.json"):
            if t == 0 and name == "judge.json":
                continue
            a = (run_dir / f"iter_{t:02d}" / name).read_text()
            assert a == (ref_dir / f"iter_{t:02d}" / name).read_text(), (t, name)


@pytest.mark.slow
def test_random_kills_then_resumed_equals_uninterrupted(uninterrupted, tmp_path):
    """SIGKILL at random moments (wherever they land: compiling, writing a file, between
    phases), then one resume: the same parameters and metrics, no row lost or repeated."""
    import random
    import signal
    import time

    ref_dir, ref = uninterrupted
    cfg = _write_config(tmp_path, "random")
    run_dir = tmp_path / "random"
    rng = random.Random(1234)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXSELM_FAULT")}
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-m", "jaxselm", "online", "--config", str(cfg)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(8.0, 30.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    res = _run(cfg)
    assert res.returncode == 0, res.stderr[-2000:]
    got, want = _params(run_dir, 2), _params(ref_dir, 2)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert _metrics(run_dir) == _metrics(ref_dir)
    for t in range(3):
        a = json.loads((run_dir / f"iter_{t:02d}" / "eval.json").read_text())
        b = json.loads((ref_dir / f"iter_{t:02d}" / "eval.json").read_text())
        assert a == b, t


@pytest.mark.slow
def test_changed_config_refuses_to_resume(uninterrupted, tmp_path):
    ref_dir, _ = uninterrupted
    cfg = write_tiny_run(tmp_path, "changed", ref_dir, judge="resume_judge", seed=4)
    res = _run(cfg)
    assert res.returncode == 2
    assert "run.output_dir" in res.stderr and len(res.stderr.strip().splitlines()) == 1
