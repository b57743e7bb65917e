"""SLCA classifier alignment: class-wise Gaussian feature statistics and post-hoc head alignment.

Paper: "SLCA: Slow Learner with Classifier Alignment for Continual Learning on a Pre-trained
Model" (Zhang, Wang, Kang, Chen, Wei, 2023); reference GengDavid/SLCA (``models/slca.py``,
``models/base.py``). The slow-learner half (backbone lr x0.01) is
:func:`jaxeff.optim.slow_learner`; this module is the classifier-alignment half.

After training on task ``t`` (exemplar-free, class-incremental):

1. **Statistics.** For each new class ``c``, the mean ``mu_c`` and covariance ``Sigma_c`` of its
   training features under the current backbone (old classes keep their stored statistics).
   Accumulated online over batches with the parallel merge of Chan, Golub & LeVeque (1979)::

       n = n_a + n_b,   d = m_b - m_a,   m = m_a + d n_b / n,
       M2 = M2_a + M2_b + d d^T n_a n_b / n          (M2 = sum of outer products of deviations)

   where the batch's own ``m_b``, ``M2_b`` are computed two-pass (centered on the batch mean);
   ``Sigma = M2 / (n - ddof)`` with ``ddof = 1`` (``torch.cov``, as the reference). Optional,
   not in the paper: shrinkage ``(1 - a) Sigma + a tr(Sigma)/D I``; ridge ``+ r I`` (the
   reference adds ``1e-4 I``).
2. **Alignment.** For ``E`` epochs (reference 5): draw ``k`` (reference 256) pseudo-features per
   seen class, ``x = s_c mu_c + S_c z``, ``z ~ N(0, I)``, ``S_c S_c^T = Sigma_c + r I``; shuffle;
   train the whole linear head for one pass in batches of ``k`` with cross-entropy over all seen
   classes. Reference optimizer: SGD, momentum 0.9, weight decay 5e-4, lr 0.01 cosine-annealed
   per epoch (:func:`alignment_optimizer`).
3. **Logit normalization** (reference ``ca_with_logit_norm = 0.1``): with ``z_t`` the logits of
   the classes of task ``t``::

       z' = z / (mean_t (|z_t|_2 + 1e-7)) / tau                      (tau = 0.1)

   (:func:`logit_norm`; ``tau=None`` turns it off).

Deviations from the reference, all optional or distribution-preserving: ``S_c`` comes from an
eigendecomposition (negative eigenvalues clipped to 0) instead of a Cholesky factor: the same
Gaussian, and it also works for a singular covariance with ``ridge = 0``. The reference also
shrinks stored means of older tasks, ``s_c = 0.9 + 0.1 (t_c + 1) / (T + 1)`` (not in the paper;
pass it as ``mean_scale``), and restores the pre-alignment head before training the next task
(the aligned head is used for evaluation only): that protocol is the caller's choice.

Pitfall (observed): logit normalization assumes a *trained* head. Its gradient scales like
``1 / (tau |z|)``, so from a (near-)zero head (``|z|`` ~ 0) the alignment diverges (loss rises
above ``log C``); align a trained head as SLCA does, or use ``tau=None`` / a larger ``tau``.

States are NamedTuples of arrays with a fixed class capacity (``count = 0`` for classes not seen
yet); unseen classes are never sampled (weight 0) and are masked out of the alignment softmax.
Concrete labels outside ``[0, C)`` raise; under ``jit`` they are ignored (zero one-hot row).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxeff.params._nearest_mean import _check_positive_int, batch_onehot, linear_logits

__all__ = ["ClassStats", "init_class_stats", "batch_class_stats", "merge_class_stats",
           "update_class_stats", "class_covariance", "sample_pseudo_features", "logit_norm",
           "alignment_optimizer", "align_classifier"]

_HI = jax.lax.Precision.HIGHEST


class ClassStats(NamedTuple):
    """Streaming per-class Gaussian statistics: ``count`` int32 ``[C]``, ``mean`` ``[C, D]``,
    ``m2`` ``[C, D, D]`` (sum of outer products of deviations from the class mean)."""

    count: jax.Array
    mean: jax.Array
    m2: jax.Array


# ----------------------------------------------------------------------------- validation
def _check_real(name, value, lo, hi=None, lo_open=False):
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
          and math.isfinite(value) and (value > lo if lo_open else value >= lo)
          and (hi is None or value <= hi))
    if not ok:
        rng = ("(" if lo_open else "[") + f"{lo}, " + (f"{hi}]" if hi is not None else "inf)")
        raise ValueError(f"{name} must be a finite number in {rng}; got {value!r}")
    return float(value)


def _check_stats(stats, name="stats"):
    if not isinstance(stats, ClassStats):
        raise TypeError(f"{name} must be a ClassStats (init_class_stats); got "
                        f"{type(stats).__name__}")
    C, D = stats.mean.shape
    if stats.count.shape != (C,) or stats.m2.shape != (C, D, D):
        raise ValueError(f"{name} has inconsistent shapes: count {stats.count.shape}, mean "
                         f"{stats.mean.shape}, m2 {stats.m2.shape}")
    return C, D


def _check_ddof(ddof):
    if ddof not in (0, 1) or isinstance(ddof, bool):
        raise ValueError(f"ddof must be 0 or 1; got {ddof!r}")
    return int(ddof)


# ----------------------------------------------------------------------------- statistics
def init_class_stats(num_classes: int, dim: int, dtype=jnp.float32) -> ClassStats:
    """Empty :class:`ClassStats` for ``num_classes`` classes of ``dim`` features.

    Args: num_classes (capacity C), dim (D), dtype (float, default float32).
    Raises: ValueError for non-positive sizes; TypeError for a non-float dtype.
    """
    c, d = _check_positive_int("num_classes", num_classes), _check_positive_int("dim", dim)
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise TypeError(f"dtype must be a floating dtype; got {dtype!r}")
    return ClassStats(jnp.zeros((c,), jnp.int32), jnp.zeros((c, d), dtype),
                      jnp.zeros((c, d, d), dtype))


def batch_class_stats(features, labels, num_classes: int, mask=None,
                      dtype=jnp.float32) -> ClassStats:
    """The statistics of one labelled batch (two-pass: centered on each class's batch mean).

    Args: features ``[N, D]``; labels int ``[N]`` in ``[0, num_classes)``; mask optional bool
    ``[N]`` (False = ignore the row); dtype of the result (default float32).
    Raises: what :func:`jaxeff.params.batch_onehot` raises.
    """
    C = _check_positive_int("num_classes", num_classes)
    D = jnp.shape(features)[-1] if jnp.ndim(features) == 2 else -1
    x, oh = batch_onehot(features, labels, C, D, mask, dtype)
    n = jnp.sum(oh, axis=0)                                             # [C]
    mean = jnp.einsum("nc,nd->cd", oh, x, precision=_HI) / jnp.maximum(n, 1.0)[:, None]
    xc = x - jnp.einsum("nc,cd->nd", oh, mean, precision=_HI)          # deviation, own class
    m2 = jnp.einsum("nc,nd,ne->cde", oh, xc, xc, precision=_HI)
    return ClassStats(n.astype(jnp.int32), mean, m2)


def merge_class_stats(a: ClassStats, b: ClassStats) -> ClassStats:
    """Combine the statistics of two disjoint sample sets (Chan et al. parallel merge).

    Raises: TypeError / ValueError for states that are not matching :class:`ClassStats`.
    """
    ca, da = _check_stats(a, "a")
    cb, db = _check_stats(b, "b")
    if (ca, da) != (cb, db):
        raise ValueError(f"a has {ca} classes x {da} dims but b has {cb} x {db}")
    dt = a.mean.dtype
    na, nb = a.count.astype(dt), b.count.astype(dt)
    n = jnp.maximum(na + nb, 1.0)
    d = b.mean.astype(dt) - a.mean
    mean = a.mean + d * (nb / n)[:, None]
    m2 = a.m2 + b.m2.astype(dt) + d[:, :, None] * d[:, None, :] * (na * nb / n)[:, None, None]
    return ClassStats(a.count + b.count, mean, m2)


def update_class_stats(stats: ClassStats, features, labels, mask=None) -> ClassStats:
    """Merge a labelled batch ``features [N, D]``, ``labels [N]`` (optional bool ``mask [N]``)
    into ``stats``: ``merge_class_stats(stats, batch_class_stats(...))``. Jit-compatible.

    Raises: TypeError for a bad state; ValueError for a wrong feature dim, an empty batch,
    labels out of range or of the wrong shape (see :func:`batch_class_stats`).
    """
    C, D = _check_stats(stats)
    if jnp.ndim(features) == 2 and jnp.shape(features)[1] != D:
        raise ValueError(f"features has feature dim {jnp.shape(features)[1]}, but the stats "
                         f"hold dim {D}")
    return merge_class_stats(stats, batch_class_stats(features, labels, C, mask,
                                                      stats.mean.dtype))


def class_covariance(stats: ClassStats, ridge: float = 0.0, shrinkage: float = 0.0,
                     ddof: int = 1):
    """Per-class covariances ``[C, D, D]``: ``(1 - a) S + a tr(S)/D I + r I`` with
    ``S = M2 / max(n - ddof, 1)`` (zero for classes with fewer than ``ddof + 1`` samples).

    Args: ridge r >= 0 (default 0); shrinkage a in [0, 1] (default 0); ddof 0 or 1 (default 1,
    unbiased like ``torch.cov``).
    Raises: ValueError for a negative/non-finite ridge, shrinkage outside [0, 1], bad ddof.
    """
    ridge = _check_real("ridge", ridge, 0.0)
    shrinkage = _check_real("shrinkage", shrinkage, 0.0, 1.0)
    ddof = _check_ddof(ddof)
    C, D = _check_stats(stats)
    dt = stats.mean.dtype
    denom = jnp.maximum(stats.count.astype(dt) - ddof, 1.0)
    cov = stats.m2 / denom[:, None, None]
    eye = jnp.eye(D, dtype=dt)
    if shrinkage:
        tr = jnp.trace(cov, axis1=1, axis2=2) / D
        cov = (1.0 - shrinkage) * cov + shrinkage * tr[:, None, None] * eye
    return cov + ridge * eye if ridge else cov


def _sqrt_factor(cov):
    """``S`` with ``S S^T = cov`` (symmetric PSD, eigenvalues clipped at 0), batched."""
    cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
    lam, vec = jnp.linalg.eigh(cov)
    return vec * jnp.sqrt(jnp.maximum(lam, 0.0))[..., None, :]


def _mean_scale(mean_scale, C, dt):
    if mean_scale is None:
        return jnp.ones((C,), dt)
    s = jnp.asarray(mean_scale, dt)
    if s.ndim == 0:
        return jnp.full((C,), s, dt)
    if s.shape != (C,):
        raise ValueError(f"mean_scale must be a scalar or shape ({C},); got {tuple(s.shape)}")
    return s


def _draw(key, mean, factor, k):
    C, D = mean.shape
    z = jax.random.normal(key, (C, k, D), mean.dtype)
    x = mean[:, None, :] + jnp.einsum("ckd,ced->cke", z, factor, precision=_HI)
    return x.reshape(C * k, D)


def sample_pseudo_features(key, stats: ClassStats, num_per_class: int = 256, *,
                           ridge: float = 1e-4, shrinkage: float = 0.0, mean_scale=None,
                           ddof: int = 1):
    """Draw ``num_per_class`` pseudo-features from every class Gaussian
    ``N(s_c mu_c, class_covariance(stats, ridge, shrinkage, ddof)_c)``.

    Args:
      key: a ``jax.random`` key.
      stats: :class:`ClassStats`.
      num_per_class: k (default 256, the reference).
      ridge: added to the covariance diagonal (default 1e-4, the reference).
      shrinkage: covariance shrinkage toward ``tr/D I`` in [0, 1] (default 0).
      mean_scale: scalar or ``[C]`` multiplier ``s_c`` of the means (default 1).
      ddof: 1 (default, unbiased) or 0.

    Returns:
      ``(x [C*k, D], labels int32 [C*k], valid bool [C*k])`` in class-major order; ``valid``
      is False for the samples of unseen classes (count 0), which are meaningless.

    Raises: ValueError for bad ridge/shrinkage/ddof/num_per_class/mean_scale shape.
    """
    k = _check_positive_int("num_per_class", num_per_class)
    cov = class_covariance(stats, ridge, shrinkage, ddof)
    C, _ = stats.mean.shape
    mean = stats.mean * _mean_scale(mean_scale, C, stats.mean.dtype)[:, None]
    x = _draw(key, mean, _sqrt_factor(cov), k)
    labels = jnp.repeat(jnp.arange(C, dtype=jnp.int32), k)
    return x, labels, jnp.repeat(stats.count > 0, k)


# ----------------------------------------------------------------------------- alignment
def _task_onehot(task_ids, C):
    if task_ids is None:
        return np.ones((C, 1), np.float32)
    t = np.asarray(task_ids)
    if t.shape != (C,) or not np.issubdtype(t.dtype, np.integer) or (t.size and t.min() < 0):
        raise ValueError(f"task_ids must be non-negative ints of shape ({C},) (the task of each "
                         f"class); got {t.dtype} array of shape {t.shape}")
    return np.eye(int(t.max()) + 1, dtype=np.float32)[t]


def logit_norm(logits, tau: Optional[float] = 0.1, task_ids=None, valid=None,
               eps: float = 1e-7):
    """SLCA logit normalization: ``z / (mean_t (|z_t|_2 + eps)) / tau`` over the tasks ``t``
    that hold at least one valid class (``z_t`` = the logits of task ``t``'s valid classes).

    Args:
      logits: ``[N, C]``.
      tau: temperature > 0 (default 0.1, the reference); ``None`` returns ``logits``.
      task_ids: concrete int ``[C]``, the task of each class (default: one task).
      valid: optional bool ``[C]``: classes taking part (default all).
      eps: added to each task norm (default 1e-7, the reference).

    Raises: ValueError for tau <= 0, bad task_ids, logits not ``[N, C]``.
    """
    if tau is None:
        return logits
    tau = _check_real("tau", tau, 0.0, lo_open=True)
    if jnp.ndim(logits) != 2:
        raise ValueError(f"logits must be [N, C]; got shape {jnp.shape(logits)}")
    C = logits.shape[1]
    toh = jnp.asarray(_task_onehot(task_ids, C), logits.dtype)          # [C, T]
    if valid is not None:
        toh = toh * jnp.asarray(valid, logits.dtype)[:, None]
    sq = jnp.einsum("nc,ct->nt", logits * logits, toh, precision=_HI)
    # sqrt with a zero (sub)gradient at 0, like torch.norm: all-zero logits (a zero-initialised
    # head) must not give an infinite gradient
    pos = sq > 0
    norms = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0) + eps
    present = (jnp.sum(toh, axis=0) > 0).astype(logits.dtype)            # [T]
    mean_norm = jnp.sum(norms * present, -1, keepdims=True) / jnp.maximum(jnp.sum(present), 1)
    return logits / mean_norm / tau


def alignment_optimizer(steps_per_epoch: int, num_epochs: int = 5, lr: float = 0.01,
                        momentum: float = 0.9, weight_decay: float = 5e-4
                        ) -> optax.GradientTransformation:
    """The reference alignment optimizer: torch-style SGD (weight decay added to the gradient,
    then heavy-ball momentum) with ``lr_e = lr (1 + cos(pi e / E)) / 2`` for epoch ``e``
    (``torch.optim.lr_scheduler.CosineAnnealingLR`` stepped per epoch).

    Raises: ValueError for non-positive sizes or lr, momentum outside [0, 1), negative decay.
    """
    spe = _check_positive_int("steps_per_epoch", steps_per_epoch)
    E = _check_positive_int("num_epochs", num_epochs)
    lr = _check_real("lr", lr, 0.0, lo_open=True)
    momentum = _check_real("momentum", momentum, 0.0, 1.0)
    if momentum == 1.0:
        raise ValueError(f"momentum must be in [0, 1); got {momentum!r}")
    weight_decay = _check_real("weight_decay", weight_decay, 0.0)

    def schedule(step):
        e = (step // spe).astype(jnp.float32)
        return 0.5 * lr * (1.0 + jnp.cos(jnp.pi * e / E))

    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(schedule, momentum=momentum or None))


def align_classifier(key, head, stats: ClassStats, *,
                     tx: Optional[optax.GradientTransformation] = None, num_epochs: int = 5,
                     num_per_class: int = 256, batch_size: Optional[int] = None,
                     tau: Optional[float] = 0.1, task_ids=None, ridge: float = 1e-4,
                     shrinkage: float = 0.0, mean_scale=None, ddof: int = 1,
                     apply_fn: Optional[Callable] = None):
    """SLCA classifier alignment: re-train ``head`` on pseudo-features of every seen class.

    Per epoch: draw ``num_per_class`` samples per class (:func:`sample_pseudo_features`),
    shuffle, one pass in batches of ``batch_size``; loss = mean cross-entropy of the
    (logit-normalized, :func:`logit_norm`) logits over the seen classes (count > 0; unseen
    classes are masked out and their samples carry weight 0, so their head parameters get a zero
    gradient and only ``tx``'s weight decay touches them). Evaluate the aligned head over the
    seen classes only. Traceable (wrap in ``jax.jit`` with the keyword arguments closed over).

    Args:
      key: ``jax.random`` key.
      head: pytree of the head params; default form ``{'w': [D, C], 'b': [C] (optional)}``.
      stats: :class:`ClassStats` with C classes of D features.
      tx: optax transform (default :func:`alignment_optimizer` with the reference settings).
      num_epochs: E (default 5). num_per_class: k (default 256).
      batch_size: default k (the reference); ``C * k // batch_size`` steps per epoch.
      tau: logit-normalization temperature (default 0.1; ``None`` = plain logits).
      task_ids: concrete int ``[C]`` task of each class for the per-task norms (default one).
      ridge, shrinkage, mean_scale, ddof: as in :func:`sample_pseudo_features`.
      apply_fn: ``(head, x [N, D]) -> logits [N, C]`` (default ``x @ w + b``).

    Returns:
      ``(aligned head, losses [E * steps_per_epoch])``.

    Raises:
      ValueError / TypeError naming the argument: bad sizes, batch larger than ``C * k``, tau,
      ridge, shrinkage, task_ids, a head whose logits are not ``[N, C]``.
    """
    C, D = _check_stats(stats)
    E = _check_positive_int("num_epochs", num_epochs)
    k = _check_positive_int("num_per_class", num_per_class)
    bs = k if batch_size is None else _check_positive_int("batch_size", batch_size)
    if bs > C * k:
        raise ValueError(f"batch_size={bs} exceeds the {C * k} samples drawn per epoch "
                         f"(num_classes {C} x num_per_class {k})")
    spe = C * k // bs
    if tau is not None:
        _check_real("tau", tau, 0.0, lo_open=True)
    _task_onehot(task_ids, C)                                            # validate now
    apply_fn = apply_fn or linear_logits
    out = jax.eval_shape(apply_fn, head, jax.ShapeDtypeStruct((bs, D), stats.mean.dtype))
    if getattr(out, "shape", None) != (bs, C):
        raise ValueError(f"head/apply_fn must map [N, {D}] features to [N, {C}] logits; got "
                         f"{getattr(out, 'shape', out)}")
    if tx is None:
        tx = alignment_optimizer(spe, E)
    elif not isinstance(tx, optax.GradientTransformation):
        raise TypeError(f"tx must be an optax.GradientTransformation; got {type(tx).__name__}")

    cov = class_covariance(stats, ridge, shrinkage, ddof)
    factor = _sqrt_factor(cov)                                           # once per call
    mean = stats.mean * _mean_scale(mean_scale, C, stats.mean.dtype)[:, None]
    seen = stats.count > 0
    labels_all = jnp.repeat(jnp.arange(C, dtype=jnp.int32), k)
    w_all = jnp.repeat(seen, k).astype(stats.mean.dtype)

    def loss_fn(h, x, y, w):
        z = apply_fn(h, x).astype(jnp.float32)
        z = logit_norm(z, tau, task_ids, seen)
        z = jnp.where(seen[None, :], z, -1e9)
        ce = optax.softmax_cross_entropy_with_integer_labels(z, y)
        return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1.0)

    def step(carry, batch):
        h, opt = carry
        loss, g = jax.value_and_grad(loss_fn)(h, *batch)
        upd, opt = tx.update(g, opt, h)
        return (optax.apply_updates(h, upd), opt), loss

    def epoch(carry, key_e):
        k_draw, k_perm = jax.random.split(key_e)
        x = _draw(k_draw, mean, factor, k)
        perm = jax.random.permutation(k_perm, C * k)[: spe * bs]
        batches = (x[perm].reshape(spe, bs, D), labels_all[perm].reshape(spe, bs),
                   w_all[perm].reshape(spe, bs))
        return jax.lax.scan(step, carry, batches)

    (head, _), losses = jax.lax.scan(epoch, (head, tx.init(head)), jax.random.split(key, E))
    return head, losses.reshape(-1)
