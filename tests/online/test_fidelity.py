"""The SELM pipeline as its authors ran it, end to end on tiny models:

- the Zephyr schedule: offline DPO on the dataset's pairs first (online.offline_iterations), then
  online iterations from that model;
- joint ranking: one greedy response per prompt ranked TOGETHER with the dataset's chosen and
  rejected responses by a pairwise LLM judge (which compares only within a call: ranked apart,
  a lone response has no score and no pair is made);
- prompts longer than data.max_prompt_tokens truncated from the left, counted and reported
  (or skipped, or an error);
- y_ref = the iteration-start policy's greedy response.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxselm.cli import main
from jaxselm.config_io import load_config
from jaxselm.data.tokenizer_base import ByteTokenizer
from jaxselm.errors import DataError
from jaxselm.online.config import RunConfig
from jaxselm.online.prompts import PromptSet
from jaxselm.sampling import generate
from jaxselm.train import load_params

PREFS_CFG = """
run: {{output_dir: {out}, seed: 0, progress: false, tensorboard: false}}
model: {{preset: tiny, vocab_size: 260}}
data:
  source: prompts
  prompts_path: {prefs}
  tokenizer: "builtin:bytes"
  num_eval_prompts: 4
  max_prompt_tokens: 24
online:
  iterations: 2
  offline_iterations: 1
  prompts_per_iteration: 12
  samples_per_prompt: 1
  greedy: true
  include_dataset_responses: true
  max_new_tokens: 4
  generation_batch_size: 8
  batch_size: 4
  learning_rates: [1.0e-3, 1.0e-3]
  alphas: [0.0, 1.0e-3]
