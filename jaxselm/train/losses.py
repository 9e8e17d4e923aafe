"""Training objectives: sequence log-probs, DPO, IPO, SELM, XPO, SFT and reward-model losses.

All in float32 whatever the compute dtype of the logits. Preference losses take *summed*
log-probabilities of each response (``sequence_logprobs``), one per example, and return
``(loss, metrics)`` with the loss averaged over the batch and metrics named as TRL names them
(``rewards/chosen``, ``rewards/margins``, ``logps/chosen``...), so dashboards read the same.

SELM (Zhang et al., 2024, "Self-Exploring Language Models") adds an optimism term to DPO::

    L = -log sigmoid(beta * [(pi_w - ref_w) - (pi_l - ref_l)])  +  alpha * beta * (pi_y - ref_y)

with pi_* = log pi_theta(y|x) and ref_* = log pi_ref(y|x) summed over response tokens and y the
response sampled from pi_ref. Reference log-probs carry no gradient (``stop_gradient``); with
alpha = 0 the loss is DPO's, bit for bit. ``label_smoothing`` gives conservative DPO (the chosen
label is assumed flipped with that probability).

Each loss has a ``*_terms`` form returning per-example losses and metrics ([B] arrays): the train
step sums those over micro-batches and divides once by the whole batch size, so gradient
accumulation is exact.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxselm import metric_names as M

Metrics = dict[str, jax.Array]


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _label_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """log softmax(logits)[target] per position, float32 [B, T]."""
    logits_BTV = _f32(logits_BTV)
    targets = targets_BT.astype(jnp.int32)[..., None]
    picked_BT = jnp.take_along_axis(logits_BTV, targets, axis=-1)[..., 0]
    return picked_BT - jax.nn.logsumexp(logits_BTV, axis=-1)


def token_logprobs(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """log p(labels[:, t+1] | logits[:, t]) for t < T-1, float32 [B, T-1]."""
    chex.assert_rank(logits, 3)
    chex.assert_rank(labels, 2)
    chex.assert_equal_shape_prefix([logits, labels], 2)
    return _label_logprobs(logits[:, :-1], labels[:, 1:])


def sequence_logprobs(logits: jax.Array, labels: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Summed log-probability of the masked label tokens of each sequence, float32 [B].

    ``logits`` [B, T, V] come from the model run on ``labels`` [B, T] (the logit at position t
    predicts token t+1); ``loss_mask`` [B, T] marks the response tokens *of the labels* (prompt
    and padding tokens are 0). Position 0 cannot be scored (nothing predicts it) and is ignored.
    Works for left or right padding: only the mask decides what counts.
    """
    chex.assert_equal_shape([labels, loss_mask])
    logp_BT = token_logprobs(logits, labels)
    mask_BT = _f32(loss_mask[:, 1:])
    return jnp.sum(logp_BT * mask_BT, axis=-1)


