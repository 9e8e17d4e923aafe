"""The learned reward-model judge (``judge.kind: learned_reward_model``).

A fixed judge (a verifier, a frozen reward model) knows the answer everywhere, so it leaves no
reward uncertainty for SELM's optimism to act on. This judge is what an online run with a
labelling budget has instead: each iteration an annotator (a ``module:function`` scorer, e.g. a
task's verifier standing in for a human) labels ``labels_per_iteration`` pairs of the
iteration's own samples; a small reward model is trained from its seeded init on every label so
far (Bradley-Terry, ``steps`` steps of ``batch_size`` pairs, constant learning rate) and then
scores every sample. Where no label has been, the reward model is guessing.

Per iteration t the labels so far are written to ``iter_t/rm_labels.json`` before training, so a
resumed run retrains the same model from the same labels (training is deterministic) without
asking the annotator again. It lives here, not in ``feedback/``, because it trains a model
(``train/``), which the judges below the online loop may not import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pydantic

from jaxselm.checkpoints import load_checkpoint
from jaxselm.data.packing import pack_preferences, take_rows
from jaxselm.errors import ConfigError, JudgeError
from jaxselm.feedback.base import Judge, Response
from jaxselm.feedback.config import LearnedRewardModelJudgeConfig
from jaxselm.feedback.programmatic import resolve_callable
from jaxselm.feedback.reward_model import RewardModelJudge
from jaxselm.files import read_json, write_json
from jaxselm.model import ModelConfig, init_params, with_score_head
from jaxselm.parallel import single_device_mesh
from jaxselm.train import (
    OptimizerConfig,
    TrainConfig,
    create_train_state,
    make_optimizer,
    make_reward_model_step,
)

LABELS = "rm_labels.json"


class LearnedRewardJudge(Judge):
    """Scores with a reward model refitted at :meth:`begin_iteration` on the labels so far."""

    def __init__(
        self,
        config: LearnedRewardModelJudgeConfig,
        tokenizer: Any,
        annotator: Any,
        *,
        policy_model: ModelConfig | None = None,
    ) -> None:
        """``policy_model``: the run's model, the reward model's architecture with
        ``init: policy``."""
        super().__init__(extra_counters=("gold_labels", "gold_ties", "rm_labels"))
        if config.init == "policy":
            if policy_model is None:
                raise ConfigError("judge.init: policy needs the run's model (policy_model)")
            self.model_config = policy_model
        else:
            try:
                self.model_config = ModelConfig(
                    **{**(config.model or {"preset": "tiny"}), "vocab_size": tokenizer.vocab_size}
                )
            except (ConfigError, pydantic.ValidationError, TypeError) as err:
                raise ConfigError(f"judge.model: {err}") from None
        self.config = config
        self.tokenizer = tokenizer
        self.annotator = annotator
        self.scorer: RewardModelJudge | None = None
        self.fit_metrics: dict[str, float] = {}
        self._step: Any = None
        self._tx: Any = None
        self._start: Any = None  # the reward model's initial params (the same every iteration)

    @classmethod
    def from_config(
        cls,
        config: LearnedRewardModelJudgeConfig,
        tokenizer: Any,
        *,
        search_dirs: Sequence[str] = (),
        policy_model: ModelConfig | None = None,
    ) -> LearnedRewardJudge:
        fn = resolve_callable(config.annotator, field="judge.annotator", search_dirs=search_dirs)
        if not callable(fn):
            raise JudgeError(f"judge.annotator: {config.annotator!r} is not callable")
        return cls(config, tokenizer, fn, policy_model=policy_model)

    # -- per iteration ---------------------------------------------------------------------
    def begin_iteration(
        self,
        t: int,
        prompts: Sequence[str],
        responses: Sequence[Sequence[str]],
        state_dir: Path,
        prev_dir: Path | None,
        policy_dir: Path | None = None,
    ) -> None:
        """Label this iteration's pairs (or read them back on resume), then refit the model.
        ``policy_dir``: the warm-start policy, the reward model's start with ``init: policy``."""
        if self._start is None:  # kept on the host: each fit's step donates its state
            self._start = jax.device_get(self._initial_params(policy_dir))
        path = Path(state_dir) / LABELS
        if path.is_file():
            labels = read_json(path)["labels"]
        else:
            prev = Path(prev_dir) / LABELS if prev_dir is not None else None
            labels = read_json(prev)["labels"] if prev is not None and prev.is_file() else []
            new = self._annotate(t, prompts, responses)
            labels = labels + new
            write_json(path, {"iteration": t, "new": len(new), "labels": labels})
        self._count("rm_labels", len(labels))
        self._fit(labels)
        for k in ("rm/accuracy", "loss"):  # the fit's last batch, in this iteration's stats
            if k in self.fit_metrics:
                self._count_max(f"rm_fit_{k.split('/')[-1]}", self.fit_metrics[k])

    def _annotate(
        self, t: int, prompts: Sequence[str], responses: Sequence[Sequence[str]]
    ) -> list[dict[str, Any]]:
        """Two different samples of each of up to ``labels_per_iteration`` random prompts,
        ordered by the annotator; ties (and unscorable items) give no label."""
        rng = np.random.default_rng([self.config.seed, t, 0x1AB])
        candidates = [i for i, rs in enumerate(responses) if len(set(rs)) >= 2]
        out = []
        for i in rng.permutation(candidates)[: self.config.labels_per_iteration]:
            distinct = sorted(set(responses[i]))
            a, b = (distinct[j] for j in rng.choice(len(distinct), size=2, replace=False))
            sa, sb = (float(self.annotator(prompts[i], r)) for r in (a, b))
            self._count("gold_labels")
            if not (math.isfinite(sa) and math.isfinite(sb)) or sa == sb:
                self._count("gold_ties")
                continue
            chosen, rejected = (a, b) if sa > sb else (b, a)
            out.append({"prompt": prompts[i], "chosen": chosen, "rejected": rejected, "t": t})
        return out

    def _fit(self, labels: list[dict[str, Any]]) -> None:
        cfg = self.config
        if not labels:
            self.scorer, self.fit_metrics = None, {}
            return
        enc = self.tokenizer.encode
        prompts = [enc(r["prompt"]) for r in labels]
        chosen = [enc(r["chosen"]) for r in labels]
        rejected = [enc(r["rejected"]) for r in labels]
        pad = self.tokenizer.pad_id
        data = pack_preferences(prompts, chosen, rejected, pad_id=pad)
        opt = OptimizerConfig(
            learning_rate=cfg.learning_rate, total_steps=cfg.steps, schedule="constant",
            warmup_ratio=0.0,
        )  # fmt: skip
        if self._step is None:  # one step (and its compilations) for the whole run
            self._tx = make_optimizer(opt)
            mesh = single_device_mesh(jax.local_devices()[0])
            self._step = make_reward_model_step(
                self.model_config, TrainConfig(optimizer=opt), self._tx, mesh
            )
        tx = self._tx
        rng = np.random.default_rng([cfg.seed, len(labels), 0x5EED])
        bs = cfg.batch_size
        order = np.concatenate(
            [rng.permutation(len(labels)) for _ in range(math.ceil(cfg.steps * bs / len(labels)))]
        )
        # A plain loop, not TrainLoop: only process 0 judges, and TrainLoop's stop check is a
        # collective over every process.
        state = jax.device_put(create_train_state(self._start, tx), self._step.state_shardings)
        metrics: Any = {}
        for s in range(cfg.steps):
            state, metrics = self._step(state, take_rows(data, order[s * bs : (s + 1) * bs]))
        self.fit_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.scorer = RewardModelJudge(
            state.params,
            self.model_config,
            self.tokenizer,
            batch_size=cfg.score_batch_size,
            pad_id=pad,
        )

    def _initial_params(self, policy_dir: Path | None) -> Any:
        """The seeded random init, or with ``init: policy`` the policy's trunk (its LM head
        dropped) under the seeded init's score head."""
        fresh = init_params(self.model_config, jax.random.key(self.config.seed), head="reward")
        if self.config.init != "policy":
            return fresh
        if policy_dir is None:
            raise ValueError("judge.init: policy: begin_iteration needs policy_dir")
        # one device: only process 0 judges
        mesh = single_device_mesh(jax.local_devices()[0])
        _, params = load_checkpoint(policy_dir, model_config=self.model_config, mesh=mesh)
        return with_score_head(params, fresh)

    # -- scoring ---------------------------------------------------------------------------
    def _score(self, prompts: list[str], responses: list[Response]) -> np.ndarray:
        if self.scorer is None:  # no label yet: no information, every sample ties
            return np.zeros(len(prompts), np.float64)
        return self.scorer.score(prompts, responses)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"LearnedRewardJudge(annotator={c.annotator}, labels/iter={c.labels_per_iteration}, "
            f"layers={self.model_config.num_layers}, hidden={self.model_config.hidden_size}, "
            f"steps={c.steps})"
        )
