"""Where an online run's prompts come from: a synthetic task or a prompts file, plus tokenization.

Each iteration t (1-based) reads its own disjoint slice of the training prompts; evaluation uses a
fixed held-out set (the task's test split, or a second file, or rows held out of the first file).
Records are dicts with ``id``, ``prompt`` (text shown to the judge), ``prompt_ids`` (token ids fed
to the policy, chat template applied) and, when the data has them, ``chosen`` / ``rejected``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from jaxselm.data.iteration import iteration_indices
from jaxselm.data.tasks import Task, generate_examples, make_demonstrations, make_task
from jaxselm.data.tokenizer import Tokenizer, load_tokenizer
from jaxselm.errors import ConfigError, DataError
from jaxselm.online.config import RunConfig


def build_tokenizer(cfg: RunConfig) -> Tokenizer:
    spec = cfg.data.tokenizer
    if spec is None:
        if cfg.data.source != "task":
            raise ConfigError("data.tokenizer: required when data.source is 'prompts'")
        return make_task(cfg.data.task, **cfg.data.task_settings).tokenizer()
    return load_tokenizer(spec)


def _text_of(messages_or_text: Any) -> str:
    if isinstance(messages_or_text, str):
        return messages_or_text
    if isinstance(messages_or_text, list) and messages_or_text:
        return str(messages_or_text[-1].get("content", ""))
    return ""


class PromptSet:
    """Training prompts per iteration, evaluation prompts, and SFT demonstrations."""

    def __init__(self, cfg: RunConfig, tokenizer: Tokenizer, work_dir: Path):
        self.cfg = cfg
        self.tok = tokenizer
        self.seed = cfg.run.seed
        self.task: Task | None = None
        self._rows: Any = None
        self._eval_rows: list[dict[str, Any]] | None = None
        data = cfg.data
        if data.source == "task":
            self.task = make_task(data.task, **data.task_settings)
        else:
            self._rows, self._eval_rows = _load_prompt_rows(cfg, work_dir)

    # -- encoding ------------------------------------------------------------------------------
    def encode_prompt(self, rec: dict[str, Any]) -> list[int]:
        tok = self.tok
        if self.task is not None or not self.cfg.data.chat_template or tok.chat_template is None:
            ids = tok.encode(rec["prompt"], add_bos=tok.bos_id is not None)
        else:
            text = tok.apply_chat_template(rec["messages"], add_generation_prompt=True)
            ids = tok.encode(text)
        limit = self.cfg.data.max_prompt_tokens
        if len(ids) > limit:
            raise DataError(f"prompt {rec['id']}: {len(ids)} tokens exceed data.max_prompt_tokens={limit}")
        if not ids:
            raise DataError(f"prompt {rec['id']}: encodes to no tokens")
        return ids

    def encode_response(self, text: str) -> list[int]:
        """Ids of a dataset response, EOS appended, cut to online.max_new_tokens."""
        ids = self.tok.encode(text)
        if self.tok.eos_id is not None:
            ids = ids + [self.tok.eos_id]
        return ids[: self.cfg.online.max_new_tokens]

    def _finish(self, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for r in recs:
            r = dict(r)
            r["prompt_ids"] = self.encode_prompt(r)
            out.append(r)
        return out

    # -- sets ----------------------------------------------------------------------------------
    def iteration(self, t: int) -> list[dict[str, Any]]:
        """Prompts of iteration t (1-based), disjoint from every other iteration's."""
        n = self.cfg.online.prompts_per_iteration
        if self.task is not None:
            recs = list(generate_examples(self.task, n, seed=self.seed, split="train", start=(t - 1) * n))
            return self._finish(recs)
        idx = iteration_indices(len(self._rows), self.cfg.online.iterations, t - 1, self.seed)[:n]
        return self._finish([self._rows[int(i)] for i in idx])

    def iteration_all(self) -> list[dict[str, Any]]:
        """Every training row (offline training)."""
        if self.task is not None:
            raise ConfigError("data.source: offline training needs a preference file, not a task")
        return self._finish(list(self._rows))

    def evaluation(self) -> list[dict[str, Any]]:
        n = self.cfg.online.num_eval_prompts or self.cfg.data.num_eval_prompts
        if self.task is not None:
            return self._finish(list(generate_examples(self.task, n, seed=self.seed, split="test")))
        return self._finish(self._eval_rows[:n])

    def demonstrations(self) -> list[dict[str, Any]]:
        """SFT data: {"prompt_ids", "response_ids"}; the task's imperfect demonstrations, or the
        dataset's chosen responses."""
        sft = self.cfg.sft
        if self.task is not None:
            recs = make_demonstrations(self.task, sft.demonstrations, seed=self.seed,
                                       corrupt_prob=sft.corrupt_prob, split="validation")
        else:
            recs = [r for r in (self._rows[i] for i in range(len(self._rows))) if r.get("chosen")]
            recs = [{**r, "response": _text_of(r["chosen"])} for r in recs[: sft.demonstrations]]
            if not recs:
                raise DataError(f"{self.cfg.data.prompts_path}: no 'chosen' responses for SFT")
        out = []
        for r in recs:
            out.append({"prompt_ids": self.encode_prompt(r), "response_ids": self.encode_response(r["response"]),
                        "corrupted": bool(r.get("corrupted", False))})
        return out


def _load_prompt_rows(cfg: RunConfig, work_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Prepare (once, cached under the run's data/ folder) and read the prompts file(s)."""
    from jaxselm.data.builders import PromptSource, prepare_prompts

    def source_for(path: str, tag: str) -> PromptSource:
        p = Path(path)
        if p.is_dir() and (p / "dataset_info.json").is_file():
            return PromptSource.from_directory(p)
        if not p.exists():
            raise ConfigError(f"data.{tag}: file not found: {path}")
        digest = hashlib.sha1(os.fspath(p.resolve()).encode()).hexdigest()[:10]
        builder = prepare_prompts({"files": [os.fspath(p)]}, work_dir / "data" / f"{tag}-{digest}")
        return PromptSource(builder)

    src = source_for(cfg.data.prompts_path, "prompts_path")
    rows = [src[i] for i in range(len(src))]
    if cfg.data.eval_prompts_path:
        ev = source_for(cfg.data.eval_prompts_path, "eval_prompts_path")
        eval_rows = [ev[i] for i in range(len(ev))]
    else:  # hold out the last rows of the shuffled order
        n_eval = min(cfg.online.num_eval_prompts or cfg.data.num_eval_prompts, max(len(rows) // 10, 1))
        eval_rows, rows = rows[-n_eval:], rows[:-n_eval]
    if not rows:
        raise DataError(f"{cfg.data.prompts_path}: no usable prompts")
    return rows, eval_rows
