"""A real multi-process run on this machine: 2 processes x 4 host CPU devices on 127.0.0.1.

JAX's multi-controller runtime is started with the explicit coordinator settings
(JAXSELM_COORDINATOR / JAXSELM_NUM_PROCESSES / JAXSELM_PROCESS_ID) and the CPU collectives go
through gloo, so the pair runs the same code paths as the hosts of a TPU pod slice: a global mesh
spanning devices of other processes, global arrays assembled from each host's rows, outputs
all-gathered to every host, files written by process 0 behind barriers, orbax checkpoints written
collectively, and data sharded per process (each host reads only the rows its devices hold). The
pair's results must equal a single process with 8 devices running the same
config, and the policy they saved must restore in one process.

Also: a process started without its peer fails with the one-line error within the configured
initialization timeout instead of hanging.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_run import write_tiny_run

TIMEOUT_S = 420  # per run; the pair takes about a minute on two shared cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path, devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXSELM_")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONFAULTHANDLER"] = "1"  # stacks on SIGABRT: what a hung pair was doing
    env["PYTHONPATH"] = os.pathsep.join([str(tmp), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _cmd(cfg: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jaxselm",
        "online",
        "--config",
        str(cfg),
        f"run.output_dir={out}",
    ]


def _params(path: Path) -> dict[str, np.ndarray]:
    import jax

    from jaxselm.train import load_params

    tree = load_params(path)
    return {
        jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def _metrics(run_dir: Path) -> list[dict]:
    """The metric records that must be reproduced exactly: all but the phases' wall times."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] != "time"]


def _pair_env(tmp: Path, port: int, pid: int, *, timeout_s: int, **extra: str) -> dict[str, str]:
    """The environment of process ``pid`` of a 2 x 4 run coordinated on 127.0.0.1:``port``."""
    return _env(
        tmp,
        4,
        JAXSELM_COORDINATOR=f"127.0.0.1:{port}",
        JAXSELM_NUM_PROCESSES="2",
        JAXSELM_PROCESS_ID=str(pid),
        JAXSELM_INIT_TIMEOUT=str(timeout_s),
        **extra,
    )