train: {{loss: selm, beta: 0.1}}
judge: {{kind: llm, base_url: "{url}", model: longest, mode: pairwise, max_retries: 0}}
mesh: {{data: -1}}
"""


class LongestWins(BaseHTTPRequestHandler):
    """A pairwise chat-completions judge: the longer response wins (ties: A)."""

    def do_POST(self):  # noqa: N802 - the http.server interface
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        a = re.search(r"\[The start of response A\]\n(.*)\n\[The end of response A\]", user, re.S)
        b = re.search(r"\[The start of response B\]\n(.*)\n\[The end of response B\]", user, re.S)
        verdict = "A" if len(a.group(1)) >= len(b.group(1)) else "B"
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), LongestWins)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.mark.slow
def test_zephyr_schedule_joint_ranking_and_long_prompts(tmp_path, judge_url, capsys):
    rng = np.random.default_rng(0)
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "glass", "ocean"]
    rows = []
    for i in range(40):  # distinct prompts (the preparation drops near-duplicates), some long
        prompt = f"q{i} " + " ".join(rng.choice(words, size=1 + i % 7))
        rows.append(
            {
                "prompt": prompt,
                "chosen": "a long, careful answer " + str(i),
                "rejected": str(i % 10),
            }
        )
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(PREFS_CFG.format(out=tmp_path / "run", prefs=prefs, url=judge_url))
    assert main(["online", "--config", str(cfg)]) == 0
    run = tmp_path / "run"

    # Iteration 1: offline, the dataset's own pairs of its slice; no generation of samples.
    first = json.loads((run / "iter_01" / "judge.json").read_text())
    assert first["stats"]["offline"] == 1 and first["stats"]["n_pairs"] == 12
    assert all(
        isinstance(p["chosen"], str) and isinstance(p["rejected"], str) for p in first["pairs"]
    )
    # Iteration 2: one greedy response per prompt, ranked with the dataset's chosen/rejected in
    # one call: every prompt gets a pair (the longest, the dataset's chosen, wins; the shortest
    # loses), and 3 comparisons per prompt were asked (both orders each).
    second = json.loads((run / "iter_02" / "judge.json").read_text())
    stats = second["stats"]
    assert stats["n_pairs"] == 12 and stats["judge_comparisons"] == 3 * 12
    assert stats["judge_requests"] == 2 * 3 * 12
    assert all(p["chosen"].startswith("a long, careful answer") for p in second["pairs"])
    assert all(p["refresp"] == p["prompt_index"] for p in second["pairs"])  # y_ref: the greedy one
    # Long prompts were cut from the left, counted, and reported in the iteration record.
    assert stats["truncated_prompts"] > 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    it2 = next(r for r in recs if r["kind"] == "iteration" and r["iteration"] == 2)
    assert it2["samples/truncated_prompts"] == stats["truncated_prompts"]
    assert {"generate_s", "judge_s", "train_s"} <= {
        k for r in recs if r["kind"] == "time" and r["iteration"] == 2 for k in r
    }
    assert "time" in capsys.readouterr().out  # per-phase times in the printed table


def test_long_prompts_truncate_skip_or_error(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x"}\n')

    def prompt_set(policy: str) -> PromptSet:
        cfg = load_config(RunConfig, None, [
            "data.source=prompts", f"data.prompts_path={prompts}", "data.tokenizer=builtin:bytes",
            "data.max_prompt_tokens=5", f"data.long_prompts={policy}", "model.preset=tiny",
        ])  # fmt: skip
        ps = PromptSet.__new__(PromptSet)  # encoding only: no dataset preparation
        ps.cfg, ps.tok, ps.task = cfg, ByteTokenizer(), None
        return ps

    rec = {"id": "q1", "prompt": "hello world"}
    ids = prompt_set("truncate").encode_prompt(rec)
    assert ids == ByteTokenizer().encode("world") and rec["truncated"]  # the last 5 tokens
    rec = {"id": "q1", "prompt": "hello world"}
    prompt_set("skip").encode_prompt(rec)
    assert rec["skipped"] and "truncated" not in rec
    with pytest.raises(DataError, match=r"^prompt q1: 12 tokens exceed data.max_prompt_tokens=5"):
        prompt_set("error").encode_prompt({"id": "q1", "prompt": "hello world"})
    short = {"id": "q2", "prompt": "hi"}  # BOS + 2 bytes
    ids = prompt_set("error").encode_prompt(short)
    assert ids == ByteTokenizer().encode("hi", add_bos=True) and "truncated" not in short


@pytest.mark.slow
def test_refresp_is_the_start_policys_greedy_response(tmp_path):
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    out = tmp_path / "run"
    assert (
        main(
            [
                "online",
                "--config",
                str(demo),
                f"run.output_dir={out}",
                "run.progress=false",
                "run.tensorboard=false",
                "online.iterations=1",
                "online.refresp=greedy",
                "online.prompts_per_iteration=16",
                "online.samples_per_prompt=2",
                "sft.steps=10",
                "data.num_eval_prompts=8",
                "online.learning_rates=[1.0e-3]",
            ]
        )
        == 0
    )
    gen = load_file(out / "iter_01" / "generate.safetensors")
    ref = load_file(out / "iter_01" / "refresp.safetensors")
    p, n = gen["lengths"].shape
    cfg = load_config(RunConfig, demo, [])
    policy = load_params(out / "policy" / "iter_00")
    width = gen["prompt_tokens"].shape[1]
    mask = np.arange(width)[None, :] >= width - gen["prompt_lengths"][:, None]
    want = generate(
        policy,
        cfg.model,
        gen["prompt_tokens"],
        mask,
        rng=jax.random.key(0),
        max_new_tokens=cfg.online.max_new_tokens,
        greedy=True,
        stop_token_ids=(2,),
        pad_id=0,
    )
    np.testing.assert_array_equal(ref["tokens"][:, 0], np.asarray(want.tokens)[:, 0])
    pairs = json.loads((out / "iter_01" / "judge.json").read_text())["pairs"]
    assert pairs and all(x["refresp"] == p * n + x["prompt_index"] for x in pairs)
