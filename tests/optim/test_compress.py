"""Tests for jaxeff.optim.compress: int8 / FP8-DRE group codecs and the compressed-state wrapper."""
import numpy as np
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

from jaxeff.optim import _compress as C


def _heavy_v(key, shape):
    """Heavy-tailed 'second moments': squared Cauchy (Student-t, 1 dof) gradients, scaled."""
    g = jax.random.t(key, 1.0, shape)
    return g * g * 1e-6


_quantize = jax.jit(C.quantize, static_argnums=(1, 2, 3))
_dequantize = jax.jit(C.dequantize, static_argnums=(1, 2))


def _rt(x, fmt, group=128, expand=True):
    """Jitted round trip (one compile per shape/format instead of one per eager op)."""
    return _dequantize(_quantize(x, fmt, group, expand), x.shape)


def _rel(y, x):
    return np.abs(np.asarray(y) - np.asarray(x)) / np.abs(np.asarray(x))


def test_int8_linear_absolute_error_bound():
    x = jax.random.normal(jax.random.PRNGKey(0), (7, 256)) * 3.0
    q = _quantize(x, "int8", 128, False)
    y = _dequantize(q, x.shape)
    absmax = np.abs(np.asarray(x)).reshape(7, 2, 128).max(-1, keepdims=True)
    err = np.abs(np.asarray(y - x)).reshape(7, 2, 128)
    assert np.all(err <= absmax / 254 * (1 + 1e-5))
    assert q.codes.dtype == jnp.int8 and q.codes.shape == (7, 2, 128) and q.scale.shape == (7, 2)


@pytest.mark.parametrize("fmt,expand", [("fp8", False), ("fp8", True), ("int8", True)])
def test_relative_error_bounds(fmt, expand):
    """A code rounded by at most h (fp8: half an ulp, <= 2^-4 |q| or 2^-10 in the subnormals; int8:
    0.5) from the exact q in [q^ - h, q^ + h] moves x = M (|q|/Q)^(1/k) by a factor (q^/q)^(1/k)."""
    x = 10 ** jax.random.uniform(jax.random.PRNGKey(1), (64, 128), minval=-1, maxval=1)
    x = x * jnp.where(jax.random.bernoulli(jax.random.PRNGKey(2), 0.5, x.shape), 1, -1)
    q = _quantize(x, fmt, 128, expand)
    rel = _rel(_dequantize(q, x.shape), x)
    qh = np.abs(np.asarray(q.codes, np.float32)).reshape(rel.shape)
    h = np.full_like(qh, 0.5) if fmt == "int8" else np.maximum(2.0 ** -10, qh * 2.0 ** -4)
    inv_k = 1 / (np.asarray(q.k).reshape(-1, 1) if expand else np.ones_like(qh))
    bound = np.maximum((qh / (qh - h)) ** inv_k - 1, 1 - (qh / (qh + h)) ** inv_k)
    assert np.all(rel <= bound * (1.001) + 1e-6)
    if not expand:  # two decades per group: every code is a normal fp8 number
        assert rel.max() <= 2.0 ** -4 * 1.001
    assert np.median(rel) < (0.01 if fmt == "fp8" and expand else 0.03)


def test_dre_matches_coat_numbers_on_one_decade_groups():
    """TECHNIQUES.md §3 (observed): 1-decade groups, median rel. error 0.0219 -> 0.0047 (k ~ 5)."""
    x = 10 ** jax.random.uniform(jax.random.PRNGKey(0), (1000, 128))
    plain = np.median(_rel(_rt(x, "fp8", 128, False), x))
    q = _quantize(x, "fp8", 128, True)
    dre = np.median(_rel(_dequantize(q, x.shape), x))
    assert 0.018 < plain < 0.025 and 0.003 < dre < 0.006
    assert 4.5 <= float(np.median(q.k)) <= 5.5


def test_dre_reduces_error_on_heavy_tailed_second_moments():
    v = _heavy_v(jax.random.PRNGKey(3), (64, 128))
    plain = _rt(v, "fp8", 128, False)
    dre = _rt(v, "fp8", 128, True)
    rp, rd = _rel(plain, v), _rel(dre, v)
    assert np.mean(rd) < 0.5 * np.mean(rp)            # plain flushes the small tail to zero
    assert np.mean(np.asarray(plain) == 0) > 0.01 and not np.any(np.asarray(dre) == 0)
    # linear int8 flushes even more; int8 with DRE keeps every nonzero value
    lin8 = _rt(v, "int8", 128, False)
    dre8 = _rt(v, "int8", 128, True)
    assert np.mean(np.asarray(lin8) == 0) > 0.1 and not np.any(np.asarray(dre8) == 0)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("expand", [False, True])
