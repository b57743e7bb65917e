"""Sparse training / pruning wrapper: schedules, exact sparsity, masks, SPDF densify, state."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxeff.optim import (apply_masks, constant_sparsity, cubic_sparsity, densify,
                          geometric_sparsity, journey_schedule, journey_window, prune,
                          sparsity_stats, spdf)


def _randn(seed, shape, scale=1.0):
    """Test data from NumPy (no XLA compile per shape)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


SEL = r"^(w|v)$"
N_SEL = 2 * 12 * 16 + 16 * 8
# Shared transforms: a test reusing one compiles no new step (XLA compiles dominate test time).
SCHED = geometric_sparsity(0.75, start_step=1, end_step=9, every=2)
TX = {scope: prune(optax.adamw(1e-2, weight_decay=0.1), SCHED, select=SEL, scope=scope)
      for scope in ("global", "layer")}


def _params(key=0):
    return {"w": _randn(1 + 10 * key, (2, 12, 16)), "v": _randn(2 + 10 * key, (16, 8)),
            "b": jnp.ones((8,))}


def _grads(params, t):
    return jax.tree.map(lambda p: jnp.cos(p + 0.1 * t), params)


@functools.lru_cache(maxsize=None)
def _step_fn(tx):
    @jax.jit
    def step(p, s, t):
        u, s = tx.update(_grads(p, t), s, p)
        return optax.apply_updates(p, u), s
    return step


def _run(tx, params, steps, start=0, state=None, one_device=True):
    state = tx.init(params) if state is None else state
    if one_device:   # committed like restored arrays, so one compiled step serves every run
        params, state = jax.device_put((params, state), jax.devices()[0])
    step = _step_fn(tx)
    hist = []
    for t in range(start, start + steps):
        params, state = step(params, state, t)
        hist.append((params, state))
    return params, state, hist


def _schedule_values(sched, n):
    return np.asarray(jax.jit(jax.vmap(sched))(jnp.arange(n)))


# ----------------------------------------------------------------------------- schedules

def test_geometric_schedule_matches_reference_rounds():
    sched = geometric_sparsity(0.75, start_step=10, end_step=50, every=10)
    s = _schedule_values(sched, 70)
    n = 5
    q = 1 - 0.25 ** (1 / n)
    assert np.all(s[:10] == 0) and np.all(np.diff(s) >= 0)
    for k in range(n):
        np.testing.assert_allclose(s[10 + 10 * k: 20 + 10 * k], 1 - (1 - q) ** (k + 1), rtol=1e-6)
    assert np.all(s[50:] == np.float32(0.75))


