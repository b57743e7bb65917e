"""GPTQ solve and streaming Hessians (jaxeff.params.gptq).

Shapes are tiny and the static configurations few: each one is a separate XLA compilation.
"""
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxeff.params import (aligned_block_size, gptq, gptq_solve, hessian_init, hessian_update,
                           quant_error)
from jaxeff.params import rtn_weight

IN, OUT = 32, 24


def _data(seed=0, n=256):
    """Weights [IN, OUT] and strongly correlated inputs X [n, IN] with H = 2/n X^T X."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((IN, OUT)).astype(np.float32)
    mix = rng.standard_normal((IN, IN)) * (0.7 ** np.arange(IN))[:, None]
    x = (rng.standard_normal((n, IN)) @ mix + 0.5 * rng.standard_normal((n, 1))).astype(np.float32)
    return w, x, (2.0 / n) * x.T.astype(np.float64) @ x.astype(np.float64)


def _np_find_params(x, bits):
    maxq = 2 ** bits - 1
    xmin, xmax = np.minimum(x.min(1), 0), np.maximum(x.max(1), 0)
    both = (xmin == 0) & (xmax == 0)
    xmin, xmax = np.where(both, -1, xmin), np.where(both, 1, xmax)
    scale = (xmax - xmin) / maxq
    return scale, np.round(-xmin / scale)


def _np_gptq(w_io, h, bits, gs, blocksize, percdamp=0.01, actorder=False):
    """NumPy float64 port of the reference algorithm (IST-DASLab gptq.py fasterquant), in the
    reference's [out, in] layout. Codes come back in stored (permuted) order, [in, out]."""
    maxq = 2 ** bits - 1
    W, H = w_io.T.astype(np.float64).copy(), h.astype(np.float64).copy()
    cols = W.shape[1]
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = np.argsort(-np.diag(H), kind="stable") if actorder else np.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * np.mean(np.diag(H)) * np.eye(cols)
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T
    scale, zero = _np_find_params(W, bits)
    Q = np.zeros_like(W)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, E1, H1 = W[:, i1:i2].copy(), np.zeros((W.shape[0], i2 - i1)), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if gs is not None and (i1 + i) % gs == 0:
                scale, zero = _np_find_params(W[:, i1 + i:i1 + i + gs], bits)
            w = W1[:, i]
            q = np.clip(np.round(w / scale) + zero, 0, maxq)
            Q[:, i1 + i] = q
            err = (w - scale * (q - zero)) / H1[i, i]
            W1[:, i:] -= np.outer(err, H1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    return Q.T, perm


def test_identity_hessian_equals_rtn():
    w, _, _ = _data()
    for bits, gs, sym in [(4, None, False), (3, 8, True)]:
        g = gptq(w, 3.7 * jnp.eye(IN), bits, gs, sym=sym)
        r = rtn_weight(w, bits, gs, sym=sym)
        np.testing.assert_array_equal(np.asarray(g.scale), np.asarray(r.scale))
        np.testing.assert_array_equal(np.asarray(g.zero), np.asarray(r.zero))
        diff = np.asarray(g.codes) != np.asarray(r.codes)
        if sym:
            # Symmetric: each group's -xmax lands exactly on a rounding tie (-maxq/2), which
            # differently fused float32 programs may break either way; nothing else may differ.
            scale = np.repeat(np.asarray(r.scale), gs, axis=0)
            frac = np.abs(np.abs(w / scale) % 1.0 - 0.5)
            assert np.all(frac[diff] < 1e-4) and diff.mean() < 0.1
        else:
            assert not diff.any()
        np.testing.assert_array_equal(np.asarray(g.materialize())[~diff],
                                      np.asarray(r.materialize())[~diff])


def test_parity_with_numpy_reference_x64():
    w, _, h = _data(1)
    with jax.enable_x64(True):
        res = gptq_solve(jnp.asarray(w, jnp.float64), jnp.asarray(h), 0.01, bits=3, group_size=8,
                         block_size=128, act_order=True)
        codes, perm = np.asarray(res.codes), np.asarray(res.perm)
    # blocksize == group size: the reference then reads every group from fully updated rows.
    ref_codes, ref_perm = _np_gptq(w, h, 3, 8, blocksize=8, actorder=True)
    np.testing.assert_array_equal(perm, ref_perm)
    assert np.mean(codes != ref_codes) <= 0.005 and bool(res.ok)


def test_block_size_invariance_and_code_range():
    w, _, h = _data(2)
    a = gptq(w, h, 3, 8, block_size=128, act_order=True)       # several groups per block
    b = gptq(w, h, 3, 8, block_size=1, act_order=True)         # blocks inside a group
    assert np.mean(np.asarray(a.codes) != np.asarray(b.codes)) <= 0.005
    np.testing.assert_allclose(float(quant_error(w, a.materialize(), h)),
                               float(quant_error(w, b.materialize(), h)), rtol=1e-3)
    for q in (a, b):
        codes = np.asarray(q.codes)
        assert codes.dtype == np.int32 and codes.min() >= 0 and codes.max() <= 2 ** q.bits - 1
    assert aligned_block_size(128, 48) == 96 and aligned_block_size(100, 128) == 64


@pytest.mark.parametrize("bits,gs,act_order,sym", [(4, None, False, False), (3, 8, True, False),
                                                   (3, 8, False, True)])
def test_error_not_worse_than_rtn_on_correlated_inputs(bits, gs, act_order, sym):
    w, x, h = _data(3)
    g = gptq(w, h, bits, gs, act_order=act_order, sym=sym)
    r = rtn_weight(w, bits, gs, sym=sym)
    out_err = lambda q: float(np.sum((x @ w - x @ np.asarray(q.materialize())) ** 2))  # noqa
    assert out_err(g) < 0.8 * out_err(r)


def test_act_order_permutation_undone_exactly():
    w, _, _ = _data(4)
    diag = np.linspace(1.0, 5.0, IN)[np.random.default_rng(0).permutation(IN)]
    h = np.diag(diag)                 # no cross terms: GPTQ = RTN of the permuted rows
    g = gptq(w, h, 3, 8, act_order=True)
    perm = np.argsort(-diag, kind="stable")
    np.testing.assert_array_equal(np.asarray(g.perm), perm)
    r = rtn_weight(w[perm], 3, 8)
    expect = np.empty_like(w)
    expect[perm] = np.asarray(r.materialize())
    np.testing.assert_array_equal(np.asarray(g.materialize()), expect)


def test_dead_columns_become_zero():
    w, _, h = _data(5)
    dead = [0, 7, 19]
    h[dead, :] = 0
    h[:, dead] = 0
    g = gptq(w, h, 3, 8, act_order=True)
    wh = np.asarray(g.materialize())
    assert np.all(wh[dead] == 0) and np.all(np.isfinite(wh))
    assert np.any(wh[[1, 2, 3]] != 0)


def test_stacked_equals_per_matrix_and_pad():
    w, _, h = _data(6)
    w2, _, h2 = _data(7)
    st = gptq(np.stack([w, w2]), np.stack([h, h2]), 4, block_size=5)   # ragged last block
    assert st.shape == (2, IN, OUT) and st.packed.shape[0] == 2
    for i, (wi, hi) in enumerate([(w, h), (w2, h2)]):
        one = gptq(wi, hi, 4)                                            # block_size 128
        assert np.mean(np.asarray(st.codes[i]) != np.asarray(one.codes)) <= 0.005
        np.testing.assert_array_equal(np.asarray(st.perm[i]), np.arange(IN))
    # group size 12 does not divide 32: the last group is ragged (8 rows).
    g = gptq(w, h, 3, 12, pad=True)
    assert g.scale.shape == (3, OUT) and g.materialize().shape == (IN, OUT)
    r = rtn_weight(w, 3, 12, pad=True)
    assert float(quant_error(w, g.materialize(), h)) < float(quant_error(w, r.materialize(), h))


def test_bad_inputs_raise_clear_errors():
    w, _, h = _data(8)
    with pytest.raises(ValueError, match="bits must be one of"):
        gptq(w, h, 5)
    with pytest.raises(ValueError, match="group_size=12 does not divide"):
        gptq(w, h, 4, 12)
    with pytest.raises(ValueError, match="h must have shape"):
        gptq(w, h[:16, :16], 4)
    with pytest.raises(ValueError, match="block_size"):
        gptq(w, h, 4, block_size=0)
    with pytest.raises(ValueError, match="percdamp"):
        gptq(w, h, 4, percdamp=-0.1)
    x = np.random.default_rng(0).standard_normal((4, IN))   # rank 4 < 32 inputs
    singular = 2 * x.T @ x / 4
    with pytest.raises(ValueError, match="singular.*percdamp=0"):
        gptq(w, singular, 4, percdamp=0.0)
    assert np.all(np.isfinite(np.asarray(gptq(w, singular, 4).materialize())))   # damped: fine


def test_hessian_streaming_mask_sharding_and_checkpoint(tmp_path):
    _, x, _ = _data(9, n=64)
    xb = x.reshape(4, 2, 8, IN)                              # 4 batches of [B=2, L=8]
    seg = np.ones((4, 2, 8), np.int32)
    seg[:, :, 6:] = 0                                        # padding at the end
    upd = jax.jit(hessian_update)
    st = hessian_init(IN)
    for i in range(4):
        st = upd(st, jnp.asarray(xb[i]), jnp.asarray(seg[i] > 0))
    keep = x[seg.reshape(-1) > 0]
    np.testing.assert_allclose(np.asarray(st.h), 2 * keep.T @ keep / len(keep), rtol=2e-5,
                               atol=1e-5)
    assert float(st.count) == len(keep)
    # Data-parallel: tokens sharded over 8 devices give the same Hessian.
    mesh = jax.make_mesh((8,), ("data",))
    xs = jax.device_put(jnp.asarray(x.reshape(8, 8, IN)), NamedSharding(mesh, P("data")))
    sharded = upd(hessian_init(IN), xs)
    single = upd(hessian_init(IN), jnp.asarray(x.reshape(8, 8, IN)))
    np.testing.assert_allclose(np.asarray(sharded.h), np.asarray(single.h), rtol=1e-5, atol=1e-6)
    # Orbax: save mid-stream, restore, continue bit-identically.
    half = upd(upd(hessian_init(IN), jnp.asarray(xb[0])), jnp.asarray(xb[1]))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "h", half)
    ckpt.wait_until_finished()
    back = ckpt.restore(tmp_path / "h", jax.tree.map(ocp.utils.to_shape_dtype_struct, half))
    a = upd(upd(half, jnp.asarray(xb[2])), jnp.asarray(xb[3]))
    b = upd(upd(type(half)(*back), jnp.asarray(xb[2])), jnp.asarray(xb[3]))
    np.testing.assert_array_equal(np.asarray(a.h), np.asarray(b.h))
    # The solve on sharded weights equals the single-device solve.
    h = np.asarray(single.h)
    w, _, _ = _data(9)
    ws = jax.device_put(jnp.asarray(w), NamedSharding(mesh, P(None, "data")))
    np.testing.assert_array_equal(np.asarray(gptq(ws, h, 4).materialize()),
                                  np.asarray(gptq(w, h, 4).materialize()))
    with pytest.raises(ValueError, match="width"):
        hessian_update(hessian_init(IN), jnp.ones((3, IN + 1)))


