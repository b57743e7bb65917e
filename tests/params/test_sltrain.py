"""SLTrain: init invariants, reference-layout parity, gradients, from_dense, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxeff.params import param_report
from jaxeff.params import SLTrainWeight, sltrain, sltrain_preset
from jaxeff.params import combine, materialize, partition

def _randn(seed, shape, scale=1.0):
    """Test data from NumPy (no XLA compile per shape)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


M, N, L = 24, 16, 3


def _params():
    return {"w": _randn(1, (M, N)), "stack": _randn(2, (L, M, N)),
            "norm": jnp.ones((N,))}


def _reference_dense(w: SLTrainWeight) -> np.ndarray:
    """NumPy re-implementation of SpLoRaLinear in torch's [out, in] layout, transposed back."""
    A_t, B_t = np.asarray(w.A).T, np.asarray(w.B).T          # [r, in], [out, r]
    W_t = w.scale * (B_t @ A_t)                               # [out, in]
    rows, cols = np.divmod(np.asarray(w.indices), N)          # ours: row = in, col = out
    W_t[cols, rows] += np.asarray(w.values)
    return W_t.T


def test_init_is_sparse_part_with_paper_distributions():
    f = sltrain(4, 0.03 * 8, alpha=16.0, select=r"^(w|stack)$").init(jax.random.key(1),
                                                                      _params())
    w, s = f["w"], f["stack"]
    nnz = int(0.24 * M * N)
    assert w.indices.shape == (nnz,) and s.indices.shape == (L, nnz)
    assert w.A.shape == (M, 4) and w.B.shape == (4, N) and s.A.shape == (L, M, 4)
    assert w.scale == 16.0 / 4 and w.indices.dtype == jnp.int32
    np.testing.assert_array_equal(w.B, 0.0)
    np.testing.assert_array_equal(materialize(f)["w"], w.sparse_matrix())
    bound = 1 / math.sqrt(M)
    assert float(jnp.max(jnp.abs(w.A))) <= bound and float(jnp.max(jnp.abs(w.values))) <= bound
    for idx in np.asarray(s.indices):                       # sorted, unique, in range, distinct
        assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < M * N
    assert not np.array_equal(s.indices[0], s.indices[1])
    assert int(jnp.sum(materialize(f)["stack"] != 0)) == L * nnz


def test_materialize_matches_reference_layout():
    f = sltrain(3, 0.1, select="w").init(jax.random.key(2), _params())
    w = f["w"].replace(B=_randn(13, f["w"].B.shape))
    np.testing.assert_allclose(w.materialize(), _reference_dense(w), rtol=1e-5, atol=1e-6)


def test_gradients_match_dense_gradient():
    f = sltrain(3, 0.1, select="w").init(jax.random.key(2), _params())
    w = f["w"].replace(B=_randn(13, f["w"].B.shape))
    x = _randn(14, (5, M))

    def dense_loss(W):
        return jnp.sum(jnp.tanh(x @ W))
    gW = jax.grad(dense_loss)(w.materialize())
    trainable, frozen = partition(w)
    g = jax.grad(lambda t: dense_loss(combine(t, frozen).materialize()))(trainable)
    np.testing.assert_allclose(g.values, gW.reshape(-1)[w.indices], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g.A, w.scale * gW @ w.B.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g.B, w.scale * w.A.T @ gW, rtol=1e-4, atol=1e-5)


