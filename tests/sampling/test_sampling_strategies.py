"""Sampling strategies: exact filter semantics and chi-square tests of the sampled frequencies.

Chi-square threshold: under the null hypothesis (the sampler draws from the expected distribution)
the p-value is uniform on [0, 1], so ``p > 1e-3`` wrongly fails for one seed in a thousand; the
seeds are fixed, so the tests are deterministic. With 20,000 draws the test has the power to see
any real mistake: each case also checks that a plausible wrong distribution (no temperature, no
filter) is rejected with p < 1e-3 by the same counts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxselm.errors import ConfigError
from jaxselm.sampling import (
    check_sampling_params,
    min_p_filter,
    process_logits,
    sample_logits,
    token_logprobs,
    top_k_filter,
    top_p_filter,
)
from jaxselm.sampling.strategies import TWO_STAGE_BLOCK, TWO_STAGE_MIN_VOCAB, categorical

# Distinct logits in shuffled order (so a filter that forgets to sort, or un-sort, is caught).
LOGITS = np.array([0.3, 2.0, -1.2, 1.0, 0.0, 1.5, -0.5, 0.6], np.float32)
DRAWS = 20_000
P_MIN = 1e-3


def _softmax(x):
    e = np.exp(x - x[np.isfinite(x)].max())
    e[~np.isfinite(x)] = 0.0
    return e / e.sum()


def reference_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The intended sampling distribution, written independently of the library (numpy)."""
    x = np.asarray(logits, np.float64) / temperature
    keep = np.ones(x.shape, bool)
    if top_k:
        keep &= x >= np.sort(x)[-top_k]
    if top_p < 1.0:
        probs = _softmax(np.where(keep, x, -np.inf))
        order = np.argsort(-probs)
        before = np.cumsum(probs[order]) - probs[order]
        nucleus = np.zeros(x.shape, bool)
        nucleus[order[before < top_p]] = True
        keep &= nucleus
    if min_p > 0.0:
        probs = _softmax(np.where(keep, x, -np.inf))
        keep &= probs >= min_p * probs.max()
    return _softmax(np.where(keep, x, -np.inf))


def _counts(key, **kw):
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (DRAWS, LOGITS.size))
    tok, _ = jax.jit(lambda k, x: sample_logits(k, x, **kw))(key, logits)
    return np.bincount(np.asarray(tok), minlength=LOGITS.size)


CASES = [
    dict(temperature=1.0),
    dict(temperature=0.7),
    dict(temperature=1.5, top_k=3),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=0.8, min_p=0.2),
    dict(temperature=1.3, top_k=6, top_p=0.9, min_p=0.1),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_sample_frequencies_match_filtered_softmax(kw):
    counts = _counts(jax.random.key(1234), **kw)
    probs = reference_probs(LOGITS, **kw)
    kept = probs > 0
    assert counts[~kept].sum() == 0, "a filtered token was sampled"
    assert counts.sum() == DRAWS
    p_value = stats.chisquare(counts[kept], DRAWS * probs[kept]).pvalue
    assert p_value > P_MIN, (kw, counts, DRAWS * probs)
    # The same counts reject the distribution without the temperature and filters (power check).
    if kw != dict(temperature=1.0):
        wrong = reference_probs(LOGITS)
        assert stats.chisquare(counts, DRAWS * wrong).pvalue < P_MIN


def test_two_stage_categorical_is_the_softmax_distribution():
    """Above TWO_STAGE_MIN_VOCAB ids are drawn block first, then within the block: the
    frequencies must still be softmax(logits), with -inf ids (here two whole blocks and the
    padding of the last, V = 3000 is not a multiple of the block) never drawn."""
    v, n = 3000, 40_000
    assert v > TWO_STAGE_MIN_VOCAB and v % TWO_STAGE_BLOCK
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 1.0, v)
    logits[rng.choice(v, 40, replace=False)] += 5.0  # mass spread over a few ids in many blocks
    logits[1024:1536] = -np.inf
    keys = jax.random.split(jax.random.key(7), n)
    tok = jax.jit(jax.vmap(lambda k: categorical(k, jnp.asarray(logits, jnp.float32))))(keys)
    counts = np.bincount(np.asarray(tok), minlength=v)
    assert counts.size == v and counts[1024:1536].sum() == 0
    probs = _softmax(logits)
    big = probs * n >= 5  # chi-square bins: every id expected 5+ times, the rest lumped
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(probs[big], probs[~big].sum()) * n
    assert stats.chisquare(obs, exp).pvalue > P_MIN
    # power: the same counts reject the sampler with the block masses left out (a uniform
    # block, then softmax within it)
    blk = TWO_STAGE_BLOCK
    wrong = np.zeros(v)
    live = [b for b in range(0, v, blk) if np.isfinite(logits[b : b + blk]).any()]
    for b in live:
        wrong[b : b + blk] = _softmax(logits[b : b + blk]) / len(live)
    assert stats.chisquare(obs, np.append(wrong[big], wrong[~big].sum()) * n).pvalue < P_MIN


