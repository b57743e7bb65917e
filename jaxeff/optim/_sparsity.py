"""Sparse training and pruning as an optax wrapper that keeps the masks in its state.

Papers:
* "SPDF: Sparse Pre-training and Dense Fine-tuning for Large Language Models" (Thangarasa et al.,
  2023, arXiv 2303.10464): a static random mask (e.g. 75%) in pre-training, then :func:`densify`
  and train every weight (pruned ones restart from 0).
* "The Journey Matters: Average Parameter Count over Pre-training Unifies Sparse and Dense Scaling
  Laws" (Jin et al., ICLR 2025, arXiv 2501.12486): gradual global magnitude pruning with a
  geometric schedule from 25% to 75% of training; the loss follows the *average* non-zero count
  ``N_bar = (1/T) sum_t N_nonzero(t)``, which the state tracks (:func:`sparsity_stats`).
* "To prune, or not to prune" (Zhu & Gupta, 2017): the cubic schedule.

Update rule (jaxpruner's pattern without its ``post_gradient_update`` call)::

    g'  = mask * g                                   (mask_gradients=True)
    u, inner_state = inner.update(g', inner_state, p)
    mask <- prune(|p + u|, schedule(count + 1)) & mask   (only when the target sparsity grows)
    u'  = mask * (p + u) - p                          (written where(mask, u, -p): exact)

so ``optax.apply_updates(p, u')`` leaves masked weights exactly 0 and masks never regrow. Pruning
keeps exactly ``N - floor(s*N)`` weights per group (global: all selected weights; 'layer': each
matrix), ties broken by position: the k-th largest score is found by a 32-step bisection over the
order-preserving uint32 image of the float32 scores, and ties by a bisection on the row-major
position (sharded reductions only: no flattening, sort or cumsum, so no weight is gathered).
``floor(s*N)`` is computed in float32 (exact for N < 2**24).

Timing: ``schedule(t)`` is the sparsity of the weights used in step ``t``'s forward pass; the
masks for step 0 are made in ``init`` from the initial params, which the user zeroes once with
:func:`apply_masks` (otherwise the first update zeroes them).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

# the schedules live in their own module; re-exported here
from jaxeff.optim._sparsity_schedules import (constant_sparsity, cubic_sparsity, journey_schedule,
                                              journey_window)
from jaxeff._checks import check_bool, is_traced
from jaxeff.select import select_mask
from jaxeff.state_sharding import register_rule

__all__ = ["SparseState", "prune", "spdf", "densify", "apply_masks", "sparsity_stats",
           "constant_sparsity", "geometric_sparsity", "cubic_sparsity", "journey_schedule",
           "journey_window"]


class SparseState(NamedTuple):
    """State of :func:`prune`.

    ``masks``: bool arrays shaped like the selected params (a bool scalar ``True`` for the
    others); ``density_sum``/``density_comp``: Kahan sum over steps of the selected density;
    ``dense``: True after :func:`densify` (no more pruning); ``n_bad_schedule``: steps whose
    ``schedule`` value was NaN or outside [0, 1) (those steps do not prune).
    """

    count: jax.Array
    masks: Any
    inner_state: Any
    density_sum: jax.Array
    density_comp: jax.Array
    dense: jax.Array
    n_bad_schedule: jax.Array  # int32[]: steps whose schedule value was NaN or outside [0, 1)


@register_rule(SparseState)
def _sparse_shardings(s: SparseState, ctx):
    """Sharding (``jaxeff.state_sharding``): masks take the param sharding, the inner state is
    walked (its own rules), counters and density sums replicated."""
    rep = ctx.replicated
    return s._replace(count=rep(s.count), masks=ctx.walk(s.masks),
                      inner_state=ctx.walk(s.inner_state), density_sum=rep(s.density_sum),
                      density_comp=rep(s.density_comp), dense=rep(s.dense),
                      n_bad_schedule=rep(s.n_bad_schedule))


# ----------------------------------------------------------------------------- mask selection

def _to_keys(scores):
    """float32 -> uint32 with the same order (radix-sort trick)."""
    bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _kth_key(count_ge: Callable, k, like):
    """Largest uint32 T with count_ge(T) >= k, by bisection (32 steps); ``like`` sets the shape."""
    lo = jnp.zeros_like(like, jnp.uint32)
    hi = jnp.full_like(like, 0xFFFFFFFF, jnp.uint32)

    def body(_, lohi):
        lo, hi = lohi
        d = hi - lo
        mid = lo + (d >> 1) + (d & 1)
        ok = count_ge(mid) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
    return jax.lax.fori_loop(0, 32, body, (lo, hi))[0]


def _positions(shape, batch_ndim: int):
    """Row-major position of every entry within its group (the trailing ``ndim - batch_ndim``
    axes), built from iotas so that a sharded mask needs no reshape."""
    pos = jnp.zeros(shape, jnp.int32)
    for a in range(batch_ndim, len(shape)):
        stride = int(np.prod(shape[a + 1:], dtype=np.int64))
        pos = pos + jax.lax.broadcasted_iota(jnp.int32, shape, a) * stride
    return pos


def _first_n(mask, n, batch_ndim: int = 0):
    """Keep the first ``n`` True entries of each group of ``mask`` in row-major order.

    ``n`` has shape ``mask.shape[:batch_ndim]``. A bisection on the position (sums only) instead
    of a cumulative sum over the flattened group, so a sharded mask is never gathered.
    """
    axes = tuple(range(batch_ndim, mask.ndim))
    pos = _positions(mask.shape, batch_ndim)
    size = int(np.prod(mask.shape[batch_ndim:], dtype=np.int64))
    expand = (Ellipsis,) + (None,) * len(axes)

    def body(_, lohi):
        lo, hi = lohi
        mid = (lo + hi) // 2
        ok = jnp.sum(mask & (pos < mid[expand]), axis=axes, dtype=jnp.int32) >= n
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)
    shape = mask.shape[:batch_ndim]
    lo, hi = jnp.zeros(shape, jnp.int32), jnp.full(shape, size, jnp.int32)
    hi = jax.lax.fori_loop(0, max(1, size.bit_length()) + 1, body, (lo, hi))[1]
    return mask & (pos < hi[expand])


def _topk_groups(keys, k, batch_ndim: int):
    """Mask keeping exactly the ``k`` largest keys of each group (the trailing axes after
    ``batch_ndim``; ``k`` has the batch shape), ties broken by row-major position."""
    axes = tuple(range(batch_ndim, keys.ndim))
    expand = (Ellipsis,) + (None,) * len(axes)
    T = _kth_key(lambda t: jnp.sum(keys >= t[expand], axis=axes, dtype=jnp.int32), k, k)
    gt = keys > T[expand]
    need = k - jnp.sum(gt, axis=axes, dtype=jnp.int32)
    return gt | _first_n(keys == T[expand], jnp.maximum(need, 0), batch_ndim)


def _topk_global(keys_list, k):
    """Masks keeping exactly the k largest keys over all arrays (ties: in list order, then
    row-major). No array is reshaped, so sharded keys stay sharded."""
    T = _kth_key(lambda t: sum(jnp.sum(x >= t, dtype=jnp.int32) for x in keys_list), k, k)
    gt = [x > T for x in keys_list]
    need = k - sum(jnp.sum(g, dtype=jnp.int32) for g in gt)
    out, offset = [], jnp.int32(0)
    for x, g in zip(keys_list, gt):
        ties = x == T
        out.append(g | _first_n(ties, jnp.maximum(need - offset, 0)))
        offset = offset + jnp.sum(ties, dtype=jnp.int32)
    return out


def _group_ndim(x) -> int:
    """Batch axes of a leaf's groups: one group per matrix (leading axes batch) or vector."""
    return x.ndim - 2 if x.ndim > 2 else 0


