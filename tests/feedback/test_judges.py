"""Programmatic and reward-model judges, judge configs and ``make_judge`` errors."""

from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pydantic import ValidationError

from jaxselm.errors import ConfigError, JaxselmError, JudgeError
from jaxselm.feedback import (
    LLMJudgeConfig,
    ProgrammaticJudge,
    ProgrammaticJudgeConfig,
    RewardModelJudge,
    RewardModelJudgeConfig,
    make_judge,
    parse_judge_config,
)
from jaxselm.model import get_preset, init_params, reward_scores

SCORER = '''
import math

CONST = 3

def score(prompt, response):
    """Fraction of the prompt's words the response repeats; NaN for the response 'skip'."""
    if response == "skip":
        return math.nan
    if response == "boom":
        raise ValueError("cannot score\\nboom")
    if response == "text":
        return "high"
    if response == "pass":
        return True
    want = prompt.split()
    return sum(w in response.split() for w in want) / len(want)

class Scorers:
    @staticmethod
    def length(prompt, response):
        return float(len(response))
'''


@pytest.fixture
def scorer_module(tmp_path, monkeypatch):
    name = f"fb_scorer_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(SCORER)
    (tmp_path / "fb_broken_mod.py").write_text("raise RuntimeError('broken\\nat import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)
    sys.modules.pop("fb_broken_mod", None)


# ---------------------------------------------------------------------------- programmatic
def test_programmatic_judge_scores_and_counts(scorer_module):
    judge = make_judge({"kind": "programmatic", "function": f"{scorer_module}:score"})
    assert isinstance(judge, ProgrammaticJudge)
    s = judge.score(["a b", "a b", "a b c d", "x"], ["a b", "b", "skip", "pass"])
    np.testing.assert_array_equal(s[[0, 1, 3]], [1.0, 0.5, 1.0])
    assert math.isnan(s[2])
    np.testing.assert_array_equal(judge.rank("a b", ["a", "zzz", "a b"]), [0.5, 0.0, 1.0])
    assert judge.compare("a b", "a b", "b") == 1.0
    assert judge.compare("a b", "b", "a b") == 0.0
    assert judge.compare("a b", "a", "b") == 0.5
    assert math.isnan(judge.compare("a b", "skip", "b"))
    st = judge.stats()
    assert st["calls"] == 6 and st["items"] == 4 + 3 + 4 * 2 and st["failures"] == 2
    judge.reset_stats()
    assert set(judge.stats().values()) == {0}
    # nested attribute, and an empty batch
    length = make_judge({"kind": "programmatic", "function": f"{scorer_module}:Scorers.length"})
    np.testing.assert_array_equal(length.score(["p"], ["abc"]), [3.0])
    assert length.score([], []).shape == (0,)


def test_programmatic_judge_errors_from_the_function_are_one_line(scorer_module):
    judge = make_judge({"kind": "programmatic", "function": f"{scorer_module}:score"})
    with pytest.raises(
        JudgeError,
        match=rf"^judge\.function: {scorer_module}:score raised on item 1 "
        r"\(ValueError: cannot score boom\)$",
    ):
        judge.score(["a", "a"], ["a", "boom"])
    with pytest.raises(JudgeError, match=r"returned str on item 0; expected a float"):
        judge.score(["a"], ["text"])
    with pytest.raises(JudgeError, match="got 2 prompts but 1 responses"):
        judge.score(["a", "b"], ["a"])


@pytest.mark.parametrize(
    "spec, error, match",
    [
        (
            "fb_no_such_module_xyz:score",
            JudgeError,
            r"^judge\.function: cannot import module 'fb_no_such_module_xyz' "
            r"\(ModuleNotFoundError: .*\)$",
        ),
        ("{mod}:missing", JudgeError, r"^judge\.function: '{mod}' has no attribute 'missing'$"),
        (
            "{mod}:Scorers.nope",
            JudgeError,
            r"^judge\.function: '{mod}:Scorers' has no attribute 'nope'$",
        ),
        ("{mod}:CONST", JudgeError, r"^judge\.function: '{mod}:CONST' is a int, not a callable$"),
        (
            "fb_broken_mod:score",
            JudgeError,
            r"^judge\.function: cannot import module 'fb_broken_mod' "
            r"\(RuntimeError: broken at import\)$",
        ),
        (
            "{mod}.score",
            ConfigError,
            r"^judge\.function: must look like 'package\.module:function'",
        ),
        ("{mod}:score()", ConfigError, r"^judge\.function: must look like"),
    ],
)
def test_bad_module_function_specs(scorer_module, spec, error, match):
    spec, match = spec.format(mod=scorer_module), match.format(mod=scorer_module)
    with pytest.raises(error, match=match) as err:
        make_judge({"kind": "programmatic", "function": spec})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "data, match",
    [
        (
            {"kind": "oracle"},
            r"^judge\.kind: unknown judge kind 'oracle'; "
            r"choose one of programmatic, reward_model, learned_reward_model, llm$",
        ),
        ({"function": "m:f"}, r"^judge\.kind: missing"),
        ("programmatic", r"^judge: must be a mapping"),
        ({"kind": "programmatic"}, r"^judge\.function: Field required"),
        ({"kind": "programmatic", "function": "m:f", "extra": 1}, r"^judge\.extra: unknown key$"),
        ({"kind": "programmatic", "function": 3}, r"^judge\.function: "),
        ({"kind": "reward_model", "batch_size": 0}, r"^judge\.batch_size: must be >= 1"),
        ({"kind": "reward_model", "max_length": "long"}, r"^judge\.max_length: "),
        ({"kind": "llm", "model": "m"}, r"^judge\.base_url: Field required"),
        ({"kind": "learned_reward_model"}, r"^judge\.annotator: Field required"),
        ({"kind": "learned_reward_model", "annotator": "m:f", "steps": 0}, r"^judge\.steps: "),
    ],
)
def test_bad_judge_configs_are_one_line_config_errors(data, match):
    with pytest.raises(ConfigError, match=match) as err:
        make_judge(data)
    assert "\n" not in str(err.value)


