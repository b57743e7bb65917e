"""Sharding rules for optimizer states and structured-parameter trees, derived from the params'.

``derive_shardings(tree, params, param_shardings)`` returns one ``NamedSharding`` per leaf of
``tree`` (an optimizer state, a train state, a tree of structured weights; arrays or
``jax.ShapeDtypeStruct``s) so that ``jit(..., out_shardings=...)`` places it next to the params it
belongs to, without gathering. The walk over ``tree``, at each node, first match wins:

1. **Mirror.** A subtree with the params' structure (``treedef.flatten_up_to`` succeeds: Adam's
   ``mu``/``nu``, Sophia's ``h``, pruning masks, EMA copies; ``optax.MaskedNode`` / ``None`` holes
   allowed) is walked leaf by leaf with that leaf's param as context.
2. **Rule.** A node whose type (or a base class) has a registered rule is handed to it
   (:func:`register_rule`; rules for jaxeff's own states are registered below by qualified class
   name, so importing this module imports none of them).
3. **Leaf.** An array with a param as context takes the param's spec when the shapes are equal;
   with a different shape, the spec of each param axis whose size it shares at the same position
   (or with one param axis dropped: Adafactor's row/column factors). Without a param: scalars
   replicated, other leaves by ``fallback(shape)`` (default: replicated).
4. Any other node: its children, recursively.

Every spec is then checked against the leaf's shape: an axis whose size the mesh axes do not
divide falls back to unsharded (never an error), and a mesh axis is used at most once.

Registered rules (``m x n`` is a param's matrix, its last two axes; ``b`` the leading axes):

* Sophia: ``mu`` and the Hessian EMA ``h`` take the param sharding; counters and key replicated.
* GaLore (``GaLoreState``): projector ``P [b, m, r]`` (left) shards ``m`` as the param shards
  ``m``, ``P [b, n, r]`` (right) shards ``n`` as the param shards ``n``; otherwise ``P`` is
  replicated (it is small, and a replicated ``P`` makes ``P^T G`` / ``G P`` local). Low-rank moments
  ``[b, r, n]`` (left) shard ``n`` and ``[b, m, r]`` (right) shard ``m`` with the param's mesh axis
  of that dimension, **or, when the param shards the projected dimension instead, with that mesh
  axis** (our choice: the moment memory is divided by the axis size, for one all-gather of the
  ``[b, r, n]`` low-rank update per step; a replicated moment would avoid that gather but hold
  the whole moment on every device); 'full' ``[b, r, r]`` keeps only the batch spec.
  Which param a projector belongs to is read from the shapes of the inner state (the leaves whose
  moments differ from the param shape); leaves with a non-default ``matrix_axes`` layout fall back
  to a replicated projector.
* Compressed states (``compress.GroupQuantized[DRE]``): codes ``[lead, G, g]`` and per-group
  ``scale`` / ``k`` ``[lead, G]`` keep the param's spec on the ``lead`` axes; when the param shards
  one of the grouped tail axes, the group axis ``G`` is sharded with it. That is exactly the
  param's layout when the sharded axis is the first grouped one; otherwise (e.g. a ``[D, V]`` head
  sharded on ``V`` and grouped as a whole) the layout differs and XLA re-shards the moment in
  every update (an all-to-all), which we prefer to a replicated moment.
* Pruning (``SparseState``): masks take the param sharding; the inner state is walked.
* Structured weights, from the dense weight's spec (``MatrixLayout.matrix_spec``): SLTrain / LoRA
  ``A [b, m, r]`` shards ``m``, ``B [b, r, n]`` shards ``n``; SLTrain's ``indices`` / ``values``
  ``[b, nnz]`` shard ``nnz`` over the mesh axis of the dense matrix when it divides ``nnz``; LoRA's
  ``base`` keeps the dense spec; low-rank ``L``/``R`` and SVFit ``U``/``Vt``/``residual`` likewise;
  ``QuantizedWeight`` codes ``packed [b, IN/P, OUT]`` and ``scale``/``zero [b, G, OUT]`` keep the
  ``OUT`` spec and shard their packed/grouped ``IN`` axis when whole words / groups fall in each
  shard; ``perm [b, IN]`` shards ``IN``. Other ``StructuredWeight``s use their ``factor_specs``.
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
from jaxeff.params._structured import is_structured

__all__ = ["ParamInfo", "Context", "derive_shardings", "fsdp_param_shardings", "fsdp_fallback",
           "register_rule", "rule_for", "aligned_spec"]

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


def _names(entry) -> tuple:
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
            names = _names(e)
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
        for n in (n for e in i.spec for n in _names(e)):
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
    dense = jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), np.float32)
                         if is_structured(x) and hasattr(x, "shape") else x, params,
                         is_leaf=is_structured)
    dense_sh = shd.fsdp_shardings(dense, mesh, axis=axis, min_size=min_size)
    if not any(is_structured(x) for x in jax.tree.leaves(params, is_leaf=is_structured)):
        return dense_sh
    return derive_shardings(params, dense, dense_sh, mesh)


# ------------------------------------------------------------------------------------------------
# Rules for jaxeff's own states (registered by qualified name: nothing is imported until used).

def _matrix(info: ParamInfo):
    return info.spec[:-2], info.spec[-2], info.spec[-1]


@register_rule("jaxeff.optim._sophia.SophiaState")
def _sophia(s, ctx):
    rep = ctx.replicated
    return s._replace(count=rep(s.count), mu=ctx.walk(s.mu), h=ctx.walk(s.h),
                      n_refresh=rep(s.n_refresh), key=rep(s.key), win_rate=rep(s.win_rate),
                      n_skipped=rep(s.n_skipped))


@register_rule("jaxeff.optim._sparsity.SparseState")
def _sparse(s, ctx):
    rep = ctx.replicated
    return s._replace(count=rep(s.count), masks=ctx.walk(s.masks),
                      inner_state=ctx.walk(s.inner_state), density_sum=rep(s.density_sum),
                      density_comp=rep(s.density_comp), dense=rep(s.dense),
                      n_bad_schedule=rep(s.n_bad_schedule))


_GROUPED = ("jaxeff.optim._compress.GroupQuantized", "jaxeff.optim._compress.GroupQuantizedDRE")


def _is_grouped(x) -> bool:
    return any(f"{k.__module__}.{k.__qualname__}" in _GROUPED for k in type(x).__mro__)


_CODES_CACHE: dict = {}


def _codes_shape(shape, group_size) -> tuple:
    """Shape of ``compress.quantize``'s codes for a dense leaf of ``shape``."""
    key = (tuple(shape), group_size)
    if key not in _CODES_CACHE:
        from jaxeff.optim import _compress as compress
        out = jax.eval_shape(lambda x: compress.quantize(x, "int8", group_size, False),
                             jax.ShapeDtypeStruct(tuple(shape), np.float32))
        _CODES_CACHE[key] = tuple(out.codes.shape)
    return _CODES_CACHE[key]


