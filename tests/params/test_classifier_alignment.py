"""SLCA classifier alignment: streaming Gaussian statistics, pseudo-features, head alignment."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxeff.params import (ClassStats, align_classifier, alignment_optimizer, class_covariance,
                           init_class_stats, logit_norm, merge_class_stats,
                           sample_pseudo_features, update_class_stats)
from jaxeff.params import linear_logits


def _data(seed=0, n=90, d=3, c=3, offset=0.0):
    rng = np.random.default_rng(seed)
    return ((rng.normal(size=(n, d)) * [1.0, 2.0, 0.5][:d] + offset).astype(np.float32),
            rng.integers(0, c, n))


def test_streaming_equals_batch_stats_and_is_numerically_sound():
    # offset 1e3 with unit spread: a float32 sum-of-squares formula (E[x^2] - E[x]^2) loses
    # about 6 of its 7 digits here; the merge of centered moments does not
    x, y = _data(offset=1e3)
    mask = np.arange(len(y)) % 7 != 3
    upd = jax.jit(update_class_stats)
    s = init_class_stats(4, 3)
    for lo, hi in [(0, 1), (1, 8), (8, 40), (40, 90)]:
        s = upd(s, x[lo:hi], y[lo:hi], mask[lo:hi])
    cov = class_covariance(s)
    for c in range(3):
        xc = x[(y == c) & mask].astype(np.float64)
        assert int(s.count[c]) == len(xc)
        np.testing.assert_allclose(s.mean[c], xc.mean(0), rtol=1e-6)
        np.testing.assert_allclose(cov[c], np.cov(xc.T), rtol=2e-3, atol=2e-3)
    assert int(s.count[3]) == 0 and float(jnp.abs(cov[3]).max()) == 0.0
    # merging two halves computed separately equals one pass
    a = update_class_stats(init_class_stats(4, 3), x[:45], y[:45], mask[:45])
    b = update_class_stats(init_class_stats(4, 3), x[45:], y[45:], mask[45:])
    m = merge_class_stats(a, b)
    np.testing.assert_allclose(m.mean, s.mean, rtol=1e-6)
    np.testing.assert_allclose(m.m2, s.m2, rtol=1e-3, atol=1e-2)


def test_covariance_ridge_and_shrinkage_hand_computed():
    # one class, samples (0,0), (2,0), (0,2), (2,2): mean (1,1); M2 = diag(4, 4); ddof 1 -> 4/3
    s = update_class_stats(init_class_stats(1, 2), jnp.array([[0., 0], [2, 0], [0, 2], [2, 2]]),
                           jnp.zeros(4, jnp.int32))
    np.testing.assert_allclose(s.mean[0], [1.0, 1.0])
    np.testing.assert_allclose(class_covariance(s)[0], np.diag([4 / 3, 4 / 3]), rtol=1e-6)
    np.testing.assert_allclose(class_covariance(s, ddof=0)[0], np.eye(2), rtol=1e-6)
    # anisotropic class: samples (-1,0), (1,0): S = diag(2, 0); a = 0.5 -> 0.5 S + 0.5 * 1 * I
    t = update_class_stats(init_class_stats(1, 2), jnp.array([[-1., 0], [1, 0]]),
                           jnp.zeros(2, jnp.int32))
    np.testing.assert_allclose(class_covariance(t, ridge=0.1, shrinkage=0.5)[0],
                               np.diag([1.6, 0.6]), rtol=1e-6)


def test_pseudo_features_have_the_class_moments():
    x, y = _data(seed=1, n=300)
    s = update_class_stats(init_class_stats(4, 3), x, y)
    k = 20000
    xs, ys, valid = sample_pseudo_features(jax.random.key(0), s, k, ridge=0.0,
                                           mean_scale=jnp.array([1.0, 0.5, 1.0, 1.0]))
    assert xs.shape == (4 * k, 3)
    np.testing.assert_array_equal(np.asarray(valid).reshape(4, k).all(1), [1, 1, 1, 0])
    cov = np.asarray(class_covariance(s))
    for c in range(3):
        xc = np.asarray(xs)[np.asarray(ys) == c]
        scale = 0.5 if c == 1 else 1.0
        np.testing.assert_allclose(xc.mean(0), scale * np.asarray(s.mean[c]), atol=0.05)
        np.testing.assert_allclose(np.cov(xc.T), cov[c], atol=0.08 * np.abs(cov[c]).max())
    # a rank-deficient class (all samples on a line) with ridge 0 still samples (no NaN)
    line = update_class_stats(init_class_stats(1, 3), jnp.outer(jnp.arange(5.0), jnp.ones(3)),
                              jnp.zeros(5, jnp.int32))
    xl, _, _ = sample_pseudo_features(jax.random.key(1), line, 64, ridge=0.0)
    assert np.isfinite(np.asarray(xl)).all()
    np.testing.assert_allclose(np.asarray(xl)[:, 0], np.asarray(xl)[:, 2], atol=1e-2)


def test_logit_norm_matches_reference_formula():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(6, 5)).astype(np.float32)
    tasks = np.array([0, 0, 1, 1, 2])
    valid = np.array([1, 1, 1, 1, 0], bool)        # task 2 has no seen class yet
    # reference (models/slca.py): per-task L2 norms of the seen logits, averaged, / tau
    norms = np.stack([np.linalg.norm(z[:, tasks == t][:, valid[tasks == t]], axis=1) + 1e-7
                      for t in (0, 1)], 1).mean(1, keepdims=True)
    np.testing.assert_allclose(logit_norm(z, 0.1, tasks, valid), z / norms / 0.1, rtol=1e-5)
    one = np.linalg.norm(z, axis=1, keepdims=True) + 1e-7
    np.testing.assert_allclose(logit_norm(z, 0.5), z / one / 0.5, rtol=1e-5)
    assert logit_norm(z, None) is z


def test_alignment_fixes_a_biased_head_on_two_gaussians():
    rng = np.random.default_rng(3)
    mu = np.array([[2.0, 0.0], [-2.0, 0.0]], np.float32)
    y = np.repeat([0, 1], 200)
    x = (mu[y] + rng.normal(size=(400, 2))).astype(np.float32)
    s = update_class_stats(init_class_stats(3, 2), x, y)                # class 2 never seen
    head = {"w": jnp.array([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0]]), "b": jnp.array([1.0, 0.0, 5.0])}
    # class-incremental evaluation: argmax over the classes seen so far (0 and 1)
    acc0 = float(jnp.mean(jnp.argmax(linear_logits(head, x)[:, :2], -1) == y))
    assert acc0 <= 0.6                                                  # biased to class 0
    align = jax.jit(lambda k, h, st: align_classifier(k, h, st, task_ids=np.array([0, 1, 1])))
    new, losses = align(jax.random.key(0), head, s)
    assert losses.shape == (5 * 3,) and float(losses[-1]) < float(losses[0])
    pred = jnp.argmax(linear_logits(new, x)[:, :2], -1)
    assert float(jnp.mean(pred == y)) >= 0.95                           # Bayes rate 0.977
    # the unseen class gets no gradient: only weight decay (5e-4 per step, lr <= 0.01) moves it
    np.testing.assert_allclose(new["b"][2], 5.0, rtol=1e-3)
    # any optax transform and no logit normalization also work
    new2, _ = align_classifier(jax.random.key(1), head, s, tx=optax.adam(0.05), tau=None,
                               num_epochs=3, num_per_class=128, batch_size=64)
    assert float(jnp.mean(jnp.argmax(linear_logits(new2, x)[:, :2], -1) == y)) >= 0.95


def test_alignment_optimizer_is_per_epoch_cosine_sgd():
    tx = alignment_optimizer(steps_per_epoch=2, num_epochs=4, lr=0.1, momentum=0.0,
                             weight_decay=0.0)
    p = {"w": jnp.zeros(())}
    st = tx.init(p)
    steps = []
    for _ in range(8):
        u, st = tx.update({"w": jnp.ones(())}, st, p)
        steps.append(-float(u["w"]))
    lr = [0.05 * (1 + np.cos(np.pi * e / 4)) for e in (0, 0, 1, 1, 2, 2, 3, 3)]
    np.testing.assert_allclose(steps, lr, rtol=1e-6)


def test_orbax_round_trip_and_sharded_equals_single(tmp_path):
    x, y = _data(seed=4, n=64)
    s = update_class_stats(init_class_stats(3, 3), x[:32], y[:32])
    ck = ocp.StandardCheckpointer()
    ck.save(tmp_path / "s", s)
    ck.wait_until_finished()
    r = ClassStats(*ck.restore(tmp_path / "s", s))
    for a, b in zip(update_class_stats(s, x[32:], y[32:]), update_class_stats(r, x[32:], y[32:])):
        np.testing.assert_array_equal(a, b)
    mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
    xs = jax.device_put(x, NamedSharding(mesh, P("d", None)))
    ys = jax.device_put(y, NamedSharding(mesh, P("d")))
    single = jax.jit(update_class_stats)(init_class_stats(3, 3), x, y)
    sharded = jax.jit(update_class_stats)(init_class_stats(3, 3), xs, ys)
    for a, b in zip(single, sharded):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    s = init_class_stats(3, 4)
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        update_class_stats(s, x, jnp.array([0, 5]))
    with pytest.raises(ValueError, match="feature dim 5, but the stats hold dim 4"):
        update_class_stats(s, jnp.ones((2, 5)), jnp.array([0, 1]))
    with pytest.raises(ValueError, match="empty batch"):
        update_class_stats(s, jnp.ones((0, 4)), jnp.zeros((0,), jnp.int32))
    with pytest.raises(ValueError,
                       match=r"ridge must be a finite number in \[0.0, inf\); got -0.1"):
        class_covariance(s, ridge=-0.1)
    with pytest.raises(ValueError, match="ridge"):
        sample_pseudo_features(jax.random.key(0), s, 4, ridge=float("nan"))
    with pytest.raises(ValueError, match="shrinkage"):
        class_covariance(s, shrinkage=1.5)
    with pytest.raises(ValueError, match="ddof must be 0 or 1"):
        class_covariance(s, ddof=2)
    with pytest.raises(ValueError, match=r"mean_scale must be a scalar or shape \(3,\)"):
        sample_pseudo_features(jax.random.key(0), s, 4, mean_scale=jnp.ones(2))
    with pytest.raises(TypeError, match="stats must be a ClassStats"):
        class_covariance({"count": 1})
    with pytest.raises(ValueError, match="a has 3 classes x 4 dims but b has 2 x 4"):
        merge_class_stats(s, init_class_stats(2, 4))
    head = {"w": jnp.zeros((4, 3))}
    with pytest.raises(ValueError, match="batch_size=100 exceeds the 12 samples"):
        align_classifier(jax.random.key(0), head, s, num_per_class=4, batch_size=100)
    with pytest.raises(ValueError, match=r"task_ids must be non-negative ints of shape \(3,\)"):
        align_classifier(jax.random.key(0), head, s, task_ids=[0, 1])
    with pytest.raises(ValueError, match="tau"):
        align_classifier(jax.random.key(0), head, s, tau=0.0)
    with pytest.raises(ValueError, match=r"to \[N, 3\] logits"):
        align_classifier(jax.random.key(0), {"w": jnp.zeros((4, 2))}, s)
    with pytest.raises(TypeError, match="tx must be an optax"):
        align_classifier(jax.random.key(0), head, s, tx="sgd")
    with pytest.raises(ValueError, match="momentum"):
        alignment_optimizer(1, momentum=1.0)
