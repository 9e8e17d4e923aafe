"""A tiny online run for the end-to-end tests (resume, multi-process): its config and its judge.

Two iterations of 8 prompts x 3 samples on a tiny CoPE model, with a judge whose scores rarely
tie (a hash of the response), so every iteration has preference pairs even though the tiny model
barely learns the task. Checkpoints every step, synchronously, so a kill lands between two.

Adam's eps is 1e-3 (not 1e-8): its update lr * g / (sqrt(v) + eps) turns float noise on a
vanishing gradient into a whole-lr step when eps is tiny, and the multi-process test compares
weights computed with differently ordered (equally correct) sums; with eps 1e-3 such noise moves
a weight by at most lr * noise / eps (tests/train/test_step.py makes the same choice).
"""

from __future__ import annotations

from pathlib import Path

CONFIG = """
run: {{output_dir: {out}, seed: 3, progress: false, async_checkpoints: false{run_extra}}}
model: {{preset: tiny-cope, cope_npos_max: 8}}
data:
  source: task
  task: sort
  task_settings: {{min_items: 2, max_items: 3, max_value: 4}}
  num_eval_prompts: 8
sft: {{steps: 4, batch_size: 8, learning_rate: 3.0e-3, demonstrations: 32}}
online:
  iterations: 2
  prompts_per_iteration: 8
  samples_per_prompt: 3
  max_new_tokens: 4
  generation_batch_size: 8
  epochs: 1
  batch_size: {batch_size}
  learning_rates: 1.0e-3
  checkpoint_every: 1
train: {{loss: selm, beta: 0.1, alpha: 1.0e-3, optimizer: {{eps: 1.0e-3}}}}
judge: {{kind: programmatic, function: "{judge}:score"}}
mesh: {{data: -1}}
"""

JUDGE = """
import zlib


def score(prompt, response):
    return (zlib.crc32(response.encode()) % 1000) / 1000.0
"""


def write_tiny_run(
    folder: Path,
    name: str,
    out: Path,
    *,
    judge: str,
    batch_size: int = 4,
    tensorboard: bool = True,
    seed: int = 3,
) -> Path:
    """``folder/<name>.yaml`` (output in ``out``) and the judge module ``folder/<judge>.py``
    (the test puts ``folder`` on PYTHONPATH)."""
    (folder / f"{judge}.py").write_text(JUDGE)
    text = CONFIG.format(
        out=out,
        batch_size=batch_size,
        judge=judge,
        run_extra="" if tensorboard else ", tensorboard: false",
    )
    cfg = folder / f"{name}.yaml"
    cfg.write_text(text.replace("seed: 3", f"seed: {seed}"))
    return cfg
