"""Group quantize / dequantize for compressed optimizer states: int8 absmax, FP8 E4M3 with COAT.

Tensors of any shape are flattened (row-major), zero-padded to a multiple of `group` and viewed
as [G, group]; every group gets its own scale.
- int8 absmax ("8-bit Optimizers via Block-wise Quantization", Dettmers et al., 2022, the linear
  variant): s = max|x| / 127;  q = floor(x / s + 1/2) in [-127, 127] (round half up: Triton
  lowers no round-half-even);  x' = q * s.
- FP8 E4M3 with Dynamic Range Expansion ("COAT: Compressing Optimizer States and Activation for
  Memory-Efficient FP8 Training", Xi et al., ICLR 2025), per group of 128:
    mx = max|x| + 1e-30, mn = min_{x != 0} |x| + 1e-30, R = mx / mn
    k = floor(16 * log2(448^2 / 2) / log2 R) / 16   (k = 1 when R <= 1 or the group is all zero)
    c = sqrt(mx * mn), f(x) = sign(x) (|x| / c)^k, scale = (mx / c)^k / 448
    q = e4m3(clip(f(x) / scale, -448, 448));   decode x' = sign(q) (|q| scale)^(1/k) c
  expand=False gives plain absmax E4M3 (k = 1, c = 1, scale = mx / 448).
  E4M3 casts do not saturate (448+ becomes NaN), hence the clip.

| function | what |
|---|---|
| quantize_int8_reference / _pallas / quantize_int8 | x -> (q int8 [G, group], scale f32 [G]) |
| dequantize_int8 | (q, scale, shape) -> x' (jnp; XLA fuses it into the consumer) |
| quantize_fp8_reference / _pallas / quantize_fp8 | x -> Fp8Groups(q e4m3 [G, group], scale, k, c f32 [G]); dispatcher: reference |
| dequantize_fp8 | (Fp8Groups, shape) -> x' (jnp) |
Pallas kernels (Triton, GPU): each program quantizes a [64, group] tile of groups (row max/min in
registers, one read of x, one write of q). TPU and CPU dispatch to the reference.
Measured on one H200 (jax 0.11.2, 64M f32 values, `python kernels/bench.py`), XLA / Pallas:
int8 0.169 / 0.126 ms (2.0 / 2.7 TB/s): the dispatcher uses the kernel on GPU; FP8 COAT
0.279 / 0.318 ms (exp2/log2 per element): the dispatcher uses the reference everywhere. The
FP8 kernel's codes differ from the reference in ~3e-6 of the values (Triton's exp2/log2 round
differently near code boundaries).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common

f32 = jnp.float32
E4M3_MAX = 448.0
_K_NUM = 16.0 * math.log2(E4M3_MAX ** 2 / 2)
_ROWS = 64  # groups per kernel program


class Fp8Groups(NamedTuple):
    """FP8 E4M3 group-quantized tensor: q [G, group] float8_e4m3fn; scale, k, c f32 [G]."""
    q: jax.Array
    scale: jax.Array
    k: jax.Array
    c: jax.Array


def _groups(name, x, group):
    _common.check_pow2(name, "group", group, 16)
    _common.check_dtype(name, "x", x, (jnp.float32, jnp.bfloat16, jnp.float16))
    flat = x.reshape(-1)  # kept in its dtype: kernels cast in registers
    n = max(flat.shape[0], 1)
    return _common.pad_axis(flat, 0, _common.round_up(n, group)).reshape(-1, group)


def _ungroup(xg, shape):
    n = math.prod(shape)
    return xg.reshape(-1)[:n].reshape(shape)


# ------------------------------------------------------------------------------- math.

def _int8_math(x):
    x = x.astype(f32)
    amax = jnp.max(jnp.abs(x), axis=1)
    scale = amax / 127.0
    safe = jnp.where(amax > 0, scale, 1.0)
    q = jnp.clip(jnp.floor(x / safe[:, None] + 0.5), -127, 127)  # Triton has no round_p
    return q, scale


def _fp8_params(ax, expand):
    """Per-row (scale, k, c) for |x| rows `ax` [rows, group]."""
    mx = jnp.max(ax, axis=1)
    if not expand:
        one = jnp.ones_like(mx)
        return jnp.where(mx > 0, mx / E4M3_MAX, 1.0), one, one
    mn = jnp.min(jnp.where(ax > 0, ax, jnp.inf), axis=1)
    mn = jnp.where(mn < jnp.inf, mn, mx)
    mx, mn = mx + 1e-30, mn + 1e-30
    log_r = jnp.log2(mx / mn)
    k = jnp.where(log_r > 0, jnp.floor(_K_NUM / jnp.where(log_r > 0, log_r, 1.0)) / 16.0, 1.0)
    k = jnp.maximum(k, 1.0 / 16.0)
    c = jnp.sqrt(mx) * jnp.sqrt(mn)
    scale = jnp.exp2(k * jnp.log2(mx / c)) / E4M3_MAX
    return scale, k, c


def _fp8_encode(x, scale, k, c):
    ax = jnp.abs(x)
    f = jnp.where(ax > 0, jnp.exp2(k[:, None] * jnp.log2(jnp.where(ax > 0, ax, 1.0) / c[:, None])),
                  0.0)
    return jnp.clip(jnp.sign(x) * f / scale[:, None], -E4M3_MAX, E4M3_MAX)


# -------------------------------------------------------------------------- reference.

def quantize_int8_reference(x, group: int = 128):
    """int8 absmax group quantization (module docstring); returns (q int8 [G, group], scale [G]).

    Args: x any shape, float; group: power of two >= 16 (default 128).
    Raises: ValueError / TypeError for a bad group or dtype.
    """
    q, scale = _int8_math(_groups("quantize_int8_reference", x, group))
    return q.astype(jnp.int8), scale


def dequantize_int8(q, scale, shape):
    """x' = q * scale per group, reshaped to `shape` (drops the padding)."""
    return _ungroup(q.astype(f32) * scale[:, None], tuple(shape))


