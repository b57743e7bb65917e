"""Tests for jaxeff.params.averaging: soups, parameter EMA, LAE."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.params import (GreedySoup, ema_update, greedy_soup, lae_accumulate, lae_ensemble,
                           uniform_soup)


def tree(seed, dtype=np.float32):
    r = np.random.default_rng(seed)
    return {"w": jnp.asarray(r.normal(size=(3, 4)), dtype),
            "layers": [{"b": jnp.asarray(r.normal(size=(4,)), dtype)}]}


def assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_uniform_soup_of_identical_checkpoints_is_the_checkpoint():
    for dtype in (np.float32, jnp.bfloat16):
        t = tree(0, dtype)
        assert_tree_equal(uniform_soup([t, t, t]), t)
        assert_tree_equal(uniform_soup([t]), t)


def test_uniform_and_weighted_soup_hand_computed():
    a = {"x": jnp.array([1.0, 2.0])}
    b = {"x": jnp.array([3.0, 6.0])}
    c = {"x": jnp.array([5.0, 1.0])}
    np.testing.assert_allclose(uniform_soup([a, b, c])["x"], [3.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(uniform_soup([a, b], weights=[3, 1])["x"], [1.5, 3.0], rtol=1e-6)
    np.testing.assert_allclose(uniform_soup([a, b, c], weights=[0, 1, 0])["x"], [3.0, 6.0])


def test_greedy_soup_skips_the_harmful_ingredient():
    target = {"x": jnp.array([1.0, -1.0])}
    good1 = {"x": jnp.array([1.2, -0.8])}
    good2 = {"x": jnp.array([0.8, -1.2])}
    bad = {"x": jnp.array([9.0, 9.0])}
    acc = lambda p: -float(jnp.sum((p["x"] - target["x"]) ** 2))  # noqa: E731
    res = greedy_soup([bad, good1, good2], acc)
    assert isinstance(res, GreedySoup)
    assert sorted(res.indices) == [1, 2] and res.indices[0] in (1, 2)
    np.testing.assert_allclose(res.params["x"], [1.0, -1.0], atol=1e-6)
    assert res.score == pytest.approx(0.0, abs=1e-10)
    assert res.scores[0] < res.scores[1]
    # with a loss instead of an accuracy
    res2 = greedy_soup([bad, good1, good2], lambda p: -acc(p), higher_is_better=False)
    assert sorted(res2.indices) == [1, 2]
    # unsorted: starts from the first checkpoint as given
    res3 = greedy_soup([bad, good1], acc, sort=False)
    assert res3.indices[0] == 0


def test_ema_decay_zero_copies_and_constant_is_fixed_point():
    avg, p = tree(1), tree(2)
    assert_tree_equal(ema_update(avg, p, 0.0), p)
    assert_tree_equal(ema_update(p, p, 0.999), p)
    out = ema_update({"x": jnp.array([2.0])}, {"x": jnp.array([4.0])}, 0.75)
    np.testing.assert_allclose(out["x"], [2.5])
    # the average keeps its (float32) dtype even when params are bf16
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p)
    out = ema_update(avg, p16, 0.5)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out))
    # traced decay under jit
    f = jax.jit(ema_update)
    np.testing.assert_allclose(f({"x": jnp.array([2.0])}, {"x": jnp.array([4.0])},
                                 jnp.float32(0.75))["x"], [2.5])


def test_f32_average_keeps_small_increments_that_bf16_loses():
    avg32 = {"x": jnp.ones((4,), jnp.float32)}
    avg16 = {"x": jnp.ones((4,), jnp.bfloat16)}
    p = {"x": jnp.full((4,), 1.5, jnp.bfloat16)}
    step = jax.jit(lambda a, q: ema_update(a, q, 0.999))
    for _ in range(10):
        avg32, avg16 = step(avg32, p), step(avg16, p)
    assert float(avg32["x"][0]) > 1.004       # 1 + 0.5 (1 - 0.999^10) ~ 1.005
    assert float(avg16["x"][0]) == 1.0        # every bf16 increment rounded away


def test_lae_accumulate_and_ensemble():
    on, off = {"x": jnp.array([1.0])}, {"x": jnp.array([0.0])}
    np.testing.assert_allclose(lae_accumulate(off, on, 0.9)["x"], [0.1], rtol=1e-6)
    z_on = jnp.log(jnp.array([[0.7, 0.2, 0.1]]))
    z_off = jnp.log(jnp.array([[0.1, 0.3, 0.6]]))
    q = np.array([0.7, 0.3, 0.6])
    lp = lae_ensemble(z_on, z_off)
    np.testing.assert_allclose(np.exp(lp), [q / q.sum()], rtol=1e-5)
    assert int(jnp.argmax(lp)) == 0


@pytest.mark.parametrize("call, exc, match", [
    (lambda: uniform_soup([]), ValueError, "empty"),
    (lambda: uniform_soup(tree(0)), TypeError, "list"),
    (lambda: uniform_soup([tree(0), {"w": jnp.zeros((3, 4))}]), ValueError, "structure"),
    (lambda: uniform_soup([{"w": jnp.zeros(3)}, {"w": jnp.zeros(4)}]), ValueError, "shape"),
    (lambda: uniform_soup([tree(0)], weights=[1, 2]), ValueError, "weights"),
    (lambda: uniform_soup([tree(0)], weights=[-1]), ValueError, "weights"),
    (lambda: greedy_soup([], lambda p: 0.0), ValueError, "empty"),
    (lambda: greedy_soup([tree(0)], None), TypeError, "metric_fn"),
    (lambda: ema_update(tree(0), tree(1), 1.0), ValueError, r"\[0, 1\)"),
    (lambda: ema_update(tree(0), tree(1), -0.1), ValueError, r"\[0, 1\)"),
    (lambda: ema_update(tree(0), tree(1), True), TypeError, "decay"),
    (lambda: ema_update(tree(0), {"w": jnp.zeros((3, 4))}, 0.5), ValueError, "structure"),
    (lambda: lae_ensemble(jnp.zeros((2, 3)), jnp.zeros((2, 4))), ValueError, "shape"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_int_leaves_are_never_averaged_silently():
    a = {"w": jnp.array([1.0, 2.0]), "step": jnp.array([1, 2])}
    b = {"w": jnp.array([3.0, 4.0]), "step": jnp.array([2, 3])}
    with pytest.raises(TypeError, match=r"leaf step has non-float dtype int32.*checkpoints\[1\]"):
        uniform_soup([a, b])
    with pytest.raises(TypeError, match="non-float"):
        uniform_soup([{"m": jnp.array([True])}, {"m": jnp.array([False])}])
    with pytest.raises(TypeError, match=r"between avg and params"):
        ema_update(a, b, 0.5)
    with pytest.raises(TypeError, match="non-float"):
        greedy_soup([a, b], lambda p: 0.0)
    # Equal integer leaves (a counter, packed codes) pass through; float leaves are averaged.
    c = dict(b, step=a["step"])
    out = uniform_soup([a, c])
    np.testing.assert_array_equal(out["step"], [1, 2])
    assert out["step"].dtype == jnp.int32
    np.testing.assert_allclose(out["w"], [2.0, 3.0])
    e = ema_update(a, c, 0.5)
    np.testing.assert_array_equal(e["step"], [1, 2])
    np.testing.assert_allclose(e["w"], [2.0, 3.0])


def test_greedy_soup_rejects_nan_and_array_metrics():
    a, b = {"x": jnp.array([1.0])}, {"x": jnp.array([2.0])}
    with pytest.raises(ValueError, match=r"returned nan for checkpoints\[0\]"):
        greedy_soup([a, b], lambda p: float("nan"))
    with pytest.raises(ValueError, match=r"returned inf for checkpoints\[1\]"):
        greedy_soup([a, b], lambda p: float("inf") if p is b else 1.0)
    # A finite ingredient whose soup is NaN: named too, not skipped silently.
    with pytest.raises(ValueError, match=r"the soup of checkpoints \[1, 0\]"):
        greedy_soup([a, b], lambda p: jnp.where(p["x"][0] == 1.5, jnp.nan, p["x"][0]))
    with pytest.raises(TypeError, match=r"scalar.*shape \(3,\).*checkpoints\[0\]"):
        greedy_soup([a, b], lambda p: jnp.ones(3))
    with pytest.raises(TypeError, match="real scalar; got str"):
        greedy_soup([a, b], lambda p: "0.5")
    with pytest.raises(TypeError, match="real scalar; got bool"):
        greedy_soup([a, b], lambda p: True)
    res = greedy_soup([a, b], lambda p: jnp.asarray(p["x"][0]))    # a 0-d array is fine
    assert res.indices[0] == 1
