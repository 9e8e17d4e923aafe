"""Sampling a policy over a prompt set, every host reading only its rows: :func:`rollout`.

A prompt set of ``count`` prompts is cut into global batches of ``online.generation_batch_size``
prompts (the last completed with filler rows whose outputs are dropped). Of every batch, each
process reads and packs only the rows its devices hold (:func:`local_batch_rows`) and the global
batch is assembled from the hosts' pieces; the outputs (small: token ids and log-probs) come back
to every host. The result is a :class:`Generation`, saved as one safetensors file per phase.

The judge runs on process 0 only, so the prompt *records* (id, text, dataset responses) each host
read are written to ``<dir>/part-<process>.json`` (:func:`share_records`) and merged by process 0
(:func:`shared_records`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxselm.data.packing import bucket_length, pack_prompts
from jaxselm.errors import JaxselmError
from jaxselm.files import read_arrays, read_json, write_json
from jaxselm.online.context import RunContext
from jaxselm.parallel.multihost import (
    barrier,
    local_batch_rows,
    make_global_batch,
    process_max,
    to_host,
)
from jaxselm.sampling import generate
from jaxselm.train.driver import progress

Record = dict[str, Any]
_FIELDS = (
    "tokens",
    "lengths",
    "finish",
    "logprobs",
    "sampling_logprobs",
    "prompt_tokens",
    "prompt_lengths",
)


@dataclasses.dataclass(frozen=True)
class Generation:
    """n responses to each of P prompts (M = max_new_tokens, T = padded prompt length)."""

    tokens: np.ndarray  # [P, n, M] int32, pad after each response's end
    lengths: np.ndarray  # [P, n] int32, the stop token included
    finish: np.ndarray  # [P, n] int32, FinishReason (0: stop token)
    logprobs: np.ndarray  # [P, n, M] float32, the policy's temperature-1 log-probs
    sampling_logprobs: np.ndarray  # [P, n, M] float32, under the distribution sampled from
    prompt_tokens: np.ndarray  # [P, T] int32, left-padded
    prompt_lengths: np.ndarray  # [P] int32

    def save(self, path: Path, ctx: RunContext) -> None:
        ctx.write_arrays(path, {k: getattr(self, k) for k in _FIELDS})

    @classmethod
    def load(cls, path: Path) -> Generation:
        arrays = read_arrays(path)
        return cls(**{k: arrays[k] for k in _FIELDS})

    @property
    def samples_per_prompt(self) -> int:
        return int(self.tokens.shape[1])

    def responses(self) -> list[list[int]]:
        """Token ids of every response, prompt-major ([P * n] lists, stop token included)."""
        toks = self.tokens.reshape(-1, self.tokens.shape[-1])
        lens = self.lengths.reshape(-1)
        return [list(map(int, toks[i, : lens[i]])) for i in range(toks.shape[0])]

    def prompt_ids(self) -> list[list[int]]:
        """The prompts as id lists (left padding removed)."""
        width = self.prompt_tokens.shape[1]
        return [
            list(map(int, self.prompt_tokens[i, width - int(n) :]))
            for i, n in enumerate(self.prompt_lengths)
        ]


def rollout(
    ctx: RunContext,
    params: Any,
    count: int,
    fetch: Callable[[list[int]], list[Record]],
    *,
    key: jax.Array,
    n: int,
    greedy: bool,
    temperature: float,
    desc: str,
    preemptible: bool = False,
) -> tuple[Generation, dict[int, Record]]:
    """Sample ``n`` responses to each of ``count`` prompts read by ``fetch(positions)``.

    Returns the outputs of all prompts (on every process) and the records this process read, by
    position. With ``preemptible`` a SIGTERM stops it at the next batch boundary (Preempted).
    """
    o = ctx.cfg.online
    bs = min(o.generation_batch_size, count)
    nb = math.ceil(count / bs)
    mine = local_batch_rows(bs, ctx.mesh)
    positions = [b * bs + mine for b in range(nb)]  # >= count: filler rows of the last batch
    wanted = sorted(int(i) for i in set(np.concatenate(positions).tolist()) if i < count)
    recs = dict(zip(wanted, fetch(wanted)))
    longest = max((len(r["prompt_ids"]) for r in recs.values()), default=1)
    length = bucket_length(process_max(longest), min_length=8)
    out: dict[str, list[np.ndarray]] = {k: [] for k in _FIELDS}
    for b in progress(range(nb), total=nb, desc=desc, enabled=ctx.cfg.run.progress):
        real_rows = [recs[int(p)]["prompt_ids"] for p in positions[b] if p < count]
        batch = pack_prompts(real_rows, ctx.pad_id, length=length, batch_size=len(mine))
        batch = make_global_batch(batch, ctx.mesh, bs)
        res = generate(
            params,
            ctx.model,
            batch,
            rng=jax.random.fold_in(key, b),
            max_new_tokens=o.max_new_tokens,
            n=n,
            greedy=greedy,
            temperature=temperature,
            top_k=0 if greedy else o.top_k,
            top_p=1.0 if greedy else o.top_p,
            min_p=0.0 if greedy else o.min_p,
            stop_token_ids=ctx.stop_ids,
            pad_id=ctx.pad_id,
            mesh=ctx.mesh,
        )
        res, prompts = to_host((res, batch))
        real = min(bs, count - b * bs)
        out["tokens"].append(np.asarray(res.tokens)[:real])
        out["lengths"].append(np.asarray(res.lengths)[:real])
        out["finish"].append(np.asarray(res.finish_reason)[:real])
        out["logprobs"].append(np.asarray(res.logprobs)[:real])
        out["sampling_logprobs"].append(np.asarray(res.sampling_logprobs)[:real])
        out["prompt_tokens"].append(np.asarray(prompts.tokens, np.int32)[:real])
        out["prompt_lengths"].append(np.asarray(prompts.mask).sum(-1).astype(np.int32)[:real])
        if preemptible:
            ctx.check_stop()
    return Generation(**{k: np.concatenate(v) for k, v in out.items()}), recs


def share_records(folder: Path, recs: dict[int, Record]) -> None:
    """Each process writes the prompt records it read (what the judge needs) to
    ``folder/part-<process>.json``; process 0 merges them with :func:`shared_records`."""
    keep = ("id", "prompt", "chosen", "rejected", "truncated", "skipped")
    write_json(
        folder / f"part-{jax.process_index():05d}.json",
        [
            {"position": int(p), **{k: r[k] for k in keep if k in r}}
            for p, r in sorted(recs.items())
        ],
    )
    barrier(f"shared {folder}")


def shared_records(folder: Path, count: int) -> list[Record]:
    """The records of positions 0..count-1, from every process's part file."""
    by_position: dict[int, Record] = {}
    for part in sorted(folder.glob("part-*.json")):
        for rec in read_json(part):
            by_position[int(rec["position"])] = rec
    missing = [i for i in range(count) if i not in by_position]
    if missing:
        raise JaxselmError(
            f"{folder}: no host wrote the prompt record at position {missing[0]} "
            f"({len(missing)} of {count} missing)"
        )
    return [by_position[i] for i in range(count)]
