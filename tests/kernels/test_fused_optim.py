"""Tests for jaxeff.kernels.fused_optim: Adam/Sophia/GaLore kernels vs references and optax."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxeff.kernels import fused_optim as F


def _f32(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def test_adam_pallas_matches_reference_and_optax():
    """Ragged size (5000 is not a multiple of the 4096 block), two steps."""
    rng = np.random.default_rng(0)
    p, g1, g2 = (_f32(rng, 50, 100) for _ in range(3))
    kw = dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)
    tx = optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)
    opt_state = tx.init(p)
    pal = jax.jit(lambda p, g, m, v, t: F.adam_update(p, g, m, v, t, interpret=True, **kw))
    ref = jax.jit(lambda p, g, m, v, t: F.adam_update_reference(p, g, m, v, t, **kw))
    state_p = state_r = (p, jnp.zeros_like(p), jnp.zeros_like(p))
    p_optax = p
    for t, g in ((1, g1), (2, g2)):
        state_p = pal(state_p[0], g, state_p[1], state_p[2], t)
        state_r = ref(state_r[0], g, state_r[1], state_r[2], t)
        upd, opt_state = tx.update(g, opt_state, p_optax)
        p_optax = optax.apply_updates(p_optax, upd)
    for a, b in zip(state_p, state_r):  # f32 rounding: TECHNIQUES.md §20 saw 1.2e-7 vs optax
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state_r[0], p_optax, rtol=1e-6, atol=1e-6)


def test_sophia_pallas_matches_reference_and_invariants():
    rng = np.random.default_rng(1)
    p, g, m = _f32(rng, 777), _f32(rng, 777), _f32(rng, 777)
    h = jnp.abs(_f32(rng, 777)).at[:100].set(0.0).at[100:400].multiply(1e3)
    kw = dict(lr=0.1, b1=0.965, gamma=0.01, eps=1e-12, weight_decay=0.2, clip_threshold=1.0)
    got = jax.jit(lambda *a: F.sophia_update(*a, interpret=True, **kw))(p, g, m, h)
    want = jax.jit(lambda *a: F.sophia_update_reference(*a, **kw))(p, g, m, h)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    new_p, new_m = (np.asarray(x) for x in want)
    step = new_p - np.asarray(p) * (1 - 0.1 * 0.2)  # the clipped part: -lr * clip(...)
    assert np.all(np.abs(step) <= 0.1 + 1e-6)
    # Where h = 0 the ratio saturates: the step is -lr * sign(m).
    np.testing.assert_allclose(step[:100], -0.1 * np.sign(new_m[:100]), atol=1e-6)
    # Where |m| < gamma h the step is -lr * m / (gamma h).
    hh = np.asarray(h)
    small = (np.abs(new_m) < 0.01 * hh) & (hh > 0)
    assert small.any()
    np.testing.assert_allclose(step[small], -0.1 * new_m[small] / (0.01 * hh[small]), atol=1e-6)


def _galore_numpy(g, p, mu, nu, t, side, b1=0.9, b2=0.999, eps=1e-8, scale=0.25):
    g, p = np.asarray(g, np.float64), np.asarray(p, np.float64)
    r = p.T @ g if side == "left" else g @ p
    mu = b1 * np.asarray(mu) + (1 - b1) * r
    nu = b2 * np.asarray(nu) + (1 - b2) * r * r
    n = (mu / (1 - b1 ** t)) / (np.sqrt(nu / (1 - b2 ** t)) + eps)
    return scale * (p @ n if side == "left" else n @ p.T), mu, nu


@pytest.mark.parametrize("side", ["left", "right"])
def test_galore_pallas_matches_reference_and_numpy(side):
    rng = np.random.default_rng(2)
    m, n, r = 48, 32, 16
    g = _f32(rng, m, n)
    proj = jnp.linalg.qr(_f32(rng, m if side == "left" else n, r))[0]
    mshape = (r, n) if side == "left" else (m, r)
    mu, nu = _f32(rng, *mshape) * 0.1, jnp.abs(_f32(rng, *mshape)) * 0.1
    got = jax.jit(lambda *a: F.galore_adam_update(*a, side=side, impl="pallas",
                                                  interpret=True))(g, proj, mu, nu, 3)
    want = jax.jit(lambda *a: F.galore_adam_update_reference(*a, side=side))(g, proj, mu, nu, 3)
    for a, b, c in zip(got, want, _galore_numpy(g, proj, mu, nu, 3, side)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b, c, rtol=1e-4, atol=1e-5)


def test_dispatchers_use_reference_on_cpu():
    rng = np.random.default_rng(3)
    p, g = _f32(rng, 10), _f32(rng, 10)
    z = jnp.zeros_like(p)
    a = jax.jit(lambda *x: F.adam_update(*x, lr=1e-3))(p, g, z, z, 1)
    b = jax.jit(lambda *x: F.adam_update_reference(*x, lr=1e-3))(p, g, z, z, 1)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_bad_inputs_raise_clear_errors():
    p = jnp.zeros((4, 4))
    with pytest.raises(ValueError, match="g must have shape"):
        F.adam_update(p, jnp.zeros((4, 5)), p, p, 1, lr=1e-3)
    with pytest.raises(TypeError, match="m must have dtype"):
        F.adam_update_pallas(p, p, p.astype(jnp.bfloat16), p, 1, lr=1e-3, interpret=True)
    with pytest.raises(ValueError, match="side must be"):
        F.galore_adam_update(p, p, p, p, 1, side="both")
    with pytest.raises(ValueError, match="mu must be"):
        F.galore_adam_update(jnp.zeros((32, 16)), jnp.zeros((32, 16)), p, p, 1)
    with pytest.raises(ValueError, match="unsupported shape"):
        F.galore_adam_update_pallas(jnp.zeros((32, 16)), jnp.zeros((32, 12)), jnp.zeros((12, 16)),
                                    jnp.zeros((12, 16)), 1, interpret=True)
    with pytest.raises(ValueError, match="impl must be"):
        F.sophia_update(p, p, p, p, lr=1e-3, impl="xla")
