"""The other subcommands end to end on tiny models: sft, generate, eval, convert (both ways),
offline train and train-rm on a preference file."""

import json

import numpy as np
import pytest

from jaxselm.cli import main

TASK_CFG = """
run: {{output_dir: {out}, seed: 0, progress: false}}
model: {{preset: tiny}}
data:
  source: task
  task: sort
  task_settings: {{min_items: 2, max_items: 3, max_value: 4}}
  num_eval_prompts: 8
sft: {{steps: 6, batch_size: 8, learning_rate: 3.0e-3, demonstrations: 32}}
online: {{max_new_tokens: 4, generation_batch_size: 8, batch_size: 4}}
judge: {{kind: programmatic, function: "jaxselm.data.tasks:score"}}
mesh: {{data: -1}}
"""

PREF_CFG = """
run: {{output_dir: {out}, seed: 0, progress: false}}
model: {{preset: tiny, vocab_size: 260}}
data:
  source: prompts
  prompts_path: {prefs}
  tokenizer: "builtin:bytes"
  num_eval_prompts: 4
online:
  iterations: 1
  max_new_tokens: 4
  generation_batch_size: 8
  batch_size: 4
  learning_rates: 1.0e-3
train: {{loss: selm, beta: 0.1, alpha: 1.0e-3}}
judge: {{kind: programmatic, function: "prefs_judge:score"}}
mesh: {{data: -1}}
"""


def run_cli(command: str, **flags) -> int:
    """``jaxselm <command> --flag value ...`` (True: a bare switch; ``from_``: ``--from``)."""
    argv = [command]
    for name, value in flags.items():
        argv += [
            f"--{name.rstrip('_').replace('_', '-')}",
            *([] if value is True else [str(value)]),
        ]
    return main(argv)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmds")
    cfg = tmp / "task.yaml"
    cfg.write_text(TASK_CFG.format(out=tmp / "run"))
    assert main(["sft", "--config", str(cfg)]) == 0
    return tmp, cfg


@pytest.mark.slow
def test_sft_generate_eval(sft_run, capsys):
    tmp, cfg = sft_run
    policy = tmp / "run" / "policy" / "iter_00"
    assert policy.is_dir() and (tmp / "run" / "iter_00" / "eval.json").is_file()
    prompts = tmp / "prompts.jsonl"
    prompts.write_text('{"prompt": "sort 3 1 ="}\n{"prompt": "sort 4 0 2 ="}\n')
    out = tmp / "gen.jsonl"
    assert (
        run_cli("generate", config=cfg, checkpoint=policy, prompts=prompts, output=out, greedy=True)
        == 0
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["sort 3 1 =", "sort 4 0 2 ="] and all(
        "response" in r for r in rows
    )
    alpaca = tmp / "alpaca.json"
    capsys.readouterr()
    assert run_cli("eval", config=cfg, checkpoint=policy, baseline=policy, alpaca_eval=alpaca) == 0
    result = json.loads(capsys.readouterr().out.split("\nwrote")[0])
    assert result["win_rate"] == pytest.approx(0.5)  # a model against itself: all ties
    assert len(json.loads(alpaca.read_text())) == 8
    bad = tmp / "bad.jsonl"
    bad.write_text('{"prompt": "sort 1 ="}\nnot json\n')
    assert (
        run_cli("generate", config=cfg, checkpoint=policy, prompts=bad, output=tmp / "x.jsonl") == 2
    )
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert not (tmp / "x.jsonl").exists()


@pytest.mark.parametrize(
    "content,needle",
    [
        (b'{"messages": []}\n', "p.jsonl:1: field 'messages' has no user message"),
        (b'{"prompt": "sort 1 ="}\n{"prompt": ""}\n', "p.jsonl:2: the prompt is empty"),
        (b'{"prompt": 3}\n', "p.jsonl:1: field 'prompt' must be a string, got int"),
        (b'{"prompt": "sort 1 \xe9 ="}\n', "p.jsonl:1: not valid UTF-8"),
        (b"", "p.jsonl: no prompts (the file holds no rows)"),
    ],
    ids=["empty-messages", "empty-prompt", "number", "latin1", "empty-file"],
)
def test_generate_bad_prompts_one_line(sft_run, capsys, tmp_path, content, needle):
    tmp, cfg = sft_run
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(content)
    out = tmp_path / "out.jsonl"
    policy = tmp / "run" / "policy" / "iter_00"
    capsys.readouterr()
    assert run_cli("generate", config=cfg, checkpoint=policy, prompts=prompts, output=out) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("case", ["output-dir", "output-under-file", "baseline", "alpaca-dir"])
def test_bad_outputs_and_checkpoints_found_before_generating(
    sft_run, capsys, tmp_path, monkeypatch, case
):
    """Found before any generation (which would take minutes on a real model)."""
    tmp, cfg = sft_run
    policy = tmp / "run" / "policy" / "iter_00"
    (tmp_path / "afile").write_text("x")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "sort 1 ="}\n')
    gen = dict(config=cfg, checkpoint=policy, prompts=prompts)
    command, flags, needle = {
        "output-dir": ("generate", {**gen, "output": tmp_path}, "is a folder; give a file name"),
        "output-under-file": (
            "generate",
            {**gen, "output": tmp_path / "afile" / "o.jsonl"},
            "afile is a file, not a folder",
        ),
        "baseline": (
            "eval",
            dict(config=cfg, checkpoint=policy, baseline=tmp_path / "nope"),
            "--baseline: ",
        ),
        "alpaca-dir": (
            "eval",
            dict(config=cfg, checkpoint=policy, alpaca_eval=tmp_path),
            "--alpaca-eval: ",
        ),
    }[case]
    import jaxselm.online.commands as commands

    def no_generation(*args, **kwargs):
        raise AssertionError("generated before the inputs were checked")

    monkeypatch.setattr(commands, "respond", no_generation)
    capsys.readouterr()
    assert run_cli(command, **flags) == 2
    captured = capsys.readouterr()
    assert needle in captured.err and len(captured.err.splitlines()) == 1, captured.err


