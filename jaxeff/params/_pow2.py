"""Power-of-two weights: values ``sign * 2^k`` times a per-group scale, so products are shifts.

"ShiftAddViT: Mixture of Multiplication Primitives Towards Efficient Vision Transformer" (You et
al., NeurIPS 2023) reparameterizes the MLPs and linear layers of a pre-trained model by shift
kernels: every weight is ``s * 2^p`` with ``s`` in {-1, 0, +1} (DeepShift-PS, Elhoushi et al.
2021), so ``x * w`` is a bit shift of ``x`` and a matmul is shifts and adds. Here the format is a
post-training quantizer like ``jaxeff.params.rtn`` / ``gptq``, with a float scale per group of
input rows and output column (``y_n = sum_g scale_gn sum_{r in g} x_r s_rn 2^{k_rn}``: one
multiply per group, shifts and adds inside it).

Code layout at ``bits = b`` (``M = 2^(b-1) - 1``, the largest exponent field)::

    code = sign << (b - 1) | m           sign in {0, 1}, m in [0, M]
    value = 0                                      if m == 0
            (-1)^sign * scale * 2^(m - M)          if m >= 1

so the magnitudes are ``scale * {1, 1/2, ..., 2^(1-M)}`` and an explicit zero: 4 bits give 7
octaves (``2^0 .. 2^-6``) and zero, 3 bits ``{1, 1/2, 1/4}`` and zero, 2 bits the ternary
``{-1, 0, +1} * scale``. Chosen with an explicit zero (the code ``sign=1, m=0``, "-0", is never
produced; ``2^b - 1`` distinct values) because it is the paper's ternary sign (DeepShift-PS), it
makes 2 bits ternary instead of ``{+-1, +-1/2}`` without zero, zero padding codes decode to 0 (the
packing contract of ``jaxeff.params.pack``), and the octave it costs sits below ``2^-(M-1)``
of the group's largest weight, where weights contribute least.

Quantizer (per group of input rows, per output column)::

    scale = max |x|  over the group (rounded to scale_dtype; 1 for an all-zero group)
    r = |x| / scale = f * 2^e  (f in [0.5, 1), jnp.frexp)   r in [2^(e-1), 2^e)
    k = e - 1 + [f >= 0.75]       the nearer of 2^(e-1) and 2^e in the linear domain: the
                                  midpoint of [2^j, 2^(j+1)] is 1.5 * 2^j (log rounding would
                                  put it at sqrt(2) * 2^j); ties go to the larger magnitude
    m = clip(k + M, 1, M)  if r >= 2^(-M) (half the smallest level; tie -> that level), else 0

Scale search (option ``search = n > 1``, not in the paper): the max scale wastes the top octave on
the few weights near the maximum (no level between ``scale/2`` and ``scale``). Multiplying the
scale by 2 only shifts the levels, so the candidates ``scale_j = max |x| * 2^(-j/n)``,
``j = 0 .. n-1``, one octave, hold every distinct grid; each group and column takes the one of
least squared rounding error ``sum (x - Q(x))^2`` (weights above it clip to it).

Round-to-nearest (:func:`pow2_rtn`) is this quantizer; the GPTQ-style error-feedback variant
(:func:`pow2_gptq`, :func:`jaxeff.params.gptq_model` with ``grid='pow2'``) runs GPTQ's OBS
update (``jaxeff.params.gptq_solve_grid``, the one home of it) with :class:`Pow2Grid` as the
per-column quantizer, each group's scale taken from its error-updated rows.

Storage (:class:`Pow2Weight`): the layout of ``jaxeff.params.QuantizedWeight`` without ``zero``:
``packed uint32 [..., ceil(IN / P), OUT]`` (``P = 32 // bits`` codes along IN per word),
``scale scale_dtype [..., G, OUT]`` (groups along IN), ``perm int32 [..., IN]`` (act-order),
static ``shape``, ``dtype``, ``bits``, ``group_size``, ``act_order``, ``layout``.

Deviation: ShiftAddViT trains (fine-tunes) its shift layers and uses TVM shift kernels; here the
format is post-training only and ``apply`` dequantizes and multiplies with XLA (no shift kernel:
on GPUs and TPUs a matmul unit is faster than shifts, so the format saves memory, not time, in
JAX). Weights must be finite.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Optional

import flax.struct
import jax
import jax.numpy as jnp

from jaxeff._checks import check_int
from jaxeff.params._gptq import check_gptq_inputs, check_ok, gptq_solve_grid, map_solve
from jaxeff.params._quantized import (check_quant_args, pack, quantize_matrices,
                                      quantized_field_specs, unpack, unpermute_rows)
from jaxeff.params._structured import StructuredWeight, check_single_matrix, structured_rule
from jaxeff.select import MatrixLayout, Selector
from jaxeff.state_sharding import register_rule

__all__ = ["Pow2Weight", "Pow2Grid", "pow2_scale", "pow2_encode", "pow2_decode",
           "pow2_rtn_weight", "pow2_rtn", "pow2_gptq_weight", "pow2_gptq"]


def _max_field(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def pow2_scale(x: jax.Array, scale_dtype=jnp.float32, axis: int = -2, *,
               bits: Optional[int] = None, search: int = 1) -> jax.Array:
    """``scale = max |x|`` over ``axis`` (kept), rounded to ``scale_dtype``; 1 where all zero.

    With ``search > 1`` (needs ``bits``): the candidate ``max |x| * 2^(-j/search)``, ``j <
    search``, of least squared rounding error over ``axis`` (module docstring). Returned as
    float32 (float64 for float64 ``x``).
    """
    ct = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(ct)
    s = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    s = jnp.where(s == 0, 1.0, s)
    if search == 1:
        return s.astype(scale_dtype).astype(ct)
    frac = jnp.exp2(-jnp.arange(search, dtype=ct) / search).reshape((search,) + (1,) * x.ndim)
    cands = (s[None] * frac).astype(scale_dtype).astype(ct)           # [search, ...kept]
    err = jnp.sum((x[None] - pow2_decode(pow2_encode(x[None], cands, bits), cands, bits, ct))
                  ** 2, axis=axis if axis < 0 else axis + 1, keepdims=True)
    best = jnp.argmin(err, axis=0)[None]
    return jnp.take_along_axis(cands, best, axis=0)[0]


def pow2_encode(x: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
    """Nearest power-of-two codes of ``x`` (formula in the module docstring), int32.

    ``scale`` broadcasts against ``x``. Values beyond ``scale`` take the largest magnitude.
    """
    big = _max_field(bits)
    x = jnp.asarray(x)
    ct = jnp.promote_types(x.dtype, jnp.float32)
    r = jnp.abs(x.astype(ct)) / jnp.asarray(scale).astype(ct)
    f, e = jnp.frexp(r)
    k = e - 1 + (f >= 0.75).astype(e.dtype)
    m = jnp.clip(k + big, 1, big)
    # r >= 2^-M, written on the exponent (2^-127 is subnormal in float32, maybe flushed to 0)
    m = jnp.where((r > 0) & (e >= 1 - big), m, 0)
    sign = (x < 0).astype(jnp.int32)
    return jnp.where(m > 0, (sign << (bits - 1)) | m.astype(jnp.int32), 0).astype(jnp.int32)


def pow2_decode(codes: jax.Array, scale: jax.Array, bits: int, dtype=jnp.float32) -> jax.Array:
    """``value = (-1)^sign * scale * 2^(m - M)`` for ``m >= 1``, else 0 (module docstring).

    ``2^(m - M)`` is applied exactly (``jnp.ldexp``); ``scale`` broadcasts against ``codes``.
    """
    big = _max_field(bits)
    codes = codes.astype(jnp.int32)
    m = codes & big
    neg = (codes >> (bits - 1)) & 1
    ct = jnp.promote_types(jnp.dtype(dtype), jnp.float32)
    mag = jnp.ldexp(jnp.asarray(scale).astype(ct), m - big)
    return jnp.where(m > 0, jnp.where(neg == 1, -mag, mag), 0.0).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Pow2Grid:
    """The power-of-two grid as a per-column quantizer for ``jaxeff.params.gptq_solve_grid``.

    ``params(rows) = (scale,)`` with ``scale = max |rows|`` per column, or the best of
    ``search`` candidates (:func:`pow2_scale`); ``quantize(x, (scale,)) = (code, decode(code))``
    (:func:`pow2_encode` / :func:`pow2_decode`).
    """

    bits: int
    scale_dtype: Any = jnp.float32
    search: int = 1

    def params(self, rows):
        return (pow2_scale(rows, self.scale_dtype, axis=0, bits=self.bits,
                           search=self.search)[0],)

    def quantize(self, x, params):
        (scale,) = params
        code = pow2_encode(x, scale, self.bits)
        return code.astype(x.dtype), pow2_decode(code, scale, self.bits, x.dtype)


@flax.struct.dataclass
class Pow2Weight(StructuredWeight):
    """Packed power-of-two codes with per-group scales (layout: module docstring).

    ``materialize()`` returns ``W`` with ``W[..., perm[r], :] = decode(q[r], scale[r //
    group_size])``, cast to ``dtype``.
    """

    packed: jax.Array      # uint32 [..., ceil(IN/P), OUT]
    scale: jax.Array       # scale_dtype [..., G, OUT]
    perm: jax.Array        # int32 [..., IN]
    shape: tuple = flax.struct.field(pytree_node=False)
    dtype: str = flax.struct.field(pytree_node=False)
    bits: int = flax.struct.field(pytree_node=False)
    group_size: int = flax.struct.field(pytree_node=False)
    act_order: bool = flax.struct.field(pytree_node=False, default=False)
    layout: Optional[MatrixLayout] = flax.struct.field(pytree_node=False, default=None)

    trainable_fields: ClassVar[tuple[str, ...]] = ()

    @property
    def codes(self) -> jax.Array:
        """The codes ``int32 [..., IN, OUT]`` in stored (permuted) row order."""
        return unpack(self.packed, self.bits, self.shape[-2])

    def stored_matrix(self, dtype=jnp.float32) -> jax.Array:
        """The decoded matrix in stored row order, ``[..., IN, OUT]``."""
        n_in = self.shape[-2]
        scale = jnp.repeat(self.scale, self.group_size, axis=-2)[..., :n_in, :]
        return pow2_decode(self.codes, scale, self.bits, dtype)

    def materialize(self) -> jax.Array:
        """Dequantize: ``W[perm[r]] = decode(q[r], scale[r // group_size])`` (then
        ``layout.from_matrix`` when the dense leaf has another layout)."""
        w = _dequantize(self)
        return w if self.layout is None else self.layout.from_matrix(w)

    def apply(self, x: jax.Array, *, impl: Optional[str] = None,
              interpret: bool = False) -> jax.Array:
        """``y = x[..., perm] @ w_stored`` (the gather only with ``act_order``), by XLA.

        No shift kernel (module docstring): ``impl`` / ``interpret`` select nothing here.
        Result in ``x.dtype`` (float32 accumulation). Raises ValueError for a stacked leaf, a
        leaf with a ``layout`` or an ``x`` whose last axis is not IN.
        """
        del impl, interpret
        check_single_matrix(self, self.packed, x, self.shape[-2])
        if self.act_order:
            x = jnp.take(x, self.perm, axis=-1)
        w = self.stored_matrix(jnp.float32).astype(x.dtype)
        return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


register_rule(Pow2Weight, structured_rule(quantized_field_specs))


@jax.jit
def _dequantize(pw: Pow2Weight) -> jax.Array:
    w = pw.stored_matrix(jnp.float32)
    if pw.act_order:
        w = unpermute_rows(w, pw.perm)
    return w.astype(jnp.dtype(pw.dtype))


def _check_finite(w, what="w"):
    if not isinstance(w, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError(f"{what} holds NaN/inf values; power-of-two quantization needs a "
                         f"finite weight")


def pow2_rtn_weight(w: jax.Array, bits: int, group_size: Optional[int] = None, *,
                    pad: bool = False, scale_dtype=jnp.float32, search: int = 1) -> Pow2Weight:
    """Round-to-nearest power-of-two quantization of one (possibly stacked) ``w [..., IN, OUT]``.

    Per group of ``group_size`` input rows and output column: ``scale = max |w|``, each weight to
    the nearest of ``0, +-scale * 2^-j`` (module docstring; ShiftAddViT, You et al. 2023).
    Args: ``bits`` in {2, 3, 4, 8}; ``group_size`` (default None: one group over IN); ``pad``
    (default False: allow a ragged last group); ``scale_dtype`` (default float32); ``search``
    (default 1: the max scale; n > 1: the best of n scales over one octave, module docstring).
    Raises ``ValueError`` for bad arguments, a leaf with fewer than 2 axes or NaN/inf values.
    """
    w = jnp.asarray(w)
    if w.ndim < 2:
        raise ValueError(f"w must have at least 2 axes [..., IN, OUT]; got shape {w.shape}")
    gs = check_quant_args(bits, group_size, w.shape[-2], pad)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"w must be floating point; got dtype {w.dtype}")
    _check_finite(w)
    return _rtn_jit(w, bits=int(bits), gs=gs, scale_dtype=jnp.dtype(scale_dtype),
                    search=check_int("search", search, 1))


@functools.partial(jax.jit, static_argnames=("bits", "gs", "scale_dtype", "search"))
def _rtn_jit(w, *, bits, gs, scale_dtype, search) -> Pow2Weight:
    n_in = w.shape[-2]
    n_groups = -(-n_in // gs)
    # Zero rows pad the last group; they never change max |x| and encode to 0.
    xp = jnp.pad(w, [(0, 0)] * (w.ndim - 2) + [(0, n_groups * gs - n_in), (0, 0)])
    xg = xp.reshape(*w.shape[:-2], n_groups, gs, w.shape[-1])
    scale = pow2_scale(xg, scale_dtype, axis=-2, bits=bits, search=search)
    q = pow2_encode(xg, scale, bits).reshape(xp.shape)[..., :n_in, :]
    perm = jnp.broadcast_to(jnp.arange(n_in, dtype=jnp.int32), (*w.shape[:-2], n_in))
    return Pow2Weight(packed=pack(q, bits), scale=scale[..., 0, :].astype(scale_dtype), perm=perm,
                      shape=tuple(w.shape), dtype=jnp.dtype(w.dtype).name, bits=bits,
                      group_size=gs, act_order=False)


def pow2_rtn(params, bits: int, group_size: Optional[int] = None, select: Selector = None, *,
             pad: bool = False, scale_dtype=jnp.float32, search: int = 1, matrix_axes=None):
    """Round-to-nearest power-of-two quantize the selected matrices of any pytree.

    Each selected matrix becomes a :class:`Pow2Weight` (:func:`pow2_rtn_weight`); ``select``
    (default: the weight matrices) and ``matrix_axes`` as in ``jaxeff.params.rtn``.
    Raises ``ValueError`` as :func:`pow2_rtn_weight` and ``jaxeff.params.quantize_matrices``.
    """
    check_quant_args(bits, None, 1, pad)
    return quantize_matrices(
        params, lambda m: pow2_rtn_weight(m, bits, group_size, pad=pad, scale_dtype=scale_dtype,
                                          search=search), select, matrix_axes)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "stored_group_size",
                                             "block_size", "act_order", "scale_dtype", "search"))
def pow2_gptq_weight(w, h, percdamp=0.01, *, bits, group_size, stored_group_size,
                     block_size=128, act_order=False, scale_dtype=jnp.float32, search=1):
    """Jit-able error-feedback power-of-two quantization into ``(Pow2Weight, ok)``, unchecked.

    ``jaxeff.params.gptq_solve_grid`` with ``Pow2Grid(bits, scale_dtype, search)`` mapped over the
    leading axes (``map_solve``), then packed; arguments as ``jaxeff.params.gptq_weight``.
    Use :func:`pow2_gptq` outside ``jit``.
    """
    grid = Pow2Grid(int(bits), jnp.dtype(scale_dtype), int(search))
    solve = functools.partial(gptq_solve_grid, percdamp=percdamp, quantizer=grid,
                              group_size=group_size, block_size=block_size, act_order=act_order)
    codes, (scale,), perm, ok = map_solve(solve, w, h)
    pw = Pow2Weight(packed=pack(codes.astype(jnp.int32), bits), scale=scale.astype(scale_dtype),
                    perm=perm, shape=tuple(w.shape), dtype=jnp.dtype(w.dtype).name, bits=bits,
                    group_size=stored_group_size, act_order=act_order)
    return pw, ok


def pow2_gptq(w: jax.Array, h, bits: int, group_size: Optional[int] = None, *,
              block_size: int = 128, percdamp: float = 0.01, act_order: bool = False,
              pad: bool = False, scale_dtype=jnp.float32, search: int = 1,
              name: Optional[str] = None) -> Pow2Weight:
    """GPTQ-style error feedback onto the power-of-two grid: ``w [..., IN, OUT]`` -> Pow2Weight.

    GPTQ's solve (Frantar et al., 2023; ``jaxeff.params.gptq``'s module docstring) with each
    row rounded by :class:`Pow2Grid` (ShiftAddViT's shift weights, You et al. 2023) and its
    error fed forward through the inverse Hessian. Args and errors as ``jaxeff.params.gptq``
    (no ``sym``: the grid is symmetric by construction), plus ``search`` (default 1) as
    :func:`pow2_rtn_weight`, applied to each group's error-updated rows.
    """
    w, h, gs = check_gptq_inputs(w, h, bits, group_size, block_size, percdamp, pad, name)
    pw, ok = pow2_gptq_weight(w, h, percdamp, bits=int(bits), group_size=group_size,
                              stored_group_size=gs, block_size=int(block_size),
                              act_order=bool(act_order), scale_dtype=jnp.dtype(scale_dtype),
                              search=check_int("search", search, 1))
    check_ok(ok, percdamp, name)
    return pw
