"""PromptSet reads by position: a host asks for the rows it holds and gets exactly those (the
same records as the whole set's), for a synthetic task and for a prepared prompts file."""

from __future__ import annotations

import json

import pytest

from jaxselm.config_io import load_config
from jaxselm.errors import DataError
from jaxselm.online.config import RunConfig
from jaxselm.online.prompts import PromptSet, build_tokenizer

TASK = """
run: {{output_dir: {out}, seed: 4}}
model: {{preset: tiny}}
data: {{source: task, task: sort, num_eval_prompts: 6}}
sft: {{steps: 1, demonstrations: 10}}
online: {{iterations: 2, prompts_per_iteration: 5}}
judge: {{kind: programmatic, function: "jaxselm.data.tasks:score"}}
"""

FILE = """
run: {{output_dir: {out}, seed: 4}}
model: {{preset: tiny, vocab_size: 260}}
data: {{source: prompts, prompts_path: {prefs}, tokenizer: "builtin:bytes", num_eval_prompts: 3}}
sft: {{steps: 1, demonstrations: 6}}
online: {{iterations: 2, prompts_per_iteration: 5}}
judge: {{kind: programmatic, function: "jaxselm.data.tasks:score"}}
"""


def _prompt_set(tmp_path, text: str, **fmt) -> PromptSet:
    path = tmp_path / "cfg.yaml"
    path.write_text(text.format(out=tmp_path / "run", **fmt))
    cfg = load_config(RunConfig, path)
    return PromptSet(cfg, build_tokenizer(cfg), tmp_path / "run")


def _prefs(tmp_path, n: int, *, chosen_missing_at=()):
    path = tmp_path / "prefs.jsonl"
    rows = []
    for i in range(n):
        row = {"id": f"r{i}", "prompt": f"sort {i % 10} {i // 10} =", "rejected": "0"}
        if i not in chosen_missing_at:
            row["chosen"] = f"{min(i % 10, i // 10)} {max(i % 10, i // 10)}"
        rows.append(json.dumps(row))
    path.write_text("\n".join(rows) + "\n")
    return path


def _check_positions(ps: PromptSet) -> None:
    for t in (1, 2):
        everything = ps.iteration(t)
        assert len(everything) == ps.iteration_size(t) == 5
        assert ps.iteration(t, [3, 0]) == [everything[3], everything[0]]
        assert ps.iteration(t, []) == []
    assert {r["prompt"] for r in ps.iteration(1)}.isdisjoint(r["prompt"] for r in ps.iteration(2))
    ev = ps.evaluation()
    assert len(ev) == ps.evaluation_size()
    assert ps.evaluation([2, 1]) == [ev[2], ev[1]]
    demos = ps.demonstrations()
    assert len(demos) == ps.demonstration_count()
    assert ps.demonstrations([4]) == [demos[4]]
    with pytest.raises(IndexError, match="iteration 1: position 5 out of range"):
        ps.iteration(1, [5])


def test_task_reads_by_position(tmp_path):
    ps = _prompt_set(tmp_path, TASK)
    assert ps.evaluation_size() == 6 and ps.demonstration_count() == 10
    _check_positions(ps)


def test_file_reads_by_position(tmp_path, monkeypatch):
    log = tmp_path / "reads"
    monkeypatch.setenv("JAXSELM_READ_LOG", str(log))
    ps = _prompt_set(tmp_path, FILE, prefs=_prefs(tmp_path, 30))
    assert ps.evaluation_size() == 3 and ps.demonstration_count() == 6
    _check_positions(ps)
    first = json.loads((log / "reads.p0.jsonl").read_text().splitlines()[0])
    assert first == {"set": "train", "iteration": 1, "positions": [0, 1, 2, 3, 4]}
    # held-out rows are never training rows
    train = {r["id"] for t in (1, 2) for r in ps.iteration(t)}
    assert train.isdisjoint(r["id"] for r in ps.evaluation())


def test_sft_row_without_chosen_is_a_one_line_error(tmp_path):
    ps = _prompt_set(tmp_path, FILE, prefs=_prefs(tmp_path, 30, chosen_missing_at=range(30)))
    with pytest.raises(
        DataError,
        match=r"prefs.jsonl: row '[0-9a-f]+' \(prompt 'sort \d \d ='\) has no 'chosen' "
        r"response for SFT \(sft uses the first sft.demonstrations=6 rows",
    ):
        ps.demonstrations([3])
    assert ps.demonstrations([]) == []
