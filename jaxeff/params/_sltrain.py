"""SLTrain: sparse plus low-rank weights with a fixed random support.

Paper: "SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining"
(Han et al., NeurIPS 2024, arXiv 2406.02214); reference andyjm3/SLTrain ``splora/splora_linear.py``.

In our ``[in, out]`` layout (torch stores ``[out, in]``; ours is its transpose)::

    W = s * (A @ B) + S,    A: [in, r],  B: [r, out],  s = alpha / r,
    S = scatter(values at indices),  indices: nnz = int(delta * in * out) sorted unique flat
                                     row-major indices into the [in, out] matrix (fixed forever).

Initialisation (paper): ``A ~ U(+-1/sqrt(in))`` (torch's kaiming_uniform(a=sqrt(5)) with
fan_in = in), ``B = 0`` so ``W = S`` at init, ``values ~ U(+-1/sqrt(in))``. Only ``A``, ``B`` and
``values`` train; the int32 ``indices`` stay out of the optimizer (``jaxeff.params.partition``).
The savings are in parameters, gradients and optimizer state: r(m+n) + delta*m*n trainable numbers
per matrix instead of m*n.

The paper's settings for a model size: ``sltrain(**sltrain_preset("350m"), select=...)``.

Example::

    import jax, jax.numpy as jnp, jaxeff
    from jaxeff.params import combine, materialize, partition
    params = {"layers": {"wq": jnp.ones((2, 32, 32)), "norm": jnp.ones((2, 32))}}
    method = jaxeff.params.sltrain(rank=4, density=0.05, select=r"layers/wq$")
    factors = method.init(jax.random.key(0), params)  # train from scratch: W = S at init
    trainable, frozen = partition(factors)          # indices go to `frozen`
    loss = lambda t, x: jnp.mean((x @ materialize(combine(t, frozen))["layers"]["wq"]) ** 2)
    grads = jax.grad(loss)(trainable, jnp.ones((2, 4, 32)))   # gradients of A, B, values only

On a flax NNX model (``nnx.split`` / ``nnx.merge``; paths ignore the ``nnx.Param`` wrapper,
``nnx.MultiHeadAttention`` kernels ``[D, H, hd]`` are one ``D x (H*hd)`` matrix)::

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    factors = sltrain(rank=0.25).init(key, params)     # weight matrices only (no bias/norm/embed)
    trainable, frozen = partition(factors)
    def loss(t, batch):
        m = nnx.merge(graphdef, materialize(combine(t, frozen)), rest)
        return model_loss(m, batch)
    # after training: nnx.update(model, materialize(combine(trainable, frozen)))

Applying the weight: ``jaxeff.params.linear(x, w)`` calls :meth:`SLTrainWeight.apply`, the
product ``s (x @ A) @ B + x @ S`` through ``jaxeff.kernels.sltrain_matmul`` (the Triton kernels on
GPU), so a model whose weights are SLTrain factors never holds the dense W as a parameter;
:meth:`SLTrainWeight.factors` returns ``(A, B, scale, indices, values)`` for other kernels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxeff._checks import check_float, check_key, check_rank
from jaxeff.kernels import sparse_lowrank as _spl
from jaxeff.params._structured import (MatrixLayout, StructuredWeight, check_single_matrix,
                                       map_matrices, materialize, structured_rule, uniform)
from jaxeff.select import resolve_rank
from jaxeff.state_sharding import axis_names, register_rule

__all__ = ["SLTrainWeight", "SLTrain", "sltrain", "sltrain_preset", "SLTRAIN_PRESETS"]

# Paper defaults (Table / scripts of andyjm3/SLTrain): model size -> rank, alpha, delta.
SLTRAIN_PRESETS = {
    "60m": dict(rank=128, alpha=32.0, density=0.03),
    "130m": dict(rank=256, alpha=16.0, density=0.03),
    "350m": dict(rank=256, alpha=16.0, density=0.03),
    "1b": dict(rank=512, alpha=8.0, density=0.03),
    "7b": dict(rank=1024, alpha=8.0, density=0.05),
}
_INT32_MAX = 2**31 - 1


def sltrain_preset(size: str) -> dict:
    """The paper's ``rank``, ``alpha`` and ``density`` for a model size ('60m' ... '7b').

    Raises ValueError for an unknown size.
    """
    key = str(size).lower()
    if key not in SLTRAIN_PRESETS:
        raise ValueError(f"size={size!r} has no SLTrain preset; valid: {sorted(SLTRAIN_PRESETS)}")
    return dict(SLTRAIN_PRESETS[key])


def _batched(fn, n_batch: int):
    for _ in range(n_batch):
        fn = jax.vmap(fn)
    return fn


def _scatter_add(flat, indices, values):
    """``flat[..., indices] += values`` per matrix (indices unique and sorted)."""
    def one(a, i, v):
        return a.at[i].add(v, indices_are_sorted=True, unique_indices=True)
    return _batched(one, flat.ndim - 1)(flat, indices, values)


@struct.dataclass
class SLTrainWeight(StructuredWeight):
    """A sparse-plus-low-rank weight ``W = scale * A @ B + S`` (batched over leading axes).

    Fields: ``A [*batch, m, r]``, ``B [*batch, r, n]``, ``indices int32 [*batch, nnz]`` (sorted
    flat row-major indices into ``[m, n]``: row = idx // n is the input, col = idx % n the
    output), ``values [*batch, nnz]``. Static: ``scale`` (alpha / r), ``layout``, ``dtype``.
    """

    A: jax.Array
    B: jax.Array
    indices: jax.Array
    values: jax.Array
    scale: float = struct.field(pytree_node=False)
    layout: MatrixLayout = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False)

    trainable_fields = ("A", "B", "values")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    @property
    def rank(self) -> int:
        return self.A.shape[-1]

    @property
    def nnz(self) -> int:
        return self.indices.shape[-1]

    def factors(self) -> tuple[jax.Array, jax.Array, float, jax.Array, jax.Array]:
        """Kernel hook: ``(A, B, scale, indices, values)``, matrix layout ``[*batch, m, n]``."""
        return self.A, self.B, self.scale, self.indices, self.values

    def sparse_matrix(self) -> jax.Array:
        """The sparse part ``S`` as a dense ``[*batch, m, n]`` array."""
        lay = self.layout
        flat = jnp.zeros(lay.batch_shape + (lay.m * lay.n,), self.values.dtype)
        return _scatter_add(flat, self.indices, self.values).reshape(lay.batch_shape +
                                                                     (lay.m, lay.n))

    def materialize(self) -> jax.Array:
        """Dense ``W = scale * A @ B + scatter(values)`` in the leaf's shape and dtype."""
        lay = self.layout
        low = (self.scale * jnp.matmul(self.A, self.B)).astype(self.values.dtype)
        flat = _scatter_add(low.reshape(lay.batch_shape + (lay.m * lay.n,)), self.indices,
                            self.values)
        return lay.from_matrix(flat.reshape(lay.batch_shape + (lay.m, lay.n))).astype(self.dtype)

    def apply(self, x: jax.Array, *, impl=None, interpret: bool = False) -> jax.Array:
        """``y = x @ W = scale * (x @ A) @ B + x @ S`` through ``jaxeff.kernels.sltrain_matmul``.

        The kernel's dispatcher picks its Triton path on GPU and the reference (W built in f32,
        one matmul) elsewhere; ``impl`` / ``interpret`` force one. Factors are cast to
        ``x.dtype`` (the kernels take float32 / bfloat16). Gradients reach ``x``, ``A``, ``B``
        and ``values``. Needs one default-layout matrix (an unstacked leaf or a layer sliced by
        ``lax.scan``). Raises ValueError otherwise.
        """
        check_single_matrix(self, self.A, x, self.A.shape[0])
        cd = x.dtype
        return _spl.sltrain_matmul(x, self.A.astype(cd), self.B.astype(cd), self.indices,
                                   self.values.astype(cd), float(self.scale), impl=impl,
                                   interpret=interpret)


