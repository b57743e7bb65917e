"""Soft-prompt tuning, and PVP's pre-trained prompt initialisation.

Prompt tuning ("The Power of Scale for Parameter-Efficient Prompt Tuning", Lester et al., 2021;
"Visual Prompt Tuning", Jia et al., 2022) trains ``P`` vectors prepended to the input of the first
layer of a frozen model, and nothing of the model::

    x' = [p_1; ...; p_P; x_1; ...; x_L]            x' [B, P+L, D],  prompts [P, D]
    mask' = [1, ..., 1, m_1, ..., m_L]             prompts are real tokens, padding stays padding

PVP ("PVP: Pre-trained Visual Parameter-Efficient Tuning", 2023) finds that prompt tuning is
poor with little target data mainly because of the random initialisation, and pre-trains the
prompt module on a source task first: ``p_target(0) = p_source(T)`` (:func:`init_prompts` with
``source=``); the target task's head is new.

Where the prompts go is the model's first-layer input, which both reference models expose
(``jaxeff.models.bert.embed`` / ``encode``, ``jaxeff.models.llama.embed`` / ``forward_embeds``):

* BERT (VPT's placement, which PVP uses): after the embedding layer, so the prompts carry no
  position embedding and the text keeps its pre-trained positions ``0..L-1``; the mask is
  extended (padding keys stay masked); pool the text states with :func:`strip_prompts`.
* LLaMA (Lester et al.'s placement): the prompts are the first ``P`` input embeddings; positions
  become ``0..P-1`` for the prompts and ``pos + P`` for the text (RoPE only sees differences, so
  the text's attention among itself is unchanged), and the prompts take their row's segment id
  (rows hold one document each; padding, segment 0, may sit anywhere).

Example (BERT, a frozen ``params``)::

    prompts = init_prompts(key, 8, cfg.d_model)                  # trainable [8, D]
    x = prepend_prompts(prompts, bert.embed(params, ids, cfg), mask)
    h = strip_prompts(bert.encode(params, x.x, cfg, x.mask), 8)  # [B, L, D], text tokens only
    # grads: jax.grad(loss)(prompts, ...) -- the backbone is a constant, it gets no gradient

With ``P = 0`` every function is the identity: the plain model.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxeff._checks import check_float, check_float_dtype, check_int, check_key, is_traced
from jaxeff.params._structured import normal

__all__ = ["init_prompts", "prepend_prompts", "Prompted", "strip_prompts"]


class Prompted(NamedTuple):
    """What :func:`prepend_prompts` returns: the prompted inputs (``T = P + L``); a field is
    ``None`` where its input was ``None``."""

    x: jax.Array                          # [B, T, D]
    mask: Optional[jax.Array]             # [B, T], prompts 1
    segment_ids: Optional[jax.Array]      # [B, T], prompts = the row's segment id
    positions: Optional[jax.Array]        # [B, T], prompts 0..P-1, text pos + P


def init_prompts(key, n_prompts: int, d_model: int, *, std: float = 0.02, source=None,
                 dtype=jnp.float32) -> jax.Array:
    """``P`` soft prompts ``[P, D]``: ``p ~ N(0, std^2)`` (random), or PVP's initialisation from
    prompts pre-trained on a source task (``source``).

    Args:
      key: a ``jax.random`` key or int seed for the random init; must be None with ``source``.
      n_prompts: P >= 0 (0: no prompts, the plain model).
      d_model: D >= 1, the width of the model's first-layer input.
      std: the random init's standard deviation (> 0; default 0.02, the reference models' init).
      source: pre-trained prompts ``[P, D]`` (PVP); returned as a new array of ``dtype``.
      dtype: a floating dtype (default float32).
    Raises TypeError/ValueError naming the argument: a key given with ``source`` or missing
    without it, a ``source`` of another shape or not floating/finite, a bad P, D, std or dtype.
    """
    n_prompts = check_int("n_prompts", n_prompts, 0)
    d_model = check_int("d_model", d_model, 1)
    std = check_float("std", std, 0.0, min_open=True)
    dtype = check_float_dtype("dtype", dtype, allow_none=False)
    if source is None:
        if key is None:
            raise TypeError("key must be a jax.random key or int seed for the random init "
                            "(or pass source= for PVP's pre-trained init)")
        key = check_key("key", key)
        return (std * normal(key, (n_prompts, d_model), jnp.float32)).astype(dtype)
    if key is not None:
        raise TypeError(f"key must be None when source is given (PVP init copies source, no "
                        f"randomness); got {key!r:.60}")
    src = jnp.asarray(source)
    if src.shape != (n_prompts, d_model):
        raise ValueError(f"source must have shape (n_prompts, d_model) = {(n_prompts, d_model)}; "
                         f"got {src.shape}")
    if not jnp.issubdtype(src.dtype, jnp.floating):
        raise TypeError(f"source must be floating point; got dtype {src.dtype}")
    if not is_traced(src) and not bool(jnp.all(jnp.isfinite(src))):
        raise ValueError("source holds non-finite values (NaN/inf): the source prompts diverged")
    return jnp.array(src, dtype)


def _check_prompts(prompts_PxD, d_model=None):
    p = jnp.asarray(prompts_PxD)
    if p.ndim != 2 or (d_model is not None and p.shape[1] != d_model):
        want = "[n_prompts, d_model]" if d_model is None else f"[n_prompts, {d_model}]"
        raise ValueError(f"prompts_PxD must be {want}; got shape {p.shape}")
    return p


def _check_bxl(name, a, shape):
    if a is not None and tuple(jnp.shape(a)) != tuple(shape):
        raise ValueError(f"{name} must have shape [batch, length] = {tuple(shape)}; got "
                         f"{tuple(jnp.shape(a))}")


def prepend_prompts(prompts_PxD, x_BxLxD, mask_BxL=None, *, segment_ids_BxL=None,
                    positions_BxL=None) -> Prompted:
    """Prepend ``P`` prompts to every row of the first-layer input (see the module docstring).

    ``x' = [prompts; x]`` (prompts cast to ``x``'s dtype: their gradient comes back in theirs);
    ``mask' = [1]*P ++ mask``; ``segment_ids' = [max_t seg_t]*P ++ seg`` (one document per row, so
    the row's id; an all-padding row gets padding prompts); ``positions' = [0..P-1] ++ (pos + P)``.
    Arguments left ``None`` come back ``None`` (a model's default: all real / one segment /
    ``0..T-1``, which is exactly the prompted default).

    Raises ValueError for a non-2-D ``prompts_PxD``, an ``x_BxLxD`` that is not [B, L, D] with
    the prompts' D, or a mask / segment ids / positions not [B, L].
    """
    x = jnp.asarray(x_BxLxD)
    if x.ndim != 3:
        raise ValueError(f"x_BxLxD must be [batch, length, d_model]; got shape {x.shape}")
    p = _check_prompts(prompts_PxD, x.shape[-1])
    B, L, _ = x.shape
    P = p.shape[0]
    for name, a in (("mask_BxL", mask_BxL), ("segment_ids_BxL", segment_ids_BxL),
                    ("positions_BxL", positions_BxL)):
        _check_bxl(name, a, (B, L))
    x = jnp.concatenate([jnp.broadcast_to(p.astype(x.dtype)[None], (B, P, x.shape[-1])), x], 1)
    mask = seg = pos = None
    if mask_BxL is not None:
        m = jnp.asarray(mask_BxL)
        mask = jnp.concatenate([jnp.ones((B, P), m.dtype), m], axis=1)
    if segment_ids_BxL is not None:
        s = jnp.asarray(segment_ids_BxL)
        seg = jnp.concatenate([jnp.broadcast_to(jnp.max(s, axis=1, keepdims=True), (B, P)), s], 1)
    if positions_BxL is not None:
        q = jnp.asarray(positions_BxL)
        head = jnp.broadcast_to(jnp.arange(P, dtype=q.dtype), (B, P))
        pos = jnp.concatenate([head, q + jnp.asarray(P, q.dtype)], axis=1)
    return Prompted(x, mask, seg, pos)


def strip_prompts(h_BxTxD, n_prompts: int) -> jax.Array:
    """The text positions ``h[:, P:]`` of a prompted model's output ``[B, P+L, ...]``.

    Raises ValueError for an output with fewer than 2 axes or shorter than ``n_prompts``, and
    TypeError/ValueError for a bad ``n_prompts``.
    """
    n_prompts = check_int("n_prompts", n_prompts, 0)
    h = jnp.asarray(h_BxTxD)
    if h.ndim < 2 or h.shape[1] < n_prompts:
        raise ValueError(f"h_BxTxD must be [batch, n_prompts + length, ...] with at least "
                         f"n_prompts={n_prompts} positions; got shape {h.shape}")
    return h[:, n_prompts:]

