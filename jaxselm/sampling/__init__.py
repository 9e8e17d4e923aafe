"""Generation for online alignment: KV-cache prefill + jitted decode loop, sampling strategies.

    from jaxselm.sampling import generate
    res = generate(params, cfg, prompts, rng=jax.random.key(0), max_new_tokens=256, n=4,
                   temperature=0.7, top_p=0.9, stop_token_ids=(eos_id,))

See :mod:`jaxselm.sampling.engine` for the engine and :mod:`jaxselm.sampling.strategies` for the
logits filters (usable on their own).
"""

from jaxselm.sampling.engine import (
    DEFAULT_LOGICAL_RULES,
    FinishReason,
    GenerationResult,
    generate,
    lower_generate,
)
from jaxselm.sampling.strategies import (
    apply_temperature,
    check_sampling_params,
    min_p_filter,
    process_logits,
    sample_logits,
    token_logprobs,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "DEFAULT_LOGICAL_RULES",
    "FinishReason",
    "GenerationResult",
    "apply_temperature",
    "check_sampling_params",
    "generate",
    "lower_generate",
    "min_p_filter",
    "process_logits",
    "sample_logits",
    "token_logprobs",
    "top_k_filter",
    "top_p_filter",
]
