"""The online SELM loop: the orchestrator of the phases, and the only place that decides resumes.

    jaxselm online --config configs/demo.yaml                       # the CPU demo
    jaxselm online --config configs/zephyr-7b.yaml run.output_dir=gs://...   # on a pod

    from jaxselm.online import run_online
    run_online(cfg)                                                  # the same, from Python

Iteration t (1-based) samples responses from the current policy on its own slice of prompts,
has the judge rank them into (chosen, rejected) pairs with a y_ref, computes pi_ref's log-probs
ONCE (pi_ref = the policy at the start of the iteration), trains ``online.epochs`` passes of the
SELM (or DPO / IPO / XPO) loss with a fresh optimizer and the iteration's learning rate, saves
the policy (pi_ref of t+1) and evaluates it. Before iteration 1 an optional SFT warm start fits
the (random or loaded) model on demonstrations; its result is "iteration 0", evaluated like the
others. The phases are in :mod:`jaxselm.online.phases` and :mod:`jaxselm.online.evaluation`.

Resume. Every phase writes its output atomically under ``output_dir/iter_NN/``, training
checkpoints every ``online.checkpoint_every`` steps, and ``run.json`` counts completed
iterations. Run the same command after a kill (SIGKILL) and :class:`Run` skips what is done,
restarts generation and judging from their start with the same keys and training from its last
checkpoint with the same batch order, so the parameters and metrics equal an uninterrupted run's
(exactly, with fixed seeds on CPU). SIGTERM (what TPU preemption sends) checkpoints at the next
step or batch boundary and exits with status 0.

Multi-host (``jaxselm --distributed online ...`` on every host): every process runs this same
loop over the global mesh, each reading and packing only the rows of every global batch its
devices hold; the judge, the files and the log lines are process 0's. See tpu/README.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

from jaxselm.errors import ConfigError
from jaxselm.files import read_json, write_json
from jaxselm.online import phases
from jaxselm.online.config import RunConfig
from jaxselm.online.context import RunContext
from jaxselm.online.evaluation import EVAL, evaluate, evaluation_record
from jaxselm.online.metrics import MetricsWriter, format_table, phase_times, plot_iterations
from jaxselm.online.rollout import Generation
from jaxselm.parallel.multihost import barrier, from_primary, is_primary
from jaxselm.preemption import Preempted, SigtermFlag, fault_point
from jaxselm.train.checkpoint import latest_step

STATE = "run.json"  # {"config_digest": ..., "completed_iterations": t}


def run_online(cfg: RunConfig, *, log=print, config_dir: str | None = None) -> int:
    """Run or resume ``online.iterations`` iterations (and the warm start); exit status 0."""
    return Run(RunContext.create(cfg, log=log, config_dir=config_dir)).online()


def run_sft(cfg: RunConfig, *, log=print, config_dir: str | None = None) -> int:
    """Only the warm start: writes policy/iter_00 and its evaluation."""
    return Run(RunContext.create(cfg, log=log, config_dir=config_dir)).sft_only()


def run_offline(cfg: RunConfig, *, log=print, config_dir: str | None = None) -> int:
    """Offline preference training on the dataset's (chosen, rejected) pairs: one 'iteration'
    from policy/iter_00, y_ref the start policy's greedy response (SELM / XPO)."""
    if cfg.data.source != "prompts":
        raise ConfigError(
            "data.source: offline training needs a preference file (data.source: prompts)"
        )
    return Run(RunContext.create(cfg, log=log, config_dir=config_dir)).offline()


