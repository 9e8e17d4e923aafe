"""Typed judge configs: one frozen pydantic model per judge kind, discriminated by ``kind``.

A run config names its judge in YAML, e.g.::

    judge:                                  judge:
      kind: programmatic                      kind: llm
      function: jaxselm.data.tasks:score      base_url: http://localhost:8000/v1
                                              model: meta-llama/Meta-Llama-3-70B-Instruct
                                              mode: pairwise
                                              api_key_env: OPENAI_API_KEY   # the VARIABLE's name

Everything a config can get wrong is caught here, when the config is built (unknown kind or key,
wrong type, malformed ``module:function``, URL that is not http(s), template with unknown or
missing placeholders, ...), as a one-line :class:`~jaxselm.errors.ConfigError` naming the field.
What can only be checked against the environment (does the module import, is the API-key
variable set) is checked by :func:`jaxselm.feedback.make_judge`, still before any work starts.
Secrets never enter a config: it holds the *name* of an environment variable.
"""

from __future__ import annotations

import re
import string
import urllib.parse
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from jaxselm.config_base import (
    FrozenConfig,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    config_error,
)
from jaxselm.errors import ConfigError

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
SPEC_RE = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")
_ENV_RE = re.compile(rf"^{_IDENT}$")

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful, impartial judge of AI assistant responses. "
    "Follow the output format exactly."
)

DEFAULT_PAIRWISE_TEMPLATE = """\
Compare two responses to the user question below. Judge helpfulness, correctness, relevance and \
harmlessness; ignore the order in which the responses are shown and their length.

[User question]
{prompt}

[The start of response A]
{response_a}
[The end of response A]

[The start of response B]
{response_b}
[The end of response B]

Which response is better? Reply with a single letter: A or B."""

DEFAULT_SCORING_TEMPLATE = """\
Rate the response of an AI assistant to the user question below for helpfulness, correctness, \
relevance and harmlessness, on a scale from {min_score} (worst) to {max_score} (best).

[User question]
{prompt}

[The start of the response]
{response}
[The end of the response]

Reply with the score only, a single integer from {min_score} to {max_score}."""

_PAIRWISE_FIELDS = ({"prompt", "response_a", "response_b"}, set())
_SCORING_FIELDS = ({"prompt", "response"}, {"min_score", "max_score"})


def _template_fields(template: str) -> set[str]:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as err:  # unbalanced braces
        raise ValueError(
            f"is not a valid format string ({err}); write literal braces as {{{{ }}}}"
        ) from None


def _check_template(template: str, required: set[str], optional: set[str]) -> str:
    fields = _template_fields(template)
    unknown = fields - required - optional
    if unknown:
        raise ValueError(
            f"unknown placeholder {{{min(unknown)}}}; allowed: "
            + ", ".join("{" + f + "}" for f in sorted(required | optional))
        )
    missing = required - fields
    if missing:
        raise ValueError(f"missing placeholder {{{min(missing)}}}")
    return template


def _callable_spec(v: str) -> str:
    """A ``package.module:function`` name (the function judge's and the annotator's)."""
    if not SPEC_RE.match(v):
        raise ValueError("must look like 'package.module:function'")
    return v


class ProgrammaticJudgeConfig(FrozenConfig):
    """A Python function ``fn(prompt: str, response: str) -> float`` named ``module:function``."""

    _error_prefix: ClassVar[str] = "judge"

    kind: Literal["programmatic"] = "programmatic"
    function: str  # e.g. "jaxselm.data.tasks:score"

    @field_validator("function")
    @classmethod
    def _spec(cls, v: str) -> str:
        return _callable_spec(v)


