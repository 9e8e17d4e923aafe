"""The phases of a run, each a function of typed inputs that writes its output file atomically.

    params = initial_params(ctx)                         # random init or init.checkpoint
    params = sft(ctx, params)                            # sft/ckpt, metrics "sft"
    gen = generate(ctx, t, pi_ref)                       # iter_t/generate.safetensors
    judge(ctx, t, gen)                                   # iter_t/judge.json (process 0)
    pairs = load_pairs(ctx, t)                           # PairSet: judge.json's pairs as ids
    ref = reference(ctx, t, pairs, pi_ref)               # iter_t/reference.safetensors
    params = train(ctx, t, pairs, ref, pi_ref)           # iter_t/ckpt, metrics "train"
    ctx.save_policy(t, params)                           # policy/iter_t

(evaluation: :mod:`jaxselm.online.evaluation`). Phases decide nothing about resuming: the
orchestrator (:mod:`jaxselm.online.loop`) skips a phase whose output exists and otherwise runs it
from its start (generation and judging, with the same keys) or from its last checkpoint
(training, through :class:`~jaxselm.train.driver.TrainLoop`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from jaxselm.data.packing import (
    SEQUENCE_MULTIPLE,
    LogProbs,
    bucket_length,
    pack_sequences,
    take_rows,
)
from jaxselm.errors import DataError
from jaxselm.feedback import build_pairs, score_samples
from jaxselm.files import read_arrays, read_json, write_json
from jaxselm.metric_names import samples_name
from jaxselm.model import init_params
from jaxselm.online.context import RunContext
from jaxselm.online.metrics import distinct_n
from jaxselm.online.pairs import PairSet, pair_to_json
from jaxselm.online.prompts import count_long, text_of
from jaxselm.online.rollout import Generation, rollout, share_records, shared_records
from jaxselm.parallel.multihost import (
    barrier,
    is_primary,
    local_batch_rows,
    make_global_batch,
    process_max,
    to_host,
)
from jaxselm.preemption import fault_point
from jaxselm.train import TrainConfig, make_optimizer, make_sft_step
from jaxselm.train.driver import TrainLoop, progress
from jaxselm.train.objectives import train_responses
from jaxselm.train.step import preference_hyper

GENERATE, JUDGE, REFERENCE = "generate.safetensors", "judge.json", "reference.safetensors"
REFRESP = "refresp.safetensors"  # greedy y_ref responses (online.refresp: greedy)
JUDGE_CHUNK = 256  # responses per judge call (whole prompts: a pairwise judge ranks them together)


def initial_params(ctx: RunContext) -> Any:
    """The starting policy: ``init.checkpoint`` (checked against the model section) or random."""
    path = ctx.cfg.init.checkpoint
    if path is not None:
        return ctx.load_params(path)
    init = jax.jit(lambda k: init_params(ctx.model, k), out_shardings=ctx.params_sharding)
    return init(jax.random.fold_in(ctx.key, 0))


def sft(ctx: RunContext, params: Any) -> Any:
    """The warm start: ``sft.steps`` next-token steps on demonstrations (each host reads only the
    demonstrations of the rows its devices hold)."""
    cfg, s = ctx.cfg, ctx.cfg.sft
    n = ctx.prompts.demonstration_count()
    rng = ctx.rng(0x5F7)
    order = np.concatenate(
        [rng.permutation(n) for _ in range(math.ceil(s.steps * s.batch_size / n) + 1)]
    )
    mine = local_batch_rows(s.batch_size, ctx.mesh)
    rows_of = [order[i * s.batch_size : (i + 1) * s.batch_size][mine] for i in range(s.steps)]
    wanted = sorted(set(np.concatenate(rows_of).tolist())) if rows_of else []
    demos = dict(zip(wanted, ctx.prompts.demonstrations(wanted)))
    longest = process_max(
        max((len(d["prompt_ids"]) + len(d["response_ids"]) for d in demos.values()), default=1)
    )
    limit = ctx.model.max_position_embeddings
    if longest > limit:
        raise DataError(
            f"sft: a demonstration has {longest} tokens (prompt + response), over the "
            f"model context model.max_position_embeddings={limit}; lower "
            "data.max_prompt_tokens or online.max_new_tokens"
        )
    length = bucket_length(longest, multiple=SEQUENCE_MULTIPLE)
    opt = cfg.train.optimizer.replace(learning_rate=s.learning_rate, total_steps=s.steps)
    tx = make_optimizer(opt)
    step = make_sft_step(ctx.model, cfg.train.replace(optimizer=opt), tx, ctx.mesh)

    def batch_at(i: int):
        local = [demos[int(r)] for r in rows_of[i]]
        seqs = pack_sequences(
            [d["prompt_ids"] for d in local],
            [d["response_ids"] for d in local],
            ctx.pad_id,
            length=length,
            prompt_loss=[d.get("prompt_loss", []) for d in local],
        )
        return make_global_batch(seqs, ctx.mesh, s.batch_size)

    loop = _train_loop(ctx, step, s.steps, "sft", ctx.out / "sft" / "ckpt", {"phase": "sft"})
    loop.add_hook(
        lambda i, m: ctx.metrics.write("sft", i, to_host(m), iteration=0, iter_step=i), every=25
    )
    return loop.run(lambda: params, tx, batch_at).params


def generate(ctx: RunContext, t: int, params: Any) -> Generation:
    """``online.samples_per_prompt`` responses of the policy to each prompt of iteration t, and,
    when y_ref is the greedy response (``online.refresp: greedy``) and the samples are not
    greedy themselves, one greedy response per prompt (refresp.safetensors)."""
    o = ctx.cfg.online
    d = ctx.iter_dir(t)
    key = jax.random.fold_in(jax.random.fold_in(ctx.key, t), 1)
    gen, recs = rollout(
        ctx,
        params,
        ctx.prompts.iteration_size(t),
        lambda pos: ctx.prompts.iteration(t, pos),
        key=key,
        n=o.samples_per_prompt,
        greedy=o.greedy,
        temperature=o.temperature,
        desc=f"iter {t} generate",
        preemptible=True,
    )
    if greedy_refresp(ctx, t):
        ref, _ = rollout(
            ctx,
            params,
            len(gen.lengths),
            lambda pos: [recs[int(i)] for i in pos],
            key=jax.random.fold_in(key, 1),
            n=1,
            greedy=True,
            temperature=1.0,
            desc=f"iter {t} y_ref (greedy)",
            preemptible=True,
        )
        ref.save(d / REFRESP, ctx)
    share_records(d / "prompts", recs)  # before generate.safetensors: resume reads both
    fault_point(f"iter{t}/generate")
    gen.save(d / GENERATE, ctx)
    return gen


def greedy_refresp(ctx: RunContext, t: int) -> bool:
    """Whether iteration t's y_ref is a greedy response generated apart from the samples (not
    when the loss makes no use of y_ref, e.g. SELM with alpha 0)."""
    o = ctx.cfg.online
    used = "refresp" in train_responses(train_config(ctx, t))
    return o.refresp == "greedy" and not o.greedy and used


def train_config(ctx: RunContext, t: int, total_steps: int | None = None) -> TrainConfig:
    """Iteration t's train settings: its learning rate and alpha (and ``total_steps``)."""
    cfg, o = ctx.cfg, ctx.cfg.online
    opt = cfg.train.optimizer.replace(learning_rate=o.learning_rate(t))
    if total_steps is not None:
        opt = opt.replace(total_steps=total_steps)
    return cfg.train.replace(optimizer=opt, alpha=o.alpha(t, cfg.train.alpha))


