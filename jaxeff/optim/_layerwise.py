"""Layer-wise learning-rate decay (LLRD) and the SLCA slow learner, over ``optax.multi_transform``.

Both scale the final updates of a leaf by a fixed multiplier, so they are one helper: chain it
after the optimizer (``optax.chain(optax.adamw(lr), layerwise_scale(...))`` or
:func:`layerwise`). Like ``torch`` per-group learning rates, the multiplier also scales AdamW's
decoupled weight decay.

**LLRD** ("ELECTRA: Pre-training Text Encoders as Discriminators Rather Than Generators", Clark et
al., 2020; "BEiT", Bao et al., 2022). With ``L`` layers, depth ``l`` = 0 for the embeddings,
``1..L`` for the blocks (bottom to top) and ``L + 1`` for everything after them (final norm,
head)::

    lr_l = lr * decay^(L + 1 - l)                  decay in (0, 1], typically 0.65-0.9

**SLCA slow learner** ("SLCA: Slow Learner with Classifier Alignment for Continual Learning on a
Pre-trained Model", Zhang et al., 2023): the pre-trained representation layers learn with a much
smaller rate than the classifier (0.0001 vs 0.01 in the paper, ``slow_scale = 0.01``); the
multiplier of a *slow* leaf is multiplied by ``slow_scale``. SLCA's post-hoc
classifier-alignment stage is :mod:`jaxeff.params.classifier_alignment`.

Depth of a leaf (first rule that applies; selectors follow :mod:`jaxeff.select`):

1. ``depth``: explicit per-leaf depths, a :func:`jaxeff.select.select_values` spec (``None`` = no
   override), e.g. ``[("^pos_embed$", 0)]``;
2. ``layer_index``: a regex with one group capturing a **0-based** layer index in the path
   (per-layer layouts ``layers/3/wq``, ``block_3/...``): ``l = index + 1``;
3. ``stacked``: leaves holding all layers on axis 0 (``layers/wq: [L, D, H*hd]``): slice ``i``
   along axis 0 is layer ``l = i + 1`` and is scaled by ``decay^(L - i)``; the leaf's axis 0 must
   have length ``L``;
4. ``embed``: depth 0;
5. otherwise depth ``L + 1`` (multiplier 1).

Implementation: every leaf gets a label ``d<l>`` (or ``stacked``, plus ``/slow``); each label maps
to ``optax.scale(m)`` or, for stacked leaves, a per-slice scale along axis 0, inside one
``optax.multi_transform``. ``decay = 1`` and ``slow_scale = 1`` multiply every update by exactly
1.0: bit-identical to the base optimizer.
"""
from __future__ import annotations

import numbers
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxeff._checks import check_fraction, check_int
from jaxeff.select import Selector, flatten_with_paths, select_mask, select_values

__all__ = ["layerwise_scale", "layerwise", "slow_learner", "layer_multipliers",
           "leaf_depths", "scale_by_layer", "DEFAULT_LAYER_INDEX", "DEFAULT_STACKED",
           "DEFAULT_EMBED"]

#: ``layers/3/...``, ``layer_3``, ``blocks.3``, ``h/3`` (0-based index in group 1).
DEFAULT_LAYER_INDEX = r"(?:^|/)(?:layers?|blocks?|h)[/_.]?(\d+)(?:/|$)"
#: Leaves under a ``layers`` container without a numeric child: the stacked (scanned) layout.
DEFAULT_STACKED = r"(?:^|/)layers/(?!\d+(?:/|$))"
#: Token/position embeddings.
DEFAULT_EMBED = r"(?:^|/)(?:embed|embeddings?|wte|wpe|tok_embeddings|pos_embed)(?:/|$)"


