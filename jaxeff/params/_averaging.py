"""Weight averaging: uniform and greedy model soups, parameter EMA, and LAE accumulation.

All functions take and return ordinary params pytrees (any structure: dicts, lists, flax NNX
state); averages are computed in float32 and cast back to each leaf's dtype. Only
floating-point leaves are averaged: an integer or bool leaf (a step counter, packed codes) must
be equal in every input and is passed through; one that differs raises ``TypeError`` naming its
path (an integer mean would be truncated: the mean of ``[1, 2]`` and ``[2, 3]`` is not
``[1, 2]``).

**Model soups** ("Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", Wortsman et al., 2022; used for instruction tuning in
"POINTS: Improving Your Vision-language Model with Affordable Strategies", Liu et al., 2024)::

    uniform:  theta = sum_i w_i theta_i / sum_i w_i          (w_i = 1 by default)
    greedy:   sort ingredients by their own held-out score (best first); start from the best;
              add ingredient i if  score(uniform(soup + [i])) >= score(soup)

The running mean ``a_k = a_{k-1} + (w_k / W_k) (theta_k - a_{k-1})`` is used, so a soup of
identical checkpoints is exactly that checkpoint.

**Parameter EMA** (Polyak averaging): ``avg' = decay * avg + (1 - decay) * params``, written as
``params + decay * (avg - params)`` so ``decay = 0`` copies ``params`` and a constant input is a
fixed point, both exactly. Keep ``avg`` in float32: in bfloat16 an increment ``(1 - 0.999) * d``
is below half an ulp of ``avg`` and is lost. For the in-optimizer version see
:func:`jaxeff.optim.param_ema` (``optax.ema`` averages *updates*, not params).

**LAE** ("A Unified Continual Learning Framework with General Parameter-Efficient Tuning", Gao
et al., ICCV 2023; reference gqk/LAE): an *online* module learns the new task; after each step an
*offline* module accumulates it by EMA (reference: decay 0.9999, timm ``ModelEmaV2``), starting
from the online weights when the second task begins; at inference the two experts are ensembled
by the elementwise max of their softmax outputs. :func:`lae_ensemble` returns the log of that
max renormalised over the classes: the same argmax as the reference, and a proper distribution
(the renormalisation is ours, so that it can also be scored as an LM loss).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff._checks import check_decay  # noqa: F401  (re-exported: jaxeff.params.check_decay)

from jaxeff.select import path_str

__all__ = ["uniform_soup", "greedy_soup", "GreedySoup", "ema_update", "lae_accumulate",
           "lae_ensemble", "check_decay"]


# ----------------------------------------------------------------------------- validation
def _checkpoints(checkpoints, argname: str = "checkpoints") -> list:
    if isinstance(checkpoints, (str, bytes)) or not isinstance(checkpoints, Sequence):
        raise TypeError(f"{argname} must be a list of params pytrees; got "
                        f"{type(checkpoints).__name__}")
    cks = list(checkpoints)
    if not cks:
        raise ValueError(f"{argname} is empty; give at least one params pytree")
    ref_def = jax.tree.structure(cks[0])
    ref = jax.tree_util.tree_flatten_with_path(cks[0])[0]
    for i, c in enumerate(cks[1:], start=1):
        if jax.tree.structure(c) != ref_def:
            raise ValueError(f"{argname}[{i}] has a different tree structure than {argname}[0]: "
                             f"{jax.tree.structure(c)} vs {ref_def}")
        for (p, a), b in zip(ref, jax.tree.leaves(c)):
            if np.shape(a) != np.shape(b):
                raise ValueError(f"{argname}[{i}] leaf {path_str(p)} has shape {np.shape(b)} but "
                                 f"{argname}[0] has {np.shape(a)}")
    return cks


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)


def _check_non_float_equal(argname, trees, names=None) -> None:
    """Raise ``TypeError`` for a non-float leaf that is not identical in all ``trees``."""
    ref = jax.tree_util.tree_flatten_with_path(trees[0])[0]
    others = [jax.tree.leaves(t) for t in trees[1:]]
    for k, (p, a) in enumerate(ref):
        if _is_float(a):
            continue
        for i, leaves in enumerate(others, start=1):
            b = leaves[k]
            if _is_float(b) or not np.array_equal(np.asarray(a), np.asarray(b)):
                who = names[i] if names else f"{argname}[{i}]"
                first = names[0] if names else f"{argname}[0]"
                raise TypeError(
                    f"leaf {path_str(p)} has non-float dtype {jnp.asarray(a).dtype} and differs "
                    f"between {first} and {who} ({jnp.asarray(b).dtype}): only floating-point "
                    f"leaves can be averaged (an integer mean would be truncated); cast it to "
                    f"float first or make it equal in all inputs")


def _same_trees(a_name, a, b_name, b):
    if jax.tree.structure(a) != jax.tree.structure(b):
        raise ValueError(f"{a_name} and {b_name} have different tree structures: "
                         f"{jax.tree.structure(a)} vs {jax.tree.structure(b)}")
    for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        if np.shape(x) != np.shape(y):
            raise ValueError(f"leaf {path_str(p)}: {a_name} has shape {np.shape(x)} but "
                             f"{b_name} has {np.shape(y)}")


# ----------------------------------------------------------------------------- soups
def uniform_soup(checkpoints: Sequence[Any], weights: Optional[Sequence[float]] = None):
    """Uniform (or weighted) model soup: ``sum_i w_i theta_i / sum_i w_i`` leaf by leaf.

    Computed as a float32 running mean and cast back to the first checkpoint's leaf dtypes, so
    identical checkpoints give exactly that checkpoint.

    Paper: "Model soups" (Wortsman et al., 2022); "POINTS" (Liu et al., 2024).

    Args:
      checkpoints: non-empty list of params pytrees with the same structure and shapes.
      weights: optional non-negative weights, one per checkpoint, with a positive sum
        (default: all 1).

    Raises:
      ValueError / TypeError: empty list, mismatched structures or shapes (naming the index and
      leaf), weights of the wrong length, negative, non-finite or summing to 0; ``TypeError``
      for a non-float leaf that differs between checkpoints (equal ones pass through).
    """
    cks = _checkpoints(checkpoints)
    _check_non_float_equal("checkpoints", cks)
    if weights is None:
        w = [1.0] * len(cks)
    else:
        w = [float(x) for x in weights]
        if len(w) != len(cks):
            raise ValueError(f"weights has {len(w)} entries for {len(cks)} checkpoints")
        if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
            raise ValueError(f"weights must be finite, >= 0 and sum to > 0; got {w}")
    return _soup(cks, tuple(w))


def _soup(cks, w):
    def f32(x):
        return jnp.asarray(x, jnp.float32) if _is_float(x) else x

    def step(frac):
        return lambda a, x: a + frac * (jnp.asarray(x, jnp.float32) - a) if _is_float(x) else a

    kept = [(c, wi) for c, wi in zip(cks, w) if wi > 0]
    acc, total = jax.tree.map(f32, kept[0][0]), kept[0][1]
    for c, wi in kept[1:]:
        total += wi
        acc = jax.tree.map(step(wi / total), acc, c)
    return jax.tree.map(lambda a, ref: jnp.asarray(a).astype(jnp.asarray(ref).dtype), acc,
                        cks[0])


def _score(value, what: str) -> float:
    """A metric value as a finite Python float, or a clear error naming ``what``."""
    if isinstance(value, (bool, np.bool_)) or not (
            isinstance(value, numbers.Real) or (hasattr(value, "shape") and
                                                hasattr(value, "dtype"))):
        raise TypeError(f"metric_fn must return a real scalar; got {type(value).__name__} "
                        f"for {what}")
    if np.ndim(value) != 0:
        raise TypeError(f"metric_fn must return a scalar (e.g. the mean over the held-out set); "
                        f"got an array of shape {np.shape(value)} for {what}")
    if not np.issubdtype(np.asarray(value).dtype, np.number) or \
            np.issubdtype(np.asarray(value).dtype, np.complexfloating):
        raise TypeError(f"metric_fn must return a real scalar; got dtype "
                        f"{np.asarray(value).dtype} for {what}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"metric_fn returned {v} for {what}: a non-finite held-out score "
                         f"cannot be ranked (check that checkpoint or the metric)")
    return v


class GreedySoup(NamedTuple):
    """Result of :func:`greedy_soup`: the souped params, the chosen checkpoint indices (in the
    order added), every ingredient's own score, and the soup's final score."""

    params: Any
    indices: list
    scores: list
    score: float


def greedy_soup(checkpoints: Sequence[Any], metric_fn: Callable[[Any], float], *,
                higher_is_better: bool = True, sort: bool = True) -> GreedySoup:
    """Greedy model soup: add a checkpoint only if the held-out metric of the soup does not drop.

    1. ``s_i = metric_fn(theta_i)`` for every checkpoint; order them best first (``sort``).
    2. ``soup = [best]``; for each next ``i``: keep it if
       ``metric_fn(uniform_soup(soup + [i]))`` is at least as good as the current soup's score.

    ``metric_fn`` must be computed on held-out data (the paper's validation split), never on the
    test set, and return a finite real scalar.

    Paper: "Model soups" (Wortsman et al., 2022), Recipe 1; "POINTS" (Liu et al., 2024).

    Args:
      checkpoints: non-empty list of params pytrees (same structure and shapes).
      metric_fn: ``params -> float`` on held-out data (accuracy, or a loss with
        ``higher_is_better=False``).
      higher_is_better: True (default) for accuracies, False for losses.
      sort: order candidates by their own score first (default True, the paper); False keeps
        the given order (the first checkpoint starts the soup).

    Raises:
      ValueError / TypeError: as :func:`uniform_soup`; TypeError for a non-callable metric_fn
      or one returning a non-scalar (an array of per-example scores) or a non-number;
      ValueError when it returns NaN/inf for an ingredient or a candidate soup (naming which).
    """
    cks = _checkpoints(checkpoints)
    if not callable(metric_fn):
        raise TypeError(f"metric_fn must be a callable params -> float; got "
                        f"{type(metric_fn).__name__}")
    sign = 1.0 if higher_is_better else -1.0

    def key(score):  # larger is better
        return sign * score

    _check_non_float_equal("checkpoints", cks)
    scores = [_score(metric_fn(c), f"checkpoints[{i}]") for i, c in enumerate(cks)]
    order = sorted(range(len(cks)), key=lambda i: -key(scores[i])) if sort else list(
        range(len(cks)))
    chosen = [order[0]]
    best = scores[order[0]]
    soup = cks[order[0]]
    for i in order[1:]:
        cand = uniform_soup([cks[j] for j in chosen + [i]])
        s = _score(metric_fn(cand), f"the soup of checkpoints {chosen + [i]}")
        if key(s) >= key(best):
            chosen.append(i)
            best, soup = s, cand
    return GreedySoup(params=soup, indices=chosen, scores=scores, score=best)


# ----------------------------------------------------------------------------- EMA / LAE
def ema_update(avg, params, decay):
    """One parameter-EMA step: ``avg' = params + decay * (avg - params)``.

    Equal to ``decay * avg + (1 - decay) * params``; exact for ``decay = 0`` (copy) and for
    ``avg == params`` (fixed point). Computed in float32, returned in ``avg``'s dtypes (keep
    ``avg`` in float32).

    Args:
      avg: the running average (a params-shaped pytree).
      params: the current params (same structure and shapes).
      decay: in [0, 1) (a float, or a traced scalar, unchecked).

    Raises:
      ValueError / TypeError: decay outside [0, 1), mismatched trees; ``TypeError`` for a
      non-float leaf that differs between ``avg`` and ``params`` (equal ones pass through).
    """
    check_decay(decay)
    _same_trees("avg", avg, "params", params)
    _check_non_float_equal("avg", [avg, params], names=["avg", "params"])
    d = jnp.asarray(decay, jnp.float32)

    def one(a, p):
        if not _is_float(a):
            return a
        p32 = jnp.asarray(p, jnp.float32)
        return (p32 + d * (jnp.asarray(a, jnp.float32) - p32)).astype(jnp.asarray(a).dtype)

    return jax.tree.map(one, avg, params)


def lae_accumulate(offline, online, decay=0.9999):
    """LAE accumulation: the offline module is an EMA of the online one,
    ``offline' = online + decay * (offline - online)`` (see :func:`ema_update`).

    Paper: "A Unified Continual Learning Framework with General Parameter-Efficient Tuning"
    (Gao et al., 2023); reference decay 0.9999 per step. Start ``offline`` as a copy of
    ``online`` when the second task begins.

    Raises what :func:`ema_update` raises.
    """
    return ema_update(offline, online, decay)


def lae_ensemble(online_logits, offline_logits):
    """LAE ensemble of the online and offline experts as log-probabilities ``[..., C]``.

    ``q = max(softmax(z_on), softmax(z_off))`` elementwise (the reference); returns
    ``log(q / sum(q))``, float32 (same argmax as the reference's ``q``).

    Paper: "A Unified Continual Learning Framework with General Parameter-Efficient Tuning"
    (Gao et al., 2023).

    Raises ValueError for logits of different shapes.
    """
    if tuple(online_logits.shape) != tuple(offline_logits.shape):
        raise ValueError(f"online_logits shape {tuple(online_logits.shape)} != offline_logits "
                         f"shape {tuple(offline_logits.shape)}")
    lp_on = jax.nn.log_softmax(jnp.asarray(online_logits, jnp.float32), axis=-1)
    lp_off = jax.nn.log_softmax(jnp.asarray(offline_logits, jnp.float32), axis=-1)
    m = jnp.maximum(lp_on, lp_off)
    return m - jax.scipy.special.logsumexp(m, axis=-1, keepdims=True)
