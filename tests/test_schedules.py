"""Tests for jaxeff.schedules (TECHNIQUES.md §4 invariants)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxeff import schedules as S


def values(sched, n):
    """Schedule values at steps 0..n, through jit with a traced count."""
    return np.asarray(jax.jit(jax.vmap(sched))(jnp.arange(n + 1)))


def assert_non_increasing(v):
    assert np.all(np.diff(v) <= 1e-7 * max(1.0, float(np.max(np.abs(v))))), np.diff(v).max()


# ----------------------------------------------------------------------------- WSD
@pytest.mark.parametrize("shape", ["1-sqrt", "linear", "cosine", "exp", "inv-sqrt"])
def test_wsd_phases(shape):
    peak, T, W = 3e-3, 200, 20
    sched = S.wsd(peak, T, W, decay_fraction=0.25, shape=shape, final=1e-4)
    v = values(sched, T + 10)
    assert v[0] == 0.0
    np.testing.assert_allclose(v[W // 2], peak / 2, rtol=1e-6)
    assert v[W] == np.float32(peak)                      # eta(W) = eta_max
    assert np.all(np.diff(v[:W + 1]) > 0)                # warmup increases
    assert np.all(v[W:150] == np.float32(peak))          # stable until T - D = 150
    assert_non_increasing(v[W:])
    assert v[T] == np.float32(1e-4)                      # exactly final at T ...
    assert np.all(v[T:] == np.float32(1e-4))             # ... and after
    assert v[T - 1] > v[T]


def test_wsd_one_minus_sqrt_halfway():
    sched = S.wsd(1.0, 100, 0, decay_fraction=0.5, shape="1-sqrt")
    np.testing.assert_allclose(float(sched(75)), 1 - math.sqrt(0.5), rtol=1e-6)  # 0.293
    assert float(S.wsd(1.0, 100, 0, decay_fraction=0.5, shape="linear")(75)) == 0.5


def test_wsd_composes_with_optax():
    sched = S.wsd(0.1, 10, 2, decay_fraction=0.5)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=sched)
    p = {"w": jnp.ones(3)}
    s = tx.init(p)
    for i in range(4):
        _, s = jax.jit(tx.update)(p, s, p)
    np.testing.assert_allclose(s.hyperparams["learning_rate"], sched(3), rtol=1e-6)


# ----------------------------------------------------------------------------- Power
def test_power_cap_and_proportional_to_batch():
    kw = dict(peak=0.02, tokens_per_step=4096, warmup=0)
    small, big = S.power(batch_size=4, **kw), S.power(batch_size=8, **kw)
    steps = jnp.arange(0, 5000, 7)
    vs, vb = np.asarray(jax.vmap(small)(steps)), np.asarray(jax.vmap(big)(steps))
    assert np.all(vs <= np.float32(0.02)) and np.all(vb <= np.float32(0.02))
    law = (vs < 0.02 * 0.999) & (vb < 0.02 * 0.999)      # both on the power law
    assert law.sum() > 100
    np.testing.assert_allclose(vb[law] / vs[law], 2.0, rtol=1e-5)   # eta ∝ beta
    n = 3000 * 4096
    np.testing.assert_allclose(float(small(3000)), 4 * 4.6 * n ** -0.51, rtol=1e-5)
    assert_non_increasing(vs)


def test_power_warmup_and_decay():
    sched = S.power(0.02, batch_size=2, tokens_per_step=16384, warmup=10, total_steps=100,
                    decay_fraction=0.2, final=0.0)
    v = values(sched, 110)
    pw = min(0.02, 2 * 4.6 * (10 * 16384) ** -0.51)
    np.testing.assert_allclose(v[10], pw, rtol=1e-5)
    np.testing.assert_allclose(v[5], pw / 2, rtol=1e-5)
    assert_non_increasing(v[10:])
    assert v[100] == 0.0 and np.all(v[100:] == 0.0)
    np.testing.assert_allclose(v[70], 2 * 4.6 * (70 * 16384) ** -0.51, rtol=1e-5)
    assert v[70] < 0.02


# ----------------------------------------------------------------------------- infinite
@pytest.mark.parametrize("cooldown", ["cosine", "inv-sqrt", "linear"])
def test_infinite_phases(cooldown):
    T, peak = 1000, 1e-3
    sched = S.infinite(peak, T, cooldown=cooldown)
    v = values(sched, T + 5)
    eta_c, eta_min = np.float32(1e-4), np.float32(1e-5)
    assert v[50] == np.float32(peak)                     # end of warmup
    np.testing.assert_allclose(v[150], eta_c, rtol=1e-6)  # eta(0.15 T) = eta_c
    assert np.all(v[150:800] == eta_c)
    assert_non_increasing(v[50:])
    assert v[T] == eta_min and np.all(v[T:] == eta_min)  # exactly eta_min
    # The anneal is linear in log eta.
    logv = np.log(v[800:T + 1].astype(np.float64))
    np.testing.assert_allclose(np.diff(logv), (np.log(eta_min) - np.log(eta_c)) / 200,
                               rtol=1e-3)


def test_infinite_inv_sqrt_formula():
    sched = S.infinite(1.0, 100, warmup_end=0.0, cooldown_end=1.0, anneal_start=1.0,
                       eta_c=0.2, eta_min=0.1, cooldown="inv-sqrt")
    g = lambda p: 1 / math.sqrt(1 + 10 * p) - 1
    np.testing.assert_allclose(float(sched(30)), 1.0 + (0.2 - 1.0) * g(0.3) / g(1.0), rtol=1e-6)


# ----------------------------------------------------------------------------- rewarm
def test_rewarm():
    sched = S.rewarm(prev_final=1e-5, peak=3e-4, total_steps=100, warmup=10, final=3e-5)
    v = values(sched, 105)
    assert v[0] == np.float32(1e-5)                       # continuous with the previous stage
    assert v[10] == np.float32(3e-4)
    assert np.all(np.diff(v[:11]) > 0)
    assert_non_increasing(v[10:])
    assert v[100] == np.float32(3e-5) and np.all(v[100:] == np.float32(3e-5))
    np.testing.assert_allclose(v[55], 3e-5 + (3e-4 - 3e-5) * 0.5, rtol=1e-5)  # cosine midpoint


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("fn, kwargs, name", [
    (S.wsd, dict(peak=1e-3, total_steps=-5, warmup=0), "total_steps"),
    (S.wsd, dict(peak=1e-3, total_steps=100, warmup=-1), "warmup"),
    (S.wsd, dict(peak=1e-3, total_steps=100, warmup=95), "warmup"),
    (S.wsd, dict(peak=1e-3, total_steps=100, warmup=5, decay_fraction=1.5), "decay_fraction"),
    (S.wsd, dict(peak=1e-3, total_steps=100, warmup=5, decay_fraction=-0.1), "decay_fraction"),
    (S.wsd, dict(peak=1e-3, total_steps=100, warmup=5, shape="step"), "shape"),
    (S.wsd, dict(peak=0.0, total_steps=100, warmup=5), "peak"),
    (S.wsd, dict(peak=1e-3, total_steps=100, warmup=5, final=1.0), "final"),
    (S.power, dict(peak=0.02, batch_size=0, tokens_per_step=10), "batch_size"),
    (S.power, dict(peak=0.02, batch_size=4, tokens_per_step=10, b=0.5), "b"),
    (S.power, dict(peak=0.02, batch_size=4, tokens_per_step=10, warmup=200, total_steps=100),
     "warmup"),
    (S.infinite, dict(peak=1e-3, total_steps=100, warmup_end=1.2), "warmup_end"),
    (S.infinite, dict(peak=1e-3, total_steps=100, warmup_end=0.3, cooldown_end=0.2),
     "cooldown_end"),
    (S.infinite, dict(peak=1e-3, total_steps=100, eta_c=1e-4, eta_min=1e-3), "eta_min"),
    (S.infinite, dict(peak=1e-3, total_steps=-1), "total_steps"),
    (S.rewarm, dict(prev_final=0.0, peak=1e-3, total_steps=10, warmup=20), "warmup"),
    (S.rewarm, dict(prev_final=0.0, peak=1e-3, total_steps=10, warmup=2, stable_fraction=2.0),
     "stable_fraction"),
])
def test_bad_arguments_name_the_argument(fn, kwargs, name):
    with pytest.raises(ValueError, match=name):
        fn(**kwargs)


def test_bad_types():
    with pytest.raises(TypeError, match="peak"):
        S.wsd("big", 100, 5)
    with pytest.raises(ValueError, match="total_steps"):
        S.wsd(1e-3, 10.5, 1)


@pytest.mark.parametrize("fn, kwargs, err, match", [   # siblings: non-finite and wrong types
    (S.wsd, dict(peak=float("inf"), total_steps=100, warmup=5), ValueError,
     "peak must be a finite number > 0"),
    (S.wsd, dict(peak=float("nan"), total_steps=100, warmup=5), ValueError, "peak must be"),
    (S.wsd, dict(peak=1e-3, total_steps=float("inf"), warmup=5), ValueError,
     "total_steps must be a finite number"),
    (S.wsd, dict(peak=1e-3, total_steps=float("nan"), warmup=5), ValueError, "total_steps"),
    (S.wsd, dict(peak=1e-3, total_steps=100, warmup=True), TypeError, "warmup must be a real"),
    (S.wsd, dict(peak=1e-3, total_steps=100, warmup=5, shape=None), ValueError,
     "shape must be one of"),
    (S.power, dict(peak=0.02, batch_size="4", tokens_per_step=10), TypeError, "batch_size"),
    (S.infinite, dict(peak=1e-3, total_steps=100, warmup_end=float("nan")), ValueError,
     "warmup_end"),
    (S.rewarm, dict(prev_final=float("inf"), peak=1e-3, total_steps=10, warmup=2), ValueError,
     "prev_final"),
])
def test_non_finite_and_wrong_types(fn, kwargs, err, match):
    with pytest.raises(err, match=match):
        fn(**kwargs)


def test_whole_float_steps_still_accepted():
    assert float(S.wsd(1e-3, 100.0, 5.0)(5)) == pytest.approx(1e-3)


def test_negative_steps_give_the_step_zero_value_without_warmup():
    """Found by tests/property: with warmup=0 a step before 0 gave 0 (wsd) or prev_final (rewarm)
    instead of the step-0 value the module docstring promises."""
    assert float(S.wsd(1.0, 10, 0)(-1)) == float(S.wsd(1.0, 10, 0)(0)) == 1.0
    assert float(S.rewarm(0.5, 1.0, 10, 0)(-1)) == 1.0
    assert float(S.wsd(1.0, 10, 4)(-3)) == 0.0          # with warmup, step 0 is 0


def test_power_rejects_a_final_above_the_decay_start():
    """Found by tests/property: final=0.9 above the power-law value at the decay start (0.108)
    made the 'decay' rise to 0.9."""
    with pytest.raises(ValueError, match=r"final=0.9 is above the power-law value"):
        S.power(1.0, 8, 1024, 0, 100, final=0.9)
    ok = S.power(1.0, 8, 1024, 0, 100, final=0.01)
    vals = [float(ok(s)) for s in range(85, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:])) and vals[-1] == pytest.approx(0.01)
