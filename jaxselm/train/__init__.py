"""Training: objectives, optimizer, train state, sharded steps and checkpoints.

    from jaxselm.train import (TrainConfig, make_optimizer, init_train_state,
                               make_preference_step, make_reference_fn, Checkpointer)

See ``jaxselm.train.step`` for the batch layout and a full example.
"""

from jaxselm.train.checkpoint import (
    Checkpointer,
    export_metadata,
    export_tokenizer,
    latest_step,
    load_params,
    save_params,
)
from jaxselm.train.driver import TrainLoop
from jaxselm.train.losses import (
    dpo_loss,
    ipo_loss,
    reward_model_loss,
    selm_loss,
    sequence_logprobs,
    sft_loss,
    token_logprobs,
    xpo_loss,
)
from jaxselm.train.optimizer import OptimizerConfig, TrainConfig, make_optimizer, make_schedule
from jaxselm.train.reference import ReferenceFn, make_reference_fn, reference_logprobs
from jaxselm.train.state import (
    TrainState,
    abstract_train_state,
    create_train_state,
    init_train_state,
    params_shardings_for,
    shard_train_state,
    state_shardings,
)
from jaxselm.train.step import (
    ShardedStep,
    make_preference_step,
    make_reward_model_step,
    make_sft_step,
    make_step,
    policy_logprobs,
    responses_for,
)

__all__ = [
    "Checkpointer",
    "OptimizerConfig",
    "ReferenceFn",
    "ShardedStep",
    "TrainConfig",
    "TrainLoop",
    "TrainState",
    "abstract_train_state",
    "create_train_state",
    "export_metadata",
    "export_tokenizer",
    "dpo_loss",
    "init_train_state",
    "ipo_loss",
    "latest_step",
    "load_params",
    "make_optimizer",
    "make_preference_step",
    "make_reference_fn",
    "make_reward_model_step",
    "make_schedule",
    "make_sft_step",
    "make_step",
    "params_shardings_for",
    "policy_logprobs",
    "reference_logprobs",
    "responses_for",
    "reward_model_loss",
    "save_params",
    "selm_loss",
    "sequence_logprobs",
    "sft_loss",
    "shard_train_state",
    "state_shardings",
    "token_logprobs",
    "xpo_loss",
]
