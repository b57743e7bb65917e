"""GPTQ on a flax NNX model without touching its forward: linear inputs captured by interception.

"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers" (Frantar et
al., ICLR 2023), Section 4, applied to any ``nnx.Module``. While a calibration forward is *traced*,
``nnx.Linear.__call__`` and ``nnx.LinearGeneral.__call__`` (which ``nnx.MultiHeadAttention`` uses
for its ``[D, H, hd]`` / ``[H, hd, D]`` kernels) are wrapped so that each call hands its input to
the driver; nothing in the model's code changes, and the wrappers are removed when tracing ends.
Each kernel is quantized as the matrix ``[prod(contracted axes), prod(output axes)]`` and the
input as ``[..., prod(contracted axes)]``.

Sequential procedure, in the order the forward calls the linears. The linears form *steps*: by
default each group of consecutive calls on the same input (``query/key/value`` -> ``out`` ->
``up/gate`` -> ``down``: the reference's ``--true-sequential``), or with ``block=REGEX`` all
linears whose path has the same ``re.match`` prefix (e.g. ``r"layers/\\d+"``: one step per
transformer layer, the reference's default). For each step:

1. run the calibration forwards through the model whose earlier steps are already quantized,
   accumulating ``H = (2/n) sum x x^T`` (float32, streaming) for the inputs of the step's linears
   (linears called on the same input share one ``H``);
2. quantize each kernel with :func:`jaxeff.params.gptq` from its ``H`` (error feedback through
   ``H^-1``) and write its dequantized value into the model.

The capture function returns only the captured statistics, so XLA drops the part of the forward
after the step's linears; step ``s`` costs one calibration pass through the model's prefix up to
``s`` (quadratic in depth in total, against linear for :func:`jaxeff.params.gptq_model` with a
hand-written :class:`~jaxeff.params.LayerwiseModel`, which caches the layer boundaries).

Why not fully general: the adapter needs to see which input meets which weight. Modules that
call ``jnp.dot`` / ``einsum`` on a raw parameter themselves (``nnx.Einsum``, custom layers) are
not intercepted; wrap them in ``nnx.Linear`` / ``nnx.LinearGeneral`` or use
:func:`jaxeff.params.gptq_model` with a ``capture``-filling layer. Layers stacked with
``nnx.vmap`` and run under ``nnx.scan`` are one module holding ``[L, ...]`` kernels, called on
slices inside the scan: their per-layer inputs cannot be attributed to a layer this way (they are
reported as never called); use :func:`jaxeff.params.stacked_layerwise` for that layout.
:func:`capture_linear_inputs` is the interception itself, for other drivers.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import time
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff._checks import check_callable
from jaxeff.params._gptq import (HessianState, check_hessian, check_ok, check_solver_args,
                                 hessian_update_all)
from jaxeff.params._gptq_driver import _solve_members, default_token_mask
from jaxeff.params._quantized import check_quant_args
from jaxeff.select import Selector, select_mask

__all__ = ["gptq_nnx", "capture_linear_inputs"]

_RECORDERS: list = []   # the active recorder (innermost last) while a forward is traced


def _linear_classes():
    from flax import nnx
    return (nnx.Linear, nnx.LinearGeneral)


@contextlib.contextmanager
def capture_linear_inputs(record: Callable[[Any, jax.Array], None]):
    """Call ``record(module, inputs)`` on every ``nnx.Linear`` / ``nnx.LinearGeneral`` call.

    A context manager: inside it, the two classes' ``__call__`` are wrapped (subclasses that call
    ``super().__call__`` are seen too); on exit the originals are back. Use it around a traced
    forward (``jax.jit`` / ``jax.eval_shape``) to read linear inputs without editing the model.
    Not thread-safe (it patches the classes).
    """
    classes = _linear_classes()
    originals = {cls: cls.__dict__["__call__"] for cls in classes}

    def wrap(orig):
        @functools.wraps(orig)
        def call(self, inputs, *args, **kwargs):
            if _RECORDERS:
                _RECORDERS[-1](self, inputs)
            return orig(self, inputs, *args, **kwargs)
        return call

    _RECORDERS.append(record)
    for cls, orig in originals.items():
        cls.__call__ = wrap(orig)
    try:
        yield
    finally:
        for cls, orig in originals.items():
            cls.__call__ = orig
        _RECORDERS.pop()


def _as_matrix_input(module, x):
    """The input ``x`` of ``module`` as ``[..., IN]`` and the kernel's ``(IN, OUT)``."""
    from flax import nnx
    kernel = module.kernel[...]
    if isinstance(module, nnx.LinearGeneral):
        if module.batch_axis:
            raise ValueError("gptq_nnx: nnx.LinearGeneral with batch_axis is not a matrix "
                             "weight; exclude it with select=")
        axis = tuple(a % x.ndim for a in module.axis)
        n = len(axis)
        x = jnp.moveaxis(x, axis, tuple(range(x.ndim - n, x.ndim)))
        d_in = math.prod(kernel.shape[:n])
        return x.reshape(*x.shape[:x.ndim - n], d_in), (d_in, math.prod(kernel.shape[n:]))
    return x, (kernel.shape[0], math.prod(kernel.shape[1:]))


