"""Every shipped config validates (paths that must exist are pointed at temporary files)."""

from pathlib import Path

import pytest

from jaxselm.config_io import load_config
from jaxselm.data.tasks import make_task
from jaxselm.online.config import RunConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_validates(path, tmp_path):
    overrides = []
    text = path.read_text()
    if "source: prompts" in text:
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n')
        overrides = [
            f"data.prompts_path={prompts}",
            f"data.tokenizer={tmp_path}",
            f"init.checkpoint={tmp_path}",
        ]
    cfg = load_config(RunConfig, path, overrides)
    model = cfg.model
    if cfg.data.source == "task":
        tok = make_task(cfg.data.task, **cfg.data.task_settings).tokenizer()
        assert tok.vocab_size <= model.vocab_size


def test_paper_settings_in_7b_configs():
    z = load_config(RunConfig, CONFIGS[0].parent / "zephyr-7b.yaml", ["data.source=task"])
    assert z.train.beta == 0.01 and z.online.alphas == [0.0, 1e-3, 1e-3]
    assert z.online.learning_rates == [5e-7, 3e-7, 1e-7] and z.online.batch_size == 128
    ll = load_config(RunConfig, CONFIGS[0].parent / "llama3-8b.yaml", ["data.source=task"])
    assert ll.online.alphas == [1e-4] * 3 and ll.model.num_params() == pytest.approx(
        8.03e9, rel=5e-3
    )
