"""The README's main job at reduced size: the demo config runs end to end, the policy improves."""

import json
from pathlib import Path

import pytest

from jaxselm.cli import main

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


@pytest.mark.slow
def test_demo_reduced_runs_and_reward_rises(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(
        [
            "online",
            "--config",
            str(DEMO),
            f"run.output_dir={out}",
            "run.progress=false",
            "online.iterations=2",
            "online.learning_rates=3.0e-4",
            "data.num_eval_prompts=128",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "sample-acc" in printed  # the per-iteration table
    assert (out / "metrics.png").is_file() and (out / "tensorboard").is_dir()
    for t in range(3):
        assert (out / "policy" / f"iter_{t:02d}").is_dir()
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    it = {r["iteration"]: r for r in recs if r["kind"] == "iteration"}
    assert sorted(it) == [0, 1, 2]
    # Measured on this config (docs/results in README): sample reward 0.58 -> 0.74 after two
    # iterations on 256 eval prompts; 0.03 is far below that gain and above run-to-run noise
    # of the 128-prompt estimate's rounding differences across device counts.
    assert it[2]["eval/sample_reward"] > it[0]["eval/sample_reward"] + 0.03, it
    assert it[2]["samples/n_pairs"] > 0
