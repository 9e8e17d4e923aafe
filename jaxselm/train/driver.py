"""The one training driver: a jitted step over a batch source, resumable, with hooks.

Every training loop of the package is this one (SFT warm start, the online train phase, offline
preference training, reward-model training); they differ only in their step, their batches and
their hooks:

    loop = TrainLoop(step, total_steps=300, name="iter 1 train", checkpoint_dir=run / "ckpt",
                     checkpoint_every=50, stop=lambda: flag.raised)
    loop.add_hook(lambda s, m: metrics.write("train", s, to_host(m)), every=1)
    params = loop.run(lambda: start_params, optimizer, batch_at=lambda s: batches[s]).params

What it guarantees:

* **Exact resume.** ``batch_at(s)`` must give the batch of step ``s`` (0-based) as a pure function
  of ``s``. With a ``checkpoint_dir`` the state is saved every ``checkpoint_every`` steps (orbax,
  async by default); :meth:`TrainLoop.run` restarts from the latest saved step, so a run killed
  anywhere and restarted ends with the same parameters, bit for bit on CPU. Hooks fire again only
  for steps after that checkpoint: the caller drops its records of later steps
  (:func:`jaxselm.train.checkpoint.latest_step` tells which) before running.
* **SIGTERM.** ``stop()`` is polled after every step, agreed by all processes (one process seeing
  the signal stops all of them at the same step): the state is checkpointed and
  :class:`~jaxselm.preemption.Preempted` raised.
* **Multi-host.** Every process runs the same steps in the same order; checkpoints are collective.

Hooks are ``fn(step, metrics)`` with the 1-based step and the step's device metrics, called every
``every`` steps and after the last one (Levanter's ``add_hook``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import jax
import optax

from jaxselm.parallel.multihost import any_process
from jaxselm.preemption import Preempted, fault_point
from jaxselm.train.checkpoint import Checkpointer
from jaxselm.train.state import TrainState, create_train_state
from jaxselm.train.step import Metrics, ShardedStep

Hook = Callable[[int, Metrics], None]


def progress(iterable: Iterable, *, total: int, desc: str, enabled: bool) -> Iterable:
    """``iterable`` with a tqdm bar on stderr when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


@dataclasses.dataclass
class TrainLoop:
    """Runs ``step`` for ``total_steps`` steps; see the module docstring.

    ``name`` labels the progress bar and the fault points (``<fault_name>/step<N>``, for the
    kill tests); ``metadata`` is stored with every checkpoint.
    """

    step: ShardedStep
    total_steps: int
    name: str = "train"
    fault_name: str | None = None
    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int = 50
    async_checkpoints: bool = True
    stop: Callable[[], bool] = lambda: False
    show_progress: bool = False
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    hooks: list[tuple[Hook, int]] = dataclasses.field(default_factory=list)

    def add_hook(self, fn: Hook, every: int = 1) -> TrainLoop:
        self.hooks.append((fn, every))
        return self

    def run(
        self,
        start_params: Callable[[], Any],
        optimizer: optax.GradientTransformation,
        batch_at: Callable[[int], Any],
    ) -> TrainState:
        """Train from ``start_params()`` (or the latest checkpoint); the final state.

        ``start_params`` is called for a fresh start, and traced (``jax.eval_shape``) for the
        restore target on resume, so it should only transform arrays already in hand; what it
        returns is donated to the first step (return a copy of parameters you keep using, e.g.
        pi_ref).
        """
        shardings = self.step.state_shardings

        def fresh() -> TrainState:
            return jax.device_put(create_train_state(start_params(), optimizer), shardings)

        if self.checkpoint_dir is None:
            return self._steps(fresh(), 0, batch_at, None)
        with Checkpointer(
            self.checkpoint_dir, max_to_keep=2, async_save=self.async_checkpoints
        ) as ck:
            start = ck.latest_step()
            if start is None:
                state, start = fresh(), 0
            else:
                target = jax.eval_shape(lambda: create_train_state(start_params(), optimizer))
                target = jax.tree.map(
                    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                    target,
                    shardings,
                )
                state, _ = ck.restore(target, step=start)
            return self._steps(state, start, batch_at, ck)

    def _steps(self, state: TrainState, start: int, batch_at, ck: Checkpointer | None):
        total = self.total_steps
        fault = self.fault_name or self.name
        for s in progress(
            range(start, total), total=total - start, desc=self.name, enabled=self.show_progress
        ):
            state, metrics = self.step(state, batch_at(s))
            done = s + 1
            for fn, every in self.hooks:
                if done % every == 0 or done == total:
                    fn(done, metrics)
            fault_point(f"{fault}/step{done}")
            stop = any_process(self.stop())  # all hosts checkpoint (a collective) together
            if ck is not None and (stop or done % self.checkpoint_every == 0):
                ck.save(state, step=done, metadata=self.metadata)
            if stop:
                if ck is not None:
                    ck.wait()
                raise Preempted()
        return state