def _n_prune(s, n: int):
    return jnp.floor(s * jnp.float32(n)).astype(jnp.int32)


# ----------------------------------------------------------------------------- the wrapper

def prune(inner: optax.GradientTransformation, schedule: Callable, *, select,
          score: Union[str, Callable] = "magnitude", scope: str = "global",
          key: Optional[jax.Array] = None, mask_gradients: bool = True,
          static: bool = False) -> optax.GradientTransformationExtraArgs:
    """Wrap ``inner`` so the selected params follow masks pruned on ``schedule``.

    Update rule and papers: see the module docstring.

    Args:
      inner: the optimizer (any optax transformation, ExtraArgs supported).
      schedule: ``step -> sparsity`` in [0, 1), non-decreasing (:func:`journey_schedule`,
        :func:`geometric_sparsity`, :func:`cubic_sparsity`, :func:`constant_sparsity`).
        ``schedule(0)`` is checked at ``init`` (ValueError outside [0, 1) or NaN); a traced
        value out of range or NaN at a later step prunes nothing that step and is counted in
        ``state.n_bad_schedule`` (read it after training: non-zero means a broken schedule).
      select: which leaves are prunable (``jaxeff.select`` selector; required).
      score: ``'magnitude'`` (|w|), ``'random'`` (fixed uniform scores from ``key``) or a callable
        ``params -> tree of scores`` (higher = keep).
      scope: ``'global'`` (one threshold over all selected weights, the Journey-Matters default)
        or ``'layer'`` (each matrix of a leaf, over its last two axes, gets the sparsity).
      key: required for ``score='random'``.
      mask_gradients: zero the gradients of masked weights before ``inner`` (default True), so
        their optimizer moments stay 0 and dense fine-tuning after :func:`densify` starts clean.
      static: masks are made once at ``init`` (at ``schedule(0)``) and never change (SPDF);
        ``update`` then carries no pruning code.
    Raises:
      ValueError naming the argument for an unknown score/scope, a missing key, a selected leaf
      with no axes, or a selector matching nothing (at ``init``); ValueError at ``update`` when
      ``params`` is not passed.
    """
    if not (callable(score) or score in ("magnitude", "random")):
        raise ValueError(f"score={score!r}; valid: 'magnitude', 'random' or a callable")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope={scope!r}; valid: 'global', 'layer'")
    if score == "random" and key is None:
        raise ValueError("score='random' needs key=jax.random.key(...)")
    if not callable(schedule):
        raise TypeError(f"schedule must be a callable step -> sparsity; got {type(schedule)}")
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"inner must be an optax.GradientTransformation; got {inner!r}")
    mask_gradients = check_bool("mask_gradients", mask_gradients)
    static = check_bool("static", static)
    inner = optax.with_extra_args_support(inner)

    def selected(params):
        sel = select_mask(select, params, argname="select")
        for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(sel)):
            if s and jnp.ndim(p) == 0:
                raise ValueError("select picks a scalar leaf; only arrays with >= 1 axis can "
                                 "be pruned")
        return sel

    def scores_of(new_params, sel):
        if callable(score):
            sc = score(new_params)
        elif score == "magnitude":
            sc = jax.tree.map(jnp.abs, new_params)
        else:
            leaves, treedef = jax.tree.flatten(new_params)
            # drawn flat: an N-d partitionable-threefry draw compiles ~6x slower on CPU
            sc = treedef.unflatten([
                jax.random.uniform(jax.random.fold_in(key, i), (x.size,)).reshape(x.shape)
                for i, x in enumerate(leaves)])
        return sc

    def compute_masks(new_params, masks, s, sel):
        sc = scores_of(new_params, sel)
        flat_sel = jax.tree.leaves(sel)
        m_l, treedef = jax.tree.flatten(masks)
        sc_l = treedef.flatten_up_to(sc)
        idx = [i for i, b in enumerate(flat_sel) if b]
        keys = [_to_keys(jnp.where(m_l[i], sc_l[i], -jnp.inf)) for i in idx]
        if scope == "global":
            n = sum(int(np.prod(m_l[i].shape)) for i in idx)
            new = _topk_global(keys, n - _n_prune(s, n))
        else:
            new = []
            for kk in keys:
                b = _group_ndim(kk)
                size = int(np.prod(kk.shape[b:], dtype=np.int64))
                k = jnp.full(kk.shape[:b], size, jnp.int32) - _n_prune(s, size)
                new.append(_topk_groups(kk, k, b))
        out = list(m_l)
        for i, nm in zip(idx, new):
            out[i] = nm & m_l[i]
        return treedef.unflatten(out)

    def needs_prune(masks, s, sel):
        live = [m for m, b in zip(jax.tree.leaves(masks), jax.tree.leaves(sel)) if b]
        if scope == "global":
            n = sum(int(np.prod(m.shape)) for m in live)
            return sum(jnp.sum(m, dtype=jnp.int32) for m in live) > n - _n_prune(s, n)
        def over(m):
            b = _group_ndim(m)
            size = int(np.prod(m.shape[b:], dtype=np.int64))
            live_n = jnp.sum(m, axis=tuple(range(b, m.ndim)), dtype=jnp.int32)
            return jnp.any(live_n > size - _n_prune(s, size))
        return jnp.any(jnp.stack([over(m) for m in live]))

    @jax.jit
    def init_masks(params):
        sel = selected(params)
        ones = jax.tree.map(lambda p, b: jnp.ones(jnp.shape(p) if b else (), jnp.bool_),
                            params, sel)
        return compute_masks(params, ones, schedule(0), sel)

    def init_fn(params):
        selected(params)                      # raise selector errors outside of jit tracing
        s0 = schedule(0)                      # concrete unless init runs under jit / eval_shape
        if jnp.ndim(s0) != 0:
            raise TypeError(f"schedule(step) must return a scalar sparsity in [0, 1); schedule(0)"
                            f" returned {s0!r}")
        v0 = None if is_traced(s0) else float(s0)
        if v0 is not None and not 0.0 <= v0 < 1.0:
            raise ValueError(f"schedule(step) must return a sparsity in [0, 1); schedule(0) = "
                             f"{v0!r}")
        masks = init_masks(params)
        # distinct arrays for every field: a train step that donates its state may not see
        # one buffer twice
        return SparseState(jnp.zeros((), jnp.int32), masks, inner.init(params),
                           jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                           jnp.zeros((), jnp.bool_), jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("prune needs params: call tx.update(grads, state, params)")
        sel = selected(params)
        masks = state.masks
        if mask_gradients:
            updates = jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)), updates,
                                   masks)
        u, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        # Kahan-summed density of the masks used in this step (N_bar needs long exact sums).
        live = [m for m, b in zip(jax.tree.leaves(masks), jax.tree.leaves(sel)) if b]
        n = sum(int(np.prod(m.shape)) for m in live)
        dens = sum(jnp.sum(m, dtype=jnp.int32) for m in live).astype(jnp.float32) / n
        y = dens - state.density_comp
        tot = state.density_sum + y
        comp = (tot - state.density_sum) - y
        count = state.count + 1
        s = jnp.asarray(schedule(count), jnp.float32)
        bad = jnp.logical_not((s >= 0.0) & (s < 1.0))        # NaN compares False
        s = jnp.where(bad, 0.0, s)                              # 0: never prunes (masks only shrink)
        new_params = jax.tree.map(lambda p, d: p + d, params, u)
        if static:
            new_masks = masks
        else:
            new_masks = jax.lax.cond(
                jnp.logical_and(jnp.logical_not(state.dense), needs_prune(masks, s, sel)),
                lambda: compute_masks(new_params, masks, s, sel), lambda: masks)
        u = jax.tree.map(lambda d, p, m: jnp.where(m, d, -p.astype(d.dtype)), u, params,
                         new_masks)
        return u, SparseState(count, new_masks, inner_state, tot, comp, state.dense,
                              state.n_bad_schedule + bad.astype(jnp.int32))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def spdf(inner: optax.GradientTransformation, sparsity: float = 0.75, *, key: jax.Array,
         select, scope: str = "layer") -> optax.GradientTransformationExtraArgs:
    """SPDF sparse pre-training: a static random mask of ``sparsity`` per matrix.

    ``prune(inner, constant_sparsity(sparsity), score='random', scope=scope, static=True)``; call
    :func:`densify` on the optimizer state to switch to dense fine-tuning. Paper: "SPDF: Sparse
    Pre-training and Dense Fine-tuning for Large Language Models" (2023). Raises ValueError for a
    sparsity outside [0, 1).
    """
    return prune(inner, constant_sparsity(sparsity), select=select, score="random", scope=scope,
                 key=key, static=True)


