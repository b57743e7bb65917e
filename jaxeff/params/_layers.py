"""Layer containers in a params pytree: find them, view them stacked, gather layers.

Model-agnostic (no model code is imported). ``layers`` is the ``/``-joined path of the layer
container inside the params pytree (``"layers"``, ``"model/blocks"``; ``""`` = the root):

* **stacked** (scanned) -- every leaf under the path carries the layer axis ``layer_axis``
  (e.g. ``layers/wq: [L, D, H*hd]``);
* **per-layer** -- the path holds a list/tuple of per-layer subtrees, or a dict whose keys are one
  prefix plus ``0..L-1`` (``{"block_0": {...}, "block_1": {...}}``).

:func:`gather_layers` (new layer ``i`` = old layer ``indices[i]``) is the single primitive behind
depth stacking (:mod:`jaxeff.params.growth`), identity-block insertion (:mod:`jaxeff.params.widen`),
depth pruning (:mod:`jaxeff.params.depth_prune`) and sub-network extraction
(:mod:`jaxeff.params.elastic`). Every output leaf is a fresh buffer (no aliasing with the input).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.select import path_str

__all__ = ["stacked_layers", "layer_count", "gather_layers"]

_INDEXED_KEY = re.compile(r"^(.*?)(\d+)$")

# ----------------------------------------------------------------------------------------------
# Navigating to the layer container (dicts, Mappings, lists, tuples, NamedTuples, dataclasses)


def _parts(layers: str) -> list[str]:
    if not isinstance(layers, str):
        raise TypeError(f"layers must be a '/'-joined path string (e.g. 'layers'); got "
                        f"{type(layers).__name__}")
    return [p for p in layers.split("/") if p]


def _child(node, part: str):
    if isinstance(node, Mapping):
        if part in node:
            return node[part]
        if part.lstrip("-").isdigit() and int(part) in node:
            return node[int(part)]
        raise KeyError(part)
    if isinstance(node, tuple) and hasattr(node, "_fields") and part in node._fields:
        return getattr(node, part)
    if isinstance(node, (list, tuple)):
        if not part.isdigit() or int(part) >= len(node):
            raise KeyError(part)
        return node[int(part)]
    if dataclasses.is_dataclass(node) and part in {f.name for f in dataclasses.fields(node)}:
        return getattr(node, part)
    raise KeyError(part)


def _with_child(node, part: str, value):
    if isinstance(node, Mapping):
        key = part if part in node else int(part)
        d = dict(node)
        d[key] = value
        return _like_mapping(node, d)
    if isinstance(node, tuple) and hasattr(node, "_fields") and part in node._fields:
        return node._replace(**{part: value})
    if isinstance(node, (list, tuple)):
        new = list(node)
        new[int(part)] = value
        return type(node)(new) if isinstance(node, list) else tuple(new)
    if hasattr(node, "replace"):                      # flax.struct dataclasses
        return node.replace(**{part: value})
    return dataclasses.replace(node, **{part: value})


def _like_mapping(template, d: dict):
    if type(template) is dict:
        return d
    try:
        return type(template)(d)
    except Exception:  # a Mapping type that cannot be built from a dict: fall back to dict
        return d


def _locate(params, layers: str):
    node = params
    parts = _parts(layers)
    for i, part in enumerate(parts):
        try:
            node = _child(node, part)
        except (KeyError, TypeError, ValueError):
            avail = (list(node.keys()) if isinstance(node, Mapping)
                     else f"a {type(node).__name__}")
            raise ValueError(
                f"layers={layers!r} matches nothing in params: no entry {part!r} under "
                f"{'/'.join(parts[:i]) or '<root>'} (available: {avail})") from None
    return node


def _set(params, parts: list[str], value):
    if not parts:
        return value
    return _with_child(params, parts[0], _set(_child(params, parts[0]), parts[1:], value))


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _per_layer_keys(node) -> Optional[tuple[str, list]]:
    """(prefix, keys in layer order) if ``node`` is a dict of per-layer subtrees, else None."""
    if not isinstance(node, Mapping) or not node:
        return None
    found = {}
    prefix = None
    for k in node:
        m = _INDEXED_KEY.match(str(k))
        if m is None or (prefix is not None and m.group(1) != prefix) or _is_array(node[k]):
            return None
        prefix = m.group(1)
        found[int(m.group(2))] = k
    if sorted(found) != list(range(len(found))):
        return None
    return prefix, [found[i] for i in range(len(found))]


def _layout_of(node, layout: str) -> str:
    if layout not in ("auto", "stacked", "per_layer"):
        raise ValueError(f"layout must be 'auto', 'stacked' or 'per_layer'; got {layout!r}")
    per = (isinstance(node, (list, tuple)) and not hasattr(node, "_fields") and len(node) > 0
           and not any(_is_array(x) for x in node)) or _per_layer_keys(node) is not None
    if layout == "auto":
        return "per_layer" if per else "stacked"
    if layout == "per_layer" and not per:
        raise ValueError("layout='per_layer' but the layer container is neither a list/tuple of "
                         "subtrees nor a dict keyed <prefix>0..<prefix>L-1")
    return layout


def stacked_layers(params, *, layers: str = "layers", layer_axis: int = 0,
                   layout: str = "auto"):
    """View the layers as one stacked subtree with the layer axis first.

    Returns ``(stacked, n_layers, rebuild)``: ``stacked`` is the layer subtree whose leaves carry
    the layer axis at position 0 (a per-layer container is stacked with ``jnp.stack``; a stacked
    one has ``layer_axis`` moved to 0), and ``rebuild(new_stacked)`` puts a stacked subtree with
    any number of layers back into ``params`` (or into ``base``, a tree with the same container
    path, when given as ``rebuild(new, base)``) in the original layout.

    Raises ValueError when ``layers`` matches nothing, the container is empty, leaves lack the
    layer axis, layers disagree in size, or per-layer subtrees differ in structure or shape.
    """
    if not isinstance(layer_axis, int) or isinstance(layer_axis, bool) or layer_axis < 0:
        raise ValueError(f"layer_axis must be a non-negative int; got {layer_axis!r}")
    parts = _parts(layers)
    node = _locate(params, layers)
    kind = _layout_of(node, layout)
    if kind == "per_layer":
        if isinstance(node, Mapping):
            prefix, keys = _per_layer_keys(node)
            subs = [node[k] for k in keys]
        else:
            prefix, subs = None, list(node)
        defs = {jax.tree.structure(s) for s in subs}
        if len(defs) != 1:
            raise ValueError(f"layers={layers!r}: per-layer subtrees differ in structure; growth "
                             "and pruning need identical layers")
        try:
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *subs)
        except (ValueError, TypeError) as e:
            raise ValueError(f"layers={layers!r}: per-layer leaves differ in shape: {e}") from None

        def rebuild(new, base=None):
            n = _n_layers(new, layers)
            items = [jax.tree.map(lambda x, i=i: x[i], new) for i in range(n)]
            if isinstance(node, Mapping):
                cont = _like_mapping(node, {f"{prefix}{i}": s for i, s in enumerate(items)})
            else:
                cont = type(node)(items) if isinstance(node, list) else tuple(items)
            return _set(params if base is None else base, parts, cont)

        return stacked, len(subs), rebuild

    leaves = jax.tree.leaves(node)
    if not leaves:
        raise ValueError(f"layers={layers!r} matches a subtree without array leaves")
    for p, x in jax.tree_util.tree_flatten_with_path(node)[0]:
        if not _is_array(x) or x.ndim <= layer_axis:
            raise ValueError(f"layers={layers!r}: leaf {path_str(p) or '<root>'} with shape "
                             f"{getattr(x, 'shape', None)} has no layer axis {layer_axis}")
    n = _n_layers(node, layers, layer_axis)
    stacked = jax.tree.map(lambda x: jnp.moveaxis(x, layer_axis, 0), node)

    def rebuild(new, base=None):
        _n_layers(new, layers)
        return _set(params if base is None else base, parts,
                    jax.tree.map(lambda x: jnp.moveaxis(x, 0, layer_axis), new))

    return stacked, n, rebuild


def _n_layers(tree, layers: str, axis: int = 0) -> int:
    sizes = {path_str(p): x.shape[axis] for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"layers={layers!r}: leaves disagree on the number of layers along "
                         f"axis {axis}: {sizes}")
    return next(iter(sizes.values()))


def layer_count(params, *, layers: str = "layers", layer_axis: int = 0,
                layout: str = "auto") -> int:
    """Number of layers in the container at ``layers`` (see :func:`stacked_layers`); shapes
    only, nothing is computed. Raises what :func:`stacked_layers` raises."""
    shapes = jax.eval_shape(lambda p: stacked_layers(p, layers=layers, layer_axis=layer_axis,
                                                     layout=layout)[0], params)
    return jax.tree.leaves(shapes)[0].shape[0]


def _fresh(tree):
    """Copy every array leaf (no output buffer aliases an input buffer)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if _is_array(x) else x, tree)


