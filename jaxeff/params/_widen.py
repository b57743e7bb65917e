"""Function-preserving width and depth growth (Net2Net, bert2BERT FPI) and bert2BERT's AKI.

Papers: "Net2Net: Accelerating Learning via Knowledge Transfer" (Chen, Goodfellow, Shlens, ICLR
2016); "bert2BERT: Towards Reusable Pretrained Language Models" (Chen et al., ACL 2022).

A *logical dimension* (the MLP hidden size, the attention heads, the residual width) with ``n``
units grows to ``n' >= n`` units through a mapping ``g: [n'] -> [n]`` (``g(j) = j`` for the kept
units). Every leaf axis that carries the dimension is expanded by its *role*::

    out  (producer, copy):   U[..., j, ...] = W[..., g(j), ...]
    in   (consumer, divide): U[..., j, ...] = W[..., g(j), ...] * s_j,  sum_{j: g(j)=k} s_j = 1
    norm (per-unit scale, e.g. RMSNorm; copy) -- marks the dimension as normalised over
    tied (an embedding read as input *and* output; copied, hence approximate)

with ``s_j = 1/|g^-1(g(j))|`` (``split="equal"``, Net2Net/bert2BERT FPI) or random positive
shares summing to one per source unit (``split="random"``: still exact, and it breaks the symmetry
between copies, which equal splitting never does — an option beyond the papers).

Exactness (checked, warned about with :class:`GrowthWarning`, or raised with
``on_approx="raise"``):

* MLP hidden units, attention heads: exact for any ``g`` (SwiGLU included). Heads keep their
  ``head_dim``; under GQA grow the KV heads and their query groups together (one unit = one KV head
  with its ``R`` query heads) or the query heads per group (``groups = "kv_heads"``).
* Residual width (a dimension with a ``norm`` axis): exact only when every unit is duplicated
  equally often (``n' = k*n`` with the cyclic mapping), which keeps RMS statistics; otherwise
  approximate.
* ``tied`` embeddings: the input side must copy while the output side must divide — approximate.
* :func:`insert_identity_layers`: new pre-norm blocks whose output projections are zero are the
  identity — exact.
* ``method="aki"`` (bert2BERT Advanced Knowledge Initialization): new *producer* units of layer
  ``l`` are taken from layer ``l+1`` (the top layer uses itself); not function-preserving, but it
  breaks symmetry and converged faster in the paper.

Spec (plain data; no model is imported). ``{dim_name: {"units": n or None, "axes": [(regex, axis,
role) or (regex, axis, role, groups), ...]}}``, or just the list of axes; ``groups`` is an int or
the name of another dimension with explicit ``units`` (its *current* count, so dimensions that share
an axis can grow in one call). ``regex`` selects leaves by
their ``/``-joined path (``jaxeff.select``), ``axis`` is counted on the stored leaf (use negative
axes so stacked and per-layer leaves agree), an axis of length ``groups * units * inner`` is viewed
as ``[groups, units, inner]`` and the middle one grows. ``units=None`` means ``length / groups``.
For the reference LLaMA layout (``H`` heads, ``G`` KV heads, ``R = H/G``, ``hd`` head dim)::

    {"mlp": [(r"layers/(w_gate|w_up)$", -1, "out"), (r"layers/w_down$", -2, "in")],
     "kv_heads": {"units": G, "axes": [(r"layers/(wq|wk|wv)$", -1, "out"),
                                       (r"layers/wo$", -2, "in")]},
     "q_per_kv": {"units": R, "axes": [(r"layers/wq$", -1, "out", "kv_heads"),
                                       (r"layers/wo$", -2, "in", "kv_heads")]},
     "d_model": [(r"^embed$", -1, "out"),            # "tied" when the head is the embedding
                 (r"layers/(wq|wk|wv|w_gate|w_up)$", -2, "in"), (r"^head$", -2, "in"),
                 (r"layers/(wo|w_down)$", -1, "out"),
                 (r"layers/(attn_norm|mlp_norm)$", -1, "norm"), (r"^final_norm$", -1, "norm")]}
"""

from __future__ import annotations

import functools
import warnings
import zlib
from collections.abc import Mapping
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.params._layers import _layout_of, _locate, _parts, _set, gather_layers, stacked_layers
from jaxeff.select import flatten_with_paths, select_mask

