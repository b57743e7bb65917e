"""Low-rank factorization of weights: truncated SVD, PELA (rank rule, regularisers), SVFit.

Papers:
* "PELA: Learning Parameter-Efficient Models with Low-Rank Approximation" (Guo, Wang, Kankanhalli,
  CVPR 2024, arXiv 2310.10700); reference guoyang9/PELA ``models/low_rank.py``, ``engine.py``.
* "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values"
  (Sun et al., 2024, arXiv 2409.05926).

Formulas (matrix ``W [in, out] = U diag(S) V^T``, singular values descending):
* truncated SVD at rank r: ``W ~ L @ R``, ``L = U_r sqrt(S_r)``, ``R = sqrt(S_r) V_r^T``
  (PELA's even split, so ``||L||_F = ||R||_F``);
  Eckart-Young: ``||W - L R||_F^2 = sum_{i>r} S_i^2``.
* rank rules: a fixed ``rank``; ``'pela'``: ``r = in*out // (3*(in+out))`` (a third of the
  parameters); ``fraction`` (or a float ``rank``): ``r = max(1, floor(fraction * min(in, out)))``
  (``jaxeff.select.resolve_rank``, the rule of every jaxeff transform); ``energy``: the smallest
  r with ``sum_{i<=r} S_i^2 >= energy * sum_i S_i^2`` (data dependent: computed eagerly on the
  host; a stacked leaf takes the largest rank over its matrices, since factors need one static
  shape).
* PELA loss = task + 0.1 * mean_l MSE(student feature_l, teacher feature_l)
  + w * mean_matrices (max|L R - W_teacher| - 1e-3)^2   (:func:`pela_feature_loss`,
  :func:`pela_weight_perturbation`).
* SVFit: ``W(sigma) = U_r diag(sigma) V_r^T + W_e``, ``W_e = W - U_r diag(S_r) V_r^T``; only
  ``sigma`` trains (``SVFitWeight.trainable_fields``), so ``W(S_r) = W``.

Example::

    import numpy as np, jaxeff
    rng = np.random.default_rng(0)
    params = {"layers": {"w_up": rng.standard_normal((2, 16, 32), np.float32),
                         "w_down": rng.standard_normal((2, 32, 16), np.float32)}}
    factors = jaxeff.params.lowrank("pela", select=r"layers/w_(up|down)").from_dense(None, params)
    quarter = jaxeff.params.lowrank(0.25).from_dense(None, params)  # weight matrices, 1/4 rank
    trainable, frozen = jaxeff.params.partition(factors)    # L, R train (SVFit: sigma only)
    dense = jaxeff.params.materialize(factors)              # plain [2, 16, 32] / [2, 32, 16]

``method='randomized'`` (Halko et al. range finder: only matmuls on the full matrix) avoids the
dense SVD of a sharded matrix; ``'exact'`` (default) uses ``jnp.linalg.svd``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxeff.params._structured import (MatrixLayout, StructuredWeight, check_single_matrix,
                                       is_structured, map_matrices, materialize, normal,
                                       structured_rule)
from jaxeff._checks import check_key
from jaxeff.select import resolve_rank as _fraction_rank
from jaxeff.state_sharding import register_rule

__all__ = ["pela_rank", "resolve_rank", "truncated_svd", "LowRankWeight", "LowRank", "lowrank",
           "SVFitWeight", "SVFit", "svfit", "pela_feature_loss", "pela_weight_perturbation"]


def pela_rank(m: int, n: int, compress_ratio: int = 3) -> int:
    """PELA's rank rule ``r = m*n // (compress_ratio*(m+n))`` (at least 1): 1/ratio of params."""
    return max(1, (m * n) // (compress_ratio * (m + n)))


def _check_rank_args(rank, fraction, energy) -> None:
    given = [a for a, v in (("rank", rank), ("fraction", fraction), ("energy", energy))
             if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of rank, fraction, energy; got {given or 'none'}")
    if rank is not None and rank != "pela":
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank={rank!r}; valid: a positive int, 'pela', or a float fraction "
                             "in (0, 1] (lowrank/svfit take it as fraction=)")
    for name, v in (("fraction", fraction), ("energy", energy)):
        if v is not None and (not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0):
            raise ValueError(f"{name}={v!r}; must be in (0, 1]")


def resolve_rank(m: int, n: int, *, rank=None, fraction=None, energy=None,
                 singular_values=None, name: str = "matrix") -> int:
    """The rank for an ``m x n`` matrix from exactly one rule (see the module docstring).

    ``singular_values`` (array ``[..., k]``, descending) is needed for ``energy``; with a batch,
    the largest rank over the batch is returned. Raises ValueError for conflicting or invalid
    rules and for a rank larger than ``min(m, n)``.
    """
    _check_rank_args(rank, fraction, energy)
    k = min(m, n)
    if rank == "pela":
        r = pela_rank(m, n)
    elif rank is not None:
        r = rank
    elif fraction is not None:
        r = _fraction_rank(float(fraction), m, n)
    else:
        if singular_values is None:
            raise ValueError(f"energy={energy} needs the singular values of {name}: use "
                             f"from_dense (not init)")
        e = np.asarray(jax.device_get(singular_values), np.float64) ** 2
        cum = np.cumsum(e, axis=-1) / np.maximum(e.sum(-1, keepdims=True), 1e-300)
        r = int(np.max((cum < float(energy) - 1e-12).sum(-1) + 1))
        r = min(r, k)
    if r > k:
        raise ValueError(f"rank={r} is larger than {name} ({m} x {n}); valid ranks are 1..{k}")
    return int(r)


def truncated_svd(W: jax.Array, rank: int, *, method: str = "exact", key=None,
                  oversample: int = 8, power_iters: int = 2):
    """Rank-``rank`` SVD ``(U_r [...,m,r], S_r [...,r], Vt_r [...,r,n])`` of ``W [..., m, n]``.

    ``method='exact'``: ``jnp.linalg.svd``. ``'randomized'`` (Halko, Martinsson, Tropp 2011):
    ``Q = orth((W W^T)^q W Omega)``, ``Omega [n, r+p]`` Gaussian (needs ``key``), then the SVD of
    the small ``Q^T W``; only matmuls touch the full matrix, so a sharded W stays sharded.
    Raises ValueError for an unknown method, a missing key, or a rank outside 1..min(m, n).
    """
    m, n = W.shape[-2:]
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank={rank} for a {m} x {n} matrix; valid ranks are 1..{min(m, n)}")
    if method == "exact":
        U, S, Vt = jnp.linalg.svd(W, full_matrices=False)
    elif method == "randomized":
        if key is None:
            raise ValueError("method='randomized' needs a key")
        k = min(rank + oversample, min(m, n))
        omega = normal(key, W.shape[:-2] + (n, k), W.dtype)
        Q, _ = jnp.linalg.qr(W @ omega)
        for _ in range(power_iters):
            Q, _ = jnp.linalg.qr(jnp.swapaxes(W, -1, -2) @ Q)
            Q, _ = jnp.linalg.qr(W @ Q)
        Ub, S, Vt = jnp.linalg.svd(jnp.swapaxes(Q, -1, -2) @ W, full_matrices=False)
        U = Q @ Ub
    else:
        raise ValueError(f"method={method!r}; valid: 'exact', 'randomized'")
    return U[..., :rank], S[..., :rank], Vt[..., :rank, :]


@struct.dataclass
class LowRankWeight(StructuredWeight):
    """A low-rank weight ``W = L @ R``: ``L [*batch, m, r]``, ``R [*batch, r, n]``."""

    L: jax.Array
    R: jax.Array
    layout: MatrixLayout = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    @property
    def rank(self) -> int:
        return self.L.shape[-1]

    def materialize(self) -> jax.Array:
        """Dense ``L @ R`` in the leaf's shape and dtype."""
        return self.layout.from_matrix(jnp.matmul(self.L, self.R)).astype(self.dtype)

    def apply(self, x: jax.Array, *, impl=None, interpret: bool = False) -> jax.Array:
        """``y = (x @ L) @ R`` (no dense ``L @ R``), factors cast to ``x.dtype``.

        Plain XLA matmuls (``impl`` / ``interpret`` have no kernel to select here). Needs one
        default-layout matrix; raises ValueError otherwise.
        """
        del impl, interpret
        check_single_matrix(self, self.L, x, self.L.shape[0])
        return (x @ self.L.astype(x.dtype)) @ self.R.astype(x.dtype)


def _lowrank_specs(w, dense_spec, b, m_spec, n_spec, mesh):
    """Sharding (``jaxeff.state_sharding``): ``L [b, m, r]`` shards ``m`` and ``R [b, r, n]``
    shards ``n`` as the dense weight."""
    return dict(L=b + (m_spec, None), R=b + (None, n_spec))


register_rule(LowRankWeight, structured_rule(_lowrank_specs))


@dataclasses.dataclass(frozen=True)
class _RankRule:
    rank: Any = None
    fraction: Optional[float] = None
    energy: Optional[float] = None
    method: str = "exact"

    def svd(self, path, lay: MatrixLayout, W, key):
        """Rank-resolved truncated SVD of the matrix view ``W`` (float32)."""
        if self.energy is not None:
            S_all = jnp.linalg.svd(W, compute_uv=False)
            r = resolve_rank(lay.m, lay.n, energy=self.energy, singular_values=S_all,
                             name=f"leaf '{path}'")
        else:
            r = resolve_rank(lay.m, lay.n, rank=self.rank, fraction=self.fraction,
                             name=f"leaf '{path}'")
        return truncated_svd(W, r, method=self.method, key=key)


@dataclasses.dataclass(frozen=True)
class LowRank(_RankRule):
    """Low-rank factorization as a params transform (built by :func:`lowrank`)."""

    select: Any = None
    matrix_axes: Any = None

    def from_dense(self, key, params):
        """Replace selected leaves by their truncated SVD ``L R`` (PELA's even split).

        ``key`` is only used by ``method='randomized'`` (may be None otherwise). Eager when
        ``energy`` is set. Raises ValueError as :func:`resolve_rank` / :func:`truncated_svd`.
        """
        if self.method == "randomized" and key is None:
            raise ValueError("method='randomized' needs a key")
        key = None if key is None else check_key("key", key)

        def make(path, leaf, lay, k):
            U, S, Vt = self.svd(path, lay, lay.to_matrix(leaf).astype(jnp.float32), k)
            root = jnp.sqrt(S)
            L, R = U * root[..., None, :], root[..., :, None] * Vt
            return LowRankWeight(L.astype(leaf.dtype), R.astype(leaf.dtype), lay,
                                 jnp.dtype(leaf.dtype))
        return map_matrices(make, params, self.select, key=key, matrix_axes=self.matrix_axes,
                            method="lowrank")

    def init(self, key, params, std: Optional[float] = None):
        """Factors for training from scratch: ``L, R ~ N(0, (std^2/r)^(1/4))`` entrywise.

        Then ``L @ R`` has entry std ``std`` (default: the std of the template leaf, or
        ``1/sqrt(in)`` when that is 0), matching the dense init's scale with balanced factors.
        Works under ``jax.eval_shape``. Raises ValueError for ``energy`` (needs a dense weight).
        """
        if self.energy is not None:
            raise ValueError("energy-based rank needs a dense weight: use from_dense, or give "
                             "rank= or fraction=")
        key = check_key("key", key)

        def make(path, leaf, lay, k):
            r = resolve_rank(lay.m, lay.n, rank=self.rank, fraction=self.fraction,
                             name=f"leaf '{path}'")
            sd = jnp.std(leaf.astype(jnp.float32)) if std is None else jnp.float32(std)
            sd = jnp.where(sd > 0, sd, 1.0 / math.sqrt(lay.m))
            f = (sd * sd / r) ** 0.25
            kl, kr = jax.random.split(k)
            b = lay.batch_shape
            L = f * normal(kl, b + (lay.m, r), jnp.float32)
            R = f * normal(kr, b + (r, lay.n), jnp.float32)
            return LowRankWeight(L.astype(leaf.dtype), R.astype(leaf.dtype), lay,
                                 jnp.dtype(leaf.dtype))
        return map_matrices(make, params, self.select, key=key, matrix_axes=self.matrix_axes,
                            method="lowrank")

    @staticmethod
    def merge(tree):
        """Densify every structured leaf (``jaxeff.params.materialize``)."""
        return materialize(tree)


def _split_rank(rank, fraction):
    """A float ``rank`` is a fraction (one rank convention across jaxeff)."""
    if isinstance(rank, float):
        if fraction is not None:
            raise ValueError(f"give exactly one of rank, fraction, energy; got rank={rank!r} "
                             f"and fraction={fraction!r}")
        return None, rank
    return rank, fraction


def lowrank(rank=None, *, fraction: Optional[float] = None, energy: Optional[float] = None,
            select=None, matrix_axes=None, method: str = "exact") -> LowRank:
    """Build the low-rank transform ``W ~ L @ R`` with one rank rule.

    Paper: "PELA: Learning Parameter-Efficient Models with Low-Rank Approximation" (2023).
    Args:
      rank: a positive int, ``'pela'`` for ``in*out // (3*(in+out))``, or a float in (0, 1]
        (the same as ``fraction=``).
      fraction: rank as a fraction of ``min(in, out)``, in (0, 1]: ``max(1, floor(f * k))``.
      energy: keep the smallest rank holding this fraction of ``sum S^2``, in (0, 1].
      select: the leaves to factor (``jaxeff.select`` selector); default
        ``jaxeff.select.is_weight_matrix`` (no bias, norm scale or embedding).
      matrix_axes: per-leaf ``(in_axes, out_axes)`` or a flax NNX module
        (``jaxeff.select.MatrixLayout``); default: flax attention kernels as one matrix, other
        leaves ``[..., in, out]``.
      method: ``'exact'`` (default) or ``'randomized'`` SVD.
    Raises ValueError naming the argument when not exactly one rule is given or it is invalid.
    """
    rank, fraction = _split_rank(rank, fraction)
    _check_rank_args(rank, fraction, energy)
    if method not in ("exact", "randomized"):
        raise ValueError(f"method={method!r}; valid: 'exact', 'randomized'")
    return LowRank(rank=rank, fraction=fraction, energy=energy, method=method, select=select,
                   matrix_axes=matrix_axes)


@struct.dataclass
class SVFitWeight(StructuredWeight):
    """SVFit weight ``W = U diag(sigma) Vt + residual``; only ``sigma`` trains."""

    U: jax.Array
    sigma: jax.Array
    Vt: jax.Array
    residual: jax.Array
    layout: MatrixLayout = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False)

    trainable_fields = ("sigma",)
    adapter = True

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    def materialize(self) -> jax.Array:
        """Dense ``U diag(sigma) Vt + residual`` in the leaf's shape and dtype."""
        W = jnp.matmul(self.U * self.sigma[..., None, :], self.Vt) + self.residual
        return self.layout.from_matrix(W).astype(self.dtype)

    def apply(self, x: jax.Array, *, impl=None, interpret: bool = False) -> jax.Array:
        """``y = ((x @ U) * sigma) @ Vt + x @ residual``, arrays cast to ``x.dtype``.

        Plain XLA matmuls (no kernel to select). Needs one default-layout matrix; raises
        ValueError otherwise.
        """
        del impl, interpret
        check_single_matrix(self, self.U, x, self.U.shape[0])
        cd = x.dtype
        low = ((x @ self.U.astype(cd)) * self.sigma.astype(cd)) @ self.Vt.astype(cd)
        return low + x @ self.residual.astype(cd)


