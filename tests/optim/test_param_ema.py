"""Tests for jaxeff.optim.param_ema: parameter EMA as an optax transform."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxeff.optim import ParamEMAState, ema_params, param_ema


def params0():
    r = np.random.default_rng(0)
    return {"w": jnp.asarray(r.normal(size=(8, 4)), jnp.float32),
            "b": jnp.asarray(r.normal(size=(4,)), jnp.float32)}


def grads(i):
    r = np.random.default_rng(100 + i)
    return {"w": jnp.asarray(r.normal(size=(8, 4)), jnp.float32),
            "b": jnp.asarray(r.normal(size=(4,)), jnp.float32)}


def make_step(tx):
    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s
    return step


def run(tx, n, p=None, g=None):
    p = params0() if p is None else p
    s = tx.init(p)
    step = make_step(tx)
    for i in range(n):
        p, s = step(p, s, grads(i) if g is None else g(i))
    return p, s


def test_decay_zero_tracks_current_params_exactly():
    p, s = run(optax.chain(optax.sgd(0.1), param_ema(0.0)), 3)
    for a, b in zip(jax.tree.leaves(ema_params(s)), jax.tree.leaves(p)):
        np.testing.assert_array_equal(a, b)


def test_constant_params_are_a_fixed_point_and_updates_pass_through():
    zero = lambda i: jax.tree.map(jnp.zeros_like, params0())  # noqa: E731
    p, s = run(optax.chain(optax.sgd(0.1), param_ema(0.9)), 3, g=zero)
    for a, b in zip(jax.tree.leaves(ema_params(s)), jax.tree.leaves(params0())):
        np.testing.assert_array_equal(a, b)
    # the transform never changes the updates: same params as plain sgd
    p1, _ = run(optax.sgd(0.1), 4)
    p2, _ = run(optax.chain(optax.sgd(0.1), param_ema(0.9)), 4)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(a, b)


def test_hand_computed_two_steps_and_warmup():
    tx = optax.chain(optax.sgd(1.0), param_ema(0.5))
    p = {"x": jnp.array([0.0])}
    s = tx.init(p)
    for g in (-2.0, -2.0):                    # theta: 0 -> 2 -> 4
        u, s = tx.update({"x": jnp.array([g])}, s, p)
        p = optax.apply_updates(p, u)
    # ema: 0 -> 2 + .5 (0 - 2) = 1 -> 4 + .5 (1 - 4) = 2.5
    np.testing.assert_allclose(ema_params(s)["x"], [2.5])
    assert int(s[1].count) == 2
    # warmup: d_0 = min(0.99, 1/10) = 0.1
    tx = optax.chain(optax.sgd(1.0), param_ema(0.99, warmup=True))
    s = tx.init({"x": jnp.array([0.0])})
    u, s = tx.update({"x": jnp.array([-10.0])}, s, {"x": jnp.array([0.0])})
    np.testing.assert_allclose(ema_params(s)["x"], [9.0], rtol=1e-6)
    # a schedule for the decay
    tx = optax.chain(optax.sgd(1.0), param_ema(lambda c: jnp.where(c < 1, 0.0, 0.5)))
    s = tx.init({"x": jnp.array([0.0])})
    u, s = tx.update({"x": jnp.array([-2.0])}, s, {"x": jnp.array([0.0])})
    np.testing.assert_allclose(ema_params(s)["x"], [2.0])


def test_float32_average_for_bf16_params():
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params0())
    tx = optax.chain(optax.sgd(1e-3), param_ema(0.999))
    s = tx.init(p16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s[1].ema))
    like = ema_params(s, like=p16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(like))


def test_orbax_round_trip_resumes_bit_identically(tmp_path):
    tx = optax.chain(optax.adam(1e-2), param_ema(0.9, warmup=True))
    step = make_step(tx)
    p, s = params0(), tx.init(params0())
    for i in range(3):
        p, s = step(p, s, grads(i))
    ck = ocp.StandardCheckpointer()
    ck.save(tmp_path / "c", {"p": p, "s": s})
    ck.wait_until_finished()
    r = ck.restore(tmp_path / "c", {"p": p, "s": s})
    p2, s2 = r["p"], r["s"]
    assert isinstance(s2[1], ParamEMAState)
    for i in range(3, 6):
        p, s = step(p, s, grads(i))
        p2, s2 = step(p2, s2, grads(i))
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((p2, s2))):
        np.testing.assert_array_equal(a, b)


def test_sharded_8_devices_equals_single_device():
    mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
    tx = optax.chain(optax.adam(1e-2), param_ema(0.8))
    p_one, s_one = run(tx, 3)
    sh = {"w": NamedSharding(mesh, P("d", None)), "b": NamedSharding(mesh, P())}
    p_sh, s_sh = run(tx, 3, p=jax.device_put(params0(), sh))
    assert len(ema_params(s_sh)["w"].sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves((p_one, s_one)), jax.tree.leaves((p_sh, s_sh))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(decay=1.0), ValueError, r"\[0, 1\)"),
    (dict(decay=-0.5), ValueError, r"\[0, 1\)"),
    (dict(decay=True), TypeError, "decay"),
    (dict(decay="0.9"), TypeError, "decay"),
    (dict(decay=0.9, dtype=jnp.int32), TypeError, "dtype must be a floating-point dtype.*int32"),
    (dict(decay=0.9, dtype=None), TypeError, "dtype must be a floating-point dtype; got None"),
    (dict(decay=0.9, dtype="int8"), TypeError, "dtype must be a floating-point dtype"),
])
def test_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        param_ema(**kw)


def test_missing_params_and_missing_state():
    tx = param_ema(0.9)
    s = tx.init(params0())
    with pytest.raises(ValueError, match="params"):
        tx.update(grads(0), s)
    with pytest.raises(ValueError, match="ParamEMAState"):
        ema_params(optax.adam(1e-3).init(params0()))
