"""Tests for jaxeff.optim.hessian: the GNB and Hutchinson diagonal-Hessian estimators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, PartitionSpec as P

from jaxeff.optim import gnb, hutchinson

D, H, V, N = 3, 4, 3, 6


def mlp_logits(p, b):
    return jnp.tanh(b["x"] @ p["w1"]) @ p["w2"]


def jit_estimate(est, params, **kw):
    """est.estimate under jit (eager mode would compile every primitive separately)."""
    obj_fn = kw.pop("obj_fn", None)
    return jax.jit(lambda q, kw: est.estimate(q, obj_fn=obj_fn, **kw) if obj_fn
                   else est.estimate(q, **kw))(params, kw)


def setup():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    p = {"w1": jax.random.normal(k1, (D, H)), "w2": jax.random.normal(k2, (H, V))}
    b = {"x": jax.random.normal(k3, (N, D))}
    return p, b


@jax.jit
def exact_gauss_newton_diag(p, b):
    """diag((1/N) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i), J_i = d logits_i / d theta."""
    flat, unravel = ravel_pytree(p)
    J = jax.jacrev(lambda f: mlp_logits(unravel(f), b))(flat)          # [N, V, P]
    pr = jax.nn.softmax(mlp_logits(p, b), -1)                           # [N, V]
    S = jax.vmap(jnp.diag)(pr) - pr[:, :, None] * pr[:, None, :]        # [N, V, V]
    gn = jnp.einsum("nap,nab,nbp->p", J, S, J) / N
    return unravel(gn)


@jax.jit
def hessian_diag(p, b):
    flat, unravel = ravel_pytree(p)
    y = jnp.argmax(mlp_logits(p, b), -1)
    loss = lambda f: -jnp.mean(jnp.take_along_axis(
        jax.nn.log_softmax(mlp_logits(unravel(f), b)), y[:, None], -1))
    return unravel(jnp.diag(jax.hessian(loss)(flat)))


def within_sampling_error(samples, exact, n_se=5.0):
    mean = samples.mean(0)
    se = samples.std(0) / np.sqrt(samples.shape[0])
    np.testing.assert_array_less(np.abs(mean - exact), n_se * se + 1e-6 * np.abs(exact).max())


def test_gnb_is_the_gauss_newton_diagonal_in_expectation():
    p, b = setup()
    est = gnb(mlp_logits)
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    samples = jax.jit(jax.vmap(lambda k: est.estimate(p, batch=b, key=k)))(keys)
    gn = exact_gauss_newton_diag(p, b)
    for name in p:
        within_sampling_error(np.asarray(samples[name]), np.asarray(gn[name]))
        assert np.all(np.asarray(samples[name]) >= 0)
    # The Gauss-Newton diagonal is not the Hessian diagonal here (the model is nonlinear), so
    # the test can tell them apart.
    hdiag = hessian_diag(p, b)
    assert not np.allclose(hdiag["w1"], gn["w1"], rtol=0.05)


def test_gnb_mask_batch_size_clip_and_max_rows():
    p, b = setup()
    key = jax.random.PRNGKey(3)
    bm = dict(b, loss_mask=jnp.ones((N,)))
    half = jnp.arange(N) < N // 2

    @jax.jit
    def all_variants(p):
        return dict(
            full=gnb(mlp_logits, mask_key=None).estimate(p, batch=b, key=key),
            ones=gnb(mlp_logits).estimate(p, batch=bm, key=key),
            fixed=gnb(mlp_logits, batch_size=2 * N).estimate(p, batch=bm, key=key),
            clipped=gnb(mlp_logits, grad_clip=1e-3).estimate(p, batch=bm, key=key),
            half_mask=gnb(mlp_logits).estimate(p, batch=dict(b, loss_mask=half), key=key),
            half_mask_other=gnb(mlp_logits).estimate(
                p, batch=dict(loss_mask=half, x=b["x"].at[N // 2:].set(7.0)), key=key),
            first_half=gnb(mlp_logits).estimate(p, batch={"x": b["x"][:N // 2]}, key=key),
            max_rows=gnb(mlp_logits, max_rows=N // 2).estimate(p, batch=b, key=key))

    out = all_variants(p)
    # A mask of ones changes nothing; a fixed batch_size B' gives B' (g B / B')^2 = (B/B') B g^2.
    np.testing.assert_allclose(out["ones"]["w1"], out["full"]["w1"], rtol=1e-6)
    np.testing.assert_allclose(out["fixed"]["w2"], out["full"]["w2"] / 2, rtol=1e-5)
    # Clipping g_hat to a tiny global norm bounds sum(h_hat) by B * clip^2.
    tot = sum(float(jnp.sum(x)) for x in jax.tree.leaves(out["clipped"]))
    assert 0 < tot <= N * 1e-6 * (1 + 1e-5)
    # max_rows = the estimate on a prefix of the batch; masked rows have no influence at all.
    np.testing.assert_allclose(out["max_rows"]["w1"], out["first_half"]["w1"], rtol=1e-6)
    np.testing.assert_allclose(out["half_mask"]["w1"], out["half_mask_other"]["w1"], rtol=1e-6)
    assert not np.allclose(out["half_mask"]["w1"], out["full"]["w1"])
    with pytest.raises(ValueError, match="loss_mask"):
        jit_estimate(gnb(mlp_logits), p, batch=dict(b, loss_mask=jnp.ones((N, 2))), key=key)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_hutchinson_unbiased_on_a_quadratic(dist):
    A = jax.random.normal(jax.random.PRNGKey(2), (5, 5))
    A = A @ A.T + jnp.diag(jnp.arange(1.0, 6.0))
    obj = lambda q: 0.5 * q["x"] @ A @ q["x"]
    p = {"x": jnp.ones(5)}
    est = hutchinson(distribution=dist)
    multi_est = hutchinson(n_probes=400, distribution=dist)

    @jax.jit
    def draw():
        keys = jax.random.split(jax.random.PRNGKey(0), 3000)
        single = jax.vmap(lambda k: est.estimate(p, key=k, obj_fn=obj)["x"])(keys)
        return single, multi_est.estimate(p, key=jax.random.PRNGKey(9), obj_fn=obj)["x"]

    samples, multi = draw()
    within_sampling_error(np.asarray(samples), np.asarray(jnp.diag(A)))
    # n_probes averages probes in a scan: same expectation, ~1/sqrt(n) the spread.
    se = np.asarray(samples).std(0) / np.sqrt(400)
    np.testing.assert_array_less(np.abs(np.asarray(multi) - np.diag(A)), 5 * se)


def test_hutchinson_rademacher_exact_for_diagonal_hessian_and_loss_fn_with_aux():
    d = jnp.array([1.0, -2.0, 3.0])
    loss_fn = lambda q, b: (0.5 * jnp.sum(d * q["x"] ** 2) * b["s"], {"aux": 0})
    est = hutchinson(loss_fn)
    out = jit_estimate(est, {"x": jnp.ones(3)}, batch={"s": 2.0}, key=jax.random.PRNGKey(0))
    np.testing.assert_allclose(out["x"], 2.0 * d, rtol=1e-6)  # u_i^2 = 1: exact, signed


def test_shard_map_axis_name_sums_g_hat_before_squaring():
    """Under shard_map, axis_name makes g_hat the global mean gradient and B the global count."""
    p, b = setup()
    x = jnp.concatenate([b["x"], b["x"]])[:8]
    mask = jnp.ones((8,))
    mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
    key = jax.random.PRNGKey(4)
    est = gnb(mlp_logits, axis_name="d")
    per_device = lambda xb, mb: est.estimate(p, batch={"x": xb, "loss_mask": mb}, key=key)
    out = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("d"), P("d")),
                                out_specs=P(), check_vma=False))(x, mask)

    def part(i):  # device i: one row, labels drawn with the (shared) key, divided by global B
        logits, vjp = jax.vjp(lambda q: mlp_logits(q, {"x": x[i:i + 1]}), p)
        y = jax.random.categorical(key, logits, -1)
        return vjp((jax.nn.softmax(logits, -1) - jax.nn.one_hot(y, V)) / 8.0)[0]

    g = jax.jit(lambda: jax.tree.map(lambda *xs: sum(xs), *[part(i) for i in range(8)]))()
    for name in p:
        np.testing.assert_allclose(out[name], 8.0 * g[name] ** 2, rtol=1e-4, atol=1e-7)


def test_bad_inputs():
    with pytest.raises(TypeError, match="logits_fn"):
        gnb(None)
    with pytest.raises(ValueError, match="n_probes"):
        hutchinson(lambda p, b: 0.0, n_probes=0)
    with pytest.raises(ValueError, match="distribution"):
        hutchinson(distribution="uniform")
    with pytest.raises(ValueError, match="grad_clip"):
        gnb(mlp_logits, grad_clip=-1.0)
    with pytest.raises(ValueError, match="batch_size"):
        gnb(mlp_logits, batch_size=0)
    p, b = setup()
    with pytest.raises(ValueError, match="batch"):
        jit_estimate(gnb(mlp_logits), p, batch=None, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="loss_fn"):
        hutchinson().estimate(p, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="key"):
        hutchinson(lambda q, bb: 0.0).estimate(p, batch=b, key=None)