def quantize_fp8_reference(x, group: int = 128, expand: bool = True) -> Fp8Groups:
    """FP8 E4M3 group quantization with COAT dynamic range expansion (module docstring).

    Args: x any shape, float; group power of two >= 16 (default 128); expand (default True;
    False = plain absmax E4M3). Returns Fp8Groups. Raises: ValueError / TypeError as above.
    """
    xg = _groups("quantize_fp8_reference", x, group)
    xg = xg.astype(f32)
    scale, k, c = _fp8_params(jnp.abs(xg), expand)
    q = _fp8_encode(xg, scale, k, c).astype(jnp.float8_e4m3fn)
    return Fp8Groups(q, scale, k, c)


def dequantize_fp8(groups: Fp8Groups, shape):
    """x' = sign(q) (|q| scale)^(1/k) c per group, reshaped to `shape`."""
    q = groups.q.astype(f32)
    aq = jnp.abs(q) * groups.scale[:, None]
    mag = jnp.where(aq > 0, jnp.exp2(jnp.log2(jnp.where(aq > 0, aq, 1.0)) / groups.k[:, None]), 0.0)
    return _ungroup(jnp.sign(q) * mag * groups.c[:, None], tuple(shape))


# ---------------------------------------------------------------------------- kernels.

def _tile(ref, rows_total):
    from jax.experimental.pallas import triton as plgpu
    i = pl.program_id(0)
    sl = pl.ds(i * _ROWS, _ROWS)
    mask = (i * _ROWS + jnp.arange(_ROWS) < rows_total)
    return sl, mask, plgpu.load(ref.at[sl, :], mask=mask[:, None], other=0.0)


def _int8_kernel(x_ref, q_ref, s_ref, *, rows):
    from jax.experimental.pallas import triton as plgpu
    sl, mask, x = _tile(x_ref, rows)
    q, scale = _int8_math(x)
    plgpu.store(q_ref.at[sl, :], q.astype(jnp.int32).astype(jnp.int8), mask=mask[:, None])
    plgpu.store(s_ref.at[sl], scale, mask=mask)