__all__ = ["widen", "insert_identity_layers", "GrowthWarning", "ROLES", "dim_axes", "explicit_units"]

ROLES = ("out", "in", "norm", "tied")


class GrowthWarning(UserWarning):
    """A growth step that is only approximately function-preserving."""


def explicit_units(spec) -> dict:
    """``{dim: units}`` for the spec dimensions that give ``'units'`` explicitly."""
    return {k: v["units"] for k, v in spec.items()
            if isinstance(v, Mapping) and v.get("units") is not None}


def dim_axes(spec, dim, units_now):
    """Parse ``spec[dim]`` of the spec format shared by :func:`widen` and
    ``jaxeff.params.extract_subnetwork``: a list of ``(regex, axis, role[, groups])`` or
    ``{'units': n, 'axes': [...]}``; ``groups`` may name a dimension with explicit units
    (``units_now``). Returns ``(units, [(regex, axis, role, groups)])``; raises ValueError naming
    ``spec[dim]`` for anything else."""
    d = spec[dim]
    if isinstance(d, Mapping):
        units, axes = units_now.get(dim, d.get("units")), d.get("axes")
    else:
        units, axes = None, d
    if not isinstance(axes, (list, tuple)) or not axes:
        raise ValueError(f"spec[{dim!r}] needs a non-empty list of (regex, axis, role[, groups]) "
                         f"axes; got {axes!r}")
    out = []
    for a in axes:
        if not isinstance(a, (list, tuple)) or len(a) not in (3, 4):
            raise ValueError(f"spec[{dim!r}] axis entries are (regex, axis, role[, groups]); got "
                             f"{a!r}")
        rx, axis, role = a[:3]
        groups = a[3] if len(a) == 4 else 1
        if role not in ROLES:
            raise ValueError(f"spec[{dim!r}]: role must be one of {ROLES}; got {role!r}")
        if isinstance(groups, str):
            if groups not in units_now:
                raise ValueError(f"spec[{dim!r}]: groups={groups!r} must name a dimension with "
                                 f"explicit 'units' (have {sorted(units_now)})")
            groups = units_now[groups]
        if not isinstance(axis, int) or isinstance(axis, bool) or not isinstance(groups, int) \
                or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"spec[{dim!r}]: axis must be an int and groups an int >= 1 or a "
                             f"dimension name; got axis={axis!r}, groups={groups!r}")
        out.append((rx, axis, role, groups))
    if units is not None and (not isinstance(units, int) or units < 1):
        raise ValueError(f"spec[{dim!r}]['units'] must be a positive int or None; got {units!r}")
    return units, out


def _host_rng(key, dim: str, stream: int) -> np.random.Generator:
    """A NumPy generator determined by ``key``, the dimension name and a stream id. Mappings are
    host-side data (they decide shapes and exactness), so they are drawn on the host, cheaply."""
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = np.asarray(key, np.uint32).ravel().tolist()
    return np.random.default_rng(words + [zlib.crc32(str(dim).encode()), stream])


def _mapping(dim, n_old, n_new, mapping, key):
    if isinstance(mapping, Mapping):
        if dim not in mapping:
            raise ValueError(f"mapping has no entry for dimension {dim!r}")
        mapping = mapping[dim]
    if isinstance(mapping, str):
        if mapping == "cyclic":
            return np.arange(n_new) % n_old
        if mapping == "random":
            if key is None:
                raise ValueError("mapping='random' (Net2Net) needs key")
            extra = _host_rng(key, dim, 0).integers(0, n_old, n_new - n_old)
            return np.concatenate([np.arange(n_old), extra])
        raise ValueError(f"mapping must be 'cyclic', 'random', an int array or a dict of them; "
                         f"got {mapping!r}")
    g = np.asarray(mapping)
    if g.shape != (n_new,) or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"mapping[{dim!r}] must be an int array of shape ({n_new},); got "
                         f"{g.dtype} {g.shape}")
    if g.min() < 0 or g.max() >= n_old or len(np.unique(g)) != n_old:
        raise ValueError(f"mapping[{dim!r}] must map onto every one of the {n_old} old units "
                         f"(values in [0, {n_old}), each at least once); got {g.tolist()}")
    return g


