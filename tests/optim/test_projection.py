"""Tests for jaxeff.optim.projection: exact and randomized projector refresh, sign alignment,
moment re-projection."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from jaxeff.optim import _projection as P


def _orthonormal(seed, m, r):
    """NumPy-made test inputs: eager jax ops would each cost an XLA compile."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((m, r)))
    return q.astype(np.float32)


def _known_spectrum(seed, m, n, s):
    u, v = _orthonormal(seed, m, len(s)), _orthonormal(seed + 1, n, len(s))
    return (u * np.asarray(s, np.float32)) @ v.T, u, v


def _subspace_gap(a, b):
    """|| a a^T - b b^T ||_2 for orthonormal a, b: the sine of the largest principal angle."""
    return float(np.linalg.norm(np.asarray(a @ a.T - b @ b.T), 2))


def test_svd_projector_sides_match_numpy_subspaces():
    g = jnp.asarray(np.random.default_rng(0).standard_normal((24, 40)), jnp.float32)
    left, right = P.svd_projector(g, 5, ("left", "right"))
    u, _, vh = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
    assert left.shape == (24, 5) and right.shape == (40, 5)
    assert _subspace_gap(left, u[:, :5]) < 1e-4 and _subspace_gap(right, vh[:5].T) < 1e-4


@pytest.mark.parametrize("shape,warm", [((96, 64), False), ((3, 64, 96), True)])
def test_randomized_recovers_top_subspace_of_known_spectrum(shape, warm):
    """Spectrum 1, 0.9, ..., with a gap after r = 6: the randomized refresh finds the top-6
    subspace; warm-started from the true subspace it stays there."""
    r = 6
    s = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5] + list(0.05 * 0.8 ** np.arange(30))
    batch = shape[:-2]
    mats = [_known_spectrum(10 * i, *shape[-2:], s) for i in range(int(np.prod(batch)))]
    g = jnp.asarray(np.stack([m[0] for m in mats]).reshape(shape))
    u_true = np.stack([m[1][:, :r] for m in mats]).reshape(batch + (shape[-2], r))
    prev = u_true if warm else _orthonormal(7, shape[-2], r)
    p = jax.jit(P.randomized_projector, static_argnums=(3, 4))(g, prev, jax.random.PRNGKey(2), 8, 2)
    assert p.shape == batch + (shape[-2], r)
    pm, um = p.reshape((-1,) + p.shape[-2:]), u_true.reshape((-1,) + u_true.shape[-2:])
    pm = np.asarray(pm)
    for a, b in zip(pm, um):
        np.testing.assert_allclose(a.T @ a, np.eye(r), atol=1e-5)   # P^T P = I
        assert _subspace_gap(a, b) < 1e-3
    # columns ordered by singular value: the first column is the top singular vector (up to sign)
    assert abs(float(pm[0][:, 0] @ um[0][:, 0])) > 0.999


def test_align_signs_makes_result_independent_of_svd_sign_convention():
    g = jnp.asarray(np.random.default_rng(3).standard_normal((16, 12)), jnp.float32)
    (p,) = P.svd_projector(g, 4)
    flips = jnp.asarray([1.0, -1.0, -1.0, 1.0])
    aligned = P.align_signs(p * flips, p)
    np.testing.assert_array_equal(np.asarray(aligned), np.asarray(p))
    np.testing.assert_array_equal(np.asarray(P.align_signs(p, jnp.zeros_like(p))), np.asarray(p))


def test_reproject_moment_is_exact_for_rotations_within_the_subspace():
    """If P_new = P_old Q (same subspace, rotated basis), the full-space first moment P M is kept."""
    p_old, q = _orthonormal(4, 20, 5), _orthonormal(5, 5, 5)
    p_new = p_old @ q
    m_left = np.random.default_rng(6).standard_normal((5, 9)).astype(np.float32)  # left: [r, n]
    got = P.reproject_moment(m_left, (p_new,), (p_old,), ("left",))
    np.testing.assert_allclose(p_new @ got, p_old @ m_left, atol=1e-5)
    m_right = m_left.T                                                # right: M is [m, r]
    got = P.reproject_moment(m_right, (p_new,), (p_old,), ("right",))
    np.testing.assert_allclose(got @ p_new.T, m_right @ p_old.T, atol=1e-5)
    v = np.abs(m_left)
    assert bool(jnp.all(P.reproject_moment(v, (p_new,), (p_old,), ("left",), square=True) >= 0))


def test_bad_refresh_settings():
    with pytest.raises(ValueError, match="refresh='eig'"):
        P.resolve_refresh("eig")
    with pytest.raises(ValueError, match="n_iter must be an int >= 1; got 0"):
        P.Randomized(n_iter=0)
    with pytest.raises(ValueError, match="oversample must be an int >= 0; got -1"):
        P.Randomized(oversample=-1)
    with pytest.raises(TypeError, match="n_iter must be an int"):
        P.Randomized(n_iter=2.0)
    with pytest.raises(TypeError, match="oversample must be an int"):
        P.Randomized(oversample=True)
    assert P.resolve_refresh("randomized") == P.Randomized()
