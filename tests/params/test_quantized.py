"""QuantizedWeight leaf, bit packing and round-to-nearest (jaxeff.params.quantized)."""
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxeff.params import (QuantizedWeight, pack, rtn, rtn_weight, stack_quantized, tree_nbytes,
                           unpack)
from jaxeff.params import materialize, trainable_mask
from jaxeff.state_sharding import derive_shardings

SEL = "layers/(wq|w_up)$"


def _randn(seed, shape):
    # NumPy data: jax.random.normal costs seconds of compilation per shape on a busy CPU.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _np_rtn(w, bits, gs, sym):
    """NumPy re-implementation of the reference quantizer (IST-DASLab quant.py), float32."""
    maxq = 2 ** bits - 1
    n_in, n_out = w.shape
    codes = np.zeros(w.shape, np.int64)
    deq = np.zeros(w.shape, np.float32)
    for g0 in range(0, n_in, gs):
        x = w[g0:g0 + gs].astype(np.float32)
        xmin = np.minimum(x.min(0), 0)
        xmax = np.maximum(x.max(0), 0)
        if sym:
            xmax = np.maximum(-xmin, xmax)
            xmin = -xmax
        both = (xmin == 0) & (xmax == 0)
        xmin = np.where(both, -1, xmin).astype(np.float32)
        xmax = np.where(both, 1, xmax).astype(np.float32)
        scale = ((xmax - xmin) / np.float32(maxq)).astype(np.float32)
        zero = np.full_like(scale, (maxq + 1) // 2) if sym else np.round(-xmin / scale)
        q = np.clip(np.round(x / scale) + zero, 0, maxq)
        codes[g0:g0 + gs] = q
        deq[g0:g0 + gs] = scale * (q - zero)
    return codes, deq


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip_ragged(bits):
    rng = np.random.default_rng(bits)
    per = 32 // bits
    for n in (1, per - 1, per + 3, 3 * per):
        codes = rng.integers(0, 2 ** bits, size=(2, n, 5))
        packed = pack(jnp.asarray(codes), bits)
        assert packed.dtype == jnp.uint32 and packed.shape == (2, -(-n // per), 5)
        np.testing.assert_array_equal(np.asarray(unpack(packed, bits, n)), codes)
        # Documented layout: row r at bit offset bits * (r % per) of word r // per.
        p = np.asarray(packed).astype(np.uint64)
        for r in range(n):
            got = (p[:, r // per] >> np.uint64(bits * (r % per))) & np.uint64(2 ** bits - 1)
            np.testing.assert_array_equal(got, codes[:, r])


@pytest.mark.parametrize("bits,gs,sym", [(4, None, False), (3, 8, False), (4, 8, True),
                                         (2, 16, False), (8, 16, True)])
def test_rtn_matches_numpy_reference(bits, gs, sym):
    w = np.asarray(_randn(bits, (32, 12)))
    qw = rtn_weight(w, bits, gs, sym=sym)
    codes, deq = _np_rtn(w, bits, gs or 32, sym)
    got = np.asarray(qw.codes)
    assert got.dtype == np.int32 and got.min() >= 0 and got.max() <= 2 ** bits - 1
    # Rounding ties (symmetric mode puts -xmax exactly on -maxq/2 - 1/2) may flip by one code.
    scale = np.repeat(np.asarray(qw.scale), gs or 32, axis=0)
    frac = np.abs(np.abs(w / scale) % 1.0 - 0.5)
    diff = got != codes
    assert np.all(frac[diff] < 1e-4) and np.all(np.abs(got - codes) <= 1)
    np.testing.assert_allclose(np.asarray(qw.materialize())[~diff], deq[~diff], atol=1e-6)
    assert qw.materialize().shape == w.shape


def test_rtn_error_bound_zero_groups_and_dtype():
    w = _randn(0, (24, 6)).astype(jnp.bfloat16)
    w = w.at[:8, 0].set(0.0)                         # an all-zero group
    qw = rtn_weight(w, 4, 8)
    wh = qw.materialize()
    assert wh.dtype == jnp.bfloat16 and wh.shape == w.shape
    assert np.all(np.asarray(wh[:8, 0], np.float32) == 0.0)
    err = np.abs(np.asarray(wh, np.float32) - np.asarray(w, np.float32))
    scale_rows = np.repeat(np.asarray(qw.scale), 8, axis=0)
    assert np.all(err <= 0.5 * scale_rows + 1e-2 * np.abs(np.asarray(w, np.float32)) + 1e-6)


def test_ragged_groups_need_pad():
    w = _randn(1, (20, 4))
    with pytest.raises(ValueError, match=r"group_size=8 .*pad=True"):
        rtn_weight(w, 4, 8)
    qw = rtn_weight(w, 4, 8, pad=True)
    assert qw.scale.shape == (3, 4) and qw.materialize().shape == (20, 4)
    codes, deq = _np_rtn(np.asarray(w), 4, 8, False)   # last group of 4 rows: same as padding
    np.testing.assert_allclose(np.asarray(qw.materialize()), deq, atol=1e-6)


@pytest.mark.parametrize("bad", [1, 5, 16, True, 4.0, "4"])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match="bits must be one of"):
        rtn_weight(jnp.ones((8, 4)), bad)


def test_bad_group_size_and_shape():
    with pytest.raises(ValueError, match="group_size must be None or a positive int"):
        rtn_weight(jnp.ones((8, 4)), 4, 0)
    with pytest.raises(ValueError, match="at least 2 axes"):
        rtn_weight(jnp.ones((8,)), 4)


def _tree():
    return {"embed": _randn(20, (10, 16)),
            "layers": {"wq": _randn(21, (2, 16, 8)), "norm": jnp.ones((2, 16)),
                       "w_up": _randn(22, (2, 16, 32))}}


def test_rtn_tree_selector_stacked_and_nbytes():
    tree = _tree()
    q = rtn(tree, 4, 8, select=SEL)
    assert isinstance(q["layers"]["wq"], QuantizedWeight)
    assert q["layers"]["wq"].shape == (2, 16, 8)
    assert q["embed"] is tree["embed"] and q["layers"]["norm"] is tree["layers"]["norm"]
    for i in range(2):                                # a stacked leaf is a batch of matrices
        one = rtn_weight(tree["layers"]["wq"][i], 4, 8)
        np.testing.assert_array_equal(np.asarray(q["layers"]["wq"].packed[i]),
                                      np.asarray(one.packed))
    dense = materialize(q)
    assert jax.tree.map(jnp.shape, dense) == jax.tree.map(jnp.shape, tree)
    wq = q["layers"]["wq"]
    expect = (2 * 2 * 8 * 4) + (2 * 2 * 8 * 4) + (2 * 2 * 8) + (2 * 16 * 4)   # packed,s,z,perm
    assert tree_nbytes(wq) == expect
    st = stack_quantized([rtn_weight(tree["layers"]["wq"][i], 4, 8) for i in range(2)])
    np.testing.assert_array_equal(np.asarray(st.materialize()), np.asarray(dense["layers"]["wq"]))
    with pytest.raises(ValueError, match="does not match"):
        stack_quantized([st, rtn_weight(tree["layers"]["wq"][0], 3, 8)])


def test_rtn_selector_errors():
    tree = _tree()
    with pytest.raises(ValueError, match="matches no leaf"):
        rtn(tree, 4, select="nothing_here")
    with pytest.raises(ValueError, match="not a floating matrix"):
        rtn({"a": jnp.ones((4,)), "b": jnp.ones((4, 4))}, 4, select="a")
    q = rtn({"a": jnp.ones((4,)), "b": jnp.ones((4, 4))}, 4)    # default: matrices only
    assert isinstance(q["b"], QuantizedWeight) and q["a"].shape == (4,)


def test_jit_and_sharded_equal_single_device():
    w = _randn(3, (32, 16))
    ref = rtn_weight(w, 3, 8)
    mesh = jax.make_mesh((8,), ("x",))
    ws = jax.device_put(w, NamedSharding(mesh, P(None, "x")))
    got = jax.jit(lambda x: rtn_weight(x, 3, 8))(ws)
    np.testing.assert_array_equal(np.asarray(got.packed), np.asarray(ref.packed))
    np.testing.assert_array_equal(np.asarray(jax.jit(materialize)(got)),
                                  np.asarray(ref.materialize()))
    # Sharding the leaf itself by the dense spec (OUT split over 8 devices).
    sh = derive_shardings({"w": ref}, {"w": w}, {"w": P(None, "x")}, mesh)
    # IN = 32 is split over no mesh axis: packed/scale/zero keep OUT's axis, perm replicated
    assert sh["w"].packed.spec == P(None, "x") and sh["w"].scale.spec == P(None, "x")
    assert sh["w"].perm.is_fully_replicated
    placed = jax.device_put({"w": ref}, sh)
    np.testing.assert_array_equal(np.asarray(jax.jit(materialize)(placed)["w"]),
                                  np.asarray(ref.materialize()))
    assert not any(jax.tree.leaves(trainable_mask({"w": ref})))   # codes never train


def test_orbax_round_trip(tmp_path):
    q = rtn(_tree(), 3, 8, select=SEL)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "q", q)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "q", jax.tree.map(ocp.utils.to_shape_dtype_struct, q))
    assert jax.tree.structure(restored) == jax.tree.structure(q)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(q)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(materialize(restored)["layers"]["w_up"]),
                                  np.asarray(materialize(q)["layers"]["w_up"]))
