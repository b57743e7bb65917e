"""LoRA adapters: zero-init B, alpha/r scaling, merge == adapted forward, frozen base."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxeff.params import param_report, tree_bytes
from jaxeff.params import LoRA, lora
from jaxeff.params import combine, materialize, partition

def _randn(seed, shape, scale=1.0):
    """Test data from NumPy (no XLA compile per shape)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


M, N = 24, 16


def _params():
    return {"w": _randn(1, (M, N)), "stack": _randn(2, (3, M, N)),
            "b": jnp.zeros((N,))}


def test_zero_b_gives_the_base_model_and_scale_is_alpha_over_r():
    p = _params()
    f = lora(4, 16.0, select=r"^(w|stack)$").from_dense(jax.random.key(1), p)
    assert f["w"].scale == 4.0 and f["stack"].A.shape == (3, M, 4)
    np.testing.assert_array_equal(materialize(f)["w"], p["w"])
    np.testing.assert_array_equal(materialize(f)["stack"], p["stack"])
    assert lora(8, select="w").alpha == 8.0                     # default alpha = rank: scale 1


def test_merge_equals_adapted_forward():
    p = _params()
    f = lora(4, 8.0, select="w").from_dense(jax.random.key(1), p)
    w = f["w"].replace(B=_randn(12, (4, N)))
    x = _randn(13, (5, M))
    merged = LoRA.merge({"w": w})["w"]
    want = np.asarray(x) @ np.asarray(p["w"]) + 2.0 * (np.asarray(x) @ np.asarray(w.A)) @ \
        np.asarray(w.B)
    np.testing.assert_allclose(w.apply(x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x @ merged, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unbatched"):
        lora(2, select="stack").from_dense(jax.random.key(0), p)["stack"].apply(x)


def test_base_is_frozen_and_carries_no_optimizer_state():
    p = _params()
    f = lora(2, select=r"^(w|stack)$").from_dense(jax.random.key(1), p)
    trainable, frozen = partition(f)
    assert trainable["w"].base is None and frozen["w"].base is not None
    tx = optax.adam(1e-2)
    state = tx.init(trainable)
    rep = param_report(f)
    assert rep.trainable_params == 2 * (M + N) * 4        # adapters only: the bias is frozen
    assert tree_bytes(state) == 4 * (2 * rep.trainable_params + 1)     # mu, nu, count
    x = _randn(13, (5, M))
    g = jax.grad(lambda t: jnp.sum((x @ materialize(combine(t, frozen))["w"]) ** 2))(trainable)
    u, _ = tx.update(g, state, trainable)
    new = combine(optax.apply_updates(trainable, u), frozen)
    np.testing.assert_array_equal(new["w"].base, p["w"])
    assert not np.allclose(new["w"].B, 0.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="rank"):
        lora(0, select="w")
    with pytest.raises(TypeError, match="rank"):
        lora("4", select="w")
    with pytest.raises(ValueError, match="alpha"):
        lora(2, -1.0, select="w")
    with pytest.raises(ValueError, match=r"rank=17 is larger than the matrix of leaf 'w'"):
        lora(17, select="w").from_dense(jax.random.key(0), _params())