def _module_paths(model):
    from flax import nnx
    classes = _linear_classes()
    return {id(m): "/".join(str(k) for k in p) for p, m in nnx.iter_graph(model)
            if isinstance(m, classes)}


def _traced_calls(graphdef, state, batch, forward, want=None):
    """Run the forward on ``merge(graphdef, state)`` recording ``(path, input, x_matrix)``."""
    from flax import nnx
    model = nnx.merge(graphdef, state)
    names = _module_paths(model)
    calls = []

    def record(module, x):
        path = names.get(id(module))
        if path is not None and (want is None or path in want):
            calls.append((path, x, *_as_matrix_input(module, x)))

    with capture_linear_inputs(record):
        forward(model, batch)
    return calls


def _call(model, batch):
    return model(batch)


# Compiled capture passes are cached on (graph structure, forward, captured linears), so
# quantizing the same model again (other bits, another selection) does not recompile them.
@functools.lru_cache(maxsize=64)
def _accumulate_fn(graphdef, forward, want, rep_items):
    rep = dict(rep_items)

    def acc(state, batch, m, hstates):
        # Linears sharing an input with their representative are folded in under it already.
        cap = {p: x for p, _, x, _ in _traced_calls(graphdef, state, batch, forward, want)
               if rep[p] == p}
        return hessian_update_all(hstates, cap, m)
    return jax.jit(acc)


