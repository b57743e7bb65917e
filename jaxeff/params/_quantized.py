"""Low-bit quantized weights as a structured leaf, bit packing, and round-to-nearest (RTN).

The quantizer is the one of "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (Frantar et al., ICLR 2023) and its reference code (IST-DASLab ``quant.py``); RTN is
that quantizer without error feedback, the paper's baseline. ``jaxeff.params.gptq`` produces the
same leaf with error feedback.

Quantizer (per group of input rows, per output column; ``maxq = 2**bits - 1``)::

    xmin = min(min(x), 0)            xmax = max(max(x), 0)          (xmin = -1, xmax = 1 if both 0)
    symmetric:  xmax = max(|xmin|, xmax); xmin = -xmax;             zero = (maxq + 1) / 2
    asymmetric:                                                      zero = round(-xmin / scale)
    scale = (xmax - xmin) / maxq                                    (rounded to scale_dtype)
    q = clip(round(x / scale) + zero, 0, maxq)                      w_hat = (q - zero) * scale

Symmetric deviation from the reference: it keeps ``xmin = 0`` when a group has no negative entry,
so zero sits mid-range and half the codes go unused, clipping large positive values; we always set
``xmin = -xmax`` (differs only for all-non-negative groups).

Storage layout of :class:`QuantizedWeight` (the contract the Pallas dequantize-matmul in
``jaxeff.kernels`` consumes). The dense weight ``W`` has shape ``[..., IN, OUT]`` (``y = x @ W``,
flax convention); leading axes are a batch of independent matrices (stacked layers ``[L, IN, OUT]``)
and every array below carries the same leading axes.

* ``packed``: ``uint32 [..., ceil(IN / P), OUT]``, ``P = 32 // bits`` codes per word
  (bits 2 -> 16, 3 -> 10, 4 -> 8, 8 -> 4). Codes run **along the input dimension**: stored row
  ``r`` (``0 <= r < IN``) of output column ``n`` is ``(packed[r // P, n] >> (bits * (r % P))) &
  maxq``, i.e. little-endian within the word, the lowest bits hold the smallest ``r``. Unused high
  bits (3-bit: the top 2) and the padding codes of the last word (``r >= IN``) are 0.
* ``scale``: ``scale_dtype [..., G, OUT]`` and ``zero``: ``uint8 [..., G, OUT]`` with
  ``G = ceil(IN / group_size)``; **groups run along the input dimension**: stored row ``r`` uses
  group ``r // group_size`` (``group_size == IN`` when ungrouped, so ``G == 1``). With ``pad=True``
  the last group is ragged (it covers ``IN - (G-1) * group_size`` rows).
* ``perm``: ``int32 [..., IN]``: stored row ``r`` holds original input row ``perm[r]`` (identity
  unless ``act_order``; GPTQ's act-order stores rows in descending Hessian-diagonal order so that
  groups stay contiguous). Dequantization::

      w_stored[r, n] = (q[r, n] - zero[r // group_size, n]) * scale[r // group_size, n]   (float32)
      W[perm[r], n] = w_stored[r, n]                       then cast to ``dtype``

  so a kernel computes ``y = x[..., perm] @ w_stored`` (skip the gather when ``act_order`` is
  False).
* static fields: ``shape`` (dense shape), ``dtype`` (dense dtype name), ``bits``,
  ``group_size``, ``act_order``.

For bits 2/4/8 and ``IN`` a multiple of ``P``, ``packed`` is GPTQ's ``qweight`` layout with OUT
last (what ``jaxeff.kernels``' dequantize-matmul takes; pass ``zero`` as float). 3-bit words hold
10 codes and never straddle words (unlike GPTQ's 32-codes-in-3-words packing).

Slicing a stacked leaf (``lax.scan``/``vmap`` over it) does not update the static ``shape``;
``materialize`` the tree first (``jaxeff.params.materialize``).
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.kernels import dequant_matmul as _dq
from jaxeff.params._structured import (StructuredWeight, array_fields, is_structured,
                                       structured_rule)
from jaxeff.select import (MatrixLayout, Selector, flatten_with_paths, is_weight_matrix,
                           matrix_axes_values, select_mask)
from jaxeff.state_sharding import axis_names, register_rule

__all__ = ["QuantizedWeight", "VALID_BITS", "codes_per_word", "pack", "unpack", "find_params",
           "quantize_codes", "rtn_weight", "rtn", "quantize_matrices", "stack_quantized",
           "tree_nbytes", "check_quant_args", "quantized_field_specs", "unpermute_rows"]

VALID_BITS = (2, 3, 4, 8)


def codes_per_word(bits: int) -> int:
    """Codes per ``uint32`` word: ``32 // bits``."""
    _check_bits(bits)
    return 32 // bits


