"""HF checkpoint files without transformers: jaxselm round trips, sharding, streaming, bad inputs.

Every bad input must give a one-line CheckpointError / ConfigError naming the file (and tensor/key).
"""

import json
import os
import tracemalloc

import chex
import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import jaxselm.hf.checkpoint as ckpt
import jaxselm.hf.export as export
from jaxselm.errors import CheckpointError, ConfigError
from jaxselm.hf import iter_hf_tensors, load_hf_checkpoint, read_hf_config, save_hf_checkpoint
from jaxselm.hf.layout import NP_DTYPES
from jaxselm.model import abstract_params, get_preset, param_logical_axes

CFG = get_preset("tiny")  # V=64, E=32, L=2, H=4, K=2, F=64


def _params(cfg=CFG, head="lm", seed=0):
    """Random host params of the model's shapes, every entry distinct (so a swap is caught)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: rng.normal(0.0, 0.5, s.shape).astype(s.dtype), abstract_params(cfg, head=head)
    )


def _error(exc_type, fn, *words):
    with pytest.raises(exc_type) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for w in words:
        assert str(w) in msg, msg
    return msg


@pytest.fixture
def single(tmp_path):
    return save_hf_checkpoint(CFG, _params(), tmp_path / "single")


@pytest.fixture
def sharded(tmp_path):
    return save_hf_checkpoint(CFG, _params(), tmp_path / "sharded", max_shard_size="8KB")


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_shard_size", ["5GB", "8KB"])
@pytest.mark.parametrize("head, tie", [("lm", False), ("lm", True), ("reward", False)])
def test_fp32_round_trip_is_exact(tmp_path, max_shard_size, head, tie):
    cfg = CFG.replace(tie_embeddings=tie, num_labels=2 if head == "reward" else 1)
    params = _params(cfg, head)
    out = save_hf_checkpoint(
        cfg, params, tmp_path / "ckpt", max_shard_size=max_shard_size, head=head
    )
    files = sorted(os.listdir(out))
    if max_shard_size == "8KB":
        shards = [f for f in files if f.startswith("model-")]
        assert len(shards) > 2 and "model.safetensors.index.json" in files
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == {n for n, _ in iter_hf_tensors(cfg, params, head=head)}
        assert index["metadata"]["total_size"] == sum(
            os.path.getsize(out / f) for f in shards
        ) - sum(8 + int.from_bytes((out / f).read_bytes()[:8], "little") for f in shards)
    else:
        assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    cfg2, params2 = load_hf_checkpoint(out)
    assert cfg2 == cfg
    chex.assert_trees_all_equal(params2, params)


def test_bf16_export_rounds_once_and_reloads_exactly(tmp_path):
    params = _params()
    out = save_hf_checkpoint(CFG, params, tmp_path / "bf16", dtype="bfloat16", max_shard_size="8KB")
    assert read_hf_config(out)["torch_dtype"] == "bfloat16"
    cfg2, params2 = load_hf_checkpoint(out)
    assert (cfg2.param_dtype, cfg2.dtype) == ("bfloat16", "bfloat16")
    want = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), params)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, params2), want)
    # Loading as float32 upcasts exactly; saving that as bf16 again changes nothing.
    cfg3, params3 = load_hf_checkpoint(out, dtype="float32")
    assert cfg3.param_dtype == "float32" and params3["embed"].dtype == np.float32
    again = save_hf_checkpoint(
        cfg3, params3, tmp_path / "again", dtype="bfloat16", max_shard_size="8KB"
    )
    for f in os.listdir(out):
        assert (out / f).read_bytes() == (again / f).read_bytes(), f


def test_written_files_read_by_safetensors_library(single):
    with safe_open(str(single / "model.safetensors"), framework="numpy") as fh:
        assert fh.metadata() == {"format": "pt"}
        q = fh.get_tensor("model.layers.1.self_attn.q_proj.weight")
    kernel = np.asarray(_params()["layers"]["attn"]["q_proj"]["kernel"][1])  # [E, H, D]
    np.testing.assert_array_equal(q, kernel.reshape(32, 32).T)  # HF Linear: [H*D, E]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_raw_reader_matches_safetensors(tmp_path, dtype):
    """The fallback reader (old safetensors without numpy bfloat16) reads what safe_open reads."""
    arrays = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4).astype(NP_DTYPES[dtype]),
        "b": np.linspace(-1, 1, 5, dtype=np.float32).astype(NP_DTYPES[dtype]),
    }
    path = tmp_path / "x.safetensors"
    save_file(arrays, str(path))
    for name, arr in arrays.items():
        got = ckpt._read_raw(path, name)
        assert got.dtype == arr.dtype and got.shape == arr.shape
        np.testing.assert_array_equal(got, arr)


def test_load_places_parameters_with_given_shardings(sharded):
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))
    rules = {
        "vocab": "fsdp",
        "embed": None,
        "heads": "tensor",
        "kv_heads": "tensor",
        "mlp": "tensor",
    }

    def to_sharding(spec):
        return NamedSharding(mesh, P(*(rules.get(a) for a in spec)))

    shardings = jax.tree.map(
        to_sharding, param_logical_axes(CFG), is_leaf=lambda x: isinstance(x, P)
    )
    _, params = load_hf_checkpoint(sharded, shardings=shardings)
    jax.tree.map(
        lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(f"{x.sharding} != {s}"),
        params,
        shardings,
    )
    assert params["embed"].sharding.spec == P("fsdp", None)
    _, plain = load_hf_checkpoint(sharded)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, plain))
    replicated = NamedSharding(mesh, P())  # one sharding for every parameter
    _, params = load_hf_checkpoint(sharded, shardings=replicated)
    assert all(x.sharding == replicated for x in jax.tree.leaves(params))
    bad = {"embed": replicated}
    _error(
        ConfigError, lambda: load_hf_checkpoint(sharded, shardings=bad), "shardings: missing layers"
    )


def test_load_streams_one_parameter_at_a_time(tmp_path):
    """Host memory above the loaded result stays far below a second copy of the model.

    tracemalloc sees numpy's allocations (and, on CPU, device buffers that alias them), so
    peak - final is what loading needed on top of the params themselves. Reading every tensor
    first and stacking afterwards would need at least one full extra copy.
    """
    cfg = CFG.replace(
        vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, intermediate_size=64
    )
    params = _params(cfg)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    out = save_hf_checkpoint(cfg, params, tmp_path / "c", max_shard_size="40KB")
    load_hf_checkpoint(out)  # warm up imports and jax dispatch caches
    tracemalloc.start()
    try:
        _, loaded = load_hf_checkpoint(out)
        final, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - final < total / 2, (peak, final, total)
    del loaded


def test_save_streams_tensor_by_tensor(tmp_path):
    cfg = CFG.replace(
        vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, intermediate_size=64
    )
    params = jax.tree.map(np.asarray, _params(cfg))
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    tracemalloc.start()
    try:
        save_hf_checkpoint(cfg, params, tmp_path / "c", max_shard_size="5GB")  # one big file
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < total / 2, (peak, total)


# ---------------------------------------------------------------------------------------------
# Saving safely
# ---------------------------------------------------------------------------------------------


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    real = export._write_safetensors
    calls = []

    def fail_on_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        real(*args)

    monkeypatch.setattr(export, "_write_safetensors", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(CFG, _params(), tmp_path / "out", max_shard_size="8KB")
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_needs_overwrite(tmp_path, single):
    _error(
        CheckpointError,
        lambda: save_hf_checkpoint(CFG, _params(seed=1), single),
        single,
        "overwrite",
    )
    save_hf_checkpoint(CFG, _params(seed=1), single, overwrite=True, max_shard_size="8KB")
    assert not (single / "model.safetensors").exists()
    chex.assert_trees_all_equal(load_hf_checkpoint(single)[1], _params(seed=1))
    assert sorted(p.name for p in single.parent.iterdir()) == ["single"]  # no temporaries left
    empty = tmp_path / "empty"
    empty.mkdir()
    save_hf_checkpoint(CFG, _params(), empty)
    assert (empty / "config.json").is_file()


def test_save_checks_params_against_config(tmp_path):
    params = _params()
    _error(
        CheckpointError,
        lambda: save_hf_checkpoint(CFG.replace(intermediate_size=48), params, tmp_path / "a"),
        "layers/mlp/gate_proj/kernel",
        "[2, 32, 64]",
    )
    _error(
        CheckpointError,
        lambda: save_hf_checkpoint(CFG, params, tmp_path / "b", head="reward"),
        "score",
    )
    _error(
        ConfigError,
        lambda: save_hf_checkpoint(get_preset("tiny-cope"), params, tmp_path / "c"),
        "position",
    )
    absolute = CFG.replace(position="absolute")
    msg = _error(
        ConfigError,
        lambda: save_hf_checkpoint(absolute, _params(absolute), tmp_path / "d"),
        "'absolute'",
    )
    assert msg.startswith("model.position:"), msg
    assert not any(tmp_path.iterdir())


def test_generation_config_and_token_ids(tmp_path):
    out = save_hf_checkpoint(
        CFG, _params(), tmp_path / "g", bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0
    )
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 1,
        "eos_token_id": [2, 3],
        "pad_token_id": 0,
    }
    assert read_hf_config(out)["eos_token_id"] == [2, 3]


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def _edit_config(path, **changes):
    hf = json.loads((path / "config.json").read_text())
    hf.update(changes)
    for k, v in changes.items():
        if v is None:
            del hf[k]
    (path / "config.json").write_text(json.dumps(hf))


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_truncated_safetensors_file(request, layout):
    path = request.getfixturevalue(layout)
    victim = max(path.glob("model*.safetensors"))
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    _error(CheckpointError, lambda: load_hf_checkpoint(path), victim)


def test_garbage_safetensors_header(single):
    (single / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    _error(CheckpointError, lambda: load_hf_checkpoint(single), "model.safetensors")


def test_config_missing_key(single):
    _edit_config(single, hidden_size=None)
    _error(
        ConfigError,
        lambda: load_hf_checkpoint(single),
        single / "config.json",
        "hidden_size",
        "missing",
    )


def test_config_not_json(single):
    (single / "config.json").write_text("{'hidden_size': 32,")
    _error(
        ConfigError, lambda: load_hf_checkpoint(single), single / "config.json", "not valid JSON"
    )


def test_config_missing(single):
    (single / "config.json").unlink()
    _error(ConfigError, lambda: load_hf_checkpoint(single), single / "config.json", "not found")


def test_tensor_with_wrong_shape(single):
    _edit_config(single, intermediate_size=48)
    _error(
        CheckpointError,
        lambda: load_hf_checkpoint(single),
        single / "model.safetensors",
        "model.layers.0.mlp.gate_proj.weight",
        "[64, 32]",
        "[48, 32]",
    )


def test_missing_tensor_single_file(single):
    tensors = load_file(str(single / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(single / "model.safetensors"), metadata={"format": "pt"})
    _error(
        CheckpointError,
        lambda: load_hf_checkpoint(single),
        single / "model.safetensors",
        "missing tensor model.layers.1.mlp.down_proj.weight",
    )


def test_missing_tensor_in_index(sharded):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.norm.weight"]
    index_path.write_text(json.dumps(index))
    _error(
        CheckpointError,
        lambda: load_hf_checkpoint(sharded),
        index_path,
        "missing tensor model.norm.weight",
    )


def test_index_points_to_the_wrong_shard(sharded):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    wm = index["weight_map"]
    first = wm["model.embed_tokens.weight"]
    other = next(f for f in wm.values() if f != first)
    wm["model.embed_tokens.weight"] = other
    index_path.write_text(json.dumps(index))
    _error(
        CheckpointError,
        lambda: load_hf_checkpoint(sharded),
        sharded / other,
        "model.embed_tokens.weight",
    )


def test_missing_shard_file(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    _error(CheckpointError, lambda: load_hf_checkpoint(sharded), victim, "not found")


def test_unexpected_tensor_is_refused(single):
    tensors = load_file(str(single / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(
        4, np.float32
    )  # ignored, as HF does
    save_file(tensors, str(single / "model.safetensors"), metadata={"format": "pt"})
    _error(
        CheckpointError, lambda: load_hf_checkpoint(single), "model.layers.0.self_attn.q_proj.bias"
    )


def test_integer_tensor_is_refused(single):
    tensors = load_file(str(single / "model.safetensors"))
    tensors["model.norm.weight"] = np.ones(32, np.int32)
    save_file(tensors, str(single / "model.safetensors"), metadata={"format": "pt"})
    _error(CheckpointError, lambda: load_hf_checkpoint(single), "model.norm.weight", "I32")


def test_pickle_weights_are_never_loaded(single):
    (single / "model.safetensors").unlink()
    (single / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    _error(CheckpointError, lambda: load_hf_checkpoint(single), "pytorch_model.bin", "pickle")


def test_head_mismatch_and_bad_dtype(single, tmp_path):
    _error(
        ConfigError, lambda: load_hf_checkpoint(single, head="reward"), "architectures", "reward"
    )
    _error(ConfigError, lambda: load_hf_checkpoint(single, dtype="int8"), "dtype")
    _error(
        CheckpointError,
        lambda: load_hf_checkpoint(tmp_path / "nowhere"),
        "nowhere",
        "not a directory",
    )