def test_cubic_schedule_formula():
    s = _schedule_values(cubic_sparsity(0.8, start_step=5, end_step=25, every=5), 40)
    want = [0.0] * 5 + [0.8 * (1 - (1 - 5 * (i // 5) / 20) ** 3) for i in range(20)] + [0.8] * 15
    np.testing.assert_allclose(s, want, rtol=1e-6, atol=1e-7)


def test_window_mean_density_matches_closed_forms():
    s_f, T = 0.6, 4000
    g = 1 - _schedule_values(geometric_sparsity(s_f, start_step=0, end_step=T - 1, every=1), T)
    np.testing.assert_allclose(g.mean(), -s_f / math.log(1 - s_f), atol=2e-3)
    c = 1 - _schedule_values(cubic_sparsity(s_f, start_step=0, end_step=T, every=1), T)
    np.testing.assert_allclose(c.mean(), 1 - 0.75 * s_f, atol=2e-3)


def test_journey_window_steps_and_compute():
    assert journey_window(0.75, 1000, every=10, window="steps") == (250, 750)
    # TECHNIQUES.md section 8: sparsellm-1b-20p prunes over steps 2500 -> 8100 of 11200
    # (25% -> 75% of compute), mean density 0.8928 simulated (0.8919 on the model card).
    st, en = journey_window(0.2, 11200, every=100, window="compute")
    assert (st, en) == (2500, 8100)
    d = 1 - _schedule_values(journey_schedule(0.2, total_steps=11200, window="compute"), 11200)
    np.testing.assert_allclose(d.mean(), 0.8928, atol=2e-4)
    d = 1 - _schedule_values(journey_schedule(0.4, total_steps=11200, window="compute"), 11200)
    np.testing.assert_allclose(d.mean(), 0.7649, atol=1e-3)


# ----------------------------------------------------------------------------- pruning

@pytest.mark.parametrize("scope", ["global", "layer"])
def test_exact_scheduled_sparsity_no_regrowth_masked_stay_zero(scope):
    sched, tx = SCHED, TX[scope]
    params = _params()
    params["w"] = params["w"].at[0, :6].set(0.0)                 # ties in the scores
    _, _, hist = _run(tx, params, 12)
    prev = None
    for t, (p, st) in enumerate(hist, start=1):
        s = float(sched(t))
        m = st.masks
        # masked weights are exactly 0; unselected leaves untouched by masking
        assert not np.any(np.asarray(p["w"])[~np.asarray(m["w"])])
        assert not np.any(np.asarray(p["v"])[~np.asarray(m["v"])])
        assert m["b"].shape == ()
        if scope == "global":
            n = N_SEL
            kept = int(m["w"].sum() + m["v"].sum())
            assert n - kept in (math.floor(s * n), math.ceil(s * n)), (t, s, kept)
        else:
            for mat in [m["w"][0], m["w"][1], m["v"]]:
                n = mat.size
                assert n - int(mat.sum()) in (math.floor(s * n), math.ceil(s * n))
        if prev is not None:                                     # never regrow
            for a, b in zip(jax.tree.leaves(m), jax.tree.leaves(prev)):
                assert not np.any(np.asarray(a) & ~np.asarray(b))
        prev = m
    assert float(sched(12)) == np.float32(0.75)


def _reference_prune(arrays, prev_masks, keep_fraction):
    """NumPy version of tjingrant/sparse-llm-code MaxText ``prune`` (global, magnitude)."""
    scores = np.concatenate([(np.abs(a) * m).ravel() for a, m in zip(arrays, prev_masks)])
    n = scores.size
    thr = np.sort(scores)[n - int(keep_fraction * n)]
    return [(np.abs(a) >= thr) & m for a, m in zip(arrays, prev_masks)]


def test_global_magnitude_matches_reference_threshold():
    sched = lambda t: jnp.where(t >= 1, 0.5, 0.25)              # noqa: E731
    tx = prune(optax.sgd(0.0), sched, select=SEL)
    params = _params(3)
    st = tx.init(params)
    arrays = [np.asarray(params["w"]), np.asarray(params["v"])]
    ones = [np.ones(a.shape, bool) for a in arrays]
    ref = _reference_prune(arrays, ones, 0.75)                  # 512 * 0.25 = 128 pruned
    np.testing.assert_array_equal(st.masks["w"], ref[0])
    np.testing.assert_array_equal(st.masks["v"], ref[1])
    p2 = apply_masks(params, st)
    u, st = tx.update(jax.tree.map(jnp.ones_like, params), st, p2)
    ref = _reference_prune([np.asarray(p2["w"]), np.asarray(p2["v"])], ref, 0.5)
    np.testing.assert_array_equal(st.masks["w"], ref[0])
    np.testing.assert_array_equal(st.masks["v"], ref[1])


def test_mean_nonzero_count_is_tracked():
    params, state, _ = _run(TX["global"], _params(), 9)
    n = N_SEL
    kept = [n - math.floor(float(SCHED(t)) * n) for t in range(9)]
    stats = sparsity_stats(state, params)
    np.testing.assert_allclose(stats["mean_density"], np.mean(kept) / n, rtol=1e-6)
    np.testing.assert_allclose(stats["mean_nonzero"], 8 + np.mean(kept), rtol=1e-6)
    np.testing.assert_allclose(stats["density"], (n - math.floor(float(SCHED(9)) * n)) / n,
                               rtol=1e-6)
    assert stats["total"] == n + 8 and int(stats["steps"]) == 9


def test_spdf_static_random_mask_then_densify():
    tx = spdf(optax.adam(1e-2), 0.75, key=jax.random.key(7), select=SEL)
    params = _params()
    state = tx.init(params)
    m0 = state.masks
    for mat in [m0["w"][0], m0["w"][1], m0["v"]]:               # per matrix, exactly 75%
        assert mat.size - int(mat.sum()) == int(0.75 * mat.size)
    params = apply_masks(params, state)
    params, state, _ = _run(tx, params, 3, state=state)
    for a, b in zip(jax.tree.leaves(state.masks), jax.tree.leaves(m0)):
        np.testing.assert_array_equal(a, b)
    assert not np.any(np.asarray(params["v"])[~np.asarray(m0["v"])])
    dense_state = densify(state)
    assert all(bool(jnp.all(x)) for x in jax.tree.leaves(dense_state.masks))
    assert bool(dense_state.dense)
    before = params
    params, dense_state, _ = _run(tx, params, 2, start=3, state=dense_state)
    pruned = ~np.asarray(m0["v"])
    assert np.all(np.asarray(params["v"])[pruned] != 0)         # all weights train again
    assert np.all(np.asarray(before["v"])[pruned] == 0)         # densify itself changes nothing
    assert float(sparsity_stats(dense_state, params)["density"]) == 1.0


def test_jit_orbax_resume_is_bit_identical(tmp_path):
    tx = TX["global"]
    full, full_state, _ = _run(tx, _params(), 6)
    half, half_state, _ = _run(tx, _params(), 3)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "c", {"p": half, "s": half_state})
    ckpt.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"p": half, "s": half_state})
    back = ckpt.restore(tmp_path / "c", target)
    resumed, resumed_state, _ = _run(tx, back["p"], 3, start=3, state=back["s"])
    for a, b in zip(jax.tree.leaves((full, full_state)), jax.tree.leaves((resumed,
                                                                          resumed_state))):
        np.testing.assert_array_equal(a, b)


def test_sharded_run_equals_single_device():
    tx = TX["global"]
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    specs = {"w": P(None, None, "x"), "v": P("x", None), "b": P()}
    params = _params()
    sharded = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                                  is_leaf=lambda s: isinstance(s, P)))
    p1, s1, _ = _run(tx, params, 4)
    p2, s2, _ = _run(tx, sharded, 4, one_device=False)
    assert p2["v"].sharding.spec == P("x", None) or len(p2["v"].sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves(s1.masks), jax.tree.leaves(s2.masks)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_bad_inputs():
    inner = optax.sgd(0.1)
    with pytest.raises(ValueError, match="sparsity"):
        constant_sparsity(1.0)
    with pytest.raises(ValueError, match="final_sparsity"):
        geometric_sparsity(-0.1, start_step=0, end_step=10)
    with pytest.raises(ValueError, match="start_step"):
        cubic_sparsity(0.5, start_step=10, end_step=5)
    with pytest.raises(ValueError, match="score"):
        prune(inner, constant_sparsity(0.5), select=SEL, score="taylor")
    with pytest.raises(ValueError, match="scope"):
        prune(inner, constant_sparsity(0.5), select=SEL, scope="row")
    with pytest.raises(ValueError, match="key"):
        prune(inner, constant_sparsity(0.5), select=SEL, score="random")
    with pytest.raises(ValueError, match="window"):
        journey_window(0.5, 100, window="tokens")
    tx = prune(inner, constant_sparsity(0.5), select="nothing")
    with pytest.raises(ValueError, match="matches no leaf"):
        tx.init(_params())
    tx = prune(inner, constant_sparsity(0.5), select=SEL)
    with pytest.raises(ValueError, match="params"):
        tx.update(_params(), tx.init(_params()))


def test_topk_ties_are_broken_in_row_major_order():
    """The sharding-friendly top-k (bisection, no flatten/cumsum) keeps exactly k entries and
    breaks ties by list order then row-major position, like a stable sort would."""
    from jaxeff.optim._sparsity import _to_keys, _topk_global, _topk_groups
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.integers(0, 3, s).astype(np.float32)) for s in [(2, 4, 6), (5, 3)]]
    flat = np.concatenate([np.asarray(x).reshape(-1) for x in xs])
    order = np.argsort(-flat, kind="stable")
    for k in (0, 1, 7, 30, 50, flat.size):
        masks = jax.jit(lambda ks: _topk_global(ks, jnp.int32(k)))([_to_keys(x) for x in xs])
        got = np.concatenate([np.asarray(m).reshape(-1) for m in masks])
        want = np.zeros(flat.size, bool)
        want[order[:k]] = True
        np.testing.assert_array_equal(got, want)
    x = xs[0]                                   # per-matrix groups over the leading axis
    k = jnp.asarray([5, 17], jnp.int32)
    got = np.asarray(jax.jit(lambda v: _topk_groups(_to_keys(v), k, 1))(x))
    for g in range(2):
        row = np.asarray(x[g]).reshape(-1)
        want = np.zeros(row.size, bool)
        want[np.argsort(-row, kind="stable")[:int(k[g])]] = True
        np.testing.assert_array_equal(got[g].reshape(-1), want)