def test_signs_zeros_and_degenerate_groups(fmt, expand):
    g = np.zeros((5, 16), np.float32)
    g[1] = 3.0                                         # constant group: R = 1
    g[2, 3] = -2.5                                     # a single nonzero
    g[3] = np.linspace(-1e-3, 1e-3, 16)                # symmetric, holds an exact zero? (no: even)
    g[3, 7] = 0.0
    g[4] = np.geomspace(1e-20, 1e20, 16) * np.resize([1, -1], 16)  # 40 decades
    x = jnp.asarray(g)
    q = _quantize(x, fmt, 16, expand)
    y = np.asarray(_dequantize(q, x.shape))
    assert np.all(np.isfinite(y))
    assert np.array_equal(y == 0, g == 0) or (not expand and np.all((y == 0) >= (g == 0)))
    if expand:
        assert np.array_equal(np.sign(y), np.sign(g))
        k = np.asarray(q.k)
        assert np.allclose(k * 16, np.round(k * 16)) and np.all(k >= 1 / 16)
        assert k[0] == 1.0 and k[1] == 1.0 and k[2] == 1.0   # all-zero, R = 1, single value
    else:
        nz = y != 0
        assert np.array_equal(np.sign(y[nz]), np.sign(g[nz]))
    np.testing.assert_allclose(y[1], 3.0, rtol=1e-6)


def test_fp8_cast_never_nans_for_values_past_448():
    x = jnp.asarray([[1e30, -3e38, 448.0, 449.0, 1e-30, 0.0, 5.0, -7.0]], jnp.float32)
    for expand in (False, True):
        q = _quantize(x, "fp8", 8, expand)
        assert not np.any(np.isnan(np.asarray(q.codes, np.float32)))
        y = np.asarray(_dequantize(q, x.shape))
        assert np.all(np.isfinite(y)) and abs(y[0, 1] / -3e38 - 1) < 1 / 16


def test_dre_exponent_is_multiple_of_one_sixteenth():
    mx = jnp.asarray([1.0, 10.0, 1e3, 1e30, 2.0, 1.0])
    mn = jnp.asarray([1.0, 1.0, 1.0, 1e-30, 1.999999, 0.0])
    k = np.asarray(C.dre_exponent(mx, mn, "fp8"))
    assert np.allclose(k * 16, np.round(k * 16)) and k[0] == 1.0
    assert k[1] == np.floor(16 * np.log2(448 ** 2 / 2) / np.log2(10.0)) / 16
    assert np.all(k >= 1 / 16) and np.all(k <= 1024)


def test_padding_and_grouping_layouts():
    for shape, codes in [((3, 100, 64), (3, 50, 128)), ((5, 7), (1, 128))]:
        x = jax.random.normal(jax.random.PRNGKey(0), shape)
        q = jax.eval_shape(lambda x: C.quantize(x, "fp8", 128, True), x)
        assert q.codes.shape == codes  # leading axes kept: a leading-axis sharding survives
        np.testing.assert_allclose(_rt(x, "fp8", 128, True), x, rtol=0.07, atol=0.01)


def _adam_run(tx, steps=6, key=0):
    params = {"w": jax.random.normal(jax.random.PRNGKey(key), (64, 96)), "b": jnp.zeros(8)}
    state = tx.init(params)
    upd = jax.jit(tx.update)
    outs = []
    for t in range(steps):
        g = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(100 + t), p.shape), params)
        u, state = upd(g, state, params)
        outs.append(u)
    return outs, state


def test_identity_quantizer_is_bitwise_equal_to_inner():
    ref, _ = _adam_run(optax.scale_by_adam())
    ident, state = _adam_run(C.compress_state(optax.scale_by_adam(), "none", min_size=0))
    for a, b in zip(ref, ident):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            assert np.array_equal(np.asarray(x), np.asarray(y))
    assert not any(C.is_quantized(x) for x in jax.tree.leaves(state, is_leaf=C.is_quantized))


