"""The online SELM loop: generate -> judge -> reference log-probs -> train -> evaluate, per iteration.

    jaxselm online --config configs/demo.yaml            # the CPU demo
    jaxselm online --config configs/zephyr-7b.yaml run.output_dir=gs://...  # on a pod

Iteration t (1-based) reads its own slice of prompts, samples ``samples_per_prompt`` responses
from the current policy, has the judge score them, turns each prompt's ranking into a (chosen,
rejected) pair with one policy sample kept as y_ref, computes the reference log-probs ONCE with
the iteration-start parameters (pi_ref = the policy at the start of the iteration, refreshed every
iteration), runs ``epochs`` passes of SELM (or DPO / IPO / XPO) updates with a fresh optimizer and
the iteration's learning rate, evaluates, and saves the new policy, which becomes pi_ref of t+1.

Before iteration 1 an optional SFT warm start fits the (random or loaded) model on demonstrations;
its result is "iteration 0", evaluated like the others.

Preemption-safe: every phase writes its output atomically under ``output_dir/iter_NN/`` (arrays as
safetensors, the rest as JSON), training checkpoints its state every ``checkpoint_every`` steps
with orbax, and the policy after each iteration is exported. A run killed at any point (SIGKILL)
resumes where it stopped and, with fixed seeds on CPU, ends with exactly the parameters and
metrics of an uninterrupted run: completed phases are read back, generation and judging restart
from the phase's start with the same keys, training restarts from its last checkpoint with the
same batch order. SIGTERM (what TPU preemption sends) saves a training checkpoint at the next step
boundary and exits with status 0.

Multi-host (a TPU pod slice, several GPU nodes; ``jaxselm --distributed online ...`` on every host,
see tpu/README.md): every process runs this same loop over the global mesh. Data is sharded per
process: of every global batch (generation prompts, SFT demonstrations, preference triples,
reference log-probs) each host reads and packs only the rows its devices hold
(:func:`~jaxselm.parallel.multihost.local_batch_rows`) and the global array is assembled from the
hosts' pieces (:func:`~jaxselm.parallel.multihost.make_global_batch`); no host reads the whole
dataset. Jitted outputs (sampled tokens, log-probs: small) come back to every host through
:func:`~jaxselm.parallel.multihost.to_host`. The judge runs once, on process 0: the prompt texts it
needs reach it through the run folder (each host writes the records it read to
``iter_NN/prompts/part-<process>.json``). Phase files, run.json, metrics and log lines are process
0's (followed by a barrier before anyone reads them), so ``output_dir`` must be on a filesystem all
hosts share (NFS, GCS-fuse); orbax checkpoints are written by all processes together. A SIGTERM
seen by any host stops all of them at the same step boundary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxselm.data.batching import bucket_length
from jaxselm.errors import ConfigError, DataError, JaxselmError
from jaxselm.feedback import RewardModelJudgeConfig, build_pairs, make_judge, parse_judge_config
from jaxselm.model import ModelConfig, init_params
from jaxselm.online.config import RunConfig
from jaxselm.online.io import read_arrays, read_json, write_arrays, write_json
from jaxselm.online.metrics import MetricsWriter, plot_iterations
from jaxselm.online.prompts import PromptSet, _text_of, build_tokenizer
from jaxselm.parallel.mesh import make_mesh, single_device_mesh
from jaxselm.parallel.multihost import (
    any_process,
    barrier,
    is_primary,
    local_batch_rows,
    make_global_batch,
    process_max,
    to_host,
)
from jaxselm.sampling import generate
from jaxselm.train import (
    Checkpointer,
    abstract_train_state,
    create_train_state,
    load_params,
    make_optimizer,
    make_preference_step,
    make_reference_fn,
    make_sft_step,
    params_shardings_for,
    save_params,
)
from jaxselm.train.step import responses_for

PHASES = ("generate", "judge", "reference", "train", "eval")


class Preempted(Exception):
    """Raised at a safe point after SIGTERM; the run exits 0 and resumes later."""


class _SigtermFlag:
    """Turns SIGTERM into a flag checked at step/batch boundaries (main thread only)."""

    def __init__(self) -> None:
        self.raised = False
        self._old = None

    def __enter__(self) -> _SigtermFlag:
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._old = None
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def fault_point(name: str) -> None:
    """Fault injection for the kill tests: with ``JAXSELM_FAULT_AT=<name>`` the process sends
    itself SIGKILL here (or the signal named by ``JAXSELM_FAULT_SIGNAL``, e.g. TERM)."""
    if os.environ.get("JAXSELM_FAULT_AT") == name:
        sig = getattr(signal, "SIG" + os.environ.get("JAXSELM_FAULT_SIGNAL", "KILL"))
        os.kill(os.getpid(), sig)


def _progress(iterable, *, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


def distinct_n(sequences: list[list[int]], n: int) -> float:
    """Distinct-n: unique n-grams / all n-grams over a set of responses (diversity)."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _config_digest(cfg: RunConfig) -> str:
    """Hash of the settings that change results (not output_dir / progress / tensorboard)."""
    data = cfg.model_dump(mode="json")
    data["run"] = {"seed": data["run"]["seed"]}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass
class _Seqs:
    """Right-padded prompt+response rows for the train / reference batches."""

    tokens: np.ndarray  # [N, T] int32
    mask: np.ndarray  # [N, T] bool
    loss_mask: np.ndarray  # [N, T] bool (response tokens only)


