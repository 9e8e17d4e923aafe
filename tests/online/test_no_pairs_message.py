"""When an iteration has no preference pairs the log says why, from the judge's own counts."""

import json
from types import SimpleNamespace

from jaxselm.online.phases import JUDGE, no_pairs_reason


def _ctx(tmp_path, stats):
    d = tmp_path / "iter_01"
    d.mkdir()
    (d / JUDGE).write_text(json.dumps({"pairs": [], "stats": stats}))
    return SimpleNamespace(iter_dir=lambda t: tmp_path / f"iter_{t:02d}")


def test_all_nan_scores_say_so_with_the_judge_failures(tmp_path):
    stats = {"n_prompts": 8, "dropped_nan": 8, "judge_failures": 16, "judge_unparseable": 0}
    why = no_pairs_reason(_ctx(tmp_path, stats), 1)
    assert why == (
        "8 prompt(s) with a score the judge could not give (NaN); "
        "judge failures: 16, unparseable replies: 0"
    )
    assert "ties" not in why


def test_ties_margin_and_long_prompts_are_counted(tmp_path):
    stats = {"dropped_ties": 3, "dropped_margin": 2, "skipped_prompts": 1}
    assert no_pairs_reason(_ctx(tmp_path, stats), 1) == (
        "3 prompt(s) with all scores tied; 2 prompt(s) below online.min_margin; "
        "1 prompt(s) skipped as longer than data.max_prompt_tokens"
    )
