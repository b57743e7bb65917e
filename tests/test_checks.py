"""Tests for jaxeff._checks: the shared argument checks (messages name argument, value, range)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff import _checks as K


def test_check_float_ranges_types_and_arrays():
    assert K.check_float("x", 1) == 1.0 and isinstance(K.check_float("x", 1), float)
    assert K.check_float("x", jnp.float32(0.5)) == 0.5          # concrete 0-d JAX / NumPy
    assert K.check_float("x", np.float64(0.5)) == 0.5
    assert K.check_float("x", float("inf"), allow_inf=True) == float("inf")
    for bad, err, msg in [(float("nan"), ValueError, "x must be a finite number; got nan"),
                          (float("inf"), ValueError, "finite"),
                          ("1", TypeError, "x must be a real number; got '1'"),
                          (True, TypeError, "real number"),
                          (jnp.ones(2), TypeError, "real number"),
                          (1 + 2j, TypeError, "real number")]:
        with pytest.raises(err, match=msg):
            K.check_float("x", bad)
    with pytest.raises(ValueError, match=r"x must be a finite number > 0.0 and <= 1.0; got 0"):
        K.check_float("x", 0, 0.0, 1.0, min_open=True)


def test_traced_values_pass_only_when_allowed():
    seen = {}

    @jax.jit
    def f(v):
        seen["float"] = K.check_float("x", v, 0.0, traced_ok=True) is v
        seen["lr"] = K.check_learning_rate("lr", v, traced_ok=True) is v
        seen["int"] = K.check_int("n", v, 1, traced_ok=True) is v
        with pytest.raises(TypeError, match="x must be a real number"):
            K.check_float("x", v)
        return v
    f(1.0)
    assert seen == {"float": True, "lr": True, "int": True}


def test_check_int_accepts_integer_arrays_not_floats():
    assert K.check_int("n", np.int32(3)) == 3 and K.check_int("n", jnp.int32(3), 1) == 3
    for bad in (3.0, True, jnp.float32(3), "3"):
        with pytest.raises(TypeError, match="n must be an int"):
            K.check_int("n", bad)
    with pytest.raises(ValueError, match="n must be an int >= 1 and <= 4; got 5"):
        K.check_int("n", 5, 1, 4)


def test_learning_rate_dtype_choice_callable_optional():
    sched = lambda t: 1e-3
    assert K.check_learning_rate("lr", sched) is sched
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        K.check_learning_rate("lr", 0.0, allow_zero=False)
    with pytest.raises(TypeError, match="schedule"):
        K.check_learning_rate("lr", "1e-3")
    assert K.check_float_dtype("d", "bfloat16") == jnp.bfloat16
    with pytest.raises(TypeError, match="d must be a floating-point dtype.*int32"):
        K.check_float_dtype("d", jnp.int32)
    with pytest.raises(ValueError, match="m must be one of 'a', 'b'; got 'c'"):
        K.check_choice("m", "c", ("a", "b"))
    with pytest.raises(TypeError, match="f must be a callable; got 3"):
        K.check_callable("f", 3)
    assert K.check_optional(K.check_int, "n", None, 1) is None
    with pytest.raises(ValueError, match="n must be an int >= 1; got 0"):
        K.check_optional(K.check_int, "n", 0, 1)


def test_float_leaves_and_same_shapes_name_the_path():
    tree = {"a": jnp.ones(2), "b": {"c": jnp.ones(2, jnp.int32)}}
    with pytest.raises(TypeError, match="params leaf 'b/c' has dtype int32.*because"):
        K.check_float_leaves("params", tree, "because")
    K.check_float_leaves("params", {"a": jnp.ones(2, jnp.bfloat16)})
    with pytest.raises(ValueError, match=r"grads leaf 'b/c' has shape \(3,\) but in the state it "
                                         r"has shape \(2,\)"):
        K.check_same_shapes("grads", {"a": jnp.ones(2), "b": {"c": jnp.ones(3)}}, tree)
    with pytest.raises(ValueError, match="grads has 1 leaves but the state has 2"):
        K.check_same_shapes("grads", {"a": jnp.ones(2)}, tree)


def test_check_bool():
    assert K.check_bool("f", True) is True and K.check_bool("f", np.bool_(False)) is False
    assert K.check_bool("f", jnp.array(True)) is True          # inject_hyperparams passes arrays
    for bad in ("False", 0, 1.0, None, jnp.ones(2, bool)):
        with pytest.raises(TypeError, match="f must be True or False"):
            K.check_bool("f", bad)
