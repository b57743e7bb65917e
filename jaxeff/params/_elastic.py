"""Elastic sub-networks: extract fewer layers and narrower widths, and train all sizes at once.

Papers: "Starbucks: Improved Training for 2D Matryoshka Embeddings" (Zhuang et al., 2024) --
train with the loss summed over a *fixed list* of (layers, width) pairs, small to large, rather
than sampling one pair per step; "POA: Pre-training Once for Models of All Sizes" (Zhang et al.,
2024) -- an elastic student whose sub-networks (fewer layers, narrower MLP and fewer heads) are
taken from the full network and can be extracted after training.

A sub-network keeps a **prefix**: the first ``n`` layers and the first ``k`` units of each
logical width dimension, so every smaller model is nested inside every larger one (Matryoshka)::

    sub_layer[i] = layer[i]                       i < n          (or explicit layer indices)
    W'[..., :, j, :, ...] = W[..., :, j, :, ...]   j < k          on every axis carrying the dim

The spec is plain data, the format of :func:`jaxeff.params.widen` (no model is imported):
``{dim: [(regex, axis, role[, groups]), ...]}`` or ``{dim: {"units": n, "axes": [...]}}``. An axis
of length ``groups * n * inner`` is viewed as ``[groups, n, inner]`` and the middle one is
sliced; ``axis`` is counted on the stored leaf (use negative axes so stacked and per-layer leaves
agree); ``role`` is accepted for compatibility and does not change the slicing. For the
reference LLaMA (``G`` KV heads, each with ``R = H / G`` query heads; one unit = one KV head and
its query heads, so GQA stays consistent)::

    {"mlp": [(r"layers/(w_gate|w_up)$", -1, "out"), (r"layers/w_down$", -2, "in")],
     "heads": {"units": G, "axes": [(r"layers/(wq|wk|wv)$", -1, "out"),
                                    (r"layers/wo$", -2, "in")]}}

and a sub-model runs with ``n_layers = n``, ``d_ff = k_mlp``, ``n_kv_heads = k_heads``,
``n_heads = k_heads * R`` and the **same head_dim** (the test and the study give the adapter).
Depth uses :func:`jaxeff.params.gather_layers` (stacked or per-layer layouts). Everything
is slicing, so it jit-compiles and gradients flow back into the full params.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax

from jaxeff.params._layers import gather_layers, layer_count
from jaxeff.params._widen import dim_axes, explicit_units  # one spec format (widen)
from jaxeff.select import flatten_with_paths, select_mask

__all__ = ["ElasticSize", "spec_units", "resolve_size", "extract_subnetwork", "elastic_loss"]


class ElasticSize(NamedTuple):
    """One sub-network size: ``layers`` (int n, a list of layer indices, or None = all) and
    ``widths`` (None = full, a float fraction in (0, 1] of every spec dimension, or
    ``{dim: units}``). :func:`resolve_size` turns it into ints."""

    layers: Any = None
    widths: Any = None


# ----------------------------------------------------------------------------- spec
def _parse_spec(spec) -> dict:
    """``{dim: (units, [(regex, axis, groups)])}`` through widen's parser (one spec format)."""
    if not isinstance(spec, Mapping):
        raise TypeError(f"spec must be a dict {{dim: axes}}; got {type(spec).__name__}")
    units_now = explicit_units(spec)
    out = {}
    for dim in spec:
        units, axes = dim_axes(spec, dim, units_now)
        out[dim] = (units, [(rx, axis, groups) for rx, axis, _, groups in axes])
    return out


def _plan(params, spec: dict) -> dict:
    """``{dim: (n_units, {leaf_index: (axis, groups, path)})}``, validated against the shapes."""
    flat = flatten_with_paths(params)[0]
    plans, owner = {}, {}
    for dim, (units, axes) in spec.items():
        plan = {}
        for rx, axis, groups in axes:
            mask = jax.tree.leaves(select_mask(rx, params, argname=f"spec[{dim!r}] regex"))
            for i, hit in enumerate(mask):
                if not hit:
                    continue
                p, x = flat[i]
                key = (i, _norm_axis(axis, x, p, dim))
                if key in owner:
                    raise ValueError(f"spec: axis {axis} of leaf {p} is claimed by both "
                                     f"{owner[key]!r} and {dim!r}")
                owner[key] = dim
                ax = key[1]
                length = x.shape[ax]
                n = units if units is not None else length // groups
                if length % (groups * n):
                    raise ValueError(f"spec[{dim!r}]: leaf {p} axis {axis} has length {length}, "
                                     f"not divisible by groups*units = {groups}*{n}")
                plan.setdefault(i, []).append((ax, groups, n, p))
        ns = {e[2] for v in plan.values() for e in v}
        if len(ns) != 1:
            raise ValueError(f"spec[{dim!r}]: leaves disagree on the unit count "
                             f"{ {e[3]: e[2] for v in plan.values() for e in v} }; give "
                             f"spec[{dim!r}]['units']")
        plans[dim] = (ns.pop(), plan)
    return plans


