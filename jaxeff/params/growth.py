"""Depth growth by stacking (G_stack), its timing rule, and the train-state switch at growth.

Paper: "Stacking Your Transformers: A Closer Look at Model Growth for Efficient LLM
Pre-Training" (Du et al., NeurIPS 2024, arXiv 2405.15319). Train an ``L``-layer model for ``d``
tokens, stack it ``g`` times (``g = 4``) and continue training the ``g*L``-layer model.

Operator (whole-model order, the paper's ``G_stack``)::

    grown_layer[i] = source_layer[i mod L]        i = 0 .. g*L - 1   (0..L-1, 0..L-1, ...)

bert2BERT's *inner stacking* (``order="interleave"``) is ``grown_layer[i] = source_layer[i // g]``
(``0,0,..,1,1,..``). Embedding, final norm and head are copied unchanged.

Growth timing (the paper's fitted guideline, ``d`` in tokens, ``N`` the target model's parameter
count, ``C = 6 N D`` the training compute)::

    log10(d) = 0.88 * log10(N) + 163.27 / log10(C) - 5.74

Layer layouts (model-agnostic: no model code is imported). ``layers`` is the ``/``-joined path of
the layer container inside the params pytree (``"layers"``, ``"model/blocks"``; ``""`` = the root):

* **stacked** (scanned) — every leaf under the path carries the layer axis ``layer_axis``
  (e.g. ``layers/wq: [L, D, H*hd]``);
* **per-layer** — the path holds a list/tuple of per-layer subtrees, or a dict whose keys are one
  prefix plus ``0..L-1`` (``{"block_0": {...}, "block_1": {...}}``).

:func:`gather_layers` (new layer ``i`` = old layer ``indices[i]``) is the single primitive behind
stacking, identity-block insertion (:mod:`jaxeff.params.widen`) and depth pruning
(:mod:`jaxeff.params.depth_prune`). Every output leaf is a fresh buffer (no aliasing with the input),
so donating either tree later is safe.

After growth (:func:`grow_train_state`), the reference (tongxuluo/prts ``stacking_6L_24L``) uses a
**fresh AdamW** with a **restarted step count and warmup**, and its loader **skips the data the small
model already saw** — with an iterator that simply continues, that is automatic: pass the same
iterator on. The alternative keeps the optimizer moments, grown exactly like the parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.select import path_str

__all__ = ["stack_depth", "gather_layers", "layer_count", "growth_tokens", "grow_train_state",
           "stacked_layers", "DEFAULT_GROWTH_FACTOR"]

DEFAULT_GROWTH_FACTOR = 4
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


def stack_depth(params, factor: int = DEFAULT_GROWTH_FACTOR, *, layers: str = "layers",
                layer_axis: int = 0, order: str = "stack", layout: str = "auto"):
    """G_stack: grow an ``L``-layer model to ``factor * L`` layers by stacking it.

    ``order="stack"`` (the paper's G_stack, default): ``grown[i] = src[i mod L]``, i.e. the whole
    model repeated ``0..L-1, 0..L-1, ...``. ``order="interleave"`` (bert2BERT inner stacking,
    ``jnp.repeat``): ``grown[i] = src[i // factor]``. Leaves outside ``layers`` are unchanged.
    Not function-preserving (do not expect equal outputs).

    Paper: "Stacking Your Transformers: A Closer Look at Model Growth for Efficient LLM
    Pre-Training" (Du et al., 2024).

    Args:
      params: any pytree with a layer container at ``layers`` (stacked or per-layer layout).
      factor: growth factor ``g >= 1`` (default 4, the paper's choice).
      layers, layer_axis, layout: where the layers are (see :func:`stacked_layers`).
      order: ``"stack"`` or ``"interleave"``.

    Raises TypeError for a non-int ``factor``; ValueError for ``factor < 1``, an unknown
    ``order``, or a ``layers`` path that matches nothing.
    """
    if not isinstance(factor, (int, np.integer)) or isinstance(factor, bool):
        raise TypeError(f"factor must be an int >= 1; got {type(factor).__name__} {factor!r}")
    if factor < 1:
        raise ValueError(f"factor must be an int >= 1; got {factor}")
    if order not in ("stack", "interleave"):
        raise ValueError(f"order must be 'stack' (G_stack, i mod L) or 'interleave' "
                         f"(i // factor); got {order!r}")
    n = layer_count(params, layers=layers, layer_axis=layer_axis, layout=layout)
    i = np.arange(factor * n)
    idx = i % n if order == "stack" else i // factor
    return gather_layers(params, idx, layers=layers, layer_axis=layer_axis, layout=layout)


# ----------------------------------------------------------------------------------------------
# Growth timing


def growth_tokens(n_params: float, tokens: Optional[float] = None, *,
                  compute: Optional[float] = None, a: float = 0.88, b: float = 163.27,
                  c: float = -5.74) -> float:
    """Tokens ``d`` to train the small model before stacking, from the paper's fitted guideline.

    ``log10(d) = a*log10(N) + b/log10(C) + c`` with ``a = 0.88``, ``b = 163.27``, ``c = -5.74``,
    ``N`` the *target* (grown) model's parameter count and ``C = 6*N*D`` FLOPs for a budget of
    ``D`` tokens. E.g. Llama2-7B on 2T tokens: ``d = 11.11e9``. The fit covers LLM scale
    (``C`` around 1e20-1e24); at tiny compute it returns ``d > D`` (i.e. "do not grow").

    Paper: "Stacking Your Transformers" (Du et al., 2024), growth-timing guideline.

    Args:
      n_params: target model parameters ``N`` (> 0).
      tokens: the token budget ``D`` (> 0); exactly one of ``tokens`` / ``compute``.
      compute: the FLOP budget ``C`` (> 1) instead of ``tokens``.
      a, b, c: the fitted coefficients.

    Raises ValueError for non-positive inputs or when neither/both budgets are given.
    """
    if not (isinstance(n_params, (int, float, np.number)) and n_params > 0):
        raise ValueError(f"n_params must be a positive number; got {n_params!r}")
    if (tokens is None) == (compute is None):
        raise ValueError("give exactly one of tokens (D) or compute (C = 6*N*D); got "
                         f"tokens={tokens!r}, compute={compute!r}")
    if tokens is not None:
        if not tokens > 0:
            raise ValueError(f"tokens must be > 0; got {tokens!r}")
        compute = 6.0 * float(n_params) * float(tokens)
    if not compute > 1:
        raise ValueError(f"compute must be > 1 FLOP; got {compute!r}")
    return float(10.0 ** (a * math.log10(n_params) + b / math.log10(compute) + c))


# ----------------------------------------------------------------------------------------------
# The train-state switch at growth


def _same_shapes(node, params_def, shapes) -> bool:
    try:
        if jax.tree.structure(node) != params_def:
            return False
    except Exception:
        return False
    return [getattr(x, "shape", None) for x in jax.tree.leaves(node)] == shapes


def grow_train_state(state, grow: Callable[[Any], Any], *, tx=None, opt_state: str = "fresh",
                     reset_step: bool = True, restart_schedule: bool = True):
    """Grow the params of a ``jaxeff.train.TrainState`` and switch its optimizer state, in one call.

    ``params' = grow(params)``. The optimizer state becomes, by ``opt_state``:

    * ``"fresh"`` (default; the reference): ``tx.init(params')`` — new moments, count 0, so the
      schedule (warmup included) restarts. ``tx`` is the optimizer for the grown model.
    * ``"grow"``: every subtree of the old optimizer state with the params' structure and shapes
      (Adam's ``mu``/``nu``, momentum, ...) goes through the same ``grow``, so moments are stacked
      exactly like the weights; other leaves are kept, except that with ``restart_schedule`` the
      ``count`` leaves (optax's step counters) are reset to 0. ``grow`` must be deterministic
      (pass explicit mappings to randomised growth operators).

    With ``reset_step`` (default, the reference's restarted step count) ``state.step`` becomes 0
    and the PRNG key is ``fold_in(rng, old_step)`` so no step key repeats. The data iterator is
    not part of the state: keep passing the same iterator and it continues where it was, which is
    the reference's "skip what the base model saw".

    Paper: "Stacking Your Transformers" (Du et al., 2024); reference tongxuluo/prts.

    Args:
      state: a ``TrainState`` (any flax.struct dataclass with ``step``, ``params``, ``opt_state``,
        ``rng``).
      grow: ``params -> params`` (e.g. ``functools.partial(stack_depth, factor=4)``).
      tx: optax transformation for the grown model (required for ``"fresh"``).
      opt_state: ``"fresh"`` or ``"grow"``.
      reset_step: restart ``state.step`` at 0 (default True).
      restart_schedule: for ``"grow"``, reset optax ``count`` leaves to 0 (default True).

    Raises TypeError for a non-callable ``grow``; ValueError for an unknown ``opt_state``, a
    missing ``tx``, or a ``"grow"`` state holding array leaves none of which is params-shaped.
    """
    if not callable(grow):
        raise TypeError(f"grow must be a callable params -> params; got {type(grow).__name__}")
    if opt_state not in ("fresh", "grow"):
        raise ValueError(f"opt_state must be 'fresh' (new tx.init, reference) or 'grow' (moments "
                         f"grown like the params); got {opt_state!r}")
    if opt_state == "fresh" and tx is None:
        raise ValueError("opt_state='fresh' needs tx, the optimizer for the grown model")
    params = state.params
    new_params = grow(params)
    if opt_state == "fresh":
        new_opt = tx.init(new_params)
    else:
        pdef = jax.tree.structure(params)
        shapes = [x.shape for x in jax.tree.leaves(params)]
        found = [0]

        def is_params_like(n):
            return _same_shapes(n, pdef, shapes)

        def visit(path, n):
            if is_params_like(n):
                found[0] += 1
                return grow(n)
            if restart_schedule and path and path_str(path[-1:]) == "count" and _is_array(n):
                return jnp.zeros_like(n)
            return jnp.array(n, copy=True) if _is_array(n) else n

        new_opt = jax.tree_util.tree_map_with_path(visit, state.opt_state, is_leaf=is_params_like)
        big = [x for x in jax.tree.leaves(state.opt_state) if _is_array(x) and x.ndim > 0]
        if big and not found[0]:
            raise ValueError("opt_state='grow': no part of the optimizer state has the params' "
                             "structure and shapes (e.g. a masked or factored state); use "
                             "opt_state='fresh' with tx")
    step, rng = state.step, state.rng
    if reset_step:
        rng = jax.random.fold_in(rng, step)
        step = jnp.zeros_like(step)
    return state.replace(step=step, params=new_params, opt_state=new_opt, rng=rng)
