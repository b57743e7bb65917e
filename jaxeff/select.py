"""One selector convention for every jaxeff transform, and the one view of a leaf as a matrix.

Which leaves a transform touches, and with which per-leaf setting, is given the same way
everywhere (DESIGN.md, "One selector convention"):

* a **regex** string, matched with ``re.search`` against the leaf's ``/``-joined key path
  (e.g. ``"layers/(wq|wk|wv|wo|w_up|w_gate|w_down)$"``);
* a **predicate** ``(path: str, leaf) -> bool``;
* a **pytree of bools** with the same structure as the tree;
* ``None`` or ``True``: every leaf; ``False``: none.

Per-leaf *values* (a rank, a refresh gap, a projection type) use :func:`select_values`: a single
value for every selected leaf, an ordered list of ``(regex, value)`` rules (first match wins,
``None`` = leave the leaf alone), a callable ``(path, leaf) -> value | None`` or a pytree of values.

Paths (one per leaf, flax NNX included)
---------------------------------------
A leaf's path joins its keys with ``/`` (dict keys, attribute names, sequence indices:
``"layers/0/attn/query/kernel"``). **A leaf has one path whether or not it sits in a
``flax.nnx.Variable``**: ``nnx.Optimizer`` calls ``tx.init`` on ``nnx.State`` holding
``nnx.Param`` objects (whose own pytree key is an attribute ``value``, so JAX's key path ends in
``.../kernel/value``) and ``tx.update`` on the same tree of plain arrays (``.../kernel``). We drop
the component that comes from the Variable wrapper -- found by the node's type
(``isinstance(node, nnx.Variable)``), never by the string, so a real submodule named ``value``
(``nnx.MultiHeadAttention``'s ``attn/value/kernel``) keeps its name. Every jaxeff transform
(GaLore, compress_state, pruning, layer-wise lr, parameter EMA, weight-decay masks, SLTrain, LoRA,
low-rank, RTN, GPTQ) resolves paths through :func:`flatten_with_paths`, so ``select=r"kernel$"``
means the same at init and at update. (Checked with flax 0.12.8: a ``Variable`` flattens to one
child with key ``GetAttrKey('value')``.) flax is only consulted when already imported.

Matrices: which leaves, and which axes
--------------------------------------
Transforms that factor or project matrices (GaLore, SLTrain, LoRA, low-rank, SVFit, RTN, GPTQ)
select :func:`is_weight_matrix` leaves by default: floating leaves with >= 2 axes whose path names
no bias, norm or embedding (:data:`NOT_A_MATRIX`). Override with ``select=`` (any selector; e.g.
``select=lambda p, x: is_weight_matrix(p, x) and "head" not in p``).

A leaf is viewed as a batch of ``m x n`` matrices by a :class:`MatrixLayout` (``in_axes`` merged
into ``m``, ``out_axes`` into ``n``, other axes batch). Every such transform takes the same argument
**``matrix_axes``**: a per-leaf :func:`select_values` spec of ``(in_axes, out_axes)`` pairs (ints or
tuples of ints), or a flax NNX module (its layouts are read by :func:`flax_matrix_axes`). Without
it, :meth:`MatrixLayout.for_leaf` applies the default rule:

* ``.../(query|key|value)/kernel`` with >= 3 axes (``nnx.MultiHeadAttention``, ``[..., D, H, hd]``):
  one ``D x (H*hd)`` matrix, ``in_axes=(-3,)``, ``out_axes=(-2, -1)``;
* ``.../out/kernel`` with >= 3 axes (MHA's ``[..., H, hd, D]``): ``(H*hd) x D``;
* anything else (``nnx.Linear``'s ``[in, out]``, stacked ``[L, in, out]``): the last two axes,
  leading axes batch.

``nnx.Einsum`` kernels (and ``nnx.LinearGeneral`` with other feature axes) carry their layout in
the module, not in the state: pass ``matrix_axes=model`` (or ``flax_matrix_axes(model)``) and the
einsum equation decides. A fractional rank (``rank=0.25``) is a fraction of ``min(m, n)`` of the
real matrix (:func:`resolve_rank`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

Selector = Union[None, bool, str, Callable[[str, Any], bool], Any]

__all__ = ["path_str", "paths", "flatten_with_paths", "strip_variables", "select_mask",
           "select_values", "matrix_shape", "count_selected", "NOT_A_MATRIX", "is_weight_matrix", "MatrixLayout",
           "matrix_axes_values", "flax_matrix_axes", "resolve_rank"]


def _key_name(k) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return str(k.name)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_str(path) -> str:
    """Join a ``jax.tree_util`` key path into ``"a/b/0/c"`` (no Variable handling: use
    :func:`flatten_with_paths` for a tree's paths)."""
    return "/".join(_key_name(k) for k in path)


def _variable_type():
    """``flax.nnx.Variable`` when flax NNX is imported (a tree cannot hold one otherwise)."""
    mod = sys.modules.get("flax.nnx")
    return getattr(mod, "Variable", None) if mod is not None else None


def flatten_with_paths(tree, is_leaf=None) -> tuple[list[tuple[str, Any]], Any]:
    """``([(path, leaf), ...], treedef)`` in ``jax.tree.flatten`` order, with one path per leaf.

    The path is the ``/``-joined key path without the component that comes from a
    ``flax.nnx.Variable`` wrapper (see the module docstring): an ``nnx.Param`` holding an array at
    ``attn/value/kernel`` has path ``attn/value/kernel``, as the bare array has. ``treedef`` is
    ``jax.tree.structure(tree, is_leaf)`` (Variables included), so results unflatten into the
    structure of ``tree``.
    """
    var = _variable_type()
    if var is None:
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
        return [(path_str(p), x) for p, x in flat], treedef

    def user_leaf(x):
        return is_leaf is not None and is_leaf(x)

    outer, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, var) or user_leaf(x))
    out = []
    for p, x in outer:
        if isinstance(x, var) and not user_leaf(x):
            base = path_str(p)
            kids, _ = jax.tree_util.tree_flatten_with_path(x, is_leaf=is_leaf)
            for q, y in kids:
                # q[0] is the Variable's own child key (GetAttrKey('value') in flax 0.12); what
                # follows is the structure of the value it holds (e.g. a structured weight).
                rest = path_str(q[1:])
                out.append((base + "/" + rest if rest and base else base or rest, y))
        else:
            out.append((path_str(p), x))
    return out, jax.tree.structure(tree, is_leaf=is_leaf)


