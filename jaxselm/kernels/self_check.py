"""The mechanics of ``impl="auto"``'s self-check, shared by CoPE and plain attention: run a
kernel and the ``xla`` reference on a small problem (forward and gradients), compare, and do it
outside any jit trace the caller may be in. What problem to run stays with each entry point."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable

import jax
import numpy as np


def relative_error(got: jax.Array, want: jax.Array) -> float:
    """max |got - want| / max |want| in float64 (1e-6 keeps an all-zero reference finite)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-6))


def compare_with_xla(
    run: Callable[[str], dict[str, jax.Array]], name: str, tol: float
) -> tuple[bool, str]:
    """``run(impl)`` -> {output or gradient name: array}; whether ``name`` agrees with ``xla``
    within ``tol`` everywhere (relative), and the worst difference in words."""
    got, want = run(name), run("xla")
    errors = {k: relative_error(got[k], want[k]) for k in want}
    worst = max(errors, key=errors.get)
    ok = all(np.isfinite(e) and e <= tol for e in errors.values())
    return ok, f"{worst} differs from xla by {errors[worst]:.3g} (relative, tolerance {tol:g})"


def run_outside_trace(check: Callable[[], tuple[bool, str]], thread: str) -> tuple[bool, str]:
    """``check()`` in a thread of its own: JAX's trace state is per thread, so the check compiles
    and runs now even when the caller is inside a jit trace (the model calls the attention entry
    points while tracing). Any failure to compile or run counts as a failed check."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=thread) as pool:
        try:
            return pool.submit(check).result()
        except Exception as err:  # noqa: BLE001 - any compile/run failure means: do not use it
            return False, f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