def test_parse_judge_config_dispatches_on_kind():
    assert isinstance(
        parse_judge_config({"kind": "programmatic", "function": "a.b:c"}), ProgrammaticJudgeConfig
    )
    assert isinstance(parse_judge_config({"kind": "reward_model"}), RewardModelJudgeConfig)
    cfg = parse_judge_config({"kind": "llm", "base_url": "http://h:1/v1/", "model": "m"})
    assert isinstance(cfg, LLMJudgeConfig) and cfg.base_url == "http://h:1/v1"
    assert parse_judge_config(cfg) is cfg
    with pytest.raises(ValidationError, match="frozen"):
        cfg.model = "other"


# ---------------------------------------------------------------------------- reward model
class CharTokenizer:
    """A tokenizer stand-in: one id per character (ids 1..63 of the tiny model's vocabulary)."""

    def encode(self, text: str) -> list[int]:
        return [1 + ord(ch) % 63 for ch in text]


@pytest.fixture(scope="module")
def reward_model():
    cfg = get_preset("tiny-cope", max_position_embeddings=64, num_layers=1)
    params = jax.jit(init_params, static_argnums=0, static_argnames="head")(
        cfg, jax.random.key(0), head="reward"
    )
    return params, cfg


_reward_scores = jax.jit(reward_scores, static_argnums=1)  # jitted only because CPU eager is slow


def direct_score(params, cfg, ids):
    """reward_scores on the unpadded sequence, batch of one."""
    tokens = jnp.asarray([ids], jnp.int32)
    return float(_reward_scores(params, cfg, tokens, jnp.ones_like(tokens, bool))[0])


# Tolerance: masked (padding) keys contribute exactly zero attention weight and zero CoPE gate, so
# padded and unpadded forwards differ only by float32 summation order in differently shaped
# matmuls, a few ulps of the O(1) activations; 1e-5 absolute/relative bounds that with margin.
TOL = dict(rtol=1e-5, atol=1e-5)