def _fp8_kernel(x_ref, q_ref, s_ref, k_ref, c_ref, *, rows, expand):
    from jax.experimental.pallas import triton as plgpu
    sl, mask, x = _tile(x_ref, rows)
    x = x.astype(f32)
    scale, k, c = _fp8_params(jnp.abs(x), expand)
    plgpu.store(q_ref.at[sl, :], _fp8_encode(x, scale, k, c).astype(jnp.float8_e4m3fn),
                mask=mask[:, None])
    plgpu.store(s_ref.at[sl], scale, mask=mask)
    plgpu.store(k_ref.at[sl], k, mask=mask)
    plgpu.store(c_ref.at[sl], c, mask=mask)


def _launch(kernel, xg, out_dtypes, interpret, name):
    from jax.experimental.pallas import triton as plgpu
    rows, group = xg.shape
    if interpret:  # Interpret mode clamps out-of-range slices, so give it whole tiles.
        xg = _common.pad_axis(xg, 0, _common.round_up(rows, _ROWS))
    size = xg.shape[0]
    shapes = [(size, group)] + [(size,)] * (len(out_dtypes) - 1)
    outs = pl.pallas_call(
        functools.partial(kernel, rows=rows), grid=(pl.cdiv(rows, _ROWS),),
        out_shape=[jax.ShapeDtypeStruct(s, d) for s, d in zip(shapes, out_dtypes)],
        interpret=interpret, name=name, compiler_params=plgpu.CompilerParams(num_warps=4),
    )(xg)
    return [o[:rows] for o in outs]


def quantize_int8_pallas(x, group: int = 128, interpret: bool = False):
    """int8 absmax group quantization as one Triton pass; same contract as the reference."""
    xg = _groups("quantize_int8_pallas", x, group)
    q, scale = _launch(_int8_kernel, xg, [jnp.int8, f32], interpret, "jaxeff_quantize_int8")
    return q, scale


def quantize_fp8_pallas(x, group: int = 128, expand: bool = True,
                        interpret: bool = False) -> Fp8Groups:
    """COAT FP8 group quantization as one Triton pass (needs sm_89+ for the E4M3 cast)."""
    xg = _groups("quantize_fp8_pallas", x, group)
    outs = _launch(functools.partial(_fp8_kernel, expand=expand), xg,
                   [jnp.float8_e4m3fn, f32, f32, f32], interpret, "jaxeff_quantize_fp8")
    return Fp8Groups(*outs)


def quantize_int8(x, group: int = 128, *, impl: str | None = None, interpret: bool = False):
    """int8 group quantization dispatcher: Pallas on GPU, reference on CPU/TPU.

    Raises: ValueError for an unknown impl, plus the checks of the chosen implementation.
    """
    default = "pallas" if _common.backend() == "gpu" else "reference"
    if _common.resolve_impl(impl, interpret, name="quantize_int8",
                            accelerator_default=default) == "reference":
        return quantize_int8_reference(x, group)
    return quantize_int8_pallas(x, group, interpret=interpret)


def quantize_fp8(x, group: int = 128, expand: bool = True, *, impl: str | None = None,
                 interpret: bool = False) -> Fp8Groups:
    """FP8 (COAT) group quantization dispatcher: the reference (faster than the kernel on an H200).

    Raises: ValueError for an unknown impl, plus the checks of the chosen implementation.
    """
    if _common.resolve_impl(impl, interpret, name="quantize_fp8",
                            accelerator_default="reference") == "reference":
        return quantize_fp8_reference(x, group, expand)
    return quantize_fp8_pallas(x, group, expand, interpret=interpret)


# ----------------------------------------------- state groups: linear / DRE (jaxeff.optim).
# The one home of the group quantizer `jaxeff.optim.compress_state` stores optimizer states
# with (formulas in jaxeff/optim/_compress.py's docstring): codes = sign(x) Q (|x| / M)^k per
# group of the last axis, M = absmax, k = COAT's exponent (1 without expansion), int8 codes
# rounded half to even, E4M3 codes cast. The kernel runs the same function on [64, g] tiles.

GROUP_FORMATS = ("int8", "fp8")
GROUP_QMAX = {"int8": 127.0, "fp8": 448.0}
GROUP_TARGET = {"int8": 127.0, "fp8": 448.0 ** 2 / 2}
_TINY = 1e-30


