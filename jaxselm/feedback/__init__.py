"""AI feedback for online alignment: judges that score responses, and best-vs-worst pairs.

    from jaxselm.feedback import make_judge, score_samples, build_pairs
    judge = make_judge({"kind": "programmatic", "function": "jaxselm.data.tasks:score"})
    scores, _ = score_samples(judge, prompts, samples, decode=tokenizer.decode)
    pairs, stats = build_pairs(prompts, samples, scores, min_margin=0.0)
    judge.stats()   # calls, items, failures, unparseable, ...

Judges (all :class:`Judge`: ``score`` / ``rank`` / ``compare`` / ``stats``, NaN = not scored):
:class:`ProgrammaticJudge` (a ``module:function`` verifier), :class:`RewardModelJudge` (a jaxselm
model with a scalar head), :class:`LLMJudge` (an OpenAI-compatible HTTP endpoint, pairwise with
both orders or 1-10 scoring). Configs are a discriminated union on ``kind``.
"""

from jaxselm.feedback.base import Judge
from jaxselm.feedback.config import (
    DEFAULT_PAIRWISE_TEMPLATE,
    DEFAULT_SCORING_TEMPLATE,
    DEFAULT_SYSTEM_PROMPT,
    JUDGE_KINDS,
    JudgeConfig,
    LearnedRewardModelJudgeConfig,
    LLMJudgeConfig,
    ProgrammaticJudgeConfig,
    RewardModelJudgeConfig,
    parse_judge_config,
)
from jaxselm.feedback.factory import make_judge
from jaxselm.feedback.llm import LLMJudge, parse_pairwise, parse_score
from jaxselm.feedback.pairs import PreferencePair, build_pairs, score_samples
from jaxselm.feedback.programmatic import ProgrammaticJudge, resolve_callable
from jaxselm.feedback.reward_model import RewardModelJudge

__all__ = [
    "DEFAULT_PAIRWISE_TEMPLATE",
    "DEFAULT_SCORING_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "JUDGE_KINDS",
    "Judge",
    "JudgeConfig",
    "LLMJudge",
    "LLMJudgeConfig",
    "LearnedRewardModelJudgeConfig",
    "PreferencePair",
    "ProgrammaticJudge",
    "ProgrammaticJudgeConfig",
    "RewardModelJudge",
    "RewardModelJudgeConfig",
    "build_pairs",
    "make_judge",
    "parse_judge_config",
    "parse_pairwise",
    "parse_score",
    "resolve_callable",
    "score_samples",
]