def _sltrain_specs(w, dense_spec, b, m_spec, n_spec, mesh):
    """Sharding (``jaxeff.state_sharding``): ``A [b, m, r]`` shards ``m`` and ``B [b, r, n]``
    shards ``n`` as the dense weight; ``indices`` / ``values`` ``[b, nnz]`` shard ``nnz`` over the
    dense matrix's mesh axis of ``m`` (else of ``n``) when it divides ``nnz`` (else replicated)."""
    sparse = b + (m_spec if axis_names(m_spec) else n_spec,)
    return dict(A=b + (m_spec, None), B=b + (None, n_spec), indices=sparse, values=sparse)


register_rule(SLTrainWeight, structured_rule(_sltrain_specs))


def _random_support(key, batch_shape, mn: int, nnz: int):
    """``nnz`` sorted distinct flat indices in ``[0, mn)`` per matrix (uniform, no replacement)."""
    def one(k):
        return jnp.sort(jax.random.permutation(k, mn)[:nnz]).astype(jnp.int32)
    n = math.prod(batch_shape)
    keys = jax.random.split(key, n)
    return jax.vmap(one)(keys).reshape(batch_shape + (nnz,))


@dataclasses.dataclass(frozen=True)
class SLTrain:
    """SLTrain as a params transform: ``init`` (from scratch), ``from_dense``, ``merge``.

    Built by :func:`sltrain`, which validates the arguments.
    """

    rank: Any
    density: float
    alpha: float
    select: Any = None
    matrix_axes: Any = None

    def _rank(self, path: str, layout: MatrixLayout) -> int:
        return resolve_rank(self.rank, layout.m, layout.n, leaf=path, method="sltrain")

    def _check(self, path: str, layout: MatrixLayout) -> int:
        m, n = layout.m, layout.n
        self._rank(path, layout)
        if m * n > _INT32_MAX:
            raise ValueError(f"sltrain: leaf '{path}' has {m * n} entries per matrix; int32 "
                             f"support indices need fewer than 2**31")
        nnz = int(self.density * m * n)
        if nnz < 1:
            raise ValueError(f"sltrain: density={self.density} gives no nonzero for leaf "
                             f"'{path}' ({m} x {n}); increase density")
        return nnz

    def init(self, key: jax.Array, params):
        """Replace selected leaves by SLTrain weights initialised as in the paper (W = S).

        ``key``: a ``jax.random`` key or an int seed (``jax.random.key(seed)``). Only the shapes
        and dtypes of the selected leaves are used (works under ``jax.eval_shape``). Raises
        ValueError for a selector matching nothing, a leaf with fewer than two axes, or a rank
        larger than a matrix; TypeError naming ``key`` for a key of another type.
        """
        key = check_key("key", key)

        def make(path, leaf, lay: MatrixLayout, k):
            nnz = self._check(path, lay)
            ka, ki, kv = jax.random.split(k, 3)
            b, m, n, r = lay.batch_shape, lay.m, lay.n, self._rank(path, lay)
            bound = 1.0 / math.sqrt(m)
            A = uniform(ka, b + (m, r), leaf.dtype, -bound, bound)
            B = jnp.zeros(b + (r, n), leaf.dtype)
            idx = _random_support(ki, b, m * n, nnz)
            vals = uniform(kv, b + (nnz,), leaf.dtype, -bound, bound)
            return SLTrainWeight(A, B, idx, vals, self.alpha / r, lay, jnp.dtype(leaf.dtype))
        return map_matrices(make, params, self.select, key=key, matrix_axes=self.matrix_axes,
                            method="sltrain")

    def from_dense(self, key: jax.Array, params, support: str = "random"):
        """Factor selected dense leaves: truncated SVD for the low-rank part, residual on S.

        ``s*A@B`` is the rank-r truncated SVD of W split evenly (``A = U sqrt(S/s)``,
        ``B = sqrt(S/s) V^T``); ``values = (W - s*A@B).flat[indices]``. ``support='random'`` is
        the paper's fixed random support; ``'magnitude'`` (an extension, not in the paper) puts
        it on the largest residual entries. With ``density=1`` or full rank, ``materialize``
        reproduces W (to float rounding). Raises ValueError for an unknown ``support``.
        """
        if support not in ("random", "magnitude"):
            raise ValueError(f"support={support!r}; valid: 'random', 'magnitude'")
        key = check_key("key", key)

        def make(path, leaf, lay: MatrixLayout, k):
            nnz = self._check(path, lay)
            r = self._rank(path, lay)
            b, s = lay.batch_shape, self.alpha / r
            W = lay.to_matrix(leaf).astype(jnp.float32)
            U, S, Vt = jnp.linalg.svd(W, full_matrices=False)
            root = jnp.sqrt(S[..., :r] / s)
            A = U[..., :, :r] * root[..., None, :]
            B = root[..., :, None] * Vt[..., :r, :]
            R = (W - s * A @ B).reshape(b + (lay.m * lay.n,))
            if support == "random":
                idx = _random_support(k, b, lay.m * lay.n, nnz)
            else:
                idx = jnp.sort(jax.lax.top_k(jnp.abs(R), nnz)[1], axis=-1).astype(jnp.int32)
            vals = jnp.take_along_axis(R, idx, axis=-1)
            dt = leaf.dtype
            return SLTrainWeight(A.astype(dt), B.astype(dt), idx, vals.astype(dt), s, lay,
                                 jnp.dtype(dt))
        return map_matrices(make, params, self.select, key=key, matrix_axes=self.matrix_axes,
                            method="sltrain")

    @staticmethod
    def merge(tree):
        """Densify every structured leaf (``jaxeff.params.materialize``)."""
        return materialize(tree)


