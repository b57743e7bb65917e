"""GaLore: gradient low-rank projection around any gradient-scaling transform.

Paper: "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection" (Zhao et al., 2024).
Reference: jiaweizzhao/GaLore (``galore_torch``). For a selected gradient matrix ``G [m, n]`` (leaves
with more axes are batches of matrices) and step ``t``::

    if t % T == 0:  P <- top-r singular vectors of G (exact SVD or randomized, ``projection.py``)
    R = project(G, P)      left: P^T G [r, n];  right: G P [m, r];  full: P_l^T G P_r [r, r]
    N, s = inner.update(R, s)                       # Adam, Adafactor, Lion, ... in r-space
    update = scale * back(N, P)   left: P N;  right: N P^T;  full: P_l N P_r^T

``proj_type`` as in the reference: 'std' projects the smaller dimension (right if m >= n, else
left), 'reverse_std' the larger one (what ``optax.contrib.galore`` always does), 'left', 'right',
'full'. :func:`galore` adds decoupled weight decay in the full space and the learning rate.

Differences from ``optax.contrib.galore``: per-leaf rank / gap / scale / type through the
``jaxeff.select`` convention; default type 'std' and scale 0.25 (the paper's); a state of real
arrays only (projectors for projected leaves alone, no ``(0, 0)`` placeholders), so Orbax saves it;
a randomized warm-started refresh that does not gather a sharded gradient; optional staggered
refreshes and moment handling on refresh; ``optax.inject_hyperparams(galore)`` works without
``static_args`` (``rank`` is only read at ``init``; ``update`` takes it from the projector shapes).

Default vs reference: the default inner is ``optax.scale_by_adam(eps=1e-6)``, which adds eps after
bias correction, ``m_hat / (sqrt(v_hat) + eps)``, and :func:`galore` decays before the update.
``reference_mode=True`` reproduces galore-torch's ``GaLoreAdamW`` step: the inner becomes
:func:`scale_by_reference_adam` (betas (0.9, 0.999), eps 1e-6 added to ``sqrt(v)`` before bias
correction, ``sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``), and :func:`galore` applies the
decay to the updated weights, ``p <- p - lr u;  p <- p - lr wd p``. Singular vectors are defined up
to sign; the reference keeps whatever sign its SVD returns, and so does this code.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxeff._checks import (check_bool, check_float, check_float_dtype, check_float_leaves,
                            check_learning_rate)
from jaxeff.optim import _compress as compress
from jaxeff.optim._projection import (Randomized, align_signs, randomized_projector,
                                      random_orthonormal, reproject_moment, resolve_refresh,
                                      svd_projector)
from jaxeff.select import (MatrixLayout, flatten_with_paths, is_weight_matrix, matrix_axes_values,
                           path_str, select_mask, select_values)
from jaxeff.select import resolve_rank as _matrix_rank
from jaxeff.state_sharding import ParamInfo, axis_names, register_rule

__all__ = ["GaLoreState", "PROJ_TYPES", "MOMENT_POLICIES", "scale_by_galore",
           "galore", "Randomized", "scale_by_reference_adam"]

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
MOMENT_POLICIES = ("keep", "reset", "reproject")


class GaLoreState(NamedTuple):
    """``count`` int32 (steps taken); ``projectors``: ``{param path: {side: P}}`` for each
    projected leaf (``jaxeff.select.flatten_with_paths`` path of the leaf; side 'left'
    ``P [..., m, r]``, 'right' ``P [..., n, r]``, both for 'full'); ``inner_state`` of the inner
    transform over the projected tree (low-rank leaves, other leaves full size)."""
    count: jax.Array
    projectors: dict
    inner_state: Any


@register_rule(GaLoreState)
def _galore_shardings(s: GaLoreState, ctx):
    """Sharding (``jaxeff.state_sharding``), each projector by the param at its path.

    ``m x n`` is the param's matrix (its last two axes), ``b`` its leading axes. Projector
    ``P [b, m, r]`` (left) shards ``m`` as the param shards ``m``, ``P [b, n, r]`` (right) shards
    ``n`` as the param shards ``n`` (a replicated-across-the-other-axis ``P`` makes ``P^T G`` /
    ``G P`` local). Low-rank moments ``[b, r, n]`` (left) shard ``n`` and ``[b, m, r]`` (right)
    shard ``m`` with the param's mesh axis of that dimension, **or, when the param shards the
    projected dimension instead, with that mesh axis** (our choice: the moment memory is divided
    by the axis size, for one all-gather of the ``[b, r, n]`` low-rank update per step; a
    replicated moment would avoid that gather but hold the whole moment on every device); 'full'
    ``[b, r, r]`` keeps only the batch spec. A projector whose path is not a param, or whose shape
    is not that of the default matrix axes (a non-default ``matrix_axes`` layout), is replicated.
    """
    rep = ctx.replicated
    infos, low, projs = ctx.params_by_path(), {}, {}
    for path, by_side in s.projectors.items():
        info = infos.get(path)
        shape = info.shape if info is not None else ()
        b, (m, n) = shape[:-2], shape[-2:] if len(shape) >= 2 else (None, None)
        dims = {"left": m, "right": n}
        if info is None or any(side not in dims or tuple(p.shape[:-1]) != b + (dims[side],)
                               for side, p in by_side.items()):
            projs[path] = rep(by_side)
            continue
        bs, ms, ns = info.spec[:-2], info.spec[-2], info.spec[-1]
        projs[path] = {side: ctx.sharding(p.shape, bs + (ms if side == "left" else ns, None))
                       for side, p in by_side.items()}
        r = {side: p.shape[-1] for side, p in by_side.items()}
        if set(r) == {"left"}:      # [b, r, n]: n sharded as the param's n, else as its m
            low[path] = ParamInfo(b + (r["left"], n), bs + (None, ns if axis_names(ns) else ms))
        elif set(r) == {"right"}:   # [b, m, r]
            low[path] = ParamInfo(b + (m, r["right"]), bs + (ms if axis_names(ms) else ns, None))
        else:
            low[path] = ParamInfo(b + (r["left"], r["right"]), bs + (None, None))
    inner = ctx.with_params_at(low) if ctx.params is not None else ctx
    return s._replace(count=rep(s.count), projectors=projs,
                      inner_state=inner.walk(s.inner_state))


@dataclasses.dataclass(frozen=True)
class _Leaf:
    index: int            # position among the tree's leaves
    path: str
    layout: MatrixLayout  # the leaf as a batch of m x n matrices
    mshape: tuple         # batch + (m, n)
    sides: tuple          # ('left',), ('right',) or ('left', 'right')
    rank: Any             # int, or None when read from the state
    gap: Any
    scale: Any


def _is_concrete(x) -> bool:
    try:
        float(x)
        return True
    except (TypeError, jax.errors.ConcretizationTypeError):
        return False


def _is_fraction(v) -> bool:
    return isinstance(v, float) or (not isinstance(v, int) and jnp.issubdtype(jnp.result_type(v),
                                                                              jnp.floating))


def _check_rank(v, where="rank"):
    if v is None:
        return
    if isinstance(v, (bool, str)) or not isinstance(v, (int, float)) and jnp.ndim(v) != 0:
        raise TypeError(f"{where}={v!r} must be an int >= 1 or a float fraction in (0, 1]")
    if not _is_concrete(v):
        return
    if _is_fraction(v) and not 0 < float(v) <= 1:
        raise ValueError(f"{where}={v!r}: a float rank is a fraction of min(m, n) in (0, 1]")
    if not _is_fraction(v) and int(v) <= 0:
        raise ValueError(f"{where}={v!r} must be >= 1 (or a float fraction in (0, 1])")


def _check_gap(v, where="update_proj_gap"):
    if v is None or (not isinstance(v, (str, bool)) and not _is_concrete(v)):
        return
    if isinstance(v, (bool, str)):
        raise TypeError(f"{where}={v!r} must be a positive int")
    if not math.isfinite(float(v)) or int(v) != float(v) or int(v) <= 0:
        raise ValueError(f"{where}={v!r} must be a positive int")


def _check_type(v, where="proj_type"):
    if v is not None and v not in PROJ_TYPES:
        raise ValueError(f"{where}={v!r} is not a projection type; valid: {PROJ_TYPES}")


def _check_scale(v, where="scale"):
    if v is None:
        return
    check_float(where, v, traced_ok=True)
    if not isinstance(v, jax.core.Tracer) and float(v) <= 0:
        raise ValueError(f"{where} must be a finite number > 0; got {v!r}")


def _check_spec(spec, check, argname):
    """Validate a per-leaf spec at construction where its values are visible."""
    if callable(spec) and not isinstance(spec, (list, tuple)):
        return
    if isinstance(spec, (list, tuple)) and all(isinstance(r, (list, tuple)) and len(r) == 2
                                               and isinstance(r[0], str) for r in spec):
        for rx, v in spec:
            check(v, f"{argname} rule ({rx!r}, {v!r}): value")
        return
    for v in jax.tree.leaves(spec):
        check(v, argname)


def _leaf_plan(index, path, leaf, dims, rank, gap, scale, ptype, resolve_rank):
    shape = tuple(leaf.shape)
    if len(shape) < 2:
        raise ValueError(f"GaLore selects leaf {path!r} of shape {shape}, but a projected leaf needs "
                         ">= 2 axes; exclude it with `select` (e.g. select=lambda p, x: x.ndim >= 2)")
    layout = MatrixLayout.for_leaf(path, shape, dims)
    m, n = layout.m, layout.n
    _check_type(ptype, f"proj_type for {path!r}")
    side = {"std": "right" if m >= n else "left", "reverse_std": "left" if m >= n else "right",
            "left": "left", "right": "right"}.get(ptype)
    sides = (side,) if side else ("left", "right")
    r = None
    if resolve_rank:
        _check_rank(rank, f"rank for {path!r}")
        if not _is_concrete(rank):
            raise ValueError(f"rank for {path!r} is traced at init; GaLore.init needs concrete ranks "
                             "(call init outside jit)")
        r = _matrix_rank(float(rank), m, n) if _is_fraction(rank) else int(rank)
        if r > min(m, n):
            raise ValueError(f"rank={r} for leaf {path!r} exceeds min(m, n)={min(m, n)} of its "
                             f"{m}x{n} matrix (shape {shape}); use a smaller rank, a float fraction "
                             "(e.g. rank=0.25) or exclude the leaf with `select`")
    _check_gap(gap, f"update_proj_gap for {path!r}")
    return _Leaf(index, path, layout, layout.matrix_shape, sides, r, gap, scale)


def _to_matrix(x, lp: _Leaf):
    return lp.layout.to_matrix(x)


def _from_matrix(y, lp: _Leaf, shape):
    return lp.layout.from_matrix(y).reshape(shape)


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def _project(g, ps, sides):
    for p, side in zip(ps, sides):
        g = _mT(p) @ g if side == "left" else g @ p
    return g


def _back(nn, ps, sides):
    for p, side in zip(ps, sides):
        nn = p @ nn if side == "left" else nn @ _mT(p)
    return nn


def _low_shape(mshape, sides, r):
    m, n = mshape[-2:]
    return mshape[:-2] + ((r if "left" in sides else m), (r if "right" in sides else n))


def scale_by_reference_adam(b1: float = 0.9, b2: float = 0.999,
                            eps: float = 1e-6) -> optax.GradientTransformation:
    """Adam as galore-torch's ``AdamW`` computes it: eps added to ``sqrt(v)`` before bias correction.

    ``m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;
    u = sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)`` (t = 1, 2, ...), i.e. optax's
    ``m_hat / (sqrt(v_hat) + eps / sqrt(1 - b2^t))``. The state is ``optax.ScaleByAdamState``.
    Paper: Adam (Kingma & Ba, 2015) in the form of the GaLore reference (Zhao et al., 2024).

    Args: ``b1`` (default 0.9), ``b2`` (default 0.999), ``eps`` (default 1e-6, galore-torch's).
    Raises: ValueError for b1 or b2 outside [0, 1) or a negative eps; TypeError for a non-number.
    """
    b1 = check_float("scale_by_reference_adam: b1", b1, 0.0, 1.0, max_open=True)
    b2 = check_float("scale_by_reference_adam: b2", b2, 0.0, 1.0, max_open=True)
    eps = check_float("scale_by_reference_adam: eps", eps, 0.0)

    def init_fn(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros())

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        step = jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        out = jax.tree.map(lambda m, v: (step * m / (jnp.sqrt(v) + eps)).astype(m.dtype), mu, nu)
        return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def _decay_after_update(learning_rate, weight_decay, mask) -> optax.GradientTransformation:
    """galore-torch's order: ``p1 = p - lr u;  p2 = p1 - lr wd p1``, as the update ``p2 - p``."""

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("galore(reference_mode=True) needs params in update() for its "
                             "weight decay (tx.update(grads, state, params))")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        keep = (jax.tree.map(lambda _: True, params) if mask is None
                else select_mask(mask, params, argname="mask"))

        def one(u, p, k):
            stepped = p - lr * u
            decay = lr * weight_decay * stepped if k else 0.0
            return (-lr * u - decay).astype(u.dtype)

        out = jax.tree.map(one, updates, params, keep)
        return out, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_galore(inner: optax.GradientTransformation | None = None, *, rank: Any = 128,
                    update_proj_gap: Any = 200, scale: Any = 0.25, proj_type: Any = "std",
                    select=None, matrix_axes=None, refresh: Any = "svd",
                    moments: str = "keep", second_moments: str = r"(^|/)(nu|hessian|h|v)$",
                    stagger: bool = False, sign_align: bool = False, projector_dtype=None,
                    key: Any = 0,
                    reference_mode: bool = False) -> optax.GradientTransformationExtraArgs:
    """Run ``inner`` on rank-r projections of the selected gradient matrices (GaLore scaling).

    Update rule: see the module docstring; leaves not selected go through ``inner`` unprojected
    (and unscaled). Paper: GaLore (Zhao et al., 2024).

    Args:
      inner: any gradient-scaling transform (default ``optax.scale_by_adam(eps=1e-6)``, the eps of
        GaLore's AdamW). Its ``params`` are ``jax.ShapeDtypeStruct``s of the projected tree: shapes
        serve (``scale_by_factored_rms``), values do not exist (put weight decay in
        :func:`galore`, which applies it in the full space). It may be
        ``jaxeff.optim.compress_state(...)`` for 8-bit GaLore. Extra args pass through.
      rank: per-leaf rank (selector values: one value, ``[(regex, value)]`` rules, a callable
        ``(path, leaf) -> value | None`` or a pytree). An int, or a float in (0, 1] for that fraction
        of ``min(m, n)``. Default 128. A leaf whose value is None is not projected.
      update_proj_gap: per-leaf refresh period T (default 200).
      scale: per-leaf output scale alpha (default 0.25, the paper's; the reference class uses 1.0).
      proj_type: per-leaf 'std' (default), 'reverse_std', 'left', 'right' or 'full'.
      select: which leaves are projected (``jaxeff.select`` selector); default
        ``jaxeff.select.is_weight_matrix`` (>= 2 axes, not a bias, norm scale or embedding).
        Paths are the same for ``nnx.Variable``-wrapped and plain leaves (``nnx.Optimizer``).
      matrix_axes: per-leaf ``(in_axes, out_axes)`` (``jaxeff.select.MatrixLayout``; a
        ``select_values`` spec, or a flax NNX module whose layouts are read); default
        ``MatrixLayout.for_leaf``: flax MHA kernels ``[D, H, hd]`` / ``[H, hd, D]`` as one
        ``D x (H*hd)`` matrix, otherwise the last two axes with leading axes batched.
      refresh: 'svd' (exact f32 SVD, the reference), 'randomized' or ``Randomized(oversample,
        n_iter)`` (warm-started subspace iteration, ``projection.py``).
      moments: what happens to the inner state of a leaf when its projector changes: 'keep' (the
        reference: moments stay in the old basis), 'reset' (back to ``inner.init`` values; the
        inner step count is not reset) or 'reproject' (first moments ``M <- R M`` with
        ``R = P_new^T P_old``; leaves whose state path prefix matches ``second_moments`` use
        ``R * R`` elementwise, an approximation that keeps them non-negative). Not in the paper.
      second_moments: regex over the inner-state path before the param path, for 'reproject'.
      stagger: refresh leaf j of J at ``(t + j*T // J) % T == 0`` (and at t = 0) instead of all
        leaves together, spreading the SVD cost over steps. Not in the paper.
      sign_align: flip refreshed singular vectors to agree in sign with the previous projector, so
        moments kept across a refresh are not applied to sign-flipped directions (default False:
        the reference keeps whatever sign the SVD returns). Always on for the randomized refresh,
        whose eigenvector signs are arbitrary (they can differ between a sharded and a single-device
        run). Not in the paper.
      projector_dtype: dtype of P (default: the gradient's dtype, as the reference).
      key: int seed or PRNG key for the randomized refresh (folded with the step and leaf index).
      reference_mode: default ``inner`` becomes :func:`scale_by_reference_adam` (galore-torch's
        eps placement, betas (0.9, 0.999)); an explicit ``inner`` is used as given. Default False.

    Raises:
      ValueError: rank <= 0 or larger than min(m, n) of a leaf, gap <= 0, a NaN/inf or
        non-positive scale, unknown proj_type / refresh / moments, a selector matching no leaf,
        a selected leaf with < 2 axes; at ``update``, a gradient whose matrix shape differs
        from the one the state's projectors were made for (e.g. transposed), naming the leaf.
      TypeError: a bad selector or matrix_axes, a non-number scale; at ``init`` a
        selected non-float params leaf (named by path).
    """
    if inner is not None and not isinstance(inner, optax.GradientTransformation):
        raise TypeError("inner must be an optax.GradientTransformation or None (Adam); got "
                        f"{inner!r} ({type(inner).__name__})")
    stagger = check_bool("stagger", stagger)
    sign_align = check_bool("sign_align", sign_align)
    if projector_dtype is not None and not isinstance(projector_dtype, jax.core.Tracer):
        projector_dtype = check_float_dtype("projector_dtype", projector_dtype)
    if inner is None:
        inner = scale_by_reference_adam() if reference_mode else optax.scale_by_adam(eps=1e-6)
    inner = optax.with_extra_args_support(inner)
    _check_spec(rank, _check_rank, "rank")
    _check_spec(update_proj_gap, _check_gap, "update_proj_gap")
    _check_spec(proj_type, _check_type, "proj_type")
    _check_spec(scale, _check_scale, "scale")
    method = resolve_refresh(refresh)
    if moments not in MOMENT_POLICIES:
        raise ValueError(f"moments={moments!r}; valid: {MOMENT_POLICIES}")
    typed = hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    base_key = key if typed or jnp.ndim(key) else jax.random.PRNGKey(key)
    sel = select if select is not None else is_weight_matrix

    def plan(tree, resolve_rank):
        flat, _ = flatten_with_paths(tree)
        mask = jax.tree.leaves(select_mask(sel, tree, argname="select"))
        vals = [jax.tree.leaves(select_values(spec, tree, argname=name, allow_empty=True),
                                is_leaf=lambda x: x is None)
                for spec, name in ((rank, "rank"), (update_proj_gap, "update_proj_gap"),
                                   (scale, "scale"), (proj_type, "proj_type"))]
        vals.append(matrix_axes_values(matrix_axes, tree))
        out = []
        for i, ((p, leaf), m) in enumerate(zip(flat, mask)):
            r, gap, sc, pt, dims = (v[i] for v in vals)
            if m and r is not None:
                out.append(_leaf_plan(i, p, leaf, dims, r, gap if gap is not None else
                                      200, sc if sc is not None else 0.25, pt or "std",
                                      resolve_rank))
        if not out:
            raise ValueError("GaLore projects no leaf: `select` and `rank` leave every leaf out; "
                             f"leaf paths: {[p for p, _ in flat[:12]]}")
        return out

    def low_tree(tree, leaves):
        flat, treedef = jax.tree.flatten(tree)
        flat = list(flat)
        for lp, x in leaves:
            flat[lp.index] = x
        return jax.tree.unflatten(treedef, flat)

    def init_fn(params):
        plans = plan(params, True)
        flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
        check_float_leaves("params", {path_str(flat_p[lp.index][0]): flat_p[lp.index][1]
                                      for lp in plans},
                           "GaLore projects float matrices (an int update would be all zero)")
        flat = jax.tree.leaves(params)
        projectors, low = {}, []
        for j, lp in enumerate(plans):
            dt = projector_dtype or flat[lp.index].dtype
            m, n = lp.mshape[-2:]
            ps = []
            for s, side in enumerate(lp.sides):
                shp = lp.mshape[:-2] + ((m if side == "left" else n), lp.rank)
                if isinstance(method, Randomized):
                    k = jax.random.fold_in(jax.random.fold_in(base_key, j), s)
                    ps.append(random_orthonormal(k, shp, dt))
                else:
                    ps.append(jnp.zeros(shp, dt))
            projectors[lp.path] = dict(zip(lp.sides, ps))
            low.append((lp, jnp.zeros(_low_shape(lp.mshape, lp.sides, lp.rank),
                                      flat[lp.index].dtype)))
        if len(projectors) != len(plans):   # e.g. keys 'a/b' and 'a' -> 'b' in one tree
            dup = sorted({lp.path for lp in plans if [q.path for q in plans].count(lp.path) > 1})
            raise ValueError(f"GaLore keys projectors by leaf path, but the paths {dup} name more "
                             "than one projected leaf (a dict key holding '/'?); rename the keys")
        inner_state = inner.init(low_tree(params, low))
        return GaLoreState(jnp.zeros([], jnp.int32), projectors, inner_state)

    def new_projectors(g, ps, lp, key_j):
        if not isinstance(method, Randomized):
            out = svd_projector(g, ps[0].shape[-1], lp.sides, ps[0].dtype)
        else:
            out = tuple(randomized_projector(g if side == "left" else _mT(g), p,
                                             jax.random.fold_in(key_j, s), method.oversample,
                                             method.n_iter, p.dtype)
                        for s, (p, side) in enumerate(zip(ps, lp.sides)))
        if sign_align or isinstance(method, Randomized):  # eigh's signs are arbitrary
            out = tuple(align_signs(pn, po) for pn, po in zip(out, ps))
        return out

    def update_fn(updates, state, params=None, **extra_args):
        del params  # the inner runs in the projected space: it gets abstract params (shapes only)
        plans = plan(updates, False)
        held = {k: tuple(v) for k, v in state.projectors.items()}
        want = {lp.path: lp.sides for lp in plans}
        flat = jax.tree.leaves(updates)
        for lp in plans:   # same leaf, other side: a transposed gradient (m < n flips the side)
            if lp.path in held and set(held[lp.path]) != set(lp.sides):
                raise ValueError(
                    f"GaLore update leaf {lp.path!r} has shape {tuple(flat[lp.index].shape)} and "
                    f"projects its {'/'.join(lp.sides)} side, but the state's projectors for it "
                    f"{[tuple(p.shape) for p in state.projectors[lp.path].values()]} project the "
                    f"{'/'.join(held[lp.path])} side; was the gradient transposed, or the state "
                    "made for another tree?")
        if held.keys() != want.keys() or any(set(held[k]) != set(want[k]) for k in want):
            raise ValueError(f"GaLore state holds projectors {held} (path: sides) but the updates "
                             f"project {want}; was the state made for another tree?")
        old_ps = [tuple(state.projectors[lp.path][side] for side in lp.sides) for lp in plans]
        count = state.count
        for lp, ps in zip(plans, old_ps):   # a transposed or resized gradient
            m, n = lp.mshape[-2:]
            got = tuple(ps[s].shape[-2] for s in range(len(ps)))
            want = tuple(m if side == "left" else n for side in lp.sides)
            if got != want or tuple(ps[0].shape[:-2]) != lp.mshape[:-2]:
                raise ValueError(
                    f"GaLore update leaf {lp.path!r} has shape {tuple(flat[lp.index].shape)} "
                    f"(matrix {m}x{n}, batch {lp.mshape[:-2]}), but the state's projectors "
                    f"{[tuple(p.shape) for p in ps]} were made for a "
                    f"{'x'.join(str(p.shape[-2]) for p in ps)} {'/'.join(lp.sides)} side; "
                    "was the gradient transposed, or the state made for another tree?")
        low, new_ps, flags = [], [], []
        for j, (lp, ps) in enumerate(zip(plans, old_ps)):
            g = _to_matrix(flat[lp.index], lp)
            offset = (j * lp.gap) // len(plans) if stagger else 0
            flag = (count == 0) | ((count + offset) % lp.gap == 0)
            key_j = jax.random.fold_in(jax.random.fold_in(base_key, j), count)
            ps_new = jax.lax.cond(flag, lambda g=g, ps=ps, lp=lp, k=key_j: new_projectors(g, ps, lp, k),
                                  lambda ps=ps: tuple(ps))
            low.append((lp, _project(g, ps_new, lp.sides).astype(g.dtype)))
            new_ps.append(ps_new)
            flags.append(flag)
        inner_state = state.inner_state
        if moments != "keep":
            inner_state = _policy(updates, plans, low, old_ps, new_ps, flags, inner_state)
        low_t = low_tree(updates, low)
        _check_fits_state(low_t, inner_state, plans, flat)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), low_t)
        low_updates, inner_state = inner.update(low_t, inner_state, abstract, **extra_args)
        out = list(jax.tree.leaves(low_updates))
        for lp, ps in zip(plans, new_ps):
            full = _back(out[lp.index].astype(jnp.result_type(out[lp.index], ps[0])), ps, lp.sides)
            out[lp.index] = (lp.scale * _from_matrix(full, lp, flat[lp.index].shape)
                             ).astype(flat[lp.index].dtype)
        return (jax.tree.unflatten(jax.tree.structure(updates), out),
                GaLoreState(optax.safe_increment(count),
                            {lp.path: dict(zip(lp.sides, ps)) for lp, ps in zip(plans, new_ps)},
                            inner_state))

    def _check_fits_state(low_t, inner_state, plans, flat):
        """The projected updates must have the shapes the inner state was made for (a
        transposed gradient flips the projected side: same projector shape, other low shape)."""
        want = jax.tree_util.tree_flatten_with_path(jax.eval_shape(inner.init, low_t))[0]
        have = jax.tree.leaves(inner_state)
        if len(want) != len(have):
            return  # a structure the inner decides on; inner.update reports it
        for (sp, w), h in zip(want, have):
            if tuple(w.shape) == tuple(h.shape):
                continue
            s_path = path_str(sp)
            hit = [lp for lp in plans if s_path == lp.path or s_path.endswith("/" + lp.path)
                   or ("/" + lp.path + "/") in s_path]
            what = (f"update leaf {hit[0].path!r} of shape {tuple(flat[hit[0].index].shape)} "
                    f"projects to {tuple(w.shape)}" if hit else f"the updates give {tuple(w.shape)}")
            raise ValueError(f"GaLore: {what}, but the state's {s_path!r} was made for shape "
                             f"{tuple(h.shape)}; was the gradient transposed, or the state made "
                             "for another tree?")

    def _policy(updates, plans, low, old_ps, new_ps, flags, inner_state):
        """Apply ``moments`` ('reset' or 'reproject') to the inner-state leaves of refreshed leaves.

        A state leaf belongs to projected leaf j when its path ends with that leaf's path and it
        has the projected shape (or is a compressed node); other state leaves are left alone."""
        fresh = None
        if moments == "reset":
            fresh = jax.tree.leaves(inner.init(low_tree(updates, [(lp, jnp.zeros_like(x))
                                                                  for lp, x in low])),
                                    is_leaf=compress.is_quantized)
        by_path = {lp.path: j for j, (lp, _) in enumerate(low)}
        sflat, sdef = flatten_with_paths(inner_state, is_leaf=compress.is_quantized)
        out = []
        for i, (s, x) in enumerate(sflat):
            hits = [p for p in by_path if s == p or s.endswith("/" + p)]
            quant = compress.is_quantized(x)
            j = by_path[max(hits, key=len)] if hits else None
            if j is None or (not quant and x.shape != low[j][1].shape):
                out.append(x)
                continue
            lp, lowx = low[j]
            dense = compress.dequantize(x, lowx.shape) if quant else x
            if moments == "reset":
                f = fresh[i]
                new = compress.dequantize(f, lowx.shape) if compress.is_quantized(f) else f
            else:
                prefix = s[: len(s) - len(lp.path)].rstrip("/")
                square = re.search(second_moments, prefix) is not None
                new = reproject_moment(dense, new_ps[j], old_ps[j], lp.sides, square)
            new = jnp.where(flags[j], new.astype(dense.dtype), dense)
            out.append(compress.quantize_like(x, new) if quant else new)
        return jax.tree_util.tree_unflatten(sdef, out)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def galore(learning_rate: optax.ScalarOrSchedule, inner: optax.GradientTransformation | None = None,
           rank: Any = 128, update_proj_gap: Any = 200, scale: Any = 0.25, proj_type: Any = "std",
           weight_decay: Any = 0.0, mask=None, select=None, matrix_axes=None,
           refresh: Any = "svd", moments: str = "keep",
           second_moments: str = r"(^|/)(nu|hessian|h|v)$", stagger: bool = False,
           sign_align: bool = False, projector_dtype=None, key: Any = 0,
           reference_mode: bool = False) -> optax.GradientTransformationExtraArgs:
    """GaLore with decoupled weight decay in the full space and a learning rate (GaLore-AdamW).

    ``p <- p - lr * (scale_by_galore(g) + weight_decay * p)``; the other arguments are those of
    :func:`scale_by_galore`. The reference decays after the update (``p(1 - lr wd)`` of the updated
    p); the difference is O(lr^2 wd). Paper: GaLore (Zhao et al., 2024).

    ``optax.inject_hyperparams(galore)(learning_rate=..., rank=..., ...)`` works without
    ``static_args`` for numeric and string arguments; callables other than schedules (a predicate
    ``select``, a callable ``rank``, ``projector_dtype=jnp.float32``) must be named in
    ``static_args`` as inject_hyperparams treats every callable as a schedule (or use a regex /
    rules list / dtype string).

    Args:
      learning_rate: float or optax schedule.
      inner: the transform in projected space (default Adam, eps 1e-6).
      weight_decay: decoupled weight decay (default 0.0).
      mask: which leaves decay (``jaxeff.select`` selector; default all).
      reference_mode: galore-torch's ``GaLoreAdamW`` step exactly (module docstring): inner
        :func:`scale_by_reference_adam` unless ``inner`` is given, and the decay applied to the
        updated weights, ``p <- (p - lr u)(1 - lr wd)``. Default False (decay before the update).

    Raises: as :func:`scale_by_galore`; TypeError for a ``learning_rate`` that is neither a
    number nor a schedule, or a non-number ``weight_decay``; ValueError for a negative or
    non-finite ``learning_rate`` / ``weight_decay``, a ``mask`` matching no leaf, and (in
    ``reference_mode``) for an update called without params.
    """
    learning_rate = check_learning_rate("learning_rate", learning_rate, traced_ok=True)
    weight_decay = check_float("weight_decay", weight_decay, 0.0, traced_ok=True)
    wd_mask = None if mask is None else (lambda params: select_mask(mask, params, argname="mask"))
    core = scale_by_galore(inner, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                           proj_type=proj_type, select=select, matrix_axes=matrix_axes,
                           refresh=refresh, moments=moments, second_moments=second_moments,
                           stagger=stagger, sign_align=sign_align, projector_dtype=projector_dtype,
                           key=key, reference_mode=reference_mode)
    if reference_mode:
        return optax.chain(core, _decay_after_update(learning_rate, weight_decay, mask))
    return optax.chain(core, optax.add_decayed_weights(weight_decay, wd_mask),
                       optax.scale_by_learning_rate(learning_rate))
