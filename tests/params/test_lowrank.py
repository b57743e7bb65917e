"""Truncated SVD (Eckart-Young), rank rules, PELA regularisers, SVFit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxeff.params import (LowRankWeight, lowrank, pela_feature_loss, pela_rank,
                           pela_weight_perturbation, resolve_rank, svfit, truncated_svd)
from jaxeff.params import combine, materialize, partition, trainable_mask

def _randn(seed, shape, scale=1.0):
    """Test data from NumPy (no XLA compile per shape)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


M, N = 24, 16


def _params():
    return {"w": _randn(1, (M, N)), "stack": _randn(2, (3, M, N)),
            "b": jnp.zeros((N,))}


def test_eckart_young_error_and_balanced_factors():
    p = _params()
    r = 4
    f = lowrank(r, select=r"^(w|stack)$").from_dense(None, p)
    s = np.linalg.svd(np.asarray(p["w"], np.float64), compute_uv=False)
    err = np.linalg.norm(np.asarray(materialize(f)["w"]) - np.asarray(p["w"]))
    np.testing.assert_allclose(err, np.sqrt(np.sum(s[r:] ** 2)), rtol=1e-4)
    w = f["w"]
    np.testing.assert_allclose(jnp.linalg.norm(w.L), jnp.linalg.norm(w.R), rtol=1e-5)
    assert f["stack"].L.shape == (3, M, r) and f["stack"].R.shape == (3, r, N)
    for i in range(3):
        si = np.linalg.svd(np.asarray(p["stack"][i], np.float64), compute_uv=False)
        ei = np.linalg.norm(np.asarray(materialize(f)["stack"][i] - p["stack"][i]))
        np.testing.assert_allclose(ei, np.sqrt(np.sum(si[r:] ** 2)), rtol=1e-4)


def test_full_rank_reproduces_w():
    p = _params()
    f = lowrank(fraction=1.0, select=r"^(w|stack)$").from_dense(None, p)
    assert f["w"].rank == N
    np.testing.assert_allclose(materialize(f)["w"], p["w"], atol=2e-5)
    np.testing.assert_allclose(materialize(f)["stack"], p["stack"], atol=2e-5)


def test_rank_rules():
    assert pela_rank(768, 768) == 768 * 768 // (3 * 1536) == 128
    assert resolve_rank(M, N, rank="pela") == M * N // (3 * (M + N))
    assert resolve_rank(M, N, fraction=0.5) == 8 and resolve_rank(M, N, fraction=0.01) == 1
    s = np.array([[4.0, 2.0, 1.0, 0.0], [4.0, 0.1, 0.0, 0.0]])     # energies 16, 4, 1
    assert resolve_rank(8, 4, energy=16 / 21, singular_values=s[:1]) == 1
    assert resolve_rank(8, 4, energy=0.9, singular_values=s[:1]) == 2
    assert resolve_rank(8, 4, energy=0.99, singular_values=s) == 3      # max over the batch
    f = lowrank(energy=0.9, select="w").from_dense(None, _params())
    sv = np.linalg.svd(np.asarray(_params()["w"]), compute_uv=False) ** 2
    r = f["w"].rank
    assert sv[:r].sum() >= 0.9 * sv.sum() > sv[:r - 1].sum()


def test_randomized_svd_matches_exact_on_low_rank_matrix():
    W = _randn(1, (40, 6)) @ _randn(2, (6, 30))
    U, S, Vt = truncated_svd(W, 6, method="randomized", key=jax.random.key(2))
    np.testing.assert_allclose((U * S) @ Vt, W, atol=1e-3)
    np.testing.assert_allclose(S, jnp.linalg.svd(W, compute_uv=False)[:6], rtol=1e-4)