def gptq_nnx(model, calibration_batches: Iterable, bits: int, group_size: Optional[int] = None,
             *, forward: Optional[Callable] = None, select: Selector = None,
             block: Optional[str] = None, block_size: int = 128, percdamp: float = 0.01,
             act_order: bool = False, sym: bool = False, pad: bool = False,
             scale_dtype=jnp.float32, token_mask: Callable = default_token_mask,
             return_stats: bool = False):
    """GPTQ-quantize the linear layers of a flax NNX model sequentially, without editing it.

    Procedure in the module docstring (Frantar et al., 2023). Args:
      model: an ``nnx.Module``; it is not modified (a copy is returned).
      calibration_batches: an iterable of batches (arrays or dicts), read once and kept.
      bits, group_size (None = one group per output column), block_size (128), percdamp (0.01),
        act_order (False), sym (False), pad (False), scale_dtype (float32): as
        :func:`jaxeff.params.gptq`.
      forward: ``forward(model, batch)`` runs the model; default ``model(batch)``. Give the
        plain forward, not an ``nnx.jit``-ed one: ``gptq_nnx`` traces and compiles it itself.
      select: ``jaxeff.select`` regex or predicate over kernel paths
        (``layers/0/attn/query/kernel``); default None = every ``nnx.Linear`` /
        ``nnx.LinearGeneral`` kernel the forward calls (the LM head too: exclude it with e.g.
        ``select=r"^(?!lm_head)"`` to follow the paper).
      block: regex; linears whose paths share the same ``re.match`` prefix are quantized in one
        step (e.g. ``r"layers/\\d+"``). Default None: one step per group of linears sharing an
        input.
      token_mask: ``token_mask(batch) -> bool[...] | None``, the tokens that count in ``H``
        (default: ``segment_ids > 0`` of a dict batch, else all).
      return_stats: also return ``{'seconds', 'errors': [(path, tr(dW^T H dW))], 'quantized':
        {path: QuantizedWeight [IN, OUT]}}`` (the packed codes, for storage or bytes).

    Returns a copy of ``model`` whose selected kernels hold their GPTQ-dequantized values
    (same shapes and dtype; its forward is unchanged), and the stats if asked.

    Raises ``ValueError`` for bad quantization arguments, empty calibration, a selector matching
    no kernel or a kernel the forward never calls, a token mask that does not fit an input, a
    non-finite or singular Hessian (naming the kernels); warns for a kernel whose calibration
    inputs are all zero (all its tokens masked: RTN there); ``TypeError`` if ``model`` is not an ``nnx.Module``.

    Example::

        from flax import nnx
        import jax.numpy as jnp
        import jaxeff

        class MLP(nnx.Module):
            def __init__(self, rngs):
                self.up = nnx.Linear(16, 32, rngs=rngs)
                self.down = nnx.Linear(32, 16, rngs=rngs)
            def __call__(self, x):
                return self.down(nnx.relu(self.up(x)))

        mlp = MLP(nnx.Rngs(0))
        calib = [jnp.ones((4, 16)) * i for i in range(1, 4)]
        q = jaxeff.params.gptq_nnx(mlp, calib, bits=4, group_size=8)
        q(calib[0]).shape  # (4, 16)
    """
    from flax import nnx
    t0 = time.perf_counter()
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module; got {type(model).__name__} (for plain "
                        f"pytrees use jaxeff.params.gptq_model with a LayerwiseModel)")
    check_quant_args(bits, None, 1, pad)
    check_solver_args(block_size, percdamp)
    forward = _call if forward is None else check_callable("forward", forward)
    check_callable("token_mask", token_mask)
    block_rx = None if block is None else re.compile(block)
    batches = list(calibration_batches)
    if not batches:
        raise ValueError("calibration_batches is empty: pass an iterable of batches")

    work = nnx.clone(model)
    graphdef, state = nnx.split(work)
    modules = {"/".join(str(k) for k in path): mod for path, mod in nnx.iter_graph(work)
               if isinstance(mod, _linear_classes())}
    if not modules:
        raise ValueError("model has no nnx.Linear / nnx.LinearGeneral layer to quantize")
    kernels = {f"{p}/kernel": m.kernel[...] for p, m in modules.items()}
    mask = select_mask(select, kernels)

    # Plan (shapes only): call order, shared inputs, widths.
    plan = {}

    def trace(state, batch):
        calls = _traced_calls(graphdef, state, batch, forward)
        plan["calls"] = [(p, id(x), xm.shape, shp) for p, x, xm, shp in calls]
        return 0

    jax.eval_shape(trace, state, batches[0])
    calls = plan["calls"]
    called = list(dict.fromkeys(p for p, *_ in calls))
    never = sorted(k for k, m in mask.items() if m and k[:-len("/kernel")] not in called)
    if never and select is not None:
        raise ValueError(f"select={select!r} picks kernels the forward never calls, so GPTQ sees "
                         f"no input for them: {never[:8]}")
    chosen = [p for p in called if mask[f"{p}/kernel"]]
    if not chosen:
        raise ValueError(f"select={select!r} matches no kernel that the forward calls; called: "
                         f"{called[:12]}")
    shape_of = {p: shp for p, _, _, shp in calls}
    for p in chosen:
        check_quant_args(bits, group_size, shape_of[p][0], pad)
    inputs_of = {}
    for p, i, *_ in calls:
        inputs_of.setdefault(p, []).append(i)
    rep = {}
    for p in called:
        rep[p] = next(q for q in called if inputs_of[q] == inputs_of[p])
    steps, key_of = [], {}
    for p, i, *_ in calls:   # forward order of first calls
        if p not in chosen or p in key_of:
            continue
        m = block_rx.match(p) if block_rx is not None else None
        k = ("block", m.group(0)) if m else ("input", rep[p])
        key_of[p] = k
        if not steps or steps[-1][0] != k:
            existing = [s for s in steps if s[0] == k]
            if existing:
                existing[0][1].append(p)
                continue
            steps.append((k, [p]))
        else:
            steps[-1][1].append(p)

    solve = functools.partial(_solve_members, bits=int(bits), group_size=group_size,
                              pad=bool(pad), block_size=int(block_size),
                              act_order=bool(act_order), sym=bool(sym),
                              scale_dtype=jnp.dtype(scale_dtype))
    masks = [token_mask(b) for b in batches]
    errors, quantized = [], {}
    for _, members in steps:
        keys = tuple(dict.fromkeys(rep[p] for p in members))
        want = frozenset(p for p in called if rep[p] in keys)

        acc = _accumulate_fn(graphdef, forward, want, tuple(sorted(rep.items())))
        hstates = {k: HessianState(np.zeros((shape_of[k][0],) * 2, np.float32),
                                   np.zeros((), np.float32)) for k in keys}
        for b, m in zip(batches, masks):
            hstates = acc(state, b, m, hstates)
        for k in keys:
            group = [p for p in members if rep[p] == k]
            ws = tuple(modules[p].kernel[...].reshape(shape_of[p]) for p in group)
            where = ", ".join(f"{p}/kernel" for p in group)
            check_hessian(hstates[k].h, where)
            parts, w_hats, errs, ok = solve(ws, hstates[k].h, percdamp)
            check_ok(ok, percdamp, where)
            for p, q, w_hat, e in zip(group, parts, w_hats, errs):
                var = modules[p].kernel
                old = var.get_value()
                var.set_value(w_hat.reshape(old.shape).astype(old.dtype))
                quantized[f"{p}/kernel"] = q
                errors.append((f"{p}/kernel", float(e)))
        del hstates
        state = nnx.state(work)
    if return_stats:
        return work, {"seconds": time.perf_counter() - t0, "errors": errors,
                      "quantized": quantized}
    return work
