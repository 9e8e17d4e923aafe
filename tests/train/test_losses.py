"""Objectives against hand-computed values and direct per-token loops (numpy, float64).

Tolerance: inputs are float32, so values computed in float32 by the library and in float64 here
differ by a few ulps of the result's magnitude times the number of accumulated terms (<= 20
here): rtol 1e-5 / atol 1e-5 covers that with margin and still catches any wrong term (which
moves results by >= 1e-2).
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxselm.train import losses as L

RTOL = ATOL = 1e-5


def softplus(x: float) -> float:  # -log sigmoid(-x), scalar, float64
    return math.log1p(math.exp(x))


# Two pairs whose log-ratios are chosen so the DPO logits are easy by hand.
PC = np.array([-1.0, -2.0], np.float32)  # policy chosen
PR = np.array([-3.0, -1.0], np.float32)  # policy rejected
RC = np.array([-2.0, -2.0], np.float32)  # reference chosen
RR = np.array([-2.0, -2.0], np.float32)  # reference rejected
PY = np.array([-4.0, -6.0], np.float32)  # policy on y_ref
RY = np.array([-5.0, -5.0], np.float32)  # reference on y_ref
BETA = 0.5
# chosen log-ratios (1, 0), rejected (-1, 1): h = beta * (2, -1) = (1, -0.5)


def test_dpo_hand_values():
    loss, m = L.dpo_loss(PC, PR, RC, RR, beta=BETA)
    expected = (softplus(-1.0) + softplus(0.5)) / 2
    np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["rewards/chosen"], (0.5 + 0.0) / 2, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["rewards/rejected"], (-0.5 + 0.5) / 2, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["rewards/margins"], (1.0 - 0.5) / 2, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["rewards/accuracies"], 0.5)
    np.testing.assert_allclose(m["logps/chosen"], -1.5)
    np.testing.assert_allclose(m["logps/rejected"], -2.0)
    assert loss.dtype == jnp.float32


def test_dpo_label_smoothing_hand_values():
    eps = 0.1
    loss, _ = L.dpo_loss(PC, PR, RC, RR, beta=BETA, label_smoothing=eps)
    per = [(1 - eps) * softplus(-h) + eps * softplus(h) for h in (1.0, -0.5)]
    np.testing.assert_allclose(loss, sum(per) / 2, rtol=RTOL, atol=ATOL)


def test_selm_hand_values():
    alpha = 0.2
    loss, m = L.selm_loss(PC, PR, RC, RR, PY, RY, beta=BETA, alpha=alpha)
    dpo = (softplus(-1.0) + softplus(0.5)) / 2
    explore = alpha * BETA * ((-4.0 + 5.0) + (-6.0 + 5.0)) / 2  # = 0: log-ratios 1 and -1
    np.testing.assert_allclose(loss, dpo + explore, rtol=RTOL, atol=ATOL)
    # Asymmetric y_ref so the exploration term is non-zero.
    py = np.array([-4.0, -4.5], np.float32)
    loss, m = L.selm_loss(PC, PR, RC, RR, py, RY, beta=BETA, alpha=alpha)
    explore = alpha * BETA * (1.0 + 0.5) / 2
    np.testing.assert_allclose(loss, dpo + explore, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["selm/exploration"], explore, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["loss/dpo"], dpo, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["logps/refresp"], -4.25)
    np.testing.assert_allclose(m["rewards/refresp"], BETA * 0.75, rtol=RTOL, atol=ATOL)
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ):
        assert key in m


def test_ipo_hand_values():
    loss, _ = L.ipo_loss(PC, PR, RC, RR, beta=BETA)
    # h = (1 - (-1), 0 - 1) = (2, -1); target 1/(2 beta) = 1
    np.testing.assert_allclose(loss, ((2 - 1) ** 2 + (-1 - 1) ** 2) / 2, rtol=RTOL, atol=ATOL)


def test_xpo_hand_values():
    alpha = 0.3
    loss, _ = L.xpo_loss(PC, PR, RC, RR, PY, beta=BETA, alpha=alpha)
    dpo = (softplus(-1.0) + softplus(0.5)) / 2
    np.testing.assert_allclose(loss, dpo + alpha * (-5.0), rtol=RTOL, atol=ATOL)


def test_reward_model_hand_values():
    loss, m = L.reward_model_loss(np.array([2.0, 0.0]), np.array([1.0, 0.5]))
    np.testing.assert_allclose(loss, (softplus(-1.0) + softplus(0.5)) / 2, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["rm/accuracy"], 0.5)


def _random_logps(seed: int, n: int = 6):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(-20.0, 5.0, n), jnp.float32) for _ in range(6)]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_selm_alpha_zero_is_dpo_exactly(label_smoothing):
    pc, pr, rc, rr, py, ry = _random_logps(0)

    def selm(pc, pr, py):
        return L.selm_loss(
            pc, pr, rc, rr, py, ry, beta=0.1, alpha=0.0, label_smoothing=label_smoothing
        )[0]

    def dpo(pc, pr):
        return L.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=label_smoothing)[0]

    assert selm(pc, pr, py) == dpo(pc, pr)
    g_selm = jax.grad(selm, argnums=(0, 1, 2))(pc, pr, py)
    g_dpo = jax.grad(dpo, argnums=(0, 1))(pc, pr)
    np.testing.assert_array_equal(g_selm[0], g_dpo[0])
    np.testing.assert_array_equal(g_selm[1], g_dpo[1])
    np.testing.assert_array_equal(g_selm[2], np.zeros(6))


def test_selm_gradients():
    pc, pr, rc, rr, py, ry = _random_logps(1)
    alpha, beta, B = 1e-3, 0.01, 6
    g = jax.grad(lambda *a: L.selm_loss(*a, beta=beta, alpha=alpha)[0], argnums=(0, 1, 2, 3, 4, 5))(
        pc, pr, rc, rr, py, ry
    )
    # d/d log pi(y_ref) of the batch mean: alpha * beta per example, / B for the mean.
    np.testing.assert_allclose(g[4], np.full(B, alpha * beta / B), rtol=1e-6)
    # Reference log-probs carry no gradient.
    for i in (2, 3, 5):
        np.testing.assert_array_equal(g[i], np.zeros(B))
    # DPO part: d/d pi_w = -beta * sigmoid(-h) / B.
    h = beta * ((pc - rc) - (pr - rr))
    np.testing.assert_allclose(g[0], -beta * jax.nn.sigmoid(-h) / B, rtol=1e-5)
    np.testing.assert_allclose(g[1], beta * jax.nn.sigmoid(-h) / B, rtol=1e-5)


# -- sequence log-probs against a loop over tokens ----------------------------------------------


def _loop_logprobs(logits: np.ndarray, labels: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    out = np.zeros(labels.shape[0])
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if loss_mask[b, t]:
                row = logits[b, t - 1]
                logz = np.log(np.sum(np.exp(row - row.max()))) + row.max()
                out[b] += row[labels[b, t]] - logz
    return out


def _padded_batch(seed: int, padding: str):
    """Sequences of different prompt/response lengths, padded left or right to T = 9."""
    rng = np.random.default_rng(seed)
    B, T, V = 3, 9, 11
    lengths = [(2, 4), (3, 6), (1, 3)]  # (prompt, response)
    labels = np.zeros((B, T), np.int32)
    attn = np.zeros((B, T), np.int32)
    loss_mask = np.zeros((B, T), np.int32)
    for b, (p, r) in enumerate(lengths):
        n = p + r
        start = 0 if padding == "right" else T - n
        labels[b, start : start + n] = rng.integers(1, V, n)
        attn[b, start : start + n] = 1
        loss_mask[b, start + p : start + n] = 1
    logits = rng.normal(0.0, 2.0, (B, T, V)).astype(np.float32)
    return logits, labels, attn, loss_mask


@pytest.mark.parametrize("padding", ["left", "right"])
def test_sequence_logprobs_matches_loop(padding):
    logits, labels, _, loss_mask = _padded_batch(0, padding)
    got = jax.jit(L.sequence_logprobs)(logits, labels, loss_mask)
    chex.assert_shape(got, (3,))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, _loop_logprobs(logits, labels, loss_mask), rtol=RTOL, atol=ATOL)


def test_sequence_logprobs_bf16_logits_are_scored_in_fp32():
    logits, labels, _, loss_mask = _padded_batch(1, "right")
    low = jnp.asarray(logits, jnp.bfloat16)
    got = L.sequence_logprobs(low, labels, loss_mask)
    assert got.dtype == jnp.float32
    ref = _loop_logprobs(np.asarray(low.astype(jnp.float32)), labels, loss_mask)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


def test_sequence_logprobs_ignores_position_zero_and_masked_tokens():
    logits, labels, _, loss_mask = _padded_batch(2, "right")
    base = L.sequence_logprobs(logits, labels, loss_mask)
    # Changing a prompt token's label (masked out) or the last logit (predicts nothing) is inert.
    labels2 = labels.copy()
    labels2[:, 0] = (labels2[:, 0] + 1) % 11
    logits2 = logits.copy()
    logits2[:, -1] += 5.0
    np.testing.assert_array_equal(L.sequence_logprobs(logits2, labels2, loss_mask), base)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_sft_loss_matches_loop(padding):
    logits, labels, _, loss_mask = _padded_batch(3, padding)
    loss, m = L.sft_loss(logits, labels, loss_mask)
    total = _loop_logprobs(logits, labels, loss_mask).sum()
    count = loss_mask[:, 1:].sum()
    np.testing.assert_allclose(loss, -total / count, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m["sft/tokens"], count)
    assert 0.0 <= float(m["sft/accuracy"]) <= 1.0


def test_sft_loss_empty_mask_is_zero():
    logits, labels, _, loss_mask = _padded_batch(4, "right")
    loss, _ = L.sft_loss(logits, labels, np.zeros_like(loss_mask))
    assert float(loss) == 0.0


def test_shape_checks():
    with pytest.raises(AssertionError):
        L.dpo_loss(PC, PR[:1], RC, RR, beta=0.1)
    logits, labels, _, loss_mask = _padded_batch(5, "right")
    with pytest.raises(AssertionError):
        L.sequence_logprobs(logits, labels[:, :-1], loss_mask[:, :-1])


@pytest.mark.parametrize("chunk", [1, 3, 7, 50])
def test_chunked_sequence_logprobs_equal_the_full_logits(chunk):
    # Blocks of positions (chunk 3 and 7 do not divide the 7 scored positions evenly; 50 is more
    # than all) give the log-probs of hidden @ weight and their gradients wrt both. Tolerance:
    # float32 sums in another order (~1e-6 relative on values of a few nats).
    rng = np.random.default_rng(0)
    b, t, e, v = 3, 8, 5, 11
    hidden = jnp.asarray(rng.normal(size=(b, t, e)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(e, v)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    loss_mask = jnp.asarray(rng.integers(0, 2, (b, t)), jnp.int32)
    cot = jnp.asarray([1.0, -2.0, 0.5])

    def full(h, w):
        return L.sequence_logprobs(jnp.einsum("bte,ev->btv", h, w), labels, loss_mask) @ cot

    def chunked(h, w):
        return L.chunked_sequence_logprobs(h, w, labels, loss_mask, chunk=chunk) @ cot

    np.testing.assert_allclose(
        L.chunked_sequence_logprobs(hidden, weight, labels, loss_mask, chunk=chunk),
        L.sequence_logprobs(jnp.einsum("bte,ev->btv", hidden, weight), labels, loss_mask),
        rtol=1e-5,
        atol=1e-5,
    )
    got = jax.grad(chunked, argnums=(0, 1))(hidden, weight)
    want = jax.grad(full, argnums=(0, 1))(hidden, weight)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
