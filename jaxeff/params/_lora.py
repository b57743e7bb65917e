"""LoRA: low-rank adapters on a frozen base weight, with merge.

Paper: "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., 2021). In our ``[in, out]``
layout::

    W' = W + (alpha / r) * A @ B,   A: [in, r] ~ U(+-1/sqrt(in)),  B: [r, out] = 0 at init,

so the adapted model equals the base model at init; only ``A`` and ``B`` train, ``W`` carries no
optimizer state. Unlike ``flax.nnx.LoRA`` (no alpha/r scaling, needs ``nnx.Optimizer(wrt=...)``),
this works on any params pytree.

Example::

    import jax, jax.numpy as jnp, jaxeff
    from jaxeff.params import LoRA, combine, materialize, partition
    params = {"layers": {"wq": jnp.ones((2, 32, 32)), "wv": jnp.ones((2, 32, 32))}}
    adapted = jaxeff.params.lora(rank=4, alpha=8, select=r"layers/(wq|wv)$").from_dense(
        jax.random.key(0), params)
    trainable, frozen = partition(adapted)          # only A, B train; the rest -> frozen
    loss = lambda t, x: jnp.mean((x @ materialize(combine(t, frozen))["layers"]["wq"]) ** 2)
    grads = jax.grad(loss)(trainable, jnp.ones((2, 4, 32)))
    merged = LoRA.merge(adapted)                    # plain dense params again

or ``optax.multi_transform({True: tx, False: optax.set_to_zero()}, trainable_mask(adapted))``.
``partition`` freezes every dense leaf of an adapted tree (embeddings, norms, biases, unadapted
matrices); ``partition(adapted, train_dense=r"head")`` trains the named ones too.

On a flax NNX model (``nnx.split`` / ``nnx.merge``; paths ignore the ``nnx.Param`` wrapper)::

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    adapted = lora(rank=4).from_dense(key, params)          # default: every weight matrix
    trainable, frozen = partition(adapted)
    def loss(t, batch):
        m = nnx.merge(graphdef, materialize(combine(t, frozen)), rest)
        return model_loss(m, batch)
    # after training: nnx.update(model, LoRA.merge(combine(trainable, frozen)))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxeff._checks import check_float, check_key, check_rank
from jaxeff.params._structured import (MatrixLayout, StructuredWeight, check_single_matrix,
                                       map_matrices, materialize, structured_rule, uniform)
from jaxeff.select import resolve_rank
from jaxeff.state_sharding import register_rule

__all__ = ["LoRAWeight", "LoRA", "lora"]


@struct.dataclass
class LoRAWeight(StructuredWeight):
    """``W' = base + scale * A @ B``; ``A [*b, m, r]``, ``B [*b, r, n]``, ``base`` dense."""

    base: jax.Array
    A: jax.Array
    B: jax.Array
    scale: float = struct.field(pytree_node=False)
    layout: MatrixLayout = struct.field(pytree_node=False)

    trainable_fields = ("A", "B")
    adapter = True

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def rank(self) -> int:
        return self.A.shape[-1]

    def delta(self) -> jax.Array:
        """The adapter's dense update ``scale * A @ B`` in the leaf's shape."""
        return self.layout.from_matrix(self.scale * jnp.matmul(self.A, self.B))

    def materialize(self) -> jax.Array:
        """The merged weight ``base + scale * A @ B``."""
        return (self.base + self.delta()).astype(self.base.dtype)

    def apply(self, x: jax.Array, *, impl=None, interpret: bool = False) -> jax.Array:
        """The unmerged forward ``x @ base + scale * (x @ A) @ B`` (no dense ``A @ B``).

        Arrays are cast to ``x.dtype``. Plain XLA matmuls: ``impl`` / ``interpret`` are accepted
        for the ``jaxeff.params.linear`` seam and have no kernel to select. Needs one
        default-layout ``[in, out]`` matrix (an unstacked leaf or a layer sliced by
        ``lax.scan``). Raises ValueError otherwise.
        """
        del impl, interpret
        check_single_matrix(self, self.A, x, self.A.shape[0])
        cd = x.dtype
        return x @ self.base.astype(cd) + self.scale * ((x @ self.A.astype(cd)) @ self.B.astype(cd))


def _lora_specs(w, dense_spec, b, m_spec, n_spec, mesh):
    """Sharding (``jaxeff.state_sharding``): the frozen ``base`` keeps the dense spec,
    ``A [b, m, r]`` shards ``m`` and ``B [b, r, n]`` shards ``n`` as the dense weight."""
    return dict(base=dense_spec, A=b + (m_spec, None), B=b + (None, n_spec))


register_rule(LoRAWeight, structured_rule(_lora_specs))


@dataclasses.dataclass(frozen=True)
class LoRA:
    """LoRA as a params transform (built by :func:`lora`)."""

    rank: Any
    alpha: Any = None
    select: Any = None
    matrix_axes: Any = None

    def from_dense(self, key: jax.Array, params):
        """Wrap selected leaves in adapters: A ~ U(+-1/sqrt(in)), B = 0 (adapted = base).

        ``key``: a ``jax.random`` key or an int seed. Raises ValueError for a rank larger than a
        matrix, a leaf with fewer than 2 axes, or a selector matching nothing; TypeError naming
        ``key`` for a key of another type.
        """
        key = check_key("key", key)

        def make(path, leaf, lay: MatrixLayout, k):
            r = resolve_rank(self.rank, lay.m, lay.n, leaf=path, method="lora")
            b, bound = lay.batch_shape, 1.0 / math.sqrt(lay.m)
            A = uniform(k, b + (lay.m, r), leaf.dtype, -bound, bound)
            B = jnp.zeros(b + (r, lay.n), leaf.dtype)
            alpha = float(r) if self.alpha is None else self.alpha
            return LoRAWeight(leaf, A, B, alpha / r, lay)
        return map_matrices(make, params, self.select, key=key, matrix_axes=self.matrix_axes,
                            method="lora")

    init = from_dense

    @staticmethod
    def merge(tree):
        """Fold every adapter into its base (``jaxeff.params.materialize``): dense params."""
        return materialize(tree)


def lora(rank, alpha: float | None = None, *, select=None, matrix_axes=None) -> LoRA:
    """Build LoRA adapters ``W' = W + (alpha/r) * A @ B`` on the selected leaves.

    Paper: "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., 2021).
    Args:
      rank: r, an int >= 1, or a float in (0, 1]: that fraction of ``min(m, n)`` of each matrix.
      alpha: scale numerator (finite, > 0); default r (scale 1, what ``nnx.LoRA`` does).
      select: leaves to adapt (``jaxeff.select`` selector); default
        ``jaxeff.select.is_weight_matrix`` (no bias, norm scale or embedding).
      matrix_axes: per-leaf ``(in_axes, out_axes)`` or a flax NNX module
        (``jaxeff.select.MatrixLayout``); default: flax attention kernels as one matrix, other
        leaves ``[..., in, out]``.
    Raises TypeError/ValueError naming the argument for a bad rank or alpha.
    """
    rank = check_rank("rank", rank)
    if alpha is not None:
        alpha = check_float("alpha", alpha, 0.0, min_open=True)
    elif isinstance(rank, int):
        alpha = float(rank)       # a fractional rank takes alpha = r per leaf
    return LoRA(rank=rank, alpha=alpha, select=select, matrix_axes=matrix_axes)