def _svfit_specs(w, dense_spec, b, m_spec, n_spec, mesh):
    """Sharding (``jaxeff.state_sharding``): ``U [b, m, r]`` and the ``residual [b, m, n]`` follow
    the dense ``m`` (and ``n``), ``Vt [b, r, n]`` its ``n``; ``sigma [b, r]`` only the batch."""
    return dict(U=b + (m_spec, None), sigma=b + (None,), Vt=b + (None, n_spec),
                residual=b + (m_spec, n_spec))


register_rule(SVFitWeight, structured_rule(_svfit_specs))


@dataclasses.dataclass(frozen=True)
class SVFit(_RankRule):
    """SVFit as a params transform (built by :func:`svfit`)."""

    select: Any = None
    matrix_axes: Any = None

    def from_dense(self, key, params):
        """Replace selected leaves by ``SVFitWeight`` with ``sigma = S_r`` (so ``W(S_r) = W``)."""
        if self.method == "randomized" and key is None:
            raise ValueError("method='randomized' needs a key")
        key = None if key is None else check_key("key", key)

        def make(path, leaf, lay, k):
            W = lay.to_matrix(leaf).astype(jnp.float32)
            U, S, Vt = self.svd(path, lay, W, k)
            resid = W - jnp.matmul(U * S[..., None, :], Vt)
            dt = leaf.dtype
            return SVFitWeight(U.astype(dt), S.astype(dt), Vt.astype(dt), resid.astype(dt), lay,
                               jnp.dtype(dt))
        return map_matrices(make, params, self.select, key=key, matrix_axes=self.matrix_axes,
                            method="svfit")

    @staticmethod
    def merge(tree):
        """Densify every structured leaf (``jaxeff.params.materialize``)."""
        return materialize(tree)