def config_digest(cfg: RunConfig) -> str:
    """Hash of the settings that change results (not output_dir / progress / tensorboard)."""
    data = cfg.model_dump(mode="json")
    data["run"] = {"seed": data["run"]["seed"]}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class Run:
    """One run folder; each public method does (or resumes) one command's work."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.preempted = False  # set when a SIGTERM ended the session

    # -- commands ----------------------------------------------------------------------------
    def online(self) -> int:
        with self._session() as done:
            if done < 0:
                self._iteration_zero()
            o = self.ctx.cfg.online
            for t in range(max(1, self._completed() + 1), o.iterations + 1):
                self._iteration(t, offline=t <= o.offline_iterations)
        return self._finish(plot=True)

    def sft_only(self) -> int:
        with self._session():
            self._iteration_zero(count=False)
        return self._finish(plot=False)

    def offline(self) -> int:
        with self._session() as done:
            if done < 0:
                self._iteration_zero()
            self._iteration(1, offline=True, whole_file=True)
        return self._finish(plot=False)

    # -- iterations --------------------------------------------------------------------------
    def _iteration_zero(self, *, count: bool = True) -> None:
        ctx = self.ctx
        self._truncate_metrics(0)
        if not ctx.exists(ctx.policy_dir(0)):
            with self._timed(0, "init"):
                params = phases.initial_params(ctx)
            if ctx.cfg.sft.steps > 0:
                with self._timed(0, "sft"):
                    params = phases.sft(ctx, params)
            with self._timed(0, "save"):
                ctx.save_policy(0, params)
        self._evaluate(0, None)
        self._set_completed(0 if count else max(0, self._completed()))

    def _iteration(self, t: int, *, offline: bool = False, whole_file: bool = False) -> None:
        ctx, d = self.ctx, self.ctx.iter_dir(t)
        t0 = time.time()
        self._truncate_metrics(t)
        d.mkdir(parents=True, exist_ok=True)
        ref_params = ctx.load_policy(t - 1)  # pi_ref: the iteration-start policy
        if not ctx.exists(ctx.policy_dir(t)):
            if offline:
                with self._timed(t, "pairs"):
                    phases.offline_pairs(ctx, t, ref_params, whole_file=whole_file)
            else:
                if not ctx.exists(d / phases.GENERATE):
                    with self._timed(t, "generate"):
                        phases.generate(ctx, t, ref_params)
                if not ctx.exists(d / phases.JUDGE):
                    with self._timed(t, "judge"):
                        phases.judge(ctx, t, Generation.load(d / phases.GENERATE))
            pairs = phases.load_pairs(ctx, t)
            if ctx.exists(d / phases.REFERENCE):
                ref = phases.load_reference(ctx, t)
            else:
                with self._timed(t, "reference"):
                    ref = phases.reference(ctx, t, pairs, ref_params)
            with self._timed(t, "train"):
                # pi_ref's buffers become the train state's (donated), so training does not
                # hold a second copy of the weights; evaluation loads pi_ref again.
                params = phases.train(ctx, t, pairs, ref, ref_params)
                ref_params = None
            with self._timed(t, "save"):
                ctx.save_policy(t, params)
            fault_point(f"iter{t}/saved")
        self._evaluate(t, ref_params)
        self._set_completed(t)
        ctx.log(f"iteration {t} done in {time.time() - t0:.1f}s")

    def _evaluate(self, t: int, ref_params: Any) -> None:
        ctx = self.ctx
        if ctx.exists(ctx.iter_dir(t) / EVAL):  # done before a kill: re-emit its record
            ctx.metrics.write("iteration", t, evaluation_record(ctx, t), iteration=t)
        else:
            with self._timed(t, "eval"):
                if ref_params is None and t > 0:  # handed to training (see _iteration)
                    ref_params = ctx.load_policy(t - 1)
                evaluate(ctx, t, ctx.load_policy(t), ref_params)

    @contextlib.contextmanager
    def _timed(self, t: int, phase: str) -> Iterator[None]:
        """A phase's wall time as a "time" record. Written once the phase is done, and kept on
        resume (a done phase is not redone), so each phase of a run has one record."""
        start = time.perf_counter()
        yield
        seconds = round(time.perf_counter() - start, 3)
        self.ctx.metrics.write("time", t, {f"{phase}_s": seconds}, iteration=t)
        fault_point(f"iter{t}/{phase}/done")

    # -- resume bookkeeping ------------------------------------------------------------------
    def _truncate_metrics(self, t: int) -> None:
        """Drop the metric records that iteration t will write again: its evaluation record, and
        its training records after the last checkpoint (all of them are kept once its policy is
        saved, since training is then not redone); every record of later iterations."""
        ctx = self.ctx
        trained = ctx.exists(ctx.policy_dir(t))
        ckpt = (
            None
            if trained
            else latest_step(ctx.out / "sft" / "ckpt" if t == 0 else ctx.iter_dir(t) / "ckpt")
        )

        d = ctx.iter_dir(t)
        # A phase's wall time is kept when what it made is on disk (it will not run again);
        # the others (e.g. a warm start trained but not yet saved) run again and are timed
        # again, so their old records go.
        made = {
            "generate": ctx.exists(d / phases.GENERATE),
            "judge": ctx.exists(d / phases.JUDGE),
            "pairs": ctx.exists(d / phases.JUDGE),
            "reference": ctx.exists(d / phases.REFERENCE),
            "eval": ctx.exists(d / EVAL),
        }

        def keep(rec: dict[str, Any]) -> bool:
            it = rec.get("iteration", 0)
            if it != t:
                return it < t
            if rec.get("kind") == "time":
                phase = next((k[:-2] for k in rec if k.endswith("_s")), "")
                return made.get(phase, trained)  # init / sft / train / save: with the policy
            if rec.get("kind") not in ("train", "sft"):
                return False
            return trained or (ckpt is not None and rec.get("iter_step", 0) <= ckpt)

        ctx.metrics.truncate(keep)

    @contextlib.contextmanager
    def _session(self) -> Iterator[int]:
        """Prepare the folder (or check it holds this run), open the metrics, turn SIGTERM into a
        clean stop; yields the number of completed iterations (-1: none)."""
        ctx = self.ctx
        try:
            ctx.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"run.output_dir: cannot create {ctx.out} ({err.strerror})") from None
        barrier("prepare output_dir")
        fault_point("session")
        digest = config_digest(ctx.cfg)
        if ctx.exists(ctx.out / STATE):
            if read_json(ctx.out / STATE).get("config_digest") != digest:
                raise ConfigError(
                    f"run.output_dir: {ctx.out} holds a run with different "
                    "settings; use a new output_dir (or the same config to resume)"
                )
        else:
            if is_primary():
                write_json(ctx.out / "config.json", ctx.cfg.model_dump(mode="json"))
            ctx.write_json(ctx.out / STATE, {"config_digest": digest, "completed_iterations": -1})
        ctx.metrics = MetricsWriter(ctx.out, tensorboard=ctx.cfg.run.tensorboard)
        done = self._completed()
        state = "a new run" if done < 0 else f"resuming after iteration {done}"
        for line in [f"run: {ctx.out} ({state})", *ctx.describe()]:
            ctx.log(line)
        try:
            with SigtermFlag() as flag:
                ctx.stop = lambda: flag.raised
                yield done
        except Preempted:
            self.preempted = True
            ctx.log(f"SIGTERM: state saved in {ctx.out}; run the same command to resume")
        finally:
            ctx.metrics.close()

    def _finish(self, *, plot: bool) -> int:
        ctx = self.ctx
        if self.preempted:
            return 0
        records = ctx.metrics.read("iteration")
        if plot and is_primary():
            plot_iterations(records, ctx.out / "metrics.png")
        ctx.log(format_table(records, phase_times(ctx.metrics.read("time"))))
        if plot:
            ctx.log(f"metrics: {ctx.metrics.path}  plot: {ctx.out / 'metrics.png'}")
        return 0

    def _completed(self) -> int:
        # process 0's reading, on every process (each reading for itself races with its write)
        return from_primary(read_json(self.ctx.out / STATE)["completed_iterations"])

    def _set_completed(self, t: int) -> None:
        self.ctx.write_json(
            self.ctx.out / STATE, {**read_json(self.ctx.out / STATE), "completed_iterations": t}
        )