def judge(ctx: RunContext, t: int, gen: Generation) -> None:
    """Score every response, build best-vs-worst pairs, write judge.json. The judge runs on
    process 0 only (one set of judge calls, one answer even for a judge that is not
    deterministic); the others wait for the file."""
    if is_primary():
        recs = shared_records(ctx.iter_dir(t) / "prompts", ctx.prompts.iteration_size(t))
        write_json(ctx.iter_dir(t) / JUDGE, _judge_records(ctx, t, gen, recs))
    barrier(f"write {ctx.iter_dir(t) / JUDGE}")


def _judge_records(ctx: RunContext, t: int, gen: Generation, recs: list[dict]) -> dict[str, Any]:
    """The judge ranks all candidates of a prompt in ONE call (its samples, and with
    ``online.include_dataset_responses`` the dataset's chosen and rejected responses): a pairwise
    judge compares within a call, and scores of one call are on one scale. Whole prompts are
    sent ``JUDGE_CHUNK`` responses at a time; prompts skipped as too long are not judged."""
    o, judge = ctx.cfg.online, ctx.judge
    p, n = gen.lengths.shape
    responses = gen.responses()
    texts = [ctx.text(r) for r in responses]
    use_ds = o.include_dataset_responses and any("chosen" in r for r in recs)
    ds_chosen = [_text_or_none(r.get("chosen")) for r in recs] if use_ds else None
    ds_rejected = [_text_or_none(r.get("rejected")) for r in recs] if use_ds else None
    scores = np.full((p, n), np.nan)
    ds_scores = np.full((p, 2), np.nan) if use_ds else None
    judged = [i for i, r in enumerate(recs) if not r.get("skipped")]
    per_call = max(1, JUDGE_CHUNK // (n + 2 * use_ds))
    judge.reset_stats()
    begin = getattr(judge, "begin_iteration", None)
    if begin is not None:  # a judge that learns from each iteration (learned_reward_model)
        begin(
            t,
            [recs[i]["prompt"] for i in judged],
            [texts[i * n : (i + 1) * n] for i in judged],
            ctx.iter_dir(t),
            ctx.iter_dir(t - 1) if t > 1 else None,
            ctx.policy_dir(0),
        )
    for s in progress(
        range(0, len(judged), per_call),
        total=math.ceil(len(judged) / per_call),
        desc=f"iter {t} judge",
        enabled=ctx.cfg.run.progress,
    ):
        rows = judged[s : s + per_call]
        got, ds = score_samples(
            judge,
            [recs[i]["prompt"] for i in rows],
            [texts[i * n : (i + 1) * n] for i in rows],
            dataset_chosen=[ds_chosen[i] for i in rows] if use_ds else None,
            dataset_rejected=[ds_rejected[i] for i in rows] if use_ds else None,
        )
        scores[rows] = np.stack(got)
        if use_ds:
            ds_scores[rows] = ds
    fault_point(f"iter{t}/judge")
    eos = gen.finish == 0
    refs = [p * n + i for i in range(p)] if greedy_refresp(ctx, t) else None  # refresp.safetensors
    pairs, stats = build_pairs(
        [r["prompt"] for r in recs],
        [[i * n + j for j in range(n)] for i in range(p)],
        scores,
        dataset_chosen=ds_chosen,
        dataset_rejected=ds_rejected,
        dataset_scores=ds_scores,
        min_margin=o.min_margin,
        no_eos_penalty=o.no_eos_penalty,
        eos_flags=eos,
        refresp_choice="random" if o.refresp == "random" else "first",
        rng=ctx.rng(t, 0xFA1),
        refs=refs,
    )
    stats = {
        **stats,
        **count_long(recs),
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
        "sample_length": float(np.mean(gen.lengths)),
        "eos_rate": float(np.mean(eos)),
        **{f"judge_{k}": v for k, v in judge.stats().items()},
    }
    return {
        "scores": np.where(np.isnan(scores), None, scores).tolist(),
        "pairs": [pair_to_json(x) for x in pairs],
        "stats": stats,
    }


def _text_or_none(x: Any) -> str | None:
    return text_of(x) if x else None


def no_pairs_reason(ctx: RunContext, t: int) -> str:
    """Why iteration t has no pairs, from the judge's counts (judge.json)."""
    st = read_json(ctx.iter_dir(t) / JUDGE)["stats"]
    parts = [
        (st.get("dropped_nan", 0), "with a score the judge could not give (NaN)"),
        (st.get("dropped_ties", 0), "with all scores tied"),
        (st.get("dropped_margin", 0), "below online.min_margin"),
        (st.get("skipped_prompts", 0), "skipped as longer than data.max_prompt_tokens"),
    ]
    said = [f"{int(k)} prompt(s) {why}" for k, why in parts if k]
    if st.get("dropped_nan", 0) and not st.get("dropped_ties", 0):
        failed = int(st.get("judge_failures", 0))
        said.append(
            f"judge failures: {failed}, unparseable replies: {int(st.get('judge_unparseable', 0))}"
        )
    return "; ".join(said) or "no prompts were judged"


def judge_stats(ctx: RunContext, t: int) -> dict[str, float]:
    """Iteration t's generation and judging statistics, named for the iteration record."""
    stats = read_json(ctx.iter_dir(t) / JUDGE)["stats"]
    return {samples_name(k): v for k, v in stats.items() if isinstance(v, (int, float))}


def offline_pairs(ctx: RunContext, t: int, ref_params: Any, *, whole_file: bool) -> None:
    """Offline training data for iteration t: the dataset's own (chosen, rejected) pairs of its
    rows (every training row with ``whole_file``, else iteration t's slice), written by process 0
    as judge.json; and y_ref = pi_ref's greedy response to each row (each host generates for the
    rows its devices hold)."""
    d = ctx.iter_dir(t)
    prompts = ctx.prompts
    if whole_file:
        n, fetch = prompts.training_size(), prompts.training_rows
    else:
        n, fetch = prompts.iteration_size(t), lambda pos: prompts.iteration(t, pos)
    if not ctx.exists(d / GENERATE):
        gen, recs = rollout(
            ctx,
            ref_params,
            n,
            fetch,
            key=jax.random.fold_in(ctx.key, 11),
            n=1,
            greedy=True,
            temperature=1.0,
            desc="y_ref (greedy)",
            preemptible=True,
        )
        share_records(d / "prompts", recs)
        gen.save(d / GENERATE, ctx)
    if not ctx.exists(d / JUDGE):
        if is_primary():
            recs = shared_records(d / "prompts", n)
            pairs = [
                {
                    "prompt_index": i,
                    "chosen": text_of(r["chosen"]),
                    "rejected": text_of(r["rejected"]),
                    "refresp": i,
                    "chosen_score": 1.0,
                    "rejected_score": 0.0,
                }
                for i, r in enumerate(recs)
                if r.get("chosen") and r.get("rejected") and not r.get("skipped")
            ]
            stats = {"n_pairs": len(pairs), "offline": 1, **count_long(recs)}
            write_json(d / JUDGE, {"pairs": pairs, "stats": stats})
        barrier(f"write {d / JUDGE}")
    if not read_json(d / JUDGE)["pairs"]:
        raise DataError(f"{ctx.cfg.data.prompts_path}: no rows with both chosen and rejected")


def load_pairs(ctx: RunContext, t: int) -> PairSet:
    """Iteration t's pairs (judge.json) over its generated token ids (generate.safetensors)."""
    d = ctx.iter_dir(t)
    gen = Generation.load(d / GENERATE)
    samples = gen.responses()
    if ctx.exists(d / REFRESP):  # greedy y_ref, referenced after the samples
        samples += Generation.load(d / REFRESP).responses()
    pairs = read_json(d / JUDGE)["pairs"]
    return PairSet(pairs, gen.prompt_ids(), samples, ctx.prompts.encode_response, ctx.pad_id)


def sequence_logprobs(
    ctx: RunContext, params: Any, pairs: PairSet, names: tuple[str, ...]
) -> LogProbs:
    """Summed log-probs under ``params`` of the responses ``names`` of every pair, in fixed-size
    global batches of ``online.batch_size`` (the last one wraps around; those rows are dropped)."""
    fn = ctx.reference_fn(names)
    bs, n = ctx.cfg.online.batch_size, len(pairs)
    mine = local_batch_rows(bs, ctx.mesh)
    out = {k: np.zeros(n, np.float32) for k in names}
    for s in range(0, n, bs):
        rows = (np.arange(s, s + bs) % n)[mine]
        res = to_host(fn(params, make_global_batch(pairs.batch(rows, names), ctx.mesh, bs)))
        real = min(bs, n - s)
        for k in names:
            out[k][s : s + real] = np.asarray(getattr(res, k))[:real]
    return LogProbs(**out)


def reference(ctx: RunContext, t: int, pairs: PairSet, ref_params: Any) -> LogProbs:
    """pi_ref's log-probs of the responses the loss needs, once per iteration."""
    train = train_config(ctx, t)
    ref = sequence_logprobs(ctx, ref_params, pairs, train_responses(train))
    arrays = {
        f.name: getattr(ref, f.name)
        for f in dataclasses.fields(ref)
        if getattr(ref, f.name) is not None
    }
    ctx.write_arrays(ctx.iter_dir(t) / REFERENCE, arrays)
    return ref


def load_reference(ctx: RunContext, t: int) -> LogProbs:
    return LogProbs(**read_arrays(ctx.iter_dir(t) / REFERENCE))


def train(ctx: RunContext, t: int, pairs: PairSet, ref: LogProbs, ref_params: Any) -> Any:
    """``online.epochs`` passes of the preference loss over the pairs, from pi_ref, with a fresh
    optimizer and iteration t's learning rate and alpha; the new policy's params.

    ``ref_params`` (pi_ref) is consumed: its buffers start the train state, which the step
    donates, so the caller must not use them afterwards (unless no pair was made: then they are
    returned as the new policy)."""
    o = ctx.cfg.online
    n = len(pairs)
    if n == 0:
        ctx.log(
            f"iteration {t}: no preference pairs ({no_pairs_reason(ctx, t)}) - policy unchanged"
        )
        return ref_params
    bs = o.batch_size
    per_epoch = math.ceil(n / bs)
    total = per_epoch * o.epochs
    rng = ctx.rng(t, 0x7A1)
    order = np.concatenate([np.resize(rng.permutation(n), per_epoch * bs) for _ in range(o.epochs)])
    train_cfg = train_config(ctx, t, total)
    tx = make_optimizer(train_cfg.optimizer)  # (the state's structure; values come by hyper)
    step = ctx.preference_step(train_cfg).bind(preference_hyper(train_cfg))
    names = train_responses(train_cfg)
    mine = local_batch_rows(bs, ctx.mesh)  # this process's rows of each global batch

    def batch_at(s: int):
        rows = order[s * bs : (s + 1) * bs][mine]
        batch = pairs.batch(rows, names).replace(ref_logps=take_rows(ref, rows))
        return make_global_batch(batch, ctx.mesh, bs)

    loop = _train_loop(
        ctx,
        step,
        total,
        f"iter {t} train",
        ctx.iter_dir(t) / "ckpt",
        {"iteration": t, "phase": "train"},
        fault_name=f"iter{t}/train",
    )
    loop.add_hook(lambda s, m: ctx.metrics.write("train", s, to_host(m), iteration=t, iter_step=s))
    # No copy: the state takes pi_ref's buffers (one set of weights in memory while training).
    return loop.run(lambda: ref_params, tx, batch_at).params


def _train_loop(
    ctx: RunContext,
    step,
    total: int,
    name: str,
    ckpt,
    metadata: dict,
    fault_name: str | None = None,
) -> TrainLoop:
    return TrainLoop(
        step,
        total,
        name=name,
        fault_name=fault_name,
        checkpoint_dir=ckpt,
        checkpoint_every=ctx.cfg.online.checkpoint_every,
        async_checkpoints=ctx.cfg.run.async_checkpoints,
        stop=ctx.stop,
        show_progress=ctx.cfg.run.progress,
        metadata=metadata,
    )