def _pack(prompts: list[list[int]], responses: list[list[int]], length: int, pad_id: int) -> _Seqs:
    n = len(prompts)
    tokens = np.full((n, length), pad_id, np.int32)
    mask = np.zeros((n, length), bool)
    loss = np.zeros((n, length), bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = list(p) + list(r)
        if len(seq) > length:
            raise AssertionError(f"row {i}: {len(seq)} tokens > {length}")
        tokens[i, : len(seq)] = seq
        mask[i, : len(seq)] = True
        loss[i, len(p) : len(seq)] = True
    return _Seqs(tokens, mask, loss)


class _Pairs:
    """An iteration's preference triples, packed on demand: a process packs only the rows of
    each global batch it holds. ``pairs`` are judge.json's (responses referenced by their index
    among the samples, or given as dataset text); one padded length for all batches."""

    def __init__(self, pairs: list[dict[str, Any]], prompts: list[list[int]], samples: list[list[int]],
                 encode_response, pad_id: int):
        self.pad = pad_id
        texts: dict[str, list[int]] = {}

        def ids(ref) -> list[int]:
            if isinstance(ref, int):
                return samples[ref]
            if ref not in texts:
                texts[ref] = encode_response(ref)  # a dataset response (text)
            return texts[ref]

        self.prompts = [prompts[x["prompt_index"]] for x in pairs]
        self.responses = {k: [ids(x[k]) for x in pairs] for k in ("chosen", "rejected", "refresp")}
        longest = max((len(p) + max(len(self.responses[k][i]) for k in self.responses)
                       for i, p in enumerate(self.prompts)), default=1)
        self.length = bucket_length(longest, multiple=8)

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, rows: np.ndarray,
              names: tuple[str, ...] = ("chosen", "rejected", "refresp")) -> dict[str, np.ndarray]:
        prompts = [self.prompts[int(i)] for i in rows]
        out = {}
        for name in names:
            seqs = _pack(prompts, [self.responses[name][int(i)] for i in rows], self.length, self.pad)
            out[f"{name}_tokens"], out[f"{name}_mask"] = seqs.tokens, seqs.mask
            out[f"{name}_loss_mask"] = seqs.loss_mask
        return out


