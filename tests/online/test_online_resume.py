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

TINY = """
run: {{output_dir: {out}, seed: 3, progress: false, async_checkpoints: false}}
model: {{preset: tiny-cope, cope_npos_max: 8}}
data:
  source: task
  task: sort
  task_settings: {{min_items: 2, max_items: 3, max_value: 4}}
  num_eval_prompts: 8
sft: {{steps: 4, batch_size: 8, learning_rate: 3.0e-3, demonstrations: 32}}
online:
  iterations: 2
  prompts_per_iteration: 8
  samples_per_prompt: 3
  max_new_tokens: 4
  generation_batch_size: 8
  epochs: 1
  batch_size: 4
  learning_rates: 1.0e-3
  checkpoint_every: 1
train: {{loss: selm, beta: 0.1, alpha: 1.0e-3}}
judge: {{kind: programmatic, function: "resume_judge:score"}}
mesh: {{data: -1}}
"""


# A judge whose scores rarely tie (a deterministic hash of the response), so every iteration
# has preference pairs even though the tiny model barely learns the task.
JUDGE = """
import zlib


def score(prompt, response):
    return (zlib.crc32(response.encode()) % 1000) / 1000.0
"""


def _write_config(tmp: Path, name: str) -> Path:
    (tmp / "resume_judge.py").write_text(JUDGE)
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(TINY.format(out=tmp / name))
    return cfg


def _run(
    cfg: Path, fault: str | None = None, signal_name: str | None = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(cfg.parent), env.get("PYTHONPATH", "")])
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
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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

    res = _run(cfg, fault="iter1/generate")  # during generation
    assert res.returncode == -9, res.stderr[-2000:]
    assert (run_dir / "policy" / "iter_00").is_dir()
    assert not (run_dir / "iter_01" / "generate.safetensors").exists()

    res = _run(cfg, fault="iter1/judge")  # during judging
    assert res.returncode == -9, res.stderr[-2000:]
    assert (run_dir / "iter_01" / "generate.safetensors").exists()
    assert not (run_dir / "iter_01" / "judge.json").exists()

    res = _run(cfg, fault="iter1/train/step1", signal_name="TERM")  # SIGTERM while training
    assert res.returncode == 0, res.stderr[-2000:]
    assert "SIGTERM" in res.stdout
    assert (run_dir / "iter_01" / "ckpt" / "1").is_dir()
    assert not (run_dir / "policy" / "iter_01").exists()

    res = _run(cfg, fault="iter2/train/step2")  # killed mid-training, checkpoint at step 1
    assert res.returncode == -9, res.stderr[-2000:]
    assert (run_dir / "iter_02" / "ckpt" / "1").is_dir()

    res = _run(cfg)
    assert res.returncode == 0, res.stderr[-2000:]

    got, want = _params(run_dir, 2), _params(ref_dir, 2)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert _metrics(run_dir) == _metrics(ref_dir)


@pytest.mark.slow
def test_changed_config_refuses_to_resume(uninterrupted, tmp_path):
    ref_dir, _ = uninterrupted
    (tmp_path / "resume_judge.py").write_text(JUDGE)
    cfg = tmp_path / "changed.yaml"
    cfg.write_text(TINY.format(out=ref_dir).replace("seed: 3", "seed: 4"))
    res = _run(cfg)
    assert res.returncode == 2
    assert "run.output_dir" in res.stderr and len(res.stderr.strip().splitlines()) == 1
