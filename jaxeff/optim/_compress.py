"""Compressed optimizer states: block-wise int8 and FP8 E4M3 with dynamic range expansion.

Papers: "COAT: Compressing Optimizer States and Activation for Memory-Efficient FP8 Training"
(Xi et al., 2024) for FP8 E4M3 with Dynamic Range Expansion (DRE); "8-bit Optimizers via
Block-wise Quantization" (Dettmers et al., 2022) for block-wise absmax int8, the 8-bit state of
"GaLore" (Zhao et al., 2024).

Every compressed leaf is split into groups of ``g`` values (default 128). Per group, with
``a = |x|``, ``M = max a`` and ``Q`` the format's largest code (127 for int8, 448 for E4M3)::

    linear:      q = sign(x) * Q * a / M                         x^ = sign(q) * M * |q| / Q
    DRE:         m = min nonzero a,  R = M / m
                 k = floor(16 * log2(T) / log2(R)) / 16           (k = 1 when R <= 1 or all zero)
                 q = sign(x) * Q * (a / M)^k                      x^ = sign(q) * M * (|q| / Q)^(1/k)

``T = 448**2 / 2`` for E4M3 (COAT's constant) and ``T = 127`` for int8, so the smallest nonzero
value of a group lands on a nonzero code (signs and zeros are kept; int8 DRE codes of nonzero values
are kept off 0 also when the 1/16 floor of k bites, for groups spanning > 33 decades). COAT writes the same map with
a centre ``c = sqrt(M m)`` and scale ``s = (M/c)^k / Q``: since ``(|q| s)^(1/k) c = M (|q|/Q)^(1/k)``
we store ``M`` and ``k`` (8 bytes per group instead of 12); the codes are identical. q is clipped to
``[-Q, Q]`` before the cast (``float8_e4m3fn`` casts do not saturate: 449 becomes NaN) and int8
codes are rounded to nearest. Storage: 1 byte per value plus 4 (linear) or 8 (DRE) bytes per group.

Non-finite values (a deviation: bitsandbytes and COAT let one inf or NaN make its group's absmax
inf, so every value of the group decodes to NaN for ever after): ``M`` and ``m`` are taken over
the finite values only, and a group holding inf/NaN stores ``scale = -M`` (sign bit as the flag;
no extra bytes). In a flagged group the finite values are quantized as usual and then kept off the
top codes (codes rescaled to the range ``Q' = 126`` for int8, ``416`` for E4M3, decoded with
``M (Q/Q')^(1/k)`` in place of ``M``), and
the top codes mean ``±inf`` (int8 ``±127``, E4M3 ``±448``) and NaN (int8 ``-128``, E4M3 NaN); this
wraps ``jaxeff.kernels.group_quant`` (applied to the finite values), whose math is unchanged. Every value thus round-trips its own non-finiteness, exactly as an uncompressed state
keeps it: the state evolves like optax's, coordinate by coordinate (a 1e30 gradient makes Adam's
``nu`` inf, so that coordinate's updates are 0 after it, in both; an inf or NaN gradient makes
that coordinate's updates NaN, in both; the group's other values stay finite). A *finite*
outlier (e.g. ``mu = 1e29``) is a legitimate absmax: it coarsens the other values of its group
until it decays (inherent to absmax groups). Wrap in ``optax.apply_if_finite`` to skip
non-finite steps altogether (the compressed state is then left exactly as it was).

Layout: groups run over the smallest suffix of trailing axes whose size ``g`` divides, so the
leading axes (e.g. the stacked layer axis) stay intact and a leading-axis sharding survives
compression; codes are ``[..., G, g]``. The quantizer itself lives in ``jaxeff.kernels.group_quant``
(``group_quantize_reference`` is the math above; :func:`quantize` and so ``compress_state`` call its
dispatcher ``group_quantize``, whose Pallas kernel gives the same codes bit for bit). That module's
older ``quantize_int8`` / ``quantize_fp8`` flatten a whole tensor
instead; given this module's grouped view flattened to ``[-1, g]`` it produces the same groups and
the same codes (its int8 ``scale`` is ``absmax / 127``; rounding differs only at exact ties,
``tests/optim/test_compress_kernels.py``), so a fused GPU kernel can serve either.

:func:`compress_state` wraps any optax transform so that its floating-point state leaves are kept
compressed between steps and decompressed (to their original dtype) inside ``update``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxeff._checks import check_choice, check_int, check_same_shapes
from jaxeff.kernels import group_quant as _gq
from jaxeff.select import path_str, select_mask, select_values, strip_variables
from jaxeff.state_sharding import axis_names, register_rule

__all__ = ["GroupQuantized", "GroupQuantizedDRE", "CompressedState", "FORMATS", "group_quantize",
           "group_dequantize", "quantize", "dequantize", "dre_exponent", "compress_state",
           "quantize_state", "is_quantized", "quantize_like", "describe_state"]

FORMATS = ("none", "bf16", "int8", "fp8")
_QMAX = _gq.GROUP_QMAX
_QMAX_SPECIAL = {"int8": 126.0, "fp8": 416.0}  # flagged groups: the top codes are reserved


class GroupQuantized(NamedTuple):
    """Linear group quantization: ``codes`` int8 / float8_e4m3fn [..., G, g], ``scale`` = absmax of the finite
    values f32 [..., G] (negative: the group holds inf/NaN codes)."""
    codes: jax.Array
    scale: jax.Array


class GroupQuantizedDRE(NamedTuple):
    """DRE group quantization: ``codes`` [..., G, g], ``scale`` = absmax [..., G], exponent ``k`` [..., G]."""
    codes: jax.Array
    scale: jax.Array
    k: jax.Array


class CompressedState(NamedTuple):
    """State of :func:`compress_state`: the inner state with compressed leaves replaced."""
    inner: Any


def is_quantized(x) -> bool:
    """True for a :class:`GroupQuantized` or :class:`GroupQuantizedDRE` node."""
    return isinstance(x, (GroupQuantized, GroupQuantizedDRE))


def _check_fmt(fmt, argname="fmt", valid=FORMATS):
    if not isinstance(fmt, str):
        raise TypeError(f"{argname} must be one of {valid} (a str); got {fmt!r}")
    check_choice(argname, fmt, valid)


def dre_exponent(absmax, absmin, fmt: str = "fp8"):
    """COAT's expansion exponent ``k = floor(16 log2(T) / log2(absmax/absmin)) / 16``.

    ``absmin`` is the smallest nonzero magnitude of the group. ``k = 1`` where the ratio is
    ``<= 1`` (constant or all-zero groups); k is clipped to ``[1/16, 1024]`` (the upper bound keeps
    ``(a/M)^k`` away from f32 underflow for groups whose values agree to ~1e-6). A multiple of 1/16.
    Computed by ``jaxeff.kernels.group_quant.dre_exponent`` (the one home of this math).
    """
    _check_fmt(fmt, valid=tuple(_QMAX))
    return _gq.dre_exponent(absmax, absmin, fmt)


def group_quantize(x_GxS, fmt: str = "fp8", expand: bool = True):
    """Quantize groups along the last axis of ``x_GxS`` (f32): returns ``(codes, absmax, k)``.

    ``codes = sign(x) Q (|x|/M)^k`` clipped to ``[-Q, Q]`` then cast to int8 (rounded) or
    float8_e4m3fn; ``k`` is :func:`dre_exponent` when ``expand`` else ones. This is
    ``jaxeff.kernels.group_quant.group_quantize_reference``, the definition its Pallas kernel
    (``group_quantize_pallas``, Triton and Mosaic) reproduces bit for bit.

    Non-finite values keep codes of their own (module docstring): ``M`` is the absmax of the
    finite values and a group holding inf/NaN returns ``scale = -M``.

    Raises ValueError for a format other than 'int8' or 'fp8'.
    """
    _check_fmt(fmt, valid=tuple(_QMAX))
    return _with_specials(_gq.group_quantize_reference, x_GxS, fmt, expand)


def _with_specials(quant, x, fmt, expand):
    """``quant`` (the kernels' group quantizer) on the finite values; then inf/NaN codes and the
    negative-scale flag for the groups that hold them."""
    x = x.astype(jnp.float32)
    finite = jnp.isfinite(x)
    special = jnp.logical_not(jnp.all(finite, axis=-1))
    codes, mx, k = quant(jnp.where(finite, x, 0.0), fmt, expand)
    q = codes.astype(jnp.float32)
    top, keep = _QMAX[fmt], _QMAX_SPECIAL[fmt]
    # flagged groups use the range Q' (codes rescaled by Q'/Q: the group's absmax stays exact)
    rescaled = q * (keep / top)
    q = jnp.where(special[..., None], jnp.round(rescaled) if fmt == "int8" else rescaled, q)
    q = jnp.where(jnp.isinf(x), jnp.sign(x) * top, q)
    q = jnp.where(jnp.isnan(x), -128.0 if fmt == "int8" else jnp.nan, q)
    return q.astype(codes.dtype), jnp.where(special, -mx, mx), k


def group_dequantize(codes, absmax, k=None, fmt: str | None = None):
    """Inverse of :func:`group_quantize`: ``x^ = sign(q) M (|q|/Q)^(1/k)`` in f32 (k=None: linear).

    ``fmt`` defaults to the format implied by ``codes.dtype``. Raises ValueError on other dtypes.
    (``jaxeff.kernels.group_quant.group_dequantize``, on ``|absmax|``; a negative ``absmax``
    flags a group whose top codes mean ±inf and, for int8, -128 NaN.)
    """
    if fmt is None:
        fmt = ("int8" if codes.dtype == jnp.int8 else
               "fp8" if codes.dtype == jnp.float8_e4m3fn else None)
    if fmt not in _QMAX:
        raise ValueError(f"codes.dtype={codes.dtype}: expected int8 or float8_e4m3fn codes")
    m = jnp.abs(absmax)
    ratio = _QMAX[fmt] / _QMAX_SPECIAL[fmt]          # flagged groups were coded with Q' = Q/ratio
    m = jnp.where(jnp.signbit(absmax), m * (ratio if k is None else ratio ** (1.0 / k)), m)
    x = _gq.group_dequantize(codes, m, k, fmt)
    flag = jnp.signbit(absmax)[..., None]
    q = codes.astype(jnp.float32)
    x = jnp.where(flag & (jnp.abs(q) == _QMAX[fmt]), jnp.sign(q) * jnp.inf, x)
    if fmt == "int8":
        x = jnp.where(flag & (q == -128.0), jnp.nan, x)
    return x


def _grouping(shape, g):
    """(lead_shape, tail, pad): the smallest suffix of axes whose size is a multiple of g is grouped
    (leading axes stay intact so a leading-axis sharding survives); else everything, zero-padded."""
    for i in range(len(shape) - 1, -1, -1):
        tail = math.prod(shape[i:])
        if tail % g == 0:
            return tuple(shape[:i]), tail, 0
    tail = math.prod(shape)
    return (), tail, (-tail) % g


def _codes_shape(shape, g) -> tuple:
    """Shape of :func:`quantize`'s codes for a dense leaf of ``shape`` and group size ``g``."""
    lead, tail, pad = _grouping(tuple(shape), g)
    return lead + ((tail + pad) // g, g)


@register_rule(GroupQuantized)
@register_rule(GroupQuantizedDRE)
def _grouped_shardings(q, ctx):
    """Sharding (``jaxeff.state_sharding``) of a compressed moment of a param: codes
    ``[lead, G, g]`` and per-group ``scale`` / ``k`` ``[lead, G]`` keep the param's spec on the
    ``lead`` axes; when the param shards one of the grouped tail axes, the group axis ``G`` is
    sharded with it. That is exactly the param's layout when the sharded axis is the first grouped
    one; otherwise (e.g. a ``[D, V]`` head sharded on ``V`` and grouped as a whole) the layout
    differs and XLA re-shards the moment in every update (an all-to-all), which we prefer to a
    replicated moment. Codes that are not those of the param's shape: their children are walked."""
    info = ctx.param
    if info is None or _codes_shape(info.shape, q.codes.shape[-1]) != tuple(q.codes.shape):
        return ctx.children(q)
    lead = q.codes.ndim - 2
    names = tuple(n for e in info.spec[lead:] for n in axis_names(e))
    g_spec = None if not names else names[0] if len(names) == 1 else names
    per_group = ctx.sharding(q.scale.shape, info.spec[:lead] + (g_spec,))
    return q._replace(codes=ctx.sharding(q.codes.shape, info.spec[:lead] + (g_spec, None)),
                      **{f: per_group for f in q._fields if f != "codes"})


@register_rule(CompressedState)
def _compressed_shardings(s: CompressedState, ctx):
    """Sharding (``jaxeff.state_sharding``): the inner state is walked; its compressed leaves
    follow :func:`_grouped_shardings`, the others the inner state's own rules."""
    return s._replace(inner=ctx.walk(s.inner))


def quantize(x, fmt: str = "fp8", group_size: int = 128, expand: bool = True):
    """Compress an array into a :class:`GroupQuantized` / :class:`GroupQuantizedDRE` node.

    Groups of ``group_size`` consecutive values over the trailing axes (see module docstring for
    the formulas). Raises ValueError for a bad ``fmt`` or ``group_size``.
    """
    _check_fmt(fmt, valid=tuple(_QMAX))
    group_size = check_int("group_size", group_size, 1)
    lead, tail, pad = _grouping(x.shape, group_size)
    x = x.reshape(lead + (tail,))
    if pad:
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, pad)])
    x = x.reshape(lead + ((tail + pad) // group_size, group_size))
    # the dispatcher (kernel where it wins) on the finite values; specials around it
    codes, mx, k = _with_specials(_gq.group_quantize, x, fmt, expand)
    return GroupQuantizedDRE(codes, mx, k) if expand else GroupQuantized(codes, mx)


def dequantize(q, shape, dtype=jnp.float32):
    """Decompress a node made by :func:`quantize` back to ``shape`` and ``dtype``."""
    x = group_dequantize(q.codes, q.scale, q.k if isinstance(q, GroupQuantizedDRE) else None)
    lead, tail, _ = _grouping(tuple(shape), q.codes.shape[-1])
    x = x.reshape(lead + (-1,))[..., :tail]
    return x.reshape(shape).astype(dtype)


def quantize_like(node, x):
    """Compress ``x`` the way ``node`` (a :func:`quantize` result) was compressed: same format,
    group size and expansion; used to edit a compressed state in place (e.g. GaLore moment resets)."""
    fmt = "int8" if node.codes.dtype == jnp.int8 else "fp8"
    return quantize(x, fmt, node.codes.shape[-1], isinstance(node, GroupQuantizedDRE))


def _encode(x, fmt, group_size, expand):
    if fmt == "none":
        return x
    if fmt == "bf16":
        return x.astype(jnp.bfloat16)
    return quantize(x, fmt, group_size, expand)


def compress_state(inner: optax.GradientTransformation, fmt: Any = "fp8", *, group_size: int = 128,
                   expand: bool | None = None, min_size: int = 4096,
                   select=None) -> optax.GradientTransformationExtraArgs:
    """Keep ``inner``'s floating-point state leaves compressed between steps.

    ``update`` decompresses the state to its original dtype, runs ``inner.update`` (all moment
    arithmetic in the original precision, f32 for optax's moments) and compresses the new state::

        s = decode(state);  u, s' = inner.update(g, s, params, **extra);  state' = encode(s')

    Papers: COAT (Xi et al., 2024) for 'fp8' with ``expand``; 8-bit Optimizers via Block-wise
    Quantization (Dettmers et al., 2022) for 'int8'. Works around any optax transform
    (``scale_by_adam``, Sophia's scaling, ...) and as GaLore's inner transform (8-bit GaLore).

    Args:
      inner: the transform whose state is compressed.
      fmt: 'fp8' (E4M3, default), 'int8', 'bf16' or 'none' (identity, for testing); or a list of
        ``(regex, fmt)`` rules over the inner state's leaf paths (e.g. ``[('mu', 'fp8'),
        ('nu', 'int8')]``; unmatched leaves stay uncompressed).
      group_size: values per quantization group (default 128, COAT's ``qgroup_size``).
      expand: use Dynamic Range Expansion (default True for both 'fp8' and 'int8'). With
        ``expand=False`` 'int8' is plain absmax (bitsandbytes' linear variant), which flushes second
        moments below absmax/254 to zero; that is why DRE is the default for int8 too.
      min_size: leaves with fewer values stay uncompressed (default 4096, bitsandbytes' threshold).
      select: optional selector (``jaxeff.select`` convention) over the inner state's leaf paths;
        default: every floating-point leaf.

    Non-finite values keep their own codes (module docstring): the compressed state follows
    the uncompressed one coordinate by coordinate, and one inf/NaN never spreads over its group.

    Raises:
      TypeError: ``inner`` is not an optax transformation (e.g. None); a non-int ``group_size``
        / ``min_size``; a non-bool ``expand``.
      ValueError: unknown ``fmt``, ``group_size <= 0``, ``min_size < 0``, or a ``select`` that
        matches no state leaf (at ``init``).
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError("inner must be an optax.GradientTransformation (e.g. "
                        f"optax.scale_by_adam()); got {inner!r} ({type(inner).__name__})")
    rules = isinstance(fmt, (list, tuple))
    for i, f in enumerate([v for _, v in fmt] if rules else [fmt]):
        _check_fmt(f, f"fmt rule {i} value" if rules else "fmt")
    group_size = check_int("group_size", group_size, 1)
    min_size = check_int("min_size", min_size, 0)
    if expand is not None and not isinstance(expand, bool):
        raise TypeError(f"expand must be True, False or None (the default: True); got {expand!r}")
    inner = optax.with_extra_args_support(inner)

    def plan(state):
        """Per state leaf: the format to store it in (None: keep as is)."""
        fmts = select_values(fmt, state, argname="fmt", allow_empty=True, default=None)
        mask = select_mask(select, state, argname="select", allow_empty=select is None)

        def one(leaf, f, m):
            ok = (m and f not in (None, "none") and jnp.issubdtype(leaf.dtype, jnp.floating)
                  and math.prod(leaf.shape) >= min_size)
            return f if ok else None
        return jax.tree.map(one, state, fmts, mask)

    def encode(state):
        xs = plan(state)
        exp = {"int8": True, "fp8": True} if expand is None else {"int8": expand, "fp8": expand}
        return jax.tree.map(lambda x, f: x if f is None else _encode(x, f, group_size, exp.get(f)),
                            state, xs)

    def init_fn(params):
        # nnx.Optimizer inits on nnx.Variables: a Variable must not end up holding a compressed
        # node (a pytree), so the inner state is built on the plain arrays.
        return CompressedState(encode(inner.init(strip_variables(params))))

    def update_fn(updates, state, params=None, **extra_args):
        if params is not None:
            check_same_shapes("updates", updates, params, "params")
        like = params if params is not None else updates
        ref = jax.eval_shape(inner.init, like)
        # codes of one size reshape silently: the state must have been made for these shapes
        want = jax.tree_util.tree_flatten_with_path(jax.eval_shape(init_fn, like))[0]
        have = jax.tree.leaves(state)
        if len(want) == len(have):
            for (path, w), h in zip(want, have):
                if tuple(w.shape) != tuple(h.shape):
                    raise ValueError(
                        f"compress_state: the {'params' if params is not None else 'updates'} "
                        f"give state leaf {path_str(path)!r} the shape {tuple(w.shape)}, but "
                        f"the state holds {tuple(h.shape)}; was the gradient transposed, or "
                        "the state made for another tree?")
        decoded = jax.tree.map(
            lambda r, s: dequantize(s, r.shape, r.dtype) if is_quantized(s) else s.astype(r.dtype),
            ref, state.inner, is_leaf=is_quantized)
        new_updates, new_inner = inner.update(updates, decoded, params, **extra_args)
        return new_updates, CompressedState(encode(new_inner))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


quantize_state = compress_state  # the name TECHNIQUES.md §3 uses


def describe_state(state) -> dict:
    """Bytes of a (possibly abstract) state tree by dtype, for the memory study."""
    out: dict = {}
    for leaf in jax.tree.leaves(state):
        key = str(jnp.dtype(leaf.dtype))
        out[key] = out.get(key, 0) + math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
    return out