def _run_pair(
    tmp: Path,
    argv: list[str],
    env1: dict[str, str] | None = None,
    env_all: dict[str, str] | None = None,
):
    """Both processes of a 2 x 4 run of ``argv``; returns [(returncode, stdout, stderr)] by
    process id. ``env1``: extra environment of process 1 only; ``env_all``: of both."""
    port = _free_port()
    pair = []
    for pid in range(2):
        extra = {**(env_all or {}), **((env1 or {}) if pid == 1 else {})}
        env = _pair_env(tmp, port, pid, timeout_s=120, **extra)
        pair.append(
            subprocess.Popen(
                argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for proc in pair:
            stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        # A hung pair (e.g. the processes took different decisions and wait in different
        # collectives): SIGABRT makes faulthandler print every process's Python stacks.
        dumps = []
        for pid, proc in enumerate(pair):
            if proc.poll() is None:
                proc.send_signal(signal.SIGABRT)
            out, err = proc.communicate()
            dumps.append(
                f"--- process {pid} (rc {proc.returncode}) ---\n{out[-3000:]}{err[-6000:]}"
            )
        pytest.fail(f"the pair did not finish in {TIMEOUT_S} s:\n" + "\n".join(dumps))
    finally:
        for proc in pair:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for pid, (rc, _, err) in enumerate(results):
        assert rc == 0, f"process {pid}:\n{err[-4000:]}"
    return results


def _run_single(tmp: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """``argv`` as one process with 8 devices (what the pair must equal); it must succeed."""
    res = subprocess.run(
        argv, env=_env(tmp, 8), capture_output=True, text=True, check=False, timeout=TIMEOUT_S
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    cfg = write_tiny_run(
        tmp, "tiny", tmp / "unused", judge="mp_judge", batch_size=8, tensorboard=False
    )

    # Process 1 arrives 5 s late where the hosts decide from files process 0 has just written
    # (run.json at the start, judge.json after generating): they must still decide together.
    late = {"JAXSELM_FAULT_AT": "session,iter1/generate/done", "JAXSELM_FAULT_SIGNAL": "SLEEP"}
    results = _run_pair(
        tmp,
        _cmd(cfg, tmp / "pair"),
        env1=late,
        env_all={"JAXSELM_READ_LOG": str(tmp / "reads")},
    )
    outs = [(out, err) for _, out, err in results]
    single = _run_single(tmp, _cmd(cfg, tmp / "single"))
    return tmp, outs, single


# Why not bit-for-bit: a single process all-reduces the 8 devices' partial gradients (and the
# partial sums of every batch-sharded reduction) in device order, ((g0 + g1) + g2) + ...; gloo's
# cross-process all-reduce associates the same 8 float32 terms differently (checked directly: a
# psum of 1024 random float32 values over 8 devices differs in about half of the elements between
# 1 x 8 and 2 x 4, and matches the sequential order only on 1 x 8). Each such sum then differs by
# a few float32 ulps (7 additions, |error| <= 7 * 2**-24 * sum|g_i|), and Adam carries that into
# the weights: after the 9 optimizer steps here the largest weight difference is ~2.4e-6. So
# floats are compared with atol = rtol = 1e-5 (a few times the observed difference, far below any
# real divergence: one wrong batch or token moves weights by ~1e-3, the learning rate), while
# everything discrete - sampled tokens, judge scores, preference pairs, counts - must be equal.
ATOL = RTOL = 1e-5


def _assert_close(a, b, where: str) -> None:
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), where
        assert abs(a - b) <= ATOL + RTOL * abs(b), f"{where}: {a} vs {b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.mark.slow
def test_pair_equals_single_process(runs):
    from safetensors.numpy import load_file

    tmp, _, _ = runs
    pair, single = tmp / "pair", tmp / "single"
    for t in range(3):
        a = _params(pair / "policy" / f"iter_{t:02d}")
        b = _params(single / "policy" / f"iter_{t:02d}")
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=ATOL, err_msg=f"iter {t} {k}")
    for t in (1, 2):  # what the policy sampled and how it was judged and paired: identical
        ga, gb = (
            load_file(pair / f"iter_{t:02d}" / "generate.safetensors"),
            load_file(single / f"iter_{t:02d}" / "generate.safetensors"),
        )
        for k in ("tokens", "lengths", "finish"):
            np.testing.assert_array_equal(ga[k], gb[k], err_msg=f"iter {t} {k}")
        assert json.loads((pair / f"iter_{t:02d}" / "judge.json").read_text()) == json.loads(
            (single / f"iter_{t:02d}" / "judge.json").read_text()
        )
    ma, mb = _metrics(pair), _metrics(single)
    assert [(r["kind"], r["step"]) for r in ma] == [(r["kind"], r["step"]) for r in mb]
    _assert_close(ma, mb, "metrics.jsonl")
    for name in ("iter_02/eval.json", "run.json"):
        _assert_close(
            json.loads((pair / name).read_text()), json.loads((single / name).read_text()), name
        )


@pytest.mark.slow
def test_each_host_reads_only_its_slice_of_the_data(runs):
    """Per-process data sharding: of every global batch each host reads only the rows its 4
    devices hold; the two hosts' reads are disjoint and together cover every prompt of every
    iteration, every evaluation prompt and every SFT demonstration (4 steps x 8 = the 32 demos:
    one epoch, so no row is needed twice)."""
    tmp, _, _ = runs
    reads: dict[tuple, list[set[int]]] = {}
    for pid in range(2):
        for line in (tmp / "reads" / f"reads.p{pid}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            key = (rec["set"], rec.get("iteration"))
            reads.setdefault(key, [set(), set()])[pid].update(rec["positions"])
    expected = {("sft", None): 32, ("eval", None): 8, ("train", 1): 8, ("train", 2): 8}
    assert set(reads) == set(expected)
    for key, size in expected.items():
        mine, theirs = reads[key]
        assert mine and theirs and not mine & theirs, (key, mine, theirs)
        assert mine | theirs == set(range(size)), key
    # Generation batches of 8 over 8 devices: process 0 holds rows 0-3, process 1 rows 4-7.
    assert reads[("train", 1)] == [{0, 1, 2, 3}, {4, 5, 6, 7}]


@pytest.mark.slow
def test_pair_logs_once_and_checkpoint_restores_in_one_process(runs):
    tmp, outs, single = runs
    out0, out1 = (out for out, _ in outs)

    # Process 0 prints what a single process prints (the per-iteration table), process 1 nothing.
    # (gloo's C++ threads also print "[Gloo] Rank 3 is connected to 7 peer ranks" lines to stdout,
    # so compare our lines, not whole outputs.)
    # The last column is the wall time, which no two runs share.
    def rows(out: str) -> list[str]:
        return [line.rsplit(" | ", 1)[0] for line in out.splitlines() if " | " in line]

    table = rows(single.stdout)
    assert len(table) == 4 and "sample-acc" in table[0]  # header + iterations 0, 1, 2
    assert rows(out0) == table, out0
    for ours in ("iteration 1 done", "sample-acc", " | ", "metrics:"):
        assert ours not in out1, out1
    # The training checkpoint the pair wrote together restores on one process (8 devices here).
    import jax

    from jaxselm.train import Checkpointer

    with Checkpointer(tmp / "pair" / "iter_02" / "ckpt", create=False) as ck:
        step = ck.latest_step()
        assert step is not None
        state, meta = ck.restore(_abstract_like(ck, step))
    assert meta == {"iteration": 2, "phase": "train"}
    restored = {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path(state["params"])
    }
    final = _params(tmp / "pair" / "policy" / "iter_02")
    assert restored.keys() == final.keys()
    for k in final:  # the last step's checkpoint holds the exported policy
        np.testing.assert_array_equal(restored[k], final[k], err_msg=k)


@pytest.mark.slow
def test_sigterm_on_one_host_stops_both_and_the_pair_resumes_exactly(runs):
    """Process 1 alone gets SIGTERM during iteration 1's training (as one preempted TPU host
    would): both processes agree to stop at the same step, checkpoint together and exit 0; the
    pair started again resumes and ends with exactly the uninterrupted pair's results (same
    processes, same reduction order: bit-for-bit)."""
    tmp, _, _ = runs
    cfg = tmp / "tiny.yaml"
    out = tmp / "preempted"
    stopped = _run_pair(
        tmp,
        _cmd(cfg, out),
        env1={"JAXSELM_FAULT_AT": "iter1/train/step1", "JAXSELM_FAULT_SIGNAL": "TERM"},
    )
    assert [rc for rc, _, _ in stopped] == [0, 0], stopped[1][2][-3000:]
    assert "SIGTERM: state saved in" in stopped[0][1]
    assert not (out / "policy" / "iter_01").exists()
    from jaxselm.train import Checkpointer

    with Checkpointer(out / "iter_01" / "ckpt", create=False) as ck:
        assert ck.latest_step() == 1

    resumed = _run_pair(tmp, _cmd(cfg, out))
    assert [rc for rc, _, _ in resumed] == [0, 0], resumed[0][2][-3000:]
    for t in range(3):
        a = _params(out / "policy" / f"iter_{t:02d}")
        b = _params(tmp / "pair" / "policy" / f"iter_{t:02d}")
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"iter {t} {k}")
    assert _metrics(out) == _metrics(tmp / "pair")


PREFS_CFG = """
run: {{output_dir: {out}, seed: 1, progress: false, async_checkpoints: false, tensorboard: false}}
model: {{preset: tiny, vocab_size: 260}}
data:
  source: prompts
  prompts_path: {prefs}
  tokenizer: "builtin:bytes"
  num_eval_prompts: 8
sft: {{steps: 2, batch_size: 8, learning_rate: 3.0e-3, demonstrations: 16}}
online: {{iterations: 1, max_new_tokens: 4, generation_batch_size: 8, batch_size: 8, epochs: 1,
          learning_rates: 1.0e-3, checkpoint_every: 4}}
train: {{loss: selm, beta: 0.1, alpha: 1.0e-3}}
judge: {{kind: programmatic, function: "jaxselm.data.tasks:score"}}
mesh: {{data: -1}}
"""


@pytest.mark.slow
def test_pair_offline_on_a_prompts_file_prepares_once_and_reads_slices(tmp_path):
    """``jaxselm train`` (offline: SFT warm start, then SELM on the file's own chosen/rejected
    pairs with y_ref = greedy responses) on a JSONL preference file by the pair: process 0
    prepares the dataset (TFDS array_record) while process 1 waits; each host then reads only
    its rows (random access) of the SFT batches, the held-out prompts and the training rows
    (92 rows in generation batches of 8: the last batch is half padding, read by nobody); the
    policies equal one process's."""
    rng = np.random.default_rng(0)
    rows, seen = [], set()
    while len(rows) < 100:  # distinct prompts (preparation drops duplicates): 8 held out, 92 train
        items = [int(x) for x in rng.integers(0, 9, size=3)]
        if tuple(items) in seen:
            continue
        seen.add(tuple(items))
        i = len(rows)
        rows.append(
            {
                "id": f"r{i}",
                "prompt": "sort " + " ".join(map(str, items)) + " =",
                "chosen": " ".join(map(str, sorted(items))),
                "rejected": " ".join(map(str, items)),
            }
        )
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "prefs.yaml"
    cfg.write_text(PREFS_CFG.format(out=tmp_path / "unused", prefs=prefs))
    train = [sys.executable, "-m", "jaxselm", "train", "--config", str(cfg)]
    _run_pair(
        tmp_path,
        [*train, f"run.output_dir={tmp_path / 'pair'}"],
        env_all={"JAXSELM_READ_LOG": str(tmp_path / "reads")},
    )
    _run_single(tmp_path, [*train, f"run.output_dir={tmp_path / 'single'}"])
    for t in (0, 1):
        a = _params(tmp_path / "pair" / "policy" / f"iter_{t:02d}")
        b = _params(tmp_path / "single" / "policy" / f"iter_{t:02d}")
        for k in b:
            np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=ATOL, err_msg=f"iter {t} {k}")
    judged = [
        json.loads((tmp_path / run / "iter_01" / "judge.json").read_text())
        for run in ("pair", "single")
    ]
    assert judged[0] == judged[1] and len(judged[0]["pairs"]) == 92
    assert len(list((tmp_path / "pair" / "data").iterdir())) == 1  # one prepared dataset
    reads = {}
    for pid in range(2):
        for line in (tmp_path / "reads" / f"reads.p{pid}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            reads.setdefault(rec["set"], [set(), set()])[pid].update(rec["positions"])
    assert set(reads) == {"sft", "eval", "train_all"}
    for name, size in (("sft", 16), ("eval", 8), ("train_all", 92)):
        mine, theirs = reads[name]
        assert mine and theirs and not mine & theirs and mine | theirs == set(range(size)), (
            name,
            reads[name],
        )


HF_EXPORT = """
import sys

import jax

from jaxselm.parallel.multihost import initialize_distributed

initialize_distributed(enabled=len(sys.argv) > 2)
from jaxselm.hf import save_hf_checkpoint
from jaxselm.model import get_preset, init_params, param_logical_axes
from jaxselm.parallel import make_mesh, param_shardings

cfg = get_preset("tiny")
mesh = make_mesh((1, 8, 1))  # fsdp over all 8 devices: with two processes, every host holds half
abstract = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
shardings = param_shardings(abstract, param_logical_axes(cfg), mesh)
params = jax.jit(lambda k: init_params(cfg, k), out_shardings=shardings)(jax.random.key(7))
split = sum(not x.is_fully_addressable for x in jax.tree.leaves(params))
save_hf_checkpoint(cfg, params, sys.argv[1], max_shard_size="20KB")
print("split leaves:", split)
"""


@pytest.mark.slow
def test_hf_export_of_params_sharded_across_hosts(tmp_path):
    """save_hf_checkpoint from 2 processes whose params are sharded across both (fsdp over 8
    devices): each tensor is gathered, process 0 writes, and the files equal a single process's
    export of the same params."""
    from safetensors.numpy import load_file

    script = tmp_path / "export.py"
    script.write_text(HF_EXPORT)
    pair = _run_pair(tmp_path, [sys.executable, str(script), str(tmp_path / "pair"), "distributed"])
    outs = [out for _, out, _ in pair]
    assert all("split leaves: 0" not in o and "split leaves:" in o for o in outs), outs
    _run_single(tmp_path, [sys.executable, str(script), str(tmp_path / "single")])
    pair_files = sorted(p.name for p in (tmp_path / "pair").iterdir())
    assert pair_files == sorted(p.name for p in (tmp_path / "single").iterdir())
    assert "model.safetensors.index.json" in pair_files and len(pair_files) > 3  # several shards
    for name in pair_files:
        a, b = tmp_path / "pair" / name, tmp_path / "single" / name
        if name.endswith(".safetensors"):
            ta, tb = load_file(a), load_file(b)
            assert ta.keys() == tb.keys()
            for k in ta:
                np.testing.assert_array_equal(ta[k], tb[k], err_msg=f"{name}:{k}")
        else:
            assert a.read_text() == b.read_text(), name


def _abstract_like(ck, step):
    """The saved tree as ShapeDtypeStructs on this process's first device."""
    import jax

    meta = ck._manager.item_metadata(step)["state"]
    tree = getattr(meta, "tree", meta)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev), tree)