def _sign(x):
    """jnp.sign (signed zeros and NaN kept) from compares and selects, which every backend lowers."""
    return jnp.where(x > 0, 1.0, jnp.where(x < 0, -1.0, x))


def _round_half_even(q):
    """jnp.round (half to even) from floor, exact for |q| < 2^23 (Triton lowers no round)."""
    r = jnp.floor(q)
    f = q - r                                       # exact: q and r share an exponent range
    odd = (r - 2.0 * jnp.floor(r * 0.5)) != 0
    return jnp.where((f > 0.5) | ((f == 0.5) & odd), r + 1.0, r)


def _check_group_fmt(name, fmt):
    if fmt not in GROUP_FORMATS:
        raise ValueError(f"fmt={fmt!r}: {name} takes 'int8' or 'fp8'")


def dre_exponent(absmax, absmin, fmt: str = "fp8"):
    """COAT's expansion exponent k = floor(16 log2(T) / log2(absmax / absmin)) / 16.

    T = 448^2 / 2 (fp8) or 127 (int8); k = 1 where the ratio is <= 1 (constant or all-zero
    groups); clipped to [1/16, 1024]. Returns float32 of absmax's shape.
    """
    _check_group_fmt("dre_exponent", fmt)
    ratio = (absmax + _TINY) / (absmin + _TINY)
    lr = jnp.log2(jnp.maximum(ratio, 1.0))
    k = jnp.floor(16.0 * math.log2(GROUP_TARGET[fmt]) / jnp.where(lr > 0, lr, 1.0)) / 16.0
    return jnp.where(lr > 0, jnp.clip(k, 1.0 / 16, 1024.0), 1.0).astype(f32)


def _group_math(x, fmt, expand, kernel):
    """(q float, absmax [..., 1], k [..., 1]) for groups along the last axis of x."""
    x = x.astype(f32)
    a = jnp.abs(x)
    mx = jnp.max(a, axis=-1, keepdims=True)
    nonzero = mx > 0
    safe_mx = jnp.where(nonzero, mx, 1.0)
    if expand:
        mn = jnp.min(jnp.where(a > 0, a, jnp.inf), axis=-1, keepdims=True)
        k = dre_exponent(mx, jnp.where(nonzero, mn, mx), fmt)
    else:
        k = jnp.ones_like(mx)
    qmax = GROUP_QMAX[fmt]
    sign = _sign(x) if kernel else jnp.sign(x)
    if expand:  # in log2 space: a/M itself can be an f32 denormal, which XLA flushes to zero
        q = sign * qmax * jnp.exp2(k * (jnp.log2(a) - jnp.log2(safe_mx)))
    else:       # Q/M is a normal number for any M < Q * 2^126
        q = x * (qmax / safe_mx)
    q = jnp.clip(q, -qmax, qmax)
    if fmt == "int8":
        q = _round_half_even(q) if kernel else jnp.round(q)
        if expand:  # k is floored at 1/16: for R > 127^16 keep nonzero values off code 0
            q = jnp.where((q == 0) & (x != 0), sign, q)
    return q, mx, k


def _group_codes(q, fmt):
    return q.astype(jnp.int32).astype(jnp.int8) if fmt == "int8" else q.astype(jnp.float8_e4m3fn)


def group_quantize_reference(x_GxS, fmt: str = "fp8", expand: bool = True):
    """Quantize groups along the last axis of x (any leading axes): (codes, absmax, k).

    codes int8 / float8_e4m3fn [..., S]; absmax, k float32 [...] (k = ones when not expand).
    The definition `jaxeff.optim.compress_state` stores states with.
    Raises: ValueError for a format other than 'int8' or 'fp8'.
    """
    _check_group_fmt("group_quantize", fmt)
    q, mx, k = _group_math(x_GxS, fmt, expand, kernel=False)
    return _group_codes(q, fmt), mx[..., 0], k[..., 0]