@pytest.mark.parametrize("fmt,tol", [("fp8", 0.15), ("int8", 0.15), ("bf16", 0.02)])
def test_compressed_adam_tracks_f32_adam(fmt, tol):
    ref, _ = _adam_run(optax.scale_by_adam())
    got, state = _adam_run(C.compress_state(optax.scale_by_adam(), fmt, min_size=4096))
    for a, b in zip(ref, got):
        rel = float(jnp.linalg.norm(a["w"] - b["w"]) / jnp.linalg.norm(a["w"]))
        assert rel < tol
        assert np.array_equal(np.asarray(a["b"]), np.asarray(b["b"]))  # small leaf: f32, exact
    assert C.is_quantized(state.inner.mu["w"]) == (fmt != "bf16")
    assert state.inner.mu["b"].dtype == jnp.float32


def test_fmt_rules_and_state_bytes():
    tx = C.compress_state(optax.scale_by_adam(), [("mu", "fp8"), ("nu", "int8")], min_size=0)
    st = jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct((256, 512), jnp.float32)})
    assert st.inner.mu["w"].codes.dtype == jnp.float8_e4m3fn
    assert st.inner.nu["w"].codes.dtype == jnp.int8
    nbytes = sum(C.describe_state(st).values())
    assert nbytes < 2 * 256 * 512 * 1.1 and nbytes > 2 * 256 * 512  # ~1.06 B/value vs 8 for f32


def test_around_sophia_scaling():
    from jaxeff.optim import hutchinson
    from jaxeff.optim import scale_by_sophia
    A = jnp.asarray(np.random.default_rng(5).standard_normal((64, 64)), jnp.float32)
    loss = lambda p, batch: jnp.sum((batch @ p["w"]) ** 2) * 1e-3
    batch = jnp.asarray(np.random.default_rng(6).standard_normal((16, 64)), jnp.float32)
    params = {"w": A}

    def run(tx):
        s = tx.init(params)
        upd = jax.jit(lambda g, s: tx.update(g, s, params, batch=batch, key=jax.random.PRNGKey(0)))
        out = []
        for t in range(2):
            g = jax.tree.map(lambda x: x * (1 + t), jax.grad(loss)(params, batch))
            u, s = upd(g, s)
            out.append(u["w"])
        return out, s

    ref, _ = run(scale_by_sophia(hutchinson(loss), update_interval=2))
    fp8, s = run(C.compress_state(scale_by_sophia(hutchinson(loss), update_interval=2), "fp8"))
    for a, c in zip(ref, fp8):
        assert float(jnp.mean(jnp.abs(a - c))) < 0.05 * float(jnp.mean(jnp.abs(a))) + 1e-6
    assert C.is_quantized(s.inner.mu["w"]) and C.is_quantized(s.inner.h["w"])
    assert s.inner.key.dtype == jnp.uint32  # non-float leaves untouched


def test_orbax_round_trip_and_bit_identical_resume(tmp_path):
    tx = C.compress_state(optax.scale_by_adam(), "fp8", min_size=0)
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (32, 64))}
    grads = [jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(t), p.shape), params)
             for t in range(4)]
    upd = jax.jit(tx.update)
    s = tx.init(params)
    for g in grads[:2]:
        _, s = upd(g, s, params)
    ck = ocp.StandardCheckpointer()
    ck.save(tmp_path / "ck", s)
    ck.wait_until_finished()
    restored = ck.restore(tmp_path / "ck", jax.tree.map(ocp.utils.to_shape_dtype_struct, s))
    assert jax.tree.structure(restored) == jax.tree.structure(s)
    for a, b in ((s, restored),):
        u1, s1 = upd(grads[2], a, params)
        u2, s2 = upd(grads[2], b, params)
        for x, y in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2))):
            assert np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_sharded_equals_single_device():
    mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
    tx = C.compress_state(optax.scale_by_adam(), "fp8", min_size=0)
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (64, 256))}
    g = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    upd = jax.jit(tx.update)
    s = tx.init(params)
    u1, s1 = upd(g, s, params)
    shard = lambda t: jax.tree.map(lambda x: jax.device_put(
        x, NamedSharding(mesh, PS("d") if x.ndim and x.shape[0] % 8 == 0 else PS())), t)
    u2, s2 = upd(shard(g), shard(s), shard(params))
    assert len(u2["w"].sharding.device_set) == 8
    for x, y in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2))):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                   rtol=1e-6, atol=1e-7)