def sltrain(rank, density: float = 0.03, alpha: float = 16.0, *, select=None,
            matrix_axes=None) -> SLTrain:
    """Build the SLTrain transform ``W = (alpha/r) * A @ B + S``, S with ``density`` support.

    Paper: "SLTrain: a sparse plus low-rank approach for parameter and memory efficient
    pretraining" (Han et al., 2024). Defaults: ``density=0.03`` (delta), ``alpha=16`` (the
    130M/350M setting; see :func:`sltrain_preset` for the others).

    Args:
      rank: r, an int >= 1 (at most min(m, n) of every selected matrix) or a float in (0, 1]:
        that fraction of ``min(m, n)`` of each matrix (``jaxeff.select.resolve_rank``); the scale
        ``alpha / r`` then uses each leaf's own r.
      density: delta in (0, 1]: fraction of entries in the fixed sparse support.
      alpha: the low-rank scale numerator, s = alpha / r (finite, > 0).
      select: which leaves to replace (``jaxeff.select`` selector); default
        ``jaxeff.select.is_weight_matrix`` (>= 2 axes; no bias, norm scale or embedding).
      matrix_axes: per-leaf ``(in_axes, out_axes)`` or a flax NNX module
        (``jaxeff.select.MatrixLayout``); default: flax attention kernels as one matrix, other
        leaves ``[..., in, out]``.
    Raises:
      TypeError / ValueError naming the argument for a rank that is neither an int >= 1 nor a
      fraction in (0, 1], a density outside (0, 1], or an alpha that is not a finite number > 0.
    """
    rank = check_rank("rank", rank)
    density = check_float("density", density, 0.0, 1.0, min_open=True)
    alpha = check_float("alpha", alpha, 0.0, min_open=True)
    return SLTrain(rank=rank, density=density, alpha=alpha, select=select,
                   matrix_axes=matrix_axes)
