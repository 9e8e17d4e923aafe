"""``impl="auto"`` on an accelerator self-checks the Pallas kernel before using it.

This machine has no accelerator, so the backend seen by the dispatcher is faked ("gpu"); the
Pallas GPU kernels then either run in interpret mode (they work: auto takes them) or are forced to
lower for Triton on a CPU (that fails: auto warns once and takes xla, and the model's output is
xla's)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxselm.kernels.cope as cope
from jaxselm.kernels.cope import cope_attention, pallas_common


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(cope, "_backend", lambda: "gpu")
    monkeypatch.setattr(cope, "_CHECKED", {})
    monkeypatch.setattr(cope, "SELF_CHECK_LEN", 32)  # interpret mode is slow; two 16-row tiles
    monkeypatch.delenv(cope.ENV_SELF_CHECK, raising=False)
    return monkeypatch


def _inputs(d=16, p=8):
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 24, 4, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 24, 2, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 24, 2, d)), jnp.float32)
    e = jnp.asarray(rng.standard_normal((p, d)) * 0.5, jnp.float32)
    return q, k, v, e


def test_auto_uses_a_kernel_that_passes(fake_gpu, caplog, monkeypatch):
    calls = []
    real = cope.self_check

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(cope, "self_check", spy)
    q, k, v, e = _inputs()
    with caplog.at_level(logging.WARNING, logger="jaxselm.kernels.cope"):
        out = jax.jit(lambda *a: cope_attention(*a, impl="auto"))(q, k, v, e)
    assert calls == [("pallas_gpu", 16, jnp.float32, 2, 8, True)]
    assert cope._CHECKED == {("pallas_gpu", "gpu", 16, "float32", 2, 8, True): True}
    assert not caplog.records
    np.testing.assert_allclose(out, cope_attention(q, k, v, e, impl="xla"), atol=1e-4)


def test_auto_falls_back_to_xla_when_the_kernel_does_not_compile(fake_gpu, caplog):
    fake_gpu.setattr(pallas_common, "default_interpret", lambda: False)  # Triton lowering on a CPU
    q, k, v, e = _inputs()
    with caplog.at_level(logging.WARNING, logger="jaxselm.kernels.cope"):
        out = jax.jit(lambda *a: cope_attention(*a, impl="auto"))(q, k, v, e)
        again = cope_attention(
            q, k, v, e, impl="auto"
        )  # cached: no second check, no second warning
    assert cope._CHECKED == {("pallas_gpu", "gpu", 16, "float32", 2, 8, True): False}
    [record] = caplog.records
    assert record.getMessage().startswith(
        "cope_attention impl=auto: pallas_gpu failed its self-check on gpu "
        "(head_dim=16, float32, group=2, P=8, causal=True): "
    )
    assert "using xla" in record.getMessage()
    want = cope_attention(q, k, v, e, impl="xla")
    np.testing.assert_array_equal(
        out, jax.jit(lambda *a: cope_attention(*a, impl="xla"))(q, k, v, e)
    )
    np.testing.assert_array_equal(again, want)


def test_a_kernel_that_disagrees_is_not_used(fake_gpu, caplog, monkeypatch):
    """A kernel that compiles but gives wrong numbers (simulated: its output scaled) fails too."""
    import jaxselm.kernels.cope.pallas_gpu as pg

    real = pg.cope_attention_pallas_gpu
    monkeypatch.setattr(pg, "cope_attention_pallas_gpu", lambda *a, **kw: 1.1 * real(*a, **kw))
    with caplog.at_level(logging.WARNING, logger="jaxselm.kernels.cope"):
        assert not cope.self_check("pallas_gpu", 16, jnp.float32, 1, 8, False)
    assert (
        "differs from xla by 0.1 (relative, tolerance 0.002); using xla"
        in caplog.records[0].getMessage()
    )


def test_self_check_can_be_switched_off(fake_gpu, monkeypatch):
    monkeypatch.setenv(cope.ENV_SELF_CHECK, "0")
    monkeypatch.setattr(cope, "self_check", lambda *a: pytest.fail("checked although switched off"))
    q, k, v, e = _inputs()
    cope_attention(q, k, v, e, impl="auto")  # pallas_gpu (interpret mode here), unchecked


def test_cpu_auto_is_xla_without_a_check(monkeypatch):
    monkeypatch.setattr(cope, "self_check", lambda *a: pytest.fail("no check on CPU"))
    q, k, v, e = _inputs()
    np.testing.assert_array_equal(
        cope_attention(q, k, v, e, impl="auto"), cope_attention(q, k, v, e, impl="xla")
    )