def _grouped(q, ctx):
    info = ctx.param
    if info is None or _codes_shape(info.shape, q.codes.shape[-1]) != tuple(q.codes.shape):
        return ctx.children(q)
    lead = q.codes.ndim - 2
    names = tuple(n for e in info.spec[lead:] for n in _names(e))
    g_spec = None if not names else names[0] if len(names) == 1 else names
    per_group = ctx.sharding(q.scale.shape, info.spec[:lead] + (g_spec,))
    return q._replace(codes=ctx.sharding(q.codes.shape, info.spec[:lead] + (g_spec, None)),
                      **{f: per_group for f in q._fields if f != "codes"})


for _name in _GROUPED:
    register_rule(_name, _grouped)


def _galore_sides(info: ParamInfo, ps, lows):
    """Which sides ``ps`` project the param's matrix on, or None when they cannot belong to it."""
    if len(info.shape) < 2 or not ps:
        return None
    (m, n), b = info.shape[-2:], info.shape[:-2]
    if any(tuple(p.shape[:-2]) != b for p in ps):
        return None
    r, d = ps[0].shape[-1], ps[0].shape[-2]
    if len(ps) == 2:
        return ("left", "right") if d == m and ps[1].shape[-2] == n else None
    if r > min(m, n) or d not in (m, n):
        return None
    if m != n:
        return ("left",) if d == m else ("right",)
    return ("left",) if b + (r, n) in lows and b + (m, r) not in lows else ("right",)


def _galore_plan(s, ctx):
    """``[(param index, sides)]``, one per projector: the params whose moments in the inner state
    differ from the param shape; else the first compatible param for each projector in turn."""
    infos = jax.tree.leaves(ctx.params, is_leaf=_is_info)
    lows: dict = {}

    def visit(node):
        sub = _mirror(node, ctx.params)
        if sub is None:
            kids, td = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
            if not (td.num_nodes == 1 and td.num_leaves == 1):
                for k in kids:
                    visit(k)
            return
        for i, x in enumerate(sub[1]):
            for y in jax.tree.leaves(x, is_leaf=_is_grouped):
                if _is_grouped(y):
                    if tuple(y.codes.shape) != _codes_shape(infos[i].shape, y.codes.shape[-1]):
                        lows.setdefault(i, set())
                elif _shape(y) != infos[i].shape:
                    lows.setdefault(i, set()).add(_shape(y))

    visit(s.inner_state)
    idx = sorted(lows)
    plan = [(i, _galore_sides(infos[i], ps, lows[i])) for i, ps in zip(idx, s.projectors)]
    if len(idx) == len(s.projectors) and all(sd for _, sd in plan):
        return plan
    plan, j = [], 0
    for ps in s.projectors:
        while j < len(infos) and _galore_sides(infos[j], ps, set()) is None:
            j += 1
        if j == len(infos):
            return None
        plan.append((j, _galore_sides(infos[j], ps, set())))
        j += 1
    return plan