@pytest.mark.slow
def test_convert_round_trip(sft_run):
    from jaxselm.hf import load_hf_checkpoint
    from jaxselm.train import load_params

    tmp, cfg = sft_run
    policy = tmp / "run" / "policy" / "iter_00"
    hf_dir = tmp / "hf"
    assert run_cli("convert", from_="jaxselm", input=policy, output=hf_dir, config=cfg) == 0
    assert (hf_dir / "config.json").is_file()
    back = tmp / "back"
    assert main(["convert", "--from", "hf", "--input", str(hf_dir), "--output", str(back)]) == 0
    a, b = load_params(policy), load_params(back)
    import jax

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    _, hf_params = load_hf_checkpoint(hf_dir)
    assert hf_params["embed"].shape == np.asarray(a["embed"]).shape


@pytest.mark.slow
def test_offline_train_and_train_rm(tmp_path, capsys):
    (tmp_path / "prefs_judge.py").write_text(
        "def score(prompt, response):\n    return min(len(response), 10) / 10\n"
    )
    prefs = tmp_path / "prefs.jsonl"
    rows = []
    for i in range(12):
        rows.append(json.dumps({"prompt": f"say {i}", "chosen": f"{i}", "rejected": f"{i + 1}{i}"}))
    prefs.write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "prefs.yaml"
    cfg.write_text(PREF_CFG.format(out=tmp_path / "run", prefs=prefs))
    capsys.readouterr()
    # The judge module sits next to the config file: found there, no PYTHONPATH.
    assert main(["train", "--config", str(cfg)]) == 0
    run = tmp_path / "run"
    assert (run / "policy" / "iter_01").is_dir()
    said = capsys.readouterr()
    # A local file is prepared, not downloaded; a smaller evaluation set than asked is explained.
    assert "Downloading" not in said.out + said.err and "downloaded" not in said.out + said.err
    assert "evaluation on 1 (of 4 asked: at most 10% of the file is held out)" in said.out
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "train" and "rewards/accuracies" in r for r in train)
    capsys.readouterr()
    assert main(["train-rm", "--config", str(cfg), "--steps", "3"]) == 0
    assert (run / "reward_model" / "params").is_dir()
    printed = capsys.readouterr().out
    assert "reward model: 3 steps" in printed
    # The printed accuracy is the last step's Bradley-Terry accuracy (it once printed "nan").
    accuracy = float(printed.split("accuracy ")[1].split(";")[0])
    rm = [json.loads(x) for x in (run / "reward_model" / "metrics.jsonl").read_text().splitlines()]
    assert len(rm) == 3 and 0.0 <= accuracy <= 1.0
    assert accuracy == pytest.approx(rm[-1]["rm/accuracy"], abs=5e-4)
    # The fitted reward model as the judge (a whole-section override replaces the judge spec).
    rm_judge = f"judge={{kind: reward_model, checkpoint: {run / 'reward_model' / 'params'}}}"
    policy = run / "policy"
    evaluate = ["eval", "--config", str(cfg), "--checkpoint", str(policy / "iter_01")]
    assert main([*evaluate, "--baseline", str(policy / "iter_00"), rm_judge]) == 0
    result = json.loads(capsys.readouterr().out)
    # 12 rows, no eval file: one row (10%, at least 1) is held out for evaluation.
    assert 0.0 <= result["win_rate"] <= 1.0 and result["judged"] == 1
