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

Only the adapters train on an adapted tree: when ``tree`` holds an adapter class (``adapter =
True``: LoRA, SVFit, whose point is a frozen base model), dense leaves are frozen too (the base
model's embeddings, norms, biases and unadapted matrices); pass ``train_dense=True`` (or a
selector, e.g. ``train_dense=r"head|norm"``) to train some. Trees of other structured weights
(SLTrain, low-rank: pre-training from scratch) train their floating dense leaves by default.

Matrices and layouts
--------------------
Methods factor matrices, and by default select the weight matrices
(``jaxeff.select.is_weight_matrix``: not biases, norm scales or embeddings). Each leaf is viewed
through ``jaxeff.select.MatrixLayout`` (re-exported here): ``[..., in, out]`` is a batch of
matrices over its leading axes, flax attention kernels ``[D, H, hd]`` are one ``D x (H*hd)``
matrix, and ``matrix_axes=(in_axes, out_axes)`` (per leaf, or a flax module) says otherwise.
Factors are stored in matrix form ``[*batch, m, n]``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxeff.select import (MatrixLayout, flatten_with_paths, is_weight_matrix, matrix_axes_values,
                           select_mask)

__all__ = ["StructuredWeight", "is_structured", "materialize", "trainable_mask", "partition",
           "combine", "MatrixLayout", "map_matrices", "structured_rule", "array_fields",
           "uniform", "normal", "check_single_matrix"]


class StructuredWeight:
    """Base class (mixin) for structured weights.

    Subclasses are ``flax.struct.dataclass``es and implement :meth:`materialize`, returning the
    dense array of shape ``self.shape`` and dtype ``self.dtype``. Optional hooks:

    * ``trainable_fields``: names of the array fields an optimizer updates (``None``: every
      floating-point field);
    * ``adapter``: True for a fine-tuning adapter on a frozen base (LoRA, SVFit): a tree holding
      one freezes its dense leaves by default (:func:`trainable_mask`).

    Sharding: a subclass registers its rule beside it (``jaxeff.state_sharding.register_rule(
    cls, structured_rule(field_specs))``); ``jaxeff.state_sharding.derive_shardings(tree, dense,
    dense_shardings)`` then places every field. Without one, fields are aligned to the dense spec.
    """

    trainable_fields: ClassVar[Optional[tuple[str, ...]]] = None
    adapter: ClassVar[bool] = False

    def materialize(self) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement materialize()")

    def apply(self, x: jax.Array, *, impl: Optional[str] = None,
              interpret: bool = False) -> jax.Array:
        """``y = x @ W`` (the generic product: ``x @ materialize()``, cast to ``x.dtype``).

        Subclasses override it with their own product that avoids the dense matrix (SLTrain,
        quantized, LoRA, low rank, SVFit); ``impl`` / ``interpret`` select their kernel
        (``jaxeff.params.linear``). The generic product ignores them.
        """
        del impl, interpret
        return x @ self.materialize().astype(x.dtype)


def check_single_matrix(w, factor: jax.Array, x: jax.Array, m: int) -> None:
    """For ``apply``: ``w`` holds one default-layout ``[in, out]`` matrix and ``x`` is ``[..., in]``.

    ``factor`` is a field whose matrix form has 2 axes (more: a stacked leaf). A leaf sliced by
    ``lax.scan`` keeps its stacked static layout but 2-axis arrays, and passes.
    Raises ValueError for a stacked leaf, explicit ``matrix_axes`` or a mismatched ``x``.
    """
    lay = getattr(w, "layout", None)
    name = type(w).__name__
    if lay is not None and (lay.in_axes != (len(lay.shape) - 2,)
                            or lay.out_axes != (len(lay.shape) - 1,)):
        raise ValueError(f"{name}.apply needs the default [..., in, out] layout; this leaf has "
                         f"in_axes={lay.in_axes}, out_axes={lay.out_axes} (matrix_axes; use x @ "
                         f"materialize(w) reshaped)")
    if factor.ndim != 2:
        raise ValueError(f"{name}.apply needs one unbatched matrix; a factor has shape "
                         f"{factor.shape} (slice the stacked axis first, as lax.scan does)")
    if x.shape[-1] != m:
        raise ValueError(f"{name}.apply: x has last axis {x.shape[-1]}, the weight has in={m}")


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


def trainable_mask(tree, freeze=False, *, train_dense=None):
    """A pytree of bools, ``True`` where an optimizer should update the array.

    Rule: a field of a structured leaf is trainable when listed in its ``trainable_fields`` (or,
    when that is ``None``, when it is floating point); a floating-point dense leaf is trainable
    when ``train_dense`` selects it. ``train_dense=None`` (default): no dense leaf when the tree
    holds an adapter (``LoRAWeight``, ``SVFitWeight``: only the adapters train), every one
    otherwise (SLTrain / low-rank pre-training trains embeddings and norms); ``True`` / ``False``
    / a selector (``jaxeff.select``) say which. Leaves selected by ``freeze`` (a selector over the
    tree with structured leaves as single entries) are frozen entirely.

    Returns a tree of the structure of ``tree`` (structured leaves become instances of their class
    holding bools), usable as ``optax.masked``/``optax.multi_transform`` labels.
    Raises TypeError for a ``freeze`` or ``train_dense`` selector of the wrong type.
    """
    frozen = select_mask(freeze, tree, argname="freeze", allow_empty=True, is_leaf=is_structured)
    if train_dense is None:
        train_dense = not any(type(x).adapter for x in jax.tree.leaves(tree, is_leaf=is_structured)
                              if is_structured(x))
    dense_ok = select_mask(train_dense, tree, argname="train_dense", allow_empty=True,
                           is_leaf=is_structured)

    def leaf_mask(x, fz, ok):
        if is_structured(x):
            names = type(x).trainable_fields
            return x.replace(**{
                f: (not fz) and (_is_float(getattr(x, f)) if names is None else f in names)
                for f in array_fields(x)})
        return (not fz) and ok and _is_float(x)

    return jax.tree.map(leaf_mask, tree, frozen, dense_ok, is_leaf=is_structured)


