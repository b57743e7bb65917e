"""The one home of argument validation: every public constructor checks its arguments here.

Each check raises ``ValueError`` (a value out of range) or ``TypeError`` (a value of the wrong
kind) whose message names the argument, repeats the value received and says what is valid, and
returns the value normalised (a Python ``int`` / ``float``, a ``jnp.dtype``) so callers store what
was checked. Booleans are never accepted as numbers (``True`` is an ``int`` in Python).

Used by every package (optim, params, data, losses, train, checkpoint); imports only NumPy and
``jax.numpy`` (for dtypes such as bfloat16 and float8 that NumPy does not classify).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

__all__ = ["check_int", "check_float", "check_fraction", "check_learning_rate", "check_decay",
           "check_float_dtype", "check_choice", "check_callable", "check_rank", "check_key"]


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _range_text(minimum, maximum, min_open, max_open) -> str:
    lo = "" if minimum is None else f"{'>' if min_open else '>='} {minimum}"
    hi = "" if maximum is None else f"{'<' if max_open else '<='} {maximum}"
    return " and ".join(t for t in (lo, hi) if t)


def check_int(name: str, value, minimum: Optional[int] = None, maximum: Optional[int] = None
              ) -> int:
    """``value`` as a Python int in ``[minimum, maximum]`` (either bound optional).

    Raises:
      TypeError: ``value`` is not an integer (bools, floats and strings included).
      ValueError: out of range.
    """
    valid = " ".join(t for t in ("an int", _range_text(minimum, maximum, False, False)) if t)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {valid}; got {value!r} ({type(value).__name__})")
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise ValueError(f"{name} must be {valid}; got {v}")
    return v


def check_float(name: str, value, minimum: Optional[float] = None,
                maximum: Optional[float] = None, *, min_open: bool = False,
                max_open: bool = False, allow_inf: bool = False) -> float:
    """``value`` as a finite Python float in the given range (open or closed at each end).

    ``allow_inf`` admits ``+inf`` / ``-inf`` where they have a meaning (e.g. "no clipping");
    NaN is never valid.

    Raises:
      TypeError: not a real number (strings, arrays, bools).
      ValueError: NaN, infinite (unless ``allow_inf``) or out of range.
    """
    if not _is_real(value):
        if isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0 and \
                np.issubdtype(np.asarray(value).dtype, np.number):
            value = np.asarray(value).item()
        else:
            raise TypeError(f"{name} must be a real number; got {value!r} "
                            f"({type(value).__name__})")
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


def check_learning_rate(name: str, value, *, allow_zero: bool = True) -> Any:
    """A learning rate: a finite number >= 0 (> 0 unless ``allow_zero``) or a schedule (a
    callable ``step -> lr``, optax's convention). Returns a float or the callable unchanged.

    Raises:
      TypeError: neither a real number nor a callable (e.g. a string).
      ValueError: NaN, infinite or negative.
    """
    if callable(value):
        return value
    if not _is_real(value) and not (isinstance(value, (np.ndarray, np.generic))
                                    and np.ndim(value) == 0):
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
