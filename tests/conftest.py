"""Test setup: 8 host CPU devices (so sharding is tested), CPU only, before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from absl import flags  # noqa: E402

# chex.variants reads absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()

assert jax.device_count() == 8, "tests expect 8 host CPU devices (XLA_FLAGS set too late?)"
