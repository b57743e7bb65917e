"""The structured-weight protocol: a pytree dataclass that knows how to become a dense array.

A structured weight (sparse-plus-low-rank, low-rank factors, LoRA adapter, SVFit, quantized
codes, ...) is a ``flax.struct.dataclass`` subclassing :class:`StructuredWeight`. Its array fields
are pytree leaves (so Orbax saves them and shardings apply); its dense ``shape`` and ``dtype`` (and
any other configuration) are static fields. ``materialize(tree)`` densifies every structured leaf
of any pytree and leaves dense leaves alone; it is differentiable, so a user trains with
``loss(materialize(factors), batch)`` and the model code never changes.

Trainable and frozen parts (the integer-index problem)
-------------------------------------------------------
Structured leaves may hold arrays that must not train: SLTrain's int32 support indices (``jax.grad``
refuses integer inputs), LoRA's frozen base, SVFit's singular vectors. Each class names its
trainable fields in ``trainable_fields`` (``None``: every floating-point field); dense leaves train
when they are floating point. Two equivalent recipes::

    factors = jaxeff.params.sltrain(rank=64, select=r"layers/w").init(key, params)

    # 1. partition / combine (equinox style): the optimizer only ever sees trainable arrays.
    trainable, frozen = partition(factors)
    opt_state = tx.init(trainable)
    def loss(trainable, frozen, batch):
        return model_loss(materialize(combine(trainable, frozen)), batch)
    grads = jax.grad(loss)(trainable, frozen, batch)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)

    # 2. a mask for optax.masked / optax.multi_transform, for trees whose frozen leaves are all
    #    floating point (LoRA, SVFit, low-rank; not SLTrain's int indices):
    tx = optax.multi_transform({True: optax.adamw(1e-3), False: optax.set_to_zero()},
                               trainable_mask(factors))

``partition`` puts ``None`` in the holes (``None`` is an empty pytree, so ``jax.grad``, optax and
``jax.tree.map`` skip it); checkpoint the combined tree, whose leaves are all arrays.

Matrices and layouts
--------------------
Methods factor matrices. A leaf of shape ``[..., in, out]`` is a batch of matrices over its leading
axes (``jaxeff.select.matrix_shape``); :class:`MatrixLayout` also accepts explicit dimension
numbers ``(in_axes, out_axes)`` (e.g. an attention kernel ``[D, H, hd]`` as one ``D x (H*hd)``
matrix with ``dims=((0,), (1, 2))``). Factors are stored in matrix form ``[*batch, m, n]``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxeff.select import path_str, select_mask, select_values

__all__ = ["StructuredWeight", "is_structured", "materialize", "trainable_mask", "partition",
           "combine", "MatrixLayout", "map_matrices", "structured_specs", "array_fields",
           "specs_from", "uniform", "normal"]


class StructuredWeight:
    """Base class (mixin) for structured weights.

    Subclasses are ``flax.struct.dataclass``es and implement :meth:`materialize`, returning the
    dense array of shape ``self.shape`` and dtype ``self.dtype``. Optional hooks:

    * ``trainable_fields``: names of the array fields an optimizer updates (``None``: every
      floating-point field);
    * ``factor_specs(dense_spec)``: the ``PartitionSpec`` of each field given the dense weight's
      spec, returned as an instance of the class holding specs (used by :func:`structured_specs`).
    """

    trainable_fields: ClassVar[Optional[tuple[str, ...]]] = None

    def materialize(self) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement materialize()")


def is_structured(x) -> bool:
    """True for a structured-weight leaf."""
    return isinstance(x, StructuredWeight)


def materialize(tree):
    """Densify every :class:`StructuredWeight` in ``tree``; other leaves are returned as they are.

    Differentiable: gradients flow back into the structured leaves' factors.
    """
    return jax.tree.map(lambda x: x.materialize() if is_structured(x) else x, tree,
                        is_leaf=is_structured)


def array_fields(w: StructuredWeight) -> list[str]:
    """Names of the pytree (array) fields of a structured weight, in declaration order."""
    return [f.name for f in dataclasses.fields(w) if f.metadata.get("pytree_node", True)]


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def trainable_mask(tree, freeze=False):
    """A pytree of bools, ``True`` where an optimizer should update the array.

    Rule: a field of a structured leaf is trainable when listed in its ``trainable_fields`` (or,
    when that is ``None``, when it is floating point); a dense leaf is trainable when floating
    point. Leaves selected by ``freeze`` (a selector over the tree with structured leaves as
    single entries, see ``jaxeff.select``) are frozen entirely.

    Returns a tree of the structure of ``tree`` (structured leaves become instances of their class
    holding bools), usable as ``optax.masked``/``optax.multi_transform`` labels.
    Raises TypeError for a ``freeze`` selector of the wrong type.
    """
    frozen = select_mask(freeze, tree, argname="freeze", allow_empty=True, is_leaf=is_structured)

    def leaf_mask(x, fz):
        if is_structured(x):
            names = type(x).trainable_fields
            return x.replace(**{
                f: (not fz) and (_is_float(getattr(x, f)) if names is None else f in names)
                for f in array_fields(x)})
        return (not fz) and _is_float(x)

    return jax.tree.map(leaf_mask, tree, frozen, is_leaf=is_structured)


def partition(tree, freeze=False):
    """Split ``tree`` into ``(trainable, frozen)`` trees with ``None`` holes (equinox style).

    ``trainable`` holds the arrays :func:`trainable_mask` marks ``True`` (``None`` elsewhere),
    ``frozen`` the rest; ``combine(trainable, frozen)`` rebuilds ``tree``. Pass ``trainable`` to
    ``jax.grad`` and ``tx.init``/``tx.update``; integer indices and frozen bases stay out.
    """
    mask = trainable_mask(tree, freeze)
    trainable = jax.tree.map(lambda x, m: x if m else None, tree, mask)
    frozen = jax.tree.map(lambda x, m: None if m else x, tree, mask)
    return trainable, frozen


def combine(*trees):
    """Merge trees produced by :func:`partition`: at each position take the first non-``None``."""
    def pick(*xs):
        return next((x for x in xs if x is not None), None)
    return jax.tree.map(pick, *trees, is_leaf=lambda x: x is None)


@dataclasses.dataclass(frozen=True)
class MatrixLayout:
    """How a dense leaf is viewed as a batch of ``m x n`` matrices (a static, hashable field).

    ``in_axes`` are merged into ``m``, ``out_axes`` into ``n``, the remaining axes (in order) are
    batch axes. Default (:meth:`default`): the last two axes are the matrix, leading axes batch.
    """

    shape: tuple[int, ...]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]

    @classmethod
    def default(cls, shape: Sequence[int], name: str = "leaf") -> "MatrixLayout":
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2:
            raise ValueError(
                f"{name} has shape {shape}: a structured weight needs a matrix (at least 2 axes, "
                f"[..., in, out]); select matrix leaves only, or pass dims=(in_axes, out_axes)")
        return cls(shape, (len(shape) - 2,), (len(shape) - 1,))

    @classmethod
    def from_dims(cls, shape: Sequence[int], dims, name: str = "leaf") -> "MatrixLayout":
        if dims is None:
            return cls.default(shape, name)
        shape = tuple(int(s) for s in shape)
        try:
            in_axes, out_axes = (tuple(int(a) % len(shape) for a in ax) for ax in dims)
        except (TypeError, ValueError, ZeroDivisionError):
            raise ValueError(f"dims for {name} must be (in_axes, out_axes), tuples of axis "
                             f"indices of shape {shape}; got {dims!r}") from None
        axes = in_axes + out_axes
        if not in_axes or not out_axes or len(set(axes)) != len(axes):
            raise ValueError(f"dims for {name} (shape {shape}) must name disjoint, non-empty "
                             f"in_axes and out_axes; got {dims!r}")
        return cls(shape, in_axes, out_axes)

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
    def _perm(self) -> tuple[int, ...]:
        return self.batch_axes + self.in_axes + self.out_axes

    def to_matrix(self, x: jax.Array) -> jax.Array:
        """Dense leaf -> ``[*batch_shape, m, n]``."""
        return jnp.transpose(x, self._perm).reshape(self.batch_shape + (self.m, self.n))

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


def map_matrices(fn: Callable, params, select, *, key=None, dims=None, method: str = "method"):
    """Apply ``fn(path, leaf, layout, key)`` to every selected leaf; others pass through.

    ``select`` is a ``jaxeff.select`` selector (raises ValueError when it matches nothing);
    ``dims`` a per-leaf spec for ``select_values`` of ``(in_axes, out_axes)``; ``key`` is split
    into one key per selected leaf (``None`` passed when ``key`` is None). Raises ValueError for
    a selected leaf with fewer than two axes and no ``dims``.
    """
    mask = select_mask(select, params, argname="select", is_leaf=is_structured)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_structured)
    sel = treedef.flatten_up_to(mask)
    if dims is None:
        dms = [None] * len(flat)
    else:
        dms = treedef.flatten_up_to(select_values(dims, params, argname="dims",
                                                  allow_empty=True, is_leaf=is_structured))
    n_sel = sum(sel)
    keys = list(jax.random.split(key, n_sel)) if key is not None else [None] * n_sel
    out, i = [], 0
    for (path, leaf), s, d in zip(flat, sel, dms):
        if not s:
            out.append(leaf)
            continue
        name = f"{method}: leaf '{path_str(path)}'"
        if is_structured(leaf):
            raise TypeError(f"{name} is already a structured weight ({type(leaf).__name__}); "
                            f"materialize it first")
        if not hasattr(leaf, "shape"):
            raise TypeError(f"{name} is not an array (got {type(leaf).__name__})")
        layout = MatrixLayout.from_dims(leaf.shape, d, name)
        out.append(fn(path_str(path), leaf, layout, keys[i]))
        i += 1
    return jax.tree_util.tree_unflatten(treedef, out)


def structured_specs(tree, dense_specs):
    """``PartitionSpec``s for a tree holding structured leaves, from the dense tree's specs.

    ``dense_specs`` has the structure of the *dense* tree (``materialize(tree)``), one
    ``PartitionSpec`` per leaf. Structured leaves get ``leaf.factor_specs(spec)`` (an instance of
    their class holding specs); dense leaves keep theirs. Use with ``NamedSharding`` and
    ``jax.device_put`` / ``jit(out_shardings=...)``. Raises TypeError for a structured leaf
    without ``factor_specs``.
    """
    def one(x, spec):
        if is_structured(x):
            if not hasattr(x, "factor_specs"):
                raise TypeError(f"{type(x).__name__} does not define factor_specs(dense_spec)")
            return x.factor_specs(spec)
        return spec
    return jax.tree.map(one, tree, dense_specs, is_leaf=lambda x: is_structured(x) or
                        isinstance(x, P))


def specs_from(w: StructuredWeight, **field_specs) -> StructuredWeight:
    """Helper for ``factor_specs``: ``w`` holding the given specs (``P()`` elsewhere)."""
    return w.replace(**{f: field_specs.get(f, P()) for f in array_fields(w)})


# jax.random draws N-d arrays with the partitionable threefry; on CPU XLA compiles such a draw
# ~6x slower than a 1-d draw of the same size (observed: 2.4 s vs 0.35 s for [3, 16, 4]), so
# initialisers draw flat and reshape (the values differ from an N-d draw; the law is the same).
def uniform(key, shape, dtype, minval, maxval) -> jax.Array:
    """``jax.random.uniform`` of ``shape`` drawn as a flat vector and reshaped."""
    shape = tuple(shape)
    return jax.random.uniform(key, (math.prod(shape),), dtype, minval, maxval).reshape(shape)


def normal(key, shape, dtype) -> jax.Array:
    """``jax.random.normal`` of ``shape`` drawn as a flat vector and reshaped."""
    shape = tuple(shape)
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)
