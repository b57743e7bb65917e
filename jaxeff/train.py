"""A small, framework-free training loop: train state, jitted step, evaluation, metrics, resume.

Nothing here is required to use jaxeff's transforms; it is the loop the experiments, notebooks
and tests share, kept short enough to read top to bottom (nanodo style)::

    state = init_train_state(params, tx, seed=0)
    step = make_train_step(loss_fn, tx)                 # loss_fn(params, batch) -> (loss, aux)
    state, metrics = step(state, batch)

``make_train_step`` passes extra keyword arguments to ``tx.update`` for transforms that need
them (``optax.GradientTransformationExtraArgs`` such as Sophia): give
``extra_args(params, batch, key) -> dict``. Randomness is explicit: the step key is
``fold_in(state.rng, state.step)``, so a resumed run draws exactly the keys it would have drawn.

``fit`` runs the loop with a tqdm bar (loss, tokens/s), periodic evaluation, metrics as JSONL
and Orbax checkpoints of the train state and the data iterator's state
(see :mod:`jaxeff.checkpoint`); with ``resume=True`` it continues from the latest checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterable, Iterator, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxeff import sharding as shd
from jaxeff import state_sharding as ss

__all__ = ["TrainState", "init_train_state", "make_train_step", "make_eval_fn", "evaluate",
           "state_shardings", "fit", "FitResult"]


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data iterator: arrays only."""

    step: jax.Array          # int32 scalar
    params: Any
    opt_state: Any
    rng: jax.Array           # uint32[2] raw key; step keys are fold_in(rng, step)


