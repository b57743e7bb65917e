"""Tests for jaxeff.optim.galore: reference parity (NumPy re-implementation, optax.contrib.galore),
projector invariants, per-leaf selection, moment policies, 8-bit GaLore, Orbax, sharding, errors."""
import importlib

import numpy as np
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

from jaxeff.optim import _compress as C
# the module, even if jaxeff.optim re-exports the `galore` function under the same name
G = importlib.import_module("jaxeff.optim._galore")

SHAPES = {"a": (32, 16), "b": (16, 32)}


def _normal(seed, shape):
    """NumPy draws: no XLA compile per shape (eager jax.random costs a compile each)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _grads(tree, t, seed=0):
    return jax.tree.map(lambda p: _normal((seed + t) * 1000 + p.size, p.shape), tree)


def _params(shapes=SHAPES):
    return {k: _normal(10_000 + i, s) for i, (k, s) in enumerate(shapes.items())}


def _run(tx, params, steps, seed=0, **kw):
    state = tx.init(params)
    upd = jax.jit(tx.update)
    outs, states = [], [state]
    for t in range(steps):
        u, state = upd(_grads(params, t, seed), state, params, **kw)
        outs.append(u)
        states.append(state)
    return outs, states


# ---------------------------------------------------------------- NumPy re-implementation
def _jnp_svd(a):
    """The SVD routine jaxeff uses (LAPACK via XLA), so that singular-vector signs agree: the
    reference keeps moments across refreshes, which makes its output depend on those signs."""
    return [np.asarray(x, np.float64) for x in jnp.linalg.svd(jnp.asarray(a, jnp.float32),
                                                              full_matrices=False)]


def _np_svd(a):
    return np.linalg.svd(np.asarray(a, np.float64), full_matrices=False)


def reference_galore(grads, rank, gap, scale, proj_type, b1=0.9, b2=0.999, eps=1e-10,
                     svd=_jnp_svd, align=False, optax_eps=False):
    """galore_torch's GaLoreProjector + GaLore AdamW step (without lr and weight decay), in NumPy.

    Returns the per-step outputs ``step_size/lr * project_back(m / (sqrt(v) + eps))`` and the
    projectors (the reference's ``ortho_matrix``: U[:, :r] for left, Vh[:r] for right)."""
    ortho, m, v, outs, projs = None, None, None, [], []
    for t, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        tall = g.shape[0] >= g.shape[1]
        kind = {"std": "right" if tall else "left", "reverse_std": "left" if tall else "right",
                "left": "left", "right": "right", "full": "full"}[proj_type]
        if ortho is None or t % gap == 0:
            u, _, vh = svd(g)
            new = {"left": [u[:, :rank]], "right": [vh[:rank]], "full": [u[:, :rank], vh[:rank]]}[kind]
            if align and ortho is not None:   # align column i (left) / row i (right) with the old one
                new = [n * np.where(np.sum(n * o, axis=0 if n.shape == u[:, :rank].shape and
                                           kind != "right" and j == 0 else 1,
                                           keepdims=True) < 0, -1, 1)
                       for j, (n, o) in enumerate(zip(new, ortho))]
            ortho = new
        if kind == "left":
            low = ortho[0].T @ g
        elif kind == "right":
            low = g @ ortho[0].T
        else:
            low = ortho[0].T @ g @ ortho[1].T
        if m is None:
            m, v = np.zeros_like(low), np.zeros_like(low)
        m = b1 * m + (1 - b1) * low
        v = b2 * v + (1 - b2) * low * low
        step = t + 1
        if optax_eps:   # optax's placement: m_hat / (sqrt(v_hat) + eps)
            n = m / (1 - b1 ** step) / (np.sqrt(v / (1 - b2 ** step)) + eps)
        else:           # galore_torch AdamW: step size lr sqrt(1 - b2^t) / (1 - b1^t)
            n = m / (np.sqrt(v) + eps) * np.sqrt(1 - b2 ** step) / (1 - b1 ** step)
        back = {"left": lambda: ortho[0] @ n, "right": lambda: n @ ortho[0],
                "full": lambda: ortho[0] @ n @ ortho[1]}[kind]()
        outs.append(back * scale)
        projs.append([o.copy() for o in ortho])
    return outs, projs


@pytest.mark.parametrize("proj_type", G.PROJ_TYPES)
def test_matches_numpy_reference_and_projector_invariants(proj_type):
    """Every proj_type on 32x16 and 16x32 with gap 3 (TECHNIQUES.md §2). For 'full' the r x r
    projection U_r^T G V_r is diagonal up to rounding noise on refresh steps, and Adam with a tiny
    eps maps that noise to +-1 in any implementation; there eps = 1e-2 in optax's placement."""
    params = _params()
    steps, gap, r = 7, 3, 4
    eps = 1e-2 if proj_type == "full" else 1e-10
    tx = G.scale_by_galore(optax.scale_by_adam(eps=eps), rank=r, update_proj_gap=gap,
                           scale=0.25, proj_type=proj_type)
    outs, states = _run(tx, params, steps)
    for j, name in enumerate(sorted(SHAPES)):
        ref, ref_p = reference_galore([_grads(params, t)[name] for t in range(steps)], r, gap,
                                      0.25, proj_type, eps=eps, optax_eps=proj_type == "full")
        for t in range(steps):
            np.testing.assert_allclose(outs[t][name], ref[t], rtol=2e-4, atol=2e-6)
        for t in range(1, steps + 1):
            ps = tuple(states[t].projectors[name].values())        # keyed by param path
            before = tuple(states[t - 1].projectors[name].values())
            for p in ps:                                  # P^T P = I
                np.testing.assert_allclose(p.T @ p, np.eye(r), atol=1e-5)
            changed = any(not np.array_equal(a, b) for a, b in zip(ps, before))
            assert changed == ((t - 1) % gap == 0)        # only at t % gap == 0 (t = step index)
            # same matrices as the reference (it stores Vh[:r], we store its transpose)
            for p, q in zip(ps, ref_p[t - 1]):
                np.testing.assert_allclose(p, q if p.shape == q.shape else q.T, atol=1e-5)


def test_sign_align_is_independent_of_the_svd_sign_convention():
    """With sign alignment the result no longer depends on LAPACK's sign choices: jaxeff (XLA's
    SVD) matches the NumPy reference run with NumPy's own SVD."""
    params = _params()
    tx = G.scale_by_galore(optax.scale_by_adam(eps=1e-10), rank=4, update_proj_gap=2,
                           proj_type="std", sign_align=True)
    outs, _ = _run(tx, params, 6)
    for name in SHAPES:
        ref, _ = reference_galore([_grads(params, t)[name] for t in range(6)], 4, 2, 0.25, "std",
                                  svd=_np_svd, align=True)
        for t in range(6):
            np.testing.assert_allclose(outs[t][name], ref[t], rtol=2e-4, atol=2e-6)


def test_reverse_std_equals_optax_contrib_galore():
    params = _params()
    ours = G.galore(1e-2, optax.scale_by_adam(), rank=4, update_proj_gap=3, scale=1.0,
                    proj_type="reverse_std", weight_decay=0.1)
    ref = optax.contrib.galore(1e-2, rank=4, update_proj_gap=3, weight_decay=0.1)
    a, _ = _run(ours, params, 7)
    b, _ = _run(ref, params, 7)
    for x, y in zip(a, b):
        for k in SHAPES:
            np.testing.assert_allclose(x[k], y[k], rtol=1e-6, atol=1e-9)


def test_identity_inner_at_full_rank_returns_scaled_gradient():
    """With r = min(m, n) the projector is square orthogonal: back(proj(g)) = g for every type,
    for per-leaf types given as (regex, value) rules and for a batched (stacked) leaf."""
    params = {"l": jnp.zeros((12, 8)), "r": jnp.zeros((8, 12)), "f": jnp.zeros((10, 10)),
              "s": jnp.zeros((3, 9, 6)), "bias": jnp.zeros(5)}
    tx = G.scale_by_galore(optax.identity(), rank=1.0, scale=0.5,
                           proj_type=[("^l", "left"), ("^r", "right"), ("^f", "full"),
                                      ("^s", "std")])
    state = tx.init(params)
    assert jax.tree.map(lambda p: p.shape, state.projectors) == {   # l: m x r, r: n x r
        "f": {"left": (10, 10), "right": (10, 10)}, "l": {"left": (12, 8)},
        "r": {"right": (12, 8)}, "s": {"right": (3, 6, 6)}}
    g = _grads(params, 0)
    u, _ = jax.jit(tx.update)(g, state)
    for k in "lrfs":
        np.testing.assert_allclose(u[k], 0.5 * g[k], atol=1e-5)
    np.testing.assert_array_equal(u["bias"], g["bias"])   # not projected, not scaled


def test_stacked_layers_and_matrix_dims_are_batches_of_matrices():
    """[L, m, n] = L independent GaLore matrices; matrix_axes=((0,), (1, 2)) = a reshaped 2-D leaf."""
    stack, heads = _normal(0, (3, 12, 8)), _normal(1, (8, 2, 6))
    tx = G.scale_by_galore(rank=3, update_proj_gap=2,
                           matrix_axes=[("heads", ((0,), (1, 2)))])
    grads = [{"stack": stack * (t + 1) + t, "heads": heads - t} for t in range(3)]
    flat = [{**{f"s{i}": g["stack"][i] for i in range(3)}, "h": g["heads"].reshape(8, 12)}
            for g in grads]
    s1, s2 = tx.init(grads[0]), tx.init(flat[0])
    up1, up2 = jax.jit(tx.update), jax.jit(tx.update)
    for g1, g2 in zip(grads, flat):
        u1, s1 = up1(g1, s1)
        u2, s2 = up2(g2, s2)
        for i in range(3):
            np.testing.assert_allclose(u1["stack"][i], u2[f"s{i}"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(u1["heads"].reshape(8, 12), u2["h"], rtol=1e-4, atol=1e-6)


def _llama_like():
    L, D, F, V = 2, 32, 64, 40
    f = jnp.float32
    return {"embed": jax.ShapeDtypeStruct((V, D), f),
            "layers": {"attn_norm": jax.ShapeDtypeStruct((L, D), f),
                       "wq": jax.ShapeDtypeStruct((L, D, D), f),
                       "w_up": jax.ShapeDtypeStruct((L, D, F), f),
                       "w_down": jax.ShapeDtypeStruct((L, F, D), f)},
            "final_norm": jax.ShapeDtypeStruct((D,), f), "head": jax.ShapeDtypeStruct((D, V), f)}


def test_per_leaf_selection_and_state_is_real_arrays_only():
    tx = G.galore(1e-3, rank=0.25, select="layers/(wq|w_up|w_down)$",
                  update_proj_gap=[("wq", 50), (".", 100)])
    st = jax.eval_shape(tx.init, _llama_like())
    gal = st[0]
    # keyed by param path: w_down [64, 32] (right: n x r), w_up [32, 64] (left: m x r), wq (right)
    assert jax.tree.map(lambda p: p.shape, gal.projectors) == {
        "layers/w_down": {"right": (2, 32, 8)}, "layers/w_up": {"left": (2, 32, 8)},
        "layers/wq": {"right": (2, 32, 8)}}
    inner = gal.inner_state
    assert inner.mu["layers"]["w_up"].shape == (2, 8, 64)       # left (32 < 64): r x n
    assert inner.mu["layers"]["w_down"].shape == (2, 64, 8)     # right: m x r
    assert inner.mu["embed"].shape == (40, 32) and inner.mu["final_norm"].shape == (32,)
    leaves = jax.tree.leaves(st, is_leaf=lambda x: x is None)
    assert all(isinstance(x, jax.ShapeDtypeStruct) and np.prod(x.shape) > 0 for x in leaves)


def test_stagger_spreads_refreshes():
    params = {"w1": jnp.zeros((16, 12)), "w2": jnp.zeros((12, 16)), "w3": jnp.zeros((2, 16, 16))}
    tx = G.scale_by_galore(rank=4, update_proj_gap=3, stagger=True)
    _, states = _run(tx, params, 7)
    side = {"w1": "right", "w2": "left", "w3": "right"}           # 'std': the smaller dimension
    changes = [[not np.array_equal(states[t + 1].projectors[k][s], states[t].projectors[k][s])
                for k, s in side.items()] for t in range(7)]
    # leaf j refreshes at t = 0 and where (t + j*3//3) % 3 == 0
    assert changes == [[(t == 0) or (t + j) % 3 == 0 for j in range(3)] for t in range(7)]
    for k, s in side.items():
        p = states[-1].projectors[k][s]
        p = p.reshape((-1,) + p.shape[-2:])
        for q in p:
            np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-5)


def test_moment_policies():
    params = _params()
    b1 = 0.9
    reset = G.scale_by_galore(optax.scale_by_adam(b1=b1), rank=4, update_proj_gap=2,
                              moments="reset")
    _, states = _run(reset, params, 3)
    # at t = 2 the projector is refreshed and mu restarts from zero: mu = (1 - b1) P^T g
    g = _grads(params, 2)["b"]                      # 16 x 32, std -> left: low = P^T g
    p = states[3].projectors["b"]["left"]
    np.testing.assert_allclose(states[3].inner_state.mu["b"], (1 - b1) * (p.T @ g), atol=1e-6)
    assert not np.allclose(states[2].inner_state.mu["b"], 0)
    # reproject, also through a compressed (8-bit) inner state: runs, finite, nonnegative nu
    rep = G.scale_by_galore(C.compress_state(optax.scale_by_adam(), "int8", min_size=0), rank=4,
                            update_proj_gap=2, moments="reproject")
    outs, states = _run(rep, {"a": params["a"]}, 3)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(outs))
    nu = states[-1].inner_state.inner.nu["a"]
    assert C.is_quantized(nu) and float(jnp.min(C.dequantize(nu, (32, 4)))) >= 0


def test_8bit_galore_tracks_f32_galore_and_adafactor_inner_runs():
    params = _params({"a": (64, 128)})
    f32, _ = _run(G.scale_by_galore(rank=16, update_proj_gap=3), params, 4)
    q, states = _run(G.scale_by_galore(C.compress_state(optax.scale_by_adam(eps=1e-6), "int8",
                                                        min_size=1024),
                                       rank=16, update_proj_gap=3), params, 4)
    assert C.is_quantized(states[-1].inner_state.inner.mu["a"])
    for x, y in zip(f32, q):
        rel = float(jnp.linalg.norm(x["a"] - y["a"]) / jnp.linalg.norm(x["a"]))
        assert rel < 0.2
    # Adafactor-style inner: reads the (abstract, projected) params' shapes
    outs, states = _run(G.scale_by_galore(optax.scale_by_factored_rms(min_dim_size_to_factor=8),
                                          rank=16), params, 2)
    assert states[-1].inner_state.v_row["a"].shape == (16,)    # factored over the 16 x 128 R
    assert bool(jnp.all(jnp.isfinite(outs[-1]["a"])))


def test_orbax_round_trip_and_bit_identical_resume(tmp_path):
    params = _params({"s": (2, 48, 64), "bias": (7,)})
    tx = G.galore(1e-2, C.compress_state(optax.scale_by_adam(), "fp8", min_size=0), rank=8,
                  update_proj_gap=2, stagger=True, weight_decay=0.1)
    upd = jax.jit(tx.update)
    s = tx.init(params)
    for t in range(2):
        _, s = upd(_grads(params, t), s, params)
    ck = ocp.StandardCheckpointer()
    ck.save(tmp_path / "galore", s)
    ck.wait_until_finished()
    r = ck.restore(tmp_path / "galore", jax.tree.map(ocp.utils.to_shape_dtype_struct, s))
    assert jax.tree.structure(r) == jax.tree.structure(s)
    for t in range(2, 4):
        u1, s = upd(_grads(params, t), s, params)
        u2, r = upd(_grads(params, t), r, params)
        for x, y in zip(jax.tree.leaves((u1, s)), jax.tree.leaves((u2, r))):
            assert np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("refresh,shapes", [("svd", {"s": (8, 16, 24)}),
                                            (G.Randomized(n_iter=1), {"w": (64, 32)})])
def test_sharded_equals_single_device(refresh, shapes):
    """A stack sharded over its layer axis (exact SVD) and a matrix sharded over its rows
    (randomized refresh: sharded matmuls, no gather of the gradient)."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
    params = _params(shapes)
    tx = G.galore(1e-2, rank=8, update_proj_gap=2, refresh=refresh, key=3)
    upd = jax.jit(tx.update)
    put = lambda t: jax.tree.map(lambda x: jax.device_put(
        x, NamedSharding(mesh, PS("d") if x.ndim and x.shape[0] % 8 == 0 else PS())), t)
    s1, s2 = tx.init(params), put(tx.init(params))
    for t in range(3):
        g = _grads(params, t)
        u1, s1 = upd(g, s1, params)
        u2, s2 = upd(put(g), s2, put(params))
        assert len(jax.tree.leaves(u2)[0].sharding.device_set) == 8
        for x, y in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2))):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_inject_hyperparams_needs_no_static_args():
    params = _params()
    tx = optax.inject_hyperparams(G.galore)(learning_rate=optax.linear_schedule(1e-2, 0.0, 10),
                                            rank=4, update_proj_gap=2, scale=0.25)
    ref = G.galore(1e-2, rank=4, update_proj_gap=2, scale=0.25)
    a, _ = _run(tx, params, 3)
    b, _ = _run(ref, params, 3)
    for t, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_allclose(x["a"], y["a"] * (1 - t / 10), rtol=1e-5, atol=1e-8)


def test_bad_inputs():
    p = {"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)}
    with pytest.raises(ValueError, match="rank=0"):
        G.scale_by_galore(rank=0)
    with pytest.raises(ValueError, match="rank=1.5"):
        G.galore(1e-3, rank=1.5)
    with pytest.raises(ValueError, match=r"rank=8 for leaf 'w' exceeds min\(m, n\)=4"):
        G.scale_by_galore(rank=8).init(p)
    with pytest.raises(ValueError, match="update_proj_gap=0"):
        G.scale_by_galore(update_proj_gap=0)
    with pytest.raises(ValueError, match="update_proj_gap rule .*value=-2"):
        G.scale_by_galore(update_proj_gap=[("w", -2)])
    with pytest.raises(ValueError, match="proj_type='diag'"):
        G.scale_by_galore(proj_type="diag")
    with pytest.raises(ValueError, match="refresh='qr'"):
        G.scale_by_galore(refresh="qr")
    with pytest.raises(ValueError, match="moments='zero'"):
        G.scale_by_galore(moments="zero")
    with pytest.raises(ValueError, match="select='attn' matches no leaf"):
        G.scale_by_galore(rank=2, select="attn").init(p)
    with pytest.raises(ValueError, match="leaf 'b' of shape \\(4,\\)"):
        G.scale_by_galore(rank=2, select=".").init(p)
    with pytest.raises(TypeError, match="rank='4'"):
        G.scale_by_galore(rank="4")


def test_reference_mode_matches_galore_torch_adamw_numpy():
    """``galore(reference_mode=True)`` against galore-torch's GaLoreAdamW step in NumPy: eps added
    to sqrt(v) before bias correction (``reference_galore``), ``p <- p - lr u`` then
    ``p <- p - lr wd p``, a scheduled lr, 8 steps with refreshes at 0, 3, 6, a tall and a wide
    matrix and an unprojected vector (plain reference Adam). Each step's update is compared with
    the reference's, from the same params (so float32 storage of the params does not accumulate).
    Gradients of size 1e-5 make eps matter; the default mode (optax eps, decay before the update)
    is the negative control."""
    shapes = {"a": (32, 16), "b": (16, 32), "c": (16,)}
    params = _params(shapes)
    steps, gap, r, wd, eps = 8, 3, 4, 0.1, 1e-6
    sched = optax.linear_schedule(1e-2, 2e-3, steps)
    grads = [jax.tree.map(lambda g: 1e-5 * g, _grads(params, t)) for t in range(steps)]

    def train(tx):
        p, st, out = params, tx.init(params), []
        upd = jax.jit(tx.update)
        for g in grads:
            u, st = upd(g, st, p)
            out.append((p, u))
            p = optax.apply_updates(p, u)
        return out

    select = lambda path, x: x.ndim == 2
    got = train(G.galore(sched, rank=r, update_proj_gap=gap, scale=0.25, weight_decay=wd,
                         select=select, reference_mode=True))
    default = train(G.galore(sched, optax.scale_by_adam(b1=0.9, b2=0.999, eps=eps), rank=r,
                             update_proj_gap=gap, scale=0.25, weight_decay=wd, select=select))
    dirs = {k: reference_galore([g[k] for g in grads], r, gap, 0.25, "std", eps=eps)[0]
            for k in ("a", "b")}
    m = v = np.zeros(shapes["c"])
    dirs["c"] = []
    for t, g in enumerate(grads, 1):                  # the unprojected leaf: reference AdamW
        g = np.asarray(g["c"], np.float64)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        dirs["c"].append(m / (np.sqrt(v) + eps) * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t))
    errs = {"reference_mode": 0.0, "default": 0.0}
    for t in range(steps):
        lr = float(sched(t))
        for which, run in (("reference_mode", got), ("default", default)):
            p, u = run[t]
            for k in shapes:
                p1 = np.asarray(p[k], np.float64) - lr * dirs[k][t]
                want = (p1 - lr * wd * p1) - np.asarray(p[k], np.float64)
                err = np.abs(np.asarray(u[k], np.float64) - want).max() / np.abs(want).max()
                errs[which] = max(errs[which], err)
    print(f"max |update - reference| / max |reference update| over 8 steps: {errs}")
    assert errs["reference_mode"] < 5e-5, errs   # float32 rounding (measured 9.5e-6)
    assert errs["default"] > 1e-3, errs          # the default is a different step


def test_reference_adam_formula_and_errors():
    g = {"w": jnp.asarray([1e-6, -2e-6, 3.0], jnp.float32)}
    tx = G.scale_by_reference_adam(b1=0.5, b2=0.75, eps=1e-6)
    u, st = tx.update(g, tx.init(g))
    x = np.asarray(g["w"], np.float64)
    want = (0.5 * x) / (np.sqrt(0.25 * x * x) + 1e-6) * np.sqrt(0.25) / 0.5
    np.testing.assert_allclose(u["w"], want, rtol=1e-6)
    assert int(st.count) == 1
    with pytest.raises(ValueError, match="b2"):
        G.scale_by_reference_adam(b2=1.0)
    with pytest.raises(ValueError, match="eps"):
        G.scale_by_reference_adam(eps=-1.0)
    tx = G.galore(1e-3, rank=1, weight_decay=0.1, reference_mode=True)
    p = {"w": jnp.ones((4, 3))}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(p, tx.init(p))


# ----------------------------------------------------------------------------- issue 15 probes

@pytest.mark.parametrize("kwargs, err, msg", [
    (dict(scale=float("nan")), ValueError, "scale must be a finite number; got nan"),
    (dict(scale=-0.25), ValueError, "scale must be a finite number > 0; got -0.25"),
    (dict(scale=0.0), ValueError, "scale must be a finite number > 0"),
    (dict(scale="0.25"), TypeError, "scale must be a real number"),
    (dict(scale=[("w", float("inf"))]), ValueError, "scale rule .*finite number"),
    (dict(learning_rate=-1e-3), ValueError, "learning_rate must be a finite number >= 0"),
    (dict(learning_rate=float("nan")), ValueError, "learning_rate must be a finite number"),
    (dict(learning_rate="1e-3"), TypeError, "learning_rate must be a number"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be a finite number >= 0"),
    (dict(weight_decay=float("inf")), ValueError, "weight_decay must be a finite number"),
])
def test_bad_scale_learning_rate_weight_decay(kwargs, err, msg):
    kw = dict(learning_rate=1e-3, rank=2)
    kw.update(kwargs)
    with pytest.raises(err, match=msg):
        G.galore(**kw)


def test_int_params_rejected_at_init_naming_the_leaf():
    """An int leaf selected for projection gave all-zero updates; now a TypeError by path. (The
    default selection, ``is_weight_matrix``, takes float leaves only.)"""
    p = {"wq": jnp.ones((8, 4)), "blocks": {"w": jnp.ones((8, 4), jnp.int32)}}
    with pytest.raises(TypeError, match="params leaf 'blocks/w' has dtype int32"):
        G.galore(1e-3, rank=2, select=r"^(wq|blocks/w)$").init(p)
    G.galore(1e-3, rank=2, select="wq").init(p)   # an int leaf left out is the inner's business


def test_transposed_gradient_names_the_leaf_and_both_shapes():
    tx = G.galore(1e-3, rank=2)
    p = {"w": jnp.ones((8, 4))}
    s = tx.init(p)
    with pytest.raises(ValueError, match=r"leaf 'w' has shape \(4, 8\) and projects its left side, "
                                         r"but the state's projectors for it \[\(4, 2\)\] project "
                                         r"the right side; was the gradient transposed"):
        tx.update({"w": jnp.ones((4, 8))}, s, p)
    tx = G.galore(1e-3, rank=2, proj_type="left")          # sibling: a resized matrix
    s = tx.init(p)
    with pytest.raises(ValueError, match="transposed"):
        tx.update({"w": jnp.ones((6, 4))}, s, {"w": jnp.ones((6, 4))})


@pytest.mark.parametrize("kwargs, match", [
    (dict(inner="adam"), "inner must be an optax.GradientTransformation or None"),
    (dict(projector_dtype=jnp.int32), "projector_dtype must be a floating-point dtype.*int32"),
    (dict(stagger="no"), "stagger must be True or False"),
    (dict(sign_align=1), "sign_align must be True or False"),
])
def test_bad_inner_dtype_and_flags(kwargs, match):
    with pytest.raises(TypeError, match=match):
        G.galore(1e-3, rank=2, **kwargs)


def test_bad_gap_and_rank_types():
    with pytest.raises(TypeError, match="update_proj_gap='200' must be a positive int"):
        G.galore(1e-3, rank=2, update_proj_gap="200")
    with pytest.raises(ValueError, match="update_proj_gap=inf must be a positive int"):
        G.galore(1e-3, rank=2, update_proj_gap=float("inf"))
    with pytest.raises(ValueError, match="update_proj_gap=nan"):
        G.galore(1e-3, rank=2, update_proj_gap=float("nan"))
    with pytest.raises(TypeError, match="rank='8'"):
        G.galore(1e-3, rank="8")
    with pytest.raises(ValueError, match="rank=nan"):
        G.galore(1e-3, rank=float("nan"))
