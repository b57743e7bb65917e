"""Power-of-two weights (jaxeff.params.pow2_*): codes, packing, materialize, linear, GPTQ-style.

Shapes are tiny and the static configurations few: each one is a separate XLA compilation.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.models import llama
from jaxeff.params import (gptq_model, gptq_solve_grid, linear, llama_like, materialize, pack,
                           Pow2Grid, pow2_decode, pow2_encode, pow2_gptq, pow2_rtn,
                           pow2_rtn_weight, Pow2Weight, quant_error, rtn_weight, stack_quantized,
                           tree_nbytes, UniformGrid)

IN, OUT = 32, 24


def _data(seed=0, n=256):
    """Weights [IN, OUT] and strongly correlated inputs X [n, IN] with H = 2/n X^T X."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((IN, OUT)).astype(np.float32)
    mix = rng.standard_normal((IN, IN)) * (0.7 ** np.arange(IN))[:, None]
    x = (rng.standard_normal((n, IN)) @ mix + 0.5 * rng.standard_normal((n, 1))).astype(np.float32)
    return w, x, ((2.0 / n) * x.T.astype(np.float64) @ x.astype(np.float64)).astype(np.float32)


def _np_decode(codes, scale, bits):
    """value = (-1)^sign * scale * 2^(m - M) for m >= 1, else 0 (module docstring)."""
    big = 2 ** (bits - 1) - 1
    m, sign = codes & big, codes >> (bits - 1)
    return np.where(m > 0, np.where(sign == 1, -1.0, 1.0) * scale * 2.0 ** (m - big), 0.0)


# ------------------------------------------------------------------ hand-computed codes
def test_codes_by_hand_4bit():
    # bits 4: M = 7, magnitudes 1, 1/2, ..., 1/64 (m = 7 .. 1), code = sign << 3 | m.
    x = [0.0, 1.0, -1.0, 0.75, 0.7499, 0.5, 0.375, 0.3625, 0.3751, -0.2, 1 / 64, 1 / 128,
         1 / 129, 2.0, -0.0]
    want = [0, 7, 15, 7, 6, 6, 6, 5, 6, 13, 1, 1, 0, 7, 0]
    # 0.75 = midpoint of 1/2 and 1: ties go up; 0.3625 lies between 1/4 and 1/2 above
    # sqrt(2)/4 = 0.354 (log rounding: 1/2) but below the linear midpoint 0.375: 1/4.
    # 1/128 = half the smallest level: tie -> 1/64; 2.0 beyond scale clips to 1.
    codes = np.asarray(pow2_encode(jnp.asarray(x, jnp.float32), jnp.float32(1.0), 4))
    np.testing.assert_array_equal(codes, want)
    vals = np.asarray(pow2_decode(jnp.asarray(want), jnp.float32(1.0), 4))
    np.testing.assert_array_equal(vals, [0, 1, -1, 1, .5, .5, .5, .25, .5, -.25, 1 / 64, 1 / 64,
                                         0, 1, 0])


def test_codes_by_hand_3bit_2bit_and_scale():
    # bits 3: M = 3, magnitudes 1, 1/2, 1/4 and zero; scale 0.5 halves the thresholds.
    x = jnp.asarray([0.5, 0.2, 0.1875, 0.1874, 0.0625, 0.0624, -0.3], jnp.float32)
    codes = np.asarray(pow2_encode(x, jnp.float32(0.5), 3))
    # r = 1, 0.4, 0.375 (tie -> 1/2), 0.3748 -> 1/4, 0.125 (= half of 1/4: tie -> 1/4), < 1/8,
    # 0.6 -> 1/2 (midpoint 0.75), negative: sign bit 4.
    np.testing.assert_array_equal(codes, [3, 2, 2, 1, 1, 0, 4 | 2])
    # bits 2: ternary {-1, 0, 1} * scale, threshold half the scale.
    t = np.asarray(pow2_encode(jnp.asarray([0.49, 0.5, -0.7, 0.0]), jnp.float32(1.0), 2))
    np.testing.assert_array_equal(t, [0, 1, 3, 0])
    np.testing.assert_array_equal(np.asarray(pow2_decode(jnp.asarray(t), 2.0, 2)), [0, 2, -2, 0])


