"""Preemption: SIGTERM as a flag polled at safe points, and named fault points for the kill tests.

Cloud TPU preemption (and most schedulers) sends SIGTERM, then SIGKILL a while later. Long work
runs inside ``with SigtermFlag() as flag:`` and polls ``flag.raised`` at step or batch boundaries
(agreed by every process, :func:`jaxselm.parallel.multihost.any_process`); at the first one after
the signal it saves what it must and raises :class:`Preempted`, which the CLI turns into exit 0.

``fault_point(name)`` is the hook the resume tests use: with ``JAXSELM_FAULT_AT=<name>`` in the
environment the process sends itself SIGKILL there (or the signal named by
``JAXSELM_FAULT_SIGNAL``, e.g. ``TERM``), so a kill lands at an exact point on any machine speed.
Every phase of an online iteration ends with the point ``iter<t>/<phase>/done``.
"""

from __future__ import annotations

import os
import signal
import time

ENV_FAULT_AT = "JAXSELM_FAULT_AT"
ENV_FAULT_SIGNAL = "JAXSELM_FAULT_SIGNAL"


class Preempted(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised at a safe point after SIGTERM; the state is saved and the run resumes later."""


class SigtermFlag:
    """Turns SIGTERM into ``self.raised`` while the ``with`` block runs (main thread only)."""

    def __init__(self) -> None:
        self.raised = False
        self._old = None

    def __enter__(self) -> SigtermFlag:
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
    """Signal this process at ``name`` when ``JAXSELM_FAULT_AT`` names it (a comma-separated
    list of names; tests only). ``JAXSELM_FAULT_SIGNAL=SLEEP`` pauses 5 s there instead: one
    host of a pair arriving late, which must not change any decision the hosts take."""
    if name in os.environ.get(ENV_FAULT_AT, "").split(","):
        what = os.environ.get(ENV_FAULT_SIGNAL, "KILL")
        if what == "SLEEP":
            time.sleep(5.0)
            return
        os.kill(os.getpid(), getattr(signal, "SIG" + what))
