"""The reference model's log-probs: pi_ref's summed log-probs of every response, once.

SELM and DPO compare the policy's log-probs with those of pi_ref (the policy at the start of the
iteration). They carry no gradient and pi_ref does not change during the iteration, so the loop
computes them once per iteration, before training, with :func:`make_reference_fn` (jitted,
sharded, optionally micro-batched) and keeps them in the batches (``PreferenceBatch.ref_logps``);
pi_ref's parameters need not stay on the devices while training.

    ref_fn = make_reference_fn(model_cfg, mesh)
    batch = batch.replace(ref_logps=ref_fn(ref_params, batch))
"""

from __future__ import annotations

from typing import Any

import jax

from jaxselm.data.packing import LogProbs, PreferenceBatch
from jaxselm.model import ModelConfig
from jaxselm.parallel.rules import (
    LOGICAL_AXIS_RULES,
    Rules,
    batch_sharding,
    batch_shardings,
    with_mesh_rules,
)
from jaxselm.train.objectives import RESPONSES_WITH_REFRESP, policy_logprobs
from jaxselm.train.state import params_shardings_for
from jaxselm.train.step import ACTIVATION_CONSTRAINTS, signature, split_micro_batches

REFERENCE_CHUNK = 256  # positions per block of logits in the reference pass


def reference_logprobs(
    params: Any,
    config: ModelConfig,
    batch: PreferenceBatch,
    responses: tuple[str, ...] = RESPONSES_WITH_REFRESP,
) -> LogProbs:
    """The reference model's summed log-probs [B] of each response in ``responses``.

    Pure and jittable (``config`` static); :func:`make_reference_fn` gives the sharded, jitted,
    micro-batched version the loop uses once per iteration.
    """
    # No gradient here, so log-probs in blocks cost nothing extra: [B, T, V] logits never exist.
    chunk = config.logprob_chunk or REFERENCE_CHUNK
    logps = policy_logprobs(params, config, batch, responses, chunk=chunk)
    return LogProbs(**{name: jax.lax.stop_gradient(v) for name, v in logps.items()})


class ReferenceFn:
    """Jitted, sharded :func:`reference_logprobs`, micro-batched with ``lax.map``.

    Params are moved to ``self.param_shardings`` on each call unless already there: place the
    reference params once (``jax.device_put(params, fn.param_shardings)``) when calling it over
    many batches.
    """

    def __init__(
        self,
        config: ModelConfig,
        mesh: jax.sharding.Mesh,
        *,
        responses: tuple[str, ...] = RESPONSES_WITH_REFRESP,
        micro_batches: int = 1,
        rules: Rules = LOGICAL_AXIS_RULES,
        activation_constraints: bool = ACTIVATION_CONSTRAINTS,
    ):
        self.config, self.mesh, self.rules = config, mesh, rules
        self.activation_constraints = activation_constraints
        self.responses, self.micro_batches = responses, micro_batches
        self.param_shardings = params_shardings_for(config, mesh, rules)
        self._compiled: dict[tuple, Any] = {}

    def _fn(self, params: Any, batch: PreferenceBatch) -> LogProbs:
        if self.micro_batches == 1:
            return reference_logprobs(params, self.config, batch, self.responses)
        mbs = split_micro_batches(batch, self.micro_batches, self.mesh, self.rules)
        out = jax.lax.map(
            lambda mb: reference_logprobs(params, self.config, mb, self.responses), mbs
        )
        # [n, B/n] back to [B] in the original row order (row i*n + m came from micro-batch m).
        return jax.tree.map(lambda v: v.swapaxes(0, 1).reshape(-1), out)

    def __call__(self, params: Any, batch: PreferenceBatch) -> LogProbs:
        """LogProbs [B] of ``self.responses`` (the others None); ``batch.ref_logps`` is ignored."""
        batch = PreferenceBatch(
            chosen=batch.chosen,
            rejected=batch.rejected,
            refresp=batch.refresp if "refresp" in self.responses else None,
        )
        shards = batch_shardings(batch, self.mesh, self.rules)
        key = signature(batch)
        if key not in self._compiled:
            row = batch_sharding((batch.size,), self.mesh, self.rules)
            out_sh = LogProbs(**{name: row for name in self.responses})
            self._compiled[key] = jax.jit(
                self._fn, in_shardings=(self.param_shardings, shards), out_shardings=out_sh
            )
        batch = jax.device_put(batch, shards)
        params = jax.device_put(params, self.param_shardings)
        with with_mesh_rules(
            self.mesh, self.rules, activation_constraints=self.activation_constraints
        ):
            return self._compiled[key](params, batch)


# ``fn = make_reference_fn(config, mesh)``: ``fn(ref_params, batch) -> LogProbs [B]``.
make_reference_fn = ReferenceFn