def _shares(dim, g, n_old, split, key):
    counts = np.bincount(g, minlength=n_old)
    if split == "equal":
        return 1.0 / counts[g], counts
    if split == "random":
        if key is None:
            raise ValueError("split='random' needs key")
        r = _host_rng(key, dim, 1).uniform(0.5, 1.5, len(g))
        tot = np.bincount(g, weights=r, minlength=n_old)
        return r / tot[g], counts
    raise ValueError(f"split must be 'equal' or 'random'; got {split!r}")


def _expand(x, axis, groups, n_old, g, s, role, aki):
    shape = x.shape
    n_new = len(g)
    view = shape[:axis] + (groups, n_old, shape[axis] // (groups * n_old)) + shape[axis + 1:]
    bshape = [1] * len(view)
    bshape[axis + 1] = n_new

    def one(w):
        y = jnp.take(w.reshape(view), jnp.asarray(g), axis=axis + 1)
        if role == "in":
            y = y * jnp.asarray(s, jnp.float32).reshape(bshape).astype(y.dtype)
        return y

    y = one(x)
    if aki:  # AKI: new units from the layer above (layer axis 0; the top layer uses itself)
        n_layers = shape[0]
        upper = jnp.take(x, jnp.asarray(np.minimum(np.arange(n_layers) + 1, n_layers - 1)), axis=0)
        new = jnp.asarray(np.arange(n_new) >= n_old).reshape(bshape)
        y = jnp.where(new, one(upper), y)
    return y.reshape(shape[:axis] + (groups * n_new * view[axis + 2],) + shape[axis + 1:])


@functools.partial(jax.jit, static_argnums=(1,))
def _expand_all(xs, plan):
    """All leaves of one dimension in one compiled program (``plan`` is static and hashable)."""
    return [_expand(x, *args) for x, args in zip(xs, plan)]


def widen(params, spec, sizes, *, mapping="cyclic", key: Optional[jax.Array] = None,
          split: str = "equal", method: str = "fpi", layers: str = "layers",
          layer_axis: int = 0, on_approx: str = "warn"):
    """Grow logical dimensions of a params pytree: Net2Net / bert2BERT FPI, or AKI.

    For each dimension ``d`` in ``sizes`` (in order), with ``n`` current units and mapping ``g``:
    ``out``/``norm``/``tied`` axes copy ``W[g(j)]``; ``in`` axes take ``W[g(j)] * s_j`` with
    ``s_j = 1/|g^-1(g(j))|`` (see the module docstring for exactness and the spec format).

    Papers: "Net2Net" (Chen et al., 2016); "bert2BERT" (Chen et al., 2022).

    Args:
      params: any pytree of arrays.
      spec: ``{dim: {"units": n|None, "axes": [(regex, axis, role[, groups]), ...]}}``.
      sizes: ``{dim: new number of units}`` (>= current).
      mapping: ``"cyclic"`` (default, ``g(j) = j mod n``: uniform when ``n' = k n``),
        ``"random"`` (Net2Net: ``g(j) = j`` for ``j < n``, uniform otherwise; needs ``key``), an
        int array, or a dict of these per dimension.
      key: PRNG key for ``mapping="random"``, ``split="random"``.
      split: ``"equal"`` (default, the papers) or ``"random"`` shares of a consumer row.
      method: ``"fpi"`` (default, function-preserving) or ``"aki"`` (new producer units from the
        layer above; needs the layers at ``layers``/``layer_axis``).
      layers, layer_axis: the layer container (only for ``"aki"``; see ``jaxeff.params.growth``).
      on_approx: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` when a step is approximate.

    Returns ``(new_params, mappings)`` with ``mappings[dim]`` the int array ``g``.

    Raises ValueError for an unknown dimension, a regex matching no leaf, a leaf selected twice, an
    axis length not divisible by ``groups * units`` (incompatible head counts), disagreeing unit
    counts, a new size smaller than the current one, bad mappings/options, or (``on_approx=
    "raise"``) an approximate step.
    """
    if not isinstance(spec, Mapping):
        raise TypeError(f"spec must be a dict of logical dimensions; got {type(spec).__name__}")
    if not isinstance(sizes, Mapping) or not sizes:
        raise ValueError(f"sizes must be a non-empty dict {{dim: new units}}; got {sizes!r}")
    if method not in ("fpi", "aki"):
        raise ValueError(f"method must be 'fpi' or 'aki'; got {method!r}")
    if on_approx not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_approx must be 'warn', 'raise' or 'ignore'; got {on_approx!r}")
    rebuild, per_layer = None, False
    prefix = "/".join(_parts(layers))
    if method == "aki":  # work on a stacked view: the layer axis is 0 for leaves under `layers`
        stacked, _, rebuild = stacked_layers(params, layers=layers, layer_axis=layer_axis)
        per_layer = not _is_stacked_node(_locate(params, layers))
        params = _set(params, _parts(layers), stacked)
    mappings = {}
    units_now = explicit_units(spec)   # head counts change as dimensions grow
    for dim, n_new in sizes.items():
        if dim not in spec:
            raise ValueError(f"sizes names dimension {dim!r}, which spec lacks; spec has "
                             f"{list(spec)}")
        units, axes = dim_axes(spec, dim, units_now)
        flat, treedef = flatten_with_paths(params)
        plan = {}
        for rx, axis, role, groups in axes:
            mask = jax.tree.leaves(select_mask(rx, params, argname=f"spec[{dim!r}] regex"))
            for i, hit in enumerate(mask):
                if not hit:
                    continue
                p = flat[i][0]
                if i in plan:
                    raise ValueError(f"spec[{dim!r}]: leaf {p} is selected by two axis entries")
                x = flat[i][1]
                ax = _leaf_axis(axis, x, p, dim, method == "aki" and _under(p, prefix),
                                per_layer, layer_axis)
                length = x.shape[ax]
                n = units if units is not None else max(length // groups, 1)
                if length % (groups * n):
                    raise ValueError(
                        f"spec[{dim!r}]: leaf {p} axis {axis} has length {length}, not divisible "
                        f"by groups*units = {groups}*{n} (incompatible head/unit counts)")
                plan[i] = (ax, role, groups, n, p)
        ns = {v[3] for v in plan.values()}
        if len(ns) != 1:
            raise ValueError(f"spec[{dim!r}]: leaves disagree on the unit count "
                             f"{ {v[4]: v[3] for v in plan.values()} }; give spec[{dim!r}]['units']")
        n_old = ns.pop()
        if not isinstance(n_new, (int, np.integer)) or n_new < n_old:
            raise ValueError(f"sizes[{dim!r}]={n_new!r} must be an int >= the current {n_old} "
                             "units (widening never shrinks)")
        g = _mapping(dim, n_old, int(n_new), mapping, key)
        s, counts = _shares(dim, g, n_old, split, key)
        roles = {v[1] for v in plan.values()}
        reasons = []
        if "norm" in roles and len(set(counts.tolist())) != 1:
            reasons.append("a normalised dimension (norm axis) with units duplicated unequally "
                           f"often (counts {sorted(set(counts.tolist()))}) changes RMS statistics")
        if "tied" in roles:
            reasons.append("a tied embedding must copy as input but divide as output")
        if reasons and on_approx != "ignore":
            msg = f"widen {dim!r} {n_old}->{n_new} is approximate: " + "; ".join(reasons)
            if on_approx == "raise":
                raise ValueError(msg + " (on_approx='raise')")
            warnings.warn(msg, GrowthWarning, stacklevel=2)
        leaves = [leaf for _, leaf in flat]
        order = sorted(plan)
        gt, st = tuple(int(v) for v in g), tuple(float(v) for v in s)
        static = tuple((plan[i][0], plan[i][2], n_old, gt, st, plan[i][1],
                        method == "aki" and plan[i][1] == "out" and _under(plan[i][4], prefix)
                        and plan[i][0] != 0) for i in order)
        for i, y in zip(order, _expand_all([leaves[i] for i in order], static)):
            leaves[i] = y
        params = jax.tree_util.tree_unflatten(treedef, leaves)
        mappings[dim] = g
        if dim in units_now:
            units_now[dim] = int(n_new)
    if rebuild is not None:
        params = rebuild(_locate(params, layers), params)
    return params, mappings


def _under(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + "/")


def _is_stacked_node(node) -> bool:
    return _layout_of(node, "auto") == "stacked"


def _leaf_axis(axis, x, p, dim, in_view, per_layer, layer_axis):
    """Normalise ``axis`` (counted on the stored leaf) to the leaf as seen now: for AKI the
    layers are viewed stacked with the layer axis first."""
    ndim = x.ndim - 1 if (in_view and per_layer) else x.ndim
    if not -ndim <= axis < ndim:
        raise ValueError(f"spec[{dim!r}]: axis {axis} out of range for leaf {p} of stored "
                         f"rank {ndim}")
    a = axis % ndim
    if not in_view:
        return a
    if per_layer:
        return a + 1
    if a == layer_axis:
        raise ValueError(f"spec[{dim!r}]: axis {axis} of leaf {p} is the layer axis")
    return a + 1 if a < layer_axis else a


def insert_identity_layers(params, positions: Sequence[int], *, zero, layers: str = "layers",
                           layer_axis: int = 0, layout: str = "auto", source: str = "previous"):
    """Deepen a pre-norm residual model by inserting blocks that compute the identity.

    A pre-norm block is ``x + f(norm(x)) @ W_out``; with every output projection zeroed
    (``wo`` and ``w_down`` for LLaMA) it returns ``x`` exactly, so the grown model computes the same
    function. The other weights of a new block are copied from a neighbouring source layer, so the
    block starts training from useful features.

    Papers: "Net2Net" (Net2DeeperNet, Chen et al., 2016); "bert2BERT" (Chen et al., 2022).

    Args:
      params: pytree with the layers at ``layers`` (stacked or per-layer layout).
      positions: indices *in the grown model* of the new layers (distinct, in ``[0, L + k)``).
      zero: selector (``jaxeff.select``) over the paths *inside one layer* (e.g. ``wo``,
        ``mlp/w_down``) of the output projections to zero, e.g. ``r"(wo|w_down)$"``.
      layers, layer_axis, layout: where the layers are (``jaxeff.params.growth``).
      source: ``"previous"`` (default: the nearest old layer below; the first layer for position 0)
        or ``"next"`` (the nearest old layer above; the last layer at the top).

    Raises ValueError for empty/duplicate/out-of-range positions, an unknown ``source``, or a
    ``zero`` selector that matches nothing.
    """
    if source not in ("previous", "next"):
        raise ValueError(f"source must be 'previous' or 'next'; got {source!r}")
    _, n, _ = stacked_layers(params, layers=layers, layer_axis=layer_axis, layout=layout)
    pos = sorted(int(p) for p in positions)
    total = n + len(pos)
    if not pos or len(set(pos)) != len(pos) or pos[0] < 0 or pos[-1] >= total:
        raise ValueError(f"positions must be distinct ints in [0, {total}) for {len(pos)} new "
                         f"layers on {n}; got {list(positions)!r}")
    old = [i for i in range(total) if i not in set(pos)]
    idx, is_new = [], []
    for i in range(total):
        if i in set(pos):
            below = [k for k, o in enumerate(old) if o < i]
            above = [k for k, o in enumerate(old) if o > i]
            k = (below[-1] if below else 0) if source == "previous" else (
                above[0] if above else n - 1)
            idx.append(k)
            is_new.append(True)
        else:
            idx.append(old.index(i))
            is_new.append(False)
    grown = gather_layers(params, idx, layers=layers, layer_axis=layer_axis, layout=layout)
    shapes = jax.eval_shape(lambda p: stacked_layers(p, layers=layers, layer_axis=layer_axis,
                                                     layout=layout)[0], grown)
    sel = tuple(jax.tree.leaves(select_mask(zero, shapes, argname="zero")))
    return _zero_layers(grown, tuple(is_new), sel, layers, layer_axis, layout)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _zero_layers(params, is_new, sel, layers, layer_axis, layout):
    stacked, _, rebuild = stacked_layers(params, layers=layers, layer_axis=layer_axis,
                                         layout=layout)
    keep = jnp.asarray(~np.asarray(is_new))
    flat, treedef = jax.tree.flatten(stacked)
    out = [jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x)) if s else x
           for x, s in zip(flat, sel)]
    return rebuild(jax.tree.unflatten(treedef, out))