def _check_bits(bits):
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in VALID_BITS:
        raise ValueError(f"bits must be one of {VALID_BITS}; got {bits!r}")


def check_quant_args(bits, group_size, in_dim: int, pad: bool) -> int:
    """Validate ``bits``/``group_size``/``pad`` for an input dimension; return the group size.

    Returns ``in_dim`` when ``group_size`` is None (one group per output column). Raises
    ``ValueError`` for bits outside {2, 3, 4, 8}, a non-positive group size, or a group size that
    does not divide ``in_dim`` unless ``pad`` (then the last group is ragged).
    """
    _check_bits(bits)
    if group_size is None:
        return int(in_dim)
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) \
            or group_size <= 0:
        raise ValueError(f"group_size must be None or a positive int; got {group_size!r}")
    if in_dim % group_size and not pad:
        raise ValueError(
            f"group_size={group_size} does not divide the input dimension {in_dim}; pick a "
            f"divisor of {in_dim}, group_size=None, or pass pad=True for a ragged last group")
    return int(group_size)


@flax.struct.dataclass
class QuantizedWeight(StructuredWeight):
    """Packed low-bit codes with per-group scales and zero points (layout: module docstring).

    ``materialize()`` returns ``W`` with ``W[..., perm[r], :] = (q[r] - zero[g]) * scale[g]``,
    ``g = r // group_size``, cast to ``dtype``.
    """

    packed: jax.Array      # uint32 [..., ceil(IN/P), OUT]
    scale: jax.Array       # scale_dtype [..., G, OUT]
    zero: jax.Array        # uint8 [..., G, OUT]
    perm: jax.Array        # int32 [..., IN]
    shape: tuple = flax.struct.field(pytree_node=False)
    dtype: str = flax.struct.field(pytree_node=False)
    bits: int = flax.struct.field(pytree_node=False)
    group_size: int = flax.struct.field(pytree_node=False)
    act_order: bool = flax.struct.field(pytree_node=False, default=False)
    # The dense leaf's matrix view when it is not [..., IN, OUT] (``rtn(matrix_axes=...)``, flax
    # attention kernels): ``shape`` is then the matrix shape and ``materialize`` maps back.
    layout: Optional[MatrixLayout] = flax.struct.field(pytree_node=False, default=None)

    # Post-training codes: nothing here trains (jaxeff.params.trainable_mask).
    trainable_fields: ClassVar[tuple[str, ...]] = ()

    @property
    def codes(self) -> jax.Array:
        """The integer codes ``int32 [..., IN, OUT]`` in stored (permuted) row order."""
        return unpack(self.packed, self.bits, self.shape[-2])

    def materialize(self) -> jax.Array:
        """Dequantize: ``W[perm[r]] = (q[r] - zero[r // group_size]) * scale[r // group_size]``
        (then ``layout.from_matrix`` when the dense leaf has another layout)."""
        w = _dequantize(self)
        return w if self.layout is None else self.layout.from_matrix(w)

    def apply(self, x: jax.Array, *, impl: Optional[str] = None,
              interpret: bool = False) -> jax.Array:
        """``y = x @ W`` without a dense ``W`` where the dequantize-matmul kernel applies.

        ``y = x[..., perm] @ w_stored`` (the gather only with ``act_order``) through
        ``jaxeff.kernels.quant_matmul`` for bits 2/4/8 with IN a multiple of ``32 // bits``
        and of ``group_size``; other layouts (3-bit, ragged groups) dequantize the stored
        matrix and use XLA. The leaf must hold one matrix (arrays ``packed [W, OUT]``: an
        unstacked leaf or a layer sliced by ``lax.scan``). Result in ``x.dtype``. Only ``x``
        gets a gradient (codes are post-training constants).
        Raises ValueError for a stacked leaf, a leaf with a ``layout`` (``matrix_axes``), an
        ``x`` whose last axis is not IN, or ``impl='pallas'`` on a layout the kernel does not
        take.
        """
        n_in = self.shape[-2]
        if self.layout is not None:
            raise ValueError(f"QuantizedWeight.apply needs the default [..., IN, OUT] layout; this "
                             f"leaf was quantized with matrix_axes (in_axes="
                             f"{self.layout.in_axes}, out_axes={self.layout.out_axes}): use "
                             f"x @ materialize(w) with the leaf's own contraction")
        if self.packed.ndim != 2:
            raise ValueError(f"QuantizedWeight.apply needs one matrix; packed has shape "
                             f"{self.packed.shape} (slice the stacked axis first, as lax.scan "
                             f"does)")
        if x.shape[-1] != n_in:
            raise ValueError(f"QuantizedWeight.apply: x has last axis {x.shape[-1]}, the weight "
                             f"has IN={n_in}")
        if self.act_order:
            x = jnp.take(x, self.perm, axis=-1)
        fits = self.bits in _dq.BITS and n_in % (32 // self.bits) == 0 \
            and n_in % self.group_size == 0
        if fits:
            return _dq.quant_matmul(x, self.packed, self.scale, self.zero.astype(jnp.float32),
                                    bits=self.bits, group_size=self.group_size, impl=impl,
                                    interpret=interpret)
        if impl == "pallas":
            raise ValueError(f"QuantizedWeight.apply: impl='pallas' needs bits in {_dq.BITS} and "
                             f"IN={n_in} a multiple of 32 // bits and of group_size="
                             f"{self.group_size}; got bits={self.bits}")
        w = _stored_matrix(self, x.dtype)
        return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def quantized_field_specs(w, dense_spec, b, in_spec, out_spec, mesh):
    """Sharding (``jaxeff.state_sharding``) from the dense ``[..., IN, OUT]`` spec: ``packed
    [b, IN/P, OUT]`` and ``scale`` / ``zero [b, G, OUT]`` keep the ``OUT`` spec and shard their
    packed / grouped ``IN`` axis as the dense ``IN`` only when every shard holds whole words /
    groups (else that axis is replicated); ``perm [b, IN]`` shards ``IN``. Serves every packed
    layout with these fields (``QuantizedWeight``, ``Pow2Weight``: fields it lacks are unused)."""
    names = axis_names(in_spec)
    size = math.prod(mesh.shape.get(n, 0) for n in names) if names else 0
    n_in = w.shape[-2]

    def whole(unit):
        return in_spec if size and n_in % size == 0 and (n_in // size) % unit == 0 else None

    return dict(packed=b + (whole(codes_per_word(w.bits)), out_spec),
                scale=b + (whole(w.group_size), out_spec),
                zero=b + (whole(w.group_size), out_spec), perm=b + (in_spec,))


register_rule(QuantizedWeight, structured_rule(quantized_field_specs))


@jax.jit
def _dequantize(qw: QuantizedWeight) -> jax.Array:
    # jit so that eager calls compile once per layout instead of once per primitive.
    w = _stored_matrix(qw, jnp.float32)
    if qw.act_order:
        w = unpermute_rows(w, qw.perm)
    return w.astype(jnp.dtype(qw.dtype))


def unpermute_rows(w_stored: jax.Array, perm: jax.Array) -> jax.Array:
    """Original row order from stored order: ``W[..., perm[r], :] = w_stored[..., r, :]``."""
    inv = jnp.argsort(perm, axis=-1)
    return jnp.take_along_axis(w_stored, inv[..., :, None], axis=-2)


def _stored_matrix(qw: QuantizedWeight, dtype) -> jax.Array:
    """``(q - zero) * scale`` in stored row order (``jaxeff.kernels.dequantize``)."""
    return _dq.dequantize(qw.packed, qw.scale, qw.zero, qw.bits, qw.group_size, dtype,
                          n=qw.shape[-2])


@functools.partial(jax.jit, static_argnames=("bits",))
def pack(codes: jax.Array, bits: int) -> jax.Array:
    """Pack codes ``[..., N, OUT]`` in ``[0, 2**bits)`` into ``uint32 [..., ceil(N/P), OUT]``.

    Word ``k`` holds rows ``k*P .. k*P+P-1`` with row ``r`` at bit offset ``bits * (r % P)``,
    ``P = 32 // bits``; padding codes are 0 (``jaxeff.kernels.pack_codes``). Raises
    ``ValueError`` for bad ``bits`` or fewer than 2 axes.
    """
    codes_per_word(bits)
    if codes.ndim < 2:
        raise ValueError(f"codes must have at least 2 axes [..., N, OUT]; got shape {codes.shape}")
    return _dq.pack_codes(codes, bits)


@functools.partial(jax.jit, static_argnames=("bits", "n"))
def unpack(packed: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of :func:`pack`: ``uint32 [..., W, OUT]`` -> ``int32 [..., n, OUT]``.

    Raises ``ValueError`` when ``n`` exceeds the packed capacity ``W * (32 // bits)``.
    """
    per = codes_per_word(bits)
    if n > packed.shape[-2] * per or n < 0:
        raise ValueError(f"n={n} rows do not fit {packed.shape[-2]} words of {per} codes")
    return _dq.unpack_codes(packed, bits, n)


def find_params(x: jax.Array, bits: int, sym: bool = False, scale_dtype=jnp.float32,
                axis: int = -2):
    """Scale and zero point of the GPTQ quantizer for ``x`` reduced over ``axis``.

    Formula in the module docstring (computed by ``jaxeff.kernels.dequant_matmul.find_params``).
    Returns ``(scale, zero)`` as float32 (``scale`` already rounded to ``scale_dtype``, ``zero``
    an integer in ``[0, maxq]``), with ``axis`` kept.
    """
    return _dq.find_params(x, bits, sym, scale_dtype, axis)


def quantize_codes(x, scale, zero, bits: int):
    """``q = clip(round(x / scale) + zero, 0, maxq)`` (float, integer-valued)."""
    return _dq.quantize_codes(x, scale, zero, bits)


def rtn_weight(w: jax.Array, bits: int, group_size: Optional[int] = None, *, sym: bool = False,
               pad: bool = False, scale_dtype=jnp.float32) -> QuantizedWeight:
    """Round-to-nearest quantization of one (possibly stacked) matrix ``w [..., IN, OUT]``.

    Each group of ``group_size`` input rows of each output column gets its own scale/zero
    (GPTQ quantizer, module docstring); no error feedback. Args: ``bits`` in {2, 3, 4, 8};
    ``group_size`` (default None = one group over the whole input dim); ``sym`` (default False);
    ``pad`` (default False: allow a ragged last group); ``scale_dtype`` (default float32).
    Raises ``ValueError`` for bad arguments or a leaf with fewer than 2 axes.
    """
    w = jnp.asarray(w)
    if w.ndim < 2:
        raise ValueError(f"w must have at least 2 axes [..., IN, OUT]; got shape {w.shape}")
    gs = check_quant_args(bits, group_size, w.shape[-2], pad)
    return _rtn_jit(w, bits=int(bits), gs=gs, sym=bool(sym), scale_dtype=jnp.dtype(scale_dtype))


@functools.partial(jax.jit, static_argnames=("bits", "gs", "sym", "scale_dtype"))
def _rtn_jit(w, *, bits, gs, sym, scale_dtype) -> QuantizedWeight:
    n_in = w.shape[-2]
    n_groups = -(-n_in // gs)
    x = w.astype(jnp.promote_types(w.dtype, jnp.float32))
    # Zero rows pad the last group; they never change min(x, 0) / max(x, 0).
    xp = jnp.pad(x, [(0, 0)] * (w.ndim - 2) + [(0, n_groups * gs - n_in), (0, 0)])
    xg = xp.reshape(*w.shape[:-2], n_groups, gs, w.shape[-1])
    scale, zero = find_params(xg, bits, sym, scale_dtype, axis=-2)
    q = quantize_codes(xg, scale, zero, bits).reshape(xp.shape)[..., :n_in, :]
    batch = w.shape[:-2]
    perm = jnp.broadcast_to(jnp.arange(n_in, dtype=jnp.int32), (*batch, n_in))
    return QuantizedWeight(
        packed=pack(q.astype(jnp.int32), bits), scale=scale[..., 0, :].astype(scale_dtype),
        zero=zero[..., 0, :].astype(jnp.uint8), perm=perm, shape=tuple(w.shape),
        dtype=jnp.dtype(w.dtype).name, bits=int(bits), group_size=gs, act_order=False)


def rtn(params, bits: int, group_size: Optional[int] = None, select: Selector = None, *,
        sym: bool = False, pad: bool = False, scale_dtype=jnp.float32, matrix_axes=None):
    """Round-to-nearest quantize the selected matrices of any pytree into :class:`QuantizedWeight`s.

    The RTN baseline of the GPTQ paper (Frantar et al., 2023): ``q = clip(round(w / scale) + zero,
    0, 2**bits - 1)`` per group of input rows. ``select`` follows ``jaxeff.select`` (regex over
    the ``/``-joined path, predicate, pytree of bools); the default None takes the weight
    matrices (``jaxeff.select.is_weight_matrix``: floating leaves with >= 2 axes that are not
    biases, norm scales or embedding tables). ``matrix_axes`` (per-leaf ``(in_axes, out_axes)``
    or a flax NNX module; default ``MatrixLayout.for_leaf``: flax attention kernels ``[D, H, hd]``
    as one ``D x (H*hd)`` matrix, otherwise ``[..., IN, OUT]``) says which axes are the input
    (grouped, packed) and output of each matrix. Paths ignore ``nnx.Variable`` wrappers, so an
    ``nnx.state(model, nnx.Param)`` quantizes like a dict. Other args as :func:`rtn_weight`.

    Raises ``ValueError`` when ``select`` matches no leaf, when an explicitly selected leaf is not
    a floating array with at least 2 axes, for bad ``bits``/``group_size`` or bad ``matrix_axes``.
    """
    _check_bits(bits)
    return quantize_matrices(
        params, lambda m: rtn_weight(m, bits, group_size, sym=sym, pad=pad,
                                     scale_dtype=scale_dtype), select, matrix_axes)


def quantize_matrices(params, quantize, select: Selector = None, matrix_axes=None):
    """Replace each selected matrix of ``params`` by ``quantize(matrix [..., IN, OUT])``.

    The tree walk of :func:`rtn` (and ``jaxeff.params.pow2_rtn``): ``select`` / ``matrix_axes``
    as there; a leaf whose matrix view is not its own layout is quantized in matrix form and the
    result gets ``layout`` (a structured weight with a ``layout`` field maps back in
    ``materialize``). Raises ``ValueError`` when ``select`` matches no leaf, or an explicitly
    selected leaf is not a floating array with at least 2 axes.
    """
    mask = select_mask(is_weight_matrix if select is None else select, params,
                       is_leaf=is_structured)
    flat, treedef = flatten_with_paths(params, is_leaf=is_structured)
    flat_mask = treedef.flatten_up_to(mask)
    axes = matrix_axes_values(matrix_axes, params, is_leaf=is_structured)
    out, n_done = [], 0
    for (path, leaf), sel, ax in zip(flat, flat_mask, axes):
        is_mat = (hasattr(leaf, "ndim") and not is_structured(leaf) and leaf.ndim >= 2
                  and jnp.issubdtype(leaf.dtype, jnp.floating))
        if sel and not is_mat:
            raise ValueError(
                f"select={select!r} picks leaf {path!r} "
                f"({getattr(leaf, 'shape', type(leaf).__name__)}), which is not a floating "
                f"matrix with at least 2 axes")
        if sel:
            lay = MatrixLayout.for_leaf(path, leaf.shape, ax)
            plain = lay == MatrixLayout.default(leaf.shape)
            qw = quantize(leaf if plain else lay.to_matrix(leaf))
            out.append(qw if plain else qw.replace(layout=lay))
            n_done += 1
        else:
            out.append(leaf)
    if n_done == 0:
        raise ValueError(f"select={select!r} matches no floating matrix leaf")
    return jax.tree_util.tree_unflatten(treedef, out)


def stack_quantized(leaves: Sequence[StructuredWeight]) -> StructuredWeight:
    """Stack same-config packed leaves along a new axis 0 (shape ``[n, *shape]``).

    Leaves are :class:`QuantizedWeight`s or ``Pow2Weight``s, all of one class; every array field
    is stacked. Raises ``ValueError`` when the leaves differ in class, shape, dtype, bits, group
    size or act-order, or carry a ``layout``.
    """
    if not leaves:
        raise ValueError("stack_quantized needs at least one leaf")
    first = leaves[0]
    if not (is_structured(first) and hasattr(first, "packed")):
        raise ValueError(f"stack_quantized needs QuantizedWeight / Pow2Weight leaves; leaves[0] "
                         f"is {type(first).__name__}")
    if any(getattr(q, "layout", None) is not None for q in leaves):
        raise ValueError("stack_quantized needs [..., IN, OUT] leaves (layout None); quantize the "
                         "stacked dense leaf instead")
    key = lambda q: (type(q).__name__, q.shape, q.dtype, q.bits, q.group_size,  # noqa: E731
                     q.act_order)
    for i, q in enumerate(leaves):
        if type(q) is not type(first) or key(q) != key(first):
            raise ValueError(f"leaves[{i}] does not match leaves[0]: "
                             f"{key(q) if type(q) is type(first) else type(q).__name__} vs "
                             f"{key(first)}")
    return first.replace(**{f: jnp.stack([getattr(q, f) for q in leaves])
                            for f in array_fields(first)}, shape=(len(leaves), *first.shape))


def tree_nbytes(tree) -> int:
    """Bytes held by the arrays of a pytree (packed codes, scales, zeros, perms, dense leaves)."""
    return int(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree) if hasattr(x, "shape")))