def strip_variables(tree):
    """``tree`` with every ``flax.nnx.Variable`` replaced by the value it holds (the structure
    ``nnx.Optimizer`` passes to ``tx.update``); other trees are returned unchanged.

    For states whose leaves become pytrees (compressed moments): a Variable must hold an array,
    not a pytree, for ``nnx.Optimizer`` to write the state back.
    """
    var = _variable_type()
    if var is None:
        return tree
    return jax.tree.map(lambda x: x.get_value() if isinstance(x, var) else x, tree,
                        is_leaf=lambda x: isinstance(x, var))


def paths(tree, is_leaf=None) -> list[str]:
    """The paths of every leaf of ``tree``, in flatten order (:func:`flatten_with_paths`)."""
    return [p for p, _ in flatten_with_paths(tree, is_leaf)[0]]


def _compile(pattern: str, argname: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{argname}={pattern!r} is not a valid regex: {e}") from None


def select_mask(select: Selector, tree, *, argname: str = "select", allow_empty: bool = False,
                is_leaf=None):
    """Resolve a selector into a pytree of Python bools with the structure of ``tree``.

    Paths are those of :func:`flatten_with_paths` (flax Variables add no component).
    Raises ``ValueError`` naming ``argname`` when the selector matches no leaf (unless
    ``allow_empty``), and ``TypeError`` for a selector of an unsupported type.
    """
    flat, treedef = flatten_with_paths(tree, is_leaf)
    if select is None or select is True:
        bools = [True] * len(flat)
    elif select is False:
        bools = [False] * len(flat)
    elif isinstance(select, str):
        rx = _compile(select, argname)
        bools = [bool(rx.search(p)) for p, _ in flat]
    elif callable(select) and not _is_pytree_of_bools(select):
        bools = [bool(select(p, leaf)) for p, leaf in flat]
    else:
        try:
            sel_flat = treedef.flatten_up_to(select)
        except (ValueError, TypeError) as e:
            raise TypeError(
                f"{argname} must be a regex string, a predicate (path, leaf) -> bool, or a pytree "
                f"of bools with the tree's structure; got {type(select).__name__} that does not "
                f"match the tree: {e}") from None
        bools = []
        for s in sel_flat:
            if not isinstance(s, bool):
                raise TypeError(f"{argname} pytree must hold Python bools; got {type(s).__name__}")
            bools.append(s)
    if not allow_empty and flat and not any(bools):
        raise ValueError(
            f"{argname}={_describe(select)} matches no leaf; leaf paths are: "
            f"{', '.join(p for p, _ in flat[:12])}{' ...' if len(flat) > 12 else ''}")
    return jax.tree_util.tree_unflatten(treedef, bools)


def _is_pytree_of_bools(x) -> bool:
    leaves = jax.tree_util.tree_leaves(x)
    return bool(leaves) and all(isinstance(v, bool) for v in leaves) and not isinstance(x, bool)


def _describe(select) -> str:
    if isinstance(select, str):
        return repr(select)
    if callable(select):
        return getattr(select, "__name__", "predicate")
    return type(select).__name__


def select_values(spec, tree, *, argname: str, default=None, allow_empty: bool = False,
                  is_leaf=None):
    """Resolve a per-leaf value spec into a pytree of values (``default`` where unset).

    ``spec`` is one of: a list/tuple of ``(regex, value)`` rules (first match wins); a callable
    ``(path, leaf) -> value | None``; a pytree of values with the tree's structure; or a plain
    value applied to every leaf. Raises ``ValueError`` naming ``argname`` when no leaf gets a
    value (unless ``allow_empty``).
    """
    return jax.tree_util.tree_unflatten(
        *reversed(_flat_values(spec, tree, argname=argname, default=default,
                               allow_empty=allow_empty, is_leaf=is_leaf)))


def _flat_values(spec, tree, *, argname, default=None, allow_empty=False, is_leaf=None):
    """``(treedef, [value per leaf])`` for :func:`select_values` (values may be tuples)."""
    flat, treedef = flatten_with_paths(tree, is_leaf)
    if isinstance(spec, (list, tuple)) and all(
            isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str) for r in spec):
        rules = [(_compile(rx, argname), v) for rx, v in spec]
        vals = [next((v for rx, v in rules if rx.search(p)), default) for p, _ in flat]
    elif callable(spec):
        vals = [spec(p, leaf) for p, leaf in flat]
        vals = [default if v is None else v for v in vals]
    else:
        try:
            vals = treedef.flatten_up_to(spec)
        except (ValueError, TypeError):
            vals = [spec] * len(flat)
    if not allow_empty and flat and all(v is None for v in vals):
        raise ValueError(f"{argname}={_describe(spec)} gives no leaf a value; leaf paths are: "
                         f"{', '.join(p for p, _ in flat[:12])}")
    return vals, treedef


