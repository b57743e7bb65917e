"""Tests for jaxeff.kernels.dequant_matmul: packing, RTN, kernel vs reference, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.kernels import dequant_matmul as Q


def _f32(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


_rtn = jax.jit(Q.rtn_quantize, static_argnums=(1, 2))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip_and_layout(bits):
    rng = np.random.default_rng(bits)
    per = 32 // bits
    codes = rng.integers(0, 2 ** bits, size=(2 * per, 3))
    packed = Q.pack_codes(jnp.asarray(codes), bits)
    assert packed.shape == (2, 3) and packed.dtype == jnp.uint32
    np.testing.assert_array_equal(Q.unpack_codes(packed, bits), codes)
    # Layout: word [i, j] holds code [i * P + t, j] at bit offset bits * t.
    word = int(packed[1, 2])
    for t in range(per):
        assert (word >> (bits * t)) & (2 ** bits - 1) == codes[per + t, 2]


def test_rtn_codes_in_range_and_error_within_half_step():
    rng = np.random.default_rng(0)
    w = _f32(rng, 256, 8)
    qw, scale, zero = _rtn(w, 4, 128)
    q = np.asarray(Q.unpack_codes(qw, 4))
    assert q.min() >= 0 and q.max() <= 15
    err = np.abs(np.asarray(Q.dequantize(qw, scale, zero, 4, 128)) - np.asarray(w))
    assert np.all(err <= np.repeat(np.asarray(scale), 128, axis=0) / 2 + 1e-6)


@pytest.mark.parametrize("bits,group,rows", [(4, 128, 3), (8, 64, 17)])
def test_pallas_matches_reference_forward_and_grad(bits, group, rows):
    """Ragged row counts (padded to the row block), two groups along the input dim; gx too.

    (int2 runs on the GPU benchmark only: its 16 unrolled dots are slow to interpret.)
    """
    rng = np.random.default_rng(bits)
    din = 2 * group
    w, x, gy = _f32(rng, din, 32), _f32(rng, rows, din), _f32(rng, rows, 32)
    qw, s, z = _rtn(w, bits, group)
    kw = dict(bits=bits, group_size=group)

    def fwd_grad(f):
        def loss(x):
            y = f(x, qw, s, z, **kw)
            return jnp.sum(y * gy), y
        (_, y), gx = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
        return y, gx

    y, gx = fwd_grad(lambda *a, **k: Q.quant_matmul(*a, interpret=True, **k))
    y_ref, gx_ref = fwd_grad(Q.quant_matmul_reference)
    for got, want in ((y, y_ref), (gx, gx_ref)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    w_deq = np.asarray(Q.dequantize(qw, s, z, bits, group))
    np.testing.assert_allclose(gx_ref, np.asarray(gy) @ w_deq.T, rtol=1e-4, atol=1e-4)


def test_dispatcher_uses_reference_on_cpu():
    rng = np.random.default_rng(6)
    w, x = _f32(rng, 128, 16), _f32(rng, 2, 3, 128)
    qw, s, z = _rtn(w, 4, 64)
    y = jax.jit(lambda x: Q.quant_matmul(x, qw, s, z, group_size=64))(x)
    assert y.shape == (2, 3, 16)
    np.testing.assert_array_equal(y.reshape(6, 16), jax.jit(
        lambda x: Q.quant_matmul_reference(x, qw, s, z, group_size=64))(x.reshape(6, 128)))


def test_bad_inputs_raise_clear_errors():
    rng = np.random.default_rng(7)
    w, x = _f32(rng, 128, 16), _f32(rng, 2, 128)
    qw, s, z = _rtn(w, 4, 64)
    with pytest.raises(ValueError, match="bits must be one of"):
        Q.quant_matmul(x, qw, s, z, bits=3, group_size=64)
    with pytest.raises(ValueError, match="qweight must be"):
        Q.quant_matmul(x[:, :64], qw, s, z, group_size=64)
    with pytest.raises(ValueError, match="scales must be"):
        Q.quant_matmul(x, qw, s[:1], z, group_size=64)
    with pytest.raises(TypeError, match="qweight must have dtype"):
        Q.quant_matmul(x, qw.astype(jnp.int32), s, z, group_size=64)
    with pytest.raises(ValueError, match="group_size must be a multiple of 128"):
        Q.quant_matmul_pallas(x, qw, s, z, group_size=64, interpret=True)


@pytest.mark.parametrize("bits,group", [(4, 64), (8, 32)])
def test_tpu_kernel_in_tpu_interpret_mode_forward_and_grad(bits, group):
    """The Mosaic kernel (platform='tpu') under Pallas's TPU interpret mode vs the reference."""
    rng = np.random.default_rng(10 + bits)
    w, x, gy = _f32(rng, 128, 32), _f32(rng, 3, 128), _f32(rng, 3, 32)
    qw, s, z = _rtn(w, bits, group)
    kw = dict(bits=bits, group_size=group)

    def fwd_grad(f):
        def loss(x):
            y = f(x, qw, s, z, **kw)
            return jnp.sum(y * gy), y
        (_, y), gx = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
        return y, gx

    got = fwd_grad(lambda *a, **k: Q.quant_matmul_pallas(*a, interpret=True, platform="tpu", **k))
    want = fwd_grad(Q.quant_matmul_reference)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))
    with pytest.raises(ValueError, match="TPU kernel needs group_size"):
        Q.quant_matmul_pallas(x, *_rtn(w, 4, 32), group_size=32, platform="tpu", interpret=True)
