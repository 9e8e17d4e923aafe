"""Run metrics: one JSONL file (the source of truth), TensorBoard event files, and a plot.

Only process 0 writes (multi-host runs call every method on every host; the others do nothing).
JSONL lines are appended and flushed one by one; on resume the lines of steps/iterations that are
recomputed are dropped first (:meth:`MetricsWriter.truncate`), so the file of a resumed run equals
that of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax

from jaxselm import metric_names as M
from jaxselm.files import atomic_write, write_text


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsWriter:
    def __init__(self, out_dir: str | os.PathLike, *, tensorboard: bool = True):
        self.dir = Path(out_dir)
        self.path = self.dir / "metrics.jsonl"
        self.enabled = jax.process_index() == 0
        self._tb = None
        self._want_tb = tensorboard
        if self.enabled:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _writer(self):
        if self._tb is None and self._want_tb:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"), flush_secs=10)
        return self._tb

    def truncate(self, keep) -> None:
        """Drop JSONL records for which ``keep(record)`` is False (used when resuming)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if keep(rec):
                kept.append(line)
        write_text(self.path, "".join(f"{x}\n" for x in kept))

    def write(self, kind: str, step: int, values: dict[str, Any], **tags: Any) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": int(step), **tags, **{k: _clean(v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
        tb = self._writer()
        if tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    tb.add_scalar(f"{kind}/{k}", v, int(step))

    def read(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if kind is None or rec.get("kind") == kind:
                out.append(rec)
        return out

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def plot_iterations(records: list[dict[str, Any]], path: str | os.PathLike, *, keys=None) -> None:
    """A PNG with one panel per metric, x = iteration (0 = the starting policy)."""
    # A bare Figure (no pyplot): renders with Agg without switching the caller's backend
    # (a notebook keeps its inline plots).
    from matplotlib.figure import Figure

    keys = keys or [
        M.EVAL_SAMPLE_ACCURACY,
        M.EVAL_ACCURACY,
        M.EVAL_SAMPLE_REWARD,
        M.EVAL_SAMPLE_WIN_RATE,
        M.EVAL_KL,
    ]
    keys = [k for k in keys if any(r.get(k) is not None for r in records)]
    if not keys:
        return
    fig = Figure(figsize=(4 * len(keys), 3.2))
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["iteration"], r[key]) for r in records if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def distinct_n(sequences: list[list[int]], n: int) -> float:
    """Distinct-n: unique n-grams / all n-grams over a set of responses (diversity)."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# The per-iteration table the CLI prints at the end of a run: (header, metric, format).
# eval/accuracy, eval/reward, eval/win_rate: greedy responses; eval/sample_*: one sample per
# prompt at online.temperature (the distribution the loop samples from). Win rates are against
# the previous iteration.
TABLE_COLUMNS = [
    ("iter", "iteration", "{:>4d}"),
    ("sample-acc", M.EVAL_SAMPLE_ACCURACY, "{:>10.3f}"),
    ("greedy-acc", M.EVAL_ACCURACY, "{:>10.3f}"),
    ("reward", M.EVAL_SAMPLE_REWARD, "{:>7.3f}"),
    ("win-rate", M.EVAL_SAMPLE_WIN_RATE, "{:>8.3f}"),
    ("pairs", M.samples_name("n_pairs"), "{:>5.0f}"),
    ("margin", M.samples_name("mean_margin"), "{:>6.3f}"),
    ("loss", M.train_summary_name(M.LOSS), "{:>7.4f}"),
    ("rwd-acc", M.train_summary_name(M.REWARDS_ACCURACIES), "{:>7.3f}"),
    ("KL", M.EVAL_KL, "{:>7.3f}"),
    ("len", M.EVAL_LENGTH, "{:>5.1f}"),
    ("dist-2", M.samples_name("distinct_2"), "{:>6.3f}"),
]


def phase_times(records: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """{iteration: {phase: seconds}} from the metrics file's "time" records."""
    out: dict[int, dict[str, float]] = {}
    for r in records:
        phases = {k.removesuffix("_s"): v for k, v in r.items() if k.endswith("_s")}
        out.setdefault(int(r["iteration"]), {}).update(phases)
    return out


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value).strip()


def format_table(
    records: list[dict[str, Any]], times: dict[int, dict[str, float]] | None = None
) -> str:
    """The per-iteration table of ``records`` (the metrics file's "iteration" records), with the
    iteration's wall time and its largest phases when ``times`` (:func:`phase_times`) is given."""
    columns = TABLE_COLUMNS + ([("time", "time", "{:.1f}")] if times else [])
    rows = []
    for r in sorted(records, key=lambda r: r["iteration"]):
        if times:
            r = {**r, "time": sum(times.get(r["iteration"], {}).values()) or None}
        rows.append([_cell(r.get(key), fmt) for _, key, fmt in columns])
    widths = [max(len(c[0]), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    head = " | ".join(name.rjust(w) for (name, _, _), w in zip(columns, widths))
    lines = [head, "-" * len(head)]
    lines += [" | ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    if times:
        lines.append(
            "time: seconds of this process per iteration; by phase: "
            + "; ".join(
                f"{t}: "
                + ", ".join(f"{k} {v:.1f}" for k, v in sorted(p.items(), key=lambda x: -x[1]))
                for t, p in sorted(times.items())
            )
        )
    return "\n".join(lines)
