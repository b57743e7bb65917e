"""Tests for jaxeff.losses.distill: hand-computed cases, zero at equality, gradients, masks."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.losses import _distill as distill
from jaxeff.losses import init_projection, masked_mean, project

# jit everything numeric: one compile per test instead of one per eager op (CPU time in CI)
_STATIC = ("temperature", "reduction", "stop_teacher_gradient")
kd_loss = jax.jit(distill.kd_loss, static_argnames=_STATIC)
distillation_loss = jax.jit(distill.distillation_loss, static_argnames=_STATIC + ("alpha",))
hidden_state_loss = jax.jit(distill.hidden_state_loss,
                            static_argnames=("reduction", "stop_teacher_gradient", "kind"))


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_kd_hand_computed_two_classes():
    s = jnp.array([[0.0, 0.0]])
    t = jnp.array([[math.log(3.0), 0.0]])          # p_t = (3/4, 1/4), p_s = (1/2, 1/2)
    want = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert float(kd_loss(s, t)) == pytest.approx(want, rel=1e-6)
    # T = 2: p_t = softmax(t / 2), scaled by T^2 = 4
    pt = _softmax(np.array([math.log(3.0) / 2, 0.0]))
    want2 = 4.0 * float(np.sum(pt * (np.log(pt) - np.log([0.5, 0.5]))))
    assert float(kd_loss(s, t, temperature=2.0)) == pytest.approx(want2, rel=1e-6)


def test_kd_zero_when_student_equals_teacher_and_gradient_zero():
    z = np.random.default_rng(0).normal(size=(2, 5, 11)).astype(np.float32) * 3
    assert float(kd_loss(z, z, temperature=1.7)) == 0.0
    g = jax.jit(jax.grad(lambda s: distill.kd_loss(s, z, temperature=1.7)))(z)
    np.testing.assert_allclose(g, 0.0, atol=1e-7)


def test_kd_gradient_is_T_times_ps_minus_pt_over_masked_count():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(2, 3, 7)).astype(np.float32)
    t = rng.normal(size=(2, 3, 7)).astype(np.float32) * 2
    mask = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
    T = 2.5
    g = jax.jit(jax.grad(lambda s_: distill.kd_loss(s_, t, mask, temperature=T)))(s)
    ps, pt = _softmax(np.asarray(s) / T), _softmax(np.asarray(t) / T)
    want = T * (ps - pt) * np.asarray(mask)[..., None] / 4.0
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
    # no gradient into the teacher by default; with stop_teacher_gradient=False there is one
    g_t = jax.jit(jax.grad(lambda t_, stop: distill.kd_loss(
        s, t_, mask, stop_teacher_gradient=stop)), static_argnums=1)
    assert float(jnp.abs(g_t(t, True)).sum()) == 0.0
    assert float(jnp.abs(g_t(t, False)).sum()) > 0.0


def test_mask_reductions_and_empty_mask():
    s = jnp.zeros((2, 2))
    t = jnp.array([[1.0, 0.0], [0.0, 3.0]])
    per = np.asarray(kd_loss(s, t, reduction="none"))
    assert per.shape == (2,)
    m = jnp.array([1.0, 0.0])
    assert float(kd_loss(s, t, m)) == pytest.approx(per[0], rel=1e-6)
    assert float(kd_loss(s, t, m, reduction="sum")) == pytest.approx(per[0], rel=1e-6)
    assert float(kd_loss(s, t, jnp.zeros(2))) == 0.0            # empty mask: 0, not NaN
    assert float(masked_mean(jnp.array([1.0, 3.0]), jnp.array([0.5, 0.5]))) == pytest.approx(2.0)


def test_teacher_only_and_mixed_with_labels():
    rng = np.random.default_rng(2)
    s = rng.normal(size=(4, 6)).astype(np.float32)
    t = rng.normal(size=(4, 6)).astype(np.float32)
    labels = jnp.array([0, 5, 2, 2])
    kd = kd_loss(s, t, temperature=2.0, reduction="none")
    ce = -np.log(_softmax(np.asarray(s))[np.arange(4), np.asarray(labels)])
    np.testing.assert_allclose(distillation_loss(s, t, temperature=2.0),
                               np.mean(kd), rtol=1e-6)
    np.testing.assert_allclose(distillation_loss(s, t, labels, temperature=2.0, alpha=0.3),
                               np.mean(0.3 * np.asarray(kd) + 0.7 * ce), rtol=1e-5)
    # alpha = 0 is plain cross-entropy
    np.testing.assert_allclose(distillation_loss(s, t, labels, alpha=0.0), ce.mean(), rtol=1e-5)


def test_hidden_state_mse_cosine_and_projection():
    hs = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    ht = jnp.zeros((2, 2))
    assert float(hidden_state_loss(hs, ht, jnp.array([1.0, 0.0]))) == pytest.approx(2.5)
    assert float(hidden_state_loss(hs, hs, kind="cosine")) == pytest.approx(0.0, abs=1e-6)
    assert float(hidden_state_loss(hs, -hs, kind="cosine")) == pytest.approx(2.0, abs=1e-6)
    # identity projection when widths agree
    proj = init_projection(jax.random.key(0), 2, 2)
    np.testing.assert_array_equal(project(hs, proj), hs)
    # width mismatch needs a projection; gradient reaches it
    ht3 = np.random.default_rng(3).normal(size=(2, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="projection"):
        hidden_state_loss(hs, ht3)
    p3 = init_projection(jax.random.key(4), 2, 3)
    assert p3["kernel"].shape == (2, 3)
    g = jax.jit(jax.grad(lambda p: distill.hidden_state_loss(hs, ht3, projection=p)))(p3)
    w, b = np.asarray(p3["kernel"]), np.asarray(p3["bias"])
    r = np.asarray(hs) @ w + b - np.asarray(ht3)                # d/dW mean_pos mean_d r^2
    np.testing.assert_allclose(g["kernel"], np.asarray(hs).T @ (2 * r / 3) / 2, rtol=1e-5)
    np.testing.assert_allclose(distill.hidden_state_loss(hs, ht3, projection=lambda h: h @ w + b),
                               np.mean(np.mean(r ** 2, -1)), rtol=1e-5)


def test_jit_and_bf16_inputs():
    rng = np.random.default_rng(5)
    s = jnp.asarray(rng.normal(size=(2, 3, 9)), jnp.bfloat16)
    t = jnp.asarray(rng.normal(size=(2, 3, 9)), jnp.bfloat16)
    out = kd_loss(s, t, jnp.ones((2, 3)), temperature=2.0)
    assert out.dtype == jnp.float32 and np.isfinite(float(out))
    ps = _softmax(np.asarray(s, np.float32) / 2)
    pt = _softmax(np.asarray(t, np.float32) / 2)
    want = 4 * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1))
    assert float(out) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("call, match", [
    (lambda: distill.kd_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4))), "shape"),
    (lambda: distill.kd_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), temperature=0.0), "temperature"),
    (lambda: distill.kd_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), temperature=-1), "temperature"),
    (lambda: distill.kd_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones(3)), "mask"),
    (lambda: distill.kd_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), reduction="avg"), "reduction"),
    (lambda: distill.distillation_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32),
                               alpha=1.5), "alpha"),
    (lambda: distill.distillation_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(3, jnp.int32)),
     "labels"),
    (lambda: distill.hidden_state_loss(jnp.zeros((2, 3)), jnp.zeros((3, 3))), "positions"),
    (lambda: distill.hidden_state_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), kind="l1"), "kind"),
    (lambda: project(jnp.zeros((2, 3)), jnp.zeros((4, 3))), "kernel"),
    (lambda: init_projection(jax.random.key(0), 0, 3), "student_dim"),
])
def test_bad_inputs(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