def gather_layers(params, indices: Sequence[int], *, layers: str = "layers", layer_axis: int = 0,
                  layout: str = "auto"):
    """New layer ``i`` = old layer ``indices[i]``; every other leaf copied unchanged.

    The primitive of depth growth (repeated indices) and depth pruning (a subset). Works on both
    layouts (see module docstring) and under ``jax.jit`` (``indices`` are static).

    Args:
      params: any pytree holding the layers at ``layers``.
      indices: non-empty sequence of ints in ``[0, L)``.
      layers: ``/``-joined path of the layer container (default ``"layers"``).
      layer_axis: the layer axis of stacked leaves (default 0).
      layout: ``"auto"`` (default), ``"stacked"`` or ``"per_layer"``.

    Raises ValueError for an empty ``indices``, an index out of range, or a bad ``layers``.
    """
    n = layer_count(params, layers=layers, layer_axis=layer_axis, layout=layout)
    idx = np.asarray(list(indices))
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be a non-empty sequence of ints; got {list(indices)!r}")
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"indices must lie in [0, {n}) (the model has {n} layers); got "
                         f"{idx.tolist()}")
    # one compiled program instead of one dispatch per leaf and op
    return _gather_jit(params, tuple(int(i) for i in idx), layers, layer_axis, layout)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _gather_jit(params, idx, layers, layer_axis, layout):
    stacked, _, rebuild = stacked_layers(params, layers=layers, layer_axis=layer_axis,
                                         layout=layout)
    out = rebuild(jax.tree.map(lambda x: jnp.take(x, jnp.asarray(idx), axis=0), stacked))
    return _fresh(out)
