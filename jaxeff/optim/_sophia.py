"""Sophia: a clipped, diagonal-Hessian-preconditioned optimizer (Sophia-G and Sophia-H).

Paper: "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model Pre-training"
(Liu et al., 2023). Reference: Liuhong99/Sophia ``sophia.py`` / ``train_sophiag.py``.

Update rule (per coordinate; g = incoming gradient, h_hat from a :mod:`jaxeff.optim.hessian`
estimator, which for GNB already carries the batch-size factor B)::

    m <- b1 m + (1 - b1) g                                      every step
    h <- b2 h + (1 - b2) h_hat                                  on refresh steps only (every k)
    u  = clip(m / max(rho h, eps), -c, c)                       scale_by_sophia's output
    theta <- theta - lr (u + weight_decay theta)                sophia() = + decay, * -lr

Refresh steps: ``count % k == 0`` *before* the update, so the step uses the fresh h (paper,
Algorithm 3: t mod k = 1, 1-based). ``reference_mode=True`` reproduces reference SophiaG: no
bias correction, ``u = clip(m / (rho max(h, 0) + 1e-15), ±1)``, refresh after steps with
``iter % k == k - 1`` (= before steps with ``count % k == 0, count > 0`` here: the estimate uses
the same, already-updated parameters), GNB g_hat clipped to global norm 1.

Calling convention (a ``GradientTransformationExtraArgs``)::

    tx.update(grads, state, params, batch=batch, key=key, unmasked_params=params, refresh=None)

* ``batch``/``key``: what the estimator needs (the logits/loss function is given once, at
  estimator construction). ``key`` is optional: without it the key kept in the state is split.
* ``unmasked_params``: the full parameter tree. Needed under ``optax.multi_transform`` /
  ``optax.partition``, where ``params`` holds ``MaskedNode`` leaves: the estimator evaluates the
  model on the full tree and differentiates only the leaves Sophia owns.
* ``refresh``: static Python bool or ``None``. ``None`` (default): refresh inside the step with
  ``lax.cond`` on the count. ``True``/``False``: always/never refresh in this call; compile two
  train steps and alternate them on the host with :func:`split_refresh`
  (:func:`is_refresh_step` decides), so the Hessian branch's buffers exist only in the refresh
  executable.

:func:`sophia_extra_args` builds the ``extra_args(params, batch, key)`` function for
``jaxeff.train.make_train_step``; :func:`sophia_win_rate` reads the win rate (fraction of
coordinates not clipped; the authors advise keeping it in 0.1-0.5) from any optimizer state::

    logits_fn = lambda p, b: llama.forward(p, b["inputs"], cfg, b["segment_ids"], b["positions"])
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     sophia(schedule, gnb(logits_fn), rho=0.05, weight_decay=0.2))
    step = make_train_step(loss_fn, tx, extra_args=sophia_extra_args(),
                           metrics_fn=lambda s: {"win_rate": sophia_win_rate(s)})
    # or, separately compiled refresh:
    step = split_refresh(make_train_step(loss_fn, tx, extra_args=sophia_extra_args(True)),
                         make_train_step(loss_fn, tx, extra_args=sophia_extra_args(False)))

Which refresh costs less (measured; ``python -m experiments.bench_sophia --rounds 10``: whole
tiny-llama train steps, batch 8x128, k 10, 2-core CPU, jax 0.10.2; peak from the compiled
``memory_analysis``, time amortised over refresh intervals, ratios to AdamW)::

    Sophia-G, lax.cond in the step       time 1.17x   temp 194.9 MB   peak 1.74x
    Sophia-G, separately compiled        time 1.06x   temp 111.3 MB   peak 1.04x  (AdamW 106.8)

The ``lax.cond`` step reserves the estimator's forward/backward buffers on every step on top
of the training backward's (our reading: XLA's buffer assignment does not reuse the training
activations' space inside the conditional's branch) and is slower on every step, so prefer
``refresh=True/False`` with :func:`split_refresh`: its peak is AdamW's plus about one
parameter-sized tensor (g_hat), and its no-refresh step reserves exactly AdamW's temporaries.
The state itself (m, h) is the size of AdamW's (m, v).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxeff._checks import (check_bool, check_float, check_float_dtype, check_float_leaves, check_int,
                            check_learning_rate, check_optional)
from jaxeff.optim._hessian import GaussNewtonBartlett, gnb, hutchinson
from jaxeff.state_sharding import register_rule
from jaxeff.select import select_mask

__all__ = ["SophiaState", "scale_by_sophia", "sophia", "sophia_extra_args", "sophia_win_rate",
           "is_refresh_step", "split_refresh", "gnb", "hutchinson"]


class SophiaState(NamedTuple):
    """State of :func:`scale_by_sophia` (arrays only: Orbax- and sharding-friendly)."""

    count: jax.Array      # int32[]: updates applied so far
    mu: optax.Updates     # EMA of gradients (no bias correction unless asked)
    h: optax.Updates      # EMA of the diagonal-Hessian estimate (includes B for GNB)
    n_refresh: jax.Array  # int32[]: Hessian refreshes so far
    key: jax.Array        # uint32[2]: split when update() gets no key
    win_rate: jax.Array   # float32[]: fraction of coordinates not clipped at the last update
    n_skipped: jax.Array  # int32[]: refreshes whose estimate had a non-finite coordinate (kept
                          #          the old h there, see scale_by_sophia)


@register_rule(SophiaState)
def _sophia_shardings(s: SophiaState, ctx):
    """Sharding (``jaxeff.state_sharding``): ``mu`` and the Hessian EMA ``h`` take the param
    sharding; counters (incl. skipped refreshes), key and win rate replicated."""
    rep = ctx.replicated
    return s._replace(count=rep(s.count), mu=ctx.walk(s.mu), h=ctx.walk(s.h),
                      n_refresh=rep(s.n_refresh), key=rep(s.key), win_rate=rep(s.win_rate),
                      n_skipped=rep(s.n_skipped))


def _is_masked(x):
    return isinstance(x, optax.MaskedNode)


def _validate(b1, b2, rho, eps, clip_threshold, update_interval, mu_dtype, seed):
    """The shared checks of :func:`scale_by_sophia` (``jaxeff._checks``; tracers pass through
    for ``optax.inject_hyperparams``). Returns the normalised values."""
    b1 = check_float("b1", b1, 0.0, 1.0, max_open=True, traced_ok=True)
    b2 = check_float("b2", b2, 0.0, 1.0, max_open=True, traced_ok=True)
    rho = check_optional(check_float, "rho", rho, 0.0, min_open=True, traced_ok=True)
    eps = check_optional(check_float, "eps", eps, 0.0, min_open=True, traced_ok=True)
    clip_threshold = check_float("clip_threshold", clip_threshold, 0.0, min_open=True,
                                 allow_inf=True, traced_ok=True)
    update_interval = check_int("update_interval", update_interval, 1, traced_ok=True)
    mu_dtype = check_float_dtype("mu_dtype", mu_dtype)
    seed = check_int("seed", seed, traced_ok=True)
    return b1, b2, rho, eps, clip_threshold, update_interval, mu_dtype, seed


def is_refresh_step(step: int, update_interval: int = 10, reference_mode: bool = False) -> bool:
    """Whether the update with 0-based index ``step`` refreshes h (host-side, for refresh=bool).

    Default: ``step % k == 0`` (paper, Algorithm 3); ``reference_mode``: ``step % k == 0 and
    step > 0`` (reference SophiaG refreshes after iterations with ``iter % k == k - 1``).
    Args: ``step`` (int), ``update_interval`` k (default 10), ``reference_mode`` (default False).
    """
    return step % update_interval == 0 and (step > 0 or not reference_mode)


def split_refresh(refresh_step, plain_step, update_interval: int = 10, start_step: int = 0,
                  reference_mode: bool = False):
    """Host-side dispatcher for the separately compiled refresh: ``step(*args) -> ...``.

    Calls ``refresh_step`` (built with ``sophia_extra_args(refresh=True)``) on the steps where
    :func:`is_refresh_step` holds and ``plain_step`` (``refresh=False``) otherwise, counting
    calls on the host (no device sync). ``start_step``: the step to resume from. It is glue,
    not state: on resume, build it again with ``start_step=int(state.step)``.
    """
    update_interval = check_int("update_interval", update_interval, 1)
    counter = [int(start_step)]

    def step(*args, **kwargs):
        i = counter[0]
        counter[0] += 1
        fn = refresh_step if is_refresh_step(i, update_interval, reference_mode) else plain_step
        return fn(*args, **kwargs)

    return step


def scale_by_sophia(estimator, b1: float = 0.965, b2: float = 0.99, rho: Optional[float] = None,
                    eps: Optional[float] = None, clip_threshold: float = 1.0,
                    update_interval: int = 10, bias_correction: bool = False,
                    reference_mode: bool = False, mu_dtype: Optional[Any] = None,
                    seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """Sophia's preconditioned, clipped direction ``u = clip(m / max(rho h, eps), ±c)``.

    See the module docstring for the update rule, refresh schedule and calling convention.

    Paper: "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
    Pre-training" (Liu et al., 2023).

    Args:
      estimator: :func:`jaxeff.optim.gnb` (Sophia-G) or :func:`jaxeff.optim.hutchinson`
        (Sophia-H), or any object with ``estimate_leaves(merge, leaves, *, batch, key, obj_fn)``.
      b1: gradient EMA rate; default 0.965 (reference).
      b2: Hessian EMA rate per refresh; default 0.99.
      rho: the gamma/rho scale of h; default ``estimator.default_rho`` (GNB 0.04, Hutchinson
        0.01). For GNB, rho multiplies B h like the reference's ``rho * bs``.
      eps: floor of the denominator; default 1e-12 (1e-15, additive, in ``reference_mode``).
      clip_threshold: c; default 1.0.
      update_interval: k, refresh every k steps; default 10.
      bias_correction: divide m by 1 - b1^t and h by 1 - b2^(refreshes); default ``False``
        (neither the paper nor the reference corrects; optax.contrib corrects m).
      reference_mode: reproduce reference SophiaG exactly (module docstring); forces
        ``bias_correction=False`` and sets an unset GNB ``grad_clip`` to 1.0.
      mu_dtype: dtype of m (a float dtype); default the gradient dtype.
      seed: seeds the state key used when ``update`` gets no ``key``; default 0.

    Non-finite Hessian estimates: a refresh whose estimate is inf/NaN at some coordinates
    (finite gradients, so ``optax.apply_if_finite`` does not see it) keeps the old ``h`` at those
    coordinates and refreshes the others; ``state.n_skipped`` counts such refreshes. (A
    non-finite *gradient* propagates as in optax: wrap in ``apply_if_finite``.)

    Raises:
      TypeError for a missing/invalid ``estimator``, a non-number hyperparameter, a non-float
      ``mu_dtype``, a non-int ``update_interval`` / ``seed``, and at ``init`` a non-float params
      leaf (named by path); ValueError for b1, b2 outside [0, 1), NaN/inf or non-positive rho,
      eps, a non-positive clip_threshold (inf: no clipping), update_interval < 1, and (at trace
      time) for missing ``params``, masked ``params`` without ``unmasked_params``, a traced
      ``refresh``, or what the estimator lacks (batch, key, loss/logits function).
    """
    if estimator is None or not hasattr(estimator, "estimate_leaves"):
        raise TypeError("estimator must be a Hessian estimator such as jaxeff.optim.gnb("
                        "logits_fn) or jaxeff.optim.hutchinson(loss_fn); got "
                        f"{type(estimator).__name__}")
    b1, b2, rho, eps, clip_threshold, update_interval, mu_dtype, seed = _validate(
        b1, b2, rho, eps, clip_threshold, update_interval, mu_dtype, seed)
    bias_correction = check_bool("bias_correction", bias_correction)
    reference_mode = check_bool("reference_mode", reference_mode)
    if reference_mode:
        bias_correction = False
        if isinstance(estimator, GaussNewtonBartlett) and estimator.grad_clip is None:
            estimator = dataclasses.replace(estimator, grad_clip=1.0)
    rho = getattr(estimator, "default_rho", 0.04) if rho is None else rho
    eps = (1e-15 if reference_mode else 1e-12) if eps is None else eps
    k = update_interval

    def init_fn(params):
        check_float_leaves("params", params, "Sophia's m and h (and a Hutchinson HVP) need a "
                           "float parameter")
        mu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype or p.dtype), params)
        return SophiaState(count=jnp.zeros([], jnp.int32), mu=mu,
                           h=jax.tree.map(jnp.zeros_like, params),
                           n_refresh=jnp.zeros([], jnp.int32),
                           key=jax.random.PRNGKey(seed), win_rate=jnp.zeros([], jnp.float32),
                           n_skipped=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, batch=None, key=None, obj_fn=None,
                  unmasked_params=None, refresh=None, **extra_args):
        del extra_args  # meant for other transforms of the chain
        if params is None:
            raise ValueError("sophia needs params: call tx.update(grads, state, params, ...)")
        if refresh is not None and not isinstance(refresh, bool):
            raise TypeError("refresh must be a static Python bool or None (compile one step "
                            f"per value); got {type(refresh).__name__}")
        items, treedef = jax.tree.flatten(params, is_leaf=_is_masked)
        owned = [i for i, x in enumerate(items) if not _is_masked(x)]
        if len(owned) < len(items):  # under optax.partition / multi_transform / masked
            if unmasked_params is None:
                raise ValueError("sophia got masked params (it runs inside optax.partition/"
                                 "multi_transform/masked): pass unmasked_params=<full params> to "
                                 "update so the estimator sees the whole model")
            full = jax.tree.leaves(unmasked_params, is_leaf=_is_masked)
            if any(_is_masked(x) for x in full):
                raise ValueError("unmasked_params holds MaskedNode leaves; pass the full tree "
                                 "(do not set mask_compatible_extra_args=True)")
            try:
                full = treedef.flatten_up_to(unmasked_params)
            except (ValueError, TypeError) as e:
                raise ValueError("unmasked_params does not have the structure of the params "
                                 f"tree: {e}") from None
        else:
            full = items

        def merge(xs):
            out = list(full)
            for i, x in zip(owned, xs):
                out[i] = x
            return treedef.unflatten(out)

        count_inc = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda g, m: (b1 * m + (1.0 - b1) * g).astype(m.dtype), updates, state.mu)
        state_key, sub = jax.random.split(state.key)
        use_key, new_key = (sub, state_key) if key is None else (key, state.key)

        def do_refresh(h, n, n_skip):
            h_hat = estimator.estimate_leaves(merge, [items[i] for i in owned], batch=batch,
                                              key=use_key, obj_fn=obj_fn)
            h_leaves, h_def = jax.tree.flatten(h)
            # a non-finite estimate (finite gradients: apply_if_finite cannot see it) keeps the
            # old h at that coordinate; the refresh is counted in n_skipped
            ok = [jnp.isfinite(e) for e in h_hat]
            new = [jnp.where(o, b2 * hl + (1.0 - b2) * e, hl).astype(hl.dtype)
                   for hl, e, o in zip(h_leaves, h_hat, ok)]
            bad = jnp.logical_not(jnp.all(jnp.stack([jnp.all(o) for o in ok]))) if ok else False
            return (h_def.unflatten(new), optax.safe_increment(n),
                    n_skip + jnp.asarray(bad, jnp.int32))

        if refresh is None:
            due = state.count % k == 0
            if reference_mode:
                due = jnp.logical_and(due, state.count > 0)
            h, n_refresh, n_skipped = jax.lax.cond(due, do_refresh, lambda h, n, m: (h, n, m),
                                                   state.h, state.n_refresh, state.n_skipped)
        elif refresh:
            h, n_refresh, n_skipped = do_refresh(state.h, state.n_refresh, state.n_skipped)
        else:
            h, n_refresh, n_skipped = state.h, state.n_refresh, state.n_skipped

        if bias_correction:
            m_hat = optax.tree.bias_correction(mu, b1, count_inc)
            bc2 = 1.0 - jnp.asarray(b2, jnp.float32) ** n_refresh.astype(jnp.float32)
            h_hat = jax.tree.map(lambda x: jnp.where(n_refresh > 0, x / bc2, x).astype(x.dtype), h)
        else:
            m_hat, h_hat = mu, h
        if reference_mode:
            denom = lambda hh: rho * jnp.maximum(hh, 0.0) + eps
        else:
            denom = lambda hh: jnp.maximum(rho * hh, eps)
        ratio = jax.tree.map(lambda m, hh: m / denom(hh), m_hat, h_hat)
        n_total = sum(x.size for x in jax.tree.leaves(ratio))
        n_win = sum(jnp.sum(jnp.abs(r) < clip_threshold, dtype=jnp.float32)
                    for r in jax.tree.leaves(ratio))
        win_rate = n_win / max(n_total, 1) if n_total else jnp.zeros([], jnp.float32)
        out = jax.tree.map(
            lambda r, g: jnp.clip(r, -clip_threshold, clip_threshold).astype(g.dtype),
            ratio, updates)
        return out, SophiaState(count=count_inc, mu=mu, h=h, n_refresh=n_refresh, key=new_key,
                                win_rate=jnp.asarray(win_rate, jnp.float32),
                                n_skipped=n_skipped)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sophia(learning_rate, estimator, b1: float = 0.965, b2: float = 0.99,
           rho: Optional[float] = None, weight_decay: float = 0.1, weight_decay_mask=None,
           eps: Optional[float] = None, clip_threshold: float = 1.0, update_interval: int = 10,
           bias_correction: bool = False, reference_mode: bool = False,
           mu_dtype: Optional[Any] = None, seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """Sophia optimizer: ``theta <- theta - lr (clip(m / max(rho h, eps), ±c) + wd theta)``.

    ``optax.chain(scale_by_sophia(...), add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``: weight decay is decoupled and scaled by the lr
    like the reference (``p *= 1 - lr wd``). Composes with ``optax.chain``,
    ``multi_transform``/``partition`` (pass ``unmasked_params``), ``inject_hyperparams``,
    ``MultiSteps`` and ``apply_if_finite``. Under ``MultiSteps`` the estimate sees the
    micro-batch passed with the emitting mini-step (the reference accumulates g_hat over all
    micro-batches), and MultiSteps evaluates the inner update on every mini-step.

    Paper: "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
    Pre-training" (Liu et al., 2023). The reference advises lr about the AdamW lr, weight decay
    about twice AdamW's (0.2 for GPT-2), rho tuned so the win rate stays in 0.1-0.5.

    Args:
      learning_rate: float > 0 or an ``optax.Schedule``.
      estimator: :func:`gnb` (Sophia-G) or :func:`hutchinson` (Sophia-H).
      weight_decay: decoupled decay rate >= 0; default 0.1 (reference constructor default).
      weight_decay_mask: which leaves decay, a jaxeff selector (regex over the ``/``-joined path,
        predicate ``(path, leaf) -> bool`` or pytree of bools); default ``None`` = all.
      b1, b2, rho, eps, clip_threshold, update_interval, bias_correction, reference_mode,
      mu_dtype, seed: see :func:`scale_by_sophia`.

    Raises:
      TypeError for a ``learning_rate`` that is neither a number nor a schedule; ValueError for
      a non-positive or non-finite ``learning_rate`` (a number), a negative or non-finite
      ``weight_decay``, and everything :func:`scale_by_sophia` raises.
    """
    learning_rate = check_learning_rate("learning_rate", learning_rate, allow_zero=False,
                                        traced_ok=True)
    weight_decay = check_float("weight_decay", weight_decay, 0.0, traced_ok=True)
    mask = None
    if weight_decay_mask is not None:
        mask = lambda p: select_mask(weight_decay_mask, p, argname="weight_decay_mask",
                                     allow_empty=True)
    return optax.chain(
        scale_by_sophia(estimator, b1=b1, b2=b2, rho=rho, eps=eps, clip_threshold=clip_threshold,
                        update_interval=update_interval, bias_correction=bias_correction,
                        reference_mode=reference_mode, mu_dtype=mu_dtype, seed=seed),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def sophia_extra_args(refresh: Optional[bool] = None):
    """``extra_args(params, batch, key) -> dict`` for ``jaxeff.train.make_train_step``.

    Returns ``dict(batch=batch, key=key, unmasked_params=params, refresh=refresh)``: what
    Sophia's ``update`` needs (module docstring). ``refresh``: ``None`` (default, ``lax.cond``
    in the step) or a Python bool, for the two separately compiled steps of
    :func:`split_refresh`. Raises TypeError for any other ``refresh``.
    """
    if refresh is not None and not isinstance(refresh, bool):
        raise TypeError(f"refresh must be None, True or False; got {refresh!r}")

    def extra_args(params, batch, key):
        return dict(batch=batch, key=key, unmasked_params=params, refresh=refresh)

    return extra_args


def _sophia_states(opt_state):
    leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SophiaState))
    return [s for s in leaves if isinstance(s, SophiaState)]


def sophia_win_rate(opt_state) -> jax.Array:
    """Win rate (fraction of coordinates not clipped) of the last update, from any opt state.

    Averages over every ``SophiaState`` inside (e.g. under ``multi_transform``), weighted by
    their number of coordinates. Raises ValueError if the state holds no ``SophiaState``.
    """
    states = _sophia_states(opt_state)
    if not states:
        raise ValueError("opt_state holds no SophiaState")
    sizes = [sum(x.size for x in jax.tree.leaves(s.mu)) for s in states]
    total = max(sum(sizes), 1)
    return sum(s.win_rate * (n / total) for s, n in zip(states, sizes))