def test_reward_model_judge_matches_reward_scores(reward_model):
    params, cfg = reward_model
    tok = CharTokenizer()
    judge = RewardModelJudge.from_params(
        params, cfg, tok, RewardModelJudgeConfig(batch_size=2, min_bucket=8)
    )
    # lengths 41, 8, 1: sorted into batches [1, 8] (bucket 8) and [41 + a filler row] (bucket 64)
    prompts = ["a much longer prompt, spanning buckets", "hi", "q"]
    responses = [" ok", " there", ""]
    got = judge.score(prompts, responses)
    want = [
        direct_score(params, cfg, tok.encode(p) + tok.encode(r)) for p, r in zip(prompts, responses)
    ]
    np.testing.assert_allclose(got, want, **TOL)
    st = judge.stats()
    assert st["failures"] == 0 and st["truncated"] == 0 and st["batches"] == 2
    # Other batch companions, and everything padded to the largest bucket: same scores.
    alone = np.concatenate([judge.score([p], [r]) for p, r in zip(prompts, responses)])
    np.testing.assert_allclose(alone, got, **TOL)
    assert judge.stats()["compiled_shapes"] == 2  # one compilation per (batch, bucket) shape
    wide = RewardModelJudge.from_params(params, cfg, tok, batch_size=2, min_bucket=64)
    np.testing.assert_allclose(wide.score(prompts, responses), got, **TOL)
    # Token ids are accepted in place of text.
    ids = judge.score([tok.encode(prompts[0])], [tuple(tok.encode(responses[0]))])
    np.testing.assert_allclose(ids, got[:1], **TOL)
    # Bradley-Terry comparison.
    p_win = judge.compare(prompts[0], responses[0], " 3 2 1")
    r1, r2 = judge.score(prompts[:1] * 2, [responses[0], " 3 2 1"])
    np.testing.assert_allclose(p_win, 1 / (1 + np.exp(r2 - r1)), rtol=1e-12)


def test_reward_model_judge_shards_the_batch(reward_model):
    params, cfg = reward_model
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))  # the 8 host CPU devices
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    tok = CharTokenizer()
    prompts, responses = ["hi", "a longer prompt", "q"], [" there", " ok", "!"]
    sharded = RewardModelJudge.from_params(params, cfg, tok, batch_size=8, batch_sharding=rows)
    plain = RewardModelJudge.from_params(params, cfg, tok, batch_size=8)
    np.testing.assert_allclose(
        sharded.score(prompts, responses), plain.score(prompts, responses), **TOL
    )
    with pytest.raises(JudgeError, match=r"^judge\.batch_size: 4 rows cannot be split"):
        RewardModelJudge.from_params(params, cfg, tok, batch_size=4, batch_sharding=rows)


def test_reward_model_judge_truncates_the_prompt_start(reward_model):
    params, cfg = reward_model
    tok = CharTokenizer()
    judge = RewardModelJudge.from_params(params, cfg, tok, batch_size=1, max_length=16)
    prompt, response = "x" * 30 + "prompt end", " reply"
    got = judge.score([prompt], [response])
    ids = (tok.encode(prompt) + tok.encode(response))[-16:]
    np.testing.assert_allclose(got, [direct_score(params, cfg, ids)], **TOL)
    assert judge.stats()["truncated"] == 1
    # nothing to score -> NaN, counted
    s = judge.score([""], [""])
    assert math.isnan(s[0]) and judge.stats()["failures"] == 1


def test_reward_model_judge_spec_errors(reward_model):
    params, cfg = reward_model
    with pytest.raises(
        JudgeError,
        match=r"^judge\.checkpoint: the reward-model judge needs loaded params.* from 'rm/'$",
    ):
        make_judge({"kind": "reward_model", "checkpoint": "rm/"})
    lm_params = {k: v for k, v in params.items() if k != "score"}  # what an LM checkpoint lacks
    with pytest.raises(JudgeError, match=r"^judge\.checkpoint: params have no reward head 'score'"):
        make_judge(
            {"kind": "reward_model"}, params=lm_params, model_config=cfg, tokenizer=CharTokenizer()
        )
    with pytest.raises(JudgeError, match=r"^judge\.max_length: 128 must be in \[2, 64\]"):
        make_judge(
            {"kind": "reward_model", "max_length": 128},
            params=params,
            model_config=cfg,
            tokenizer=CharTokenizer(),
        )
    with pytest.raises(JudgeError, match="has no encode"):
        RewardModelJudge(params, cfg, object())
    judge = make_judge(
        {"kind": "reward_model", "batch_size": 4},
        params=params,
        model_config=cfg,
        tokenizer=CharTokenizer(),
    )
    assert isinstance(judge, RewardModelJudge) and judge.batch_size == 4
    assert issubclass(JudgeError, JaxselmError)
