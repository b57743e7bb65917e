"""Property tests: int8 / FP8 group quantize-dequantize error bounds, per group
(jaxeff.optim._compress codecs and jaxeff.kernels.group_quant references)."""
import numpy as np
import jax.numpy as jnp
from hypothesis import given, strategies as st

from jaxeff.kernels import group_quant as gq
from jaxeff.optim import _compress as C

E4M3_REL = 2.0 ** -4          # half an ulp of a 3-bit mantissa, relative
E4M3_SUB = 2.0 ** -10         # half the subnormal spacing 2^-9, absolute (in code units)
F32 = 1e-6                    # f32 arithmetic slack, relative


@st.composite
def _groups(draw, group=16):
    n_groups = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    # groups of very different magnitudes (1e-20 .. 1e20), some zeros, some constant groups
    scale = 10.0 ** rng.uniform(-20, 20, (n_groups, 1))
    x = rng.standard_normal((n_groups, group)) * scale
    x[rng.random(x.shape) < draw(st.sampled_from([0.0, 0.2]))] = 0.0
    if draw(st.booleans()):
        x[0] = 0.0 if draw(st.booleans()) else x[0, 0]
    return x.astype(np.float32)


def _absmax(x):
    return np.max(np.abs(x), axis=-1, keepdims=True)


@given(_groups())
def test_int8_linear_error_at_most_half_a_step(x):
    codes, mx, k = C.group_quantize(jnp.asarray(x), "int8", expand=False)
    back = np.asarray(C.group_dequantize(codes, mx))
    step = _absmax(x) / 127
    assert np.all(np.abs(back - x) <= step / 2 * (1 + 1e-5) + F32 * np.abs(x))
    np.testing.assert_array_equal(np.asarray(mx)[:, None], _absmax(x))


@given(_groups())
def test_fp8_linear_error_within_e4m3_rounding(x):
    codes, mx, _ = C.group_quantize(jnp.asarray(x), "fp8", expand=False)
    back = np.asarray(C.group_dequantize(codes, mx))
    unit = _absmax(x) / 448                         # one code unit in x
    bound = np.maximum(E4M3_REL * np.abs(x), E4M3_SUB * unit) * (1 + 1e-5) + F32 * np.abs(x)
    assert np.all(np.abs(back - x) <= bound)


@given(_groups(), st.sampled_from(["int8", "fp8"]))
def test_dre_keeps_sign_zero_and_absmax_and_bounds_relative_error(x, fmt):
    codes, mx, k = C.group_quantize(jnp.asarray(x), fmt, expand=True)
    back = np.asarray(C.group_dequantize(codes, mx, k))
    k = np.asarray(k)[:, None]
    assert np.all(np.sign(back) == np.sign(x))       # zeros stay zero, signs kept
    at_max = np.abs(x) == _absmax(x)
    np.testing.assert_allclose(np.abs(back)[at_max & (x != 0)], np.abs(x)[at_max & (x != 0)],
                               rtol=1e-5)
    # |x^|/|x| = (q / q_true)^(1/k) with q_true = Q (|x|/M)^k and the code rounding error of q
    Q = 127.0 if fmt == "int8" else 448.0
    nz = x != 0
    u = np.where(nz, np.abs(x) / np.where(_absmax(x) > 0, _absmax(x), 1), 1.0)
    q_true = Q * u.astype(np.float64) ** k
    err = 0.5 if fmt == "int8" else np.maximum(E4M3_REL * q_true, E4M3_SUB)
    lo = np.clip(1 - err / q_true, 0, None) ** (1 / k)
    hi = (1 + err / q_true) ** (1 / k)
    ratio = np.abs(back[nz]).astype(np.float64) / np.abs(x[nz])
    assert np.all(ratio >= lo[nz] * (1 - 1e-4)) and np.all(ratio <= hi[nz] * (1 + 1e-4))


@given(_groups(), st.sampled_from([(16,), (3, 16), (2, 40)]))
def test_compress_quantize_dequantize_round_trip_shape_and_bound(x, shape):
    flat = np.resize(x.reshape(-1), int(np.prod(shape))).reshape(shape)
    q = C.quantize(jnp.asarray(flat), "int8", group_size=16, expand=False)
    back = np.asarray(C.dequantize(q, shape))
    assert back.shape == shape
    assert np.all(np.abs(back - flat) <= np.max(np.abs(flat)) / 127 / 2 * (1 + 1e-5) + 1e-30)


@given(_groups(group=16))
def test_kernel_int8_reference_error_at_most_half_a_step(x):
    q, scale = gq.quantize_int8_reference(jnp.asarray(x), group=16)
    back = np.asarray(gq.dequantize_int8(q, scale, x.shape))
    step = _absmax(x) / 127
    assert np.all(np.abs(back - x) <= step / 2 * (1 + 1e-5) + F32 * np.abs(x))


@given(_groups(group=16), st.booleans())
def test_kernel_fp8_reference_keeps_sign_and_bounds_relative_error(x, expand):
    g = gq.quantize_fp8_reference(jnp.asarray(x), group=16, expand=expand)
    back = np.asarray(gq.dequantize_fp8(g, x.shape))
    assert np.all(np.isfinite(back)) and np.all(np.sign(back) == np.sign(x))
    k = np.asarray(g.k)[:, None].astype(np.float64)
    # code magnitude |q| = (|x|/c)^k / scale; e4m3 rounds it by <= 2^-4 relative (normal codes)
    c, s = np.asarray(g.c)[:, None], np.asarray(g.scale)[:, None]
    nz = x != 0
    qa = np.where(nz, (np.abs(x) / c).astype(np.float64) ** k / s, 1.0)
    err = np.maximum(E4M3_REL * qa, E4M3_SUB)
    lo = np.clip(1 - err / qa, 0, None) ** (1 / k)
    hi = (1 + err / qa) ** (1 / k)
    ratio = np.abs(back[nz]).astype(np.float64) / np.abs(x[nz])
    assert np.all(ratio >= lo[nz] * (1 - 1e-4)) and np.all(ratio <= hi[nz] * (1 + 1e-4))
