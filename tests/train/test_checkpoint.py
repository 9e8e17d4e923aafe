"""Checkpoints: save on one mesh, restore on others; keep-N; params export; clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from jaxselm.errors import CheckpointError
from jaxselm.model import abstract_params, get_preset, init_params
from jaxselm.parallel import make_mesh, single_device_mesh
from jaxselm.train import (
    Checkpointer,
    OptimizerConfig,
    abstract_train_state,
    create_train_state,
    load_params,
    make_optimizer,
    params_shardings_for,
    save_params,
    shard_train_state,
)

CFG = get_preset("tiny")
TX = make_optimizer(OptimizerConfig(learning_rate=1e-2, total_steps=10))


def to_np(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module")
def host_state():
    """A state with non-trivial optimizer moments (one update applied), as numpy."""
    params = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))
    state = create_train_state(params, TX)
    grads = jax.tree.map(lambda p: 0.01 * np.ones_like(p), params)
    updates, opt_state = TX.update(grads, state.opt_state, params)
    state = state.replace(
        step=state.step + 7,
        opt_state=opt_state,
        params=jax.tree.map(lambda p, u: p + u, params, updates),
    )
    return to_np(state)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, host_state):
    """The state saved on a (2, 4, 1) mesh at steps 7 and 8 (async), with metadata."""
    directory = tmp_path_factory.mktemp("ckpt") / "run"
    state = shard_train_state(host_state, CFG, TX, make_mesh((2, 4, 1)))
    with Checkpointer(directory, max_to_keep=2) as ckpt:
        assert ckpt.save(state, metadata={"iteration": 1, "phase": "train"})
        ckpt.save(state.replace(step=state.step + 1), metadata={"iteration": 2})
    return directory


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 1, 1)])
def test_restore_on_another_mesh(saved, host_state, shape):
    mesh = single_device_mesh() if shape == (1, 1, 1) else make_mesh(shape)
    target = abstract_train_state(CFG, TX, mesh)
    ckpt = Checkpointer(saved, create=False)
    assert ckpt.all_steps() == [7, 8]
    state, meta = ckpt.restore(target, step=7)
    ckpt.close()
    assert meta == {"iteration": 1, "phase": "train"}
    assert int(state.step) == 7
    chex.assert_trees_all_equal(to_np(state.params), host_state.params)
    chex.assert_trees_all_equal(to_np(state.opt_state), host_state.opt_state)
    # Laid out as the target says, on the new mesh.
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(target)):
        assert got.sharding == want.sharding


def test_latest_step_and_metadata_only(saved):
    with Checkpointer(saved, create=False) as ckpt:
        assert ckpt.latest_step() == 8
        assert ckpt.restore_metadata() == {"iteration": 2}
        state, meta = ckpt.restore(abstract_train_state(CFG, TX, make_mesh((2, 2, 2))))
    assert int(state.step) == 8 and meta == {"iteration": 2}


def test_keep_n(tmp_path, host_state):
    state = shard_train_state(host_state, CFG, TX, make_mesh((8, 1, 1)))
    with Checkpointer(tmp_path / "keep", max_to_keep=2, async_save=False) as ckpt:
        for s in (1, 2, 3, 4):
            ckpt.save(state, step=s)
        assert ckpt.all_steps() == [3, 4]
        with pytest.raises(CheckpointError, match="step 4 already exists"):
            ckpt.save(state, step=4)
    assert sorted(p.name for p in (tmp_path / "keep").iterdir() if p.name.isdigit()) == ["3", "4"]


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def test_missing_checkpoint_errors(tmp_path):
    target = abstract_train_state(CFG, TX, make_mesh((8, 1, 1)))
    with pytest.raises(CheckpointError) as err:
        Checkpointer(tmp_path / "nope", create=False)
    assert str(tmp_path / "nope") in _one_line(err)
    empty = tmp_path / "empty"
    empty.mkdir()
    with Checkpointer(empty) as ckpt, pytest.raises(CheckpointError) as err:
        ckpt.restore(target)
    assert "no checkpoint" in _one_line(err) and str(empty) in str(err.value)


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "damage", ["truncate_data", "delete_state", "delete_metadata_file", "missing_step"]
)
def test_corrupted_checkpoint_gives_clear_error(saved, tmp_path, damage):
    directory = _copy_tree(saved, tmp_path / "copy")
    step_dir = directory / "7"
    step = 7
    if damage == "truncate_data":
        for root, _, files in os.walk(step_dir / "state"):
            for name in files:
                if Path(root).name == "d":  # the OCDBT data files of the arrays
                    path = Path(root) / name
                    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])
    elif damage == "delete_state":
        import shutil

        shutil.rmtree(step_dir / "state")
    elif damage == "delete_metadata_file":
        (step_dir / "state" / "_METADATA").unlink()
    else:
        step = 5
    target = abstract_train_state(CFG, TX, make_mesh((8, 1, 1)))
    with Checkpointer(directory, create=False) as ckpt, pytest.raises(CheckpointError) as err:
        ckpt.restore(target, step=step)
    msg = _one_line(err)
    assert str(directory) in msg


def test_restore_into_a_different_model_is_an_error(saved):
    other = CFG.replace(hidden_size=64)
    target = abstract_train_state(other, TX, make_mesh((8, 1, 1)))
    with Checkpointer(saved, create=False) as ckpt, pytest.raises(CheckpointError) as err:
        ckpt.restore(target)
    msg = _one_line(err)
    assert str(saved) in msg and "does not match" in msg and "expected" in msg
    # A target with a different structure (no optimizer state) names what is missing.
    with Checkpointer(saved, create=False) as ckpt, pytest.raises(CheckpointError) as err:
        ckpt.restore({"params": abstract_params(CFG)})
    assert "does not match the target" in _one_line(err)


def test_params_export_roundtrip(tmp_path, host_state):
    params = jax.device_put(host_state.params, params_shardings_for(CFG, make_mesh((2, 4, 1))))
    path = tmp_path / "export" / "iter1"
    save_params(path, params)
    with pytest.raises(CheckpointError, match="already exists"):
        save_params(path, params)
    # Onto another mesh with target shardings.
    mesh = make_mesh((2, 2, 2))
    shards = params_shardings_for(CFG, mesh)
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        abstract_params(CFG),
        shards,
    )
    loaded = load_params(path, target)
    chex.assert_trees_all_equal(to_np(loaded), host_state.params)
    assert loaded["embed"].sharding == shards["embed"]
    # Without a target: read as saved, on one device.
    plain = load_params(path)
    chex.assert_trees_all_equal(to_np(plain), host_state.params)
    assert len(plain["embed"].sharding.device_set) == 1
    with pytest.raises(CheckpointError) as err:
        load_params(tmp_path / "export" / "missing")
    assert "missing" in _one_line(err)


def test_metadata_is_plain_json(saved):
    meta_files = list((saved / "7" / "metadata").iterdir())
    content = [json.loads(p.read_text()) for p in meta_files if p.name == "metadata"]
    assert content == [{"iteration": 1, "phase": "train"}]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from jaxselm.model import get_preset, init_params
    from jaxselm.train import save_params

    cfg = get_preset("tiny")
    path = tmp_path_factory.mktemp("export") / "policy"
    save_params(path, init_params(cfg, jax.random.key(0)), model_config=cfg)
    return path


@pytest.mark.parametrize("damage", ["no_data", "no_manifest", "truncated_data"])
def test_damaged_export_is_one_line_on_the_terminal(tiny_export, tmp_path, damage):
    """The CLI's whole stderr is the one error line: no orbax warning before it, and no
    'Event loop is closed' tracebacks from orbax's futures after it (seen with these damages)."""
    import shutil
    import subprocess
    import sys

    bad = tmp_path / "bad"
    shutil.copytree(tiny_export, bad)
    data_files = [p for p in bad.rglob("*") if p.is_file() and p.parent.name == "d"]
    if damage == "no_data":
        for p in data_files:
            p.unlink()
    elif damage == "no_manifest":
        for p in bad.rglob("manifest.ocdbt"):
            p.unlink()
    else:
        for p in data_files:
            p.write_bytes(p.read_bytes()[:100])
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxselm",
            "convert",
            "--input",
            str(bad),
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"jaxselm convert: error: params checkpoint {bad}"
    ), res.stderr
    assert not (tmp_path / "o").exists()


def test_export_written_before_cope_scaled_loads_unscaled(tmp_path):
    """An export whose model config predates ``cope_scaled`` used unscaled (RAM --cope-nodiv)
    CoPE: it loads as such, and a run config with today's default is refused naming the key."""
    import orbax.checkpoint as ocp

    from jaxselm.checkpoints import load_checkpoint

    cfg = get_preset("tiny-cope")
    assert cfg.cope_scaled  # the default for new configs
    params = init_params(cfg, jax.random.key(0))
    old = {k: v for k, v in cfg.model_dump(mode="json").items() if k != "cope_scaled"}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "old", params, custom_metadata={"jaxselm": {"model": old}})
        ckptr.wait_until_finished()
    loaded, _ = load_checkpoint(tmp_path / "old")
    assert loaded.cope_scaled is False
    with pytest.raises(CheckpointError, match="cope_scaled is False but the run config's"):
        load_checkpoint(tmp_path / "old", model_config=cfg)
    got, _ = load_checkpoint(tmp_path / "old", model_config=cfg.replace(cope_scaled=False))
    assert got.cope_scaled is False
    # a new export records the field
    save_params(tmp_path / "new", params, model_config=cfg)
    assert load_checkpoint(tmp_path / "new")[0].cope_scaled is True
