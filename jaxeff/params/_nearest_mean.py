"""Nearest-class-mean (NMC) classifier on frozen features, with streaming class means.

Paper: "A Simple Baseline that Questions the Use of Pretrained-Models in Continual Learning"
(Janson, Zhang, Aljundi, Elhoseiny, 2023): extract features with the *frozen* pre-trained model,
keep one mean per class over the training features seen so far, and predict the class whose
mean is nearest (cosine distance by default, as in the paper). The classifier is single-headed,
exemplar-free and task-free: new classes (and new data of old classes) only update the means.

Streaming means (one pass, any batch order; exact up to rounding) keep ``count`` and ``mean``
per class and merge a batch with ``n_b`` samples and batch mean ``m_b`` of class ``c`` as::

    n' = n + n_b,        mean' = mean + (n_b / n') (m_b - mean)

(the delta form of Chan, Golub & LeVeque, 1979: no running sums that grow with the stream).

Prediction, for a feature ``x`` and the classes seen so far (``count > 0``)::

    cosine:     score_c = <x / |x|, mu_c / |mu_c|>           (default)
    euclidean:  score_c = -|x - mu_c|^2

and ``argmax_c score_c``. The same rule as a linear head ``logits = x @ w + b`` (so it plugs into
any model that ends in a linear layer) is, per seen class ``c``::

    cosine:     w_c = mu_c / |mu_c|,  b_c = 0            (logits = |x| * score: same argmax)
    euclidean:  w_c = 2 mu_c,         b_c = -|mu_c|^2    (logits = score + |x|^2: same argmax)

Unseen classes get ``w_c = 0`` and ``b_c`` = a very negative finite number (never predicted).

Capacity: states have a fixed number of classes (static shapes under ``jit``); classes arriving
later simply have ``count = 0`` until their data is seen; :func:`add_classes` grows the capacity.

Labels outside ``[0, num_classes)`` raise ``ValueError`` when the labels are concrete; under
``jit`` they cannot be checked and contribute nothing (``jax.nn.one_hot`` gives a zero row).
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ClassMeans", "init_class_means", "update_class_means", "add_classes",
           "nmc_scores", "nmc_predict", "nmc_head", "linear_logits", "batch_onehot", "METRICS"]

METRICS = ("cosine", "euclidean")
_HI = jax.lax.Precision.HIGHEST   # statistics must not run in bf16 on TPU/GPU default precision


class ClassMeans(NamedTuple):
    """Streaming per-class feature means: ``count`` int32 ``[C]``, ``mean`` float ``[C, D]``
    (zero for unseen classes)."""

    count: jax.Array
    mean: jax.Array


# ----------------------------------------------------------------------------- validation
def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return int(value)


def _check_metric(metric):
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}; got {metric!r}")


def _check_state(state, name="state"):
    count, mean = getattr(state, "count", None), getattr(state, "mean", None)
    if count is None or mean is None or np.ndim(mean) != 2 or np.shape(count) != np.shape(mean)[:1]:
        raise TypeError(f"{name} must have count [C] and mean [C, D] arrays (a ClassMeans or "
                        f"ClassStats); got {type(state).__name__}")
    return np.shape(mean)


def _check_features(features, dim, name="features"):
    x = jnp.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"{name} must be [num_samples, dim]; got shape {tuple(x.shape)}")
    if x.shape[1] != dim:
        raise ValueError(f"{name} has feature dim {x.shape[1]}, but the state holds dim {dim}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x


def batch_onehot(features, labels, num_classes: int, dim: int, mask=None, dtype=jnp.float32):
    """Validate a labelled batch and return ``(x [N, D] in dtype, onehot [N, C] in dtype)``.

    ``onehot[n, c] = mask[n] * [labels[n] == c]`` (``mask`` default all ones). Shared by
    :func:`update_class_means` and :mod:`jaxeff.params.classifier_alignment`.

    Raises:
      ValueError: features not ``[N, dim]``, an empty batch (N = 0), labels not ``[N]``,
        concrete labels outside ``[0, num_classes)``, mask not ``[N]``.
      TypeError: non-integer labels.
    """
    x = _check_features(features, dim)
    n = x.shape[0]
    if n == 0:
        raise ValueError("features is an empty batch (0 samples); pass at least one sample")
    y = jnp.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match features; got "
                         f"{tuple(y.shape)}")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"labels must be integers (class ids); got dtype {y.dtype}")
    if not isinstance(labels, jax.core.Tracer):
        lo, hi = int(jnp.min(y)), int(jnp.max(y))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must be in [0, {num_classes}) (num_classes={num_classes});"
                             f" got values in [{lo}, {hi}]")
    oh = jax.nn.one_hot(y, num_classes, dtype=dtype)
    if mask is not None:
        m = jnp.asarray(mask)
        if m.shape != (n,):
            raise ValueError(f"mask must have shape ({n},) to match features; got "
                             f"{tuple(m.shape)}")
        oh = oh * m.astype(bool).astype(dtype)[:, None]
    return x.astype(dtype), oh


# ----------------------------------------------------------------------------- state
def init_class_means(num_classes: int, dim: int, dtype=jnp.float32) -> ClassMeans:
    """Empty state for ``num_classes`` classes of ``dim``-dimensional features.

    Args:
      num_classes: capacity C (classes may arrive later; see :func:`add_classes`).
      dim: feature dimension D.
      dtype: float dtype of the means (default float32; keep float32 or wider).

    Raises:
      ValueError: non-positive ``num_classes`` / ``dim``; TypeError: a non-float ``dtype``.
    """
    c, d = _check_positive_int("num_classes", num_classes), _check_positive_int("dim", dim)
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise TypeError(f"dtype must be a floating dtype; got {dtype!r}")
    return ClassMeans(count=jnp.zeros((c,), jnp.int32), mean=jnp.zeros((c, d), dtype))


def update_class_means(state: ClassMeans, features, labels, mask=None) -> ClassMeans:
    """Merge a labelled batch into the running class means.

    ``n' = n + n_b``, ``mean' = mean + (n_b / n') (m_b - mean)`` per class (module docstring).
    Jit-compatible; the result does not depend on how the stream is split into batches (up to
    float rounding).

    Args:
      state: a :class:`ClassMeans`.
      features: ``[N, D]`` features (cast to the state's dtype).
      labels: int ``[N]`` class ids in ``[0, C)``.
      mask: optional ``[N]`` bool (nonzero = keep); ``False`` rows are ignored (padding).

    Raises: what :func:`batch_onehot` raises (bad shapes, empty batch, labels out of range).
    """
    C, D = _check_state(state)
    x, oh = batch_onehot(features, labels, C, D, mask, state.mean.dtype)
    n_b = jnp.sum(oh, axis=0)                                          # [C]
    s_b = jnp.einsum("nc,nd->cd", oh, x, precision=_HI)                # [C, D]
    n_new = state.count.astype(oh.dtype) + n_b
    delta = s_b - n_b[:, None] * state.mean                            # n_b (m_b - mean)
    mean = state.mean + delta / jnp.maximum(n_new, 1.0)[:, None]
    return ClassMeans(count=state.count + n_b.astype(jnp.int32), mean=mean)


def add_classes(state, num_new: int):
    """Grow the class capacity by ``num_new`` empty classes (count 0, zero statistics).

    Works on any NamedTuple state whose leaves have the class axis first (:class:`ClassMeans`,
    :class:`jaxeff.params.ClassStats`).

    Raises:
      ValueError: ``num_new`` not a positive int; TypeError: a state without ``count``/``mean``.
    """
    _check_state(state)
    k = _check_positive_int("num_new", num_new)
    return jax.tree.map(lambda a: jnp.concatenate(
        [a, jnp.zeros((k,) + a.shape[1:], a.dtype)], axis=0), state)


# ----------------------------------------------------------------------------- prediction
def _neg(dtype):
    return jnp.asarray(jnp.finfo(dtype).min / 2, dtype)


def _normalize(v, eps):
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), eps)


def nmc_scores(state, features, metric: str = "cosine", eps: float = 1e-12):
    """Per-class scores ``[N, C]`` (higher = nearer); unseen classes (count 0) get ``-inf``.

    ``cosine``: ``<x/|x|, mu_c/|mu_c|>``; ``euclidean``: ``-|x - mu_c|^2`` (norms clamped at
    ``eps``, so a zero vector scores 0 rather than NaN).

    Args:
      state: :class:`ClassMeans` (or any state with ``count``/``mean``, e.g. ``ClassStats``).
      features: ``[N, D]``.
      metric: ``'cosine'`` (default, the paper's) or ``'euclidean'``.
      eps: norm floor (default 1e-12).

    Raises: ValueError for a bad metric, features not ``[N, D]``; TypeError for a bad state.
    """
    _check_metric(metric)
    C, D = _check_state(state)
    mu = state.mean
    x = _check_features(features, D).astype(mu.dtype)
    if metric == "cosine":
        s = jnp.einsum("nd,cd->nc", _normalize(x, eps), _normalize(mu, eps), precision=_HI)
    else:
        s = -(jnp.sum(x * x, -1)[:, None] - 2 * jnp.einsum("nd,cd->nc", x, mu, precision=_HI)
              + jnp.sum(mu * mu, -1)[None, :])
    return jnp.where(state.count[None, :] > 0, s, -jnp.inf)


def nmc_predict(state, features, metric: str = "cosine"):
    """``argmax_c`` of :func:`nmc_scores`: int32 ``[N]`` class ids.

    Raises what :func:`nmc_scores` raises, and ValueError when the state (concrete) has seen no
    class yet."""
    if not isinstance(state.count, jax.core.Tracer) and not bool(jnp.any(state.count > 0)):
        raise ValueError("state has seen no class yet (all counts are 0); update it first")
    return jnp.argmax(nmc_scores(state, features, metric), axis=-1).astype(jnp.int32)


def nmc_head(state, metric: str = "cosine", eps: float = 1e-12) -> dict:
    """The NMC rule as a linear head ``{'w': [D, C], 'b': [C]}`` (``logits = x @ w + b``).

    cosine: ``w_c = mu_c/|mu_c|, b_c = 0`` (logits = ``|x| cos``); euclidean:
    ``w_c = 2 mu_c, b_c = -|mu_c|^2`` (logits = ``-|x - mu_c|^2 + |x|^2``). Both give the
    argmax of :func:`nmc_scores`. Unseen classes: ``w_c = 0``, ``b_c = finfo.min / 2``.

    Raises: ValueError for a bad metric; TypeError for a bad state.
    """
    _check_metric(metric)
    _check_state(state)
    mu, seen = state.mean, state.count > 0
    if metric == "cosine":
        w, b = _normalize(mu, eps), jnp.zeros(mu.shape[:1], mu.dtype)
    else:
        w, b = 2 * mu, -jnp.sum(mu * mu, -1)
    w = jnp.where(seen[:, None], w, 0)
    b = jnp.where(seen, b, _neg(mu.dtype))
    return {"w": w.T, "b": b}


def linear_logits(head, features):
    """``features @ head['w'] + head['b']`` (``'b'`` optional): the head form used by
    :func:`nmc_head` and :func:`jaxeff.params.align_classifier`.

    Raises ValueError when ``head['w']`` is not ``[D, C]`` for ``[N, D]`` features."""
    w = jnp.asarray(head["w"])
    x = jnp.asarray(features)
    if w.ndim != 2 or x.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"head['w'] must be [D, C] for features [N, D]; got w "
                         f"{tuple(w.shape)} and features {tuple(x.shape)}")
    out = jnp.einsum("nd,dc->nc", x.astype(w.dtype), w, precision=_HI)
    b = head.get("b")
    return out if b is None else out + b
