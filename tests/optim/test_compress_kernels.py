"""jaxeff.optim.compress and jaxeff.kernels.group_quant encode the same groups the same way.

compress groups along trailing axes (leading axes such as the stacked layer axis stay intact, so
a leading-axis sharding survives); the kernels flatten the whole tensor. The two coincide on
compress's grouped view ``codes.shape == (..., G, g)`` flattened to ``[-1, g]``.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.kernels import group_quant as G
from jaxeff.optim import _compress as C


def _moment(seed, shape, decades):
    rng = np.random.default_rng(seed)
    mag = 10.0 ** rng.uniform(-decades, 0, shape)
    x = np.where(rng.random(shape) < 0.5, -mag, mag)
    x[rng.random(shape) < 0.02] = 0.0
    return jnp.asarray(x, jnp.float32)


def _grouped_view(x, g):
    lead, tail, pad = C._grouping(x.shape, g)
    assert pad == 0
    return x.reshape(-1, g)


@pytest.mark.parametrize("shape", [(3, 16, 64), (4, 256)])
def test_int8_linear_codes_agree(shape):
    x = _moment(0, shape, 2)
    node = C.quantize(x, "int8", 128, expand=False)
    q, scale = G.quantize_int8_reference(_grouped_view(x, 128), 128)
    # same groups: the kernel's per-group scale is compress's absmax / 127
    np.testing.assert_allclose(np.asarray(scale) * 127, np.asarray(node.scale).reshape(-1),
                               rtol=1e-6)
    ours = np.asarray(node.codes).reshape(-1, 128).astype(np.int32)
    theirs = np.asarray(q).astype(np.int32)
    # rounding differs only at exact half-way points (half-even vs half-up) and last-ulp ties
    assert np.max(np.abs(ours - theirs)) <= 1
    assert np.mean(ours == theirs) > 0.999


def test_fp8_dre_codes_agree():
    x = _moment(1, (2, 8, 128), 4)
    node = C.quantize(x, "fp8", 128, expand=True)
    ref = G.quantize_fp8_reference(_grouped_view(x, 128), 128, expand=True)
    np.testing.assert_allclose(np.asarray(ref.k), np.asarray(node.k).reshape(-1))
    ours = np.asarray(node.codes.astype(jnp.float32)).reshape(-1, 128)
    theirs = np.asarray(ref.q.astype(jnp.float32))
    assert np.mean(ours == theirs) > 0.999
    # both decode to the same values up to the format's resolution
    a = np.asarray(C.dequantize(node, x.shape))
    b = np.asarray(G.dequantize_fp8(ref, x.shape))
    np.testing.assert_allclose(a, b, rtol=0.07, atol=0)
