"""Shared helpers for the kernels: backend dispatch, argument checks, padding.

Every kernel module exposes three functions: ``<op>_reference`` (plain jnp, the
definition of correctness), ``<op>_pallas`` (the Pallas kernel) and ``<op>`` (the
dispatcher). The dispatcher resolves its implementation here, once, at trace time.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLS = ("pallas", "reference")
GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def backend() -> str:
    """The platform of the default backend, normalised to 'gpu', 'tpu' or 'cpu'."""
    name = jax.default_backend()
    return "gpu" if name in GPU_PLATFORMS else name


def resolve_impl(impl: str | None, interpret: bool, *, name: str,
                 accelerator_default: str = "pallas") -> str:
    """Chooses 'pallas' or 'reference' for a dispatcher.

    impl=None picks `accelerator_default` on GPU/TPU, the reference on CPU, and Pallas
    whenever interpret=True (interpret mode runs the kernel on any backend).

    Raises:
      ValueError: impl not in (None, 'pallas', 'reference').
    """
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"{name}: impl must be None, 'pallas' or 'reference'; got {impl!r}")
    if impl is not None:
        return impl
    if interpret:
        return "pallas"
    return accelerator_default if backend() in ("gpu", "tpu") else "reference"


def check_dtype(name: str, arg: str, x, allowed) -> None:
    """Raises TypeError naming `arg` when x.dtype is not one of `allowed`."""
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in allowed]:
        raise TypeError(f"{name}: {arg} must have dtype in {[jnp.dtype(d).name for d in allowed]}; "
                        f"got {jnp.dtype(x.dtype).name}")


def check_ndim(name: str, arg: str, x, ndim: int, layout: str) -> None:
    """Raises ValueError naming `arg` when x does not have `ndim` axes."""
    if x.ndim != ndim:
        raise ValueError(f"{name}: {arg} must have {ndim} axes {layout}; got shape {tuple(x.shape)}")


def check_pow2(name: str, arg: str, value: int, minimum: int = 1) -> None:
    """Raises ValueError unless value is a power of two >= minimum (Triton block rule)."""
    if not isinstance(value, int) or value < minimum or value & (value - 1):
        raise ValueError(f"{name}: {arg} must be a power of two >= {minimum} (Triton blocks are "
                         f"powers of two); got {value!r}")


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_axis(x, axis: int, size: int, value=0):
    """Pads axis `axis` of x with `value` up to `size` (no copy when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def pallas_platform(platform: str | None, name: str) -> str:
    """'gpu' (Triton) or 'tpu' (Mosaic): the given one, else the backend ('gpu' on CPU).

    Raises ValueError for another value.
    """
    if platform is None:
        return "tpu" if backend() == "tpu" else "gpu"
    if platform not in ("gpu", "tpu"):
        raise ValueError(f"{name}: platform must be 'gpu' or 'tpu'; got {platform!r}")
    return platform


def run_pallas(call, *args, platform: str, interpret: bool):
    """``call(interpret=...)(*args)``; for interpret on the 'tpu' platform, Pallas's TPU
    interpret mode (``pltpu.force_tpu_interpret_mode``), which checks Mosaic's semantics
    (memory spaces, DMAs, semaphores) on CPU rather than the generic interpreter."""
    if interpret and platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
            return call(interpret=False)(*args)
    return call(interpret=interpret)(*args)
