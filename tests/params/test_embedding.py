"""Embedding rows for vocabulary extension: ``extend_embedding``, ``mean_rows``, ``random_rows``."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.params import extend_embedding, mean_rows, random_rows


def test_extend_embedding_keeps_old_rows_tied_and_untied():
    params = {"embed": jnp.arange(12.0).reshape(4, 3), "head": jnp.ones((3, 4)), "b": jnp.ones(2)}
    rows = jnp.full((2, 3), 7.0)
    out = extend_embedding(params, rows)
    np.testing.assert_array_equal(out["embed"][:4], params["embed"])
    np.testing.assert_array_equal(out["embed"][4:], rows)
    assert out["head"].shape == (3, 4) and out["b"] is params["b"]
    out = extend_embedding(params, rows, head="head", head_rows_NxD=jnp.zeros((2, 3)))
    assert out["head"].shape == (3, 6)
    np.testing.assert_array_equal(out["head"][:, :4], params["head"])
    np.testing.assert_array_equal(out["head"][:, 4:], 0.0)
    with pytest.raises(ValueError, match="embed='emb'"):
        extend_embedding(params, rows, embed="emb")
    with pytest.raises(ValueError, match="width"):
        extend_embedding(params, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="head=.b."):
        extend_embedding(params, rows, head="b")
    with pytest.raises(TypeError, match="floating"):
        extend_embedding(params, jnp.ones((2, 3), jnp.int32))


def test_mean_rows_hand_computed_and_random_scale():
    E = jnp.asarray([[1.0, 2.0], [3.0, 6.0], [-1.0, 0.0]])
    np.testing.assert_allclose(mean_rows(E, [(0, 1), (2,), (1, 1, 2)]),
                               [[2.0, 4.0], [-1.0, 0.0], [5.0 / 3.0, 4.0]], rtol=1e-6)
    with pytest.raises(ValueError, match=r"pieces\[1\]"):
        mean_rows(E, [(0,), (3,)])
    with pytest.raises(ValueError, match=r"pieces\[0\]"):
        mean_rows(E, [()])
    with pytest.raises(TypeError, match="integer"):
        mean_rows(E, [(0.5,)])
    big = jax.random.normal(jax.random.key(0), (2000, 16)) * 0.3 + 0.1
    r = random_rows(jax.random.key(1), big, 4000)
    assert r.shape == (4000, 16) and r.dtype == big.dtype
    assert abs(float(jnp.std(r)) - float(jnp.std(big))) < 0.02 and abs(float(jnp.mean(r))) < 0.02
    with pytest.raises(ValueError, match="n"):
        random_rows(0, big, 0)
    with pytest.raises(TypeError, match="key"):
        random_rows(0.5, big, 2)
