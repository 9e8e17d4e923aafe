"""The generation engine against full forward passes, on 1 device and on a mesh of 8 host devices.

Tolerances: cached decoding and a full forward pass do the same fp32 arithmetic in a different
order (masked slots, a longer key axis), so logits agree to ~1e-6 and log-probs to well below
2e-5 (ATOL). Greedy tokens are compared exactly: the params are perturbed with noise of std 0.2,
which spreads the logits far more than that rounding (and the seeds are fixed). Chi-square
thresholds as in test_sampling_strategies.py (p > 1e-3 under the null, fixed seeds).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from scipy import stats

from jaxselm.errors import ConfigError, DataError
from jaxselm.model import forward, get_preset, init_params
from jaxselm.sampling import FinishReason, generate, process_logits
from jaxselm.sampling import engine as gen_module

ATOL = 2e-5
PROMPTS = [[5, 9, 2], [7, 1, 3, 8, 11, 4, 6], [12, 30, 41, 2, 9, 17, 23, 3, 5, 1, 60, 33]]
# "rope+window": a sliding window (Mistral v0.1) of 3 keys, shorter than every sequence here,
# so the cache's window must drop exactly the keys the full forward masks.
MODES = ("rope", "cope", "cope+rope", "none", "rope+window")
SHARED = dict(max_new_tokens=8, n=4)  # one compilation shared by several tests


def perturbed_params(cfg, seed=0, std=0.2):
    """Init params plus Gaussian noise, so CoPE's zero-initialised position table matters."""
    params = init_params(cfg, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [x + std * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, noisy)


def config(mode):
    if mode == "rope+window":
        return get_preset("tiny").replace(position="rope", sliding_window=3)
    return get_preset("tiny").replace(position=mode, cope_npos_max=16)


@pytest.fixture(scope="module")
def cope_model():
    cfg = config("cope+rope")
    return cfg, perturbed_params(cfg)


def full_logprobs(params, cfg, res):
    """log_softmax of a full forward pass over prompt + sample, at each sampled token [B, N, M]."""
    b, n, m = res.tokens.shape
    prompt = np.repeat(np.asarray(res.prompt_tokens), n, axis=0)
    pmask = np.repeat(np.asarray(res.prompt_mask), n, axis=0)
    toks = np.asarray(res.tokens).reshape(b * n, m)
    seq = np.concatenate([np.where(pmask, prompt, 0), np.maximum(toks, 0)], axis=1)
    mask = np.concatenate([pmask, np.ones_like(toks, bool)], axis=1)
    logits = forward(params, cfg, jnp.asarray(seq), jnp.asarray(mask))
    t = prompt.shape[1]
    logp = jax.nn.log_softmax(logits[:, t - 1 : -1], axis=-1)
    picked = jnp.take_along_axis(logp, jnp.asarray(np.maximum(toks, 0))[..., None], axis=-1)[..., 0]
    return logits[:, t - 1 : -1], np.asarray(picked).reshape(b, n, m)


@pytest.mark.parametrize("mode", MODES)
def test_greedy_equals_argmax_of_full_forward(mode):
    cfg = config(mode)
    params = perturbed_params(cfg)
    m = 6
    res = generate(params, cfg, PROMPTS, rng=jax.random.key(0), max_new_tokens=m, greedy=True, n=2)
    assert res.tokens.shape == (3, 2, m)
    mask = np.asarray(res.prompt_mask)
    t = mask.shape[1]
    # The growing sequence, recomputed from scratch at every step. It sits right-padded (masked)
    # in a fixed buffer so that one compilation serves every step; padding slots are masked keys,
    # so position p sees exactly the sequence up to p.
    seq = np.zeros((len(PROMPTS), t + m), np.int32)
    seq[:, :t] = np.where(mask, np.asarray(res.prompt_tokens), 0)
    mask = np.concatenate([mask, np.zeros((len(PROMPTS), m), bool)], axis=1)
    fwd = jax.jit(forward, static_argnums=1)
    for i in range(m):
        logits = fwd(params, cfg, jnp.asarray(seq), jnp.asarray(mask))
        seq[:, t + i] = np.asarray(jnp.argmax(logits[:, t + i - 1], axis=-1))
        mask[:, t + i] = True
    expected = seq[:, t:]
    np.testing.assert_array_equal(np.asarray(res.tokens[:, 0]), expected)
    np.testing.assert_array_equal(np.asarray(res.tokens[:, 1]), expected)
    np.testing.assert_array_equal(np.asarray(res.lengths), m)
    np.testing.assert_array_equal(np.asarray(res.finish_reason), int(FinishReason.LENGTH))
    np.testing.assert_array_equal(np.asarray(res.sampling_logprobs), 0.0)
    # The last full pass covers every generated token: its log-softmax is the returned log-prob.
    logp = jax.nn.log_softmax(logits[:, t - 1 : -1], axis=-1)
    want = np.take_along_axis(np.asarray(logp), expected[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(res.logprobs[:, 0]), want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(res.logprobs[:, 1]), want, atol=ATOL, rtol=0)


def test_logprobs_equal_full_forward_log_softmax(cope_model):
    cfg, params = cope_model
    res = generate(params, cfg, PROMPTS, rng=jax.random.key(3), **SHARED)
    _, want = full_logprobs(params, cfg, res)
    np.testing.assert_allclose(np.asarray(res.logprobs), want, atol=ATOL, rtol=0)
    # Temperature 1 and no filter: the sampling distribution is the model's.
    np.testing.assert_allclose(np.asarray(res.sampling_logprobs), want, atol=ATOL, rtol=0)


def test_sampling_logprobs_follow_the_processed_distribution(cope_model):
    cfg, params = cope_model
    kw = dict(temperature=0.6, top_k=20, top_p=0.9)
    res = generate(params, cfg, PROMPTS, rng=jax.random.key(4), max_new_tokens=6, n=2, **kw)
    logits, want_model = full_logprobs(params, cfg, res)
    np.testing.assert_allclose(np.asarray(res.logprobs), want_model, atol=ATOL, rtol=0)
    processed = jax.nn.log_softmax(process_logits(logits, **kw), axis=-1)
    toks = np.asarray(res.tokens).reshape(-1, 6)
    want = np.take_along_axis(np.asarray(processed), toks[..., None], axis=-1)[..., 0]
    assert np.isfinite(want).all(), "a filtered token was sampled"
    # Dividing by the temperature scales the logits' rounding error by 1 / temperature.
    got = np.asarray(res.sampling_logprobs).reshape(-1, 6)
    np.testing.assert_allclose(got, want, atol=ATOL / kw["temperature"], rtol=0)


def test_stop_tokens_end_samples_and_pad_the_rest(cope_model):
    cfg, params = cope_model
    stop = tuple(range(0, 64, 8))  # 8 of 64 ids: some samples stop, some run to the end
    m, pad = SHARED["max_new_tokens"], -1
    key = jax.random.key(7)
    res = generate(params, cfg, PROMPTS, rng=key, stop_token_ids=stop, pad_id=pad, **SHARED)
    free = generate(params, cfg, PROMPTS, rng=key, **SHARED)
    toks, lens = np.asarray(res.tokens), np.asarray(res.lengths)
    reasons, lp = np.asarray(res.finish_reason), np.asarray(res.logprobs)
    assert (reasons == FinishReason.STOP).any() and (reasons == FinishReason.LENGTH).any()
    for b in range(3):
        for j in range(4):
            length, row = lens[b, j], toks[b, j]
            assert 1 <= length <= m
            is_stop = np.isin(row[:length], stop)
            if reasons[b, j] == FinishReason.STOP:
                assert is_stop[-1] and not is_stop[:-1].any()
            else:
                assert length == m and not is_stop.any()
            assert (row[length:] == pad).all() and (lp[b, j, length:] == 0).all()
            assert (lp[b, j, :length] < 0).all()
            # Stopping does not change what came before: same keys, same cache.
            np.testing.assert_array_equal(row[:length], np.asarray(free.tokens)[b, j, :length])
    assert (np.asarray(res.prompt_tokens)[~np.asarray(res.prompt_mask)] == pad).all()


def test_all_stopped_exits_early_and_one_token_edge_case(cope_model):
    cfg, params = cope_model
    res = generate(
        params, cfg, PROMPTS, rng=jax.random.key(1), max_new_tokens=5, n=2, stop_token_ids=range(64)
    )
    np.testing.assert_array_equal(np.asarray(res.lengths), 1)
    np.testing.assert_array_equal(np.asarray(res.finish_reason), int(FinishReason.STOP))
    np.testing.assert_array_equal(np.asarray(res.tokens[..., 1:]), 0)
    one = generate(params, cfg, PROMPTS, rng=jax.random.key(1), max_new_tokens=1, n=2)
    assert one.tokens.shape == (3, 2, 1)
    np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(res.tokens[..., :1]))


def test_determinism_independence_and_batch_invariance(cope_model):
    cfg, params = cope_model
    kw = SHARED
    a = generate(params, cfg, PROMPTS, rng=jax.random.key(11), **kw)
    b = generate(params, cfg, PROMPTS, rng=jax.random.key(11), **kw)
    c = generate(params, cfg, PROMPTS, rng=jax.random.key(12), **kw)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    toks = np.asarray(a.tokens)
    for p in range(3):  # the n samples of a prompt differ from each other
        assert len({tuple(r) for r in toks[p]}) == 4
    # A prompt's samples do not depend on the other prompts of its batch (same bucket length).
    alone = generate(params, cfg, PROMPTS[:2], rng=jax.random.key(11), **kw)
    np.testing.assert_array_equal(np.asarray(alone.tokens), toks[:2])


def test_array_prompts_and_no_recompilation_within_a_bucket(cope_model, monkeypatch):
    cfg, params = cope_model
    kw = dict(rng=jax.random.key(5), max_new_tokens=4, n=1, temperature=0.9)
    res = generate(params, cfg, [[3, 4, 5], [6, 7]], **kw)
    assert res.prompt_tokens.shape == (2, 8)
    # The same prompts as a left-padded array with mask give the same result.
    arr = generate(params, cfg, res.prompt_tokens, res.prompt_mask, **kw)
    jax.tree.map(np.testing.assert_array_equal, res, arr)
    # Other lengths in the same bucket (and another temperature) reuse the compilation: the
    # jitted core is not traced again (a counting wrapper sees every trace).
    traces = []
    real = gen_module._repeat_rows
    monkeypatch.setattr(gen_module, "_repeat_rows", lambda *a: traces.append(1) or real(*a))
    generate(params, cfg, [[1, 2, 3, 4, 5, 6, 7], [9]], **(kw | dict(temperature=0.5)))
    assert traces == []
    generate(params, cfg, [[1, 2, 3, 4, 5, 6, 7, 8, 9]], **kw)  # a new bucket and batch: traced
    assert traces == [1]


def test_generate_frequencies_and_independent_samples():
    """First-token frequencies of many samples of one prompt vs the model's filtered softmax."""
    cfg = get_preset("tiny").replace(vocab_size=8)
    params = perturbed_params(cfg, seed=3, std=0.3)
    prompt = [[1, 2, 3, 4]]
    logits = np.asarray(forward(params, cfg, jnp.asarray(prompt))[0, -1], np.float64)
    n = 4000
    for kw in (dict(), dict(temperature=0.7, top_k=6, top_p=0.9)):
        res = generate(params, cfg, prompt, rng=jax.random.key(21), max_new_tokens=1, n=n, **kw)
        first = np.asarray(res.tokens)[0, :, 0]
        counts = np.bincount(first, minlength=8)
        x = np.asarray(process_logits(jnp.asarray(logits, jnp.float32), **kw), np.float64)
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        kept = probs > 0
        assert counts[~kept].sum() == 0
        big = probs * n >= 5  # chi-square needs expected counts >= 5; pool the rest
        obs = np.append(counts[big], counts[kept & ~big].sum())
        exp = np.append(n * probs[big], n * probs[kept & ~big].sum())
        if exp[-1] == 0:
            obs, exp = obs[:-1], exp[:-1]
        assert stats.chisquare(obs, exp).pvalue > 1e-3, (kw, counts, n * probs)
    # Samples 2j and 2j+1 of the prompt are independent draws (contingency test on common tokens).
    pairs = first.reshape(-1, 2)
    common = np.nonzero(np.bincount(first, minlength=8) >= 200)[0]
    sel = np.isin(pairs, common).all(axis=1)
    table = np.zeros((len(common), len(common)))
    for u, v in pairs[sel]:
        table[np.searchsorted(common, u), np.searchsorted(common, v)] += 1
    assert stats.chi2_contingency(table).pvalue > 1e-3


@pytest.mark.parametrize("mode", ["rope+window", "cope+rope"])
def test_unstacked_decoding_equals_the_scan(mode):
    """The CPU default (decoding on per-layer weight and cache buffers, an unrolled layer loop)
    against the scan over stacked layers: the same tokens, log-probs within rounding."""
    cfg = config(mode)
    params = perturbed_params(cfg)
    kw = dict(rng=jax.random.key(4), max_new_tokens=7, n=2, temperature=0.9, top_k=20)
    flat = generate(params, cfg, PROMPTS, unstack_layers=True, **kw)
    scan = generate(params, cfg, PROMPTS, unstack_layers=False, **kw)
    np.testing.assert_array_equal(np.asarray(flat.tokens), np.asarray(scan.tokens))
    for name in ("logprobs", "sampling_logprobs"):
        np.testing.assert_allclose(
            np.asarray(getattr(flat, name)), np.asarray(getattr(scan, name)), atol=ATOL, rtol=0
        )
    assert gen_module._unstack(None, None) == (jax.default_backend() == "cpu")


def test_mesh_of_8_devices_matches_single_device(cope_model):
    cfg, params = cope_model
    devices = np.asarray(jax.devices()[:8]).reshape(2, 2, 2)
    mesh = Mesh(devices, ("data", "fsdp", "tensor"))
    kw = dict(
        rng=jax.random.key(9),
        max_new_tokens=6,
        n=2,
        temperature=0.9,
        top_p=0.95,
        stop_token_ids=(3, 17),
    )
    prompts = PROMPTS + [[2, 4, 6, 8]]  # B * n = 8 rows, one per device of the batch axes
    single = generate(params, cfg, prompts, **kw)
    sharded = generate(params, cfg, prompts, mesh=mesh, **kw)
    for x in jax.tree.leaves(sharded):  # every output is split over the batch axes
        assert x.sharding.spec[0] == ("data", "fsdp"), x.sharding
    for name in ("tokens", "lengths", "finish_reason", "prompt_tokens"):
        np.testing.assert_array_equal(
            np.asarray(getattr(sharded, name)), np.asarray(getattr(single, name))
        )
    np.testing.assert_allclose(
        np.asarray(sharded.logprobs), np.asarray(single.logprobs), atol=ATOL, rtol=0
    )
    # An odd batch (3 prompts x 1 sample) does not divide the batch axes: replicated. Sample 0 of
    # prompt b has the same key as above, so the tokens are those of the first run.
    odd = generate(params, cfg, PROMPTS, mesh=mesh, **dict(kw, n=1))
    np.testing.assert_array_equal(np.asarray(odd.tokens)[:, 0], np.asarray(single.tokens)[:3, 0])


@pytest.mark.parametrize(
    "prompts, kw, err, culprit",
    [
        ([[1] * 200, [1] * 300], dict(max_new_tokens=4), DataError, "prompts[1]"),
        ([[1] * 200], dict(max_new_tokens=100), ConfigError, "max_new_tokens"),
        ([[1, 2], []], dict(max_new_tokens=4), DataError, "prompts[1]"),
        ([[1, 99]], dict(max_new_tokens=4), DataError, "prompts[0]"),
        ([[1, 2]], dict(max_new_tokens=0), ConfigError, "max_new_tokens"),
        ([[1, 2]], dict(max_new_tokens=4, n=0), ConfigError, "n:"),
        ([[1, 2]], dict(max_new_tokens=4, temperature=0.0), ConfigError, "sampling.temperature"),
        ([[1, 2]], dict(max_new_tokens=4, stop_token_ids=(64,)), ConfigError, "stop_token_ids"),
    ],
)
def test_bad_input_raises_one_line_error(cope_model, prompts, kw, err, culprit):
    cfg, params = cope_model
    with pytest.raises(err) as info:
        generate(params, cfg, prompts, rng=jax.random.key(0), **kw)
    msg = str(info.value)
    assert msg.startswith(culprit) and "\n" not in msg, msg
    if culprit == "prompts[1]" and "300" in msg:
        assert "max_position_embeddings=256" in msg


def test_right_padded_array_is_refused(cope_model):
    cfg, params = cope_model
    tokens = np.array([[4, 5, 0], [6, 7, 8]], np.int32)
    mask = np.array([[True, True, False], [True, True, True]])
    with pytest.raises(DataError, match=r"^prompts\[0\]: prompt_mask is not left-padded"):
        generate(params, cfg, tokens, mask, rng=jax.random.key(0), max_new_tokens=2)
