"""Where an online run's prompts come from: a synthetic task or a prompts file, plus tokenization.

Each iteration t (1-based) reads its own disjoint slice of the training prompts; evaluation uses a
fixed held-out set (the task's test split, or a second file, or rows held out of the first file).
Records are dicts with ``id``, ``prompt`` (text shown to the judge), ``prompt_ids`` (token ids fed
to the policy, chat template applied) and, when the data has them, ``chosen`` / ``rejected``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxselm.checkpoints import checkpoint_tokenizer
from jaxselm.data.iteration import iteration_indices
from jaxselm.data.tasks import Task, make_demonstrations, make_task
from jaxselm.data.tokenizer import Tokenizer, load_tokenizer
from jaxselm.errors import ConfigError, DataError
from jaxselm.online.config import RunConfig


def build_tokenizer(cfg: RunConfig) -> Tokenizer:
    """``data.tokenizer``; else the tokenizer of ``init.checkpoint`` (an HF directory with
    tokenizer files, a GGUF file); else the synthetic task's word tokenizer."""
    spec = cfg.data.tokenizer or checkpoint_tokenizer(cfg.init.checkpoint)
    if spec is None:
        if cfg.data.source != "task":
            raise ConfigError("data.tokenizer: required when data.source is 'prompts'")
        return make_task(cfg.data.task, **cfg.data.task_settings).tokenizer()
    return load_tokenizer(spec)


def text_of(messages_or_text: Any) -> str:
    if isinstance(messages_or_text, str):
        return messages_or_text
    if isinstance(messages_or_text, list) and messages_or_text:
        return str(messages_or_text[-1].get("content", ""))
    return ""


ENV_READ_LOG = "JAXSELM_READ_LOG"