# ----------------------------------------------------------------------------- bad schedules

@pytest.mark.parametrize("bad", [1.5, -0.5, float("nan"), 1.0])
def test_bad_custom_schedule_at_init_raises(bad):
    tx = prune(optax.sgd(0.1), lambda step: bad, select=SEL)
    with pytest.raises(ValueError, match=r"schedule\(step\) must return a sparsity in \[0, 1\)"):
        tx.init(_params())
    with pytest.raises(TypeError, match="scalar sparsity"):
        prune(optax.sgd(0.1), lambda step: jnp.zeros(3), select=SEL).init(_params())


@pytest.mark.parametrize("bad", [1.5, -0.5, float("nan")])
def test_bad_traced_schedule_value_prunes_nothing_and_is_counted(bad):
    """A schedule fine at step 0 that later returns 1.5 / -0.5 / NaN: those steps keep the masks
    (a NaN or 1.5 would otherwise prune everything, -0.5 nothing, silently) and are counted."""
    sched = lambda step: jnp.where(step >= 3, bad, 0.5)
    tx = prune(optax.sgd(0.1), sched, select=SEL)
    p, s, hist = _run(tx, _params(), 5)
    masks3 = [np.asarray(m) for m in jax.tree.leaves(hist[1][1].masks)]
    for m, m_end in zip(masks3, jax.tree.leaves(s.masks)):
        np.testing.assert_array_equal(m, np.asarray(m_end))      # steps 3, 4, 5 pruned nothing
    assert int(s.n_bad_schedule) == 3
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(p))
    _, s_ok, _ = _run(prune(optax.sgd(0.1), lambda step: 0.5 + 0 * step, select=SEL), _params(), 2)
    assert int(s_ok.n_bad_schedule) == 0


