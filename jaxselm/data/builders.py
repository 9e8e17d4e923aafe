"""TFDS builders for prompt files and synthetic tasks, stored as array_record, read at random.

Why TFDS: prepared datasets are versioned, self-describing (features.json, dataset_info.json,
split sizes) and, stored as ``array_record``, readable by index (``as_data_source``), which is
what disjoint per-iteration slices and a resumable position need. None of this needs
TensorFlow: TFDS writes and reads array_record with its numpy-only feature encoders (here only
``Text`` features), so TensorFlow is never imported.

Two builders share one record layout (all text; ``messages`` is JSON)::

    {"id", "prompt", "messages", "chosen", "rejected", "answer"}

* :class:`PromptsBuilder` reads local JSONL/JSON/Parquet prompt files (see rows.py), skips or
  refuses malformed rows, removes exact and near duplicates and prompts contaminated by an
  evaluation file (hygiene.py); counts of everything removed are saved with the dataset
  (``metadata.json``) and available as :attr:`PromptsBuilder.counts`.
* :class:`SyntheticTaskBuilder` writes train/test splits of a synthetic task (tasks.py) from a
  seed; train prompts that also occur in test are dropped (and counted).

Each distinct configuration (settings plus the *contents* of the input files) gets its own TFDS
config directory named by a fingerprint, so changing a file or a setting prepares anew while
repeating a call reuses what is on disk. Examples are stored in input order
(``disable_shuffling``); shuffling happens at read time with a seed (iteration.py).

Example::

    cfg = PromptsConfig(files=["ultrafeedback.jsonl"], decontam_file="alpaca_eval.jsonl")
    builder = prepare_prompts(cfg, data_dir="/data/tfds")
    source = PromptSource(builder, "train")          # len(source), source[i] -> dict
    print(builder.counts)                             # rows read, bad rows, duplicates, ...
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydantic
import tensorflow_datasets as tfds

from jaxselm.data import hygiene, rows, tasks
from jaxselm.data.tokenizer import load_tokenizer
from jaxselm.errors import ConfigError, DataError

RECORD_FIELDS = ("id", "prompt", "messages", "chosen", "rejected", "answer")


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({k: tfds.features.Text() for k in RECORD_FIELDS})


def _encode(rec: dict[str, Any]) -> dict[str, str]:
    out = {k: rec.get(k, "") for k in RECORD_FIELDS}
    out["messages"] = json.dumps(rec["messages"], ensure_ascii=False)
    return out


def _file_digest(path: str | os.PathLike, what: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found ({what})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({what}): {e.strerror}") from None
    return h.hexdigest()


def _fingerprint(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False)
    return "cfg_" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _validate(model: type[pydantic.BaseModel], data: Any, prefix: str) -> Any:
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in (prefix, *err["loc"]))
        raise ConfigError(f"{loc}: {err['msg']}") from None


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, strict=True)


class PromptsConfig(_Strict):
    """Settings of the prompts builder (a ``data.prompts`` block of a run config).

    Attributes:
      files: JSONL / JSON / Parquet files of the train split.
      test_files: optional files of a test split.
      prompt_field, messages_field, chosen_field, rejected_field, id_field: column names.
      max_prompt_chars: longer prompts (all message contents) are bad rows.
      tokenizer: a tokenizer (see load_tokenizer) to measure prompts in tokens.
      max_prompt_tokens: longer prompts are bad rows; the length is that of the chat-templated
        prompt with the generation header (the tokenizer's template), as the policy sees it.
      on_bad_row: "skip" (count and drop) or "error" (DataError naming file and line).
      exact_dedup, near_dup_threshold, num_perm, shingle: duplicate removal (hygiene.py).
      decontam_file: evaluation prompts (.txt one per line, or a prompt file) to keep out.
      decontam_ngram: n-gram length (units) for decontamination.
    """

    files: list[str] = pydantic.Field(min_length=1)
    test_files: list[str] = []
    prompt_field: str = "prompt"
    messages_field: str = "messages"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    id_field: str = "prompt_id"
    max_prompt_chars: int = pydantic.Field(default=16384, gt=0)
    tokenizer: str | None = None
    max_prompt_tokens: int | None = pydantic.Field(default=None, gt=0)
    on_bad_row: Literal["skip", "error"] = "skip"
    exact_dedup: bool = True
    near_dup_threshold: float | None = pydantic.Field(default=0.8, gt=0.0, le=1.0)
    num_perm: int = pydantic.Field(default=128, ge=16)
    shingle: int = pydantic.Field(default=3, ge=1)
    decontam_file: str | None = None
    decontam_ngram: int = pydantic.Field(default=13, ge=1)

    @pydantic.model_validator(mode="after")
    def _tokens_need_tokenizer(self) -> PromptsConfig:
        if self.max_prompt_tokens is not None and self.tokenizer is None:
            raise ValueError("max_prompt_tokens needs a tokenizer")
        return self

    @classmethod
    def from_dict(cls, data: Any, prefix: str = "data.prompts") -> PromptsConfig:
        """Validates a mapping; errors are ConfigError naming the key (``prefix.key``)."""
        return _validate(cls, data, prefix)

    def row_format(self) -> rows.RowFormat:
        return rows.RowFormat(
            prompt_field=self.prompt_field,
            messages_field=self.messages_field,
            chosen_field=self.chosen_field,
            rejected_field=self.rejected_field,
            id_field=self.id_field,
            max_prompt_chars=self.max_prompt_chars,
            max_prompt_tokens=self.max_prompt_tokens,
            on_bad_row=self.on_bad_row,
        )

    def hygiene(self) -> hygiene.HygieneSettings:
        return hygiene.HygieneSettings(
            exact_dedup=self.exact_dedup,
            near_dup_threshold=self.near_dup_threshold,
            num_perm=self.num_perm,
            shingle=self.shingle,
            ngram=self.decontam_ngram,
        )


class SyntheticConfig(_Strict):
    """Settings of the synthetic-task builder.

    Attributes:
      task: one of tasks.TASKS ("sort", "copy", "count", "flipflop").
      settings: the task's settings (e.g. {"max_items": 4}); see tasks.py.
      num_train, num_test: examples generated per split (train loses those also in test).
      seed: generation seed.
    """

    task: str
    settings: dict[str, Any] = {}
    num_train: int = pydantic.Field(default=1000, ge=0)
    num_test: int = pydantic.Field(default=100, ge=0)
    seed: int = 0

    @classmethod
    def from_dict(cls, data: Any, prefix: str = "data.synthetic") -> SyntheticConfig:
        return _validate(cls, data, prefix)

    def make_task(self) -> tasks.Task:
        return tasks.make_task(self.task, **dict(self.settings))


@contextlib.contextmanager
def _absl_quiet() -> Iterator[None]:
    """TFDS's warnings (absl) off for a block: its messages about configs and downloads do not
    apply to local files prepared under a fingerprinted config."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared machinery: fingerprinted config, array_record, counts in the metadata."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "First layout: id, prompt, messages (JSON), chosen, rejected, answer."
    }

    def __init__(self, fingerprint: str, data_dir: str | os.PathLike, description: str):
        with _absl_quiet():  # TFDS warns about "custom data configuration": ours, on purpose
            super().__init__(
                data_dir=os.fspath(data_dir),
                file_format="array_record",
                config=tfds.core.BuilderConfig(name=fingerprint, description=description),
            )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.builder_config.description,
            features=_features(),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    @property
    def counts(self) -> dict[str, Any]:
        """Per split: what was read, skipped and removed (saved with the dataset)."""
        return _counts(self)

    def prepare(self) -> None:
        """Prepares the dataset unless already on disk; a failed preparation leaves nothing.

        Quietly: nothing is downloaded, so TFDS's "Downloading and preparing" lines, its progress
        bars and its warning about our (fingerprinted) custom config would only mislead.
        """
        parent = Path(self.data_dir).parent
        before = set(parent.glob("incomplete*")) if parent.exists() else set()
        tfds.disable_progress_bar()
        try:
            with _absl_quiet():
                self.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(
                        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
                    )
                )
        except BaseException:
            if parent.exists():
                for p in set(parent.glob("incomplete*")) - before:
                    shutil.rmtree(p, ignore_errors=True)
            raise

    # TFDS prints these two (bold, on stdout) around every preparation and offers no switch; a
    # local file is not downloaded, so they say nothing true here.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass


class PromptsBuilder(_Builder, skip_registration=True):
    """Prompts from local files, cleaned; see the module docstring."""

    name = "jaxselm_prompts"

    def __init__(self, config: PromptsConfig, data_dir: str | os.PathLike):
        self._cfg = config
        digests = {f: _file_digest(f, "prompt file") for f in [*config.files, *config.test_files]}
        if config.decontam_file is not None:
            digests[config.decontam_file] = _file_digest(config.decontam_file, "decontam_file")
        self._tokenizer = None
        if config.tokenizer is not None:
            self._tokenizer = load_tokenizer(config.tokenizer)
            for f in _tokenizer_files(config.tokenizer):
                digests[f] = _file_digest(f, "tokenizer")
        payload = {"config": config.model_dump(), "files": digests, "layout": 1}
        super().__init__(
            _fingerprint(payload), data_dir, description=f"prompts from {len(digests)} file(s)"
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        decontam = None
        if self._cfg.decontam_file is not None:
            texts = rows.read_prompt_texts(self._cfg.decontam_file, self._cfg.row_format())
            decontam = hygiene.Decontaminator(texts, ngram=self._cfg.decontam_ngram)
        splits = {"train": self._generate_examples("train", self._cfg.files, decontam)}
        if self._cfg.test_files:
            splits["test"] = self._generate_examples("test", self._cfg.test_files, decontam)
        return splits

    def _count_tokens(self, messages: list[dict[str, str]]) -> int:
        tok = self._tokenizer
        if tok is None:
            raise ValueError("no tokenizer configured")
        if tok.chat_template is not None:
            text = tok.apply_chat_template(messages, add_generation_prompt=True)
        else:
            text = rows.conversation_text(messages)
        return len(tok.encode(text))

    def _generate_examples(
        self, split: str, files: list[str], decontam: hygiene.Decontaminator | None
    ) -> Iterator[tuple[int, dict]]:
        bad: Counter = Counter()
        counts = hygiene.HygieneCounts()
        read = 0

        def counted() -> Iterator[dict[str, Any]]:
            nonlocal read
            for rec in rows.read_records(files, self._cfg.row_format(), bad, self._count_tokens):
                read += 1
                yield rec

        ids: Counter = Counter()
        for i, rec in enumerate(
            hygiene.clean_records(counted(), self._cfg.hygiene(), decontam, counts)
        ):
            ids[rec["id"]] += 1
            if ids[rec["id"]] > 1:  # keep ids unique within a split
                rec = {**rec, "id": f"{rec['id']}#{ids[rec['id']]}"}
            yield i, _encode(rec)
        if not ids:  # TFDS would fail with a bare assertion ("No examples were yielded")
            raise DataError(f"{', '.join(files)}: no usable rows ({_why_none(read, bad)})")
        self.info.metadata[split] = {
            "rows_read": read + sum(bad.values()),
            "bad_rows": sum(bad.values()),
            **{f"bad_{r}": bad[r] for r in rows.BAD_ROW_REASONS},
            **counts.as_dict(),
        }


def _tokenizer_files(spec: str) -> list[str]:
    """The files a tokenizer spec reads (so a changed tokenizer prepares anew)."""
    if spec.startswith("builtin:"):
        return []
    p = Path(spec)
    d = p if p.is_dir() else p.parent
    names = ["tokenizer_config.json", "chat_template.jinja"]
    names += (
        ["tokenizer.json", "tokenizer.model", *(x.name for x in d.glob("*.model"))]
        if p.is_dir()
        else [p.name]
    )
    return sorted({str(d / n) for n in names if (d / n).is_file()})


class SyntheticTaskBuilder(_Builder, skip_registration=True):
    """Train and test splits of a synthetic task; see the module docstring."""

    name = "jaxselm_synthetic"

    def __init__(self, config: SyntheticConfig, data_dir: str | os.PathLike):
        self._cfg = config
        self._task = config.make_task()
        payload = {"config": config.model_dump(), "layout": 1}
        super().__init__(
            _fingerprint(payload), data_dir, description=f"synthetic task {config.task}"
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        test = list(
            tasks.generate_examples(
                self._task, self._cfg.num_test, seed=self._cfg.seed, split="test"
            )
        )
        test_prompts = {ex["prompt"] for ex in test}
        return {
            "train": self._generate_examples("train", self._train(test_prompts)),
            "test": self._generate_examples("test", iter(test)),
        }

    def _train(self, exclude: set[str]) -> Iterator[dict[str, str]]:
        overlap = 0
        for ex in tasks.generate_examples(
            self._task, self._cfg.num_train, seed=self._cfg.seed, split="train"
        ):
            if ex["prompt"] in exclude:
                overlap += 1
                continue
            yield ex
        self.info.metadata["train_overlap_with_test"] = {"removed": overlap}

    def _generate_examples(
        self, split: str, examples: Iterator[dict[str, str]]
    ) -> Iterator[tuple[int, dict]]:
        n = 0
        for n, ex in enumerate(examples, 1):
            rec = {**ex, "messages": [{"role": "user", "content": ex["prompt"]}]}
            yield n - 1, _encode(rec)
        self.info.metadata[split] = {"kept": n}

    @property
    def task(self) -> tasks.Task:
        return self._task


def prepare_prompts(config: PromptsConfig | dict, data_dir: str | os.PathLike) -> PromptsBuilder:
    """Builds (or reuses) the prompts dataset for ``config`` under ``data_dir``."""
    if not isinstance(config, PromptsConfig):
        config = PromptsConfig.from_dict(config)
    builder = PromptsBuilder(config, data_dir)
    builder.prepare()
    return builder


def prepare_synthetic(
    config: SyntheticConfig | dict, data_dir: str | os.PathLike
) -> SyntheticTaskBuilder:
    """Builds (or reuses) the synthetic-task dataset for ``config`` under ``data_dir``."""
    if not isinstance(config, SyntheticConfig):
        config = SyntheticConfig.from_dict(config)
    builder = SyntheticTaskBuilder(config, data_dir)
    builder.prepare()
    return builder


class PromptSource:
    """Random access to a prepared split: ``len(source)``, ``source[i]`` -> decoded record.

    Records are dicts of str, except ``messages`` (a list of {role, content}). Built from a
    builder, or from a prepared directory (``.../jaxselm_prompts/cfg_.../1.0.0``) with
    :meth:`from_directory`.
    """

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str = "train"):
        splits = builder.info.splits
        if split not in splits:
            raise DataError(f"{builder.data_dir}: no split {split!r} (have {sorted(splits)})")
        self.split = split
        self.where = f"{builder.data_dir}[{split}]"
        self._source = builder.as_data_source(split=split)
        #: What preparation read, skipped and removed, per split (see the builders).
        self.counts = _counts(builder)

    @classmethod
    def from_directory(cls, path: str | os.PathLike, split: str = "train") -> PromptSource:
        path = Path(path)
        if not (path / "dataset_info.json").is_file():
            raise DataError(f"{path}: not a prepared dataset (no dataset_info.json)")
        return cls(tfds.builder_from_directory(os.fspath(path)), split)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.where}: index {index} out of range ({len(self)} rows)")
        return _decode(self._source[int(index) % len(self)])

    def get_many(self, indices: list[int] | np.ndarray) -> list[dict[str, Any]]:
        """Several records at once (one batched read)."""
        return [_decode(r) for r in self._source.__getitems__([int(i) for i in indices])]


def _why_none(read: int, bad: Counter) -> str:
    if not read and not bad:
        return "the file holds no rows"
    said = [f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(bad.items()) if n]
    if read:
        said.append(f"{read} removed by cleaning (duplicates, decontamination, limits)")
    return f"{read + sum(bad.values())} row(s): " + ", ".join(said)


def bad_rows_summary(counts: dict[str, Any]) -> str:
    """'3 bad rows skipped (2 wrong type, 1 missing field)' from a split's counts; '' if none."""
    n = int(counts.get("bad_rows", 0))
    if not n:
        return ""
    parts = [
        f"{int(counts[f'bad_{r}'])} {r.replace('_', ' ')}"
        for r in rows.BAD_ROW_REASONS
        if counts.get(f"bad_{r}")
    ]
    return f"{n} bad row(s) skipped ({', '.join(parts)})"


def _counts(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
    return {k: dict(v) for k, v in (builder.info.metadata or {}).items()}


def _decode(raw: dict[str, Any]) -> dict[str, Any]:
    rec = {k: (v.decode("utf-8") if isinstance(v, bytes) else str(v)) for k, v in raw.items()}
    rec["messages"] = json.loads(rec["messages"])
    return rec
