"""The run config of `jaxselm online` (and the other subcommands): one typed, validated tree.

    run:        output_dir, seed, tensorboard, progress
    model:      preset + any ModelConfig field as an override (e.g. position: cope)
    init:       checkpoint to start from (a jaxselm params export or an HF checkpoint dir)
    data:       where prompts come from (a synthetic task or a prompts file / prepared dataset)
    sft:        optional warm start on demonstrations (steps: 0 to skip)
    online:     iterations, sampling, pairs, per-iteration learning rates and alphas, epochs
    train:      loss (selm | dpo | ipo | xpo), beta, alpha, micro_batches, optimizer
    judge:      kind programmatic | reward_model | llm, and its settings
    mesh:       data / fsdp / tensor sizes (-1 = the rest)

Every key is checked: unknown keys, wrong types and bad values are one-line ConfigErrors naming
the key; judges are built (module imported, env var present) before any work starts.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Literal

from pydantic import ValidationInfo, field_validator, model_validator

from jaxselm.checkpoints import read_model_config
from jaxselm.config_base import (
    FrozenConfig,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    UnitInterval,
)
from jaxselm.errors import ConfigError
from jaxselm.feedback.config import JudgeConfig, ProgrammaticJudgeConfig, parse_judge_config
from jaxselm.files import resolve_path
from jaxselm.model import ModelConfig
from jaxselm.model.config import RUNTIME_FIELDS
from jaxselm.parallel.mesh import MeshConfig
from jaxselm.train.optimizer import TrainConfig


class RunSection(FrozenConfig):
    _error_prefix: ClassVar[str] = "run"

    output_dir: str = "runs/demo"
    seed: int = 0
    tensorboard: bool = True
    progress: bool = True  # progress bars on stderr
    async_checkpoints: bool = True  # train checkpoints written in the background (orbax)

    @field_validator("output_dir")
    @classmethod
    def _a_folder(cls, v: str) -> str:
        # Checked here, before anything is written; a part of the path that is a file would
        # otherwise surface as a traceback from the first mkdir.
        p = os.path.abspath(v)
        while p and not os.path.exists(p):
            p = os.path.dirname(p) if os.path.dirname(p) != p else ""
        if p and not os.path.isdir(p):
            raise ValueError(f"{p} is a file, not a folder")
        if p and not os.access(p, os.W_OK):
            raise ValueError(f"{p} is not writable")
        return v


class InitSection(FrozenConfig):
    _error_prefix: ClassVar[str] = "init"

    # A params export written by jaxselm (policy/iter_N of a run, `jaxselm convert`), a
    # directory with an HF config.json + safetensors, or a .gguf file; ``pkg:<package>/<file>``
    # names a file inside an installed package. None: random init (+ SFT warm start).
    checkpoint: str | None = None

    @field_validator("checkpoint")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            path = resolve_path(v)
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None
        if not os.path.exists(path):
            raise ValueError(f"not found: {v}")
        return path


class DataSection(FrozenConfig):
    _error_prefix: ClassVar[str] = "data"

    source: Literal["task", "prompts"] = "task"
    task: str = "sort"
    task_settings: dict[str, Any] = {}
    # For source=prompts: a JSONL/Parquet file (UltraFeedback-binarized layout) or a prepared
    # TFDS dataset directory; eval prompts from a second file or held out from the first.
    prompts_path: str | None = None
    eval_prompts_path: str | None = None
    num_eval_prompts: PositiveInt = 64
    # None: the task's built-in word tokenizer; else a path (tokenizer.json, SentencePiece .model,
    # HF directory) or builtin:bytes.
    tokenizer: str | None = None
    chat_template: bool = True  # wrap prompts with the tokenizer's chat template (prompts source)
    max_prompt_tokens: PositiveInt = 512
    # Prompts longer than max_prompt_tokens: keep their last max_prompt_tokens tokens (as the SELM
    # authors do), leave them out of the run, or stop with an error naming the prompt.
    long_prompts: Literal["truncate", "skip", "error"] = "truncate"
    # Rows of the prompts files that cannot be used (a missing field, a number where text
    # belongs, an empty prompt): counted, reported and left out, or an error naming file:line.
    on_bad_row: Literal["skip", "error"] = "skip"

    @model_validator(mode="after")
    def _check(self) -> DataSection:
        if self.source == "prompts" and not self.prompts_path:
            raise ValueError("prompts_path: required when data.source is 'prompts'")
        for key in ("prompts_path", "eval_prompts_path"):
            path = getattr(self, key)
            if self.source == "prompts" and path and not os.path.exists(path):
                raise ValueError(f"{key}: file not found: {path}")
        return self


class SFTSection(FrozenConfig):
    _error_prefix: ClassVar[str] = "sft"

    steps: NonNegativeInt = 0  # 0: no warm start
    batch_size: PositiveInt = 32
    learning_rate: PositiveFloat = 1e-3
    demonstrations: PositiveInt = 2048  # synthetic tasks: how many imperfect demonstrations
    corrupt_prob: Probability = (
        0.3  # synthetic tasks: fraction of demonstrations with a wrong answer
    )


class OnlineSection(FrozenConfig):
    _error_prefix: ClassVar[str] = "online"

    iterations: PositiveInt = 3
    prompts_per_iteration: PositiveInt = 128
    samples_per_prompt: PositiveInt = 4
    max_new_tokens: PositiveInt = 16
    temperature: PositiveFloat = 1.0
    greedy: bool = False  # one greedy response per prompt (the SELM authors' setting, with n = 1)
    top_k: NonNegativeInt = 0  # 0 = off
    top_p: UnitInterval = 1.0  # 1 = off
    min_p: Probability = 0.0  # 0 = off
    generation_batch_size: PositiveInt = 64  # prompts per generate() call
    include_dataset_responses: bool = False  # rank the dataset's chosen/rejected too (SELM paper)
    min_margin: NonNegativeFloat = 0.0  # pairs whose best-worst score gap is <= this are dropped
    no_eos_penalty: float | None = None  # subtracted from responses that never emitted EOS
    # y_ref: the iteration-start policy's greedy response (the SELM authors'), or one of the
    # policy's samples (the first, or one drawn at random).
    refresp: Literal["greedy", "first", "random"] = "greedy"
    epochs: PositiveInt = 1
    batch_size: PositiveInt = 16  # pairs per optimizer update
    # One learning rate per iteration (the SELM authors decay them), or one for all.
    learning_rates: list[PositiveFloat] | PositiveFloat = 5e-7
    # One alpha per iteration (e.g. [0, 1e-3, 1e-3]: DPO first, then SELM), or None: train.alpha.
    alphas: list[NonNegativeFloat] | None = None
    checkpoint_every: PositiveInt = 50  # train steps between mid-iteration checkpoints
    # The first offline_iterations iterations train on the dataset's own (chosen, rejected) pairs
    # of their slice of prompts instead of generating (the Zephyr recipe: offline DPO first).
    offline_iterations: NonNegativeInt = 0
    num_eval_prompts: PositiveInt | None = None  # None: data.num_eval_prompts

    @model_validator(mode="after")
    def _check(self) -> OnlineSection:
        lrs = self.learning_rates
        if isinstance(lrs, list) and len(lrs) != self.iterations:
            raise ValueError(f"learning_rates: {len(lrs)} values for {self.iterations} iterations")
        if self.alphas is not None and len(self.alphas) != self.iterations:
            raise ValueError(f"alphas: {len(self.alphas)} values for {self.iterations} iterations")
        if self.greedy and self.samples_per_prompt != 1:
            raise ValueError(
                "samples_per_prompt: greedy generation gives one response per prompt (set 1)"
            )
        if self.offline_iterations > self.iterations:
            raise ValueError(
                f"offline_iterations: {self.offline_iterations} is more than the "
                f"{self.iterations} iterations"
            )
        if self.samples_per_prompt < 2 and not self.include_dataset_responses:
            raise ValueError(
                "samples_per_prompt: need >= 2 samples to form a pair "
                "(or include_dataset_responses)"
            )
        return self

    def learning_rate(self, t: int) -> float:
        """Learning rate of iteration t (1-based)."""
        lrs = self.learning_rates
        return float(lrs[t - 1]) if isinstance(lrs, list) else float(lrs)

    def alpha(self, t: int, default: float) -> float:
        return float(self.alphas[t - 1]) if self.alphas is not None else default


class RunConfig(FrozenConfig):
    _error_prefix: ClassVar[str] = ""  # keys are named from the top: online.iterations

    run: RunSection = RunSection()
    model: ModelConfig = ModelConfig(preset="tiny-cope")
    init: InitSection = InitSection()
    data: DataSection = DataSection()
    sft: SFTSection = SFTSection()
    online: OnlineSection = OnlineSection()
    train: TrainConfig = TrainConfig()
    judge: JudgeConfig = ProgrammaticJudgeConfig(function="jaxselm.data.tasks:score")
    # Who scores the evaluation (held-out rewards, accuracies, win rates); default: the judge.
    # E.g. a verifier here while a learned reward model labels the training pairs.
    eval_judge: JudgeConfig | None = None
    mesh: MeshConfig = MeshConfig()

    @model_validator(mode="before")
    @classmethod
    def _model_from_checkpoint(cls, data: Any) -> Any:
        """With ``init.checkpoint`` the checkpoint supplies the model section: keys the run config
        also sets (a preset counts as setting all of its keys) must describe the same network,
        or the run stops with an error naming the key; the runtime keys (dtypes, CoPE
        implementation, remat) are the run config's."""
        if not isinstance(data, dict):
            return data
        init = data.get("init") if isinstance(data.get("init"), dict) else {}
        path = init.get("checkpoint")
        given = data.get("model", {})
        if (
            path is None
            and isinstance(given, dict)
            and given
            and not {"preset", "vocab_size"} & set(given)
        ):
            detail = "no preset and no model keys: give a preset, the keys, or an init.checkpoint"
            raise ConfigError(f"model: {detail}", path=("model",), detail=detail)
        if isinstance(path, str):
            # Reported here, before the model section (which the checkpoint was to supply)
            # would report its missing keys instead of the real culprit.
            try:
                resolved = resolve_path(path)
            except FileNotFoundError as err:
                detail = str(err)
                raise ConfigError(
                    f"init.checkpoint: {detail}", path=("init", "checkpoint"), detail=detail
                ) from None
            if not os.path.exists(resolved):
                detail = f"not found: {path}"
                raise ConfigError(
                    f"init.checkpoint: {detail}", path=("init", "checkpoint"), detail=detail
                )
            path = resolved
        if not isinstance(path, str) or not isinstance(given, dict):
            return data  # the sections' own checks report what is wrong
        found = read_model_config(path)
        if found is None:  # an export saved without its model config: the model section rules
            return data
        given = dict(given)
        if "preset" in given:
            try:
                given = ModelConfig(**given).model_dump()
            except ConfigError as err:  # raised outside the model section: name it
                if err.path is None or err.detail is None:
                    raise ConfigError(f"model.{err}") from None
                key = ".".join(("model", *err.path))
                raise ConfigError(
                    f"{key}: {err.detail}", path=("model", *err.path), detail=err.detail
                ) from None
        for key, value in given.items():
            if key in RUNTIME_FIELDS or key not in ModelConfig.model_fields:
                continue
            theirs = getattr(found, key)
            mine = ModelConfig(**{**found.model_dump(), key: value}).model_dump()[key]
            if mine != found.model_dump()[key]:
                detail = (
                    f"{value!r} in the run config, but init.checkpoint {path} has {theirs!r} "
                    "(leave the key out to take the checkpoint's)"
                )
                raise ConfigError(f"model.{key}: {detail}", path=("model", key), detail=detail)
        runtime = {k: v for k, v in given.items() if k in RUNTIME_FIELDS}
        return {**data, "model": {**found.model_dump(), **runtime}}

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.online.offline_iterations and self.data.source != "prompts":
            detail = "offline iterations train on a preference file's pairs (data.source: prompts)"
            raise ConfigError(
                f"online.offline_iterations: {detail}",
                path=("online", "offline_iterations"),
                detail=detail,
            )
        ctx_len = self.model.max_position_embeddings
        if self.online.max_new_tokens >= ctx_len:
            # Found here, not at the first generation (after the warm start and an export).
            # Below that, prompts are kept within what the context leaves them (PromptSet).
            detail = (
                f"{self.online.max_new_tokens} leaves no room for a prompt in the model's "
                f"context (model.max_position_embeddings = {ctx_len})"
            )
            raise ConfigError(
                f"online.max_new_tokens: {detail}", path=("online", "max_new_tokens"), detail=detail
            )
        if self.data.source == "prompts" and not self.data.tokenizer and not self.init.checkpoint:
            detail = "required when data.source is 'prompts' (or an init.checkpoint that has one)"
            raise ConfigError(
                f"data.tokenizer: {detail}", path=("data", "tokenizer"), detail=detail
            )
        return self

    @field_validator("judge", "eval_judge", mode="before")
    @classmethod
    def _parse_judge(cls, v: Any, info: ValidationInfo) -> Any:
        # parse_judge_config names the kind first ("unknown judge kind 'gpt'; choose one of ...")
        # and drops the union tag from the key path; its errors are re-anchored under the field.
        field = info.field_name
        if v is None and field == "eval_judge":
            return None
        try:
            parsed = parse_judge_config(v, prefix=field)
        except ConfigError as err:
            msg = str(err).removeprefix(field).lstrip(".")
            path, _, detail = msg.partition(": ")
            raise ConfigError(
                str(err), path=tuple(p for p in path.split(".") if p), detail=detail
            ) from None
        if field == "eval_judge" and getattr(parsed, "kind", "") == "learned_reward_model":
            raise ConfigError(
                "eval_judge.kind: learned_reward_model learns from training samples; "
                "evaluate with a fixed judge",
                path=("kind",),
                detail="learned_reward_model learns from training samples; evaluate with a "
                "fixed judge",
            )
        return parsed