def matrix_shape(shape: Sequence[int]) -> tuple[tuple[int, ...], int, int]:
    """Split a leaf shape into ``(batch_shape, m, n)``: the matrix is the last two axes."""
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"a matrix leaf needs at least 2 axes; got shape {shape}")
    return shape[:-2], shape[-2], shape[-1]


def count_selected(mask) -> int:
    """Number of ``True`` leaves in a resolved mask."""
    return sum(bool(b) for b in jax.tree_util.tree_leaves(mask))


# ---------------------------------------------------------------------------------------------
# Weight matrices: the default selection of matrix transforms
# ---------------------------------------------------------------------------------------------

NOT_A_MATRIX = (r"(?i)(^|/)([^/]*bias[^/]*|[^/]*norm[^/]*|ln(_?[a-z0-9]+)?|scale"
                r"|[^/]*embed[^/]*|[^/]*_emb|emb|wte|wpe)(/|$)")
"""Regex over a leaf path: a path component naming a bias (``bias``, ``q_bias``), a norm
(``*norm*``, ``ln``, ``ln_f``, ``ln1``, flax's ``LayerNorm``/``RMSNorm`` ``scale``) or an embedding
table (``*embed*``, ``emb``, ``tok_emb``, ``wte``, ``wpe``). Case-insensitive."""