def _norm_axis(axis, x, p, dim):
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"spec[{dim!r}]: axis {axis} out of range for leaf {p} of rank {x.ndim}")
    return axis % x.ndim


def spec_units(params, spec) -> dict:
    """Current number of units of every spec dimension, ``{dim: n}``.

    Raises ValueError / TypeError for a malformed spec, a regex that matches no leaf, or leaves
    that disagree on a dimension's unit count.
    """
    return {d: n for d, (n, _) in _plan(params, _parse_spec(spec)).items()}


# ----------------------------------------------------------------------------- sizes
def _check_size_format(size, where="size"):
    if not isinstance(size, ElasticSize):
        if isinstance(size, (tuple, list)) and len(size) == 2:
            size = ElasticSize(*size)
        else:
            raise TypeError(f"{where} must be an ElasticSize or a (layers, widths) pair; got "
                            f"{size!r}")
    layers, widths = size
    if layers is not None and not (isinstance(layers, numbers.Integral)
                                   and not isinstance(layers, bool)):
        if not (isinstance(layers, (list, tuple)) and layers
                and all(isinstance(i, numbers.Integral) and not isinstance(i, bool)
                        for i in layers)):
            raise ValueError(f"{where}.layers must be None, a positive int or a non-empty list of "
                             f"layer indices; got {layers!r}")
    elif layers is not None and layers < 1:
        raise ValueError(f"{where}.layers must be >= 1; got {layers!r}")
    if widths is not None and not isinstance(widths, Mapping):
        if isinstance(widths, bool) or not isinstance(widths, numbers.Real) \
                or not 0 < widths <= 1:
            raise ValueError(f"{where}.widths must be None, a fraction in (0, 1] or {{dim: "
                             f"units}}; got {widths!r}")
    if isinstance(widths, Mapping):
        for d, k in widths.items():
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
                raise ValueError(f"{where}.widths[{d!r}] must be an int >= 1; got {k!r}")
    return size


def resolve_size(params, spec, size, *, layers_path: str = "layers", layer_axis: int = 0,
                 layout: str = "auto") -> ElasticSize:
    """``size`` with ints: ``layers`` a tuple of kept layer indices, ``widths`` ``{dim: k}`` for
    every spec dimension (the full count where unset; a fraction ``f`` gives
    ``max(1, round(f * n))``).

    Raises ValueError naming the size when it is larger than the model (more layers than L, a
    layer index out of range, more units than a dimension has) or names an unknown dimension.
    """
    size = _check_size_format(size)
    layers, widths = size
    if layers is None:
        idx = None
    else:
        L = layer_count(params, layers=layers_path, layer_axis=layer_axis, layout=layout)
        idx = tuple(range(layers)) if isinstance(layers, numbers.Integral) else tuple(
            int(i) for i in layers)
        if isinstance(layers, numbers.Integral) and layers > L:
            raise ValueError(f"size {tuple(size)} asks for {layers} layers but the model has "
                             f"{L}")
        if min(idx) < 0 or max(idx) >= L:
            raise ValueError(f"size {tuple(size)}: layer indices must lie in [0, {L}); got "
                             f"{list(idx)}")
    full = spec_units(params, spec) if spec else {}
    if isinstance(widths, Mapping):
        unknown = [d for d in widths if d not in full]
        if unknown:
            raise ValueError(f"size {tuple(size)} names dimensions {unknown} that the spec lacks "
                             f"(spec has {list(full)})")
        ks = {d: int(widths.get(d, n)) for d, n in full.items()}
    elif widths is None:
        ks = dict(full)
    else:
        ks = {d: max(1, int(round(float(widths) * n))) for d, n in full.items()}
    for d, k in ks.items():
        if k > full[d]:
            raise ValueError(f"size {tuple(size)}: widths[{d!r}]={k} is larger than the model's "
                             f"{full[d]} units")
    return ElasticSize(layers=idx, widths=ks)


# ----------------------------------------------------------------------------- extraction
def _slice(x, ax, groups, n, k):
    if k == n:
        return x
    inner = x.shape[ax] // (groups * n)
    view = x.reshape(x.shape[:ax] + (groups, n, inner) + x.shape[ax + 1:])
    view = jax.lax.slice_in_dim(view, 0, k, axis=ax + 1)
    return view.reshape(x.shape[:ax] + (groups * k * inner,) + x.shape[ax + 1:])