def sequence_entropy(logits: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Summed next-token entropy H(p(. | logits[:, t])) over the positions that predict a masked
    token (the same positions :func:`sequence_logprobs` scores), float32 [B]."""
    chex.assert_rank(logits, 3)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    ent_BT = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.sum(ent_BT * _f32(loss_mask[:, 1:]), axis=-1)


def chunked_sequence_logprobs(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    loss_mask: jax.Array,
    *,
    chunk: int,
) -> jax.Array:
    """:func:`sequence_logprobs` of ``logits = hidden @ weight`` without the [B, T, V] logits.

    ``hidden`` [B, T, E] are the final (normed) hidden states, ``weight`` [E, V] the lm head.
    Positions are taken ``chunk`` at a time in a ``lax.scan`` whose body is rematerialised
    (``jax.checkpoint``): forward and backward hold one [B, chunk, V] block of float32 logits,
    at the price of computing each block's logits twice when differentiated (the lm head's
    forward matmul once more; measured on CPU for SmolLM2's shape with 6 of its 30 layers: +25%
    CPU time per step at chunk 128, so it is for memory, not speed). Sums over chunks in order,
    so results equal the unchunked ones up to float32 summation order.
    """
    chex.assert_rank([hidden, weight, labels], [3, 2, 2])
    chex.assert_equal_shape([labels, loss_mask])
    b, t, e = hidden.shape
    n = t - 1
    c = max(1, min(chunk, n))
    pad = -(-n // c) * c - n

    def blocks(x: jax.Array) -> jax.Array:  # [B, n, ...] -> [n / c, B, c, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(b, -1, c, *x.shape[2:]).swapaxes(0, 1)

    w = weight.astype(hidden.dtype)

    @jax.checkpoint
    def body(acc: jax.Array, xs: tuple[jax.Array, jax.Array, jax.Array]):
        h, y, m = xs
        logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
        return acc + jnp.sum(_label_logprobs(logits, y) * _f32(m), axis=-1), None

    xs = (blocks(hidden[:, :-1]), blocks(labels[:, 1:]), blocks(loss_mask[:, 1:]))
    out, _ = jax.lax.scan(body, jnp.zeros((b,), jnp.float32), xs)
    return out


def _preference_metrics(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
) -> Metrics:
    return {
        M.REWARDS_CHOSEN: chosen_rewards,
        M.REWARDS_REJECTED: rejected_rewards,
        M.REWARDS_MARGINS: chosen_rewards - rejected_rewards,
        M.REWARDS_ACCURACIES: (chosen_rewards > rejected_rewards).astype(jnp.float32),
        M.LOGPS_CHOSEN: policy_chosen,
        M.LOGPS_REJECTED: policy_rejected,
    }


def _check_logps(*xs: jax.Array) -> tuple[jax.Array, ...]:
    chex.assert_rank(xs, 1)
    chex.assert_equal_shape(xs)
    return tuple(_f32(x) for x in xs)


def dpo_loss_terms(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """Per-example DPO losses [B] and metrics (each [B]); see :func:`dpo_loss`."""
    pc, pr, rc, rr = _check_logps(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
    chosen_logratio = pc - rc
    rejected_logratio = pr - rr
    h = beta * (chosen_logratio - rejected_logratio)
    losses = -jax.nn.log_sigmoid(h)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * jax.nn.log_sigmoid(-h)
    metrics = _preference_metrics(
        pc,
        pr,
        beta * jax.lax.stop_gradient(chosen_logratio),
        beta * jax.lax.stop_gradient(rejected_logratio),
    )
    return losses, metrics


def selm_loss_terms(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    policy_refresp: jax.Array,
    ref_refresp: jax.Array,
    *,
    beta: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """Per-example SELM losses [B] and metrics (each [B]); see :func:`selm_loss`."""
    losses, metrics = dpo_loss_terms(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        beta=beta,
        label_smoothing=label_smoothing,
    )
    py, ry = _check_logps(policy_refresp, ref_refresp)
    refresp_logratio = py - jax.lax.stop_gradient(ry)
    exploration = alpha * beta * refresp_logratio
    metrics = {
        **metrics,
        M.LOSS_DPO: jax.lax.stop_gradient(losses),
        M.LOGPS_REFRESP: py,
        M.REWARDS_REFRESP: beta * jax.lax.stop_gradient(refresp_logratio),
        M.SELM_EXPLORATION: jax.lax.stop_gradient(exploration),
    }
    # alpha == 0: adds exact zeros, so the value and gradient are DPO's bit for bit.
    return losses + exploration, metrics


def ipo_loss_terms(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    *,
    beta: float,
) -> tuple[jax.Array, Metrics]:
    """Per-example IPO losses [B] and metrics; see :func:`ipo_loss`."""
    pc, pr, rc, rr = _check_logps(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
    h = (pc - rc) - (pr - rr)
    losses = jnp.square(h - 1.0 / (2.0 * beta))
    metrics = _preference_metrics(
        pc, pr, beta * jax.lax.stop_gradient(pc - rc), beta * jax.lax.stop_gradient(pr - rr)
    )
    return losses, metrics


def xpo_loss_terms(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    policy_refresp: jax.Array,
    *,
    beta: float,
    alpha: float,
) -> tuple[jax.Array, Metrics]:
    """Per-example XPO losses [B]: DPO + alpha * log pi(y_ref) (no beta, no reference term)."""
    losses, metrics = dpo_loss_terms(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta
    )
    (py,) = _check_logps(policy_refresp)
    exploration = alpha * py
    metrics = {
        **metrics,
        M.LOSS_DPO: jax.lax.stop_gradient(losses),
        M.LOGPS_REFRESP: py,
        M.XPO_EXPLORATION: jax.lax.stop_gradient(exploration),
    }
    return losses + exploration, metrics


def _mean(losses: jax.Array, metrics: Metrics) -> tuple[jax.Array, Metrics]:
    return jnp.mean(losses), {k: jnp.mean(v) for k, v in metrics.items()}


def dpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """DPO: mean of -log sigmoid(beta * [(pi_w - ref_w) - (pi_l - ref_l)]) over the batch.

    Inputs are summed log-probs, each [B]. With ``label_smoothing`` = eps (conservative DPO) the
    per-example loss is -(1 - eps) log sigmoid(h) - eps log sigmoid(-h).
    """
    return _mean(
        *dpo_loss_terms(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            beta=beta,
            label_smoothing=label_smoothing,
        )
    )


def ipo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    *,
    beta: float,
) -> tuple[jax.Array, Metrics]:
    """IPO (Azar et al., 2023): mean of ([(pi_w - ref_w) - (pi_l - ref_l)] - 1/(2 beta))^2.

    Here on summed log-probs like the other losses (TRL averages them per token for IPO).
    """
    return _mean(
        *ipo_loss_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta)
    )


def selm_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    policy_refresp: jax.Array,
    ref_refresp: jax.Array,
    *,
    beta: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """SELM: DPO (optionally label-smoothed) + alpha * beta * (pi(y_ref) - ref(y_ref)), batch mean.

    All inputs are summed log-probs [B]; ``*_refresp`` score the response sampled from pi_ref.
    Metrics: TRL's rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected,refresp},
    rewards/refresp (beta * log-ratio of y_ref), loss/dpo, and selm/exploration (the term added).
    """
    return _mean(
        *selm_loss_terms(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            policy_refresp,
            ref_refresp,
            beta=beta,
            alpha=alpha,
            label_smoothing=label_smoothing,
        )
    )


def xpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    policy_refresp: jax.Array,
    *,
    beta: float,
    alpha: float,
) -> tuple[jax.Array, Metrics]:
    """XPO (Xie et al., 2024) as the mission states it: DPO + alpha * log pi(y_ref), batch mean."""
    return _mean(
        *xpo_loss_terms(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            policy_refresp,
            beta=beta,
            alpha=alpha,
        )
    )


def sft_loss_terms(
    logits: jax.Array, labels: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array, Metrics]:
    """Summed token NLL, number of scored tokens and summed per-token metrics (accumulation)."""
    chex.assert_equal_shape([labels, loss_mask])
    logp_BT = token_logprobs(logits, labels)
    mask_BT = _f32(loss_mask[:, 1:])
    nll_sum = -jnp.sum(logp_BT * mask_BT)
    hits = jnp.argmax(logits[:, :-1], axis=-1) == labels[:, 1:]
    metrics = {M.SFT_NLL: nll_sum, M.SFT_ACCURACY: jnp.sum(hits * mask_BT)}
    return nll_sum, jnp.sum(mask_BT), metrics


def sft_loss(
    logits: jax.Array, labels: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, Metrics]:
    """Mean next-token NLL over the masked label tokens (float32), for the SFT warm start.

    Shifted like :func:`sequence_logprobs`: ``loss_mask[:, t]`` says whether token t is a target.
    Returns (loss, {"sft/nll", "sft/accuracy", "sft/tokens"}); an all-zero mask gives loss 0.
    """
    nll_sum, count, metrics = sft_loss_terms(logits, labels, loss_mask)
    denom = jnp.maximum(count, 1.0)
    out = {k: v / denom for k, v in metrics.items()}
    out[M.SFT_TOKENS] = count
    return nll_sum / denom, out


def reward_model_loss_terms(
    chosen_scores: jax.Array, rejected_scores: jax.Array
) -> tuple[jax.Array, Metrics]:
    """Per-pair Bradley-Terry losses [B] and metrics; see :func:`reward_model_loss`."""
    c, r = _check_logps(chosen_scores, rejected_scores)
    margin = c - r
    losses = -jax.nn.log_sigmoid(margin)
    metrics = {
        M.RM_ACCURACY: (margin > 0).astype(jnp.float32),
        M.RM_MARGIN: jax.lax.stop_gradient(margin),
        M.RM_CHOSEN: jax.lax.stop_gradient(c),
        M.RM_REJECTED: jax.lax.stop_gradient(r),
    }
    return losses, metrics


def reward_model_loss(
    chosen_scores: jax.Array, rejected_scores: jax.Array
) -> tuple[jax.Array, Metrics]:
    """Bradley-Terry reward-model loss: mean of -log sigmoid(r(x, y_w) - r(x, y_l)) over pairs."""
    return _mean(*reward_model_loss_terms(chosen_scores, rejected_scores))