def _map_states(fn, opt_state):
    return jax.tree.map(lambda x: fn(x) if isinstance(x, SparseState) else x, opt_state,
                        is_leaf=lambda x: isinstance(x, SparseState))


def _find(opt_state) -> SparseState:
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SparseState))
             if isinstance(x, SparseState)]
    if len(found) != 1:
        raise ValueError(f"opt_state must hold exactly one SparseState (from prune/spdf); "
                         f"found {len(found)}")
    return found[0]


def densify(opt_state):
    """Switch every :class:`SparseState` in ``opt_state`` to dense training (SPDF fine-tuning).

    Masks become all ``True`` and pruning stops; pruned weights restart from 0 and, with
    ``mask_gradients``, from zero optimizer moments.
    """
    return _map_states(lambda s: s._replace(
        masks=jax.tree.map(jnp.ones_like, s.masks), dense=jnp.ones((), jnp.bool_)), opt_state)


def apply_masks(params, opt_state):
    """``params`` with the masks of the :class:`SparseState` in ``opt_state`` applied (zeros).

    Raises ValueError unless ``opt_state`` holds exactly one :class:`SparseState`.
    """
    masks = _find(opt_state).masks
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def sparsity_stats(opt_state, params) -> dict:
    """Non-zero counts of the masked training, for the Journey-Matters ``N_bar``.

    Returns a dict of scalars: ``density`` (current, selected weights), ``mean_density`` (over
    the updates so far), ``nonzero`` and ``mean_nonzero`` (whole tree: unselected leaves count
    fully), ``total`` (all params) and ``steps``. Raises ValueError unless ``opt_state`` holds
    exactly one :class:`SparseState`.
    """
    st = _find(opt_state)
    sel_n = sum(int(np.prod(m.shape)) for m in jax.tree.leaves(st.masks) if m.ndim)
    total = sum(int(np.prod(jnp.shape(p))) for p in jax.tree.leaves(params))
    kept = sum(jnp.sum(m, dtype=jnp.int32) for m in jax.tree.leaves(st.masks) if m.ndim)
    density = kept.astype(jnp.float32) / sel_n
    mean_density = jnp.where(st.count > 0, st.density_sum / jnp.maximum(st.count, 1), density)
    return dict(density=density, mean_density=mean_density,
                nonzero=(total - sel_n) + density * sel_n,
                mean_nonzero=(total - sel_n) + mean_density * sel_n, total=total, steps=st.count)