_NOT_A_MATRIX = re.compile(NOT_A_MATRIX)


def is_weight_matrix(path: str, leaf) -> bool:
    """The default selection of matrix transforms: a weight matrix of a linear map.

    True for a floating-point leaf with at least 2 axes whose ``path`` has no component matching
    :data:`NOT_A_MATRIX` (biases, norm scales, embedding tables). So on ``nnx.MultiHeadAttention``
    the ``[D, H, hd]`` query/key/value kernels and the ``[H, hd, D]`` out kernel are selected, its
    ``[H, hd]`` biases are not; on the LLaMA reference model the ``[L, D, F]`` projections and the
    head are selected, ``embed`` and the ``[L, D]`` norm scales are not. An output head or tied
    embedding named otherwise is selected: exclude it with your own predicate, e.g.
    ``select=lambda p, x: is_weight_matrix(p, x) and not p.endswith("head")``.
    """
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if shape is None or len(shape) < 2:
        return False
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        return False
    return _NOT_A_MATRIX.search(path) is None


# ---------------------------------------------------------------------------------------------
# The matrix view of a leaf
# ---------------------------------------------------------------------------------------------

_MHA_IN = re.compile(r"(^|/)(query|key|value)/kernel$")
_MHA_OUT = re.compile(r"(^|/)out/kernel$")


def _norm_axes(ax, ndim: int) -> tuple[int, ...]:
    ax = (ax,) if isinstance(ax, (int, np.integer)) and not isinstance(ax, bool) else tuple(ax)
    out = []
    for a in ax:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim:
            raise ValueError(f"axis {a!r} is not an axis index of a {ndim}-axis leaf")
        out.append(int(a) % ndim)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class MatrixLayout:
    """How a dense leaf is viewed as a batch of ``m x n`` matrices (static and hashable).

    ``in_axes`` are merged (in order) into ``m``, ``out_axes`` into ``n``; the remaining axes (in
    order) are batch axes. ``to_matrix`` gives ``[*batch_shape, m, n]``; ``from_matrix`` inverts
    it. The one matrix view of jaxeff: GaLore's projections, the structured weights' factors
    (SLTrain, LoRA, low-rank, SVFit) and RTN all use it; the user-facing argument that sets it
    is ``matrix_axes=(in_axes, out_axes)`` (per leaf, see the module docstring).
    """

    shape: tuple[int, ...]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]

    @classmethod
    def default(cls, shape: Sequence[int], name: str = "leaf") -> "MatrixLayout":
        """The last two axes are the matrix, leading axes a batch."""
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2:
            raise ValueError(
                f"{name} has shape {shape}: a matrix needs at least 2 axes ([..., in, out]); "
                f"select matrix leaves only, or pass matrix_axes=(in_axes, out_axes)")
        return cls(shape, (len(shape) - 2,), (len(shape) - 1,))

    @classmethod
    def from_axes(cls, shape: Sequence[int], matrix_axes, name: str = "leaf") -> "MatrixLayout":
        """From ``matrix_axes=(in_axes, out_axes)`` (each an int or a tuple of ints; negative
        axes count from the end); ``None`` gives :meth:`default`.

        Raises ValueError for axes that are not a pair, out of range, empty or overlapping.
        """
        if matrix_axes is None:
            return cls.default(shape, name)
        if isinstance(matrix_axes, MatrixLayout):
            matrix_axes = (matrix_axes.in_axes, matrix_axes.out_axes)
        shape = tuple(int(s) for s in shape)
        try:
            a_in, a_out = matrix_axes
            in_axes, out_axes = _norm_axes(a_in, len(shape)), _norm_axes(a_out, len(shape))
        except (TypeError, ValueError) as e:
            raise ValueError(f"matrix_axes for {name} must be (in_axes, out_axes), ints or tuples "
                             f"of axis indices of shape {shape}; got {matrix_axes!r} ({e})"
                             ) from None
        axes = in_axes + out_axes
        if not in_axes or not out_axes or len(set(axes)) != len(axes):
            raise ValueError(f"matrix_axes for {name} (shape {shape}) must name disjoint, "
                             f"non-empty in_axes and out_axes; got {matrix_axes!r}")
        return cls(shape, in_axes, out_axes)

    @classmethod
    def for_leaf(cls, path: str, shape: Sequence[int], matrix_axes=None) -> "MatrixLayout":
        """The layout of leaf ``path``: ``matrix_axes`` when given, else the default rule of the
        module docstring (flax MHA kernels as one matrix; otherwise the last two axes)."""
        name = f"leaf '{path}'"
        if matrix_axes is not None:
            return cls.from_axes(shape, matrix_axes, name)
        nd = len(shape)
        if nd >= 3 and _MHA_IN.search(path):
            return cls.from_axes(shape, ((nd - 3,), (nd - 2, nd - 1)), name)
        if nd >= 3 and _MHA_OUT.search(path):
            return cls.from_axes(shape, ((nd - 3, nd - 2), (nd - 1,)), name)
        return cls.default(shape, name)

    @property
    def batch_axes(self) -> tuple[int, ...]:
        used = set(self.in_axes + self.out_axes)
        return tuple(a for a in range(len(self.shape)) if a not in used)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.batch_axes)

    @property
    def m(self) -> int:
        return math.prod(self.shape[a] for a in self.in_axes)

    @property
    def n(self) -> int:
        return math.prod(self.shape[a] for a in self.out_axes)

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """``batch_shape + (m, n)``."""
        return self.batch_shape + (self.m, self.n)

    @property
    def _perm(self) -> tuple[int, ...]:
        return self.batch_axes + self.in_axes + self.out_axes

    def to_matrix(self, x: jax.Array) -> jax.Array:
        """Dense leaf -> ``[*batch_shape, m, n]``."""
        return jnp.transpose(x, self._perm).reshape(self.matrix_shape)

    def from_matrix(self, x: jax.Array) -> jax.Array:
        """``[*batch_shape, m, n]`` -> dense leaf of shape ``self.shape``."""
        perm = self._perm
        x = x.reshape(tuple(self.shape[a] for a in perm))
        return jnp.transpose(x, tuple(int(i) for i in np.argsort(perm)))

    def matrix_spec(self, dense_spec) -> tuple[tuple, Any, Any]:
        """Split a dense ``PartitionSpec`` into ``(batch_specs, m_spec, n_spec)``.

        A merged axis keeps the spec of its first axis when the others are unsharded, otherwise
        it is replicated (``None``).
        """
        spec = tuple(dense_spec) + (None,) * (len(self.shape) - len(tuple(dense_spec)))

        def merged(axes):
            rest = [spec[a] for a in axes[1:]]
            return spec[axes[0]] if all(s is None for s in rest) else None

        return tuple(spec[a] for a in self.batch_axes), merged(self.in_axes), merged(self.out_axes)


