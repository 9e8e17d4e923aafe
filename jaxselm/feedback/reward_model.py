"""Reward-model judge: a jaxselm decoder with a scalar head scores ``prompt + response``.

This is the PairRM / LlamaForSequenceClassification route to AI feedback: one forward pass per
item, the reward read at the last real token (:func:`jaxselm.model.reward_scores`). Loading the
weights (HF checkpoint or jaxselm checkpoint) is the caller's job; the judge takes params:

    judge = RewardModelJudge.from_params(params, model_cfg, tokenizer, batch_size=16)
    judge.score(["2+2="], ["4"])            # float64 [1]
    judge.compare("2+2=", "4", "5")         # Bradley-Terry P(a beats b) = sigmoid(r_a - r_b)

Batching without recompiling: items are sorted by length, cut into batches of ``batch_size``
rows (the last one filled with dummy rows), and each batch is right-padded to a power-of-two
length bucket (at least ``min_bucket``, at most ``max_length``). The forward is jitted once, so
the number of compilations is bounded by the number of buckets (``log2(max_length)``) whatever
the mix of lengths. Padded positions are masked, so a score does not depend on the batch it
landed in (up to float rounding of a different shape).

Prompt and response are encoded separately and concatenated, so the reward model sees the same
token boundary the policy generated across (a joint encode could merge tokens at the seam).
Token-id sequences are accepted in place of strings, which spares the loop a decode/encode round
trip. Items longer than ``max_length`` lose the start of the prompt (the response, whose end is
where the reward is read, is kept) and are counted in ``stats()["truncated"]``.

Sharding: params placed by the caller (e.g. with ``jaxselm.parallel.param_shardings``) stay
where they are; ``batch_sharding`` (e.g. a NamedSharding over the mesh's data axes) spreads each
batch's rows over the devices, so ``batch_size`` should be a multiple of that device count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from jaxselm.data.packing import pad_batch
from jaxselm.errors import JudgeError
from jaxselm.feedback.base import Judge, Response
from jaxselm.feedback.config import RewardModelJudgeConfig
from jaxselm.model import ModelConfig, reward_scores


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...


class RewardModelJudge(Judge):
    """Scores items with a reward model's scalar head (higher = better)."""

    def __init__(
        self,
        params: Mapping[str, Any],
        model_config: ModelConfig,
        tokenizer: TokenizerLike,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        min_bucket: int = 16,
        pad_id: int = 0,
        batch_sharding: jax.sharding.Sharding | None = None,
    ) -> None:
        if not isinstance(model_config, ModelConfig):
            raise JudgeError(
                f"judge: model_config must be a ModelConfig, got {type(model_config).__name__}"
            )
        if not isinstance(params, Mapping) or "score" not in params:
            raise JudgeError(
                "judge.checkpoint: params have no reward head 'score' "
                "(load the model with head='reward')"
            )
        if not callable(getattr(tokenizer, "encode", None)):
            raise JudgeError(
                f"judge: tokenizer {type(tokenizer).__name__} has no encode(text) method"
            )
        ctx = model_config.max_position_embeddings
        max_length = ctx if max_length is None else max_length
        if not 2 <= max_length <= ctx:
            raise JudgeError(
                f"judge.max_length: {max_length} must be in [2, {ctx}] (the model's context length)"
            )
        if batch_size < 1 or min_bucket < 1:
            raise JudgeError(
                f"judge.batch_size/min_bucket: must be >= 1 (got {batch_size}, {min_bucket})"
            )
        super().__init__(extra_counters=("truncated", "batches", "compiled_shapes"))
        self.params = params
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.min_bucket = min_bucket
        self.pad_id = pad_id
        self.batch_sharding = batch_sharding
        if batch_sharding is not None:
            try:
                batch_sharding.shard_shape((batch_size, self.min_bucket))
            except ValueError:
                raise JudgeError(
                    f"judge.batch_size: {batch_size} rows cannot be split by the batch sharding "
                    f"{batch_sharding}"
                ) from None
        self._forward = jax.jit(reward_scores, static_argnums=1)
        self._shapes: set[tuple[int, int]] = set()

    @classmethod
    def from_params(
        cls,
        params: Mapping[str, Any],
        model_config: ModelConfig,
        tokenizer: TokenizerLike,
        config: RewardModelJudgeConfig | None = None,
        **overrides: Any,
    ) -> RewardModelJudge:
        """A judge from loaded reward-model params, sized by ``config`` (and keyword overrides)."""
        config = config or RewardModelJudgeConfig()
        kw = dict(
            batch_size=config.batch_size, max_length=config.max_length, min_bucket=config.min_bucket
        )
        return cls(params, model_config, tokenizer, **{**kw, **overrides})

    def _ids(self, x: str | Sequence[int]) -> list[int]:
        if isinstance(x, str):
            return list(self.tokenizer.encode(x)) if x else []
        return [int(t) for t in x]

    def encode(self, prompt: str | Sequence[int], response: Response) -> list[int]:
        """Token ids the model scores: prompt ids + response ids, left-truncated to max_length."""
        ids = self._ids(prompt) + self._ids(response)
        if len(ids) > self.max_length:
            self._count("truncated")
            ids = ids[-self.max_length :]
        return ids

    def _score(self, prompts: list[str], responses: list[Response]) -> np.ndarray:
        seqs = [self.encode(p, r) for p, r in zip(prompts, responses)]
        out = np.full(len(seqs), np.nan, np.float64)
        valid = [i for i, s in enumerate(seqs) if s]
        self._count("failures", len(seqs) - len(valid))  # empty prompt + response: nothing to score
        order = sorted(valid, key=lambda i: len(seqs[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            # Right-padded to a power-of-two bucket; filler rows (one real token) complete the
            # batch and their scores are discarded.
            padded = pad_batch(
                [seqs[i] for i in idx],
                self.pad_id,
                side="right",
                min_length=self.min_bucket,
                max_length=self.max_length,
                batch_size=self.batch_size,
                filler=True,
            )
            tokens, mask = padded.ids, padded.mask
            t = tokens.shape[1]
            if (self.batch_size, t) not in self._shapes:
                self._shapes.add((self.batch_size, t))
                self._count("compiled_shapes")
            self._count("batches")
            if self.batch_sharding is not None:
                tokens, mask = jax.device_put((tokens, mask), self.batch_sharding)
            scores = np.asarray(
                jax.device_get(self._forward(self.params, self.model_config, tokens, mask))
            )
            out[idx] = scores[: len(idx)]
        bad = ~np.isfinite(out[valid]) if valid else np.zeros(0, bool)
        if bad.any():  # a diverged model: do not let inf/NaN masquerade as a ranking
            self._count("failures", int(bad.sum()))
            out[np.asarray(valid)[bad]] = np.nan
        return out

    def _compare(self, prompts: list[str], a: list[Response], b: list[Response]) -> np.ndarray:
        """Bradley-Terry probability sigmoid(r_a - r_b) that ``a`` beats ``b``."""
        sa, sb = self.score_both(prompts, a, b)
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-(sa - sb)))

    def __repr__(self) -> str:
        return (
            f"RewardModelJudge(layers={self.model_config.num_layers}, "
            f"hidden={self.model_config.hidden_size}, "
            f"batch_size={self.batch_size}, max_length={self.max_length})"
        )
