"""jaxeff.params.linear: x @ W for dense and structured weights, equal to x @ materialize(w)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.params import (QuantizedWeight, linear, lora, lowrank, materialize, rtn_weight,
                           sltrain, svfit)


def _x(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _fields(w):
    """The differentiable float fields of a structured weight (or the dense array)."""
    if isinstance(w, jax.Array):
        return w
    names = type(w).trainable_fields
    return {n: getattr(w, n) for n in (names or ())}


def _rebuild(w, fields):
    return fields if isinstance(w, jax.Array) else w.replace(**fields)


def _check_value_and_grads(w, x, ct, **kw):
    """linear(x, w) == x @ materialize(w), and so are the grads w.r.t. x and trainable fields."""
    f0 = _fields(w)

    def loss(fn):
        def inner(x, f):
            y = fn(x, _rebuild(w, f))
            return jnp.sum(y * ct), y
        return jax.jit(jax.value_and_grad(inner, argnums=(0, 1), has_aux=True))

    (_, y), (gx, gf) = loss(lambda x, w: linear(x, w, **kw))(x, f0)
    (_, y_ref), (gx_ref, gf_ref) = loss(lambda x, w: x @ materialize(w))(x, f0)
    scale = float(jnp.max(jnp.abs(y_ref)))
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(gx_ref))))
    for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gf_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b)) + 1))
    return y


def test_dense_is_plain_matmul():
    rng = np.random.default_rng(0)
    w, x = _x(rng, 6, 5), _x(rng, 2, 3, 6)
    np.testing.assert_array_equal(linear(x, w), x @ w)
    _check_value_and_grads(w, x, _x(rng, 2, 3, 5))


@pytest.mark.parametrize("impl,interpret", [(None, False), ("reference", False),
                                            ("pallas", True)])
def test_sltrain(impl, interpret):
    rng = np.random.default_rng(1)
    p = {"w": _x(rng, 24, 20)}
    w = sltrain(rank=4, density=0.2, alpha=8.0, select="w").from_dense(jax.random.key(0), p)["w"]
    x, ct = _x(rng, 5, 24), _x(rng, 5, 20)
    _check_value_and_grads(w, x, ct, impl=impl, interpret=interpret)


@pytest.mark.parametrize("impl,interpret", [(None, False), ("pallas", True)])
def test_quantized_int4_kernel_path(impl, interpret):
    rng = np.random.default_rng(2)
    w = rtn_weight(_x(rng, 128, 16), 4, 128)
    x, ct = _x(rng, 3, 128), _x(rng, 3, 16)
    _check_value_and_grads(w, x, ct, impl=impl, interpret=interpret)


def test_quantized_act_order_and_fallback_layouts():
    rng = np.random.default_rng(3)
    x, ct = _x(rng, 2, 40), _x(rng, 2, 8)
    w3 = rtn_weight(_x(rng, 40, 8), 3, 16, pad=True)       # 3-bit, ragged groups: XLA path
    _check_value_and_grads(w3, x, ct)
    with pytest.raises(ValueError, match="impl='pallas' needs bits"):
        linear(x, w3, impl="pallas")
    w4 = rtn_weight(_x(rng, 40, 8), 4, 8)
    perm = jnp.asarray(rng.permutation(40), jnp.int32)
    shuffled = w4.replace(perm=perm, act_order=True)        # a valid act-order leaf
    _check_value_and_grads(shuffled, x, ct)


def test_lora_lowrank_svfit():
    rng = np.random.default_rng(4)
    p = {"w": _x(rng, 12, 10)}
    x, ct = _x(rng, 4, 12), _x(rng, 4, 10)
    lw = lora(3, alpha=6.0, select="w").from_dense(jax.random.key(1), p)["w"]
    lw = lw.replace(B=_x(rng, 3, 10))                        # a non-trivial adapter
    _check_value_and_grads(lw, x, ct)
    _check_value_and_grads(lowrank(4, select="w").from_dense(None, p)["w"], x, ct)
    _check_value_and_grads(svfit(rank=3, select="w").from_dense(None, p)["w"], x, ct)


def test_scanned_stacked_leaf_and_errors():
    """A stacked leaf sliced by lax.scan applies per layer; the stack itself is refused."""
    rng = np.random.default_rng(5)
    p = {"w": _x(rng, 3, 8, 8)}
    w = lowrank(2, select="w").from_dense(None, p)["w"]
    x = _x(rng, 2, 8)

    def body(h, wl):
        return linear(h, wl), None
    got, _ = jax.lax.scan(body, x, w)
    want = x
    for layer in materialize(w):
        want = want @ layer
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unbatched"):
        linear(x, w)
    with pytest.raises(ValueError, match="impl must be one of"):
        linear(x, p["w"][0], impl="triton")
    with pytest.raises(ValueError, match="in=8"):
        linear(_x(rng, 2, 7), jax.tree.map(lambda a: a[0], w))
    assert isinstance(rtn_weight(p["w"][0], 4, 8), QuantizedWeight)
