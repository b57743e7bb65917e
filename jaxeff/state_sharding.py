"""Sharding machinery for optimizer states and structured-parameter trees, derived from the params'.

``derive_shardings(tree, params, param_shardings)`` returns one ``NamedSharding`` per leaf of
``tree`` (an optimizer state, a train state, a tree of structured weights; arrays or
``jax.ShapeDtypeStruct``s) so that ``jit(..., out_shardings=...)`` places it next to the params it
belongs to, without gathering. The walk over ``tree``, at each node, first match wins:

1. **Mirror.** A subtree with the params' structure (``treedef.flatten_up_to`` succeeds: Adam's
   ``mu``/``nu``, Sophia's ``h``, pruning masks, EMA copies; ``optax.MaskedNode`` / ``None`` holes
   allowed) is walked leaf by leaf with that leaf's param as context.
2. **Rule.** A node whose type (or a base class) has a registered rule is handed to it
   (:func:`register_rule`).
3. **Leaf.** An array with a param as context takes the param's spec when the shapes are equal;
   with a different shape, the spec of each param axis whose size it shares at the same position
   (or with one param axis dropped: Adafactor's row/column factors). Without a param: scalars
   replicated, other leaves by ``fallback(shape)`` (default: replicated).
4. Any other node: its children, recursively.

Every spec is then checked against the leaf's shape: an axis whose size the mesh axes do not
divide falls back to unsharded (never an error), and a mesh axis is used at most once.

**Each state owns its sharding** (DESIGN.md): the rule of each of jaxeff's states and structured
weights is registered beside its class, in the class's own module (so a node's rule is registered
whenever the node can exist), and documented there:

* ``SophiaState`` (``jaxeff/optim/_sophia.py``), ``SparseState`` (``_sparsity.py``),
  ``ParamEMAState`` (``_param_ema.py``), ``GroupQuantized`` / ``GroupQuantizedDRE`` /
  ``CompressedState`` (``_compress.py``), ``GaLoreState`` (``_galore.py``: projectors keyed by
  parameter path);
* ``SLTrainWeight`` (``jaxeff/params/_sltrain.py``), ``LowRankWeight`` / ``SVFitWeight``
  (``_lowrank.py``), ``LoRAWeight`` (``_lora.py``), ``QuantizedWeight`` (``_quantized.py``), all
  through ``jaxeff.params._structured.structured_rule`` (field specs from the dense weight's
  spec); a ``StructuredWeight`` without a rule has its fields aligned to the dense spec (rule 3).
* Growth: nothing to register: a grown state is re-derived from the grown params
  (``jaxeff.train.state_shardings(grown_state, mesh)``).

What still gathers in an update placed by these rules (8 CPU devices, ``jaxeff.sharding.
collectives`` of the compiled update): GaLore's exact SVD refresh (``refresh='svd'``) all-gathers
each projected gradient matrix, full size, in its refresh branch (XLA does not partition
``jnp.linalg.svd``); ``refresh='randomized'`` gathers no weight (all-reduces of ``[b, n, r+p]``
sketches; plus an all-gather of the ``[b, m, r+p]`` sketch when the projector is sharded).
Gradual pruning's mask recomputation (``sparsity.prune`` with a growing schedule) all-gathers each
selected weight (its top-k flattens the weights and breaks ties with a cumsum); static masks
(``spdf``) gather nothing. Sophia's refresh runs the model, whose FSDP forward gathers weights.

No paper: this is infrastructure for FSDP ("PyTorch FSDP: Experiences on Scaling Fully Sharded
Data Parallel", Zhao et al., 2023) and GSPMD ("GSPMD: General and Scalable Parallelization for ML
Computation Graphs", Xu et al., 2021) style training with jaxeff's transforms.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxeff import sharding as shd
from jaxeff.select import flatten_with_paths

# Imports nothing of jaxeff.optim / jaxeff.params: their modules import this one to register rules.
__all__ = ["ParamInfo", "Context", "derive_shardings", "fsdp_param_shardings", "fsdp_fallback",
           "register_rule", "rule_for", "aligned_spec", "axis_names"]

_RULES: dict = {}


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """What a rule knows of the param a state node belongs to: shape and (full-length) spec."""
    shape: tuple
    spec: tuple


def _is_info(x) -> bool:
    return isinstance(x, ParamInfo)


def _shape(x) -> tuple:
    return tuple(getattr(x, "shape", np.shape(x)))


def axis_names(entry) -> tuple:
    """The mesh axis names of one ``PartitionSpec`` entry (``()`` for None / unconstrained)."""
    if entry is None or entry is P.UNCONSTRAINED:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


@dataclasses.dataclass(frozen=True)
class Context:
    """The walk's state, handed to rules: ``mesh``; ``params`` (a tree of :class:`ParamInfo`
    with the structure of the params a node may mirror, or None); ``param`` (the
    :class:`ParamInfo` of the param the current node belongs to, or None); ``fallback``
    ``(shape) -> PartitionSpec`` for leaves with no param."""
    mesh: Mesh
    params: Any = None
    param: Optional[ParamInfo] = None
    fallback: Optional[Callable] = None

    def sharding(self, shape, spec) -> NamedSharding:
        """``NamedSharding(mesh, spec)``; axes the mesh does not divide (or repeats) unsharded."""
        shape = tuple(shape)
        spec = tuple(spec)[:len(shape)] + (None,) * max(0, len(shape) - len(tuple(spec)))
        used, out = set(), []
        for d, e in zip(shape, spec):
            names = axis_names(e)
            size = math.prod(self.mesh.shape.get(n, 0) for n in names) if names else 1
            if not names or used & set(names) or size == 0 or d % size:
                out.append(None)
            else:
                used.update(names)
                out.append(e)
        # P() when nothing is sharded, else one entry per axis (as jaxeff.sharding.fsdp_shardings)
        return NamedSharding(self.mesh, P(*out) if any(e is not None for e in out) else P())

    def replicated(self, node):
        """Replicated shardings for every leaf of ``node``."""
        return jax.tree.map(lambda x: NamedSharding(self.mesh, P()), node)

    def with_(self, **kw) -> "Context":
        return dataclasses.replace(self, **kw)

    def params_by_path(self) -> dict:
        """``{path: ParamInfo}`` of ``params`` (``jaxeff.select.flatten_with_paths`` paths, as
        GaLore keys its projectors; ``{}`` when
        there are no params), for rules that key their children by parameter path (GaLore)."""
        if self.params is None:
            return {}
        flat, _ = flatten_with_paths(self.params, is_leaf=_is_info)
        return dict(flat)

    def with_params_at(self, infos: dict) -> "Context":
        """This context with the :class:`ParamInfo` at each path of ``infos`` replaced (e.g. by
        the shape and spec of a low-rank moment); other params unchanged."""
        flat, treedef = flatten_with_paths(self.params, is_leaf=_is_info)
        return self.with_(params=treedef.unflatten([infos.get(k, i) for k, i in flat]))

    def leaf(self, x) -> NamedSharding:
        """Rule 3 of the module docstring for one array leaf."""
        shape = _shape(x)
        if self.param is not None:
            return self.sharding(shape, aligned_spec(shape, self.param))
        if not shape or self.fallback is None:
            return NamedSharding(self.mesh, P())
        return self.sharding(shape, tuple(self.fallback(shape)))

    def walk(self, node):
        """Shardings for ``node`` (a subtree): mirror, registered rule, leaf, or children."""
        if self.params is not None:
            subs = _mirror(node, self.params)
            if subs is not None:
                treedef, parts = subs
                infos = jax.tree.leaves(self.params, is_leaf=_is_info)
                return treedef.unflatten([self.with_(params=None, param=i).walk(s)
                                          for i, s in zip(infos, parts)])
        rule = rule_for(node)
        if rule is not None:
            return rule(node, self)
        return self.children(node)

    def children(self, node):
        """Walk the children of ``node`` (its registered rule skipped); an array is a leaf."""
        children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
        if treedef.num_nodes == 1 and treedef.num_leaves == 1:
            return self.leaf(node)
        return treedef.unflatten([self.walk(c) for c in children])


def _mirror(node, params):
    """``(treedef, subtrees)`` when ``node`` has the structure of ``params`` (a prefix)."""
    treedef = jax.tree.structure(params, is_leaf=_is_info)
    if treedef.num_leaves == 0:
        return None
    if treedef.num_nodes == 1 and not hasattr(node, "shape"):  # a single-array params tree
        return None
    try:
        return treedef, treedef.flatten_up_to(node)
    except (ValueError, TypeError):
        return None


def aligned_spec(shape, info: ParamInfo) -> tuple:
    """The param's spec moved onto a leaf of another shape: equal shapes take it whole; equal rank
    keeps the entries of axes of equal size; one axis fewer (a param axis dropped, tried from the
    last) keeps the others'; anything else is replicated."""
    shape = tuple(shape)
    if shape == info.shape:
        return info.spec
    if len(shape) == len(info.shape):
        return tuple(e if a == b else None for a, b, e in zip(shape, info.shape, info.spec))
    if len(shape) == len(info.shape) - 1:
        for drop in reversed(range(len(info.shape))):
            if info.shape[:drop] + info.shape[drop + 1:] == shape:
                return info.spec[:drop] + info.spec[drop + 1:]
    return ()


