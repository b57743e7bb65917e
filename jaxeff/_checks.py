"""The one home of argument validation: every public constructor checks its arguments here.

Each check raises ``ValueError`` (a value out of range) or ``TypeError`` (a value of the wrong
kind) whose message names the argument, repeats the value received and says what is valid, and
returns the value normalised (a Python ``int`` / ``float``, a ``jnp.dtype``) so callers store what
was checked. Booleans are never accepted as numbers (``True`` is an ``int`` in Python).

Used by every package (optim, params, data, losses, train, checkpoint); imports only NumPy and
``jax`` (for dtypes such as bfloat16 and float8 that NumPy does not classify, and tracers).

Traced values: hyperparameters wrapped by ``optax.inject_hyperparams`` reach the constructors as
arrays, traced under ``jit``. ``check_float`` / ``check_learning_rate`` take ``traced_ok=True``
where that is legitimate: a tracer is returned unchecked (its value does not exist yet), a
concrete 0-d array is checked like a number.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_int", "check_float", "check_fraction", "check_learning_rate", "check_decay",
           "check_float_dtype", "check_choice", "check_callable", "check_rank", "check_key",
           "check_optional", "check_bool", "is_traced",
           "check_float_leaves", "check_same_shapes"]


def is_traced(value) -> bool:
    """True for a JAX tracer (a value that exists only inside a trace: not checkable)."""
    return isinstance(value, jax.core.Tracer)


def _scalar_number(value):
    """A 0-d numeric NumPy / JAX array as a Python number; anything else unchanged."""
    if isinstance(value, (np.ndarray, np.generic, jax.Array)) and not is_traced(value) \
            and np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number):
        return np.asarray(value).item()
    return value


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _range_text(minimum, maximum, min_open, max_open) -> str:
    lo = "" if minimum is None else f"{'>' if min_open else '>='} {minimum}"
    hi = "" if maximum is None else f"{'<' if max_open else '<='} {maximum}"
    return " and ".join(t for t in (lo, hi) if t)


def check_int(name: str, value, minimum: Optional[int] = None, maximum: Optional[int] = None,
              *, traced_ok: bool = False) -> int:
    """``value`` as a Python int in ``[minimum, maximum]`` (either bound optional).

    A concrete 0-d integer NumPy/JAX array counts as an int; with ``traced_ok`` a tracer is
    returned unchecked.

    Raises:
      TypeError: ``value`` is not an integer (bools, floats and strings included).
      ValueError: out of range.
    """
    if traced_ok and is_traced(value):
        return value
    if isinstance(value, (np.ndarray, np.generic, jax.Array)) and not is_traced(value) \
            and np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.integer):
        value = np.asarray(value).item()
    valid = " ".join(t for t in ("an int", _range_text(minimum, maximum, False, False)) if t)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {valid}; got {value!r} ({type(value).__name__})")
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise ValueError(f"{name} must be {valid}; got {v}")
    return v


def check_float(name: str, value, minimum: Optional[float] = None,
                maximum: Optional[float] = None, *, min_open: bool = False,
                max_open: bool = False, allow_inf: bool = False, traced_ok: bool = False
                ) -> float:
    """``value`` as a finite Python float in the given range (open or closed at each end).

    ``allow_inf`` admits ``+inf`` / ``-inf`` where they have a meaning (e.g. "no clipping");
    NaN is never valid. A concrete 0-d NumPy/JAX array counts as a number; with ``traced_ok``
    a tracer is returned unchecked (``optax.inject_hyperparams`` under ``jit``).

    Raises:
      TypeError: not a real number (strings, non-scalar arrays, bools, complex).
      ValueError: NaN, infinite (unless ``allow_inf``) or out of range.
    """
    if traced_ok and is_traced(value):
        return value
    value = _scalar_number(value)
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number; got {value!r} ({type(value).__name__})")
    v = float(value)
    rng = _range_text(minimum, maximum, min_open, max_open)
    valid = f"a {'' if allow_inf else 'finite '}number" + (f" {rng}" if rng else "")
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{name} must be {valid}; got {value!r}")
    if minimum is not None and (v < minimum or (min_open and v == minimum)):
        raise ValueError(f"{name} must be {valid}; got {value!r}")
    if maximum is not None and (v > maximum or (max_open and v == maximum)):
        raise ValueError(f"{name} must be {valid}; got {value!r}")
    return v


def check_fraction(name: str, value, *, open_left: bool = False,
                   open_right: bool = False) -> float:
    """A number in [0, 1] (either end open on request), as a Python float."""
    return check_float(name, value, 0.0, 1.0, min_open=open_left, max_open=open_right)


def check_learning_rate(name: str, value, *, allow_zero: bool = True,
                        traced_ok: bool = False) -> Any:
    """A learning rate: a finite number >= 0 (> 0 unless ``allow_zero``) or a schedule (a
    callable ``step -> lr``, optax's convention). Returns a float or the callable unchanged
    (and, with ``traced_ok``, a tracer unchanged).

    Raises:
      TypeError: neither a real number nor a callable (e.g. a string).
      ValueError: NaN, infinite or negative.
    """
    if callable(value) or (traced_ok and is_traced(value)):
        return value
    if not _is_real(_scalar_number(value)):
        raise TypeError(f"{name} must be a number >= 0 or a schedule (a callable step -> lr); "
                        f"got {value!r} ({type(value).__name__})")
    return check_float(name, value, 0.0, min_open=not allow_zero)


def check_float_dtype(name: str, value, *, allow_none: bool = True):
    """A floating-point dtype (or None where None means "as the params"); as a ``np.dtype``.

    Raises:
      TypeError: not a dtype, or an integer / bool / complex dtype (an integer moment would be
        truncated to zero for ever).
    """
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be a floating-point dtype; got None")
    try:
        dt = jnp.dtype(value)
    except TypeError as e:
        raise TypeError(f"{name} must be a floating-point dtype (e.g. jnp.float32, "
                        f"jnp.bfloat16); got {value!r}") from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{name} must be a floating-point dtype (e.g. jnp.float32, "
                        f"jnp.bfloat16); got {dt}")
    return dt


def check_choice(name: str, value, choices) -> Any:
    """``value`` is one of ``choices`` (compared with ``==``)."""
    if not any(value == c and type(value) is type(c) for c in choices):
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; "
                         f"got {value!r}")
    return value


def check_callable(name: str, value, what: str = "a callable") -> Any:
    if not callable(value):
        raise TypeError(f"{name} must be {what}; got {value!r} ({type(value).__name__})")
    return value


def check_rank(name: str, value) -> Any:
    """A rank: an int >= 1, or a float in (0, 1] meaning that fraction of a matrix's
    ``min(m, n)`` (resolved per matrix by ``jaxeff.select.resolve_rank``). Returned as an ``int``
    or a ``float``.

    Raises:
      TypeError: a bool, string, array or other non-number.
      ValueError: an int < 1, or a float outside (0, 1] (NaN and inf included).
    """
    if isinstance(value, (bool, np.bool_)) or not _is_real(value):
        raise TypeError(f"{name} must be an int >= 1 or a float fraction in (0, 1]; got "
                        f"{value!r} ({type(value).__name__})")
    if isinstance(value, numbers.Integral):
        return check_int(name, value, 1)
    v = float(value)
    if not 0.0 < v <= 1.0:  # NaN fails too
        raise ValueError(f"{name} must be an int >= 1 or a float fraction in (0, 1] (of "
                         f"min(m, n) of each matrix); got {value!r}")
    return v


def check_key(name: str, value):
    """A ``jax.random`` key: a typed key (``jax.random.key``), a raw ``uint32[2]`` key
    (``jax.random.PRNGKey``), or a Python int seed, which becomes ``jax.random.key(seed)``.

    Raises:
      TypeError: anything else (a float, a string, an array of another shape or dtype), naming
        the argument.
    """
    import jax  # local: this module otherwise needs only jax.numpy

    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return jax.random.key(int(value))
    dtype = getattr(value, "dtype", None)
    if dtype is not None:
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            return value
        if dtype == jnp.uint32 and tuple(getattr(value, "shape", ())) == (2,):
            return value
    raise TypeError(f"{name} must be a jax.random key (jax.random.key(seed)) or an int seed; "
                    f"got {value!r:.80} ({type(value).__name__})")


def check_decay(decay, name: str = "decay") -> None:
    """Raise unless ``decay`` is a number in [0, 1) (traced arrays are accepted unchecked)."""
    if isinstance(decay, bool):
        raise TypeError(f"{name} must be a number in [0, 1); got {decay!r}")
    if isinstance(decay, numbers.Real):
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"{name} must be in [0, 1) (0 copies the params, values near 1 "
                             f"average longer); got {decay!r}")
    elif not hasattr(decay, "dtype"):
        raise TypeError(f"{name} must be a number in [0, 1) or a scalar array; got "
                        f"{type(decay).__name__}")


def check_bool(name: str, value) -> bool:
    """A Python bool (or a concrete 0-d bool array, as ``optax.inject_hyperparams`` passes
    flags): a flag given as ``"False"`` or ``0`` is a mistake, not a value.

    Raises:
      TypeError: anything but ``True`` / ``False`` (a traced flag included: it must be static).
    """
    if isinstance(value, (np.ndarray, jax.Array)) and not is_traced(value) \
            and np.ndim(value) == 0 and np.asarray(value).dtype == np.bool_:
        value = bool(value)
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {value!r} ({type(value).__name__})")
    return bool(value)


def check_optional(check, name: str, value, *args, **kwargs) -> Any:
    """``None`` where None is valid ("not set"), else ``check(name, value, *args, **kwargs)``."""
    return None if value is None else check(name, value, *args, **kwargs)


def _path_text(path) -> str:
    from jaxeff.select import path_str  # the project's "/"-joined leaf path
    return path_str(path) or "<root>"


def check_float_leaves(name: str, tree, why: str = "") -> None:
    """Every array leaf of ``tree`` has a floating-point dtype (checked at a transform's ``init``).

    ``why`` completes the message (e.g. "its updates would be cast to int32: all zero").

    Raises:
      TypeError: naming the first non-floating leaf by path and dtype.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dt = getattr(leaf, "dtype", None)
        if dt is not None and not jnp.issubdtype(dt, jnp.inexact):
            raise TypeError(f"{name} leaf {_path_text(path)!r} has dtype {jnp.dtype(dt)}; only "
                            f"floating-point leaves are valid{': ' + why if why else ''} (exclude "
                            "the leaf or cast it to a float dtype)")


def check_same_shapes(name: str, tree, like, like_name: str = "the state") -> None:
    """``tree``'s leaves have the shapes of ``like``'s (same structure), e.g. gradients vs the
    shapes an optimizer state was made for.

    Raises:
      ValueError: a different structure, or the first leaf whose shape differs, by path, with
        both shapes.
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    ref = jax.tree.leaves(like)
    if len(flat) != len(ref):
        raise ValueError(f"{name} has {len(flat)} leaves but {like_name} has {len(ref)}; "
                         "was the state made for another tree?")
    for (path, x), r in zip(flat, ref):
        if tuple(np.shape(x)) != tuple(np.shape(r)):
            raise ValueError(f"{name} leaf {_path_text(path)!r} has shape {tuple(np.shape(x))} "
                             f"but in {like_name} it has shape {tuple(np.shape(r))}")