def _dead_beside_outlier(n, tokens, seed=0):
    """A real-LLM-like Hessian: lognormal channel scales, a shared component, one silent input
    channel (diag 0) and one outlier channel with max/mean(diag H) = 1364 (issue 17, SmolLM2's
    down projection, IN = 1536)."""
    rng = np.random.default_rng(seed)
    scale = 2.0 * np.exp(rng.normal(0, 0.5, n))
    x = (rng.standard_normal((tokens, n)) + 0.3 * rng.standard_normal((tokens, 1))) * scale
    x[:, 5] = 0.0                                             # silent channel
    ms = np.mean(x ** 2, axis=0)
    rest = ms.sum() - ms[100]                                 # d100 / mean(d) = 1364
    x[:, 100] *= np.sqrt(1364 * rest / (n - 1364) / ms[100])
    return (2.0 / tokens) * x.T @ x


def test_dead_channel_beside_outlier_is_not_called_singular():
    n = 1536
    h = _dead_beside_outlier(n, 2048)
    d = np.diag(h)
    assert d[5] == 0 and abs(d.max() / d.mean() - 1364) < 1
    hd = h.astype(np.float32)
    hd[5, 5] = 1
    hd += 0.01 * np.mean(np.diag(hd)) * np.eye(n, dtype=np.float32)    # what is factorised
    ev = np.linalg.eigvalsh(hd.astype(np.float64))
    assert ev[-1] / ev[0] < 2e5                               # condition number as in issue 17
    # The old test min(pivot) > n eps max(diag) rejects it (the dead pivot is 1 + damp):
    piv = np.diag(np.linalg.cholesky(hd[::-1, ::-1])) ** 2
    assert piv.min() <= n * np.finfo(np.float32).eps * np.diag(hd).max()
    w = np.random.default_rng(1).standard_normal((n, 8)).astype(np.float32)
    g = gptq(w, h, 4, 128)                                    # percdamp=0.01: no error
    w_hat = np.asarray(g.materialize())
    assert np.all(np.isfinite(w_hat))
    np.testing.assert_array_equal(w_hat[5], 0.0)              # dead input: W row zeroed
    r = rtn_weight(w, 4, 128)
    assert float(quant_error(w, w_hat, h)) < float(quant_error(w, r.materialize(), h))