def extract_subnetwork(params, spec=None, *, layers: Union[None, int, Sequence[int]] = None,
                       widths: Union[None, float, Mapping] = None, layers_path: str = "layers",
                       layer_axis: int = 0, layout: str = "auto"):
    """Sub-network params: the first ``layers`` layers (or those indices) and the first ``k``
    units of every width dimension in ``widths`` (see the module docstring for the formula).

    The full size (``layers=None`` or L, ``widths=None`` or full) returns the params unchanged.

    Papers: "Starbucks" (Zhuang et al., 2024); "POA" (Zhang et al., 2024).

    Args:
      params: any params pytree.
      spec: width spec ``{dim: axes}`` (module docstring); needed when ``widths`` is given.
      layers: None (all), an int n (the first n) or a list of layer indices (kept in order).
      widths: None (full), a fraction in (0, 1] of every spec dimension, or ``{dim: units}``.
      layers_path, layer_axis, layout: where the layers are (``jaxeff.params.growth``).

    Raises:
      ValueError / TypeError naming the argument: sizes larger than the model, unknown
      dimensions, widths without a spec, a malformed spec, a regex matching nothing.
    """
    if widths is not None and not spec:
        raise ValueError("widths needs a spec {dim: axes} saying which leaf axes carry each "
                         "dimension")
    size = resolve_size(params, spec, ElasticSize(layers, widths), layers_path=layers_path,
                        layer_axis=layer_axis, layout=layout)
    out = params
    if size.layers is not None:
        L = layer_count(params, layers=layers_path, layer_axis=layer_axis, layout=layout)
        if size.layers != tuple(range(L)):
            out = gather_layers(params, size.layers, layers=layers_path, layer_axis=layer_axis,
                                layout=layout)
    if spec and size.widths:
        plans = _plan(out, _parse_spec(spec))
        flat, treedef = jax.tree_util.tree_flatten_with_path(out)
        leaves = [x for _, x in flat]
        for dim, (n, plan) in plans.items():
            k = size.widths[dim]
            for i, entries in plan.items():
                for ax, groups, n_i, _ in entries:
                    leaves[i] = _slice(leaves[i], ax, groups, n_i, k)
        out = jax.tree_util.tree_unflatten(treedef, leaves)
    return out


def elastic_loss(loss_fn: Callable, spec, sizes: Sequence, *,
                 weights: Optional[Sequence[float]] = None, layers_path: str = "layers",
                 layer_axis: int = 0, layout: str = "auto") -> Callable:
    """A loss summed over a fixed list of sub-network sizes (Starbucks' 2D Matryoshka training).

    ``loss(params, batch) = sum_k w_k * loss_fn(sub_k(params), batch, size_k)[0]`` where
    ``sub_k = extract_subnetwork(params, spec, layers=n_k, widths=widths_k)`` and ``size_k`` is
    the :func:`resolve_size` result (ints), so ``loss_fn`` can build the matching model config.
    Gradients of every size flow into the shared (full) params. Default weights 1 (a sum, as
    in Starbucks). Returns ``(loss, aux)`` with ``aux['loss_<i>']`` per size and the last size's
    aux entries.

    Papers: "Starbucks" (Zhuang et al., 2024); "POA" (Zhang et al., 2024).

    Args:
      loss_fn: ``(sub_params, batch, size: ElasticSize) -> (loss, aux)``.
      spec: width spec (may be None for depth-only sizes).
      sizes: non-empty list of ``(layers, widths)`` pairs / :class:`ElasticSize`.
      weights: optional non-negative weights, one per size.
      layers_path, layer_axis, layout: as in :func:`extract_subnetwork`.

    Raises:
      ValueError / TypeError (at construction) for an empty ``sizes``, a malformed size, weights
      of the wrong length or sign, a non-callable ``loss_fn``; at the first call, what
      :func:`resolve_size` raises (sizes larger than the model).
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable; got {type(loss_fn).__name__}")
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes:
        raise ValueError(f"sizes must be a non-empty list of (layers, widths) pairs; got "
                         f"{sizes!r}")
    sizes = [_check_size_format(s, f"sizes[{i}]") for i, s in enumerate(sizes)]
    if spec is not None:
        _parse_spec(spec)
    if any(s.widths is not None for s in sizes) and not spec:
        raise ValueError("sizes with widths need a spec {dim: axes}")
    if weights is None:
        w = [1.0] * len(sizes)
    else:
        w = [float(x) for x in weights]
        if len(w) != len(sizes) or any(not math.isfinite(x) or x < 0 for x in w):
            raise ValueError(f"weights must be {len(sizes)} finite numbers >= 0; got {weights!r}")
    kw = dict(layers_path=layers_path, layer_axis=layer_axis, layout=layout)

    def loss(params, batch):
        total, aux_all = 0.0, {}
        for i, (s, wi) in enumerate(zip(sizes, w)):
            r = resolve_size(params, spec, s, **kw)
            sub = extract_subnetwork(params, spec, layers=s.layers, widths=s.widths, **kw)
            li, aux = loss_fn(sub, batch, r)
            total = total + wi * li
            aux_all[f"loss_{i}"] = li
            if i == len(sizes) - 1 and aux:
                aux_all.update(aux)
        return total, aux_all

    return loss