class OnlineRun:
    """One online run in ``cfg.run.output_dir``; :meth:`run` does (or resumes) all of it."""

    def __init__(self, cfg: RunConfig, *, log=print, with_judge: bool = True):
        self.cfg = cfg
        self.log = log if is_primary() else _quiet
        self.out = Path(cfg.run.output_dir)
        self.progress = cfg.run.progress
        self.model_cfg: ModelConfig = cfg.model
        self.tok = build_tokenizer(cfg)
        if self.tok.vocab_size > self.model_cfg.vocab_size:
            raise ConfigError(f"model.vocab_size: {self.model_cfg.vocab_size} is smaller than the "
                              f"tokenizer's {self.tok.vocab_size} tokens")
        self.eos = self.tok.eos_id
        self.pad = self.tok.pad_id
        # Built before any work: a bad judge spec (import, env var, checkpoint) fails at once.
        self.judge = build_judge(cfg, self.model_cfg, self.tok) if with_judge else None
        self.mesh = make_mesh(cfg.mesh)
        self.prompts = PromptSet(cfg, self.tok, self.out)
        self.key = jax.random.key(cfg.run.seed)
        self.params_sharding = params_shardings_for(self.model_cfg, self.mesh)
        self.metrics: MetricsWriter | None = None
        self._ref_fn = None

    # ---------------------------------------------------------------------------------- helpers
    def _iter_dir(self, t: int) -> Path:
        return self.out / f"iter_{t:02d}"

    def _policy_dir(self, t: int) -> Path:
        return self.out / "policy" / f"iter_{t:02d}"

    def _abstract_params(self):
        shapes = jax.eval_shape(lambda k: init_params(self.model_cfg, k), jax.random.key(0))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.params_sharding)

    def _load_policy(self, t: int):
        return load_params(self._policy_dir(t), self._abstract_params())

    def _check_preempt(self, flag: _SigtermFlag) -> None:
        if any_process(flag.raised):
            raise Preempted()

    def _write_json(self, path: Path, obj: Any) -> None:
        """Process 0 writes; every process waits until the file is there."""
        if is_primary():
            write_json(path, obj)
        barrier(f"write {path}")

    def _write_arrays(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        if is_primary():
            write_arrays(path, arrays)
        barrier(f"write {path}")

    def _save_policy(self, t: int, params) -> None:
        save_params(self._policy_dir(t), params, overwrite=True)  # collective with several processes
        barrier(f"policy {t}")

    def _prepare_out_dir(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        barrier("prepare output_dir")
        state_path = self.out / "run.json"
        digest = _config_digest(self.cfg)
        if state_path.exists():
            state = read_json(state_path)
            if state.get("config_digest") != digest:
                raise ConfigError(f"run.output_dir: {self.out} holds a run with different settings; "
                                  "use a new output_dir (or the same config to resume)")
            return state
        state = {"config_digest": digest, "completed_iterations": -1}
        if is_primary():
            write_json(self.out / "config.json", self.cfg.model_dump(mode="json"))
        self._write_json(state_path, state)
        return state

    def _set_state(self, **kw) -> None:
        path = self.out / "run.json"
        state = read_json(path)
        state.update(kw)
        self._write_json(path, state)

    # ------------------------------------------------------------------------------------- run
    def run(self) -> int:
        """Run or resume; returns 0 (done or preempted cleanly)."""
        state = self._prepare_out_dir()
        self.metrics = MetricsWriter(self.out, tensorboard=self.cfg.run.tensorboard)
        try:
            with _SigtermFlag() as flag:
                if state["completed_iterations"] < 0:
                    self._truncate_metrics(0)
                    self._iteration_zero(flag)
                    self._set_state(completed_iterations=0)
                for t in range(max(1, read_json(self.out / "run.json")["completed_iterations"] + 1),
                               self.cfg.online.iterations + 1):
                    self._truncate_metrics(t)
                    self._iteration(t, flag)
                    self._set_state(completed_iterations=t)
        except Preempted:
            self.log(f"SIGTERM: state saved in {self.out}; run the same command to resume")
            self.metrics.close()
            return 0
        self.metrics.close()
        records = self.metrics.read("iteration")
        if is_primary():
            plot_iterations(records, self.out / "metrics.png")
        self.log(format_table(records))
        self.log(f"metrics: {self.metrics.path}  plot: {self.out / 'metrics.png'}")
        return 0

    def run_sft_only(self) -> int:
        """Only the warm start: writes policy/iter_00 and its evaluation."""
        self._prepare_out_dir()
        self.metrics = MetricsWriter(self.out, tensorboard=self.cfg.run.tensorboard)
        try:
            with _SigtermFlag() as flag:
                self._truncate_metrics(0)
                self._iteration_zero(flag)
                self._set_state(completed_iterations=max(0, read_json(self.out / "run.json")["completed_iterations"]))
        except Preempted:
            self.log(f"SIGTERM: state saved in {self.out}; run the same command to resume")
            return 0
        finally:
            self.metrics.close()
        self.log(format_table(self.metrics.read("iteration")))
        return 0

    def run_offline(self) -> int:
        """Offline preference training: one 'iteration' whose pairs are the dataset's (chosen,
        rejected) responses; y_ref is the start policy's greedy response (SELM / XPO)."""
        self._prepare_out_dir()
        self.metrics = MetricsWriter(self.out, tensorboard=self.cfg.run.tensorboard)
        t = 1
        d = self._iter_dir(t)
        d.mkdir(parents=True, exist_ok=True)
        try:
            with _SigtermFlag() as flag:
                if read_json(self.out / "run.json")["completed_iterations"] < 0:
                    self._truncate_metrics(0)
                    self._iteration_zero(flag)
                    self._set_state(completed_iterations=0)
                self._truncate_metrics(t)
                ref_params = self._load_policy(0)
                if not self._policy_dir(t).exists():
                    self._offline_pairs(t, ref_params, flag)
                    if not (d / "reference.safetensors").exists():
                        self._reference_phase(t, ref_params)
                    params = self._train_phase(t, ref_params, flag)
                    self._save_policy(t, params)
                self._evaluate(t, self._load_policy(t), ref_params, flag)
                self._set_state(completed_iterations=t)
        except Preempted:
            self.log(f"SIGTERM: state saved in {self.out}; run the same command to resume")
            return 0
        finally:
            self.metrics.close()
        self.log(format_table(self.metrics.read("iteration")))
        return 0

    def _offline_pairs(self, t: int, ref_params, flag: _SigtermFlag) -> None:
        """y_ref = the start policy's greedy response to every training row (each host generates
        for the rows its devices hold), and judge.json's pairs = the rows' own (chosen,
        rejected), written by process 0 from the records the hosts shared."""
        d = self._iter_dir(t)
        n = self.prompts.training_size()
        if not (d / "generate.safetensors").exists():
            out, recs = self._gen(ref_params, n, self.prompts.training_rows, key=jax.random.fold_in(self.key, 11),
                                  n=1, greedy=True, temperature=1.0, flag=flag, desc="y_ref (greedy)")
            self._share_records(d / "prompts", recs)
            self._write_arrays(d / "generate.safetensors", out)
        if not (d / "judge.json").exists():
            if is_primary():
                recs = self._shared_records(d / "prompts", n)
                pairs = [{"prompt_index": i, "chosen": _text_of(r["chosen"]), "rejected": _text_of(r["rejected"]),
                          "refresp": i, "chosen_score": 1.0, "rejected_score": 0.0}
                         for i, r in enumerate(recs) if r.get("chosen") and r.get("rejected")]
                write_json(d / "judge.json", {"pairs": pairs, "stats": {"n_pairs": len(pairs)}})
            barrier(f"write {d / 'judge.json'}")
        if not read_json(d / "judge.json")["pairs"]:
            raise DataError(f"{self.cfg.data.prompts_path}: no rows with both chosen and rejected")

    def _truncate_metrics(self, t: int) -> None:
        """Drop metrics of iteration >= t that are recomputed; keep train steps before the last
        checkpoint of iteration t (they are not recomputed)."""
        ckpt_step = self._latest_train_ckpt(t)

        def keep(rec):
            it = rec.get("iteration", 0)
            if it < t:
                return True
            if it > t:
                return False
            if rec.get("kind") in ("train", "sft") and ckpt_step is not None:
                return rec.get("iter_step", 0) <= ckpt_step
            return False

        self.metrics.truncate(keep)

    def _latest_train_ckpt(self, t: int) -> int | None:
        d = (self.out / "sft" / "ckpt") if t == 0 else (self._iter_dir(t) / "ckpt")
        if not d.is_dir() or (self._policy_dir(t)).exists():
            return None
        with Checkpointer(d, create=False) as ck:
            return ck.latest_step()

    # --------------------------------------------------------------------------- iteration 0
    def _iteration_zero(self, flag: _SigtermFlag) -> None:
        if not self._policy_dir(0).exists():
            params = self._initial_params()
            if self.cfg.sft.steps > 0:
                params = self._sft(params, flag)
            self._save_policy(0, params)
        self._evaluate(0, self._load_policy(0), None, flag)

    def _initial_params(self):
        path = self.cfg.init.checkpoint
        if path is None:
            init = jax.jit(lambda k: init_params(self.model_cfg, k), out_shardings=self.params_sharding)
            return init(jax.random.fold_in(self.key, 0))
        if (Path(path) / "config.json").is_file():
            from jaxselm.hf import load_hf_checkpoint

            hf_cfg, params = load_hf_checkpoint(path)
            if hf_cfg.model_dump(exclude={"dtype", "param_dtype", "cope_impl", "remat"}) != \
                    self.model_cfg.model_dump(exclude={"dtype", "param_dtype", "cope_impl", "remat"}):
                raise ConfigError(f"init.checkpoint: {path}/config.json does not match the model "
                                  "section of the run config")
            return jax.device_put(params, self.params_sharding)
        return load_params(path, self._abstract_params())

    def _sft(self, params, flag: _SigtermFlag):
        cfg, sft = self.cfg, self.cfg.sft
        n = self.prompts.demonstration_count()
        rng = np.random.default_rng([cfg.run.seed, 0x5F7])
        order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(sft.steps * sft.batch_size / n) + 1)])
        # This process's rows of every step's global batch: the only demonstrations it reads.
        mine = local_batch_rows(sft.batch_size, self.mesh)
        rows_of = [order[s * sft.batch_size : (s + 1) * sft.batch_size][mine] for s in range(sft.steps)]
        wanted = sorted(set(np.concatenate(rows_of).tolist())) if rows_of else []
        demos = dict(zip(wanted, self.prompts.demonstrations(wanted)))
        longest = max((len(d["prompt_ids"]) + len(d["response_ids"]) for d in demos.values()), default=1)
        longest = process_max(longest)
        ctx = self.model_cfg.max_position_embeddings
        if longest > ctx:
            raise DataError(f"sft: a demonstration has {longest} tokens (prompt + response), over the model "
                            f"context model.max_position_embeddings={ctx}; lower data.max_prompt_tokens or "
                            "online.max_new_tokens")
        length = bucket_length(longest, multiple=8)
        opt_cfg = cfg.train.optimizer.replace(learning_rate=sft.learning_rate, total_steps=sft.steps)
        train_cfg = cfg.train.replace(optimizer=opt_cfg)
        tx = make_optimizer(opt_cfg)
        step_fn = make_sft_step(self.model_cfg, train_cfg, tx, self.mesh)
        ckpt_dir = self.out / "sft" / "ckpt"
        with Checkpointer(ckpt_dir, max_to_keep=2, async_save=cfg.run.async_checkpoints) as ck:
            start = ck.latest_step()
            if start is None:
                state = jax.device_put(create_train_state(params, tx),
                                       abstract_sharding(abstract_train_state(self.model_cfg, tx, self.mesh)))
                start = 0
            else:
                state, _ = ck.restore(abstract_train_state(self.model_cfg, tx, self.mesh), step=start)
            bar = _progress(range(start, sft.steps), total=sft.steps - start, desc="sft", enabled=self.progress)
            for s in bar:
                local = [demos[int(i)] for i in rows_of[s]]
                seqs = _pack([d["prompt_ids"] for d in local], [d["response_ids"] for d in local], length, self.pad)
                batch = make_global_batch({"tokens": seqs.tokens, "mask": seqs.mask, "loss_mask": seqs.loss_mask},
                                          self.mesh, sft.batch_size)
                state, m = step_fn(state, batch)
                if (s + 1) % 25 == 0 or s + 1 == sft.steps:
                    self.metrics.write("sft", s + 1, to_host(m), iteration=0, iter_step=s + 1)
                fault_point(f"sft/step{s + 1}")
                stop = any_process(flag.raised)  # all hosts checkpoint (a collective) together
                if stop or (s + 1) % cfg.online.checkpoint_every == 0:
                    ck.save(state, step=s + 1, metadata={"phase": "sft"})
                    if stop:
                        ck.wait()
                        raise Preempted()
            return state.params

    # ------------------------------------------------------------------------------ iteration
    def _iteration(self, t: int, flag: _SigtermFlag) -> None:
        d = self._iter_dir(t)
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        ref_params = None
        if not self._policy_dir(t).exists():
            ref_params = self._load_policy(t - 1)  # pi_ref: the iteration-start policy
            if not (d / "generate.safetensors").exists():
                self._generate_phase(t, ref_params, flag)
            if not (d / "judge.json").exists():
                self._judge_phase(t)
            if not (d / "reference.safetensors").exists():
                self._reference_phase(t, ref_params)
            params = self._train_phase(t, ref_params, flag)
            self._save_policy(t, params)
            fault_point(f"iter{t}/saved")
        if ref_params is None:
            ref_params = self._load_policy(t - 1)
        self._evaluate(t, self._load_policy(t), ref_params, flag)
        self.log(f"iteration {t} done in {time.time() - t0:.1f}s")

    def _gen(self, params, count: int, fetch, *, key, n: int, greedy: bool, temperature: float,
             flag: _SigtermFlag | None, desc: str) -> tuple[dict[str, np.ndarray], dict[int, dict[str, Any]]]:
        """generate() for ``count`` prompts over fixed-size global batches (the last one padded with
        one-token prompts whose outputs are dropped). ``fetch(positions)`` reads prompt records; each process reads
        only the rows of each batch that its devices hold. Returns the outputs of all prompts on
        every process (with the left-padded prompts: ``prompt_tokens``, ``prompt_lengths``) and
        the records this process read, by position."""
        o = self.cfg.online
        bs = min(o.generation_batch_size, count)
        nb = math.ceil(count / bs)
        mine = local_batch_rows(bs, self.mesh)
        positions = [b * bs + mine for b in range(nb)]  # >= count: padding rows of the last batch
        wanted = sorted(int(i) for i in set(np.concatenate(positions).tolist()) if i < count)
        recs = dict(zip(wanted, fetch(wanted)))
        longest = max((len(r["prompt_ids"]) for r in recs.values()), default=1)
        length = bucket_length(process_max(longest), min_length=8)
        filler = [self.pad]  # the prompt of padding rows (outputs dropped; rows do not interact)
        out: dict[str, list[np.ndarray]] = {k: [] for k in ("tokens", "lengths", "finish", "logprobs",
                                                            "prompt_tokens", "prompt_lengths")}
        for b in _progress(range(nb), total=nb, desc=desc, enabled=self.progress):
            toks = np.full((len(mine), length), self.pad, np.int32)
            mask = np.zeros((len(mine), length), bool)
            for i, pos in enumerate(positions[b]):
                ids = recs[int(pos)]["prompt_ids"] if pos < count else filler
                toks[i, length - len(ids):] = ids
                mask[i, length - len(ids):] = True
            batch = make_global_batch({"tokens": toks, "mask": mask}, self.mesh, bs)
            res = generate(params, self.model_cfg, batch["tokens"], batch["mask"], rng=jax.random.fold_in(key, b),
                           max_new_tokens=o.max_new_tokens, n=n, greedy=greedy, temperature=temperature,
                           top_k=0 if greedy else o.top_k, top_p=1.0 if greedy else o.top_p,
                           min_p=0.0 if greedy else o.min_p,
                           stop_token_ids=() if self.eos is None else (self.eos,), pad_id=self.pad,
                           mesh=self.mesh)
            res, prompts = to_host((res, batch))
            real = min(bs, count - b * bs)
            out["tokens"].append(np.asarray(res.tokens)[:real])
            out["lengths"].append(np.asarray(res.lengths)[:real])
            out["finish"].append(np.asarray(res.finish_reason)[:real])
            out["logprobs"].append(np.asarray(res.logprobs)[:real])
            out["prompt_tokens"].append(np.asarray(prompts["tokens"], np.int32)[:real])
            out["prompt_lengths"].append(np.asarray(prompts["mask"]).sum(-1).astype(np.int32)[:real])
            if flag is not None:
                self._check_preempt(flag)
        return {k: np.concatenate(v) for k, v in out.items()}, recs

    @staticmethod
    def _prompt_ids(gen: dict[str, np.ndarray]) -> list[list[int]]:
        """The prompts of a _gen output (left-padded rows back to id lists)."""
        toks, lens = gen["prompt_tokens"], gen["prompt_lengths"]
        width = toks.shape[1]
        return [list(map(int, toks[i, width - int(lens[i]):])) for i in range(toks.shape[0])]

    def _share_records(self, d: Path, recs: dict[int, dict[str, Any]]) -> None:
        """Each process writes the prompt records it read (what the judge needs) to
        ``d/part-<process>.json``; process 0 merges them with :meth:`_shared_records`."""
        keep = ("id", "prompt", "chosen", "rejected")
        write_json(d / f"part-{jax.process_index():05d}.json",
                   [{"position": int(p), **{k: r[k] for k in keep if k in r}} for p, r in sorted(recs.items())])
        barrier(f"shared {d}")

    @staticmethod
    def _shared_records(d: Path, count: int) -> list[dict[str, Any]]:
        by_position: dict[int, dict[str, Any]] = {}
        for part in sorted(d.glob("part-*.json")):
            for rec in read_json(part):
                by_position[int(rec["position"])] = rec
        missing = [i for i in range(count) if i not in by_position]
        if missing:
            raise JaxselmError(f"{d}: no host wrote the prompt record at position {missing[0]} "
                               f"({len(missing)} of {count} missing)")
        return [by_position[i] for i in range(count)]

    def _responses(self, tokens: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
        """Token ids of each generated response (stop token included)."""
        return [list(map(int, tokens[i, : lengths[i]])) for i in range(tokens.shape[0])]

    def _text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _generate_phase(self, t: int, params, flag) -> None:
        o = self.cfg.online
        key = jax.random.fold_in(jax.random.fold_in(self.key, t), 1)
        out, recs = self._gen(params, self.prompts.iteration_size(t), lambda pos: self.prompts.iteration(t, pos),
                              key=key, n=o.samples_per_prompt, greedy=o.greedy, temperature=o.temperature,
                              flag=flag, desc=f"iter {t} generate")
        self._share_records(self._iter_dir(t) / "prompts", recs)  # before generate.safetensors (resume)
        fault_point(f"iter{t}/generate")
        self._write_arrays(self._iter_dir(t) / "generate.safetensors", out)

    def _judge_phase(self, t: int) -> None:
        """Judging runs on process 0 only (one set of judge calls, one answer even for a judge
        that is not deterministic); the others wait and read judge.json."""
        if is_primary():
            recs = self._shared_records(self._iter_dir(t) / "prompts", self.prompts.iteration_size(t))
            self._judge_phase_primary(t, recs)
        barrier(f"write {self._iter_dir(t) / 'judge.json'}")

    def _judge_phase_primary(self, t: int, recs) -> None:
        o = self.cfg.online
        gen = read_arrays(self._iter_dir(t) / "generate.safetensors")
        p, n, m = gen["tokens"].shape
        flat_tokens = gen["tokens"].reshape(p * n, m)
        flat_len = gen["lengths"].reshape(p * n)
        responses = self._responses(flat_tokens, flat_len)
        texts = [self._text(r) for r in responses]
        prompts = [r["prompt"] for r in recs for _ in range(n)]
        self.judge.reset_stats()
        scores = np.full(p * n, np.nan)
        # Whole prompts per call: a pairwise LLM judge ranks the responses of a prompt together.
        chunk = n * max(1, 256 // n)
        for s in _progress(range(0, p * n, chunk), total=math.ceil(p * n / chunk),
                           desc=f"iter {t} judge", enabled=self.progress):
            scores[s : s + chunk] = self.judge.score(prompts[s : s + chunk], texts[s : s + chunk])
        fault_point(f"iter{t}/judge")
        scores = scores.reshape(p, n)
        ds_chosen = ds_rejected = None
        ds_scores = None
        if o.include_dataset_responses and recs and "chosen" in recs[0]:
            ds_chosen = [str(r.get("chosen") or "") for r in recs]
            ds_rejected = [str(r.get("rejected") or "") for r in recs]
            ds = self.judge.score([r["prompt"] for r in recs] * 2, ds_chosen + ds_rejected)
            ds_scores = np.stack([ds[:p], ds[p:]], axis=1)
        eos_flags = (gen["finish"] == 0)
        rng = np.random.default_rng([self.cfg.run.seed, t, 0xFA1])
        pairs, stats = build_pairs(
            [r["prompt"] for r in recs], [[i * n + j for j in range(n)] for i in range(p)], scores,
            dataset_chosen=ds_chosen, dataset_rejected=ds_rejected, dataset_scores=ds_scores,
            min_margin=o.min_margin, no_eos_penalty=o.no_eos_penalty, eos_flags=eos_flags,
            refresp_choice=o.refresp, rng=rng,
        )
        sample_ids = [responses[i] for i in range(p * n)]
        stats = {**stats, "distinct_1": distinct_n(sample_ids, 1), "distinct_2": distinct_n(sample_ids, 2),
                 "sample_length": float(np.mean(flat_len)),
                 "eos_rate": float(np.mean(eos_flags)),
                 **{f"judge_{k}": v for k, v in self.judge.stats().items()}}
        write_json(self._iter_dir(t) / "judge.json", {
            "scores": np.where(np.isnan(scores), None, scores).tolist(),
            "pairs": [pair_to_json(x) for x in pairs],
            "stats": stats,
        })

    def _pairs(self, t: int) -> _Pairs:
        gen = read_arrays(self._iter_dir(t) / "generate.safetensors")
        p, n, m = gen["tokens"].shape
        flat = self._responses(gen["tokens"].reshape(p * n, m), gen["lengths"].reshape(p * n))
        return _Pairs(read_json(self._iter_dir(t) / "judge.json")["pairs"], self._prompt_ids(gen), flat,
                      self.prompts.encode_response, self.pad)

    def _reference_fn(self):
        if self._ref_fn is None:
            self._ref_fn = make_reference_fn(self.model_cfg, self.mesh)
        return self._ref_fn

    def _reference_phase(self, t: int, ref_params) -> None:
        pairs = self._pairs(t)
        npairs = len(pairs)
        bs = self.cfg.online.batch_size
        out = {f"ref_{k}_logps": np.zeros(npairs, np.float32) for k in ("chosen", "rejected", "refresp")}
        fn = self._reference_fn()
        mine = local_batch_rows(bs, self.mesh)
        for s in range(0, npairs, bs):
            rows = (np.arange(s, s + bs) % npairs)[mine]  # fixed batch shape; wrapped rows are discarded
            res = to_host(fn(ref_params, make_global_batch(pairs.batch(rows), self.mesh, bs)))
            real = min(bs, npairs - s)
            for k in out:
                out[k][s : s + real] = np.asarray(res[k])[:real]
        self._write_arrays(self._iter_dir(t) / "reference.safetensors", out)

    def _train_phase(self, t: int, start_params, flag: _SigtermFlag):
        cfg, o = self.cfg, self.cfg.online
        pairs = self._pairs(t)
        npairs = len(pairs)
        if npairs == 0:
            self.log(f"iteration {t}: no preference pairs (all ties?) - policy unchanged")
            return start_params
        ref = read_arrays(self._iter_dir(t) / "reference.safetensors")
        bs = o.batch_size
        steps_per_epoch = math.ceil(npairs / bs)
        total = steps_per_epoch * o.epochs
        rng = np.random.default_rng([cfg.run.seed, t, 0x7A1])
        order = np.concatenate([np.resize(rng.permutation(npairs), steps_per_epoch * bs) for _ in range(o.epochs)])
        opt_cfg = cfg.train.optimizer.replace(learning_rate=o.learning_rate(t), total_steps=total)
        train_cfg = cfg.train.replace(optimizer=opt_cfg, alpha=o.alpha(t, cfg.train.alpha))
        tx = make_optimizer(opt_cfg)
        step_fn = make_preference_step(self.model_cfg, train_cfg, tx, self.mesh)
        needed = responses_for(train_cfg.loss)
        mine = local_batch_rows(bs, self.mesh)  # this process's rows of each global batch
        with Checkpointer(self._iter_dir(t) / "ckpt", max_to_keep=2,
                          async_save=cfg.run.async_checkpoints) as ck:
            start = ck.latest_step()
            target = abstract_train_state(self.model_cfg, tx, self.mesh)
            if start is None:
                # A copy: the step donates its state, and start_params (pi_ref) is used again.
                fresh = jax.tree.map(jnp.copy, start_params)
                state = jax.device_put(create_train_state(fresh, tx), abstract_sharding(target))
                start = 0
            else:
                state, _ = ck.restore(target, step=start)
            for s in _progress(range(start, total), total=total - start, desc=f"iter {t} train",
                               enabled=self.progress):
                rows = order[s * bs : (s + 1) * bs][mine]
                batch = pairs.batch(rows, needed)
                for name in needed:
                    batch[f"ref_{name}_logps"] = ref[f"ref_{name}_logps"][rows]
                state, m = step_fn(state, make_global_batch(batch, self.mesh, bs))
                self.metrics.write("train", s + 1, to_host(m), iteration=t, iter_step=s + 1)
                fault_point(f"iter{t}/train/step{s + 1}")
                stop = any_process(flag.raised)  # all hosts checkpoint (a collective) together
                if stop or (s + 1) % o.checkpoint_every == 0:
                    ck.save(state, step=s + 1, metadata={"iteration": t, "phase": "train"})
                    if stop:
                        ck.wait()
                        raise Preempted()
            return state.params

    # ---------------------------------------------------------------------------- evaluation
    def _evaluate(self, t: int, params, ref_params, flag: _SigtermFlag) -> None:
        """Greedy responses on held-out prompts: judge reward, accuracy, win rate vs t-1; KL to
        pi_ref from temperature-1 samples; diversity and length; training summaries."""
        path = self._iter_dir(t) / "eval.json"
        if path.exists():  # done before a kill: re-emit its metrics record (truncated on resume)
            self.metrics.write("iteration", t, read_json(path)["metrics"], iteration=t)
            return
        count = self.prompts.evaluation_size()
        key = jax.random.fold_in(jax.random.fold_in(self.key, t), 2)
        greedy, recs = self._gen(params, count, self.prompts.evaluation, key=key, n=1, greedy=True,
                                 temperature=1.0, flag=None, desc=f"iter {t} eval")
        self._share_records(self._iter_dir(t) / "eval_prompts", recs)
        # The texts the judge reads (process 0 only; the others' rows are NaN, never written).
        prompts = ([r["prompt"] for r in self._shared_records(self._iter_dir(t) / "eval_prompts", count)]
                   if is_primary() else [""] * count)
        prompt_ids = self._prompt_ids(greedy)
        resp = self._responses(greedy["tokens"][:, 0], greedy["lengths"][:, 0])
        texts = [self._text(r) for r in resp]
        scores = self._eval_score(prompts, texts)
        row: dict[str, Any] = {
            "eval/reward": float(np.nanmean(scores)) if np.isfinite(scores).any() else None,
            "eval/accuracy": float(np.mean(scores >= 1.0 - 1e-9)),
            "eval/length": float(np.mean([len(r) for r in resp])),
            "eval/distinct_2": distinct_n(resp, 2),
        }
        # One temperature-1 sample per prompt: the policy's own distribution (what the preference
        # updates move), its accuracy, and KL(pi || pi_ref) ~ E_y~pi[log pi(y|x) - log pi_ref(y|x)].
        sampled, _ = self._gen(params, count, lambda pos: [recs[int(i)] for i in pos],
                               key=jax.random.fold_in(key, 1), n=1, greedy=False, temperature=1.0, flag=None,
                               desc=f"iter {t} sample")
        s_resp = self._responses(sampled["tokens"][:, 0], sampled["lengths"][:, 0])
        s_texts = [self._text(r) for r in s_resp]
        s_scores = self._eval_score(prompts, s_texts)
        row["eval/sample_reward"] = float(np.nanmean(s_scores)) if np.isfinite(s_scores).any() else None
        row["eval/sample_accuracy"] = float(np.mean(s_scores >= 1.0 - 1e-9))
        if t > 0:  # against the previous iteration's policy, on the same prompts
            prev = read_json(self._iter_dir(t - 1) / "eval.json")
            for key_, cur, old in (("eval/win_rate", texts, prev["responses"]),
                                   ("eval/sample_win_rate", s_texts, prev.get("sampled_responses"))):
                if old is not None:
                    wins = (self.judge.compare_batch(prompts, cur, old) if is_primary()
                            else np.full(len(prompts), np.nan))
                    row[key_] = float(np.nanmean(wins)) if np.isfinite(wins).any() else None
            logp_pol = sampled["logprobs"][:, 0].sum(-1)
            logp_ref = self._sequence_logps(ref_params, prompt_ids, s_resp)
            row["eval/kl"] = float(np.mean(logp_pol - logp_ref))
            judge = read_json(self._iter_dir(t) / "judge.json")["stats"]
            row.update({f"samples/{k}": v for k, v in judge.items() if isinstance(v, (int, float))})
            train = [r for r in self.metrics.read("train") if r.get("iteration") == t]
            if train:
                for k in ("loss", "rewards/accuracies", "rewards/margins", "selm/exploration"):
                    vals = [r[k] for r in train if r.get(k) is not None]
                    if vals:
                        row[f"train/{k.replace('/', '_')}"] = float(np.mean(vals))
        fault_point(f"iter{t}/eval")
        self._write_json(path, {"metrics": row, "responses": texts, "sampled_responses": s_texts})
        self.metrics.write("iteration", t, row, iteration=t)

    def _eval_score(self, prompts: list[str], texts: list[str]) -> np.ndarray:
        """Judge scores on process 0; the others' evaluation rows are never written (NaN)."""
        if is_primary():
            return self.judge.score(prompts, texts)
        return np.full(len(texts), np.nan)

    def _sequence_logps(self, params, prompts: list[list[int]], responses: list[list[int]]) -> np.ndarray:
        seqs = _Pairs([{"prompt_index": i, "chosen": i, "rejected": i, "refresp": i} for i in range(len(prompts))],
                      prompts, responses, self.prompts.encode_response, self.pad)
        fn = self._reference_fn()
        bs = self.cfg.online.batch_size
        mine = local_batch_rows(bs, self.mesh)
        n = len(prompts)
        out = np.zeros(n, np.float32)
        for s in range(0, n, bs):
            rows = (np.arange(s, s + bs) % n)[mine]
            res = to_host(fn(params, make_global_batch(seqs.batch(rows), self.mesh, bs)))
            real = min(bs, n - s)
            out[s : s + real] = np.asarray(res["ref_chosen_logps"])[:real]
        return out


def _quiet(*args, **kwargs) -> None:
    """The log function of processes other than 0."""


def build_judge(cfg: RunConfig, model_cfg: ModelConfig, tokenizer):
    """The run's judge; a reward-model judge's checkpoint is loaded here (an HF
    LlamaForSequenceClassification directory, or a params export from `jaxselm train-rm`, which
    shares the run's model config)."""
    jc = cfg.judge
    if not isinstance(jc, RewardModelJudgeConfig):
        return make_judge(jc)
    if jc.checkpoint is None:
        raise ConfigError("judge.checkpoint: the reward_model judge needs a checkpoint directory")
    path = Path(jc.checkpoint)
    if (path / "config.json").is_file():
        from jaxselm.hf import load_hf_checkpoint

        rm_cfg, params = load_hf_checkpoint(path, head="reward")
    elif path.is_dir():
        # With several processes each loads its own copy onto its first local device (only
        # process 0 calls the judge; jax.devices()[0], the default, belongs to process 0 alone).
        mesh = single_device_mesh(jax.local_devices()[0]) if jax.process_count() > 1 else None
        rm_cfg, params = model_cfg, load_params(path, mesh=mesh)
    else:
        raise ConfigError(f"judge.checkpoint: not found: {path}")
    return make_judge(jc, params=params, model_config=rm_cfg, tokenizer=tokenizer, pad_id=tokenizer.pad_id)


def abstract_sharding(abstract_state):
    return jax.tree.map(lambda s: s.sharding, abstract_state)


def pair_to_json(pair) -> dict[str, Any]:
    """A pair from build_pairs as JSON: sample references are flat sample indices (ints),
    dataset responses are their text."""
    return {
        "prompt_index": int(pair.prompt_index),
        "chosen": _ref(pair.chosen),
        "rejected": _ref(pair.rejected),
        "refresp": _ref(pair.ref),
        "chosen_score": float(pair.chosen_score),
        "rejected_score": float(pair.rejected_score),
    }


def _ref(x):
    if isinstance(x, (int, np.integer)):
        return int(x)
    return str(x)


_TABLE_COLS = [
    ("iter", "iteration", "{:>4d}"),
    ("sample-acc", "eval/sample_accuracy", "{:>10.3f}"),
    ("greedy-acc", "eval/accuracy", "{:>10.3f}"),
    ("reward", "eval/sample_reward", "{:>7.3f}"),
    ("win-rate", "eval/sample_win_rate", "{:>8.3f}"),
    ("pairs", "samples/n_pairs", "{:>5.0f}"),
    ("margin", "samples/mean_margin", "{:>6.3f}"),
    ("loss", "train/loss", "{:>7.4f}"),
    ("rwd-acc", "train/rewards_accuracies", "{:>7.3f}"),
    ("KL", "eval/kl", "{:>7.3f}"),
    ("len", "eval/length", "{:>5.1f}"),
    ("dist-2", "samples/distinct_2", "{:>6.3f}"),
]
# eval/accuracy, eval/reward, eval/win_rate: greedy responses; eval/sample_*: one temperature-1
# sample per prompt (the policy's distribution). Win rates are against the previous iteration.


def format_table(records: list[dict[str, Any]]) -> str:
    """The per-iteration table the CLI prints at the end of a run."""
    head = " | ".join(name for name, _, _ in _TABLE_COLS)
    lines = [head, "-" * len(head)]
    for r in sorted(records, key=lambda r: r["iteration"]):
        cells = []
        for name, key, fmt in _TABLE_COLS:
            v = r.get(key)
            width = len(name)
            cells.append(fmt.format(v).rjust(width) if v is not None else "-".rjust(width))
        lines.append(" | ".join(cells))
    return "\n".join(lines)