def register_rule(cls, rule: Optional[Callable] = None):
    """Register ``rule(node, ctx: Context) -> tree of NamedSharding`` for nodes of type ``cls``.

    ``cls`` is a class or its qualified name (``"package.module.Class"``, matched against the
    node's class and its bases without importing it). Usable as a decorator. A later registration
    for the same key replaces the earlier one. Raises TypeError for a non-callable rule or a
    ``cls`` that is neither a class nor a string.
    """
    if not isinstance(cls, (type, str)):
        raise TypeError(f"cls must be a class or a qualified class name; got {cls!r}")

    def deco(fn):
        if not callable(fn):
            raise TypeError(f"rule must be callable (node, ctx) -> shardings; got {fn!r}")
        _RULES[cls] = fn
        return fn
    return deco if rule is None else deco(rule)


def rule_for(node) -> Optional[Callable]:
    """The rule registered for ``type(node)`` or its nearest base class (None if none)."""
    for k in type(node).__mro__:
        for key in (k, f"{k.__module__}.{k.__qualname__}"):
            if key in _RULES:
                return _RULES[key]
    return None


def _to_infos(params, param_shardings, mesh):
    flat, treedef = jax.tree.flatten(params)
    if param_shardings is None:
        shs = [getattr(x, "sharding", None) for x in flat]
    else:
        try:
            shs = treedef.flatten_up_to(param_shardings)
        except (ValueError, TypeError) as e:
            raise ValueError(f"param_shardings must have the structure of params: {e}") from None
    infos = []
    for x, s in zip(flat, shs):
        if isinstance(s, NamedSharding):
            if mesh is None:
                mesh = s.mesh
            elif dict(s.mesh.shape) != dict(mesh.shape):
                raise ValueError(f"param_shardings mix meshes: {dict(s.mesh.shape)} vs "
                                 f"{dict(mesh.shape)}")
        elif not isinstance(s, P):
            raise TypeError("param_shardings leaves must be NamedSharding or PartitionSpec (or "
                            f"params must be arrays placed with a NamedSharding); got {s!r}")
        spec, shape = tuple(getattr(s, "spec", s)), _shape(x)
        infos.append(ParamInfo(shape, (spec + (None,) * len(shape))[:len(shape)]))
    if mesh is None:
        raise ValueError("mesh is None and param_shardings holds no NamedSharding to take it from")
    for i in infos:
        for n in (n for e in i.spec for n in axis_names(e)):
            if n not in mesh.shape:
                raise ValueError(f"param spec {P(*i.spec)} names mesh axis {n!r}; the mesh has "
                                 f"{tuple(mesh.axis_names)}")
    return treedef.unflatten(infos), mesh