def test_init_from_scratch_matches_template_scale():
    p = {"w": 0.05 * _randn(10, (128, 96)), "z": jnp.zeros((64, 64))}
    f = lowrank(16, select="w|z").init(jax.random.key(1), p)
    d = materialize(f)
    np.testing.assert_allclose(jnp.std(d["w"]), 0.05, rtol=0.15)
    np.testing.assert_allclose(jnp.std(d["z"]), 1 / 8, rtol=0.15)     # zero template -> 1/sqrt(in)
    with pytest.raises(ValueError, match="energy"):
        lowrank(energy=0.9, select="w").init(jax.random.key(0), p)


def test_svfit_starts_at_w_and_trains_only_sigma():
    p = _params()
    f = svfit(4, select="w").from_dense(None, p)
    np.testing.assert_allclose(materialize(f)["w"], p["w"], atol=2e-5)
    mask = trainable_mask(f)["w"]
    assert mask.sigma and not (mask.U or mask.Vt or mask.residual)
    trainable, frozen = partition(f)
    tx = optax.sgd(0.1)
    g = jax.grad(lambda t: jnp.sum(materialize(combine(t, frozen))["w"] ** 2))(trainable)
    u, _ = tx.update(g, tx.init(trainable), trainable)
    new = combine(optax.apply_updates(trainable, u), frozen)
    np.testing.assert_array_equal(new["w"].U, f["w"].U)
    np.testing.assert_array_equal(new["w"].Vt, f["w"].Vt)
    assert not np.allclose(new["w"].sigma, f["w"].sigma)
    sv = np.linalg.svd(np.asarray(p["w"]), compute_uv=False)
    np.testing.assert_allclose(f["w"].sigma, sv[:4], rtol=1e-5)
    f99 = svfit(select="w").from_dense(None, p)                      # default: 99% energy
    r = f99["w"].sigma.shape[-1]
    assert (sv[:r] ** 2).sum() >= 0.99 * (sv ** 2).sum() > (sv[:r - 1] ** 2).sum()


def test_pela_regularisers_match_numpy():
    fs = [_randn(20, (3, 5)), _randn(21, (2, 4))]
    ft = [_randn(22, (3, 5)), _randn(23, (2, 4))]
    want = 0.1 * np.mean([np.mean((np.asarray(a) - np.asarray(b)) ** 2) for a, b in zip(fs, ft)])
    np.testing.assert_allclose(pela_feature_loss(fs, ft), want, rtol=1e-5)
    g = jax.grad(lambda t: pela_feature_loss(fs, t))(ft)
    assert all(float(jnp.abs(x).max()) == 0 for x in g)               # teacher is detached
    p = _params()
    f = lowrank(3, select=r"^(w|stack)$").from_dense(None, p)
    d = materialize(f)
    errs = [np.abs(d["w"] - p["w"]).max()] + [np.abs(d["stack"][i] - p["stack"][i]).max()
                                              for i in range(3)]
    want = np.mean([(e - 1e-3) ** 2 for e in errs])
    np.testing.assert_allclose(pela_weight_perturbation(f, p), want, rtol=1e-5)
    with pytest.raises(ValueError, match="same length"):
        pela_feature_loss(fs, ft[:1])
    with pytest.raises(ValueError, match="no structured leaf"):
        pela_weight_perturbation(p, p)


def test_bad_inputs():
    with pytest.raises(ValueError, match="exactly one"):
        lowrank(4, fraction=0.5, select="w")
    with pytest.raises(ValueError, match="exactly one"):
        lowrank(select="w")
    with pytest.raises(ValueError, match="fraction"):
        lowrank(fraction=0.0, select="w")
    with pytest.raises(ValueError, match="energy"):
        svfit(energy=1.5, select="w")
    with pytest.raises(ValueError, match="rank"):
        lowrank(-1, select="w")
    with pytest.raises(ValueError, match="method"):
        lowrank(2, select="w", method="qr")
    with pytest.raises(ValueError, match=r"rank=17 is larger than leaf 'w' \(24 x 16\)"):
        lowrank(17, select="w").from_dense(None, _params())
    with pytest.raises(ValueError, match="key"):
        lowrank(2, select="w", method="randomized").from_dense(None, _params())
    assert isinstance(lowrank(2, select="w").from_dense(None, _params())["w"], LowRankWeight)
