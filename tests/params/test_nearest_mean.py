"""Nearest-class-mean classifier: streaming means, cosine/Euclidean prediction, head form."""
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxeff.params import (ClassMeans, add_classes, init_class_means, linear_logits, nmc_head,
                           nmc_predict, nmc_scores, update_class_means)


def _stream(state, x, y, sizes, mask=None):
    i = 0
    for n in sizes:
        state = update_class_means(state, x[i:i + n], y[i:i + n],
                                   None if mask is None else mask[i:i + n])
        i += n
    return state


def test_streaming_equals_batch_means_any_split():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(60, 4)) + 100.0).astype(np.float32)     # a large offset
    y = rng.integers(0, 3, 60)
    mask = rng.random(60) > 0.2
    a = _stream(init_class_means(5, 4), x, y, [60], mask)
    b = _stream(init_class_means(5, 4), x, y, [1, 7, 13, 2, 30, 7], mask)
    c = jax.jit(update_class_means)(init_class_means(5, 4), x, y, mask)
    for c_id in range(3):
        ref = x[(y == c_id) & mask].astype(np.float64).mean(0)
        for s in (a, b, c):
            np.testing.assert_allclose(s.mean[c_id], ref, rtol=1e-6)
    np.testing.assert_array_equal(a.count, [np.sum((y == c) & mask) for c in range(5)])
    np.testing.assert_array_equal(a.mean[3:], 0.0)                   # unseen classes stay zero


def test_hand_computed_cosine_vs_euclidean():
    # class 0 mean (1, 0), class 1 mean (10, 1); x = (2, 0.3):
    # |x - mu0|^2 = 1.09 < |x - mu1|^2 = 64.49  -> Euclidean picks 0
    # cos(x, mu0) = 2 / 2.02237 = 0.988936 < cos(x, mu1) = 20.3 / (2.02237 * 10.04988) = 0.998789
    s = update_class_means(init_class_means(2, 2), jnp.array([[1.0, 0.0], [10.0, 1.0]]),
                           jnp.array([0, 1]))
    x = jnp.array([[2.0, 0.3]])
    np.testing.assert_allclose(nmc_scores(s, x, "euclidean"), [[-1.09, -64.49]], rtol=1e-5)
    np.testing.assert_allclose(nmc_scores(s, x, "cosine"), [[0.988936, 0.998789]], rtol=1e-5)
    assert int(nmc_predict(s, x, "euclidean")[0]) == 0
    assert int(nmc_predict(s, x)[0]) == 1                               # cosine is the default


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_separable_clusters_incremental_tasks_perfect(metric):
    rng = np.random.default_rng(1)
    centers = 6.0 * np.eye(8)[:6]                                        # 6 classes, 2 per task
    s = init_class_means(6, 8)
    for task in range(3):
        cls = np.repeat([2 * task, 2 * task + 1], 40)
        s = update_class_means(s, centers[cls] + rng.normal(size=(80, 8)), cls)
        test_y = np.repeat(np.arange(2 * task + 2), 20)
        test_x = centers[test_y] + rng.normal(size=(len(test_y), 8))
        pred = np.asarray(nmc_predict(s, test_x, metric))
        np.testing.assert_array_equal(pred, test_y)                      # never an unseen class
    s = add_classes(s, 2)                                                # capacity grows
    assert s.mean.shape == (8, 8) and int(s.count[6:].sum()) == 0
    assert bool(jnp.all(jnp.isneginf(nmc_scores(s, test_x, metric)[:, 6:])))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_head_form_equals_distance_form(metric):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 5)).astype(np.float32)
    y = rng.integers(0, 4, 50)
    s = update_class_means(init_class_means(6, 5), x, y)                 # classes 4, 5 unseen
    q = rng.normal(size=(30, 5)).astype(np.float32)
    head = nmc_head(s, metric)
    assert head["w"].shape == (5, 6) and head["b"].shape == (6,)
    logits = np.asarray(linear_logits(head, q))
    scores = np.asarray(nmc_scores(s, q, metric))
    qn = np.linalg.norm(q, axis=1, keepdims=True)
    if metric == "cosine":                    # logits = |x| cos
        np.testing.assert_allclose(logits[:, :4], qn * scores[:, :4], rtol=1e-5, atol=1e-5)
    else:                                     # logits = -|x - mu|^2 + |x|^2
        np.testing.assert_allclose(logits[:, :4], scores[:, :4] + qn ** 2, rtol=1e-5, atol=1e-4)
    assert np.all(logits[:, 4:] < -1e30) and np.all(np.isfinite(logits))
    np.testing.assert_array_equal(logits.argmax(1), np.asarray(nmc_predict(s, q, metric)))


def test_orbax_round_trip_then_continue(tmp_path):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(20, 3)).astype(np.float32), rng.integers(0, 4, 20)
    s = update_class_means(init_class_means(4, 3), x[:10], y[:10])
    ck = ocp.StandardCheckpointer()
    ck.save(tmp_path / "m", s)
    ck.wait_until_finished()
    r = ClassMeans(*ck.restore(tmp_path / "m", s))
    for a, b in zip(update_class_means(s, x[10:], y[10:]), update_class_means(r, x[10:], y[10:])):
        np.testing.assert_array_equal(a, b)


def test_bad_inputs():
    s = init_class_means(3, 4)
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\).*\[0, 3\]"):
        update_class_means(s, x, jnp.array([0, 3]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        update_class_means(s, x, jnp.array([-1, 0]))
    with pytest.raises(ValueError, match="feature dim 5, but the state holds dim 4"):
        update_class_means(s, jnp.ones((2, 5)), jnp.array([0, 1]))
    with pytest.raises(ValueError, match="empty batch"):
        update_class_means(s, jnp.ones((0, 4)), jnp.zeros((0,), jnp.int32))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        update_class_means(s, x, jnp.array([0, 1, 2]))
    with pytest.raises(TypeError, match="labels must be integers"):
        update_class_means(s, x, jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"mask must have shape \(2,\)"):
        update_class_means(s, x, jnp.array([0, 1]), mask=jnp.ones(3, bool))
    with pytest.raises(ValueError, match="metric must be one of"):
        nmc_scores(s, x, "manhattan")
    with pytest.raises(ValueError, match="seen no class"):
        nmc_predict(s, x)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        init_class_means(0, 4)
    with pytest.raises(ValueError, match="num_new must be a positive int"):
        add_classes(s, 0)
    with pytest.raises(TypeError, match="count"):
        nmc_head({"w": 1})
    with pytest.raises(ValueError, match=r"head\['w'\] must be \[D, C\]"):
        linear_logits({"w": jnp.ones((3, 2))}, x)
