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
        (["online.top_k=-1"], "online.top_k: must be >= 0 (got -1)"),
        (["online.top_p=1.5"], "online.top_p: must be <= 1 (got 1.5)"),
        (["online.top_p=0"], "online.top_p: must be > 0 (got 0)"),
        (["online.min_p=2"], "online.min_p: must be <= 1 (got 2)"),
        (["data.on_bad_row=ignore"], "data.on_bad_row: "),
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
    assert not out.exists()  # found before anything is written


@pytest.mark.parametrize("below", ["", "/sub"])
def test_output_dir_under_a_file(tmp_path, capsys, below):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, err = _run_main(
        capsys, ["online", "--config", str(DEMO), f"run.output_dir={afile}{below}"]
    )
    assert code == 2 and f"run.output_dir: {afile} is a file, not a folder" in err, err
    assert len(err.splitlines()) == 1 and afile.read_text() == "x"


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


PROMPTS_ARGS = [
    "data.source=prompts",
    "data.tokenizer=builtin:bytes",
    "model.vocab_size=512",
    "sft.steps=0",
    "run.progress=false",
]


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"", "no usable rows (the file holds no rows)"),
        (b'{"foo": 1}\n{"bar": 2}\n', "no usable rows (2 row(s): 2 missing field)"),
        (b'{"prompt": ""}\n', "no usable rows (1 row(s): 1 empty prompt)"),
        (b'{"prompt": 5}\n', "no usable rows (1 row(s): 1 wrong type)"),
        (b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n', "prompts.jsonl:2: not valid UTF-8"),
        (b'{"prompt": "a"}\n', "1 usable row(s), all held out as evaluation prompts"),
    ],
    ids=["empty", "no-fields", "empty-prompt", "number", "latin1", "one-row"],
)
def test_bad_prompts_file_one_line_and_nothing_left(tmp_path, capsys, content, needle):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(content)
    out = tmp_path / "run"
    argv = ["online", "--config", str(DEMO), f"run.output_dir={out}", *PROMPTS_ARGS]
    code, err = _run_main(capsys, [*argv, f"data.prompts_path={prompts}"])
    assert code == 2 and needle in err, err
    assert len(err.splitlines()) == 1, err
    assert not out.exists()  # the preparation's folders are removed again


def test_bad_rows_are_reported_or_an_error(tmp_path):
    from jaxselm.config_io import load_config
    from jaxselm.data.tokenizer import load_tokenizer
    from jaxselm.errors import DataError
    from jaxselm.online.config import RunConfig
    from jaxselm.online.prompts import PromptSet

    prompts = tmp_path / "prompts.jsonl"
    good = [f'{{"prompt": "sort {i} 3 1"}}' for i in range(20)]
    prompts.write_text("\n".join([good[0], '{"prompt": 7}', *good[1:], '{"x": 1}']) + "\n")
    over = [*PROMPTS_ARGS, f"data.prompts_path={prompts}"]
    cfg = load_config(RunConfig, DEMO, [*over, f"run.output_dir={tmp_path / 'a'}"])
    ps = PromptSet(cfg, load_tokenizer("builtin:bytes"), tmp_path / "a")
    assert ps.notes == [
        f"{prompts}: 2 bad row(s) skipped (1 missing field, 1 wrong type) "
        "(data.on_bad_row: error stops at the first)"
    ]
    cfg = load_config(
        RunConfig, DEMO, [*over, f"run.output_dir={tmp_path / 'b'}", "data.on_bad_row=error"]
    )
    with pytest.raises(DataError, match=r"prompts\.jsonl:2: "):
        PromptSet(cfg, load_tokenizer("builtin:bytes"), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_broken_chat_template_found_before_anything_is_written(tmp_path, capsys):
    from tiny_tokenizers import train_bpe_dir

    tok = tmp_path / "tok"
    tok.mkdir()
    template = "{% for m in messages %}{{ m.content }"  # an unclosed expression
    train_bpe_dir(tok, ["hello world sort 1 2 3"] * 20, 300, {"chat_template": template})
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "hello {i}"}}\n' for i in range(12)))
    out = tmp_path / "run"
    common = [a for a in PROMPTS_ARGS if not a.startswith("data.tokenizer=")]
    argv = ["online", "--config", str(DEMO), f"run.output_dir={out}", *common]
    code, err = _run_main(capsys, [*argv, f"data.prompts_path={prompts}", f"data.tokenizer={tok}"])
    assert code == 2 and "chat template syntax error at template line 1" in err, err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_prompts_kept_within_the_context_left_by_max_new_tokens(tmp_path, capsys):
    """A prompts file on a small-context model: prompts longer than the context minus
    online.max_new_tokens are long prompts (truncated from the left here), found when the run
    starts, not a failure at the first generation; max_new_tokens filling the whole context is
    a config error."""
    from jaxselm.config_io import load_config
    from jaxselm.data.tokenizer import load_tokenizer
    from jaxselm.online.config import RunConfig
    from jaxselm.online.prompts import PromptSet

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{"x" * 100} {i}"}}\n' for i in range(12)))
    over = [
        *PROMPTS_ARGS,
        f"data.prompts_path={prompts}",
        "model.max_position_embeddings=64",
        "online.max_new_tokens=8",
        f"run.output_dir={tmp_path / 'run'}",
    ]
    cfg = load_config(RunConfig, DEMO, over)
    ps = PromptSet(cfg, load_tokenizer("builtin:bytes"), tmp_path / "run")
    assert ps.prompt_limit == 56
    rec = {"id": "r", "prompt": "y" * 100, "messages": [{"role": "user", "content": "y" * 100}]}
    assert len(ps.encode_prompt(rec)) == 56 and rec["truncated"]
    assert "longer than 56 tokens (model.max_position_embeddings 64 - online.max_new_tokens 8)" in (
        ps.describe()
    )
    code, err = _run_main(capsys, ["online", "--config", str(DEMO), "online.max_new_tokens=256"])
    assert code == 2 and "online.max_new_tokens: 256 leaves no room for a prompt" in err, err