def derive_shardings(tree, params, param_shardings=None, mesh: Optional[Mesh] = None, *,
                     fallback: Optional[Callable] = None):
    """``NamedSharding``s for every leaf of ``tree``, derived from the params' shardings.

    Rules: see the module docstring (mirror, registered rule, aligned leaf, children; axes the mesh
    does not divide are left unsharded).

    Args:
      tree: an optimizer state, train state or tree of structured weights (arrays or
        ``jax.ShapeDtypeStruct``s, e.g. ``jax.eval_shape(tx.init, params)``).
      params: the params ``tree`` belongs to (arrays or ``ShapeDtypeStruct``s; shapes only).
        For a tree of structured weights, the dense params they were made from.
      param_shardings: a tree with the structure of ``params`` of ``NamedSharding``s (or
        ``PartitionSpec``s with ``mesh``); default: the ``.sharding`` of each param array.
      mesh: default: the mesh of ``param_shardings``.
      fallback: ``shape -> PartitionSpec`` for leaves that belong to no param (default: replicate).

    Returns: a tree of ``NamedSharding`` with the structure of ``tree``.

    Raises:
      ValueError: ``param_shardings`` not shaped like ``params``, mixed meshes, a spec naming an
        axis the mesh lacks, or no mesh at all. TypeError: a param sharding that is not a
        ``NamedSharding`` / ``PartitionSpec``.
    """
    infos, mesh = _to_infos(params, param_shardings, mesh)
    return Context(mesh, params=infos, fallback=fallback).walk(tree)


def fsdp_fallback(mesh: Mesh, *, axis: str = "fsdp", min_size: int = 2 ** 12) -> Callable:
    """A ``fallback`` for :func:`derive_shardings`: the FSDP rule of
    ``jaxeff.sharding.fsdp_shardings`` (largest axis the ``axis`` size divides; leaves under
    ``min_size`` values replicated) for leaves that belong to no param."""
    return lambda shape: shd.fsdp_shardings(jax.ShapeDtypeStruct(tuple(shape), np.float32), mesh,
                                            axis=axis, min_size=min_size).spec


def fsdp_param_shardings(params, mesh: Mesh, *, axis: str = "fsdp", min_size: int = 2 ** 12):
    """FSDP shardings for params that may hold structured weights.

    Dense leaves: ``jaxeff.sharding.fsdp_shardings`` (largest axis divisible by the ``axis`` size,
    leaves under ``min_size`` values replicated). A structured leaf gets the dense rule applied to
    its dense ``shape`` and then its registered rule (factors follow the dense weight's axes).
    A mesh without ``axis`` (or with size 1) replicates everything.
    """
    from jaxeff.params._structured import is_structured
    dense = jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), np.float32)
                         if is_structured(x) and hasattr(x, "shape") else x, params,
                         is_leaf=is_structured)
    dense_sh = shd.fsdp_shardings(dense, mesh, axis=axis, min_size=min_size)
    if not any(is_structured(x) for x in jax.tree.leaves(params, is_leaf=is_structured)):
        return dense_sh
    return derive_shardings(params, dense, dense_sh, mesh)
