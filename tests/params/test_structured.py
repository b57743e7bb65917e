"""The structured-weight protocol: partition/combine, masks, layouts, Orbax, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from jaxeff.params import LoRAWeight, lora
from jaxeff.params import lowrank, svfit
from jaxeff.params import sltrain
from jaxeff.params import (MatrixLayout, combine, is_structured, materialize, partition,
                           trainable_mask)
from jaxeff.state_sharding import derive_shardings

def _randn(seed, shape, scale=1.0):
    """Test data from NumPy (no XLA compile per shape)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


SEL = r"^(w|stack)$"


def _params():
    return {"w": _randn(1, (24, 16)), "stack": _randn(2, (3, 24, 16)),
            "norm": jnp.ones((16,)), "step": jnp.zeros((), jnp.int32),
            "emb": _randn(3, (4, 16))}


METHODS = {
    "sltrain": lambda p: sltrain(4, 0.25, select=SEL).init(jax.random.key(1), p),
    "sltrain_dense": lambda p: sltrain(4, 0.25, select=SEL).from_dense(jax.random.key(1), p),
    "lowrank": lambda p: lowrank(4, select=SEL).from_dense(None, p),
    "svfit": lambda p: svfit(4, select=SEL).from_dense(None, p),
    "lora": lambda p: lora(4, 8.0, select=SEL).from_dense(jax.random.key(1), p),
}


def _ckpt_roundtrip(tree, path):
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, tree)
    ckpt.wait_until_finished()
    return ckpt.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_orbax_round_trip(name, tmp_path):
    tree = METHODS[name](_params())
    back = _ckpt_roundtrip(tree, tmp_path / "ckpt")
    assert jax.tree.structure(back, is_leaf=is_structured) == jax.tree.structure(
        tree, is_leaf=is_structured)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(materialize(back)["stack"], materialize(tree)["stack"])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_sharded_materialize_and_grad_match_single_device(name):
    tree = METHODS[name](_params())
    dense_specs = {"w": P(None, "x"), "stack": P(None, None, "x"), "norm": P(), "step": P(),
                   "emb": P()}
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    # the class's own rule (registered beside it), through the one public entry
    shardings = derive_shardings(tree, _params(), dense_specs, mesh)
    sharded = jax.device_put(tree, shardings)
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(shardings))
    trainable, frozen = partition(tree)
    s_trainable, s_frozen = partition(sharded)

    def loss(t, f):
        d = materialize(combine(t, f))
        return jnp.sum(jnp.sin(d["w"])) + jnp.sum(d["stack"] ** 2)

    f = jax.jit(jax.value_and_grad(loss))
    (l1, g1), (l2, g2) = f(trainable, frozen), f(s_trainable, s_frozen)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_partition_keeps_ints_and_frozen_bases_out_of_the_optimizer():
    tree = sltrain(2, 0.25, select=SEL).init(jax.random.key(0), _params())
    mask = trainable_mask(tree)
    assert mask["w"].A and mask["w"].B and mask["w"].values and not mask["w"].indices
    assert mask["norm"] and not mask["step"]
    trainable, frozen = partition(tree)
    assert trainable["w"].indices is None and frozen["w"].indices is not None
    assert all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(trainable))
    tx = optax.adam(1e-2)
    state = tx.init(trainable)

    def loss(t):
        return jnp.sum(materialize(combine(t, frozen))["w"] ** 2)
    grads = jax.grad(loss)(trainable)        # would raise on the int indices without partition
    upd, state = tx.update(grads, state, trainable)
    new = combine(optax.apply_updates(trainable, upd), frozen)
    assert jax.tree.structure(new) == jax.tree.structure(tree)
    np.testing.assert_array_equal(new["w"].indices, tree["w"].indices)