def test_support_fixed_across_training_steps():
    f = sltrain(2, 0.1, select=r"^(w|stack)$").init(jax.random.key(0), _params())
    trainable, frozen = partition(f)
    tx = optax.adam(1e-2)
    state = tx.init(trainable)
    x = _randn(11, (4, M))

    @jax.jit
    def step(t, state):
        g = jax.grad(lambda t: jnp.sum((x @ materialize(combine(t, frozen))["w"]) ** 2))(t)
        u, state = tx.update(g, state, t)
        return optax.apply_updates(t, u), state

    t = trainable
    for _ in range(3):
        t = step(t, state)[0]
    out = combine(t, frozen)
    np.testing.assert_array_equal(out["w"].indices, f["w"].indices)
    assert not np.allclose(out["w"].values, f["w"].values)
    assert not np.allclose(out["w"].B, 0.0)
    dense = materialize(out)["w"]      # still zero off the support plus the low-rank part
    off = np.ones(M * N, bool)
    off[np.asarray(f["w"].indices)] = False
    lowrank_part = out["w"].scale * out["w"].A @ out["w"].B
    np.testing.assert_allclose(dense.reshape(-1)[off], lowrank_part.reshape(-1)[off], atol=1e-6)


def test_trainable_count_is_r_m_plus_n_plus_nnz():
    f = sltrain(4, 0.05, select="stack").init(jax.random.key(0), _params())
    rep = param_report(f)
    nnz = int(0.05 * M * N)
    assert rep.trainable_params == M * N + N + L * (4 * (M + N) + nnz)
    assert rep.stored_params == rep.trainable_params + L * nnz          # + int32 indices
    assert rep.dense_params == M * N + L * M * N + N


@pytest.mark.parametrize("rank,density", [(16, 0.01), (2, 1.0)])
def test_from_dense_reproduces_w_at_full_rank_or_full_density(rank, density):
    p = _params()
    f = sltrain(rank, density, select=r"^(w|stack)$").from_dense(jax.random.key(0), p)
    d = materialize(f)
    np.testing.assert_allclose(d["w"], p["w"], atol=2e-5)
    np.testing.assert_allclose(d["stack"], p["stack"], atol=2e-5)


def test_from_dense_magnitude_support_beats_random():
    p = _params()
    errs = {}
    for support in ("random", "magnitude"):
        f = sltrain(2, 0.2, select="w").from_dense(jax.random.key(0), p, support=support)
        errs[support] = float(jnp.linalg.norm(materialize(f)["w"] - p["w"]))
        assert np.all(np.diff(np.asarray(f["w"].indices)) > 0)
    assert errs["magnitude"] < errs["random"]


def test_eval_shape_init_is_abstract():
    abstract = jax.eval_shape(lambda: sltrain(4, 0.03, select="stack").init(
        jax.random.key(0), _params()))
    assert abstract["stack"].indices.shape == (L, int(0.03 * M * N))


def test_presets_and_bad_inputs():
    assert sltrain_preset("1B") == dict(rank=512, alpha=8.0, density=0.03)
    with pytest.raises(ValueError, match="size"):
        sltrain_preset("3b")
    for kw, match in [(dict(density=0.0), "density"), (dict(density=1.5), "density"),
                      (dict(alpha=0.0), "alpha")]:
        with pytest.raises(ValueError, match=match):
            sltrain(4, select="w", **kw)
    with pytest.raises(ValueError, match="rank"):
        sltrain(0, select="w")
    with pytest.raises(ValueError, match="rank"):
        sltrain(2.5, select="w")                   # a float rank is a fraction in (0, 1]
    with pytest.raises(TypeError, match="rank"):
        sltrain("4", select="w")
    with pytest.raises(ValueError, match="alpha"):
        sltrain(4, alpha=float("inf"), select="w")
    with pytest.raises(TypeError, match="key"):
        sltrain(2, select="w").init(0.5, _params())
    with pytest.raises(ValueError, match=r"rank=17 is larger than the matrix of leaf 'w'"):
        sltrain(17, select="w").init(jax.random.key(0), _params())
    with pytest.raises(ValueError, match="gives no nonzero"):
        sltrain(2, 1e-4, select="w").init(jax.random.key(0), _params())
    with pytest.raises(ValueError, match="support"):
        sltrain(2, select="w").from_dense(jax.random.key(0), _params(), support="topk")