def test_bad_inputs():
    with pytest.raises(ValueError, match="fmt must be one of .*got 'int4'"):
        C.compress_state(optax.scale_by_adam(), "int4")
    with pytest.raises(TypeError, match="fmt must be one of"):
        C.compress_state(optax.scale_by_adam(), 8)
    with pytest.raises(ValueError, match="group_size must be an int >= 1; got 0"):
        C.compress_state(optax.scale_by_adam(), group_size=0)
    with pytest.raises(TypeError, match="group_size must be an int"):
        C.compress_state(optax.scale_by_adam(), group_size=128.0)
    with pytest.raises(ValueError, match="min_size must be an int >= 0; got -1"):
        C.compress_state(optax.scale_by_adam(), min_size=-1)
    with pytest.raises(TypeError, match="expand must be True, False or None"):
        C.compress_state(optax.scale_by_adam(), expand="yes")
    with pytest.raises(ValueError, match="fmt rule 0 value must be one of .*got 'fp16'"):
        C.compress_state(optax.scale_by_adam(), [("mu", "fp16")])
    for bad in (None, "adam", optax.scale_by_adam):   # the cryptic-error probes
        with pytest.raises(TypeError, match="inner must be an optax.GradientTransformation"):
            C.compress_state(bad)
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        C.quantize(jnp.ones(8), "int8", 0)
    tx = C.compress_state(optax.scale_by_adam(), select="no_such_state")
    with pytest.raises(ValueError, match="select='no_such_state' matches no leaf"):
        tx.init({"w": jnp.ones((4, 4))})
    with pytest.raises(ValueError, match="int8 or float8"):
        C.group_dequantize(jnp.ones((2, 4)), jnp.ones(2))


# ----------------------------------------------------------------------------- non-finite values

@pytest.mark.parametrize("fmt,expand", [("int8", True), ("int8", False), ("fp8", True),
                                        ("fp8", False)])
def test_non_finite_values_round_trip_alone(fmt, expand):
    """inf/NaN keep their own codes; the rest of the group is quantized as if they were absent."""
    x = jnp.linspace(-1.0, 1.0, 256).reshape(2, 128) * 1e-3
    bad = x.at[0, 3].set(jnp.inf).at[0, 7].set(-jnp.inf).at[0, 9].set(jnp.nan)
    y = np.asarray(_rt(bad, fmt, 128, expand))
    assert y[0, 3] == np.inf and y[0, 7] == -np.inf and np.isnan(y[0, 9])
    ok = np.isfinite(np.asarray(bad))
    assert np.isfinite(y[ok]).all()
    ref = np.asarray(_rt(x, fmt, 128, expand))
    np.testing.assert_array_equal(y[1], ref[1])           # the clean group is untouched
    # flagged E4M3 groups round twice (to Q = 448, then rescaled to Q' = 416): up to one ulp, 1/8
    rtol = 0.13 if fmt == "fp8" else 0.07
    np.testing.assert_allclose(y[0][ok[0]], np.asarray(x)[0][ok[0]], rtol=rtol, atol=1e-5)
    all_bad = jnp.full((1, 128), jnp.nan).at[0, 0].set(jnp.inf)
    z = np.asarray(_rt(all_bad, fmt, 128, expand))
    assert z[0, 0] == np.inf and np.isnan(z[0, 1:]).all()