def _is_axes_pair(x) -> bool:
    if isinstance(x, MatrixLayout):
        return True
    if not isinstance(x, (tuple, list)) or len(x) != 2:
        return False
    def axes(a):
        if isinstance(a, (int, np.integer)) and not isinstance(a, bool):
            return True
        return isinstance(a, (tuple, list)) and all(
            isinstance(b, (int, np.integer)) and not isinstance(b, bool) for b in a)
    return axes(x[0]) and axes(x[1])


def _is_module(x) -> bool:
    mod = sys.modules.get("flax.nnx")
    return mod is not None and isinstance(x, mod.Module)


def matrix_axes_values(matrix_axes, tree, *, is_leaf=None) -> list:
    """Per-leaf ``(in_axes, out_axes)`` (or None = the default rule) in flatten order.

    ``matrix_axes`` is None; one ``(in_axes, out_axes)`` pair for every leaf; a list of
    ``(regex, pair)`` rules; a callable ``(path, leaf) -> pair | None``; a pytree of pairs; or a
    flax NNX module, read by :func:`flax_matrix_axes`. Raises TypeError for anything else.
    """
    if matrix_axes is None:
        return [None] * len(flatten_with_paths(tree, is_leaf)[0])
    if _is_module(matrix_axes):
        matrix_axes = flax_matrix_axes(matrix_axes)
    if _is_axes_pair(matrix_axes):
        return [matrix_axes] * len(flatten_with_paths(tree, is_leaf)[0])
    vals, _ = _flat_values(matrix_axes, tree, argname="matrix_axes", allow_empty=True,
                           is_leaf=is_leaf)
    for v in vals:
        if v is not None and not _is_axes_pair(v):
            raise TypeError(f"matrix_axes must give (in_axes, out_axes) pairs (or None) per leaf; "
                            f"got {v!r}")
    return vals