def test_freeze_selector_and_multi_transform_on_lora():
    p = {k: v for k, v in _params().items() if k != "step"}        # all-float tree
    tree = lora(2, select=SEL).from_dense(jax.random.key(0), p)
    # an adapted tree trains only its adapters by default (issue 16); train_dense opts dense in
    default = trainable_mask(tree)
    assert not default["emb"] and not default["norm"] and not default["w"].base and default["w"].A
    mask = trainable_mask(tree, freeze="emb", train_dense=True)
    assert not mask["emb"] and mask["norm"] and not mask["w"].base and mask["w"].A
    some = trainable_mask(tree, train_dense="norm")
    assert some["norm"] and not some["emb"] and some["w"].B
    tree = tree | {"w": tree["w"].replace(B=jnp.ones_like(tree["w"].B))}
    tx = optax.multi_transform({True: optax.sgd(0.1), False: optax.set_to_zero()}, mask)
    state = tx.init(tree)
    grads = jax.grad(lambda t: jnp.sum(materialize(t)["w"] ** 2) + jnp.sum(t["emb"]))(tree)
    upd, _ = tx.update(grads, state, tree)
    new = optax.apply_updates(tree, upd)
    np.testing.assert_array_equal(new["w"].base, tree["w"].base)
    np.testing.assert_array_equal(new["emb"], tree["emb"])
    assert not np.allclose(new["w"].A, tree["w"].A)


def test_matrix_layout_default_and_dims_round_trip():
    x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
    lay = MatrixLayout.default(x.shape)
    assert (lay.batch_shape, lay.m, lay.n) == ((2, 3), 4, 5)
    np.testing.assert_array_equal(lay.from_matrix(lay.to_matrix(x)), x)
    lay2 = MatrixLayout.from_axes(x.shape, ((1,), (0, 3)))
    assert (lay2.batch_shape, lay2.m, lay2.n) == ((4,), 3, 10)
    np.testing.assert_array_equal(lay2.from_matrix(lay2.to_matrix(x)), x)
    np.testing.assert_array_equal(lay2.to_matrix(x)[1], jnp.transpose(x[:, :, 1, :], (1, 0, 2))
                                  .reshape(3, 10))


def test_dims_turn_a_3d_kernel_into_one_matrix():
    p = {"attn": _randn(10, (8, 2, 4))}
    out = lowrank(8, select="attn", matrix_axes=((0,), (1, 2))).from_dense(None, p)
    assert out["attn"].L.shape == (8, 8) and out["attn"].R.shape == (8, 8)
    np.testing.assert_allclose(materialize(out)["attn"], p["attn"], atol=1e-5)


def test_bad_selection_errors_name_the_problem():
    p = _params()
    with pytest.raises(ValueError, match="matches no leaf"):
        sltrain(2, select="nothing_here").init(jax.random.key(0), p)
    with pytest.raises(ValueError, match=r"norm.*shape \(16,\).*matrix_axes"):
        sltrain(2, 0.5, select="norm").init(jax.random.key(0), p)
    with pytest.raises(ValueError, match="matrix_axes"):
        lowrank(2, select="stack", matrix_axes=((0,), (0,))).from_dense(None, p)
    tree = lowrank(2, select="w").from_dense(None, p)
    with pytest.raises(TypeError, match="already a structured weight"):
        lowrank(2, select="w").from_dense(None, tree)


def test_materialize_leaves_dense_leaves_alone():
    p = _params()
    tree = lora(2, select="w").from_dense(jax.random.key(0), p)
    d = materialize(tree)
    assert isinstance(tree["w"], LoRAWeight) and not is_structured(d["w"])
    for k in ("norm", "stack", "emb", "step"):
        assert d[k] is p[k]


def test_works_on_flax_nnx_state():
    from flax import nnx
    model = nnx.Linear(24, 16, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    f = sltrain(4, 0.25, select="kernel").init(jax.random.key(0), state)
    trainable, frozen = partition(f)
    assert trainable["kernel"].get_value().indices is None
    nnx.update(model, materialize(combine(trainable, frozen)))
    np.testing.assert_array_equal(model.kernel.get_value(), f["kernel"].get_value().sparse_matrix())
