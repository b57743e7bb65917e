"""Depth growth by stacking (G_stack), its timing rule, and the train-state switch at growth.

Paper: "Stacking Your Transformers: A Closer Look at Model Growth for Efficient LLM
Pre-Training" (Du et al., NeurIPS 2024, arXiv 2405.15319). Train an ``L``-layer model for ``d``
tokens, stack it ``g`` times (``g = 4``) and continue training the ``g*L``-layer model.

Operator (whole-model order, the paper's ``G_stack``)::

    grown_layer[i] = source_layer[i mod L]        i = 0 .. g*L - 1   (0..L-1, 0..L-1, ...)

bert2BERT's *inner stacking* (``order="interleave"``) is ``grown_layer[i] = source_layer[i // g]``
(``0,0,..,1,1,..``). Embedding, final norm and head are copied unchanged.

Growth timing (the paper's fitted guideline, ``d`` in tokens, ``N`` the target model's parameter
count, ``C = 6 N D`` the training compute)::

    log10(d) = 0.88 * log10(N) + 163.27 / log10(C) - 5.74

Layer layouts (stacked or per-layer containers at the ``/``-joined path ``layers``) and the
:func:`gather_layers` primitive live in :mod:`jaxeff.params.layers` and are re-exported here.

After growth (:func:`grow_train_state`), the reference (tongxuluo/prts ``stacking_6L_24L``) uses a
**fresh AdamW** with a **restarted step count and warmup**, and its loader **skips the data the small
model already saw** — with an iterator that simply continues, that is automatic: pass the same
iterator on. The alternative keeps the optimizer moments, grown exactly like the parameters.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.params._layers import _is_array, gather_layers, layer_count, stacked_layers
from jaxeff.select import path_str

__all__ = ["stack_depth", "gather_layers", "layer_count", "growth_tokens", "grow_train_state",
           "stacked_layers", "DEFAULT_GROWTH_FACTOR"]

DEFAULT_GROWTH_FACTOR = 4


def stack_depth(params, factor: int = DEFAULT_GROWTH_FACTOR, *, layers: str = "layers",
                layer_axis: int = 0, order: str = "stack", layout: str = "auto"):
    """G_stack: grow an ``L``-layer model to ``factor * L`` layers by stacking it.

    ``order="stack"`` (the paper's G_stack, default): ``grown[i] = src[i mod L]``, i.e. the whole
    model repeated ``0..L-1, 0..L-1, ...``. ``order="interleave"`` (bert2BERT inner stacking,
    ``jnp.repeat``): ``grown[i] = src[i // factor]``. Leaves outside ``layers`` are unchanged.
    Not function-preserving (do not expect equal outputs).

    Paper: "Stacking Your Transformers: A Closer Look at Model Growth for Efficient LLM
    Pre-Training" (Du et al., 2024).

    Args:
      params: any pytree with a layer container at ``layers`` (stacked or per-layer layout).
      factor: growth factor ``g >= 1`` (default 4, the paper's choice).
      layers, layer_axis, layout: where the layers are (see :func:`stacked_layers`).
      order: ``"stack"`` or ``"interleave"``.

    Raises TypeError for a non-int ``factor``; ValueError for ``factor < 1``, an unknown
    ``order``, or a ``layers`` path that matches nothing.
    """
    if not isinstance(factor, (int, np.integer)) or isinstance(factor, bool):
        raise TypeError(f"factor must be an int >= 1; got {type(factor).__name__} {factor!r}")
    if factor < 1:
        raise ValueError(f"factor must be an int >= 1; got {factor}")
    if order not in ("stack", "interleave"):
        raise ValueError(f"order must be 'stack' (G_stack, i mod L) or 'interleave' "
                         f"(i // factor); got {order!r}")
    n = layer_count(params, layers=layers, layer_axis=layer_axis, layout=layout)
    i = np.arange(factor * n)
    idx = i % n if order == "stack" else i // factor
    return gather_layers(params, idx, layers=layers, layer_axis=layer_axis, layout=layout)


# ----------------------------------------------------------------------------------------------
# Growth timing


def growth_tokens(n_params: float, tokens: Optional[float] = None, *,
                  compute: Optional[float] = None, a: float = 0.88, b: float = 163.27,
                  c: float = -5.74) -> float:
    """Tokens ``d`` to train the small model before stacking, from the paper's fitted guideline.

    ``log10(d) = a*log10(N) + b/log10(C) + c`` with ``a = 0.88``, ``b = 163.27``, ``c = -5.74``,
    ``N`` the *target* (grown) model's parameter count and ``C = 6*N*D`` FLOPs for a budget of
    ``D`` tokens. E.g. Llama2-7B on 2T tokens: ``d = 11.11e9``. The fit covers LLM scale
    (``C`` around 1e20-1e24); at tiny compute it returns ``d > D`` (i.e. "do not grow").

    Paper: "Stacking Your Transformers" (Du et al., 2024), growth-timing guideline.

    Args:
      n_params: target model parameters ``N`` (> 0).
      tokens: the token budget ``D`` (> 0); exactly one of ``tokens`` / ``compute``.
      compute: the FLOP budget ``C`` (> 1) instead of ``tokens``.
      a, b, c: the fitted coefficients.

    Raises ValueError for non-positive inputs or when neither/both budgets are given.
    """
    if not (isinstance(n_params, (int, float, np.number)) and n_params > 0):
        raise ValueError(f"n_params must be a positive number; got {n_params!r}")
    if (tokens is None) == (compute is None):
        raise ValueError("give exactly one of tokens (D) or compute (C = 6*N*D); got "
                         f"tokens={tokens!r}, compute={compute!r}")
    if tokens is not None:
        if not tokens > 0:
            raise ValueError(f"tokens must be > 0; got {tokens!r}")
        compute = 6.0 * float(n_params) * float(tokens)
    if not compute > 1:
        raise ValueError(f"compute must be > 1 FLOP; got {compute!r}")
    return float(10.0 ** (a * math.log10(n_params) + b / math.log10(compute) + c))


# ----------------------------------------------------------------------------------------------
# The train-state switch at growth


def _same_shapes(node, params_def, shapes) -> bool:
    try:
        if jax.tree.structure(node) != params_def:
            return False
    except Exception:
        return False
    return [getattr(x, "shape", None) for x in jax.tree.leaves(node)] == shapes


def grow_train_state(state, grow: Callable[[Any], Any], *, tx=None, opt_state: str = "fresh",
                     reset_step: bool = True, restart_schedule: bool = True):
    """Grow the params of a ``jaxeff.train.TrainState`` and switch its optimizer state, in one call.

    ``params' = grow(params)``. The optimizer state becomes, by ``opt_state``:

    * ``"fresh"`` (default; the reference): ``tx.init(params')`` — new moments, count 0, so the
      schedule (warmup included) restarts. ``tx`` is the optimizer for the grown model.
    * ``"grow"``: every subtree of the old optimizer state with the params' structure and shapes
      (Adam's ``mu``/``nu``, momentum, ...) goes through the same ``grow``, so moments are stacked
      exactly like the weights; other leaves are kept, except that with ``restart_schedule`` the
      ``count`` leaves (optax's step counters) are reset to 0. ``grow`` must be deterministic
      (pass explicit mappings to randomised growth operators).

    With ``reset_step`` (default, the reference's restarted step count) ``state.step`` becomes 0
    and the PRNG key is ``fold_in(rng, old_step)`` so no step key repeats. The data iterator is
    not part of the state: keep passing the same iterator and it continues where it was, which is
    the reference's "skip what the base model saw".

    Paper: "Stacking Your Transformers" (Du et al., 2024); reference tongxuluo/prts.

    Args:
      state: a ``TrainState`` (any flax.struct dataclass with ``step``, ``params``, ``opt_state``,
        ``rng``).
      grow: ``params -> params`` (e.g. ``functools.partial(stack_depth, factor=4)``).
      tx: optax transformation for the grown model (required for ``"fresh"``).
      opt_state: ``"fresh"`` or ``"grow"``.
      reset_step: restart ``state.step`` at 0 (default True).
      restart_schedule: for ``"grow"``, reset optax ``count`` leaves to 0 (default True).

    Raises TypeError for a non-callable ``grow``; ValueError for an unknown ``opt_state``, a
    missing ``tx``, or a ``"grow"`` state holding array leaves none of which is params-shaped.
    """
    if not callable(grow):
        raise TypeError(f"grow must be a callable params -> params; got {type(grow).__name__}")
    if opt_state not in ("fresh", "grow"):
        raise ValueError(f"opt_state must be 'fresh' (new tx.init, reference) or 'grow' (moments "
                         f"grown like the params); got {opt_state!r}")
    if opt_state == "fresh" and tx is None:
        raise ValueError("opt_state='fresh' needs tx, the optimizer for the grown model")
    params = state.params
    new_params = grow(params)
    if opt_state == "fresh":
        new_opt = tx.init(new_params)
    else:
        pdef = jax.tree.structure(params)
        shapes = [x.shape for x in jax.tree.leaves(params)]
        found = [0]

        def is_params_like(n):
            return _same_shapes(n, pdef, shapes)

        def visit(path, n):
            if is_params_like(n):
                found[0] += 1
                return grow(n)
            if restart_schedule and path and path_str(path[-1:]) == "count" and _is_array(n):
                return jnp.zeros_like(n)
            return jnp.array(n, copy=True) if _is_array(n) else n

        new_opt = jax.tree_util.tree_map_with_path(visit, state.opt_state, is_leaf=is_params_like)
        big = [x for x in jax.tree.leaves(state.opt_state) if _is_array(x) and x.ndim > 0]
        if big and not found[0]:
            raise ValueError("opt_state='grow': no part of the optimizer state has the params' "
                             "structure and shapes (e.g. a masked or factored state); use "
                             "opt_state='fresh' with tx")
    # fresh buffers: the grown state must not alias the old one (a donating train step would
    # otherwise delete the old state's step/rng)
    step, rng = jnp.array(state.step, copy=True), jnp.array(state.rng, copy=True)
    if reset_step:
        rng = jax.random.fold_in(rng, step)
        step = jnp.zeros_like(step)
    return state.replace(step=step, params=new_params, opt_state=new_opt, rng=rng)