def test_all_zero_hessian_falls_back_to_rtn_with_a_warning():
    w, _, h = _data(3)
    r = rtn_weight(w, 4, 8)
    with pytest.warns(UserWarning, match=r"layers/3/wq is all zero.*round-to-nearest"):
        g = gptq(w, np.zeros((IN, IN), np.float32), 4, 8, name="layers/3/wq")
    np.testing.assert_array_equal(np.asarray(g.codes), np.asarray(r.codes))
    np.testing.assert_array_equal(np.asarray(g.materialize()), np.asarray(r.materialize()))
    assert np.abs(np.asarray(g.materialize())).sum() > 0         # not the all-zero weight
    # Stacked: only the empty entry falls back; the warning names it.
    ws, hs = np.stack([w, w]), np.stack([h, np.zeros_like(h)])
    with pytest.warns(UserWarning, match=r"batch entries \[\[1\]\]"):
        st = gptq(ws, hs, 4, 8)
    np.testing.assert_array_equal(np.asarray(st.materialize()[1]), np.asarray(r.materialize()))
    np.testing.assert_array_equal(np.asarray(st.materialize()[0]),
                                  np.asarray(gptq(w, h, 4, 8).materialize()))
    # A HessianState that saw no token (count 0) is the same case.
    with pytest.warns(UserWarning, match="all zero"):
        gptq(w, hessian_init(IN), 4, 8)


def test_nonfinite_hessian_or_weight_names_the_cause_not_percdamp():
    w, _, h = _data(4)
    for bad in (np.nan, np.inf):
        hb = h.copy()
        hb[3, 7] = hb[7, 3] = bad
        with pytest.raises(ValueError, match=r"h of blk.2 holds NaN/inf.*calibration inputs"):
            gptq(w, hb, 4, name="blk.2")
    with pytest.raises(ValueError, match=r"batch entries \[\[0\]\]"):
        gptq(np.stack([w, w]), np.stack([hb, h]), 4)
    wb = w.copy()
    wb[0, 0] = np.nan
    with pytest.raises(ValueError, match="w holds NaN/inf"):
        gptq(wb, h, 4)


def test_group_size_not_dividing_in_dim_says_pad():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1024, 576)).astype(np.float32)
    h = 2 * x.T @ x / len(x)
    w = rng.standard_normal((576, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"group_size=128 does not divide .* 576.*pad=True"):
        gptq(w, h, 4, 128)
    g = gptq(w, h, 4, 128, pad=True)                          # 4 full groups + one of 64
    assert g.scale.shape == (5, 4) and g.materialize().shape == (576, 4)