def init_train_state(params, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
    """Fresh state: step 0, ``tx.init(params)`` and a raw PRNG key from ``seed``."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(seed))


def state_shardings(state: TrainState, mesh, axis: str = "fsdp", min_size: int = 2 ** 12, *,
                    param_shardings=None):
    """Shardings for a whole train state: FSDP for the params, the params' layout for the
    optimizer state.

    Params: ``param_shardings`` if given, else :func:`jaxeff.state_sharding.fsdp_param_shardings`
    (each leaf of at least ``min_size`` values split along its largest axis divisible by the
    ``axis`` size; structured weights through their factors). Optimizer state:
    :func:`jaxeff.state_sharding.derive_shardings` from those params' shardings (moments, Sophia's
    Hessian EMA, pruning masks follow their param; GaLore projectors and low-rank moments, and
    compressed codes, follow the param's sharded axis), with the FSDP rule for leaves that belong
    to no param. ``step``, ``rng`` and any other field keep the FSDP rule (small leaves
    replicated); so does every leaf of a state without ``params``/``opt_state`` (the behaviour
    before the optimizer-state rules).

    Args:
      state: a :class:`TrainState` (arrays or ``jax.ShapeDtypeStruct``s, e.g. from
        ``jax.eval_shape``); after growth, pass the grown state: everything is re-derived.
      mesh: the ``jax.sharding.Mesh``.
      axis: the FSDP mesh axis (default 'fsdp'); min_size: smallest sharded leaf (default 4096).
      param_shardings: optional tree of ``NamedSharding`` for ``state.params`` (e.g. tensor
        parallel layouts) from which the optimizer state is derived instead.

    Raises: what :func:`jaxeff.state_sharding.derive_shardings` raises for ``param_shardings``
    that do not match the params.
    """
    base = shd.fsdp_shardings(state, mesh, axis=axis, min_size=min_size)  # step, rng, extras
    if not (hasattr(state, "params") and hasattr(state, "opt_state") and hasattr(base, "replace")):
        return base
    psh = param_shardings if param_shardings is not None else ss.fsdp_param_shardings(
        state.params, mesh, axis=axis, min_size=min_size)
    osh = ss.derive_shardings(state.opt_state, state.params, psh, mesh,
                              fallback=ss.fsdp_fallback(mesh, axis=axis, min_size=min_size))
    return base.replace(params=psh, opt_state=osh)


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, *,
                    extra_args: Optional[Callable] = None,
                    metrics_fn: Optional[Callable] = None,
                    mesh=None, shardings=None, donate: bool = True, jit: bool = True):
    """Build ``step(state, batch) -> (state, metrics)``.

    Args:
      loss_fn: ``(params, batch) -> (loss, aux_dict)``; aux values are logged as metrics.
      tx: any optax transformation (``...ExtraArgs`` ones receive ``extra_args``).
      extra_args: optional ``(params, batch, key) -> dict`` of keyword arguments for
        ``tx.update`` (e.g. Sophia's estimator inputs).
      metrics_fn: optional ``(opt_state) -> dict`` of scalars to log (e.g. Sophia's win rate).
      mesh / shardings: with a mesh, the batch is split over all mesh axes and the state is
        placed by ``shardings`` (default :func:`state_shardings` of the first state seen).
      donate: donate the old state's buffers.
      jit: wrap in ``jax.jit`` (turn off to debug).

    Metrics: ``loss``, ``grad_norm``, ``update_norm`` and the aux/metrics_fn entries.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable; got {type(loss_fn).__name__}")
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(f"tx must be an optax.GradientTransformation; got {type(tx).__name__}")
    tx = optax.with_extra_args_support(tx)

    def step(state: TrainState, batch):
        key = jax.random.fold_in(state.rng, state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        kw = extra_args(state.params, batch, key) if extra_args is not None else {}
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **kw)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "update_norm": optax.tree.norm(updates)}
        metrics.update({k: v for k, v in (aux or {}).items()})
        if metrics_fn is not None:
            metrics.update(metrics_fn(opt_state))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    if not jit:
        return step
    if mesh is None:
        return jax.jit(step, donate_argnums=(0,) if donate else ())

    cache = {}

    def sharded_step(state, batch):
        if "fn" not in cache:
            sh = shardings if shardings is not None else state_shardings(state, mesh)
            cache["fn"] = jax.jit(step, in_shardings=(sh, shd.batch_sharding(mesh)),
                                  out_shardings=(sh, shd.replicated(mesh)),
                                  donate_argnums=(0,) if donate else ())
        return cache["fn"](state, batch)

    return sharded_step


def make_eval_fn(loss_fn: Callable, jit: bool = True):
    """``eval_fn(params, batch) -> (loss_sum, tokens)`` from a ``loss_fn`` whose aux holds
    ``tokens`` (the number of predicted positions); the loss is token-weighted."""

    def fn(params, batch):
        loss, aux = loss_fn(params, batch)
        n = aux.get("tokens", jnp.asarray(1.0)) if aux else jnp.asarray(1.0)
        return loss * n, n

    return jax.jit(fn) if jit else fn


def evaluate(eval_fn: Callable, params, batches: Iterable) -> float:
    """Token-weighted mean loss of ``params`` over a finite iterable of batches."""
    tot, n = 0.0, 0.0
    for b in batches:
        s, k = eval_fn(params, b)
        tot += float(s)
        n += float(k)
    if n == 0:
        raise ValueError("evaluate: the evaluation batches hold no predicted tokens")
    return tot / n


class FitResult(dict):
    """``{'state', 'history' (eval points), 'metrics_path', 'wall_s', 'steps_per_s'}``."""


def _scalars(metrics) -> dict:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


def fit(state: TrainState, step_fn: Callable, data: Iterator, *, steps: int,
        eval_fn: Optional[Callable] = None, eval_batches: Optional[Callable[[], Iterable]] = None,
        eval_every: int = 0, eval_params: Callable = lambda p: p,
        tokens_per_step: Optional[int] = None, tokens_offset: int = 0,
        log_every: int = 10, metrics_path: Optional[str] = None,
        checkpointer=None, checkpoint_every: int = 0, resume: bool = False,
        kill_at_step: Optional[int] = None,
        progress: bool = True, desc: str = "train") -> FitResult:
    """Run ``step_fn`` until ``state.step == steps``.

    Evaluates ``eval_fn`` on ``eval_batches()`` every ``eval_every`` steps and at the end
    (``eval_params(params)`` first, e.g. ``jaxeff.params.materialize``), writes one JSON line of
    metrics every ``log_every`` steps (and every evaluation) to ``metrics_path``, and saves the
    state plus the data iterator's state with ``checkpointer`` (a
    :class:`jaxeff.checkpoint.Checkpointer`) every ``checkpoint_every`` steps. With ``resume``,
    restores the latest checkpoint first. ``kill_at_step`` sends SIGKILL to this process after
    that step (for crash/resume tests only).
    """
    from tqdm.auto import tqdm

    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    if resume and checkpointer is not None and checkpointer.latest_step() is not None:
        state = checkpointer.restore(state, data)
    start = int(state.step)
    history = []
    f = open(metrics_path, "a") if metrics_path else None

    def tokens_at(s):
        return tokens_offset + s * (tokens_per_step or 0)

    eval_time = [0.0]

    def do_eval(s):
        te = time.perf_counter()
        loss = evaluate(eval_fn, eval_params(state.params), eval_batches())
        # wall-clock of training so far, excluding evaluation
        row = {"step": s, "tokens": tokens_at(s), "val_loss": loss,
               "wall_s": te - t0 - eval_time[0]}
        history.append(row)
        eval_time[0] += time.perf_counter() - te
        if f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        return loss

    t0 = time.perf_counter()
    bar = tqdm(total=steps, initial=start, desc=desc, disable=not progress, dynamic_ncols=True,
               leave=False)
    pending = None
    try:
        for s in range(start, steps):
            state, metrics = step_fn(state, next(data))
            done = s + 1
            if f and (done % log_every == 0 or done == steps):
                row = {"step": done, "tokens": tokens_at(done), **_scalars(metrics)}
                f.write(json.dumps(row) + "\n")
                f.flush()
            if progress and (done % log_every == 0 or done == steps):
                el = time.perf_counter() - t0
                pending = float(metrics["loss"])
                tps = (done - start) * (tokens_per_step or 0) / max(el, 1e-9)
                bar.set_postfix(loss=f"{pending:.3f}", tok_s=f"{tps:,.0f}")
            bar.update(1)
            if eval_fn is not None and eval_every and done % eval_every == 0 and done != steps:
                do_eval(done)
            if checkpointer is not None and checkpoint_every and done % checkpoint_every == 0:
                checkpointer.save(state, data)
            if kill_at_step is not None and done == kill_at_step:
                os.kill(os.getpid(), 9)
        jax.block_until_ready(state)
        wall = time.perf_counter() - t0 - eval_time[0]
        if eval_fn is not None:
            do_eval(int(state.step))
    finally:
        bar.close()
        if f:
            f.close()
    n = int(state.step) - start
    return FitResult(state=state, history=history, metrics_path=metrics_path, wall_s=wall,
                     steps_per_s=n / wall if wall > 0 else float("nan"))
