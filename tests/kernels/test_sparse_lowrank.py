"""Tests for jaxeff.kernels.sparse_lowrank (SLTrain matmul): kernels vs reference, invariants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.kernels import sparse_lowrank as S

TOL = 1e-5  # relative to max |reference|, f32 (TECHNIQUES.md §7: fused kernel matched to 1.4e-5)


def _problem(seed, n, din, dout, r, nnz):
    """NumPy draws (eager jax.random compiles op by op, slow on CPU)."""
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    idx = jnp.asarray(np.sort(rng.choice(din * dout, nnz, replace=False)), jnp.int32)
    return f(n, din), f(din, r), f(r, dout), idx, f(nnz), f(n, dout)


def _fwd_and_grads(fn, x, a, b, idx, vals, gy, scale):
    def loss(x, a, b, v):
        y = fn(x, a, b, idx, v, scale)
        return jnp.sum(y * gy), y
    (_, y), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(x, a, b, vals)
    return y, g


def _close(got, want):
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(want) / scale, atol=TOL)


@pytest.mark.parametrize("fused", [True, False])
def test_pallas_matches_reference_forward_and_grads(fused):
    """Ragged sizes (not block multiples): N=5, in=40, out=24, r=3."""
    x, a, b, idx, vals, gy = _problem(0, 5, 40, 24, 3, 50)
    pal = lambda *args: S.sltrain_matmul_pallas(*args, fused=fused, block_m=16, block_n=16,
                                                block_k=16, interpret=True)
    y_p, g_p = _fwd_and_grads(pal, x, a, b, idx, vals, gy, 0.5)
    y_r, g_r = _fwd_and_grads(S.sltrain_matmul_reference, x, a, b, idx, vals, gy, 0.5)
    _close(y_p, y_r)
    for got, want in zip(g_p, g_r):
        _close(got, want)


def test_reference_invariants():
    """W = dense(S) when B = 0; grad(values) = dense_grad.flat[idx] (TECHNIQUES.md §7)."""
    x, a, b, idx, vals, gy = _problem(1, 4, 6, 5, 2, 9)
    y = jax.jit(S.sltrain_matmul_reference, static_argnums=5)(x, a, jnp.zeros_like(b), idx, vals,
                                                             0.7)
    dense = np.zeros((6, 5), np.float32)
    dense.flat[np.asarray(idx)] = np.asarray(vals)
    np.testing.assert_allclose(y, np.asarray(x) @ dense, rtol=1e-5, atol=1e-5)
    gv = jax.jit(jax.grad(lambda v: jnp.sum(S.sltrain_matmul_reference(x, a, b, idx, v, 0.7) * gy)))(
        vals)
    dense_grad = np.asarray(x).T @ np.asarray(gy)
    np.testing.assert_allclose(gv, dense_grad.flat[np.asarray(idx)], rtol=1e-5, atol=1e-5)


def test_dispatcher_uses_reference_on_cpu_and_flattens_batch():
    x, a, b, idx, vals, _ = _problem(2, 6, 8, 4, 2, 5)
    x3 = x.reshape(2, 3, 8)
    f = jax.jit(S.sltrain_matmul, static_argnums=5)
    y = f(x3, a, b, idx, vals, 0.5)
    assert y.shape == (2, 3, 4)
    np.testing.assert_array_equal(y.reshape(6, 4), jax.jit(S.sltrain_matmul_reference,
                                                           static_argnums=5)(x, a, b, idx, vals, 0.5))


def test_bad_inputs_raise_clear_errors():
    x, a, b, idx, vals, _ = _problem(3, 4, 8, 4, 2, 5)
    with pytest.raises(ValueError, match="a \\[in, r\\]"):
        S.sltrain_matmul(x, a[:7], b, idx, vals, 0.5)
    with pytest.raises(ValueError, match="same shape"):
        S.sltrain_matmul(x, a, b, idx, vals[:4], 0.5)
    with pytest.raises(TypeError, match="indices must be integer"):
        S.sltrain_matmul(x, a, b, idx.astype(jnp.float32), vals, 0.5)
    with pytest.raises(TypeError, match="scale must be a Python float"):
        S.sltrain_matmul(x, a, b, idx, vals, jnp.float32(0.5))
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        S.sltrain_matmul_pallas(x, a, b, idx, vals, 0.5, block_k=24, interpret=True)


def test_tpu_kernel_in_tpu_interpret_mode_forward_and_grads():
    """The Mosaic path (platform='tpu') under Pallas's TPU interpret mode: y and all grads."""
    x, a, b, idx, vals, gy = _problem(9, 5, 24, 20, 4, 50)
    tpu = lambda *z: S.sltrain_matmul_pallas(*z, interpret=True, platform="tpu")  # noqa: E731
    y, g = _fwd_and_grads(tpu, x, a, b, idx, vals, gy, 0.5)
    y_ref, g_ref = _fwd_and_grads(S.sltrain_matmul_reference, x, a, b, idx, vals, gy, 0.5)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(g, g_ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
