"""Learnable depth pruning (TinyFusion): learn which layers to keep, jointly with a recovery update.

Paper: "TinyFusion: Diffusion Transformers Learned Shallow" (Fang et al., 2024, arXiv 2412.01199);
reference VainF/TinyFusion. The ``L`` layers are split into groups of ``M`` consecutive layers, each
keeping ``N`` (2:1 keeps half). Per group, learnable logits ``a`` over the ``C(M, N)`` keep-patterns
``P`` (rows of 0/1, :func:`keep_patterns`) are sampled per example with a hard Gumbel-softmax and a
straight-through estimator::

    y_soft = softmax((a * scaling + Gumbel) / tau)          tau annealed 4 -> 0.1, scaling 1e2
    y      = onehot(argmax y_soft) + (y_soft - stop_gradient(y_soft))   (value: exactly one-hot)
    m      = y @ P                                          (exactly N ones per group)
    x_l+1  = m_l * Block_l(x_l) + (1 - m_l) * x_l

A jointly trained low-rank update ``W + (alpha/r) A B`` (LoRA, ``B = 0`` at init) stands in for the
fine-tuning that follows, so the logits learn the pattern that *recovers* best, not the one that is
best right after pruning. Afterwards the argmax pattern is kept (:func:`kept_layers`) and
:func:`prune_depth` gathers those layers from the original params (the reference discards the LoRA
update and fine-tunes the shallow model).

Reference defaults: logits initialised to 0.02, LoRA rank 8 and alpha 16, AdamW (no weight decay)
with lr 1e-4 for the LoRA factors and 1e-3 for the logits, gradient clipping 1.0.

The gated forward is model-agnostic: :func:`gated_scan` runs a user ``block_fn(layer_params, x) ->
x`` over the stacked layers with a per-layer (or per-example-per-layer) gate. For the reference
LLaMA: ``block_fn = lambda lp, x: llama.block(lp, x, cfg, segment_ids, positions)``.

LoRA is ``jaxeff.params.lora`` (``_lora.py``, the one home): :func:`init_lora` / :func:`merge_lora`
are thin views of it that keep the factors as a plain ``{'a', 'b'}`` dict (merged into the weights
for the forward); or put the trainable half of a ``lora(...).from_dense`` tree in ``'lora'`` and
run the unmerged product (``x W + s (x A) B``, no dense weight gradient) through the model.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxeff._checks import check_float
from jaxeff.params._layers import gather_layers, layer_count
from jaxeff.params._lora import LoRAWeight, lora
from jaxeff.params._structured import is_structured
from jaxeff.select import MatrixLayout, flatten_with_paths, path_str

__all__ = ["keep_patterns", "init_depth_pruning", "sample_layer_mask", "argmax_layer_mask",
           "kept_layers", "gated_scan", "init_lora", "merge_lora", "temperature_schedule",
           "pruning_optimizer", "prune_depth"]


def _check_group(group_size, keep):
    for name, v in (("group_size", group_size), ("keep", keep)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    if keep > group_size:
        raise ValueError(f"keep={keep} must be <= group_size={group_size}")


def keep_patterns(group_size: int = 2, keep: int = 1) -> np.ndarray:
    """All ``C(M, N)`` ways to keep ``N = keep`` of ``M = group_size`` layers: float32 ``[C, M]``
    rows of 0/1, in ``itertools.combinations`` order. Raises ValueError for ``keep > group_size``
    or non-positive sizes."""
    _check_group(group_size, keep)
    rows = [[1.0 if i in c else 0.0 for i in range(group_size)]
            for c in itertools.combinations(range(group_size), keep)]
    return np.asarray(rows, np.float32)


def _check_logits(logits, group_size, keep):
    pats = keep_patterns(group_size, keep)
    if logits.ndim != 2 or logits.shape[1] != pats.shape[0]:
        raise ValueError(f"logits must have shape [n_groups, C({group_size},{keep}) = "
                         f"{pats.shape[0]}]; got {logits.shape}")
    return pats


def init_lora(key: jax.Array, params, select, *, rank: int = 8):
    """LoRA factors for the matrices selected in ``params``, as a plain nested dict: a thin view
    of ``jaxeff.params.lora`` (the library's one LoRA; it draws the factors).

    Returns ``{path...: {'a': A, 'b': B}}`` nested like the params: the ``A`` / ``B`` of
    ``lora(rank, select=select).from_dense(key, params)``, ``A: [..., m, r]`` uniform in
    ``±1/sqrt(m)``, ``B: [..., r, n] = 0`` (so the update ``A B`` starts at zero; LoRA, Hu et al.
    2021). A tree of arrays only (no frozen base, no ``None`` holes): optax and Orbax take it as
    it is; :func:`merge_lora` applies it. To train the adapters unmerged instead (cheaper
    backward: no dense weight gradient), use ``partition(lora(...).from_dense(key, params))[0]``
    as the ``'lora'`` entry and ``combine(trainable, frozen)`` in the loss.

    Raises ValueError for ``rank < 1``, a selector matching nothing, or a selected leaf with fewer
    than two axes (the messages of ``jaxeff.params.lora``).
    """
    adapted = lora(rank, select=select).from_dense(key, params)
    out: dict = {}
    for p, w in flatten_with_paths(adapted, is_leaf=is_structured)[0]:
        if isinstance(w, LoRAWeight):
            node = out
            parts = p.split("/")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = {"a": w.A, "b": w.B}
    return out


def merge_lora(params, lora_factors, *, alpha: float = 16.0):
    """``W + (alpha / r) * A @ B`` for every leaf that has factors in ``lora_factors`` (see
    :func:`init_lora`); other leaves unchanged. Differentiable in both trees.

    The merge is ``jaxeff.params.LoRAWeight(W, A, B, alpha / r, layout).materialize()``, the
    library's one copy of that formula (LoRA, Hu et al. 2021). Raises ValueError when a factor
    pair names no leaf of ``params`` or its shapes do not fit that leaf (nothing is dropped
    silently).
    """
    alpha = check_float("alpha", alpha, 0.0, min_open=True)
    wanted: dict = {}

    def collect(node, prefix):
        if isinstance(node, Mapping) and "a" in node and "b" in node:
            wanted[prefix] = node
        elif isinstance(node, Mapping):
            for k, v in node.items():
                collect(v, f"{prefix}/{k}" if prefix else str(k))
        else:
            raise ValueError(f"lora_factors: {prefix!r} is neither a dict nor an {{'a', 'b'}} "
                             f"pair (got {type(node).__name__})")

    collect(lora_factors, "")
    used = set()

    def one(path, w):
        name = path_str(path)
        f = wanted.get(name)
        if f is None:
            return w
        used.add(name)
        lay = MatrixLayout.for_leaf(name, w.shape)
        want_a = lay.batch_shape + (lay.m, f["a"].shape[-1])
        want_b = lay.batch_shape + (f["a"].shape[-1], lay.n)
        if f["a"].shape != want_a or f["b"].shape != want_b:
            raise ValueError(f"lora_factors for {name!r}: a {f['a'].shape}, b {f['b'].shape} do "
                             f"not fit the weight {w.shape} (want a {want_a}, b {want_b})")
        return LoRAWeight(w, f["a"], f["b"], alpha / f["a"].shape[-1], lay).materialize()

    out = jax.tree_util.tree_map_with_path(one, params)
    if set(wanted) - used:
        raise ValueError(f"lora_factors name leaves that params lacks: {sorted(set(wanted) - used)}")
    return out


def init_depth_pruning(key: jax.Array, params, *, group_size: int = 2, keep: int = 1,
                       layers: str = "layers", layer_axis: int = 0, lora=None, rank: int = 8,
                       logit_init: float = 0.02):
    """Trainables for TinyFusion: ``{'logits': [L/M, C(M,N)] (all = logit_init), 'lora': ...}``.

    Args:
      key: PRNG key for the LoRA factors.
      params: the trained model (layers at ``layers``, see ``jaxeff.params.growth``).
      group_size: ``M`` consecutive layers per group (default 2); keep: ``N`` (default 1).
      lora: selector of the matrices that get a recovery update (``None``: no LoRA, ``'lora'`` is
        then an empty dict); rank: LoRA rank (default 8, the reference).
      logit_init: initial value of every logit (default 0.02, the reference).

    Raises ValueError when the number of layers is not divisible by ``group_size``, or for bad
    sizes.
    """
    _check_group(group_size, keep)
    n = layer_count(params, layers=layers, layer_axis=layer_axis)
    if n % group_size:
        raise ValueError(f"the model has {n} layers, not divisible by group_size={group_size}")
    c = keep_patterns(group_size, keep).shape[0]
    logits = jnp.full((n // group_size, c), logit_init, jnp.float32)
    return {"logits": logits,
            "lora": {} if lora is None else init_lora(key, params, lora, rank=rank)}


def sample_layer_mask(logits, key: jax.Array, *, group_size: int = 2, keep: int = 1,
                      tau=1.0, scaling: float = 100.0, batch_size: Optional[int] = None,
                      hard: bool = True):
    """Sample layer gates from the pattern logits with a (hard, straight-through) Gumbel-softmax.

    ``y_soft = softmax((logits*scaling + g)/tau)``, ``g ~ Gumbel(0, 1)``; with ``hard`` the value is
    the one-hot argmax and the gradient that of ``y_soft``. Returns ``y @ P`` flattened: float32
    ``[L]``, or ``[batch_size, L]`` with one independent draw per example (the reference).
    With ``hard`` every group holds exactly ``keep`` ones.

    Raises ValueError when ``logits`` is not ``[n_groups, C(group_size, keep)]``.
    """
    pats = jnp.asarray(_check_logits(logits, group_size, keep))
    shape = logits.shape if batch_size is None else (batch_size, *logits.shape)
    g = jax.random.gumbel(key, shape, jnp.float32)
    y_soft = jax.nn.softmax((logits.astype(jnp.float32) * scaling + g) / tau, axis=-1)
    y = y_soft
    if hard:
        y_hard = jax.nn.one_hot(jnp.argmax(y_soft, axis=-1), pats.shape[0], dtype=jnp.float32)
        y = y_hard + (y_soft - jax.lax.stop_gradient(y_soft))   # value exactly one-hot
    m = y @ pats                                                # [..., n_groups, M]
    return m.reshape(*m.shape[:-2], -1)


def argmax_layer_mask(logits, *, group_size: int = 2, keep: int = 1):
    """The deterministic mask of the most likely pattern per group: float32 ``[L]``."""
    pats = _check_logits(logits, group_size, keep)
    return jnp.asarray(pats)[jnp.argmax(logits, axis=-1)].reshape(-1)


def kept_layers(logits, *, group_size: int = 2, keep: int = 1) -> list[int]:
    """Indices of the layers kept by the argmax pattern of every group (ascending)."""
    m = np.asarray(argmax_layer_mask(logits, group_size=group_size, keep=keep))
    return [int(i) for i in np.flatnonzero(m > 0.5)]


def gated_scan(block_fn: Callable, layers, x, mask, *, layer_axis: int = 0):
    """Run the layers with gates: ``x <- m_l * block_fn(layer_l, x) + (1 - m_l) * x``.

    ``m_l = 1`` gives the block's output exactly, ``m_l = 0`` skips it exactly.

    Args:
      block_fn: ``(layer_params, x) -> x`` for one layer (residual included).
      layers: the layer subtree, stacked (leaves carry the layer axis ``layer_axis``) or a
        list/tuple of per-layer subtrees.
      x: activations with the batch on axis 0.
      mask: ``[L]`` (one gate per layer) or ``[B, L]`` (per example).

    Raises ValueError when ``mask`` does not match the number of layers or the batch.
    """
    if isinstance(layers, (list, tuple)) and not hasattr(layers, "_fields"):
        layers = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    elif layer_axis:
        layers = jax.tree.map(lambda w: jnp.moveaxis(w, layer_axis, 0), layers)
    sizes = {w.shape[0] for w in jax.tree.leaves(layers)}
    if len(sizes) != 1:
        raise ValueError(f"layers disagree on the number of layers: {sizes}")
    n = sizes.pop()
    mask = jnp.asarray(mask)
    if mask.ndim == 1 and mask.shape[0] == n:
        m_L = mask
    elif mask.ndim == 2 and mask.shape == (x.shape[0], n):
        m_L = mask.T
    else:
        raise ValueError(f"mask must be [{n}] or [batch={x.shape[0]}, {n}]; got {mask.shape}")

    def body(h, inp):
        lp, m = inp
        y = block_fn(lp, h)
        m = m.astype(h.dtype).reshape(m.shape + (1,) * (h.ndim - m.ndim))
        return m * y + (1 - m) * h, None

    out, _ = jax.lax.scan(body, x, (layers, m_L))
    return out


def temperature_schedule(total_steps: int, start: float = 4.0, end: float = 0.1):
    """Gumbel temperature ``tau(step)``: linear from ``start`` (4) to ``end`` (0.1) over
    ``total_steps`` (the reference's ``tau_range``); an ``optax.Schedule``."""
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int; got {total_steps!r}")
    if not (start > 0 and end > 0):
        raise ValueError(f"temperatures must be > 0; got start={start}, end={end}")
    return optax.linear_schedule(start, end, max(total_steps - 1, 1))


def pruning_optimizer(gate_lr: float = 1e-3, lora_lr: float = 1e-4, *, clip: float = 1.0):
    """AdamW (no weight decay) with separate learning rates for the logits and the LoRA factors
    (reference: 1e-3 and 1e-4), after global-norm clipping; for the tree of
    :func:`init_depth_pruning`."""
    def labels(tree):
        return {k: jax.tree.map(lambda _: "gates" if k == "logits" else "lora", v)
                for k, v in tree.items()}

    return optax.chain(
        optax.clip_by_global_norm(clip),
        optax.multi_transform({"gates": optax.adamw(gate_lr, weight_decay=0.0),
                               "lora": optax.adamw(lora_lr, weight_decay=0.0)}, labels))


def prune_depth(params, keep: Sequence[int], *, layers: str = "layers", layer_axis: int = 0,
                layout: str = "auto"):
    """The shallow model: only the layers ``keep`` (distinct, ascending indices), everything else
    copied. Paper: TinyFusion (Fang et al., 2024).

    Raises ValueError for an empty, unsorted, repeated or out-of-range ``keep``.
    """
    k = [int(i) for i in keep]
    if not k or k != sorted(set(k)):
        raise ValueError(f"keep must be distinct layer indices in ascending order; got "
                         f"{list(keep)!r}")
    return gather_layers(params, k, layers=layers, layer_axis=layer_axis, layout=layout)