@pytest.mark.parametrize("fn, err, match", [
    (lambda: constant_sparsity(float("nan")), ValueError, "sparsity must be a finite number"),
    (lambda: constant_sparsity(False), TypeError, "sparsity must be a real number"),
    (lambda: constant_sparsity("0.5"), TypeError, "sparsity must be a real number"),
    (lambda: geometric_sparsity(0.5, start_step=0.0, end_step=10), TypeError,
     "start_step must be an int"),
    (lambda: geometric_sparsity(0.5, start_step=-1, end_step=10), ValueError,
     "start_step must be an int >= 0; got -1"),
    (lambda: cubic_sparsity(0.5, start_step=0, end_step=10, every=0), ValueError,
     "every must be an int >= 1; got 0"),
    (lambda: journey_window(0.5, 100.5), TypeError, "total_steps must be an int"),
    (lambda: journey_window(0.5, 100, start="0.1"), TypeError, "start must be a real number"),
    (lambda: journey_window(0.5, 100, start=0.8, end=0.2), ValueError, "start <= end"),
    (lambda: journey_window(0.5, 100, end=float("nan")), ValueError, "end must be a finite"),
])
def test_bad_schedule_arguments_types_and_ranges(fn, err, match):
    with pytest.raises(err, match=match):
        fn()


def test_bad_inner_and_flags():
    with pytest.raises(TypeError, match="inner must be an optax.GradientTransformation"):
        prune(None, constant_sparsity(0.5), select=SEL)
    with pytest.raises(TypeError, match="static must be True or False; got 1"):
        prune(optax.sgd(0.1), constant_sparsity(0.5), select=SEL, static=1)
    with pytest.raises(TypeError, match="mask_gradients must be True or False"):
        prune(optax.sgd(0.1), constant_sparsity(0.5), select=SEL, mask_gradients="yes")