def svfit(rank=None, *, fraction: Optional[float] = None, energy: Optional[float] = None,
          select=None, matrix_axes=None, method: str = "exact") -> SVFit:
    """Build SVFit: freeze the top-r singular vectors, train only their singular values.

    Paper: "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular
    Values" (Sun et al., 2024). Default rule (none given): ``energy=0.99`` (the top r singular
    values hold 99% of ``sum S^2``). Args and errors as :func:`lowrank`.
    """
    rank, fraction = _split_rank(rank, fraction)
    if rank is None and fraction is None and energy is None:
        energy = 0.99
    _check_rank_args(rank, fraction, energy)
    if method not in ("exact", "randomized"):
        raise ValueError(f"method={method!r}; valid: 'exact', 'randomized'")
    return SVFit(rank=rank, fraction=fraction, energy=energy, method=method, select=select,
                 matrix_axes=matrix_axes)


def pela_feature_loss(student_features: Sequence[jax.Array],
                      teacher_features: Sequence[jax.Array], weight: float = 0.1) -> jax.Array:
    """PELA feature distillation: ``weight * mean_l mean((f_s,l - stop_grad(f_t,l))^2)``.

    Paper: PELA (2023), ``L_fm`` with ``kd_alpha`` (TECHNIQUES.md: 0.1). Raises ValueError for
    lists of different lengths or an empty list, and for mismatched shapes.
    """
    s, t = list(student_features), list(teacher_features)
    if not s or len(s) != len(t):
        raise ValueError(f"student_features and teacher_features must be non-empty lists of the "
                         f"same length; got {len(s)} and {len(t)}")
    terms = []
    for i, (a, b) in enumerate(zip(s, t)):
        if a.shape != b.shape:
            raise ValueError(f"feature {i}: student shape {a.shape} != teacher shape {b.shape}")
        d = a.astype(jnp.float32) - jax.lax.stop_gradient(b).astype(jnp.float32)
        terms.append(jnp.mean(d * d))
    return weight * sum(terms) / len(terms)


def pela_weight_perturbation(factors, teacher, eps: float = 1e-3) -> jax.Array:
    """PELA weight-perturbation regulariser: ``mean_matrices (max|W_s - W_t| - eps)^2``.

    ``W_s`` is each structured leaf of ``factors`` materialized, ``W_t`` the dense leaf at the
    same path of ``teacher``; the max is per matrix (a stacked leaf counts each layer), as the
    reference's ``inf_norm`` per Linear. Multiply by your weight. Raises ValueError when
    ``factors`` holds no structured leaf.
    """
    errs = []

    def one(f, t):
        if is_structured(f):
            d = jnp.abs(f.materialize().astype(jnp.float32) - t.astype(jnp.float32))
            mx = jnp.max(f.layout.to_matrix(d), axis=(-2, -1)) if hasattr(f, "layout") \
                else jnp.max(d)
            errs.append(jnp.ravel((mx - eps) ** 2))
        return None

    jax.tree.map(one, factors, teacher, is_leaf=is_structured)
    if not errs:
        raise ValueError("factors holds no structured leaf to compare with teacher")
    return jnp.mean(jnp.concatenate(errs))
