"""The CLI's error handling: bad configs and judge specs give one line and exit 2 before work."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jaxselm.cli import main

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"


def _run_main(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["online.iteratons=3"], "online.iteratons: unknown key"),
        (["online.iterations=three"], "online.iterations: Input should be a valid integer"),
        (["train.alpha=-0.1"], "train.alpha: must be >= 0"),
        (["model.num_kv_heads=3"], "model.num_kv_heads: 3 does not divide"),
        (["online.learning_rates=[1e-3]"], "online.learning_rates: 1 values for 3 iterations"),
        (["judge.kind=gpt"], "judge.kind: unknown judge kind 'gpt'"),
        (["judge.function=no_such_module_xyz:score"], "no_such_module_xyz"),
        (["judge.function=jaxselm.data.tasks:no_such_fn"], "no_such_fn"),
        (["judge.function=not a spec"], "judge.function"),
        (
            [
                "data.source=prompts",
                "data.prompts_path=/nonexistent.jsonl",
                "data.tokenizer=builtin:bytes",
            ],
            "/nonexistent.jsonl",
        ),
    ],
)
def test_bad_config_one_line_exit_2_before_work(tmp_path, capsys, overrides, needle):
    out = tmp_path / "run"
    code, err = _run_main(
        capsys, ["online", "--config", str(DEMO), f"run.output_dir={out}", *overrides]
    )
    assert code == 2
    assert needle in err, err
    assert len(err.splitlines()) == 1, err
    assert not (out / "policy").exists()  # nothing started


def test_missing_config_file(tmp_path, capsys):
    code, err = _run_main(capsys, ["online", "--config", str(tmp_path / "nope.yaml")])
    assert code == 2 and "nope.yaml: config file not found" in err and len(err.splitlines()) == 1


def test_bad_yaml_names_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  seed: 1\n online: [\n")
    code, err = _run_main(capsys, ["online", "--config", str(bad)])
    assert code == 2 and "bad.yaml" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "text,needle",
    [
        (b"run:\n  seed: 1\n  note: caf\xe9\n", "line 3: not UTF-8 text (byte 0xe9)"),
        (b"run:\n  seed: 1\n  seed: 2\n", "key 'seed' given twice"),
        (b"run: {seed: 1}\nrun: {seed: 2}\n", "key 'run' given twice"),
    ],
    ids=["latin1", "duplicate-key", "duplicate-section"],
)
def test_unreadable_config_names_file_and_line(tmp_path, capsys, text, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(text)
    code, err = _run_main(capsys, ["online", "--config", str(bad)])
    assert code == 2 and "bad.yaml" in err and needle in err, err
    assert len(err.splitlines()) == 1, err


def test_same_override_twice_is_an_error(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["online", "--config", str(DEMO), f"run.output_dir={out}"]
    code, err = _run_main(capsys, [*argv, "online.iterations=2", "online.iterations =3"])
    assert code == 2 and "override online.iterations: given twice" in err, err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_llm_judge_without_api_key_env(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("JAXSELM_TEST_KEY", raising=False)
    cfg = tmp_path / "llm.yaml"
    cfg.write_text(
        DEMO.read_text().replace(
            "judge:\n  kind: programmatic\n  function: jaxselm.data.tasks:score",
            "judge:\n  kind: llm\n  base_url: http://127.0.0.1:9/v1\n  model: m\n"
            "  api_key_env: JAXSELM_TEST_KEY",
        )
    )
    assert "kind: llm" in cfg.read_text()
    code, err = _run_main(
        capsys, ["online", "--config", str(cfg), f"run.output_dir={tmp_path / 'run'}"]
    )
    assert code == 2 and "JAXSELM_TEST_KEY" in err and len(err.splitlines()) == 1


def test_unreachable_llm_judge_stops_before_any_work(tmp_path, capsys):
    """An LLM endpoint nobody answers at: one line, exit 2, before the warm start trains (and
    before the run folder holds anything)."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "llm.yaml"
    cfg.write_text(
        DEMO.read_text().replace(
            "judge:\n  kind: programmatic\n  function: jaxselm.data.tasks:score",
            f"judge:\n  kind: llm\n  base_url: http://127.0.0.1:{port}/v1\n  model: m\n"
            "  max_retries: 0",
        )
    )
    out = tmp_path / "run"
    code, err = _run_main(capsys, ["online", "--config", str(cfg), f"run.output_dir={out}"])
    assert code == 2, err
    assert f"judge: cannot reach http://127.0.0.1:{port}/v1 (connection error" in err, err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_usage_errors_exit_2(capsys):
    assert main(["online"]) == 2
    assert "--config" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert main(["online", "--config", str(DEMO), "not-an-override"]) == 2


@pytest.mark.parametrize(
    "cmd", ["online", "sft", "train", "train-rm", "generate", "eval", "convert"]
)
def test_help_everywhere(cmd):
    res = subprocess.run(
        [sys.executable, "-m", "jaxselm", cmd, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and "usage: jaxselm" in res.stdout


def test_sft_demonstration_longer_than_the_context(tmp_path, capsys):
    """Sequences past max_position_embeddings are refused, not trained on (a learned absolute
    table would give NaN there, RoPE would silently extrapolate)."""
    out = tmp_path / "run"
    code, err = _run_main(
        capsys,
        [
            "sft",
            "--config",
            str(DEMO),
            f"run.output_dir={out}",
            "model.max_position_embeddings=12",
            "run.progress=false",
        ],
    )
    assert code == 2 and len(err.splitlines()) == 1, err
    assert (
        "sft: a demonstration has 16 tokens (prompt + response), over the model context "
        "model.max_position_embeddings=12" in err
    )
    assert not (out / "policy").exists() and not (out / "sft").exists()
