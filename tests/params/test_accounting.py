"""Parameter/byte accounting on concrete and abstract (eval_shape) trees."""

import jax
import jax.numpy as jnp
import optax

from jaxeff.params import param_report, tree_bytes, tree_size
from jaxeff.params import lowrank
from jaxeff.params import sltrain
from jaxeff.params import partition


def _abstract_params():
    return {"w": jax.ShapeDtypeStruct((2, 64, 32), jnp.bfloat16),
            "n": jax.ShapeDtypeStruct((32,), jnp.float32)}


def test_report_on_abstract_sltrain_tree():
    p = _abstract_params()
    f = jax.eval_shape(lambda p: sltrain(8, 0.05, select="w").init(jax.random.key(0), p), p)
    rep = param_report(f)
    nnz = int(0.05 * 64 * 32)
    assert rep.dense_params == 2 * 64 * 32 + 32
    assert rep.dense_bytes == 2 * 64 * 32 * 2 + 32 * 4
    assert rep.trainable_params == 2 * (8 * 96 + nnz) + 32
    assert rep.stored_params == rep.trainable_params + 2 * nnz
    assert rep.stored_bytes == 2 * (8 * 96 + nnz) * 2 + 2 * nnz * 4 + 32 * 4
    assert rep.structured_leaves == 1 and 0 < rep.stored_ratio < 1
    trainable, _ = partition(f)
    opt = jax.eval_shape(optax.adam(1e-3).init, trainable)
    assert tree_bytes(opt) == 2 * rep.trainable_bytes + 4


def test_report_on_dense_and_lowrank_tree():
    p = {"w": jnp.ones((40, 30)), "b": jnp.ones((30,))}
    rep = param_report(p)
    assert rep.dense_params == rep.stored_params == rep.trainable_params == 1230
    assert rep.stored_ratio == 1.0 and rep.structured_leaves == 0
    f = jax.eval_shape(lambda p: lowrank(5, select="w").init(jax.random.key(0), p), p)
    rep = param_report(f)
    assert rep.stored_params == 5 * 70 + 30 == tree_size(f)
    assert rep.dense_params == 1230