def test_rtn_weight_scale_is_group_max_and_zero_group():
    w = np.zeros((8, 3), np.float32)
    w[:4, 0] = [0.1, -0.8, 0.3, 0.05]           # group 0 of column 0: max |w| = 0.8
    w[4:, 0] = [2.0, 0, 0, -1.0]                # group 1: 2.0; column 1 all zero: scale 1
    w[:, 2] = 1e-3
    pw = pow2_rtn_weight(w, 4, 4)
    np.testing.assert_allclose(np.asarray(pw.scale), [[0.8, 1, 1e-3], [2.0, 1, 1e-3]])
    np.testing.assert_array_equal(np.asarray(pw.codes)[:4, 0], [4, 15, 6, 3])  # 1/8, -1, 1/2..
    np.testing.assert_array_equal(np.asarray(pw.codes)[:, 1], 0)
    np.testing.assert_allclose(np.asarray(materialize(pw))[:4, 0], [0.1, -0.8, 0.4, 0.05])


def test_scale_search_by_hand_and_never_worse():
    # column [1, .7, .7, .7], 4 bits: scale 1 puts .7 on 1/2 (error 3 * .04 = .12); scale
    # 2^-1/2 = .7071 clips 1 to .7071 and keeps .7 at .7071 (error .0858 + 3 * 5e-5): chosen.
    w = np.asarray([[1.0], [0.7], [0.7], [0.7]], np.float32)
    pw = pow2_rtn_weight(w, 4, search=2)
    np.testing.assert_allclose(np.asarray(pw.scale), [[2 ** -0.5]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(pw.codes)[:, 0], [7, 7, 7, 7])
    np.testing.assert_array_equal(np.asarray(pow2_rtn_weight(w, 4, search=1).scale), [[1.0]])
    wr, _, _ = _data(6)
    err = lambda q: np.sum((wr - np.asarray(materialize(q))) ** 2, axis=0)  # noqa: E731
    for bits in (3, 4):
        base, best = pow2_rtn_weight(wr, bits, 8), pow2_rtn_weight(wr, bits, 8, search=8)
        # per group and column the search includes the max scale, so no column gets worse
        assert np.all(err(best) <= err(base) + 1e-6) and err(best).sum() < 0.9 * err(base).sum()
    with pytest.raises(TypeError, match="search"):
        pow2_rtn_weight(wr, 4, search=2.0)
    with pytest.raises(ValueError, match="search"):
        pow2_rtn_weight(wr, 4, search=0)


# ------------------------------------------------------------------ packing, materialize
def test_pack_round_trip_and_word_layout():
    w, _, _ = _data()
    for bits in (2, 3, 4, 8):
        pw = pow2_rtn_weight(w, bits, 8)
        per = 32 // bits
        assert pw.packed.shape == (-(-IN // per), OUT) and pw.packed.dtype == jnp.uint32
        codes = np.asarray(pow2_encode(jnp.asarray(w).reshape(IN // 8, 8, OUT),
                                       jnp.asarray(pw.scale)[:, None, :], bits)).reshape(IN, OUT)
        np.testing.assert_array_equal(np.asarray(pw.codes), codes)
        word = sum(int(codes[r, 5]) << (bits * r) for r in range(per))     # little-endian
        assert int(pw.packed[0, 5]) == word
        np.testing.assert_array_equal(np.asarray(pack(jnp.asarray(codes), bits)),
                                      np.asarray(pw.packed))


def test_materialize_equals_numpy_decode_ragged_and_stacked():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, 20, 6)).astype(np.float32)          # stacked, IN=20, g=8 ragged
    pw = pow2_rtn_weight(w, 3, 8, pad=True)
    assert pw.scale.shape == (2, 3, 6) and pw.group_size == 8
    scale = np.repeat(np.asarray(pw.scale), 8, axis=1)[:, :20]
    want = _np_decode(np.asarray(pw.codes), scale, 3)
    np.testing.assert_array_equal(np.asarray(materialize({"w": pw})["w"]), want)
    assert materialize(pw).dtype == jnp.float32
    # each stacked matrix is quantized on its own
    np.testing.assert_array_equal(np.asarray(pw.packed[1]),
                                  np.asarray(pow2_rtn_weight(w[1], 3, 8, pad=True).packed))
    st = stack_quantized([pow2_rtn_weight(w[i], 3, 8, pad=True) for i in range(2)])
    assert isinstance(st, Pow2Weight)
    np.testing.assert_array_equal(np.asarray(st.materialize()), want)
    with pytest.raises(ValueError, match="does not match"):
        stack_quantized([st, rtn_weight(w[0], 3, 4)])
    # bytes: packed (2 x 2 words of 10 codes x 6) + scales (2 x 3 x 6) f32 + perm (2 x 20) int32
    assert pw.packed.shape == (2, 2, 6)
    assert tree_nbytes(pw) == 4 * (2 * 2 * 6) + 4 * (2 * 3 * 6) + 4 * (2 * 20)


def test_bf16_weight_and_scale_dtype():
    w = jnp.asarray(_data()[0], jnp.bfloat16)
    pw = pow2_rtn_weight(w, 4, 16, scale_dtype=jnp.bfloat16)
    assert pw.scale.dtype == jnp.bfloat16 and materialize(pw).dtype == jnp.bfloat16
    scale = np.repeat(np.asarray(pw.scale, np.float32), 16, axis=0)
    np.testing.assert_array_equal(np.asarray(materialize(pw), np.float32),
                                  _np_decode(np.asarray(pw.codes), scale, 4).astype(np.float32))


def test_linear_equals_x_at_materialize_and_tree_rtn():
    w, x, h = _data()
    tree = {"layer": {"kernel": jnp.asarray(w), "bias": jnp.zeros(OUT)}, "emb": jnp.ones((5, 4))}
    q = pow2_rtn(tree, 4, 8)
    pw = q["layer"]["kernel"]
    assert isinstance(pw, Pow2Weight) and q["emb"] is tree["emb"]
    xs = jnp.asarray(x[:5])
    np.testing.assert_allclose(np.asarray(linear(xs, pw)), np.asarray(xs @ materialize(pw)),
                               rtol=1e-5, atol=1e-5)
    g = pow2_gptq(w, h, 4, 8, act_order=True)                        # permuted rows
    assert g.act_order and not np.array_equal(np.asarray(g.perm), np.arange(IN))
    np.testing.assert_allclose(np.asarray(linear(xs, g)), np.asarray(xs @ materialize(g)),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="x has last axis"):
        linear(xs[:, :8], pw)
    with pytest.raises(ValueError, match="one unbatched matrix"):
        linear(xs, pow2_rtn_weight(np.stack([w, w]), 4, 8))


# ------------------------------------------------------------------ error feedback
def _np_obs_pow2(w, h, bits, percdamp=0.01):
    """NumPy float64 OBS loop (GPTQ without blocks or groups) with the power-of-two rounding."""
    W, H = w.astype(np.float64).copy(), h.astype(np.float64).copy()
    n = W.shape[0]
    H += percdamp * np.mean(np.diag(H)) * np.eye(n)
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    scale = np.abs(W).max(0)
    Q = np.zeros_like(W)
    for i in range(n):
        q = np.asarray(pow2_encode(jnp.asarray(W[i]), jnp.asarray(scale), bits))
        Q[i] = q
        err = (W[i] - _np_decode(q, scale, bits)) / U[i, i]
        W[i + 1:] -= np.outer(U[i, i + 1:], err)
    return Q


def test_gptq_pow2_parity_with_numpy_obs_loop():
    w, _, h = _data(1)
    with jax.enable_x64(True):
        codes, (scale,), perm, ok = gptq_solve_grid(
            jnp.asarray(w, jnp.float64), jnp.asarray(h, jnp.float64), 0.01,
            quantizer=Pow2Grid(4), block_size=8)
        codes = np.asarray(codes)
    ref = _np_obs_pow2(w, h, 4)
    assert bool(ok) and np.mean(codes != ref) <= 0.005
    np.testing.assert_allclose(np.asarray(scale)[0], np.abs(w).max(0), rtol=1e-6)


def test_error_feedback_beats_rtn_on_correlated_inputs():
    w, x, h = _data(2)
    for bits, gs, search in ((4, 8, 1), (3, None, 1), (4, 8, 4)):
        r = pow2_rtn_weight(w, bits, gs, search=search)
        g = pow2_gptq(w, h, bits, gs, search=search)
        out = lambda q: float(np.sum((x @ (w - np.asarray(materialize(q)))) ** 2))  # noqa: E731
        assert out(g) < 0.8 * out(r), (bits, out(g), out(r))
        assert float(quant_error(w, materialize(g), h)) < float(quant_error(w, materialize(r), h))


def test_zero_hessian_is_rtn_and_uniform_grid_is_gptq():
    w, _, h = _data(4)
    with pytest.warns(UserWarning, match="all zero"):
        g = pow2_gptq(w, np.zeros((IN, IN), np.float32), 4, 8)
    r = pow2_rtn_weight(w, 4, 8)
    np.testing.assert_array_equal(np.asarray(g.packed), np.asarray(r.packed))
    np.testing.assert_array_equal(np.asarray(g.scale), np.asarray(r.scale))
    # The int grid through the pluggable solver is gptq_solve's result (one OBS home).
    from jaxeff.params import gptq_solve
    res = gptq_solve(jnp.asarray(w), jnp.asarray(h), bits=4, group_size=8)
    codes, (s, z), _, _ = gptq_solve_grid(jnp.asarray(w), jnp.asarray(h),
                                          quantizer=UniformGrid(4), group_size=8)
    np.testing.assert_array_equal(np.asarray(res.codes), np.asarray(codes))
    np.testing.assert_array_equal(np.asarray(res.scale), np.asarray(s))


def test_gptq_model_pow2_on_tiny_llama_and_linear_forward():
    cfg = llama.LlamaConfig(vocab_size=48, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                            d_ff=32, max_seq_len=16)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.15,
                                                jnp.float32), llama.abstract_params(cfg))
    for n in ("attn_norm", "mlp_norm"):
        params["layers"][n] = jnp.ones_like(params["layers"][n])
    params["final_norm"] = jnp.ones_like(params["final_norm"])
    calib = [{"inputs": jnp.asarray(rng.integers(0, 48, (2, 16)), jnp.int32)} for _ in range(3)]
    sel = "layers/(wq|wk|wv|wo|w_gate|w_up|w_down)$"
    model = llama_like(llama, cfg)
    q = gptq_model(params, model, calib, 3, 8, select=sel, progress=False, grid="pow2")
    for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        leaf = q["layers"][n]
        assert isinstance(leaf, Pow2Weight) and leaf.shape == params["layers"][n].shape
    fwd = jax.jit(lambda p, x: llama.forward(p, x, cfg))
    ids = calib[0]["inputs"]
    # the reference model applies every projection through jaxeff.params.linear
    np.testing.assert_allclose(np.asarray(fwd(q, ids)), np.asarray(fwd(materialize(q), ids)),
                               rtol=1e-4, atol=1e-4)

    def dist(p):
        return sum(float(jnp.sum((fwd(p, b["inputs"]) - fwd(params, b["inputs"])) ** 2))
                   for b in calib)

    assert dist(materialize(q)) < dist(materialize(pow2_rtn(params, 3, 8, select=sel)))
    with pytest.raises(ValueError, match="grid must be one of"):
        gptq_model(params, model, calib, 3, 8, select=sel, progress=False, grid="log")
    with pytest.raises(ValueError, match="sym=True does not apply"):
        gptq_model(params, model, calib, 3, 8, select=sel, progress=False, grid="pow2",
                   sym=True)


