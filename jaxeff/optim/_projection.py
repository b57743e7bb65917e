"""Low-rank projector refresh for GaLore: exact SVD or a warm-started randomized range finder.

Paper: "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection" (Zhao et al., 2024)
refreshes ``P`` from ``svd(G)``. The randomized refresh follows "Finding Structure with Randomness"
(Halko, Martinsson and Tropp, 2011), Algorithm 4.4 (subspace iteration) with a Rayleigh-Ritz step,
warm-started from the previous projector as in GaLore 2 (2025)::

    Q0 = orth([P_prev, Omega])          Omega ~ N(0, 1)^{m x p}          (l = r + p columns)
    Q_{i+1} = orth(G G^T Q_i)            i < n_iter
    B = Q^T G;  B B^T = W diag(w) W^T;   P = Q W[:, top r]                (columns by w, descending)

Everything works on batches of matrices ``[..., m, n]`` and returns ``[..., m, r]`` (left singular
vectors; the right ones are the left ones of ``G^T``). Sharding: the exact SVD needs the whole
matrix on one device (XLA gathers a sharded ``G``); the randomized refresh only multiplies ``G``
(sharded matmuls) and orthonormalizes the ``m x l`` sketch, so the gathered piece is ``l/n`` of G.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxeff._checks import check_int

__all__ = ["Randomized", "svd_projector", "randomized_projector", "random_orthonormal",
           "resolve_refresh", "align_signs", "reproject_moment"]


@dataclasses.dataclass(frozen=True)
class Randomized:
    """Randomized refresh settings: ``oversample`` extra sketch columns p, ``n_iter`` power iterations.

    Defaults p=8, n_iter=2. ``n_iter >= 1`` (with 0 the previous projector is never improved).
    Raises ValueError for ``oversample < 0`` or ``n_iter < 1``, TypeError for non-ints.
    """
    oversample: int = 8
    n_iter: int = 2

    def __post_init__(self):
        check_int("oversample", self.oversample, 0)
        check_int("n_iter", self.n_iter, 1)


def resolve_refresh(refresh):
    """'svd' -> 'svd'; 'randomized' -> Randomized(); a Randomized passes. Else ValueError."""
    if isinstance(refresh, Randomized) or refresh == "svd":
        return refresh
    if refresh == "randomized":
        return Randomized()
    raise ValueError(f"refresh={refresh!r} must be 'svd', 'randomized' or a Randomized(...)")


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def svd_projector(G, rank: int, sides=("left",), dtype=None):
    """Top-``rank`` singular vectors of ``G [..., m, n]`` by one exact f32 SVD, one per side.

    'left' gives ``U[..., :, :r]`` [..., m, r] and 'right' ``Vh[..., :r, :]^T`` [..., n, r], as the
    reference's ``get_orthogonal_matrix`` (the right factor from ``svd(G)``, not ``svd(G^T)``, so
    that signs agree with the reference and ``optax.contrib.galore``).
    """
    u, _, vh = jnp.linalg.svd(G.astype(jnp.float32), full_matrices=False)
    out = tuple(u[..., :rank] if side == "left" else _mT(vh[..., :rank, :]) for side in sides)
    return tuple(p.astype(dtype or G.dtype) for p in out)


def align_signs(new, old):
    """Flip columns of ``new`` whose inner product with the same column of ``old`` is negative.

    Singular vectors are defined up to sign, and LAPACK's choice can flip between refreshes; the
    inner moments kept across a refresh then push the flipped directions backwards. Aligning makes
    the result independent of the SVD's sign convention. A zero ``old`` (first refresh) flips nothing.
    """
    dots = jnp.sum(new.astype(jnp.float32) * old.astype(jnp.float32), axis=-2, keepdims=True)
    return jnp.where(dots < 0, -new, new)


def _orth(y):
    q, _ = jnp.linalg.qr(y)
    return q


def random_orthonormal(key, shape, dtype=jnp.float32):
    """A random ``[..., m, r]`` matrix with orthonormal columns (QR of a Gaussian)."""
    return _orth(jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def randomized_projector(G, prev, key, oversample: int = 8, n_iter: int = 2, dtype=None):
    """Approximate top-r left singular vectors of ``G [..., m, n]``, warm-started from ``prev [..., m, r]``.

    Subspace iteration on ``[prev, Omega]`` (see module docstring); ``r = prev.shape[-1]``,
    ``l = min(r + oversample, m, n)``. Cost ``O(mnl (2 n_iter + 1))`` flops against ``O(mn min(m,n))``
    for the SVD. Returns orthonormal columns sorted by estimated singular value.
    """
    g = G.astype(jnp.float32)
    m, n = g.shape[-2:]
    r = prev.shape[-1]
    extra = max(0, min(r + oversample, m, n) - r)
    y = prev.astype(jnp.float32)
    if extra:
        omega = jax.random.normal(key, g.shape[:-2] + (m, extra), jnp.float32)
        y = jnp.concatenate([y, omega], axis=-1)
    q = _orth(y)
    for _ in range(n_iter):
        q = _orth(g @ (_mT(g) @ q))
    b = _mT(q) @ g                                   # [..., l, n]
    _, w = jnp.linalg.eigh(b @ _mT(b))               # ascending eigenvalues
    top = w[..., ::-1][..., :r]                      # reverse the columns, keep the r largest
    return (q @ top).astype(dtype or G.dtype)


def reproject_moment(x, new, old, sides, square: bool = False):
    """Carry an inner moment from the old projected basis to the new one (GaLore ``moments='reproject'``).

    With ``R = P_new^T P_old`` per side: left ``x <- R x``, right ``x <- x R^T`` (exact for a
    first moment living in the old subspace). ``square=True`` uses ``R * R`` elementwise instead, the
    expectation for a second moment of independent coordinates; it keeps the moment non-negative.
    Not in the GaLore paper. Returns f32.
    """
    x = x.astype(jnp.float32)
    for pn, po, side in zip(new, old, sides):
        rot = _mT(pn).astype(jnp.float32) @ po.astype(jnp.float32)
        rot = rot * rot if square else rot
        x = rot @ x if side == "left" else x @ _mT(rot)
    return x
