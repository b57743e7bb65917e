"""Parameter and memory accounting for trees with structured leaves.

``param_report(tree)`` counts, for any pytree of arrays or ``jax.ShapeDtypeStruct``s (so it runs
on ``jax.eval_shape`` output without allocating anything):

* ``dense_params``: numbers in the dense model (a structured leaf counts ``prod(shape)``);
* ``stored_params`` / ``stored_bytes``: numbers and bytes actually held (all array fields,
  including integer indices and frozen bases);
* ``trainable_params`` / ``trainable_bytes``: what an optimizer updates
  (``jaxeff.params.trainable_mask``), the size that gradients and optimizer moments scale with;
* ``dense_bytes``: bytes of the dense model.

``tree_bytes(tree)`` sums bytes of any tree (e.g. an optimizer state from
``jax.eval_shape(tx.init, trainable)``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from jaxeff.params._structured import is_structured, trainable_mask

__all__ = ["ParamReport", "param_report", "tree_bytes", "tree_size"]


def _nbytes(x) -> int:
    return int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize


def tree_size(tree) -> int:
    """Number of array elements in ``tree`` (structured leaves count their stored fields)."""
    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def tree_bytes(tree) -> int:
    """Bytes of every array (or ``ShapeDtypeStruct``) leaf in ``tree``."""
    return sum(_nbytes(x) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


@dataclasses.dataclass(frozen=True)
class ParamReport:
    """Counts for a params tree (see the module docstring). Ratios use the dense numbers."""

    dense_params: int
    dense_bytes: int
    stored_params: int
    stored_bytes: int
    trainable_params: int
    trainable_bytes: int
    structured_leaves: int

    @property
    def stored_ratio(self) -> float:
        """``stored_bytes / dense_bytes``."""
        return self.stored_bytes / max(self.dense_bytes, 1)

    @property
    def trainable_ratio(self) -> float:
        """``trainable_params / dense_params``."""
        return self.trainable_params / max(self.dense_params, 1)


def param_report(tree) -> ParamReport:
    """Dense, stored and trainable parameter counts and bytes of ``tree``.

    Works on concrete arrays and on ``jax.ShapeDtypeStruct`` trees. Structured leaves need
    ``shape`` and ``dtype`` attributes (the dense shape and dtype).
    """
    dense_n = dense_b = n_struct = 0
    for x in jax.tree.leaves(tree, is_leaf=is_structured):
        if is_structured(x):
            n_struct += 1
            dense_n += int(math.prod(x.shape))
            dense_b += int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize
        elif hasattr(x, "shape"):
            dense_n += int(math.prod(x.shape))
            dense_b += _nbytes(x)
    mask = trainable_mask(tree)
    train = [x for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask)) if m]
    return ParamReport(dense_params=dense_n, dense_bytes=dense_b, stored_params=tree_size(tree),
                       stored_bytes=tree_bytes(tree), trainable_params=tree_size(train),
                       trainable_bytes=tree_bytes(train), structured_leaves=n_struct)