# ------------------------------------------------------------------ bad inputs
def test_bad_inputs():
    w, _, h = _data()
    with pytest.raises(ValueError, match="bits must be one of"):
        pow2_rtn_weight(w, 5)
    with pytest.raises(ValueError, match="bits must be one of"):
        pow2_rtn({"w": jnp.asarray(w)}, True)
    with pytest.raises(ValueError, match="does not divide"):
        pow2_rtn_weight(w, 4, 7)
    with pytest.raises(ValueError, match="at least 2 axes"):
        pow2_rtn_weight(w[0], 4)
    with pytest.raises(ValueError, match="floating point"):
        pow2_rtn_weight(np.ones((4, 4), np.int32), 4)
    bad = w.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        pow2_rtn_weight(bad, 4)
    with pytest.raises(ValueError, match="NaN/inf"):
        pow2_gptq(bad, h, 4)
    with pytest.raises(ValueError, match="h must have shape"):
        pow2_gptq(w, h[:8, :8], 4)
    with pytest.raises(ValueError, match="percdamp"):
        pow2_gptq(w, h, 4, percdamp=-1.0)
    with pytest.raises(ValueError, match="matches no"):
        pow2_rtn({"w": jnp.asarray(w)}, 4, select="nothing")


def test_sharding_rule_and_sharded_solve():
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxeff.state_sharding import derive_shardings
    w, _, h = _data(5)
    mesh = jax.make_mesh((8,), ("data",))
    dense = {"w": jnp.asarray(w)}
    sh = derive_shardings(pow2_rtn(dense, 4, 8, select="w"), dense,
                          {"w": NamedSharding(mesh, P(None, "data"))})["w"]
    assert sh.packed.spec == P(None, "data") and sh.scale.spec == P(None, "data")
    assert sh.perm.is_fully_replicated
    ws = jax.device_put(jnp.asarray(w), NamedSharding(mesh, P(None, "data")))
    np.testing.assert_array_equal(np.asarray(pow2_gptq(ws, h, 4, 8).materialize()),
                                  np.asarray(pow2_gptq(w, h, 4, 8).materialize()))
