"""Tests for jaxeff.optim.sophia (TECHNIQUES.md §1 invariants, reference parity, composition)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxeff.optim import (SophiaState, gnb, hutchinson, is_refresh_step, scale_by_sophia, sophia,
                          sophia_extra_args, sophia_win_rate, split_refresh)

D, V, N = 4, 5, 8


# ----------------------------------------------------------------------------- a small problem
def softmax_logits(p, b):
    return b["x"] @ p["w"] + p["b"]


def ce_loss(p, b):
    logp = jax.nn.log_softmax(softmax_logits(p, b), -1)
    return -jnp.mean(jnp.take_along_axis(logp, b["y"][:, None], -1))


# Data and keys come from NumPy / one jitted call: eager jax ops would compile one by one.
grad_ce = jax.jit(jax.grad(ce_loss))


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(0.5 * rng.standard_normal((D, V)), jnp.float32),
            "b": jnp.asarray(0.1 * rng.standard_normal((V,)), jnp.float32)}


def make_batches(n, seed=1, rows=N, x_scale=1.0):
    rng = np.random.default_rng(seed)
    return [{"x": jnp.asarray(x_scale * rng.standard_normal((rows, D)), jnp.float32),
             "y": jnp.asarray(rng.integers(0, V, (rows,)), jnp.int32)} for _ in range(n)]


@jax.jit
def step_keys(seed):
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.arange(32))


_categorical = jax.jit(lambda key, logits: jax.random.categorical(key, logits, axis=-1))


def make_step(tx, *, pass_key=True, refresh=None):
    @jax.jit
    def step(p, s, b, key):
        g = grad_ce(p, b)
        kw = sophia_extra_args(refresh)(p, b, key)
        if not pass_key:
            kw.pop("key")
        u, s = tx.update(g, s, p, **kw)
        return optax.apply_updates(p, u), s, u
    return step


def run(tx, steps, *, p=None, batches=None, seed=7, **kw):
    p = make_params() if p is None else p
    batches = batches or make_batches(steps)
    s = tx.init(p)
    step = make_step(tx, **kw)
    keys = step_keys(seed)
    us = []
    for i in range(steps):
        p, s, u = step(p, s, batches[i], keys[i])
        us.append(u)
    return p, s, us


def sophia_state(s) -> SophiaState:
    return [x for x in jax.tree.leaves(s, is_leaf=lambda x: isinstance(x, SophiaState))
            if isinstance(x, SophiaState)][0]


# ----------------------------------------------------------------------------- reference parity
def _np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _np_grad(p, x, y):
    """Analytic gradient of the mean cross-entropy of softmax regression (float32)."""
    probs = _np_softmax(x @ p["w"] + p["b"])
    d = (probs - np.eye(V, dtype=np.float32)[y]) / np.float32(len(y))
    return {"w": x.T @ d, "b": d.sum(0)}


def _np_clip(g, max_norm):
    norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in g.values()))
    scale = min(1.0, max_norm / max(norm, 1e-30))
    return {k: (v * np.float32(scale)).astype(np.float32) for k, v in g.items()}


def reference_sophiag(p, batches, keys, lr_fn, *, b1, b2, rho, wd, k):
    """NumPy re-implementation of reference SophiaG + its training loop (Liuhong99/Sophia):
    grad clipped to norm 1; p *= 1 - lr wd; m = b1 m + (1-b1) g (no bias correction);
    p -= lr sign(m) min(|m| / (rho bs h + 1e-15), 1); after steps with iter % k == k-1:
    sample labels from the model, g_hat = clipped (norm 1) grad of the mean CE on them,
    h = b2 h + (1-b2) g_hat^2 (bs = tokens per step)."""
    p = {n: np.asarray(v, np.float32).copy() for n, v in p.items()}
    m = {n: np.zeros_like(v) for n, v in p.items()}
    h = {n: np.zeros_like(v) for n, v in p.items()}
    bs = np.float32(N)
    for it in range(len(batches) - 1):
        x, y = np.asarray(batches[it]["x"]), np.asarray(batches[it]["y"])
        g = _np_clip(_np_grad(p, x, y), 1.0)
        lr = np.float32(lr_fn(it))
        for n in p:
            p[n] = p[n] * (np.float32(1) - lr * np.float32(wd))
            m[n] = np.float32(b1) * m[n] + np.float32(1 - b1) * g[n]
            ratio = np.minimum(np.abs(m[n]) / (np.float32(rho) * bs * h[n] + np.float32(1e-15)), 1)
            p[n] = p[n] - lr * np.sign(m[n]) * ratio
        if it % k == k - 1:
            # The estimate uses the next step's batch and key (the harness feeds the same data
            # to the JAX run, which refreshes at the start of that step).
            xh = np.asarray(batches[it + 1]["x"])
            logits = xh @ p["w"] + p["b"]
            yh = np.asarray(_categorical(keys[it + 1], jnp.asarray(logits)))
            gh = _np_clip(_np_grad(p, xh, yh), 1.0)
            for n in p:
                h[n] = np.float32(b2) * h[n] + np.float32(1 - b2) * gh[n] * gh[n]
    return p, m, h


def test_reference_mode_matches_numpy_reference_sophiag():
    steps, k = 23, 5
    hp = dict(b1=0.965, b2=0.99, rho=0.04, wd=0.1, k=k)
    lr_fn = lambda c: 0.02 * (1.0 - c / 50.0)
    # Inputs large and logits small enough that both global-norm clips (training gradient and
    # GNB g_hat) are active, so the test also checks them.
    batches = make_batches(steps + 1, x_scale=3.0)
    p0 = dict(make_params(), w=0.1 * make_params()["w"])
    keys = step_keys(7)
    ref_p, ref_m, ref_h = reference_sophiag(p0, batches, keys, lr_fn, **hp)

    def jaxeff_run(estimator):
        tx = optax.chain(optax.clip_by_global_norm(1.0),
                         sophia(lr_fn, estimator, b1=hp["b1"], b2=hp["b2"], rho=hp["rho"],
                                weight_decay=hp["wd"], update_interval=k, reference_mode=True))
        p, s, _ = run(tx, steps, p=p0, batches=batches)
        return p, sophia_state(s)

    p, st = jaxeff_run(gnb(softmax_logits))
    assert int(st.n_refresh) == (steps - 1) // k   # refreshed after iters 4, 9, 14, 19
    for n in p:
        np.testing.assert_allclose(st.mu[n], ref_m[n], rtol=2e-5, atol=1e-7)
        # jaxeff keeps B h (B = tokens) where the reference keeps h and multiplies by bs.
        np.testing.assert_allclose(st.h[n], N * ref_h[n], rtol=2e-5, atol=1e-9)
        np.testing.assert_allclose(p[n], ref_p[n], rtol=2e-5, atol=2e-6)
    # The g_hat clip is active: without it the trajectory differs.
    p_noclip, _ = jaxeff_run(gnb(softmax_logits, grad_clip=1e9))
    assert not np.allclose(p_noclip["w"], ref_p["w"], rtol=1e-3)


def test_default_mode_refreshes_before_the_first_update():
    _, s, _ = run(sophia(1e-2, gnb(softmax_logits), update_interval=5), 1)
    assert int(sophia_state(s).n_refresh) == 1
    assert float(jnp.sum(sophia_state(s).h["w"])) > 0


# ----------------------------------------------------------------------------- invariants
def test_zero_hessian_gives_sign_descent():
    tx = sophia(0.03, gnb(softmax_logits), weight_decay=0.0)
    p = make_params()
    b = make_batches(1)[0]
    _, _, u = make_step(tx, refresh=False)(p, tx.init(p), b, jax.random.PRNGKey(0))
    g = grad_ce(p, b)
    for n in p:
        np.testing.assert_array_equal(u[n], -0.03 * jnp.sign(g[n]))


def test_update_bounded_by_lr_clip_plus_decay():
    lr, wd, c = 0.05, 0.2, 0.5
    tx = sophia(lr, hutchinson(ce_loss), weight_decay=wd, clip_threshold=c, update_interval=3)
    p = make_params()
    batches = make_batches(8)
    s = tx.init(p)
    step = make_step(tx)
    for i in range(8):
        p_new, s, u = step(p, s, batches[i], jax.random.PRNGKey(i))
        for n in p:
            assert np.all(np.abs(u[n]) <= lr * c + lr * wd * np.abs(p[n]) + 1e-7)
        p = p_new


def test_unclipped_coordinates_take_the_newton_step():
    rho, lr = 0.1, 0.01
    tx = scale_by_sophia(hutchinson(ce_loss), rho=rho, b1=0.5)
    p = make_params()
    s = tx.init(p)
    h = jax.tree.map(lambda x: 10.0 + jnp.abs(x) * 100, p)
    s = s._replace(h=h, mu=jax.tree.map(lambda x: 0.1 * x, p))
    g = jax.tree.map(lambda x: 0.3 * jnp.cos(x), p)
    u, s2 = jax.jit(lambda g, s, p: tx.update(g, s, p, refresh=False))(g, s, p)
    for n in p:
        m = 0.5 * s.mu[n] + 0.5 * g[n]
        small = np.abs(m) < rho * h[n]
        assert small.all()
        np.testing.assert_allclose(-lr * u[n], -lr * m / (rho * h[n]), rtol=1e-6)
    assert float(s2.win_rate) == 1.0


def test_h_changes_only_on_refresh_steps_and_win_rate():
    k = 4
    for reference_mode, due in [(False, {0, 4, 8}), (True, {4, 8})]:
        tx = scale_by_sophia(gnb(softmax_logits), update_interval=k, reference_mode=reference_mode)
        p = make_params()
        s = tx.init(p)
        step = jax.jit(lambda g, s, p, b, key: tx.update(g, s, p, batch=b, key=key))
        for i, b in enumerate(make_batches(10)):
            g = grad_ce(p, b)
            u, s_new = step(g, s, p, b, jax.random.PRNGKey(i))
            changed = not np.array_equal(s_new.h["w"], s.h["w"])
            assert changed == (i in due) == is_refresh_step(i, k, reference_mode), i
            # the win rate is the fraction of coordinates strictly inside the clip
            ratio_abs = np.concatenate([np.abs(np.asarray(x)).ravel() for x in u.values()])
            assert float(s_new.win_rate) == pytest.approx(np.mean(ratio_abs < 1.0), abs=1e-6)
            s = s_new


def test_static_refresh_matches_lax_cond():
    tx = sophia(1e-2, gnb(softmax_logits), update_interval=3)
    batches = make_batches(7)
    p_cond, s_cond, _ = run(tx, 7, batches=batches)
    p, s = make_params(), tx.init(make_params())
    step = split_refresh(make_step(tx, refresh=True), make_step(tx, refresh=False), 3)
    keys = step_keys(7)
    for i in range(7):
        p, s, _ = step(p, s, batches[i], keys[i])
    for n in p:
        np.testing.assert_array_equal(p[n], p_cond[n])
    np.testing.assert_array_equal(sophia_state(s).h["w"], sophia_state(s_cond).h["w"])


def test_bias_correction_first_step():
    tx = scale_by_sophia(hutchinson(ce_loss), bias_correction=True, rho=0.01, b2=0.99)
    p, b = make_params(), make_batches(1)[0]
    g = grad_ce(p, b)
    key = jax.random.PRNGKey(0)
    u, s = jax.jit(lambda g, s, p: tx.update(g, s, p, batch=b, key=key))(g, tx.init(p), p)
    h_hat = jax.jit(lambda p: hutchinson(ce_loss).estimate(p, batch=b, key=key))(p)
    for n in p:  # m_hat = g, h_hat = the estimate itself
        expect = np.clip(g[n] / np.maximum(0.01 * h_hat[n], 1e-12), -1, 1)
        np.testing.assert_allclose(u[n], expect, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- composition
def test_multi_transform_sophia_on_matrices_adam_elsewhere():
    """optax.multi_transform (= optax.partition in optax 0.2.8): Sophia on matrices, Adam on the
    rest. The estimator sees the unmasked params and differentiates only the leaves it owns."""
    labels = lambda p: jax.tree.map(lambda x: "sophia" if x.ndim >= 2 else "adam", p)
    tx = optax.multi_transform({"sophia": sophia(1e-2, gnb(softmax_logits), update_interval=2),
                                "adam": optax.adam(1e-2)}, labels)
    p, batches, keys = make_params(), make_batches(3), step_keys(7)
    step = make_step(tx)
    p1, s, _ = step(p, tx.init(p), batches[0], keys[0])
    full = jax.jit(lambda p: gnb(softmax_logits).estimate(p, batch=batches[0], key=keys[0]))(p)
    st = sophia_state(s)
    assert isinstance(st.h["b"], optax.MaskedNode) and st.h["w"].shape == (D, V)
    np.testing.assert_allclose(st.h["w"], 0.01 * full["w"], rtol=1e-5)  # (1 - b2) * h_hat
    assert not np.array_equal(p1["b"], p["b"])                          # Adam moved the bias
    for i in (1, 2):
        p1, s, _ = step(p1, s, batches[i], keys[i])
    assert int(sophia_state(s).n_refresh) == 2
    # Without unmasked_params (or with it masked too) the error says what to pass.
    g = grad_ce(p, batches[0])
    with pytest.raises(ValueError, match="unmasked_params"):
        tx.update(g, tx.init(p), p, batch=batches[0], key=keys[0])
    tx_m = optax.multi_transform({"sophia": sophia(1e-2, gnb(softmax_logits)),
                                  "adam": optax.adam(1e-2)}, labels,
                                 mask_compatible_extra_args=True)
    with pytest.raises(ValueError, match="unmasked_params"):
        tx_m.update(g, tx_m.init(p), p, **sophia_extra_args()(p, batches[0], keys[0]))


def test_inject_hyperparams_multisteps_apply_if_finite():
    est = gnb(softmax_logits)
    tx = optax.inject_hyperparams(sophia)(learning_rate=optax.linear_schedule(1e-2, 0.0, 10),
                                          estimator=est, rho=0.05, update_interval=2)
    p, s, _ = run(tx, 3)
    assert float(s.hyperparams["rho"]) == pytest.approx(0.05)
    assert int(sophia_state(s).count) == 3
    ms = optax.MultiSteps(sophia(1e-2, est, update_interval=2), every_k_schedule=2)
    p, s, _ = run(ms, 4)
    assert int(sophia_state(s.inner_opt_state).count) == 2
    safe = optax.apply_if_finite(sophia(1e-2, est), max_consecutive_errors=3)
    p0 = make_params()
    s0 = safe.init(p0)
    b = make_batches(1)[0]
    g_nan = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), p0)
    u, s1 = jax.jit(lambda g, s, p: safe.update(g, s, p, batch=b, key=jax.random.PRNGKey(0)))(
        g_nan, s0, p0)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
    assert int(s1.total_notfinite) == 1 and int(sophia_state(s1).count) == 0


def test_win_rate_helper_weights_by_size():
    st = lambda wr, n: SophiaState(jnp.int32(0), {"a": jnp.zeros(n)}, {"a": jnp.zeros(n)},
                                   jnp.int32(0), jax.random.PRNGKey(0), jnp.float32(wr),
                                   jnp.int32(0))
    assert float(sophia_win_rate((st(1.0, 3), {"x": st(0.0, 1)}))) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="SophiaState"):
        sophia_win_rate(optax.adam(1e-3).init({"a": jnp.zeros(2)}))


# ----------------------------------------------------------------------------- state handling
def test_orbax_round_trip_resumes_bit_identically(tmp_path):
    tx = sophia(1e-2, hutchinson(ce_loss), update_interval=3)
    batches = make_batches(8)
    step = make_step(tx, pass_key=False)  # randomness from the key kept in the state
    p, s = make_params(), tx.init(make_params())
    for i in range(4):
        p, s, _ = step(p, s, batches[i], None)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "c", {"params": p, "opt": s})
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "c", {"params": p, "opt": s})
    p2, s2 = restored["params"], restored["opt"]
    assert jax.tree.structure(s2) == jax.tree.structure(s)
    for i in range(4, 8):
        p, s, _ = step(p, s, batches[i], None)
        p2, s2, _ = step(p2, s2, batches[i], None)
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((p2, s2))):
        np.testing.assert_array_equal(a, b)


def test_sharded_8_devices_equals_single_device():
    devices = jax.devices()
    assert len(devices) >= 8
    mesh = Mesh(np.array(devices[:8]), ("data",))
    tx = sophia(1e-2, gnb(softmax_logits), update_interval=2)
    batches = make_batches(5, rows=16)
    p_one, s_one, _ = run(tx, 5, batches=batches)
    shard_b = lambda b: jax.device_put(b, NamedSharding(mesh, P("data")))
    p = jax.device_put(make_params(), {"w": NamedSharding(mesh, P(None, None)),
                                       "b": NamedSharding(mesh, P())})
    p_sh, s_sh, _ = run(tx, 5, p=p, batches=[shard_b(b) for b in batches])
    assert len(s_sh[0].mu["w"].sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves((p_one, s_one)), jax.tree.leaves((p_sh, s_sh))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, name", [
    (dict(update_interval=0), "update_interval"),
    (dict(update_interval=-3), "update_interval"),
    (dict(rho=0.0), "rho"),
    (dict(rho=-1.0), "rho"),
    (dict(b1=1.0), "b1"),
    (dict(b2=-0.1), "b2"),
    (dict(eps=0.0), "eps"),
    (dict(clip_threshold=0.0), "clip_threshold"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(learning_rate=-1e-3), "learning_rate"),
    (dict(weight_decay=-0.1), "weight_decay"),
])
def test_bad_hyperparameters(kwargs, name):
    kw = dict(learning_rate=1e-3, estimator=gnb(softmax_logits))
    kw.update(kwargs)
    with pytest.raises(ValueError, match=name):
        sophia(**kw)


@pytest.mark.parametrize("kwargs, err, msg", [   # the probe's cases and their siblings
    (dict(learning_rate=float("inf")), ValueError, "learning_rate must be a finite number > 0"),
    (dict(learning_rate=float("nan")), ValueError, "learning_rate must be a finite number"),
    (dict(learning_rate="1e-3"), TypeError, "learning_rate must be a number"),
    (dict(weight_decay=float("inf")), ValueError, "weight_decay must be a finite number >= 0"),
    (dict(weight_decay="0.1"), TypeError, "weight_decay must be a real number"),
    (dict(b1=float("nan")), ValueError, "b1 must be a finite number >= 0.0 and < 1.0"),
    (dict(b2="0.99"), TypeError, "b2 must be a real number"),
    (dict(rho=float("inf")), ValueError, "rho must be a finite number > 0"),
    (dict(eps=float("nan")), ValueError, "eps must be a finite number > 0"),
    (dict(clip_threshold=float("nan")), ValueError, "clip_threshold must be a number > 0"),
    (dict(update_interval=2.5), TypeError, "update_interval must be an int >= 1; got 2.5"),
    (dict(update_interval=True), TypeError, "update_interval must be an int"),
    (dict(mu_dtype=jnp.int32), TypeError, "mu_dtype must be a floating-point dtype.*int32"),
    (dict(mu_dtype="bogus"), TypeError, "mu_dtype must be a floating-point dtype"),
    (dict(seed=0.5), TypeError, "seed must be an int"),
    (dict(reference_mode="False"), TypeError, "reference_mode must be True or False"),
    (dict(bias_correction=1), TypeError, "bias_correction must be True or False"),
])
def test_bad_hyperparameters_types_and_non_finite(kwargs, err, msg):
    kw = dict(learning_rate=1e-3, estimator=gnb(softmax_logits))
    kw.update(kwargs)
    with pytest.raises(err, match=msg):
        sophia(**kw)


def test_valid_edge_hyperparameters_accepted():
    sophia(lambda t: 1e-3, gnb(softmax_logits), clip_threshold=float("inf"), weight_decay=0.0,
           mu_dtype=jnp.bfloat16, b1=0.0)
    with pytest.raises(ValueError, match="update_interval must be an int >= 1; got 0"):
        split_refresh(None, None, update_interval=0)


def test_int_params_rejected_at_init_with_the_leaf_path():
    """The probe: Sophia-H on int params died in jvp with a float0 error."""
    p = {"w": jnp.zeros((D, V)), "table": {"ids": jnp.zeros((3,), jnp.int32)}}
    for est in (hutchinson(ce_loss), gnb(softmax_logits)):
        with pytest.raises(TypeError, match="params leaf 'table/ids' has dtype int32"):
            sophia(1e-3, est).init(p)
    with pytest.raises(TypeError, match="Hutchinson.*dtype int32"):
        hutchinson(lambda q, b: jnp.sum(q["w"] ** 2)).estimate(
            {"w": jnp.zeros(3, jnp.int32)}, batch={}, key=jax.random.PRNGKey(0))


def test_gnb_scalar_logits_fn_gives_a_clear_error():
    """The probe: a scalar-returning logits function gave a NumPy IndexError."""
    p, b = make_params(), make_batches(1)[0]
    with pytest.raises(ValueError, match="logits_fn.*must return float logits.*shape \\(\\)"):
        gnb(ce_loss).estimate(p, batch=b, key=jax.random.PRNGKey(0))


class _PoisonedEstimator:
    """GNB, but the estimate is NaN at w[0, 0] (and inf at b[1]) on the refreshes in ``bad``."""
    default_rho = 0.04

    def __init__(self, bad):
        self.inner, self.bad, self.calls = gnb(softmax_logits), bad, 0

    def estimate_leaves(self, merge, xs, **kw):
        out = self.inner.estimate_leaves(merge, xs, **kw)
        poison = self.calls in self.bad
        self.calls += 1
        if not poison:
            return out
        return [e.at[(0,) * e.ndim].set(jnp.nan) if e.ndim == 2 else e.at[1].set(jnp.inf)
                for e in out]


def test_non_finite_hessian_estimate_keeps_the_old_h():
    """The probe: a NaN only in the Hessian estimate (finite gradients: apply_if_finite cannot
    see it) made h NaN, then the params. Now those coordinates keep their old h, the rest is
    refreshed as usual, and ``n_skipped`` counts the refresh. Reference: the same run with a
    clean estimator."""
    p0, batches, keys = make_params(), make_batches(4), step_keys(0)

    def run(est):
        tx = sophia(1e-2, est, update_interval=1)
        p, s = p0, tx.init(p0)
        hs = []
        for t in range(4):   # not jitted: the estimator counts its (eager) calls
            g = grad_ce(p, batches[t])
            u, s = tx.update(g, s, p, **sophia_extra_args(True)(p, batches[t], keys[t]))
            p = optax.apply_updates(p, u)
            hs.append(s[0].h)
        return p, s[0], hs

    p_ref, s_ref, h_ref = run(gnb(softmax_logits))
    p_bad, s_bad, h_bad = run(_PoisonedEstimator(bad={1}))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((p_bad, s_bad)))
    assert int(s_bad.n_skipped) == 1 and int(s_ref.n_skipped) == 0
    assert int(s_bad.n_refresh) == int(s_ref.n_refresh) == 4
    # at the poisoned refresh: the hit coordinates kept h from step 0, the others refreshed
    assert float(h_bad[1]["w"][0, 0]) == float(h_ref[0]["w"][0, 0])
    assert float(h_bad[1]["b"][1]) == float(h_ref[0]["b"][1])
    np.testing.assert_array_equal(np.asarray(h_bad[1]["w"]).ravel()[1:],
                                  np.asarray(h_ref[1]["w"]).ravel()[1:])
    # and training goes on: the end point stays near the clean run's
    for a, b in zip(jax.tree.leaves(p_bad), jax.tree.leaves(p_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.05)


def test_bad_estimator_and_missing_inputs():
    with pytest.raises(TypeError, match="estimator"):
        sophia(1e-3, None)
    with pytest.raises(TypeError, match="logits_fn"):
        sophia(1e-3, gnb("not a function"))
    p, b = make_params(), make_batches(1)[0]
    g = grad_ce(p, b)
    tx = sophia(1e-3, gnb(softmax_logits))
    with pytest.raises(ValueError, match="batch"):
        tx.update(g, tx.init(p), p, key=jax.random.PRNGKey(0))
    tx = sophia(1e-3, hutchinson())
    with pytest.raises(ValueError, match="loss_fn"):
        tx.update(g, tx.init(p), p, batch=b)
    with pytest.raises(ValueError, match="params"):
        tx.update(g, tx.init(p))
    with pytest.raises(TypeError, match="refresh"):
        tx.update(g, tx.init(p), p, obj_fn=lambda q: ce_loss(q, b), refresh=jnp.bool_(True))