class PromptSet:
    """Training prompts per iteration, evaluation prompts, and SFT demonstrations.

    Every set is addressed by position, and only the positions asked for are read (a synthetic
    task makes just those examples; a prepared dataset is read by random access): in a
    multi-process run each host reads the rows its devices hold, never the whole dataset.
    With ``JAXSELM_READ_LOG=<dir>`` every read is appended to ``<dir>/reads.p<process>.jsonl``
    (``{"set": "train"|"train_all"|"eval"|"sft", "positions": [...]}``, train reads with their
    ``iteration``), to check which host read what.
    """

    def __init__(self, cfg: RunConfig, tokenizer: Tokenizer, work_dir: Path):
        self.cfg = cfg
        self.tok = tokenizer
        self.seed = cfg.run.seed
        self.task: Task | None = None
        self._src: Any = None  # the prepared prompts (random access)
        self._eval_src: Any = None
        self._n_train = 0
        self._eval_start = 0
        self._n_eval = 0
        self.notes: list[str] = []  # lines for the run's log (e.g. bad rows skipped)
        data = cfg.data
        if data.source == "task":
            self.task = make_task(data.task, **data.task_settings)
        else:
            fresh = not work_dir.exists()
            try:
                self._open_sources(work_dir)
            except BaseException:
                if fresh and _process_index() == 0:  # a run stopped by its data leaves nothing
                    shutil.rmtree(work_dir, ignore_errors=True)
                raise
        log_dir = os.environ.get(ENV_READ_LOG)
        self._read_log = Path(log_dir) / f"reads.p{_process_index()}.jsonl" if log_dir else None

    def _open_sources(self, work_dir: Path) -> None:
        from jaxselm.data.builders import bad_rows_summary

        cfg = self.cfg
        self._src = _prompt_source(cfg, work_dir, cfg.data.prompts_path, "prompts_path")
        n = len(self._src)
        if cfg.data.eval_prompts_path:
            self._eval_src = _prompt_source(
                cfg, work_dir, cfg.data.eval_prompts_path, "eval_prompts_path"
            )
            self._n_train, self._eval_start, self._n_eval = n, 0, len(self._eval_src)
        else:  # hold out the last rows of the (prepared, shuffled) order
            n_eval = min(cfg.online.num_eval_prompts or cfg.data.num_eval_prompts, max(n // 10, 1))
            self._eval_src = self._src
            self._n_train, self._eval_start, self._n_eval = n - n_eval, n - n_eval, n_eval
        if self._n_train < 1:
            raise DataError(
                f"{cfg.data.prompts_path}: {n} usable row(s), all held out as evaluation prompts "
                "(add rows, or give data.eval_prompts_path)"
            )
        sources = [(self._src, cfg.data.prompts_path)]
        if cfg.data.eval_prompts_path:
            sources.append((self._eval_src, cfg.data.eval_prompts_path))
        for src, path in sources:  # reported in the run's log (skipped rows are never silent)
            said = bad_rows_summary(src.counts.get("train", {}))
            if said:
                self.notes.append(f"{path}: {said} (data.on_bad_row: error stops at the first)")

    def _log_reads(self, which: str, positions: Any, **where: int) -> None:
        if self._read_log is not None:
            self._read_log.parent.mkdir(parents=True, exist_ok=True)
            with open(self._read_log, "a") as f:
                f.write(
                    json.dumps({"set": which, **where, "positions": [int(i) for i in positions]})
                    + "\n"
                )

    # -- encoding ------------------------------------------------------------------------------
    def encode_prompt(self, rec: dict[str, Any]) -> list[int]:
        """Token ids of a prompt record: its ``messages`` through the tokenizer's chat template
        (when it has one and ``data.chat_template``), else its ``prompt`` text. A prompt longer
        than ``data.max_prompt_tokens`` is handled per ``data.long_prompts``: its last tokens are
        kept and ``rec["truncated"]`` is set, or ``rec["skipped"]`` is set (the prompt takes no
        part in the run), or it is an error."""
        tok = self.tok
        if "messages" in rec and self.cfg.data.chat_template and tok.chat_template is not None:
            ids = tok.encode(tok.apply_chat_template(rec["messages"], add_generation_prompt=True))
        else:
            ids = tok.encode(rec["prompt"], add_bos=tok.bos_id is not None)
        if not ids:
            raise DataError(f"prompt {rec['id']}: encodes to no tokens")
        limit = self.prompt_limit
        if len(ids) > limit:
            policy = self.cfg.data.long_prompts
            if policy == "error":
                why = self._limit_reason()
                what = f"{why}={limit}" if why == "data.max_prompt_tokens" else f"{limit} ({why})"
                raise DataError(
                    f"prompt {rec['id']}: {len(ids)} tokens exceed {what} "
                    "(data.long_prompts: error; 'truncate' keeps the last tokens)"
                )
            rec["truncated" if policy == "truncate" else "skipped"] = True
            ids = ids[-limit:]  # left truncation; a skipped prompt only keeps the batch shapes
        return ids

    @property
    def prompt_limit(self) -> int:
        """The most prompt tokens a row keeps: data.max_prompt_tokens; for a prompts file also
        no more than the model's context leaves after online.max_new_tokens (a longer prompt is
        then a long prompt, handled per data.long_prompts, instead of failing at generation).
        A synthetic task's prompts are never cut for the context: a cut task prompt is another
        task; generation and SFT refuse sequences past the context instead."""
        limit = self.cfg.data.max_prompt_tokens
        if self.task is None:
            room = self.cfg.model.max_position_embeddings - self.cfg.online.max_new_tokens
            limit = min(limit, room)
        return max(1, limit)

    def _limit_reason(self) -> str:
        if self.prompt_limit < self.cfg.data.max_prompt_tokens:
            return (
                f"model.max_position_embeddings {self.cfg.model.max_position_embeddings} - "
                f"online.max_new_tokens {self.cfg.online.max_new_tokens}"
            )
        return "data.max_prompt_tokens"

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

    @staticmethod
    def _positions(positions: Any, size: int, what: str) -> list[int]:
        if positions is None:
            return list(range(size))
        out = [int(i) for i in positions]
        for i in out:
            if not 0 <= i < size:
                raise IndexError(f"{what}: position {i} out of range ({size} rows)")
        return out

    # -- sets ----------------------------------------------------------------------------------
    def iteration_size(self, t: int) -> int:
        """How many prompts iteration t (1-based) reads."""
        n = self.cfg.online.prompts_per_iteration
        if self.task is not None:
            return n
        return len(
            iteration_indices(self._n_train, self.cfg.online.iterations, t - 1, self.seed)[:n]
        )

    def iteration(self, t: int, positions: Any = None) -> list[dict[str, Any]]:
        """Prompts of iteration t (1-based), disjoint from every other iteration's: all of them,
        or those at ``positions`` (0 .. iteration_size(t) - 1)."""
        pos = self._positions(positions, self.iteration_size(t), f"iteration {t}")
        self._log_reads("train", pos, iteration=t)
        n = self.cfg.online.prompts_per_iteration
        if self.task is not None:
            return self._finish(
                [self.task.example(self.seed, "train", (t - 1) * n + i) for i in pos]
            )
        idx = iteration_indices(self._n_train, self.cfg.online.iterations, t - 1, self.seed)[:n]
        return self._finish(self._src.get_many([int(idx[i]) for i in pos]) if pos else [])

    def training_size(self) -> int:
        """How many training rows the prompts file has (offline training reads them all)."""
        if self.task is not None:
            raise ConfigError("data.source: offline training needs a preference file, not a task")
        return self._n_train

    def training_rows(self, positions: Any = None) -> list[dict[str, Any]]:
        """Training rows by position in the prepared file (all of them by default)."""
        pos = self._positions(positions, self.training_size(), "training rows")
        self._log_reads("train_all", pos)
        return self._finish(self._src.get_many(pos) if pos else [])

    def iteration_all(self) -> list[dict[str, Any]]:
        """Every training row (offline training)."""
        return self.training_rows()

    def evaluation_size(self) -> int:
        n = self.cfg.online.num_eval_prompts or self.cfg.data.num_eval_prompts
        return n if self.task is not None else min(n, self._n_eval)

    def describe(self) -> str:
        """One line: where the prompts come from, and the evaluation set's size and why."""
        o, data = self.cfg.online, self.cfg.data
        asked = o.num_eval_prompts or data.num_eval_prompts
        if self.task is not None:
            where = f"task {data.task}"
        else:
            where = f"{data.prompts_path} ({self._n_train} training rows)"
        got = self.evaluation_size()
        why = ""
        if got < asked:
            why = (
                f" (of {asked} asked: {data.eval_prompts_path} has {self._n_eval} rows)"
                if data.eval_prompts_path
                else f" (of {asked} asked: at most 10% of the file is held out)"
            )
        return (
            f"prompts: {where}; {o.prompts_per_iteration} per iteration, evaluation on {got}{why}; "
            f"longer than {self.prompt_limit} tokens ({self._limit_reason()}): {data.long_prompts}"
        )

    def evaluation(self, positions: Any = None) -> list[dict[str, Any]]:
        """The fixed held-out prompts: all, or those at ``positions``."""
        pos = self._positions(positions, self.evaluation_size(), "evaluation")
        self._log_reads("eval", pos)
        if self.task is not None:
            return self._finish([self.task.example(self.seed, "test", i) for i in pos])
        return self._finish(
            self._eval_src.get_many([self._eval_start + i for i in pos]) if pos else []
        )

    def demonstration_count(self) -> int:
        n = self.cfg.sft.demonstrations
        return n if self.task is not None else min(n, self._n_train)

    def demonstrations(self, positions: Any = None) -> list[dict[str, Any]]:
        """SFT data: {"prompt_ids", "response_ids", "corrupted"}; the task's imperfect
        demonstrations, or the chosen responses of the first training rows (every one of them
        must have one)."""
        sft = self.cfg.sft
        pos = self._positions(positions, self.demonstration_count(), "demonstrations")
        self._log_reads("sft", pos)
        if self.task is not None:
            recs = [
                make_demonstrations(
                    self.task,
                    1,
                    seed=self.seed,
                    corrupt_prob=sft.corrupt_prob,
                    split="validation",
                    start=i,
                )[0]
                for i in pos
            ]
        else:
            recs = []
            for r in self._src.get_many(pos) if pos else []:
                if not r.get("chosen"):
                    raise DataError(
                        f"{self.cfg.data.prompts_path}: row {r.get('id')!r} (prompt "
                        f"{str(r.get('prompt', ''))[:40]!r}) has no 'chosen' "
                        f"response for SFT (sft uses the first sft.demonstrations="
                        f"{sft.demonstrations} rows; or set sft.steps=0)"
                    )
                recs.append({**r, "response": text_of(r["chosen"])})
        out = []
        for r in recs:
            prompt_ids = self.encode_prompt(r)
            out.append(
                {
                    "prompt_ids": prompt_ids,
                    "response_ids": self.encode_response(r["response"]),
                    "corrupted": bool(r.get("corrupted", False)),
                    "prompt_loss": self._prompt_loss(r, prompt_ids),
                }
            )
        return out

    def _prompt_loss(self, rec: dict[str, Any], prompt_ids: list[int]) -> list[int]:
        """Token positions of the prompt words a task trains on too (Flip-Flop's reads): word
        i is token i (+1 with BOS, shifted when the prompt was cut), which needs a tokenizer that
        writes one token per word (the task's own)."""
        words = rec.get("prompt_loss_words") or []
        if not words:
            return []
        n_words = len(rec["prompt"].split())
        if len(self.tok.encode(rec["prompt"])) != n_words:
            raise ConfigError(
                f"data.task_settings: {self.task.name} trains on prompt words, which needs the "
                "task's word tokenizer (one token per word); this tokenizer splits them"
            )
        offset = len(prompt_ids) - n_words
        return [offset + w for w in words if offset + w >= 0]


def _process_index() -> int:
    import jax

    return jax.process_index()


def _prompt_source(cfg: RunConfig, work_dir: Path, path: str, tag: str):
    """The prepared prompts file (random access). Prepared once, cached under the run's data/
    folder; with several processes process 0 prepares while the others wait, then all open it."""
    from jaxselm.data.builders import PromptSource, prepare_prompts
    from jaxselm.parallel.multihost import any_process, barrier, is_primary

    p = Path(path)
    if p.is_dir() and (p / "dataset_info.json").is_file():
        return PromptSource.from_directory(p)
    if not p.exists():
        raise ConfigError(f"data.{tag}: file not found: {path}")
    digest = hashlib.sha1(os.fspath(p.resolve()).encode()).hexdigest()[:10]
    data_dir = work_dir / "data" / f"{tag}-{digest}"
    failed: BaseException | None = None
    spec = {"files": [os.fspath(p)], "on_bad_row": cfg.data.on_bad_row}
    if is_primary():
        # Folders this preparation creates are removed again when it fails: a run stopped by a
        # bad file leaves its output_dir as it was (usually: not there).
        made = [d for d in (work_dir, work_dir / "data", data_dir) if not d.exists()]
        try:
            prepare_prompts(spec, data_dir)
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the others know
            failed = err
            if made:
                shutil.rmtree(made[0], ignore_errors=True)
    if any_process(failed is not None):
        if failed is not None:
            raise failed
        raise DataError(f"data.{tag}: preparing {path} failed on process 0 (its error says why)")
    barrier(f"prepared {data_dir}")
    return PromptSource(prepare_prompts(spec, data_dir))


def count_long(recs: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many records were truncated / skipped as longer than data.max_prompt_tokens."""
    return {
        "truncated_prompts": sum(bool(r.get("truncated")) for r in recs),
        "skipped_prompts": sum(bool(r.get("skipped")) for r in recs),
    }
