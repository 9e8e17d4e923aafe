"""What every phase of a run shares: config, model, tokenizer, prompts, judge, mesh and the folder.

    ctx = RunContext.create(cfg)                  # validates everything before any work
    ctx.iter_dir(1), ctx.policy_dir(1)            # runs/demo/iter_01, runs/demo/policy/iter_01
    params = ctx.load_policy(0)                   # laid out on ctx.mesh

Everything a user can get wrong (tokenizer, judge spec, mesh, prompts file) fails here, in
:meth:`RunContext.create`, before the run folder is touched. Files of the run folder are process
0's: :meth:`RunContext.write_json` / :meth:`RunContext.write_arrays` write there and every
process waits until the file is in place (a barrier), so ``output_dir`` must be on storage all
hosts share.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxselm.checkpoints import checkpoint_tokenizer, load_checkpoint, read_model_config
from jaxselm.data.tokenizer import Tokenizer
from jaxselm.errors import CheckpointError, ConfigError, JudgeError
from jaxselm.feedback import (
    Judge,
    LearnedRewardModelJudgeConfig,
    ProgrammaticJudgeConfig,
    RewardModelJudgeConfig,
    make_judge,
)
from jaxselm.files import write_arrays, write_json
from jaxselm.model import ModelConfig
from jaxselm.online.config import RunConfig
from jaxselm.online.metrics import MetricsWriter
from jaxselm.online.prompts import PromptSet, build_tokenizer
from jaxselm.parallel.mesh import make_mesh, single_device_mesh
from jaxselm.parallel.multihost import any_process, barrier, from_primary, is_primary
from jaxselm.preemption import Preempted
from jaxselm.train import (
    ReferenceFn,
    ShardedStep,
    TrainConfig,
    make_preference_step,
    make_reference_fn,
    params_shardings_for,
    save_params,
)


def _quiet(*args: Any, **kwargs: Any) -> None:
    """The log function of processes other than 0."""


@dataclasses.dataclass
class RunContext:
    cfg: RunConfig
    tokenizer: Tokenizer
    prompts: PromptSet
    mesh: jax.sharding.Mesh
    judge: Judge | None
    eval_judge: Judge | None = None  # the evaluation's judge when it is not ``judge``
    log: Callable[..., None] = print
    metrics: MetricsWriter | None = None
    stop: Callable[[], bool] = lambda: False  # SIGTERM seen (set by the orchestrator)
    _reference_fns: dict[tuple[str, ...], ReferenceFn] = dataclasses.field(default_factory=dict)
    _preference_steps: dict[TrainConfig, ShardedStep] = dataclasses.field(default_factory=dict)

    @classmethod
    def create(
        cls, cfg: RunConfig, *, with_judge: bool = True, log=print, config_dir: str | None = None
    ) -> RunContext:
        """Everything the phases share, checked before any work. ``config_dir`` (the run config
        file's folder) is where a programmatic judge's module is also looked for."""
        model = cfg.model
        tok = build_tokenizer(cfg)
        if cfg.data.chat_template:
            tok.check_chat_template()
        if tok.vocab_size > model.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {model.vocab_size} is smaller than the "
                f"tokenizer's {tok.vocab_size} tokens"
            )
        # Built and checked before any work: a bad judge spec (import, env var, checkpoint) or
        # an LLM endpoint nobody answers at fails at once.
        judge = build_judge(cfg, tok, config_dir) if with_judge else None
        if judge is not None:
            check_judge(judge)
        eval_judge = None
        if with_judge and cfg.eval_judge is not None:
            eval_judge = build_judge(cfg, tok, config_dir, cfg.eval_judge, field="eval_judge")
            check_judge(eval_judge)
        mesh = make_mesh(cfg.mesh)
        prompts = PromptSet(cfg, tok, Path(cfg.run.output_dir))
        return cls(
            cfg=cfg,
            tokenizer=tok,
            prompts=prompts,
            mesh=mesh,
            judge=judge,
            eval_judge=eval_judge,
            log=log if is_primary() else _quiet,
        )

    # -- shortcuts ---------------------------------------------------------------------------
    @property
    def evaluator(self) -> Judge | None:
        """Who scores evaluations: ``eval_judge`` when the config names one, else the judge."""
        return self.eval_judge if self.eval_judge is not None else self.judge

    @property
    def model(self) -> ModelConfig:
        return self.cfg.model

    @property
    def out(self) -> Path:
        return Path(self.cfg.run.output_dir)

    @property
    def key(self) -> jax.Array:
        return jax.random.key(self.cfg.run.seed)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        eos = self.tokenizer.eos_id
        return () if eos is None else (eos,)

    @functools.cached_property
    def params_sharding(self) -> Any:
        return params_shardings_for(self.model, self.mesh)

    def iter_dir(self, t: int) -> Path:
        return self.out / f"iter_{t:02d}"

    def policy_dir(self, t: int) -> Path:
        return self.out / "policy" / f"iter_{t:02d}"

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def rng(self, *stream: int) -> np.random.Generator:
        """A host RNG for one decision of the run (e.g. ``rng(t, 0x7A1)``: iteration t's order)."""
        return np.random.default_rng([self.cfg.run.seed, *stream])

    def reference_fn(self, names: tuple[str, ...]) -> ReferenceFn:
        """The jitted log-prob function of responses ``names`` (built once per run)."""
        if names not in self._reference_fns:
            self._reference_fns[names] = make_reference_fn(self.model, self.mesh, responses=names)
        return self._reference_fns[names]

    def preference_step(self, train: TrainConfig) -> ShardedStep:
        """The preference step for ``train``, built and compiled once per run: alpha and the
        schedule's peak, warm-up and length are call-time inputs (``preference_hyper``), so
        every iteration reuses it (a new compilation only for a new padded pair length, or
        when alpha turns to or from 0, which drops or adds y_ref)."""
        opt = train.optimizer.replace(learning_rate=1.0, total_steps=1, warmup_steps=0)
        key = train.replace(alpha=float(train.alpha != 0), optimizer=opt)
        if key not in self._preference_steps:
            self._preference_steps[key] = make_preference_step(
                self.model, key, None, self.mesh, hyper=True
            )
        return self._preference_steps[key]

    def check_stop(self) -> None:
        """Raise Preempted on every process when any process saw SIGTERM."""
        if any_process(self.stop()):
            raise Preempted()

    def describe(self) -> list[str]:
        """What the run resolved, a line per part (logged when a run starts)."""
        cfg, model, tok = self.cfg, self.model, self.tokenizer
        origin = f"init.checkpoint {cfg.init.checkpoint}" if cfg.init.checkpoint else "random init"
        devices = jax.devices()
        template = "chat template" if tok.chat_template is not None else "no chat template"
        return [
            f"model: {model.num_params() / 1e6:.1f}M params, {model.num_layers} layers, "
            f"hidden {model.hidden_size}, {model.position} positions, {model.dtype} compute; "
            f"from {origin}",
            f"tokenizer: {tok.source} ({tok.vocab_size} tokens, {template}, eos {tok.eos_id})",
            f"judge: {self.judge!r}" if self.judge is not None else "judge: none",
            *([f"eval judge: {self.eval_judge!r}"] if self.eval_judge is not None else []),
            self.prompts.describe(),
            *self.prompts.notes,
            f"devices: {len(devices)} x {devices[0].platform} over {jax.process_count()} "
            f"process(es), mesh {dict(self.mesh.shape)}",
        ]

    # -- files -------------------------------------------------------------------------------
    def exists(self, path: Path) -> bool:
        """Whether ``path`` exists as process 0 sees it, agreed by every process: the resume
        decisions ("this phase's file is there: skip the phase") are taken with it, so all hosts
        take the same branch (a collective with several hosts)."""
        return bool(from_primary(Path(path).exists()))

    def write_json(self, path: Path, obj: Any) -> None:
        """Process 0 writes; every process waits until the file is there."""
        if is_primary():
            write_json(path, obj)
        barrier(f"write {path}")

    def write_arrays(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        if is_primary():
            write_arrays(path, arrays)
        barrier(f"write {path}")

    @property
    def tokenizer_path(self) -> str | None:
        """The tokenizer's files (absolute), when it has some (not a built-in one)."""
        spec = self.cfg.data.tokenizer or checkpoint_tokenizer(self.cfg.init.checkpoint)
        if spec is None or spec.startswith("builtin:"):
            return None
        return os.path.abspath(spec)

    def save_policy(self, t: int, params: Any) -> None:
        """The policy after iteration t, with its model config and where its tokenizer is
        (collective with several hosts)."""
        save_params(
            self.policy_dir(t),
            params,
            model_config=self.model,
            tokenizer=self.tokenizer_path,
            overwrite=True,
        )
        barrier(f"policy {t}")

    def load_policy(self, t: int) -> Any:
        return self.load_params(self.policy_dir(t))

    def load_params(self, path: str | Path) -> Any:
        """An LM checkpoint of any kind, checked against the run's model, laid out on the mesh."""
        return load_checkpoint(path, model_config=self.model, mesh=self.mesh)[1]


def check_judge(judge: Judge) -> None:
    """``judge.check()`` on process 0 (the one that calls the judge); its error on every process."""
    failed: JudgeError | None = None
    if is_primary():
        try:
            judge.check()
        except JudgeError as err:
            failed = err
    if any_process(failed is not None):
        raise failed or JudgeError("judge: the judge check failed on process 0 (its log says why)")


def build_judge(
    cfg: RunConfig,
    tokenizer: Tokenizer,
    config_dir: str | None = None,
    jc: Any = None,
    *,
    field: str = "judge",
) -> Judge:
    """The run's judge (or ``jc``, e.g. the eval judge); a reward-model judge's checkpoint (an
    HF LlamaForSequenceClassification directory, or a `jaxselm train-rm` export) is loaded
    here."""
    jc = cfg.judge if jc is None else jc
    if isinstance(jc, ProgrammaticJudgeConfig):
        return make_judge(jc, search_dirs=[config_dir] if config_dir else [])
    if isinstance(jc, LearnedRewardModelJudgeConfig):
        from jaxselm.online.learned_judge import LearnedRewardJudge

        return LearnedRewardJudge.from_config(
            jc, tokenizer, search_dirs=[config_dir] if config_dir else [], policy_model=cfg.model
        )
    if not isinstance(jc, RewardModelJudgeConfig):
        return make_judge(jc)
    if jc.checkpoint is None:
        raise ConfigError(
            f"{field}.checkpoint: the reward_model judge needs a checkpoint directory"
        )
    # With several processes each loads its own copy onto its first local device (only process
    # 0 calls the judge; jax.devices()[0], the default, belongs to process 0 alone).
    mesh = single_device_mesh(jax.local_devices()[0]) if jax.process_count() > 1 else None
    try:
        # An export saved without its model config is one of this run's model.
        own = cfg.model if read_model_config(jc.checkpoint) is None else None
        rm_cfg, params = load_checkpoint(jc.checkpoint, head="reward", model_config=own, mesh=mesh)
    except CheckpointError as err:
        raise CheckpointError(f"{field}.checkpoint: {err}") from None
    return make_judge(
        jc, params=params, model_config=rm_cfg, tokenizer=tokenizer, pad_id=tokenizer.pad_id
    )