def _adam_after_bad_step(tx, bad, n_after):
    p = jnp.ones((4096,))
    g = 0.1 * jax.random.normal(jax.random.PRNGKey(0), (4096,))

    def run():
        s = tx.init(p)
        _, s = tx.update(g, s, p)
        u_bad, s = tx.update(g if bad is None else g.at[0].set(bad), s, p)

        def body(s, _):
            u, s = tx.update(g, s, p)
            return s, u
        s, us = jax.lax.scan(body, s, None, length=n_after)
        return u_bad, us, s
    return jax.jit(run)()


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("bad", [jnp.inf, -jnp.inf, jnp.nan, 1e30])
def test_one_bad_gradient_does_not_poison_the_group(fmt, bad):
    """The probe: one bad gradient value. Plain Adam is the reference coordinate by coordinate:
    same non-finite pattern at the bad step and after it; every other value stays finite and
    (for 1e30, once the finite outlier mu = 1e29 has decayed out of its group) matches the
    compressed run that never saw the bad value."""
    n = 800 if bad == 1e30 else 3
    u_ref, us_ref, _ = _adam_after_bad_step(optax.scale_by_adam(), bad, n)
    tx = C.compress_state(optax.scale_by_adam(), fmt)
    u_c, us_c, s_c = _adam_after_bad_step(tx, bad, n)
    _, us_clean, _ = _adam_after_bad_step(tx, None, n)
    u_ref, us_ref, u_c, us_c, us_clean = map(np.asarray, (u_ref, us_ref, u_c, us_c, us_clean))
    np.testing.assert_array_equal(np.isnan(u_c), np.isnan(u_ref))
    np.testing.assert_array_equal(np.isnan(us_c), np.isnan(us_ref))
    assert np.isfinite(us_c[:, 1:]).all()                    # the rest of the group is alive
    np.testing.assert_array_equal(us_c[:, 0], us_ref[:, 0])  # 0 (nu = inf) or NaN, as plain Adam
    # the hit group has recovered: the other groups are bit-equal to the clean run's, and the
    # hit one is within quantization error (its nu group stays flagged for the inf, with
    # Q' = 126 / 416, so its codes round differently)
    np.testing.assert_array_equal(us_c[-1, 128:], us_clean[-1, 128:])
    err_hit = np.abs(us_c[-1, 1:128] - us_ref[-1, 1:128]).max()
    err_clean = np.abs(us_clean[-1, 1:] - us_ref[-1, 1:]).max()  # compression error, any group
    # fp8 1e30: 0.43 vs 0.17 (the flagged group rescales its E4M3 codes to Q' = 416: double rounding)
    assert err_hit <= 3 * max(err_clean, 0.02), (err_hit, err_clean)
    for node in jax.tree.leaves(s_c, is_leaf=C.is_quantized):
        if C.is_quantized(node):                             # scales stay finite
            assert np.isfinite(np.asarray(node.scale)).all()


def test_nan_gradient_is_not_turned_finite_and_apply_if_finite_keeps_the_state():
    """int8 used to store a NaN as a finite code. Now it stays NaN (optax's behaviour), and
    ``apply_if_finite`` around the compressed transform skips the step, leaving the state."""
    tx = C.compress_state(optax.scale_by_adam(), "int8")
    p = jnp.ones((4096,))
    s = tx.init(p)
    _, s = tx.update(jnp.full((4096,), 0.1), s, p)
    _, s_nan = tx.update(jnp.full((4096,), 0.1).at[5].set(jnp.nan), s, p)
    mu = C.dequantize(s_nan.inner.mu, (4096,))
    assert np.isnan(np.asarray(mu)[5]) and np.isfinite(np.delete(np.asarray(mu), 5)).all()
    safe = optax.apply_if_finite(C.compress_state(optax.scale_by_adam(), "int8"), 3)
    st = safe.init(p)
    _, st = safe.update(jnp.full((4096,), 0.1), st, p)
    for bad in (jnp.nan, jnp.inf):
        u, st2 = safe.update(jnp.full((4096,), 0.1).at[5].set(bad), st, p)
        assert not np.asarray(u).any()
        for a, b in zip(jax.tree.leaves(st.inner_state), jax.tree.leaves(st2.inner_state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert int(st2.notfinite_count) == 1


def test_transposed_gradient_is_named_not_reinterpreted():
    """A [4096, 2] state fed [2, 4096] gradients: the codes have the same size and used to be
    reshaped silently (without params) or failed deep in optax (with params)."""
    tx = C.compress_state(optax.scale_by_adam(), "int8")
    p = {"w": jnp.ones((4096, 2))}
    s = tx.init(p)
    with pytest.raises(ValueError, match=r"updates leaf 'w' has shape \(2, 4096\) but in params "
                                         r"it has shape \(4096, 2\)"):
        tx.update({"w": jnp.ones((2, 4096))}, s, p)
    with pytest.raises(ValueError, match=r"state leaf 'inner/mu/w/codes' the shape"):
        tx.update({"w": jnp.ones((2, 4096))}, s)
    tx.update({"w": jnp.ones((4096, 2))}, s)                  # the right shapes still pass