class RewardModelJudgeConfig(FrozenConfig):
    """A jaxselm model with a scalar reward head scoring prompt + response token sequences.

    ``checkpoint`` is the directory the caller loads (HF LlamaForSequenceClassification or a
    jaxselm checkpoint); the judge itself takes loaded params
    (:meth:`RewardModelJudge.from_params`).
    """

    _error_prefix: ClassVar[str] = "judge"

    kind: Literal["reward_model"] = "reward_model"
    checkpoint: str | None = None
    batch_size: PositiveInt = 8  # rows per forward pass; the last batch is padded to this size
    # tokens per item; default: the model's context length
    max_length: Annotated[int, Field(ge=2)] | None = None
    # sequences are padded to a power of two >= this (one compile per bucket)
    min_bucket: PositiveInt = 16


class LearnedRewardModelJudgeConfig(FrozenConfig):
    """A reward model retrained every iteration on the preferences labelled so far.

    Each iteration the ``annotator`` (``fn(prompt, response) -> float``, e.g. a task's verifier
    standing in for a human labeller) labels ``labels_per_iteration`` pairs of that iteration's
    samples (two different samples of a random prompt; ties are dropped). A reward model (the
    ``model`` section, vocabulary taken from the run's tokenizer) is trained from its seeded
    init for ``steps`` Bradley-Terry steps on every label so far, then judges all samples. So the
    judge is uncertain where labels are few, as a learned reward model is: what SELM's optimism is
    meant to act on. The labels are kept in each iteration's folder (``rm_labels.json``), so a
    resumed run retrains the same model without asking the annotator again.

    ``init: policy`` starts the reward model from the run's warm-start policy (``policy/iter_00``:
    its trunk, a fresh score head), as reward models are usually started from the SFT model
    (InstructGPT): it then knows the task's inputs before the first label. The reward model is
    then the policy's architecture, so ``model`` must be left out. ``init: random`` (the default)
    starts from the ``model`` section's seeded random init.
    """

    _error_prefix: ClassVar[str] = "judge"

    kind: Literal["learned_reward_model"] = "learned_reward_model"
    annotator: str  # e.g. "jaxselm.data.tasks:score"
    labels_per_iteration: PositiveInt = 64
    init: Literal["random", "policy"] = "random"
    model: dict[str, Any] | None = None  # a ModelConfig without vocab_size; None: preset tiny
    steps: PositiveInt = 200
    batch_size: PositiveInt = 16
    learning_rate: PositiveFloat = 1e-3
    seed: int = 0
    score_batch_size: PositiveInt = 64  # rows per scoring forward pass

    @field_validator("annotator")
    @classmethod
    def _spec(cls, v: str) -> str:
        return _callable_spec(v)

    @field_validator("model")
    @classmethod
    def _model(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and "vocab_size" in v:
            raise ValueError("vocab_size: taken from the run's tokenizer; leave it out")
        return v

    @model_validator(mode="after")
    def _init_policy(self) -> LearnedRewardModelJudgeConfig:
        if self.init == "policy" and self.model is not None:
            raise ValueError(
                "model: with init: policy the reward model is the policy's architecture; "
                "leave model out"
            )
        return self


class LLMJudgeConfig(FrozenConfig):
    """An LLM behind an OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint.

    ``pairwise`` asks which of two responses is better, in both orders (the two verdicts are
    averaged, which cancels the judge's position bias); ``scoring`` asks for a score in
    [min_score, max_score]. Requests go through the official ``openai`` client, which owns
    timeouts and retries: each request may take ``timeout_s``, and timeouts, connection errors,
    408 / 409 / 429 and 5xx replies are retried up to ``max_retries`` times with the client's
    exponential back-off (0.5 s doubling up to 8 s, with jitter) or, when the reply carries a
    ``retry-after-ms`` / ``Retry-After`` header, after the wait the server asked for (within the
    client's cap of a few minutes).
    """

    _error_prefix: ClassVar[str] = "judge"

    kind: Literal["llm"] = "llm"
    base_url: str  # e.g. http://localhost:8000/v1 (vLLM / SGLang) or https://api.openai.com/v1
    model: str
    mode: Literal["pairwise", "scoring"] = "pairwise"
    api_key_env: str | None = None  # NAME of the environment variable holding the API key
    temperature: NonNegativeFloat = 0.0
    max_tokens: PositiveInt = 16
    timeout_s: PositiveFloat = 60.0  # per request (connect, and each read / write)
    max_retries: NonNegativeInt = 3  # retries after the first attempt, by the client
    concurrency: PositiveInt = 8  # requests in flight at most
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    pairwise_template: str = DEFAULT_PAIRWISE_TEMPLATE
    scoring_template: str = DEFAULT_SCORING_TEMPLATE
    min_score: float = 1.0
    max_score: float = 10.0

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urllib.parse.urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL such as http://localhost:8000/v1")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        try:
            parts.port  # noqa: B018 -- raises on a malformed port
        except ValueError:
            raise ValueError("has a malformed port") from None
        return v.rstrip("/")

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        # A "before" validator sees the whole mapping, so its error does not echo the value: a
        # secret pasted into the config must not be printed back (or logged).
        url = data.get("base_url") if isinstance(data, dict) else None
        if isinstance(url, str) and "@" in url.split("://", 1)[-1].split("/", 1)[0]:
            raise ValueError(
                "base_url: must not contain credentials; name the key's environment variable "
                "in api_key_env"
            )
        v = data.get("api_key_env") if isinstance(data, dict) else None
        if isinstance(v, str) and not _ENV_RE.match(v):
            raise ValueError(
                "api_key_env: must be the NAME of an environment variable holding the key "
                "(e.g. OPENAI_API_KEY), not the key itself"
            )
        return data

    @field_validator("pairwise_template")
    @classmethod
    def _pairwise(cls, v: str) -> str:
        return _check_template(v, *_PAIRWISE_FIELDS)

    @field_validator("scoring_template")
    @classmethod
    def _scoring(cls, v: str) -> str:
        return _check_template(v, *_SCORING_FIELDS)

    @model_validator(mode="after")
    def _check(self) -> LLMJudgeConfig:
        if self.min_score >= self.max_score:
            raise ValueError(f"max_score: must be > min_score={self.min_score}")
        return self


JudgeConfig = Annotated[
    ProgrammaticJudgeConfig
    | RewardModelJudgeConfig
    | LearnedRewardModelJudgeConfig
    | LLMJudgeConfig,
    Field(discriminator="kind"),
]
JUDGE_KINDS = ("programmatic", "reward_model", "learned_reward_model", "llm")

_ADAPTER: TypeAdapter = TypeAdapter(JudgeConfig)


def parse_judge_config(
    data: Any, *, prefix: str = "judge"
) -> (
    ProgrammaticJudgeConfig
    | RewardModelJudgeConfig
    | LearnedRewardModelJudgeConfig
    | LLMJudgeConfig
):
    """Validate a mapping (e.g. the ``judge:`` section of a YAML file) into a judge config.

    A config object is returned unchanged. Errors are one-line ConfigErrors such as
    ``judge.kind: unknown judge kind 'gpt'; choose one of programmatic, reward_model, ...``.
    """
    if isinstance(
        data,
        (
            ProgrammaticJudgeConfig,
            RewardModelJudgeConfig,
            LearnedRewardModelJudgeConfig,
            LLMJudgeConfig,
        ),
    ):
        return data
    if not isinstance(data, dict):
        raise ConfigError(
            f"{prefix}: must be a mapping with a 'kind' key, got {type(data).__name__}"
        )
    kind = data.get("kind")
    if kind is None:
        raise ConfigError(f"{prefix}.kind: missing; choose one of {', '.join(JUDGE_KINDS)}")
    if kind not in JUDGE_KINDS:
        raise ConfigError(
            f"{prefix}.kind: unknown judge kind {kind!r}; choose one of {', '.join(JUDGE_KINDS)}"
        )
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as err:
        # The discriminated union puts the tag first in each error location; drop it.
        msg = str(config_error(err, prefix))
        msg = msg.replace(f"{prefix}.{kind}.", f"{prefix}.", 1).replace(
            f"{prefix}.{kind}:", f"{prefix}:", 1
        )
        raise ConfigError(msg) from None