def flax_matrix_axes(module) -> list[tuple[str, tuple]]:
    """``(regex, (in_axes, out_axes))`` rules for the kernels of a flax NNX module, read from the
    modules themselves: ``nnx.Linear`` (``[in, out]``), ``nnx.LinearGeneral`` (its ``axis`` /
    ``in_features`` / ``out_features``, as in ``nnx.MultiHeadAttention``), and ``nnx.Einsum``
    (its equation: kernel axes contracted with the input are ``in``, kernel axes that reach the
    output but not the input are ``out``, kernel axes in input and output alike are batch).
    Pass it (or the module itself) as ``matrix_axes=``; leaves it does not name take the default.

    Raises TypeError when ``module`` is not an ``nnx.Module``; ValueError for an einsum equation
    whose kernel has no in or no out axis.
    """
    if not _is_module(module):
        raise TypeError(f"module must be a flax.nnx.Module; got {type(module).__name__}")
    from flax import nnx

    rules = []
    for path, m in nnx.iter_modules(module):
        prefix = "/".join(str(p) for p in path)
        kern = getattr(m, "kernel", None)
        if kern is None or not hasattr(kern, "shape"):
            continue
        nd = len(kern.shape)
        if isinstance(m, nnx.Einsum):
            axes = _einsum_axes(m.einsum_str, nd)
        elif isinstance(m, nnx.LinearGeneral):
            n_in, n_out = len(m.in_features), len(m.out_features)
            n_b = nd - n_in - n_out
            axes = (tuple(range(n_b, n_b + n_in)), tuple(range(n_b + n_in, nd)))
        elif isinstance(m, nnx.Linear):
            axes = ((nd - 2,), (nd - 1,))
        else:
            continue
        rules.append(("^" + re.escape(prefix + ("/" if prefix else "") + "kernel") + "$", axes))
    return rules


def _einsum_axes(eq: str, nd: int):
    eq = eq.replace(" ", "")
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != 2 or "." in eq:
        raise ValueError(f"einsum {eq!r}: need 'input,kernel->output' without ellipsis")
    x, k = ins
    if len(k) != nd:
        raise ValueError(f"einsum {eq!r}: kernel has {nd} axes but the equation names {len(k)}")
    in_axes = tuple(i for i, c in enumerate(k) if c in x and c not in out)
    out_axes = tuple(i for i, c in enumerate(k) if c in out and c not in x)
    if not in_axes or not out_axes:
        raise ValueError(f"einsum {eq!r}: the kernel needs contracted (in) and output-only (out) "
                         f"axes to be a matrix; pass matrix_axes for it")
    return in_axes, out_axes


def resolve_rank(rank, m: int, n: int, *, leaf: Optional[str] = None,
                 method: Optional[str] = None) -> int:
    """The integer rank of an ``m x n`` matrix from ``rank``: an int as is, a float ``f`` in
    (0, 1] as ``max(1, floor(f * min(m, n)))`` -- one rule for every jaxeff transform, applied to
    the matrix of :class:`MatrixLayout` (so ``rank=0.25`` on an MHA kernel ``[D, H, hd]`` is a
    quarter of ``min(D, H*hd)``).

    Raises ValueError (naming ``method`` and ``leaf`` when given) for a rank > ``min(m, n)``.
    """
    k = min(m, n)
    if isinstance(rank, float):
        r = max(1, int(math.floor(rank * k + 1e-9)))
    else:
        r = int(rank)
    if r > k:
        where = f" of leaf '{leaf}'" if leaf is not None else ""
        raise ValueError(f"{method + ': ' if method else ''}rank={rank!r} is larger than the "
                         f"matrix{where} ({m} x {n}); valid ranks are 1..{k} or a fraction in "
                         "(0, 1]")
    return r
