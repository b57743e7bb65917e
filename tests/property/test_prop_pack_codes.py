"""Property tests: bit packing of quantized codes round-trips for every bit width
(jaxeff.params pack/unpack and the kernels' pack_codes/unpack_codes, which share a layout)."""
import numpy as np
import jax.numpy as jnp
from hypothesis import given, strategies as st

from jaxeff.kernels.dequant_matmul import BITS, pack_codes, unpack_codes
from jaxeff.params._quantized import VALID_BITS, codes_per_word, pack, unpack


@st.composite
def _codes(draw, bit_choices, multiple=False, batch=True):
    bits = draw(st.sampled_from(bit_choices))
    per = 32 // bits
    # few distinct shapes: each new shape compiles the eager ops once
    n = draw(st.integers(1, 2)) * per if multiple else draw(st.sampled_from([1, per - 1, per + 1,
                                                                               2 * per + 3]))
    lead = draw(st.sampled_from([(), (2,)])) if batch else ()
    out = draw(st.sampled_from([1, 3]))
    seed = draw(st.integers(0, 2 ** 16))
    q = np.random.default_rng(seed).integers(0, 2 ** bits, lead + (n, out), dtype=np.int64)
    if draw(st.booleans()):                       # the extremes 0 and maxq appear
        q.reshape(-1)[0], q.reshape(-1)[-1] = 0, 2 ** bits - 1
    return bits, q


@given(_codes(VALID_BITS))
def test_params_pack_unpack_round_trip(case):
    bits, q = case
    n = q.shape[-2]
    packed = pack(jnp.asarray(q, jnp.int32), bits)
    assert packed.dtype == jnp.uint32
    assert packed.shape == q.shape[:-2] + (-(-n // codes_per_word(bits)), q.shape[-1])
    np.testing.assert_array_equal(np.asarray(unpack(packed, bits, n)), q)
    # the layout: row r sits at bit offset bits * (r % P) of word r // P; padding bits are 0
    per, w = codes_per_word(bits), np.asarray(packed).astype(np.uint64)
    r = np.arange(n)
    field = (w[..., r // per, :] >> (bits * (r % per))[:, None].astype(np.uint64)) & (2 ** bits - 1)
    np.testing.assert_array_equal(field, q)
    used = bits * per
    if used < 32:
        assert np.all(w >> used == 0)


@given(_codes(BITS, multiple=True, batch=False))
def test_kernel_pack_codes_round_trip_and_matches_params_layout(case):
    bits, q = case
    qw = pack_codes(jnp.asarray(q, jnp.int32), bits)
    np.testing.assert_array_equal(np.asarray(unpack_codes(qw, bits)), q)
    np.testing.assert_array_equal(np.asarray(qw), np.asarray(pack(jnp.asarray(q, jnp.int32), bits)))
