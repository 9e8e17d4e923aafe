"""``make_judge``: a ready judge from a judge config, failing fast on anything misconfigured.

Everything that can be checked before generation starts is checked here, so a bad judge spec
costs seconds, not an iteration: the config is validated (unknown kind or key, malformed
``module:function`` or URL), the programmatic function is imported and must be callable, the
LLM judge's API-key variable must be set, the reward-model judge needs loaded params with a
reward head. Each failure is one line (ConfigError or JudgeError, both JaxselmError) naming the
``judge.*`` field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxselm.errors import JudgeError
from jaxselm.feedback.base import Judge
from jaxselm.feedback.config import (
    LearnedRewardModelJudgeConfig,
    LLMJudgeConfig,
    ProgrammaticJudgeConfig,
    RewardModelJudgeConfig,
    parse_judge_config,
)


def make_judge(
    config: Any,
    *,
    params: Mapping[str, Any] | None = None,
    model_config: Any = None,
    tokenizer: Any = None,
    **judge_kwargs: Any,
) -> Judge:
    """Build the judge a config (object or mapping) describes.

    ``params`` / ``model_config`` / ``tokenizer`` are the loaded reward model (reward_model kind
    only: loading ``config.checkpoint`` is the caller's job). ``judge_kwargs`` go to the judge's
    constructor (e.g. ``batch_sharding=`` for the reward-model judge).
    """
    config = parse_judge_config(config)
    if isinstance(config, ProgrammaticJudgeConfig):
        from jaxselm.feedback.programmatic import ProgrammaticJudge

        return ProgrammaticJudge.from_config(config, **judge_kwargs)
    if isinstance(config, LLMJudgeConfig):
        from jaxselm.feedback.llm import LLMJudge

        return LLMJudge.from_config(config, **judge_kwargs)
    if isinstance(config, RewardModelJudgeConfig):
        from jaxselm.feedback.reward_model import RewardModelJudge

        if params is None or model_config is None or tokenizer is None:
            where = f" from {config.checkpoint!r}" if config.checkpoint else ""
            raise JudgeError(
                f"judge.checkpoint: the reward-model judge needs loaded params, model_config "
                f"and tokenizer{where}"
            )
        return RewardModelJudge.from_params(params, model_config, tokenizer, config, **judge_kwargs)
    if isinstance(config, LearnedRewardModelJudgeConfig):
        raise JudgeError(
            "judge.kind: learned_reward_model trains a model each iteration, so the online loop "
            "builds it (jaxselm.online.learned_judge.LearnedRewardJudge), not make_judge"
        )
    raise JudgeError(
        f"judge.kind: unsupported config {type(config).__name__}"
    )  # unreachable: parse checked kind
