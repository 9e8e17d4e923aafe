"""Optimizer and training configs, and the optax transformation they describe.

AdamW with a linear warm-up followed by cosine (or linear, or constant) decay, gradients clipped by
global norm first. SELM's recipe (Zhang et al., 2024) is AdamW, lr 5e-7, cosine, 10% warm-up:

    opt_cfg = OptimizerConfig(learning_rate=5e-7, total_steps=1000, warmup_ratio=0.1)
    tx = make_optimizer(opt_cfg)          # an optax.GradientTransformation
    lr = make_schedule(opt_cfg)(step)     # what the step reports as "learning_rate"

Gradient accumulation is *not* an optax wrapper here: the train step scans over micro-batches
and applies one update per call (see ``jaxselm.train.step``), so ``TrainConfig.micro_batches``
lives with the step settings. Precision: parameters (master weights) are stored in the model's
``param_dtype`` (float32 by default) and cast to ``dtype`` (e.g. bfloat16) inside the forward, so
the update below always runs on the float32 masters; ``mu_dtype`` can store Adam's first moment
in bfloat16 to save memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

import jax.numpy as jnp
import numpy as np
import optax
from pydantic import Field, model_validator

from jaxselm.config_base import (
    FrozenConfig,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
)


class OptimizerConfig(FrozenConfig):
    """AdamW + schedule + clipping. ``warmup_steps`` (if set) overrides ``warmup_ratio``."""

    _error_prefix: ClassVar[str] = "optimizer"

    learning_rate: PositiveFloat = 5e-7
    total_steps: PositiveInt = 1000
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: Probability = 0.1
    warmup_steps: NonNegativeInt | None = None
    final_lr_ratio: Probability = 0.0  # learning rate at total_steps, as a fraction of the peak
    b1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    b2: Annotated[float, Field(ge=0, lt=1)] = 0.999
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegativeFloat = 0.0
    max_grad_norm: PositiveFloat | None = 1.0  # None: no clipping
    mu_dtype: Literal["float32", "bfloat16"] | None = None  # None: the params' dtype

    @model_validator(mode="after")
    def _check(self) -> OptimizerConfig:
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps: must be in [0, total_steps={self.total_steps}]")
        return self

    @property
    def resolved_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(round(self.warmup_ratio * self.total_steps))


class TrainConfig(FrozenConfig):
    """The objective and the step's batching. ``loss``: selm | dpo | ipo | xpo.

    ``micro_batches`` splits each batch into that many micro-batches whose gradients are summed
    in a scan before the one optimizer update (the batch size must be divisible by it).
    """

    _error_prefix: ClassVar[str] = "train"

    loss: Literal["selm", "dpo", "ipo", "xpo"] = "selm"
    beta: PositiveFloat = 0.01
    alpha: NonNegativeFloat = 1e-3
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    micro_batches: PositiveInt = 1
    # Score y_ref even when alpha is 0 (SELM / XPO are then DPO) to report its log-ratio,
    # rewards/refresp: a diagnostic for comparisons, at a third more train and reference work.
    refresp_metrics: bool = False
    # Subtract entropy_bonus x the policy's mean next-token entropy over each pair's chosen and
    # rejected response tokens (a control for exploration: more randomness, no optimism). Needs
    # model.logprob_chunk = 0 (the full logits).
    entropy_bonus: NonNegativeFloat = 0.0
    optimizer: OptimizerConfig = OptimizerConfig()

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.label_smoothing and self.loss not in ("selm", "dpo"):
            raise ValueError(
                f"label_smoothing: only the selm and dpo losses support it, not {self.loss}"
            )
        return self


# The schedule's numbers that may change between runs of one compiled step (each online
# iteration has its own peak learning rate and length): with ``hyper`` they are traced scalars
# given at call time, so the step compiles once per run instead of once per iteration.
SCHEDULE_HYPER = ("learning_rate", "warmup_steps", "total_steps")


def schedule_hyper(config: OptimizerConfig) -> dict[str, np.ndarray]:
    """``config``'s values of :data:`SCHEDULE_HYPER`, as float32 scalars (what ``hyper`` takes)."""
    return {
        "learning_rate": np.float32(config.learning_rate),
        "warmup_steps": np.float32(config.resolved_warmup_steps),
        "total_steps": np.float32(config.total_steps),
    }


def make_schedule(
    config: OptimizerConfig, hyper: Mapping[str, Any] | None = None
) -> optax.Schedule:
    """Learning rate as a function of the update count: linear warm-up, then the decay.

    ``hyper`` (see :func:`schedule_hyper`) overrides the peak, warm-up and length with values
    that may be traced; ``config`` still gives the decay's kind and final ratio. Written in jnp
    (optax's schedules check their lengths in Python, so they cannot take traced lengths) with
    optax's formulas: linear_schedule(0, peak, warmup) joined with cosine_decay_schedule /
    linear_schedule / constant_schedule, as before.
    """
    h = schedule_hyper(config) if hyper is None else hyper
    kind, ratio = config.schedule, config.final_lr_ratio

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        peak = jnp.asarray(h["learning_rate"], jnp.float32)
        warmup = jnp.asarray(h["warmup_steps"], jnp.float32)
        decay_steps = jnp.maximum(jnp.asarray(h["total_steps"], jnp.float32) - warmup, 1.0)
        d = jnp.clip(count - warmup, 0.0, decay_steps)
        if kind == "cosine":
            cosine = 0.5 * (1 + jnp.cos(jnp.pi * d / decay_steps))
            decayed = peak * ((1 - ratio) * cosine + ratio)
        elif kind == "linear":
            end = peak * ratio
            decayed = (peak - end) * (1 - d / decay_steps) + end
        else:
            decayed = peak
        w = jnp.clip(count, 0.0, warmup)
        warm = (0.0 - peak) * (1 - w / jnp.maximum(warmup, 1.0)) + peak
        return jnp.where(count < warmup, warm, decayed)

    return schedule


def make_optimizer(
    config: OptimizerConfig, hyper: Mapping[str, Any] | None = None
) -> optax.GradientTransformation:
    """clip_by_global_norm (if ``max_grad_norm``) then AdamW with :func:`make_schedule`.

    ``hyper``: traced schedule values (:func:`make_schedule`); the state's structure does not
    depend on them, so ``make_optimizer(config).init`` serves every ``hyper``.
    """
    mu_dtype = None if config.mu_dtype is None else jnp.dtype(config.mu_dtype)
    adamw = optax.adamw(
        make_schedule(config, hyper),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mu_dtype=mu_dtype,
    )
    if config.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