@pytest.mark.slow
@pytest.mark.parametrize("process_id", [0, 1])  # the coordinator alone; a worker without one
def test_process_without_its_peer_fails_fast(tmp_path, process_id):
    cfg = write_tiny_run(
        tmp_path, "tiny", tmp_path / "out", judge="mp_judge", batch_size=8, tensorboard=False
    )
    port = _free_port()
    env = _pair_env(tmp_path, port, process_id, timeout_s=8)
    start = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "jaxselm", "online", "--config", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert res.returncode == 2, res.stderr[-3000:]
    # JAX's own timeout (set 60 s later) would abort with a C++ stack trace; ours is one line, last.
    assert res.stderr.strip().splitlines()[-1] == (
        f"jaxselm online: error: distributed init: process {process_id} of 2 waited 8s at "
        f"127.0.0.1:{port} and not all processes connected (start every process with the same "
        "JAXSELM_COORDINATOR and JAXSELM_NUM_PROCESSES, or raise JAXSELM_INIT_TIMEOUT)"
    )
    assert "Check failure stack trace" not in res.stderr
    assert 8 <= elapsed < 60, elapsed  # the 8 s wait plus start-up, not JAX's 68 s abort
    assert not (tmp_path / "out").exists()  # failed before any work


def _online_without_config(tmp: Path, **env: str) -> subprocess.CompletedProcess:
    """``jaxselm online`` with a config file that does not exist, on 4 devices: the multi-process
    settings checked here fail before it is read."""
    return subprocess.run(
        [sys.executable, "-m", "jaxselm", "online", "--config", str(tmp / "x.yaml")],
        env=_env(tmp, 4, **env),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_inconsistent_settings_are_one_line_errors(tmp_path):
    """Half-given explicit settings fail before any connection attempt."""
    res = _online_without_config(tmp_path, JAXSELM_COORDINATOR="127.0.0.1:1234")
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "jaxselm online: error: JAXSELM_NUM_PROCESSES: required when "
        "JAXSELM_COORDINATOR / JAXSELM_NUM_PROCESSES / JAXSELM_PROCESS_ID "
        "are used (set all three)"
    )
    res = _online_without_config(
        tmp_path,
        JAXSELM_COORDINATOR="127.0.0.1:1234",
        JAXSELM_NUM_PROCESSES="2",
        JAXSELM_PROCESS_ID="2",
    )
    assert res.returncode == 2
    assert res.stderr.strip().endswith("JAXSELM_PROCESS_ID: 2 is not below JAXSELM_NUM_PROCESSES=2")
    # commands whose code paths are not multi-process refuse --distributed
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxselm",
            "--distributed",
            "generate",
            "--config",
            "x.yaml",
            "--checkpoint",
            "c",
            "--output",
            "o",
        ],
        env=_env(tmp_path, 4),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr == (
        "jaxselm generate: error: --distributed: multi-process runs are supported by "
        "online, sft, train (run generate as one process)\n"
    )