def test_filters_keep_expected_sets():
    x = jnp.asarray(LOGITS)[None]
    order = np.argsort(-LOGITS)

    def kept(y):
        return set(np.nonzero(np.isfinite(np.asarray(y[0])))[0].tolist())

    assert kept(top_k_filter(x, 3)) == set(order[:3].tolist())
    assert kept(top_k_filter(x, 0)) == set(range(LOGITS.size))
    assert kept(top_p_filter(x, 1e-6)) == {int(order[0])}  # the top token always survives
    assert kept(min_p_filter(x, 1.0)) == {int(order[0])}
    assert kept(min_p_filter(x, 0.0)) == set(range(LOGITS.size))
    probs = reference_probs(LOGITS, top_p=0.8)
    assert kept(top_p_filter(x, 0.8)) == set(np.nonzero(probs)[0].tolist())
    # Survivors keep their values: softmax of the result is the renormalised restriction.
    np.testing.assert_allclose(jax.nn.softmax(top_p_filter(x, 0.8))[0], probs, rtol=1e-5, atol=1e-7)


def test_traced_parameters_match_python_values():
    x = jnp.asarray(np.stack([LOGITS, LOGITS[::-1]]))
    eager = process_logits(x, temperature=0.9, top_k=5, top_p=0.7, min_p=0.15)
    traced = jax.jit(lambda t, p, m: process_logits(x, temperature=t, top_k=5, top_p=p, min_p=m))(
        jnp.float32(0.9), jnp.float32(0.7), jnp.float32(0.15)
    )
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(traced))
    # Traced "off" values are no-ops.
    off_fn = jax.jit(lambda p, m: process_logits(x, top_p=p, min_p=m))
    off = off_fn(jnp.float32(1.0), jnp.float32(0.0))
    np.testing.assert_allclose(np.asarray(off), np.asarray(x), rtol=0, atol=0)


def test_greedy_is_argmax_with_point_mass():
    x = jnp.asarray(np.stack([LOGITS, -LOGITS]))
    tok, processed = sample_logits(jax.random.key(0), x, greedy=True)
    np.testing.assert_array_equal(np.asarray(tok), np.argmax(np.stack([LOGITS, -LOGITS]), -1))
    np.testing.assert_array_equal(np.asarray(token_logprobs(processed, tok)), [0.0, 0.0])


def test_token_logprobs_is_log_softmax_at_token():
    tok = jnp.array([1, 6], jnp.int32)
    x = jnp.asarray(np.stack([LOGITS, LOGITS * 2]))
    l64 = LOGITS.astype(np.float64)
    want = np.log([_softmax(l64)[1], _softmax(2.0 * l64)[6]])
    np.testing.assert_allclose(np.asarray(token_logprobs(x, tok)), want, rtol=1e-5)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(temperature=0.0), "sampling.temperature"),
        (dict(top_k=-1), "sampling.top_k"),
        (dict(top_k=100), "sampling.top_k"),
        (dict(top_p=0.0), "sampling.top_p"),
        (dict(top_p=1.5), "sampling.top_p"),
        (dict(min_p=-0.1), "sampling.min_p"),
    ],
)
def test_bad_sampling_parameters_raise_one_line(kw, field):
    args = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, vocab_size=64) | kw
    with pytest.raises(ConfigError) as err:
        check_sampling_params(**args)
    assert str(err.value).startswith(field) and "\n" not in str(err.value)