def scale_by_layer(multipliers) -> optax.GradientTransformation:
    """Multiply slice ``i`` (axis 0) of every update by ``multipliers[i]`` (stateless).

    Raises ValueError at update time when an update's axis 0 does not have
    ``len(multipliers)`` entries.
    """
    m = np.asarray(multipliers, np.float32).reshape(-1)

    def update_fn(updates, state, params=None):
        del params

        def one(u):
            if u.ndim < 1 or u.shape[0] != m.shape[0]:
                raise ValueError(f"scale_by_layer: an update of shape {tuple(u.shape)} has no "
                                 f"layer axis 0 of length {m.shape[0]}")
            return (u * jnp.asarray(m).reshape((-1,) + (1,) * (u.ndim - 1))).astype(u.dtype)

        return jax.tree.map(one, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _compile(rx, name):
    if rx is None:
        return None
    try:
        r = re.compile(rx)
    except (re.error, TypeError) as e:
        raise ValueError(f"{name}={rx!r} is not a valid regex: {e}") from None
    if name == "layer_index" and r.groups < 1:
        raise ValueError(f"layer_index={rx!r} needs one capturing group for the layer index")
    return r


def leaf_depths(tree, num_layers: Optional[int], *, depth=None,
                layer_index: Optional[str] = DEFAULT_LAYER_INDEX,
                stacked: Optional[str] = DEFAULT_STACKED, embed: Optional[str] = DEFAULT_EMBED):
    """Per-leaf depth: an int in ``[0, L + 1]`` or the string ``'stacked'`` (rules in the module
    docstring). ``num_layers=None`` (no LLRD) gives every leaf depth 0 except stacked ones.

    Raises ValueError for a depth out of range, a per-layer index >= L, or a stacked leaf whose
    axis 0 is not L.
    """
    L = num_layers
    overrides = (select_values(depth, tree, argname="depth", allow_empty=True)
                 if depth is not None else None)
    rx_idx = _compile(layer_index, "layer_index")
    rx_stk = _compile(stacked, "stacked")
    rx_emb = _compile(embed, "embed")
    flat, treedef = flatten_with_paths(tree)
    over = treedef.flatten_up_to(overrides) if overrides is not None else [None] * len(flat)
    out = []
    for (s, leaf), d in zip(flat, over):
        if d is not None:
            if isinstance(d, bool) or not isinstance(d, numbers.Integral) or \
                    (L is not None and not 0 <= d <= L + 1):
                raise ValueError(f"depth for leaf {s} must be an int in [0, {L}+1]; got {d!r}")
            out.append(int(d))
            continue
        m = rx_idx.search(s) if rx_idx is not None else None
        if m is not None:
            i = int(m.group(1))
            if L is not None and i >= L:
                raise ValueError(f"leaf {s} has layer index {i} but num_layers={L}")
            out.append(i + 1 if L is not None else 0)
        elif rx_stk is not None and rx_stk.search(s):
            shape = np.shape(leaf)
            if L is not None and (len(shape) < 1 or shape[0] != L):
                raise ValueError(f"stacked leaf {s} has shape {shape}; its axis 0 must be the "
                                 f"{L} layers (num_layers)")
            out.append("stacked")
        elif rx_emb is not None and rx_emb.search(s):
            out.append(0)
        else:
            out.append(L + 1 if L is not None else 0)
    return jax.tree_util.tree_unflatten(treedef, out)


class _Config:
    """Validated settings shared by the label function and the multipliers."""

    def __init__(self, decay, num_layers, slow, fast, slow_scale, depth, layer_index, stacked,
                 embed):
        self.decay = check_fraction("decay", decay, open_left=True)
        if num_layers is None:
            if self.decay != 1.0:
                raise ValueError(f"num_layers is needed for layer-wise decay (decay={decay!r})")
        else:
            check_int("num_layers", num_layers, 1)
        self.L = None if num_layers is None else int(num_layers)
        self.slow_scale = check_fraction("slow_scale", slow_scale)
        if slow is not None and fast is not None:
            raise ValueError("give either slow= (the slow leaves) or fast= (every other leaf is "
                             "slow), not both")
        if self.slow_scale != 1.0 and slow is None and fast is None:
            raise ValueError(f"slow_scale={slow_scale!r} needs slow= or fast= to say which leaves "
                             "are slow")
        self.slow, self.fast = slow, fast
        self.kw = dict(depth=depth, layer_index=layer_index, stacked=stacked, embed=embed)
        for name in ("layer_index", "stacked", "embed"):
            _compile(self.kw[name], name)

    def slow_mask(self, tree):
        if self.slow is not None:
            return select_mask(self.slow, tree, argname="slow")
        if self.fast is not None:
            fast = select_mask(self.fast, tree, argname="fast")
            return jax.tree.map(lambda b: not b, fast)
        return jax.tree.map(lambda _: False, tree)

    def labels(self, tree):
        depths = leaf_depths(tree, self.L, **self.kw)
        slow = self.slow_mask(tree)
        def label(d, s):
            return (d if d == "stacked" else f"d{d}") + ("/slow" if s else "")

        return jax.tree.map(label, depths, slow)

    def scalar(self, d, slow):
        m = 1.0 if self.L is None else self.decay ** (self.L + 1 - d)
        return m * (self.slow_scale if slow else 1.0)

    def vector(self, slow):
        L = self.L
        m = np.ones(1) if L is None else self.decay ** (L - np.arange(L, dtype=np.float64))
        return m * (self.slow_scale if slow else 1.0)

    def transforms(self):
        out = {}
        depths = range(self.L + 2) if self.L is not None else [0]
        for slow in (False, True):
            suffix = "/slow" if slow else ""
            for d in depths:
                out[f"d{d}{suffix}"] = optax.scale(self.scalar(d, slow))
            out["stacked" + suffix] = (scale_by_layer(self.vector(slow)) if self.L is not None
                                       else optax.scale(self.scalar(0, slow)))
        return out


def layerwise_scale(decay: float = 1.0, num_layers: Optional[int] = None, *,
                    slow: Selector = None, fast: Selector = None, slow_scale: float = 1.0,
                    depth: Any = None, layer_index: Optional[str] = DEFAULT_LAYER_INDEX,
                    stacked: Optional[str] = DEFAULT_STACKED,
                    embed: Optional[str] = DEFAULT_EMBED) -> optax.GradientTransformation:
    """Scale each leaf's updates by ``decay^(L + 1 - l)`` (LLRD) times ``slow_scale`` on slow
    leaves (SLCA); stacked ``[L, ...]`` leaves are scaled per slice along axis 0.

    Papers: "ELECTRA" (Clark et al., 2020) for LLRD; "SLCA: Slow Learner with Classifier
    Alignment for Continual Learning on a Pre-trained Model" (Zhang et al., 2023).

    Args:
      decay: LLRD factor in (0, 1] (default 1 = no decay).
      num_layers: L, the number of blocks (required when ``decay != 1``).
      slow: selector of the slow leaves (SLCA's representation layers); default none.
      fast: alternatively, selector of the fast leaves (e.g. ``r"(^|/)head$"``): all others slow.
      slow_scale: multiplier of slow leaves in [0, 1] (default 1; SLCA uses 0.01; 0 freezes).
      depth, layer_index, stacked, embed: depth rules (module docstring); pass ``None`` to
        disable a rule.

    Raises:
      ValueError / TypeError naming the argument: decay or slow_scale out of range, missing or
      bad num_layers, both slow and fast, slow_scale without slow/fast, bad regexes; at init, a stacked leaf whose axis 0 is
      not L, a per-layer index >= L, a selector that matches nothing.
    """
    cfg = _Config(decay, num_layers, slow, fast, slow_scale, depth, layer_index, stacked, embed)
    return optax.multi_transform(cfg.transforms(), cfg.labels)


def layer_multipliers(tree, decay: float = 1.0, num_layers: Optional[int] = None, **kw):
    """The multiplier :func:`layerwise_scale` applies to each leaf: a float, or a float64
    ``[L]`` array for stacked leaves (slice ``i`` is layer ``i + 1``). Same arguments."""
    cfg = _Config(decay, num_layers, kw.pop("slow", None), kw.pop("fast", None),
                  kw.pop("slow_scale", 1.0), kw.pop("depth", None),
                  kw.pop("layer_index", DEFAULT_LAYER_INDEX), kw.pop("stacked", DEFAULT_STACKED),
                  kw.pop("embed", DEFAULT_EMBED))
    if kw:
        raise TypeError(f"layer_multipliers got unexpected arguments {sorted(kw)}")
    depths = leaf_depths(tree, cfg.L, **cfg.kw)
    slow = cfg.slow_mask(tree)
    return jax.tree.map(lambda d, s: cfg.vector(s) if d == "stacked" and cfg.L is not None
                        else cfg.scalar(0 if d == "stacked" else d, s), depths, slow)


def layerwise(tx: optax.GradientTransformation, decay: float = 1.0,
              num_layers: Optional[int] = None, **kw) -> optax.GradientTransformation:
    """``optax.chain(tx, layerwise_scale(decay, num_layers, **kw))``: ``tx`` with per-layer
    learning rates ``lr_l = lr * decay^(L + 1 - l)`` (and SLCA's ``slow_scale``). Raises what
    :func:`layerwise_scale` raises, and TypeError for a ``tx`` that is not an optax
    transformation."""
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(f"tx must be an optax.GradientTransformation; got {type(tx).__name__}")
    return optax.chain(tx, layerwise_scale(decay, num_layers, **kw))


def slow_learner(tx: optax.GradientTransformation, slow_scale: float = 0.01, *,
                 fast: Selector = r"(?:^|/)(?:head|classifier|lm_head)(?:/|$)"
                 ) -> optax.GradientTransformation:
    """SLCA slow learner: every leaf except the ``fast`` ones (default: the output head) learns
    at ``slow_scale`` times the rate of ``tx`` (default 0.01, the paper's 1e-4 vs 1e-2).

    Paper: "SLCA" (Zhang et al., 2023). Raises what :func:`layerwise_scale` raises."""
    return layerwise(tx, 1.0, None, fast=fast, slow_scale=slow_scale)