@register_rule("jaxeff.optim._galore.GaLoreState")
def _galore(s, ctx):
    rep = ctx.replicated
    plan = _galore_plan(s, ctx) if ctx.params is not None else None
    if plan is None:  # no params to read shapes from: projectors replicated
        return s._replace(count=rep(s.count), projectors=rep(s.projectors),
                          inner_state=ctx.walk(s.inner_state))
    infos = jax.tree.leaves(ctx.params, is_leaf=_is_info)
    low, projs = list(infos), []
    for (i, sides), ps in zip(plan, s.projectors):
        (b, ms, ns), (m, n) = _matrix(infos[i]), infos[i].shape[-2:]
        projs.append(tuple(ctx.sharding(p.shape, b + (ms if side == "left" else ns, None))
                           for p, side in zip(ps, sides)))
        r = ps[0].shape[-1]
        if sides == ("left",):      # [b, r, n]: n sharded as the param's n, else as its m
            shape, spec = (r, n), (None, ns if _names(ns) else ms)
        elif sides == ("right",):   # [b, m, r]
            shape, spec = (m, r), (ms if _names(ms) else ns, None)
        else:
            shape, spec = (r, r), (None, None)
        low[i] = ParamInfo(infos[i].shape[:-2] + shape, b + spec)
    low_view = jax.tree.structure(ctx.params, is_leaf=_is_info).unflatten(low)
    return s._replace(count=rep(s.count), projectors=tuple(projs),
                      inner_state=ctx.with_(params=low_view).walk(s.inner_state))


def _structured_rule(field_specs):
    """A rule for a structured weight from ``field_specs(w, ctx, info, b, m_spec, n_spec) ->
    {field: spec}``, where ``b, m_spec, n_spec`` split the dense weight's spec (its
    ``layout.matrix_spec``, else the last two axes); ``None`` fields (``partition`` holes) stay
    None."""
    def rule(w, ctx):
        info = ctx.param
        if info is None or tuple(getattr(w, "shape", ())) != info.shape:
            return ctx.children(w)
        lay = getattr(w, "layout", None)      # QuantizedWeight: None unless not [..., IN, OUT]
        b, ms, ns = lay.matrix_spec(P(*info.spec)) if lay is not None else _matrix(info)
        specs = field_specs(w, ctx, info, tuple(b), ms, ns)
        return w.replace(**{f: None if getattr(w, f) is None else
                            ctx.sharding(_shape(getattr(w, f)), spec) for f, spec in specs.items()})
    return rule


register_rule("jaxeff.params._sltrain.SLTrainWeight", _structured_rule(
    lambda w, ctx, info, b, ms, ns: dict(A=b + (ms, None), B=b + (None, ns),
                                         indices=b + (ms if _names(ms) else ns,),
                                         values=b + (ms if _names(ms) else ns,))))
register_rule("jaxeff.params._lowrank.LowRankWeight", _structured_rule(
    lambda w, ctx, info, b, ms, ns: dict(L=b + (ms, None), R=b + (None, ns))))
register_rule("jaxeff.params._lowrank.SVFitWeight", _structured_rule(
    lambda w, ctx, info, b, ms, ns: dict(U=b + (ms, None), sigma=b + (None,),
                                         Vt=b + (None, ns), residual=b + (ms, ns))))
register_rule("jaxeff.params._lora.LoRAWeight", _structured_rule(
    lambda w, ctx, info, b, ms, ns: dict(base=info.spec, A=b + (ms, None), B=b + (None, ns))))


def _quantized_specs(w, ctx, info, b, in_s, out_s):
    """Packed words / groups run along IN: shard IN where each shard holds whole ones."""
    n_in = w.shape[-2]
    size = math.prod(ctx.mesh.shape.get(n, 0) for n in _names(in_s)) if _names(in_s) else 0
    whole = lambda unit: in_s if size and n_in % size == 0 and (n_in // size) % unit == 0 else None
    return dict(packed=b + (whole(32 // w.bits), out_s), scale=b + (whole(w.group_size), out_s),
                zero=b + (whole(w.group_size), out_s), perm=b + (in_s,))


register_rule("jaxeff.params._quantized.QuantizedWeight", _structured_rule(_quantized_specs))


@register_rule("jaxeff.params._structured.StructuredWeight")
def _any_structured(w, ctx):
    """Other structured weights: their ``factor_specs(dense_spec)`` hook, if they have one."""
    if ctx.param is None or not hasattr(w, "factor_specs"):
        return ctx.children(w)
    from jaxeff.params._structured import array_fields
    specs = w.factor_specs(P(*ctx.param.spec))
    return w.replace(**{f: None if getattr(w, f) is None else
                        ctx.sharding(_shape(getattr(w, f)), tuple(getattr(specs, f)))
                        for f in array_fields(w)})
