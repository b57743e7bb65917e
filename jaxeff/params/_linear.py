"""The one seam between weights and kernels: ``linear(x, w) = x @ W`` for any weight.

``w`` is a dense array (``x @ w``) or a :class:`~jaxeff.params.StructuredWeight`, which owns its
product (equinox style: the weight knows how it is applied) through its ``apply`` method:

| weight | product | kernel |
|---|---|---|
| dense array | ``x @ w`` | XLA |
| ``SLTrainWeight`` | ``s (x @ A) @ B + x @ S`` | ``jaxeff.kernels.sltrain_matmul`` |
| ``QuantizedWeight`` | ``x[..., perm] @ dequant(codes)`` | ``jaxeff.kernels.quant_matmul`` |
| ``LoRAWeight`` | ``x @ W0 + s (x @ A) @ B`` | XLA (no dense ``A @ B``) |
| ``LowRankWeight`` | ``(x @ L) @ R`` | XLA |
| ``SVFitWeight`` | ``((x @ U) sigma) @ Vt + x @ W_e`` | XLA |
| other structured | ``x @ materialize(w)`` | XLA |

``impl=None`` lets each kernel's dispatcher choose from the backend (the kernel where it beat
XLA on an H200, XLA otherwise; see ``jaxeff.kernels``), ``'pallas'`` / ``'reference'`` force
one, ``interpret=True`` runs the Pallas kernels in interpret mode (CPU tests). Gradients flow
through every path. ``materialize`` stays for export and for code that wants a dense matrix.
"""

from __future__ import annotations

from typing import Optional

import jax

from jaxeff._checks import check_choice
from jaxeff.params._structured import is_structured

__all__ = ["linear", "IMPLS"]

IMPLS = (None, "pallas", "reference")


def linear(x: jax.Array, w, *, impl: Optional[str] = None, interpret: bool = False) -> jax.Array:
    """``y = x @ W`` for a dense or structured weight ``W [in, out]`` and ``x [..., in]``.

    Args:
      x: activations ``[..., in]``.
      w: a dense ``[in, out]`` array (``x @ w``, no cast) or a structured weight holding one
        matrix (an unstacked leaf, or a layer of a stacked leaf sliced by ``lax.scan``); its
        ``apply`` computes the product in ``x.dtype``.
      impl: None (default: by backend), 'pallas' or 'reference' (forwarded to the kernels).
      interpret: run the Pallas kernels in interpret mode (default False).
    Returns ``[..., out]``.
    Raises:
      ValueError: ``impl`` not in (None, 'pallas', 'reference'); a structured weight that holds
        a stack of matrices or a non-default layout; ``x``'s last axis not ``in``.
      TypeError: ``interpret`` not a bool.
    """
    if impl is not None:
        check_choice("impl", impl, IMPLS[1:])
    if not isinstance(interpret, bool):
        raise TypeError(f"interpret must be a bool; got {interpret!r} ({type(interpret).__name__})")
    if is_structured(w):
        return w.apply(x, impl=impl, interpret=interpret)
    return x @ w