def group_dequantize(codes, absmax, k=None, fmt: str | None = None):
    """Inverse of group_quantize: x^ = sign(q) M (|q| / Q)^(1/k) in f32 (k=None: linear).

    fmt defaults to the format implied by codes.dtype. Raises ValueError on other dtypes.
    """
    if fmt is None:
        fmt = ("int8" if codes.dtype == jnp.int8 else
               "fp8" if codes.dtype == jnp.float8_e4m3fn else None)
    if fmt not in GROUP_QMAX:
        raise ValueError(f"codes.dtype={codes.dtype}: expected int8 or float8_e4m3fn codes")
    q = codes.astype(f32)
    if k is None:
        return q * (absmax / GROUP_QMAX[fmt])[..., None]
    e = (jnp.log2(jnp.abs(q)) - math.log2(GROUP_QMAX[fmt])) / k[..., None]
    return jnp.sign(q) * jnp.exp2(e + jnp.log2(absmax)[..., None])  # one exp2: no underflow


def _state_kernel(x_ref, q_ref, m_ref, k_ref, *, fmt, expand):
    q, mx, k = _group_math(x_ref[...], fmt, expand, kernel=True)
    q_ref[...] = _group_codes(q, fmt)
    m_ref[...] = mx
    k_ref[...] = k


def group_quantize_pallas(x_GxS, fmt: str = "fp8", expand: bool = True, *,
                          interpret: bool = False, platform: str | None = None):
    """group_quantize_reference as one Pallas pass over [64, S] tiles of groups.

    Same contract and bit-identical codes (int8 rounds half to even from floor and compares). platform: 'gpu' (Triton; S a power of two >= 16) or 'tpu' (Mosaic;
    S a multiple of 128); default the backend ('gpu' when interpreting on CPU).
    Raises: ValueError for a bad format, platform or group length.
    """
    _check_group_fmt("group_quantize_pallas", fmt)
    platform = _common.pallas_platform(platform, "group_quantize_pallas")
    lead, s = x_GxS.shape[:-1], x_GxS.shape[-1]
    if platform == "gpu":
        _common.check_pow2("group_quantize_pallas", "group length (last axis)", s, 16)
    elif s % 128:
        raise ValueError(f"group_quantize_pallas: the TPU kernel needs a group length that is a "
                         f"multiple of 128; got {s}")
    xg = x_GxS.reshape(-1, s)
    rows = xg.shape[0]
    xg = _common.pad_axis(xg, 0, _common.round_up(max(rows, 1), _ROWS))
    size = xg.shape[0]
    code_dtype = jnp.int8 if fmt == "int8" else jnp.float8_e4m3fn
    tile = pl.BlockSpec((_ROWS, s), lambda i: (i, 0))
    col = pl.BlockSpec((_ROWS, 1), lambda i: (i, 0))
    if platform == "gpu":
        from jax.experimental.pallas import triton as plgpu
        params = plgpu.CompilerParams(num_warps=4)
    else:
        params = None
    call = functools.partial(
        pl.pallas_call, functools.partial(_state_kernel, fmt=fmt, expand=expand),
        grid=(size // _ROWS,), in_specs=[tile], out_specs=[tile, col, col],
        out_shape=[jax.ShapeDtypeStruct((size, s), code_dtype),
                   jax.ShapeDtypeStruct((size, 1), f32), jax.ShapeDtypeStruct((size, 1), f32)],
        compiler_params=params, name="jaxeff_group_quantize")
    q, mx, k = _common.run_pallas(call, xg, platform=platform, interpret=interpret)
    return (q[:rows].reshape(*lead, s), mx[:rows, 0].reshape(lead), k[:rows, 0].reshape(lead))


def group_quantize(x_GxS, fmt: str = "fp8", expand: bool = True, *, impl: str | None = None,
                   interpret: bool = False):
    """Group quantization dispatcher (`jaxeff.optim.compress_state` calls it): the reference on
    every backend unless forced (the kernel is not yet timed on a GPU or TPU; XLA fuses the
    reference into one pass already). impl='pallas'|'reference' forces one; interpret=True runs
    the kernel in interpret mode.
    Raises: ValueError for an unknown impl or format, plus the chosen implementation's checks.
    """
    chosen = _common.resolve_impl(impl, interpret, name="group_quantize",
                                  accelerator_default="reference")
    if chosen == "reference":
        return group_quantize_reference(x_GxS, fmt, expand)
    return group_quantize_pallas(x_GxS, fmt, expand, interpret=interpret)
