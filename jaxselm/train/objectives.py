"""What the train steps minimise: the per-micro-batch loss functions and the policy log-probs.

A loss function maps ``(params, micro-batch)`` to ``(summed loss, weight, summed metrics)``; the
step (:mod:`jaxselm.train.step`) sums them over micro-batches and divides once by the weight.
Preference losses read a ``PreferenceBatch`` whose responses are chosen, rejected and, when the
loss uses it, y_ref (:func:`responses_for`); the policy runs once over all of them, interleaved.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp

from jaxselm import metric_names as M
from jaxselm.data.packing import PreferenceBatch, Sequences
from jaxselm.errors import ConfigError
from jaxselm.model import ModelConfig, forward, lm_head
from jaxselm.train import losses as L
from jaxselm.train.optimizer import TrainConfig

Batch = Any  # a typed batch of jaxselm.data.packing (a pytree of [B, ...] arrays)
Metrics = dict[str, jax.Array]
# (params, micro-batch) -> (summed loss, weight, summed metrics); the step divides by the weight.
LossFn = Callable[[Any, Batch], tuple[jax.Array, jax.Array, Metrics]]

RESPONSES_WITH_REFRESP = ("chosen", "rejected", "refresp")
RESPONSES_PAIR = ("chosen", "rejected")


def responses_for(
    loss: str, alpha: float | None = None, refresp_metrics: bool = False
) -> tuple[str, ...]:
    """The responses a loss needs in the batch: y_ref only for selm and xpo, and not when
    ``alpha`` is 0 (their exploration term is then exactly zero: packing, scoring and training
    on y_ref would be a third more work for nothing) unless ``refresp_metrics`` asks for y_ref's
    log-ratio as a diagnostic (``rewards/refresp``, e.g. for a DPO baseline in a comparison)."""
    if loss in ("selm", "xpo") and (alpha != 0 or refresp_metrics):
        return RESPONSES_WITH_REFRESP
    return RESPONSES_PAIR


def train_responses(train: TrainConfig) -> tuple[str, ...]:
    """:func:`responses_for` of a train config (loss, alpha and ``refresp_metrics``)."""
    return responses_for(train.loss, train.alpha, train.refresp_metrics)


def policy_logprobs(
    params: Any,
    config: ModelConfig,
    batch: PreferenceBatch,
    responses: tuple[str, ...] = RESPONSES_WITH_REFRESP,
    chunk: int | None = None,
    entropy: bool = False,
) -> dict[str, jax.Array]:
    """Summed response log-probs {name: float32 [B]} from ONE forward over all responses.

    ``chunk`` (default ``config.logprob_chunk``; 0 = all positions at once): positions per
    block of logits (:func:`jaxselm.train.losses.chunked_sequence_logprobs`). ``entropy`` adds
    ``entropy/<name>`` (summed next-token entropy) and ``tokens/<name>`` (scored tokens) per
    response; it needs the full logits (chunk 0).
    """
    seqs: list[Sequences] = [getattr(batch, name) for name in responses]
    chex.assert_rank(seqs[0].tokens, 2)
    B, T = seqs[0].tokens.shape
    for s in seqs:
        chex.assert_shape([s.tokens, s.mask, s.loss_mask], (B, T))
    k = len(responses)

    def interleave(field: str) -> jax.Array:
        return jnp.stack([getattr(s, field) for s in seqs], axis=1).reshape(B * k, T)

    tokens = interleave("tokens").astype(jnp.int32)
    mask, loss_mask = interleave("mask"), interleave("loss_mask")
    chunk = config.logprob_chunk if chunk is None else chunk
    out: dict[str, jax.Array] = {}
    if chunk:
        if entropy:
            raise ConfigError("train.entropy_bonus: needs model.logprob_chunk=0 (full logits)")
        hidden = forward(params, config, tokens, attention_mask=mask, return_hidden=True)
        w = lm_head(params, config)
        logps = L.chunked_sequence_logprobs(hidden, w, tokens, loss_mask, chunk=chunk)
    else:
        logits = forward(params, config, tokens, attention_mask=mask)
        logps = L.sequence_logprobs(logits, tokens, loss_mask)
        if entropy:
            ent = L.sequence_entropy(logits, loss_mask).reshape(B, k)
            n = jnp.sum(loss_mask[:, 1:].astype(jnp.float32), axis=-1).reshape(B, k)
            for i, name in enumerate(responses):
                out[f"entropy/{name}"], out[f"tokens/{name}"] = ent[:, i], n[:, i]
    logps = logps.reshape(B, k)
    return {**{name: logps[:, i] for i, name in enumerate(responses)}, **out}


def preference_loss_fn(
    config: ModelConfig, train: TrainConfig, alpha: jax.Array | float | None = None
) -> LossFn:
    """The per-micro-batch loss of ``train.loss`` (selm, dpo, ipo or xpo).

    ``alpha`` (may be traced) replaces ``train.alpha`` in the loss; whether y_ref is in the
    batch is decided by ``train.alpha`` (see :func:`train_responses`): with ``train.alpha == 0``
    (and no ``train.refresp_metrics``) SELM is DPO and XPO is DPO, with the exploration metrics
    at exactly 0.
    """
    responses = train_responses(train)
    alpha = train.alpha if alpha is None else alpha

    def loss_fn(params: Any, mb: PreferenceBatch) -> tuple[jax.Array, jax.Array, Metrics]:
        if mb.ref_logps is None:
            raise ConfigError("batch.ref_logps: a preference step needs the reference log-probs")
        pol = policy_logprobs(params, config, mb, responses, entropy=train.entropy_bonus > 0)
        ref = mb.ref_logps
        common = (pol["chosen"], pol["rejected"], ref.chosen, ref.rejected)
        if train.loss == "selm" and "refresp" in pol:
            losses, metrics = L.selm_loss_terms(
                *common,
                pol["refresp"],
                ref.refresp,
                beta=train.beta,
                alpha=alpha,
                label_smoothing=train.label_smoothing,
            )
        elif train.loss in ("dpo", "selm", "xpo") and "refresp" not in pol:
            losses, metrics = L.dpo_loss_terms(
                *common, beta=train.beta, label_smoothing=train.label_smoothing
            )
            if train.loss != "dpo":  # alpha = 0: the exploration term is exactly zero
                zero = jnp.zeros_like(losses)
                metrics[M.LOSS_DPO] = jax.lax.stop_gradient(losses)
                name = M.SELM_EXPLORATION if train.loss == "selm" else M.XPO_EXPLORATION
                metrics[name] = zero
        elif train.loss == "ipo":
            losses, metrics = L.ipo_loss_terms(*common, beta=train.beta)
        else:  # XPO has no reference term for y_ref
            losses, metrics = L.xpo_loss_terms(
                *common, pol["refresp"], beta=train.beta, alpha=alpha
            )
        if train.entropy_bonus > 0:  # mean token entropy of each pair's two responses
            ent = (pol["entropy/chosen"] + pol["entropy/rejected"]) / jnp.maximum(
                pol["tokens/chosen"] + pol["tokens/rejected"], 1.0
            )
            losses = losses - train.entropy_bonus * ent
            metrics[M.ENTROPY] = jax.lax.stop_gradient(ent)
        weight = jnp.asarray(losses.shape[0], jnp.float32)
        return jnp.sum(losses), weight, {k: jnp.sum(v) for k, v in metrics.items()}

    return loss_fn


def sft_loss_fn(config: ModelConfig) -> LossFn:
    """Token NLL of ``tokens`` where ``loss_mask`` is 1 (weight: the number of such tokens)."""

    def loss_fn(params: Any, mb: Sequences) -> tuple[jax.Array, jax.Array, Metrics]:
        chex.assert_rank(mb.tokens, 2)
        chex.assert_equal_shape([mb.tokens, mb.mask, mb.loss_mask])
        tokens = mb.tokens.astype(jnp.int32)
        logits = forward(params, config, tokens, attention_mask=mb.mask)
        return L.sft_loss_terms(logits, tokens, mb.loss_mask)

    return loss_fn


def reward_loss_fn(score_fn: Callable[[Any, jax.Array, jax.Array], jax.Array]) -> LossFn:
    """Bradley-Terry loss of ``score_fn(params, tokens [N, T], mask [N, T]) -> float32 [N]``.

    The chosen and rejected rows of a ``PreferenceBatch`` go through ``score_fn`` together,
    interleaved as [2b, T].
    """

    def loss_fn(params: Any, mb: PreferenceBatch) -> tuple[jax.Array, jax.Array, Metrics]:
        c, r = mb.chosen, mb.rejected
        B, T = c.tokens.shape
        chex.assert_shape([c.mask, r.tokens, r.mask], (B, T))
        tokens = jnp.stack([c.tokens, r.tokens], 1).reshape(2 * B, T)
        mask = jnp.stack([c.mask, r.mask], 1).reshape(2 * B, T)
        scores = jnp.asarray(score_fn(params, tokens.astype(jnp.int32), mask), jnp.float32)
        scores = scores.reshape(B, 2)
        losses, metrics = L.reward_model_loss_terms(scores[:, 0], scores[:, 1])
        weight = jnp.asarray(B, jnp.float32)
        return jnp.sum(losses), weight, {k: jnp.sum(v) for k, v in metrics.items()}

    return loss_fn


__all__ = [
    "RESPONSES_PAIR",
    "RESPONSES_WITH_REFRESP",
    "Batch",
    "LossFn",
    "Metrics",
    "policy_logprobs",
    "preference_loss_fn",
    "responses_for",
    "train_responses",
    "reward_loss_fn",
    "sft_loss_fn",
]
