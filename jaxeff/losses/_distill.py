"""Distillation losses: logits with temperature, teacher-only, and hidden-state matching.

Pure functions on arrays, usable inside any loss. Positions are every axis but the last
(``[B, L, V]`` logits, ``[B, L, D]`` hidden states, ``[N, C]`` classifier outputs); an optional
``mask`` over the positions (bool or float weights, e.g. the batch's ``loss_mask``) selects and
weights them. With ``reduction="mean"`` the result is ``sum(l * m) / sum(m)`` (0 when the mask is
empty, never NaN).

Logit distillation ("Distilling the Knowledge in a Neural Network", Hinton et al., 2015), with
``p^T = softmax(z / T)``::

    kd(s, t) = T^2 * KL(p_t^T || p_s^T) = T^2 * sum_v p_t^T[v] (log p_t^T[v] - log p_s^T[v])
    d kd / d s = T * (p_s^T - p_t^T)                     (per position, before the reduction)

The ``T^2`` keeps gradient magnitudes comparable across temperatures. KL rather than the soft
cross-entropy ``-sum p_t log p_s``: the two differ by the teacher entropy (a constant with the same
gradients), and KL is 0 when the student equals the teacher.

Teacher-only distillation ("Beyond Self-Supervision: A Simple Yet Effective Network Distillation
Alternative to Improve Backbones", Cui et al., 2021, SSLD): the student matches the teacher's
predictions with no hard labels, so unlabeled data can be used -- :func:`distillation_loss` with
``labels=None``. With labels it is ``alpha * kd + (1 - alpha) * CE(labels)``.

Hidden-state matching ("Self-Distillation for Further Pre-training of Transformers", Lee et al.,
2022): the further-pre-trained model is the teacher and the initial model, trained again, is
the student, regularised by ``||h_s - h_t||^2``. :func:`hidden_state_loss` gives the mean over
features of the squared error (or ``1 - cos``), after an optional learned projection
``h_s @ W + b`` when the widths differ (:func:`init_projection`).

The teacher gets ``stop_gradient`` by default (``stop_teacher_gradient=False`` for mutual or
online distillation).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxeff._checks import check_float, check_fraction, check_int

__all__ = ["kd_loss", "distillation_loss", "hidden_state_loss", "init_projection", "project",
           "masked_mean", "REDUCTIONS", "HIDDEN_KINDS"]

REDUCTIONS = ("mean", "sum", "none")
HIDDEN_KINDS = ("mse", "cosine")


# ----------------------------------------------------------------------------- validation
def _same_shape(a_name, a, b_name, b):
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{a_name} has shape {tuple(a.shape)} but {b_name} has shape "
                         f"{tuple(b.shape)}; they must match")
    if a.ndim < 1:
        raise ValueError(f"{a_name} must have a last (class/feature) axis; got a scalar")


def _check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")


def masked_mean(values, mask=None, reduction: str = "mean"):
    """Reduce per-position ``values`` with an optional ``mask`` (weights) of the same shape.

    ``mean``: ``sum(v * m) / sum(m)``, exactly 0 when ``sum(m) == 0``; ``sum``: ``sum(v * m)``;
    ``none``: ``v * m``. Without a mask ``m = 1``.

    Raises ValueError for a mask of another shape or an unknown ``reduction``.
    """
    _check_reduction(reduction)
    values = jnp.asarray(values, jnp.float32)
    if mask is None:
        m = jnp.ones_like(values)
    else:
        m = jnp.asarray(mask)
        if tuple(m.shape) != tuple(values.shape):
            raise ValueError(f"mask has shape {tuple(m.shape)} but the positions have shape "
                             f"{tuple(values.shape)} (every axis but the last); they must match")
        m = m.astype(jnp.float32)
    if reduction == "none":
        return values * m
    total = jnp.sum(values * m)
    if reduction == "sum":
        return total
    n = jnp.sum(m)
    return jnp.where(n > 0, total / jnp.where(n > 0, n, 1.0), 0.0)


# ----------------------------------------------------------------------------- logits
def kd_loss(student_logits, teacher_logits, mask=None, *, temperature: float = 1.0,
            reduction: str = "mean", stop_teacher_gradient: bool = True):
    """Temperature-scaled logit distillation ``T^2 * KL(softmax(t/T) || softmax(s/T))``.

    Per position: ``T^2 * sum_v p_t[v] (log p_t[v] - log p_s[v])`` with ``p = softmax(z / T)``
    computed in float32; gradient w.r.t. the student logits ``T (p_s - p_t)``. Zero when
    ``student_logits == teacher_logits``. Terms with ``p_t[v] == 0`` contribute 0.

    Paper: "Distilling the Knowledge in a Neural Network" (Hinton et al., 2015).

    Args:
      student_logits: ``[..., V]``.
      teacher_logits: ``[..., V]``, the same shape.
      mask: optional ``[...]`` weights over positions (e.g. ``batch['loss_mask']``); default all.
      temperature: T > 0; default 1.
      reduction: ``'mean'`` (default, masked mean), ``'sum'`` or ``'none'`` (per position).
      stop_teacher_gradient: no gradient into the teacher (default True).

    Raises:
      ValueError / TypeError naming the argument: shape mismatch, non-positive temperature,
      bad mask shape, unknown reduction.
    """
    T = check_float("temperature", temperature, 0.0, min_open=True)
    student_logits, teacher_logits = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
    _same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    _check_reduction(reduction)
    t = jnp.asarray(teacher_logits, jnp.float32)
    if stop_teacher_gradient:
        t = jax.lax.stop_gradient(t)
    log_pt = jax.nn.log_softmax(t / T, axis=-1)
    log_ps = jax.nn.log_softmax(jnp.asarray(student_logits, jnp.float32) / T, axis=-1)
    pt = jnp.exp(log_pt)
    terms = jnp.where(pt > 0, pt * (log_pt - log_ps), 0.0)
    return masked_mean((T * T) * jnp.sum(terms, axis=-1), mask, reduction)


def _cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, jnp.asarray(labels)[..., None].astype(jnp.int32),
                                axis=-1)[..., 0]


def distillation_loss(student_logits, teacher_logits, labels=None, mask=None, *,
                      temperature: float = 1.0, alpha: float = 0.5, reduction: str = "mean",
                      stop_teacher_gradient: bool = True):
    """Knowledge distillation, teacher-only (no labels) or mixed with hard-label cross-entropy.

    ``labels is None`` (SSLD, teacher-only): ``kd(s, t)``. With labels:
    ``alpha * kd(s, t) + (1 - alpha) * CE(s, labels)`` per position, then the masked reduction.
    ``kd`` is :func:`kd_loss` (``T^2 KL``); the cross-entropy uses temperature 1.

    Papers: "Distilling the Knowledge in a Neural Network" (Hinton et al., 2015); "Beyond
    Self-Supervision: A Simple Yet Effective Network Distillation Alternative to Improve Backbones"
    (Cui et al., 2021) for the label-free setting.

    Args:
      student_logits, teacher_logits: ``[..., V]``, the same shape.
      labels: optional int ``[...]`` targets; ``None`` = teacher-only (default).
      mask: optional ``[...]`` position weights (e.g. ``batch['loss_mask']``).
      temperature: T > 0 (default 1).
      alpha: weight of the distillation term in [0, 1] when labels are given (default 0.5);
        ignored without labels.
      reduction, stop_teacher_gradient: as in :func:`kd_loss`.

    Raises:
      ValueError / TypeError naming the argument (shapes, temperature, alpha, reduction).
    """
    per = kd_loss(student_logits, teacher_logits, None, temperature=temperature,
                  reduction="none", stop_teacher_gradient=stop_teacher_gradient)
    if labels is not None:
        student_logits = jnp.asarray(student_logits)
        alpha = check_fraction("alpha", alpha)
        labels = jnp.asarray(labels)
        if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
            raise ValueError(f"labels has shape {tuple(labels.shape)} but the logits' positions "
                             f"have shape {tuple(student_logits.shape[:-1])}; they must match")
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise TypeError(f"labels must be integer class ids; got dtype {labels.dtype}")
        per = alpha * per + (1.0 - alpha) * _cross_entropy(student_logits, labels)
    return masked_mean(per, mask, reduction)


# ----------------------------------------------------------------------------- hidden states
def init_projection(key: jax.Array, student_dim: int, teacher_dim: int, *,
                    dtype=jnp.float32, identity: bool = True) -> dict:
    """A learnable projection ``{'kernel': [Ds, Dt], 'bias': [Dt]}`` for :func:`project`.

    The kernel starts as the identity when ``Ds == Dt`` and ``identity`` (default), otherwise
    LeCun-normal (``N(0, 1/Ds)``); the bias starts at 0. Add it to the student's params so it is
    trained with them.

    Raises ValueError for non-positive dimensions.
    """
    for name, v in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
        check_int(name, v, 1)
    if identity and student_dim == teacher_dim:
        kernel = jnp.eye(student_dim, dtype=dtype)
    else:
        kernel = (jax.random.normal(key, (student_dim, teacher_dim), jnp.float32)
                  / jnp.sqrt(float(student_dim))).astype(dtype)
    return {"kernel": kernel, "bias": jnp.zeros((teacher_dim,), dtype)}


def project(hidden, projection):
    """Apply a projection to ``hidden [..., Ds]``: ``None`` (identity), an array ``W [Ds, Dt]``
    (``h @ W``), a dict ``{'kernel': W, 'bias': b}`` (``h @ W + b``) or a callable ``h -> h'``.

    Raises TypeError for another kind and ValueError for a kernel whose input size is not Ds.
    """
    if projection is None:
        return hidden
    if callable(projection) and not hasattr(projection, "shape"):
        return projection(hidden)
    if isinstance(projection, dict):
        if "kernel" not in projection:
            raise TypeError(f"projection dict needs a 'kernel' (and optional 'bias'); got keys "
                            f"{sorted(projection)}")
        w, b = projection["kernel"], projection.get("bias")
    elif hasattr(projection, "shape"):
        w, b = projection, None
    else:
        raise TypeError(f"projection must be None, an array [Ds, Dt], a dict with 'kernel' or a "
                        f"callable; got {type(projection).__name__}")
    if w.ndim != 2 or w.shape[0] != hidden.shape[-1]:
        raise ValueError(f"projection kernel has shape {tuple(w.shape)}; it must be "
                         f"[{hidden.shape[-1]}, teacher_dim] for hidden states of width "
                         f"{hidden.shape[-1]}")
    out = jnp.asarray(hidden, jnp.float32) @ jnp.asarray(w, jnp.float32)
    return out if b is None else out + jnp.asarray(b, jnp.float32)


def hidden_state_loss(student_hidden, teacher_hidden, mask=None, *,
                      projection: Any = None, kind: str = "mse", reduction: str = "mean",
                      stop_teacher_gradient: bool = True, eps: float = 1e-8):
    """Match hidden states: ``d(P(h_s), h_t)`` per position, then the masked reduction.

    ``kind='mse'`` (default, Lee et al.): ``mean_d (P(h_s)[d] - h_t[d])^2``;
    ``kind='cosine'``: ``1 - <P(h_s), h_t> / max(|P(h_s)| |h_t|, eps)``. ``P`` is
    :func:`project` of ``projection`` (identity by default). Computed in float32.

    Paper: "Self-Distillation for Further Pre-training of Transformers" (Lee et al., 2022).

    Args:
      student_hidden: ``[..., Ds]``.  teacher_hidden: ``[..., Dt]`` with the same positions.
      mask: optional ``[...]`` position weights.
      projection: see :func:`project`; needed when ``Ds != Dt``.
      kind: ``'mse'`` or ``'cosine'``.
      reduction, stop_teacher_gradient: as in :func:`kd_loss`.
      eps: floor of the norm product for ``'cosine'`` (default 1e-8).

    Raises:
      ValueError / TypeError naming the argument: positions or widths that do not match, unknown
      ``kind``/``reduction``, a bad projection.
    """
    if kind not in HIDDEN_KINDS:
        raise ValueError(f"kind must be one of {HIDDEN_KINDS}; got {kind!r}")
    _check_reduction(reduction)
    student_hidden, teacher_hidden = jnp.asarray(student_hidden), jnp.asarray(teacher_hidden)
    if tuple(student_hidden.shape[:-1]) != tuple(teacher_hidden.shape[:-1]):
        raise ValueError(f"student_hidden positions {tuple(student_hidden.shape[:-1])} and "
                         f"teacher_hidden positions {tuple(teacher_hidden.shape[:-1])} differ")
    h_s = jnp.asarray(project(student_hidden, projection), jnp.float32)
    h_t = jnp.asarray(teacher_hidden, jnp.float32)
    if stop_teacher_gradient:
        h_t = jax.lax.stop_gradient(h_t)
    if h_s.shape[-1] != h_t.shape[-1]:
        raise ValueError(f"student width {h_s.shape[-1]} (after projection) != teacher width "
                         f"{h_t.shape[-1]}; pass projection=init_projection(key, "
                         f"{student_hidden.shape[-1]}, {h_t.shape[-1]})")
    if kind == "mse":
        per = jnp.mean(jnp.square(h_s - h_t), axis=-1)
    else:
        dot = jnp.sum(h_s * h_t, axis=-1)
        norm = jnp.linalg.norm(h_s, axis=-1) * jnp.linalg.norm(h_t, axis=-1)
        per = 1.0 - dot / jnp.maximum(norm, eps)
    return masked_mean(per, mask, reduction)

