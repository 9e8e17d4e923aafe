"""Test setup: 8 host CPU devices (so sharding is tested), CPU only, before jax is imported."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the session, shared by the worker processes tests start (they
# inherit the environment): many tests compile the same tiny-model programs again (each resumed
# run of the resume tests, each run of the demo config), and a hit reads the executable back
# instead of compiling it (the every-phase resume test: 406 -> 239 s on the 2-core box). Fresh per
# session, so nothing carries over between runs; a JAX_COMPILATION_CACHE_DIR already set wins.
_XLA_CACHE = tempfile.mkdtemp(prefix="jaxselm-tests-xla-cache-")
atexit.register(shutil.rmtree, _XLA_CACHE, True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# chex.variants reads absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()

assert jax.device_count() == 8, "tests expect 8 host CPU devices (XLA_FLAGS set too late?)"


# JAXSELM_NO_SKIP=<test module paths, comma-separated>: a skip in those modules is a failure (CI
# sets it so that a missing reference - torch, transformers, the SmolLM2 wheel - cannot turn the
# parity and real-model checks into silent skips).
_NO_SKIP = tuple(p.strip() for p in os.environ.get("JAXSELM_NO_SKIP", "").split(",") if p.strip())


def _must_not_skip(report, node: str) -> None:
    if _NO_SKIP and report.skipped and node in _NO_SKIP:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, but JAXSELM_NO_SKIP says it must run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    _must_not_skip(report, report.nodeid.split("::")[0])


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    _must_not_skip(report, report.nodeid)  # a module-level importorskip
