"""Metric names, shared by the code that writes them and the code that reads them.

Training metrics are named as TRL names them (``rewards/chosen``, ``logps/rejected``...), so
dashboards read the same; the online loop's evaluation and sample statistics use ``eval/*`` and
``samples/*``. A reader never spells a name itself: a renamed metric is then a NameError at
import, not a silent ``nan`` in a table.
"""

from __future__ import annotations

# -- train steps (jaxselm.train.losses, jaxselm.train.step) -------------------------------------
LOSS = "loss"
GRAD_NORM = "grad_norm"
LEARNING_RATE = "learning_rate"
PAIRS = "pairs"  # the batch's weight: preference pairs

REWARDS_CHOSEN = "rewards/chosen"
REWARDS_REJECTED = "rewards/rejected"
REWARDS_MARGINS = "rewards/margins"
REWARDS_ACCURACIES = "rewards/accuracies"
REWARDS_REFRESP = "rewards/refresp"
LOGPS_CHOSEN = "logps/chosen"
LOGPS_REJECTED = "logps/rejected"
LOGPS_REFRESP = "logps/refresp"
LOSS_DPO = "loss/dpo"
SELM_EXPLORATION = "selm/exploration"
XPO_EXPLORATION = "xpo/exploration"
ENTROPY = "policy/entropy"  # mean next-token entropy over a pair's response tokens

SFT_NLL = "sft/nll"
SFT_ACCURACY = "sft/accuracy"
SFT_TOKENS = "sft/tokens"  # the SFT batch's weight: scored tokens

RM_ACCURACY = "rm/accuracy"
RM_MARGIN = "rm/margin"
RM_CHOSEN = "rm/chosen"
RM_REJECTED = "rm/rejected"

# -- online evaluation (jaxselm.online) ---------------------------------------------------------
EVAL_REWARD = "eval/reward"  # judge score of greedy responses to held-out prompts
EVAL_ACCURACY = "eval/accuracy"
EVAL_LENGTH = "eval/length"
EVAL_DISTINCT_2 = "eval/distinct_2"
EVAL_SAMPLE_REWARD = "eval/sample_reward"  # of one temperature-1 sample per prompt
EVAL_SAMPLE_ACCURACY = "eval/sample_accuracy"
EVAL_WIN_RATE = "eval/win_rate"  # against the previous iteration, greedy
EVAL_SAMPLE_WIN_RATE = "eval/sample_win_rate"
EVAL_KL = "eval/kl"  # KL(pi || pi_ref) from temperature-1 samples

# The per-iteration summary of the training steps: "train/<name with / as _>".
TRAIN_SUMMARY = (LOSS, REWARDS_ACCURACIES, REWARDS_MARGINS, SELM_EXPLORATION)


def train_summary_name(name: str) -> str:
    """The iteration record's key for the mean of training metric ``name``."""
    return "train/" + name.replace("/", "_")


def samples_name(stat: str) -> str:
    """The iteration record's key of a generation/judging statistic (``samples/n_pairs``)."""
    return "samples/" + stat
