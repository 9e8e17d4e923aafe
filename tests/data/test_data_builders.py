"""TFDS builders (array_record, no TensorFlow), prompt hygiene counts, bad rows, iteration slices
and the resumable reader state."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from jaxselm.data import builders, hygiene, iteration, rows
from jaxselm.errors import ConfigError, DataError

EVAL = [
    "Write a haiku about the ocean at night under the full moon please",
    "請用三句話介紹長城的歷史和意義",
]


def _write_jsonl(path, items):
    path.write_text(
        "\n".join(json.dumps(x, ensure_ascii=False) if not isinstance(x, str) else x for x in items)
        + "\n",
        encoding="utf-8",
    )
    return path


def _crafted(tmp_path):
    """Rows: 5 good distinct, 1 exact dup, 1 near dup, 2 contaminated, 4 bad."""
    good = [
        {
            "prompt": "Explain how photosynthesis turns sunlight into chemical energy in plants.",
            "prompt_id": "p1",
            "chosen": "Light reactions...",
            "rejected": "It does not.",
        },
        {
            "messages": [
                {"role": "system", "content": "Be concise."},
                {"role": "user", "content": "如何学习机器学习？请给出三个建议。"},
                {"role": "assistant", "content": "多练习。"},
            ],
            "chosen": [
                {"role": "user", "content": "如何学习机器学习？"},
                {"role": "assistant", "content": "先学数学。"},
            ],
            "rejected": [
                {"role": "user", "content": "如何学习机器学习？"},
                {"role": "assistant", "content": "不知道。"},
            ],
        },
        {"prompt": "List three uses of the Fourier transform in signal processing and imaging."},
        {"prompt": "Translate 'good morning' into French, German and Spanish, with accents."},
        {"prompt": "What are the main differences between a process and a thread in an OS?"},
    ]
    rows_ = [
        *good,
        {"prompt": "  explain how PHOTOSYNTHESIS turns sunlight into chemical energy in plants. "},
        {
            "prompt": "List three uses of the Fourier transform in signal processing and imaging!!"
            " Thanks."
        },
        {
            "prompt": "Please write a haiku about the ocean at night under the full moon please, "
            "with a title."
        },
        {"prompt": "长城：請用三句話介紹長城的歷史和意義"},
        {"prompt": ""},
        {"prompt": 17},
        {"text": "no prompt field"},
        {"prompt": "x" * 500},
    ]
    return _write_jsonl(tmp_path / "prompts.jsonl", rows_), good


def _cfg(tmp_path, **kw):
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("\n".join(EVAL) + "\n", encoding="utf-8")
    base = {
        "files": [str(_crafted(tmp_path)[0])],
        "decontam_file": str(eval_file),
        "decontam_ngram": 8,
        "max_prompt_chars": 400,
        "near_dup_threshold": 0.6,
        "num_perm": 64,
    }
    base.update(kw)
    return base


def test_prompts_builder_counts_and_read_back(tmp_path):
    builder = builders.prepare_prompts(_cfg(tmp_path), tmp_path / "tfds")
    counts = builder.counts["train"]
    assert counts == {
        "rows_read": 13,
        "bad_rows": 4,
        "bad_missing_field": 1,
        "bad_wrong_type": 1,
        "bad_empty_prompt": 1,
        "bad_too_long": 1,
        "bad_template_error": 0,
        "exact_duplicates": 1,
        "near_duplicates": 1,
        "contaminated": 2,
        "kept": 5,
    }
    src = builders.PromptSource(builder, "train")
    assert len(src) == 5
    recs = [src[i] for i in range(5)]
    assert recs[0]["id"] == "p1" and recs[0]["chosen"] == "Light reactions..."
    assert recs[0]["rejected"] == "It does not." and recs[0]["answer"] == ""
    zh = recs[1]
    assert zh["prompt"] == "如何学习机器学习？请给出三个建议。"
    assert zh["messages"] == [
        {"role": "system", "content": "Be concise."},
        {"role": "user", "content": "如何学习机器学习？请给出三个建议。"},
    ]
    assert (zh["chosen"], zh["rejected"]) == ("先学数学。", "不知道。")
    assert len(zh["id"]) == 32  # stable hash when no prompt_id
    assert src.get_many([4, 0])[1] == recs[0]
    # Prepared data is on disk as array_record and reopens from its directory alone.
    assert list(builder.data_path.glob("*.array_record*"))
    again = builders.PromptSource.from_directory(builder.data_dir)
    assert [again[i] for i in range(5)] == recs
    assert again.counts["train"] == counts
    # Same config and files: reused; a changed file: prepared anew.
    assert builders.prepare_prompts(_cfg(tmp_path), tmp_path / "tfds").data_dir == builder.data_dir
    cfg = _cfg(tmp_path)
    path = tmp_path / "prompts.jsonl"
    path.write_text(path.read_text() + json.dumps({"prompt": "A brand new question?"}) + "\n")
    changed = builders.PromptsBuilder(builders.PromptsConfig.from_dict(cfg), tmp_path / "tfds")
    assert changed.data_dir != builder.data_dir


def test_prompts_builder_ultrafeedback_parquet_and_test_split(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    def conv(user, reply):
        return [{"content": user, "role": "user"}, {"content": reply, "role": "assistant"}]

    # The UltraFeedback-binarized layout: chosen / rejected / messages are message lists.
    prompts = ["Hello there, general Kenobi", "你好，世界", "Tell me a joke about cats"]
    table = pa.table(
        {
            "prompt": [*prompts[:2], None],
            "prompt_id": ["a", "b", "c"],
            "chosen": [conv(p, f"good {i}") for i, p in enumerate(prompts)],
            "rejected": [conv(p, f"bad {i}") for i, p in enumerate(prompts)],
            "messages": [conv(p, f"good {i}") for i, p in enumerate(prompts)],
            "score_chosen": [8.0, 9.0, 7.0],
            "score_rejected": [2.0, 3.0, 1.0],
        }
    )
    pq.write_table(table, tmp_path / "train_prefs.parquet")
    _write_jsonl(tmp_path / "test.jsonl", [{"prompt": "held out question"}])
    builder = builders.prepare_prompts(
        {
            "files": [str(tmp_path / "train_prefs.parquet")],
            "test_files": [str(tmp_path / "test.jsonl")],
        },
        tmp_path / "tfds",
    )
    train = builders.PromptSource(builder, "train")
    got = [train[i] for i in range(len(train))]
    assert [r["id"] for r in got] == ["a", "b", "c"]
    assert [(r["chosen"], r["rejected"]) for r in got] == [
        (f"good {i}", f"bad {i}") for i in (0, 1, 2)
    ]
    assert got[1]["prompt"] == "你好，世界"
    # Row c has no prompt string; its prompt comes from `messages`, the assistant turn removed.
    assert got[2]["prompt"] == prompts[2]
    assert got[2]["messages"] == [{"role": "user", "content": prompts[2]}]
    assert builders.PromptSource(builder, "test")[0]["prompt"] == "held out question"
    with pytest.raises(DataError, match="no split 'validation'"):
        builders.PromptSource(builder, "validation")


def test_bad_rows_raise_one_line_errors_naming_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"prompt": ["not", "str"]}])
    with pytest.raises(DataError) as e:
        builders.prepare_prompts({"files": [str(path)], "on_bad_row": "error"}, tmp_path / "t")
    assert str(e.value) == f"{path}:2: field 'prompt' must be a string, got list"
    # A failed preparation leaves no half-written dataset behind.
    assert not list((tmp_path / "t").rglob("*.array_record*"))
    assert not list((tmp_path / "t").rglob("incomplete*"))

    broken = _write_jsonl(
        tmp_path / "broken.jsonl", [{"prompt": "ok"}, "", '{"prompt": "truncated']
    )
    with pytest.raises(DataError) as e:
        builders.prepare_prompts({"files": [str(broken)]}, tmp_path / "t")
    msg = str(e.value)
    assert msg.startswith(f"{broken}:3: not valid JSON") and "\n" not in msg

    arr = tmp_path / "rows.json"
    arr.write_text(json.dumps([{"prompt": "one"}, {"prompt": "two"}]))
    got = list(rows.read_records([arr], rows.RowFormat()))
    assert [r["prompt"] for r in got] == ["one", "two"]
    arr.write_text('[{"prompt": "one"},\n {"prompt": ]')
    with pytest.raises(DataError, match=r"rows.json:2: not valid JSON"):
        list(rows.read_records([arr], rows.RowFormat()))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not valid UTF-8"):
        list(rows.read_records([tmp_path / "latin1.jsonl"], rows.RowFormat()))
    with pytest.raises(DataError, match=r"missing.jsonl: file not found"):
        builders.prepare_prompts({"files": [str(tmp_path / "missing.jsonl")]}, tmp_path / "t")
    with pytest.raises(DataError, match=r"data.csv: unsupported file type"):
        (tmp_path / "data.csv").write_text("prompt\nhi\n")
        list(rows.read_records([tmp_path / "data.csv"], rows.RowFormat()))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(DataError, match=r"bad.parquet: not a readable Parquet file"):
        list(rows.read_records([tmp_path / "bad.parquet"], rows.RowFormat()))


def test_max_prompt_tokens_with_a_tokenizer(tmp_path):
    path = _write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "short"}, {"prompt": "长" * 10}, {"prompt": "a" * 29}, {"prompt": "a" * 31}],
    )
    cfg = {"files": [str(path)], "tokenizer": "builtin:bytes", "max_prompt_tokens": 30}
    builder = builders.prepare_prompts(cfg, tmp_path / "tfds")
    src = builders.PromptSource(builder)
    # Byte tokens: "长" is 3 bytes, so 10 of them (30 tokens) fit; 31 "a" do not.
    assert [src[i]["prompt"] for i in range(len(src))] == ["short", "长" * 10, "a" * 29]
    assert builder.counts["train"]["bad_too_long"] == 1
    with pytest.raises(DataError, match=r"p.jsonl:4: the prompt has 31 tokens, over max_prompt"):
        builders.prepare_prompts({**cfg, "on_bad_row": "error"}, tmp_path / "tfds")
    with pytest.raises(ConfigError, match="max_prompt_tokens needs a tokenizer"):
        builders.PromptsConfig.from_dict({"files": ["a"], "max_prompt_tokens": 3})


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.prompts.on_bad_row: "):
        builders.PromptsConfig.from_dict({"files": ["a"], "on_bad_row": "ignore"})
    with pytest.raises(ConfigError, match=r"^data.prompts.typo: "):
        builders.PromptsConfig.from_dict({"files": ["a"], "typo": 1})
    with pytest.raises(ConfigError, match=r"^data.prompts.files: "):
        builders.PromptsConfig.from_dict({"files": "a.jsonl"})
    with pytest.raises(ConfigError, match=r"^data.synthetic.num_train: "):
        builders.SyntheticConfig.from_dict({"task": "sort", "num_train": -1})


def test_hygiene_units_and_thresholds():
    assert hygiene.text_units("Hello, 世界! It's 2024.") == ["hello", "世", "界", "it", "s", "2024"]
    assert hygiene.normalize_text("  A\u00a0B\tc ") == "a b c"
    dec = hygiene.Decontaminator(["one two three four five", "short one"], ngram=4)
    assert dec("zero ONE two three four six")  # shares a 4-gram
    assert dec("this is a Short one, right?")  # contains a short eval prompt whole
    assert not dec("one two three five four")
    index = hygiene.NearDuplicateIndex(threshold=0.7, num_perm=128)
    base = "the cat sat on the mat and looked at the dog in the garden all day long"
    assert not index.add(base)
    assert index.add(base + " today")
    assert not index.add("a completely different sentence about quantum chromodynamics")


def test_synthetic_builder_prepares_and_reads_back(tmp_path):
    cfg = {
        "task": "sort",
        "settings": {"min_items": 1, "max_items": 2, "max_value": 3},
        "num_train": 60,
        "num_test": 10,
        "seed": 4,
    }
    builder = builders.prepare_synthetic(cfg, tmp_path / "tfds")
    train = builders.PromptSource(builder, "train")
    test = builders.PromptSource(builder, "test")
    removed = builder.counts["train_overlap_with_test"]["removed"]
    assert removed > 0 and len(train) == 60 - removed and len(test) == 10
    test_prompts = {test[i]["prompt"] for i in range(len(test))}
    for i in range(len(train)):
        rec = train[i]
        assert rec["prompt"] not in test_prompts
        assert builder.task.score(rec["prompt"], rec["answer"]) == 1.0
        assert rec["messages"] == [{"role": "user", "content": rec["prompt"]}]
    for name in ("copy", "count", "flipflop"):
        b = builders.prepare_synthetic(
            {"task": name, "num_train": 4, "num_test": 2}, tmp_path / "tfds"
        )
        src = builders.PromptSource(b, "test")
        assert len(src) == 2
        assert all(b.task.score(src[i]["prompt"], src[i]["answer"]) == 1.0 for i in range(2))


@pytest.mark.parametrize("n_rows,k", [(10, 3), (7, 7), (5, 1), (2, 3)])
def test_iteration_slices_are_disjoint_and_cover(n_rows, k):
    parts = [iteration.iteration_indices(n_rows, k, t, seed=1) for t in range(k)]
    flat = np.concatenate(parts)
    assert sorted(flat.tolist()) == list(range(n_rows))  # disjoint and covering
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert (iteration.shuffled_order(n_rows, 1) == iteration.shuffled_order(n_rows, 1)).all()
    with pytest.raises(ConfigError, match="iteration"):
        iteration.iteration_slice(n_rows, k, k)


def test_reader_resumes_from_saved_state(tmp_path):
    builder = builders.prepare_synthetic(
        {"task": "flipflop", "num_train": 23, "num_test": 1, "settings": {"length": 4}},
        tmp_path / "tfds",
    )
    src = builders.PromptSource(builder, "train")
    n = len(src)
    assert iteration.shuffled_order(n, 0).tolist() != list(range(n))
    state = iteration.ReaderState(seed=0, num_iterations=3, n_rows=n)
    seen_by_iteration = []
    for t in range(3):
        ids = []
        while not state.done:
            batch, state = iteration.read_batch(src, state, batch_size=4)
            ids += [r["id"] for r in batch]
            # Saving and restoring mid-iteration continues where it stopped.
            state = iteration.ReaderState.from_json(state.to_json())
        seen_by_iteration.append(ids)
        assert iteration.read_batch(src, state, 4)[0] == []
        if t < 2:
            state = state.next_iteration()
    all_ids = [i for ids in seen_by_iteration for i in ids]
    assert sorted(all_ids) == sorted(src[i]["id"] for i in range(n))
    # Resuming from a mid-iteration state reads exactly the rest.
    s0 = iteration.ReaderState(seed=0, num_iterations=3, n_rows=n, iteration=1, position=2)
    rest, _ = iteration.read_batch(src, iteration.ReaderState.from_json(s0.to_json()), 100)
    assert [r["id"] for r in rest] == seen_by_iteration[1][2:]
    with pytest.raises(DataError, match=f"has {n} rows but the saved reader state was made for"):
        iteration.read_batch(src, iteration.ReaderState(seed=0, num_iterations=3, n_rows=n + 1), 1)
    with pytest.raises(DataError, match="reader state: expected keys"):
        iteration.ReaderState.from_json('{"seed": 0}')


def test_builders_work_without_tensorflow(tmp_path):
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("tensorflow is installed here; this test checks a TensorFlow-free install")
    code = (
        "import sys\n"
        "from jaxselm.data import builders\n"
        f"b = builders.prepare_prompts({{'files': [{str(_crafted(tmp_path)[0])!r}]}}, "
        f"{str(tmp_path / 'tfds')!r})\n"
        "assert len(builders.PromptSource(b, 'train')) == 8\n"
        f"b = builders.prepare_synthetic({{'task': 'sort', 'num_train': 3, 'num_test': 1}}, "
        f"{str(tmp_path / 'tfds')!r})\n"
        "assert len(builders.PromptSource(b, 'train')) == 3\n"
        "assert not any(m.split('.')[0] == 'tensorflow' for m in sys.modules)\n"
        "try:\n    import tensorflow\nexcept ImportError:\n    print('NO_TF_OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "NO_TF_OK" in out.stdout, out.stderr[-2000:]