def partition(tree, freeze=False, *, train_dense=None):
    """Split ``tree`` into ``(trainable, frozen)`` trees with ``None`` holes (equinox style).

    ``trainable`` holds the arrays :func:`trainable_mask` marks ``True`` (``None`` elsewhere),
    ``frozen`` the rest; ``combine(trainable, frozen)`` rebuilds ``tree``. Pass ``trainable`` to
    ``jax.grad`` and ``tx.init``/``tx.update``; integer indices and frozen bases stay out. On a
    LoRA-adapted tree only the adapters train unless ``train_dense`` says otherwise (see
    :func:`trainable_mask`).
    """
    mask = trainable_mask(tree, freeze, train_dense=train_dense)
    trainable = jax.tree.map(lambda x, m: x if m else None, tree, mask)
    frozen = jax.tree.map(lambda x, m: None if m else x, tree, mask)
    return trainable, frozen


def combine(*trees):
    """Merge trees produced by :func:`partition`: at each position take the first non-``None``."""
    def pick(*xs):
        return next((x for x in xs if x is not None), None)
    return jax.tree.map(pick, *trees, is_leaf=lambda x: x is None)


def map_matrices(fn: Callable, params, select=None, *, key=None, matrix_axes=None,
                 method: str = "method"):
    """Apply ``fn(path, leaf, layout, key)`` to every selected leaf; others pass through.

    ``select`` is a ``jaxeff.select`` selector (default ``is_weight_matrix``; raises ValueError
    when it matches nothing); ``matrix_axes`` a per-leaf ``(in_axes, out_axes)`` spec or a flax
    module (``jaxeff.select.matrix_axes_values``; default ``MatrixLayout.for_leaf``); ``key`` is
    split into one key per selected leaf (``None`` passed when ``key`` is None). Paths ignore
    ``nnx.Variable`` wrappers, so an ``nnx.split`` state works as a plain dict does. Raises
    ValueError for a selected leaf with fewer than two axes and no ``matrix_axes``.
    """
    sel_spec = is_weight_matrix if select is None else select
    mask = select_mask(sel_spec, params, argname="select", is_leaf=is_structured)
    flat, treedef = flatten_with_paths(params, is_leaf=is_structured)
    sel = treedef.flatten_up_to(mask)
    dms = matrix_axes_values(matrix_axes, params, is_leaf=is_structured)
    n_sel = sum(sel)
    keys = list(jax.random.split(key, n_sel)) if key is not None else [None] * n_sel
    out, i = [], 0
    for (path, leaf), s, d in zip(flat, sel, dms):
        if not s:
            out.append(leaf)
            continue
        name = f"{method}: leaf '{path}'"
        if is_structured(leaf):
            raise TypeError(f"{name} is already a structured weight ({type(leaf).__name__}); "
                            f"materialize it first")
        if not hasattr(leaf, "shape"):
            raise TypeError(f"{name} is not an array (got {type(leaf).__name__})")
        try:
            layout = MatrixLayout.for_leaf(path, leaf.shape, d)
        except ValueError as e:
            raise ValueError(f"{method}: {e}") from None
        out.append(fn(path, leaf, layout, keys[i]))
        i += 1
    return jax.tree_util.tree_unflatten(treedef, out)


def structured_rule(field_specs: Callable) -> Callable:
    """A ``jaxeff.state_sharding`` rule for a structured-weight class, from its field specs.

    ``field_specs(w, dense_spec, b, m_spec, n_spec, mesh) -> {field: spec}`` gets the dense
    weight's full-length spec (a tuple), its split ``(batch specs, m spec, n spec)`` by the
    weight's ``layout.matrix_spec`` (when it has a layout; else the last two axes) and the mesh; each spec is a tuple of
    ``PartitionSpec`` entries, checked by ``Context.sharding`` (axes the mesh does not divide stay
    unsharded). Fields left out are replicated; ``None`` fields (``partition`` holes) stay None.
    A weight whose dense ``shape`` is not its param's (or with no param) has its children walked.
    Register the result beside the class: ``register_rule(MyWeight, structured_rule(specs))``.
    """
    def rule(w, ctx):
        info = ctx.param
        lay = getattr(w, "layout", None)     # QuantizedWeight: None when [..., IN, OUT]
        dense_shape = tuple(lay.shape) if lay is not None else tuple(getattr(w, "shape", ()))
        if info is None or dense_shape != info.shape:
            return ctx.children(w)
        spec = tuple(info.spec)
        if lay is not None:
            b, ms, ns = lay.matrix_spec(P(*spec))
        else:
            b, ms, ns = spec[:-2], spec[-2], spec[-1]
        specs = field_specs(w, spec, tuple(b), ms, ns, ctx.mesh)
        return w.replace(**{f: None if getattr(w, f) is None else
                            ctx.sharding(getattr(w, f).shape, tuple(specs.get(f, ())))
                            for f in array_fields(w)})
    return rule


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
