"""Property test: jaxeff.checkpoint.Checkpointer restores arbitrary small pytrees of arrays
bit-identically (dtype, shape and every bit, NaN payloads and -0.0 included)."""
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, strategies as st

from jaxeff.checkpoint import Checkpointer

DTYPES = [np.float32, np.float16, jnp.bfloat16, np.int32, np.int8, np.uint32, np.bool_]
KEYS = st.sampled_from(["w", "b", "mu", "nu", "layers", "0x", "a_b"])


@st.composite
def _array(draw):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(1, 3), max_size=3)))
    seed = draw(st.integers(0, 2 ** 16))
    raw = np.random.default_rng(seed).integers(0, 256, int(np.prod(shape)) * dtype.itemsize,
                                               dtype=np.uint8)
    x = raw.view(dtype).reshape(shape) if dtype != np.bool_ else (raw % 2).astype(bool).reshape(shape)
    return jnp.asarray(x)             # arbitrary bits: NaNs with payloads, infs, -0.0, denormals


TREES = st.recursive(_array(), lambda kids: st.one_of(
    st.dictionaries(KEYS, kids, min_size=1, max_size=3),
    st.lists(kids, min_size=1, max_size=2)), max_leaves=5)


def _bits(x):
    x = np.asarray(x).reshape(-1)
    return x.view(np.uint8) if x.dtype != np.bool_ else x


@given(TREES, st.integers(0, 10 ** 6))
def test_save_restore_is_bit_identical(tree, step):
    tree = {"state": tree}                          # a checkpointed state is a container
    with tempfile.TemporaryDirectory() as d:
        ck = Checkpointer(os.path.join(d, "ckpt"))
        try:
            ck.save(tree, step=step)
            like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=x.sharding), tree)
            back = ck.restore(like)
            assert ck.latest_step() == step
        finally:
            ck.close()
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(_bits(a), _bits(b))
