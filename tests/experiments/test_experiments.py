"""The experiment scripts' pipelines in --quick mode: they run, write their outputs, resume, and the
markdown tables are generated from the JSON outputs (numbers are not checked: tiny budgets)."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"_exp_{name}", REPO / "experiments" / f"{name}.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_cope_tasks_quick(tmp_path, capsys):
    mod = _load("cope_tasks")
    out, work = tmp_path / "out", tmp_path / "work"
    assert mod.main(["--quick", "--out", str(out), "--work-dir", str(work)]) == 0
    results = json.loads((out / "cope_tasks.json").read_text())
    keys = {(r["task"], r["position"], r["seed"], r["steps"]) for r in results["runs"]}
    assert keys == {("count", "rope", 0, 20), ("count", "cope", 0, 20)}
    for r in results["runs"]:
        assert 0.0 <= r["id_accuracy"] <= 1.0 and 0.0 <= r["ood_accuracy"]["longer"] <= 1.0
        assert r["id_error"] == pytest.approx(100 * (1 - r["id_accuracy"]))
        assert r["ood_error"]["longer"] == pytest.approx(100 * (1 - r["ood_accuracy"]["longer"]))
        # the ID and OOD evaluations are the runs' own metrics files
        assert (Path(r["run_dir"]) / "metrics.jsonl").is_file()
        assert (Path(r["run_dir"] + "-ood-longer") / "metrics.jsonl").is_file()
        assert r["ood_settings"]["longer"]["min_ops"] > r["id_settings"]["max_ops"]
    table = (out / "cope_tasks.md").read_text()
    assert table == mod.make_table(results)
    assert "| count |" in table and "RoPE" in table and "CoPE" in table

    # A second run resumes: nothing is recomputed.
    capsys.readouterr()
    assert mod.main(["--quick", "--out", str(out), "--work-dir", str(work)]) == 0
    assert capsys.readouterr().out.count("skip count") == 2
    assert len(json.loads((out / "cope_tasks.json").read_text())["runs"]) == 2

    # The table follows the JSON: edit a number, rebuild, and the table shows it.
    results["runs"][0]["id_error"] = 12.3456
    results["runs"][0]["ood_error"] = {"longer": 65.4321}
    (out / "cope_tasks.json").write_text(json.dumps(results))
    assert mod.main(["--table-only", "--out", str(out)]) == 0
    assert "12.3 / 65.4" in (out / "cope_tasks.md").read_text()

    # --merge adds the runs of a parallel sweep's JSON (here: one run relabelled as seed 7) once.
    other = {"runs": [dict(results["runs"][1], seed=7, id_error=1.0, ood_error={"longer": 2.0})]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    for _ in range(2):
        assert mod.main(["--merge", str(tmp_path / "other.json"), "--out", str(out)]) == 0
    merged = json.loads((out / "cope_tasks.json").read_text())
    assert len(merged["runs"]) == 3
    assert "1.0 / 2.0" in (out / "cope_tasks.md").read_text()


@pytest.mark.slow
def test_selm_vs_dpo_quick(tmp_path):
    mod = _load("selm_vs_dpo")
    out, work = tmp_path / "out", tmp_path / "work"
    assert mod.main(["--quick", "--out", str(out), "--work-dir", str(work)]) == 0
    results = json.loads((out / "selm_vs_dpo.json").read_text())
    assert sorted(r["alpha"] for r in results["runs"]) == [0.0, 1e-3]
    for r in results["runs"]:
        assert [p["iteration"] for p in r["per_iteration"]] == [0, 1]
        last = r["per_iteration"][-1]
        for key, _ in mod.METRICS:
            assert last[key] is not None, key
        assert 0.0 <= last["eval/sample_accuracy"] <= 1.0
        # the collected numbers are the run's own iteration record
        recs = [
            json.loads(line)
            for line in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        ]
        it1 = [x for x in recs if x.get("kind") == "iteration" and x["iteration"] == 1][-1]
        assert last["eval/kl"] == it1["eval/kl"]
    png = (out / "selm_vs_dpo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "selm_vs_dpo.md").read_text()
    assert table == mod.make_table(results)
    assert "DPO (alpha=0)" in table and "SELM alpha=0.001" in table

    results["runs"][0]["per_iteration"][-1]["eval/sample_accuracy"] = 0.777
    results["runs"][0]["per_iteration"][-1]["eval/accuracy"] = 0.111
    (out / "selm_vs_dpo.json").write_text(json.dumps(results))
    assert mod.main(["--table-only", "--out", str(out)]) == 0
    assert "0.777 / 0.111" in (out / "selm_vs_dpo.md").read_text()


def test_every_results_table_is_in_the_docs_verbatim():
    """docs/results.md quotes the scripts' own tables: each experiments/results/*.md appears in
    it unchanged (a table edited by hand, or a result not reported, fails here)."""
    docs = (REPO / "docs" / "results.md").read_text()
    tables = sorted((REPO / "experiments" / "results").glob("*.md"))
    assert len(tables) >= 3
    for table in tables:
        assert table.read_text().strip() in docs, table.name


@pytest.mark.slow
def test_selm_explore_quick(tmp_path, capsys):
    """The exploration study's pipeline: a SELM run and an entropy-bonus run with the learned
    judge, each iteration's policy measured by the verifier, tables and plot from the JSON."""
    mod = _load("selm_explore")
    out, work = tmp_path / "out", tmp_path / "work"
    assert mod.main(["--quick", "--out", str(out), "--work-dir", str(work)]) == 0
    results = json.loads((out / "selm_explore.json").read_text())
    names = [r["setting"] for r in results["runs"]]
    assert names == ["SELM a=1 y_ref=greedy", "DPO+entropy eta=0.1"]
    for r in results["runs"]:
        assert [it["iteration"] for it in r["iterations"]] == [0, 1]
        first, last = r["iterations"]
        assert first["kl0"] == pytest.approx(0.0, abs=1e-4)  # pi_0 against itself
        for it in r["iterations"]:
            assert 0 <= it["pass1"] <= it["passk"] <= 1 and 0 <= it["reward"] <= 1
        assert 0 <= last["unexplored"] <= 1 and 0 <= last["judge_agreement"] <= 1
        run = Path(r["run_dir"])
        assert (run / "iter_01" / "rm_labels.json").is_file()  # the learned judge judged
    assert r["overrides"]["train.entropy_bonus"] == 0.1
    assert (out / "selm_explore.md").read_text() == mod.make_table(results)
    assert (out / "selm_explore.png").stat().st_size > 0
    capsys.readouterr()
    assert mod.main(["--quick", "--out", str(out), "--work-dir", str(work)]) == 0
    assert capsys.readouterr().out.count("[selm_explore] skip") == 2