def test_helpers_with_one_process():
    """With one process the helpers are the identity / no-ops (single-process results unchanged)."""
    import jax
    import jax.numpy as jnp

    from jaxselm.parallel import make_mesh
    from jaxselm.parallel.multihost import (
        any_process,
        barrier,
        initialize_distributed,
        is_primary,
        to_host,
    )

    initialize_distributed(enabled=False)  # nothing to start
    assert is_primary()
    barrier("no-op")
    assert any_process(True) is True and any_process(False) is False
    mesh = make_mesh((8, 1, 1))
    x = jax.device_put(
        jnp.arange(16.0).reshape(8, 2),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
    )
    out = to_host({"x": x, "n": 3})
    np.testing.assert_array_equal(out["x"], np.arange(16.0).reshape(8, 2))
    assert out["n"] == 3


def test_settings_from_env():
    from jaxselm.parallel.multihost import DistributedError, settings_from_env, wants_distributed

    env = {
        "JAXSELM_COORDINATOR": "10.0.0.1:1234",
        "JAXSELM_NUM_PROCESSES": "4",
        "JAXSELM_PROCESS_ID": "3",
        "JAXSELM_LOCAL_DEVICE_IDS": "0,1",
        "JAXSELM_INIT_TIMEOUT": "30",
    }
    assert settings_from_env(env) == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 3,
        "local_device_ids": [0, 1],
        "timeout_s": 30.0,
    }
    assert wants_distributed(env) and not wants_distributed({"JAXSELM_PROCESS_ID": "0"})
    for name, value, message in [
        ("JAXSELM_NUM_PROCESSES", "two", "JAXSELM_NUM_PROCESSES: expected an integer, got 'two'"),
        ("JAXSELM_NUM_PROCESSES", "0", "JAXSELM_NUM_PROCESSES: must be >= 1, got 0"),
        ("JAXSELM_INIT_TIMEOUT", "-1", "JAXSELM_INIT_TIMEOUT: must be > 0 seconds, got -1"),
        (
            "JAXSELM_LOCAL_DEVICE_IDS",
            "0;1",
            "JAXSELM_LOCAL_DEVICE_IDS: expected e.g. 0,1,2,3, got '0;1'",
        ),
    ]:
        with pytest.raises(DistributedError) as err:
            settings_from_env({**env, name: value})
        assert str(err.value) == message


def test_bad_coordinator_address_fails_before_connecting(tmp_path):
    res = _online_without_config(
        tmp_path, JAXSELM_COORDINATOR="localhost", JAXSELM_NUM_PROCESSES="2", JAXSELM_PROCESS_ID="0"
    )
    assert res.returncode == 2
    assert res.stderr == (
        "jaxselm online: error: JAXSELM_COORDINATOR: expected host:port, got 'localhost'\n"
    )


def test_distributed_without_a_cluster_is_a_one_line_error(tmp_path):
    env = {
        k: v
        for k, v in _env(tmp_path, 4).items()
        if not k.startswith(("SLURM_", "OMPI_", "PMI_", "TPU_"))
    }  # nothing for JAX to detect
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxselm",
            "--distributed",
            "online",
            "--config",
            str(tmp_path / "x.yaml"),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr.startswith(
        "jaxselm online: error: distributed init: no TPU / SLURM / Open MPI cluster detected ("
    )
    assert res.stderr.endswith(
        "); set JAXSELM_COORDINATOR, JAXSELM_NUM_PROCESSES and JAXSELM_PROCESS_ID\n"
    )
    assert res.stderr.count("\n") == 1
