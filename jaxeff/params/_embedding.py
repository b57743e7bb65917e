"""Embedding surgery for vocabulary extension: append rows for new tokens, initialised at random
or as the mean of their sub-piece embeddings.

A model-agnostic pytree transform (it lives in ``jaxeff.params`` beside ``widen``: it reshapes one
named leaf and knows no model): :func:`extend_embedding` grows the ``[V, D]`` input embedding to
``[V + N, D]`` (and an untied ``[D, V]`` output head to ``[D, V + N]``); rows ``0..V-1`` and every
other leaf are returned unchanged, so the extended model computes exactly the old function on
old ids. With tied input and output embeddings (SmolLM2) the new rows are also the new tokens'
output vectors.

Initialisations of the N new rows (for a new token ``t`` whose old tokenization is the pieces
``p_1 .. p_k``):

* :func:`random_rows`: ``e_t ~ N(0, sigma^2 I)`` with ``sigma`` the standard deviation of all
  entries of the old rows (matched scale);
* :func:`mean_rows`: ``e_t = (1/k) sum_j E[p_j]`` -- the baseline of the BIOptimus paper
  ("BIOptimus: Pre-training an Optimal Biomedical Language Model with Curriculum Learning for
  Named Entity Recognition", Pavlova & Makhlouf, 2023) and of the localized medical BERT's
  amplified vocabulary ("Pre-training technique to localize medical BERT and enhance biomedical
  BERT", Wada et al., 2024);
* contextualized weight distillation (BIOptimus) needs the model's forward pass:
  ``jaxeff.models.distill_new_rows``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff._checks import check_int, check_key
from jaxeff.select import flatten_with_paths

__all__ = ["extend_embedding", "random_rows", "mean_rows"]


def _matrix(name, x, ndim=2):
    if not hasattr(x, "shape") or len(x.shape) != ndim:
        raise ValueError(f"{name} must be a {ndim}-d array; got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point; got dtype {x.dtype}")
    return x


def random_rows(key, embed_VxD, n: int) -> jax.Array:
    """``[n, D]`` rows ``sigma * z``, ``z ~ N(0, I)``, ``sigma = std(embed_VxD)`` over all entries
    (the old rows' scale), in the embedding's dtype.

    Raises TypeError for a bad key or a non-float embedding; ValueError for a non-2-d embedding
    or ``n < 1``.
    """
    key = check_key("key", key)
    embed_VxD = _matrix("embed_VxD", embed_VxD)
    n = check_int("n", n, 1)
    sigma = jnp.std(embed_VxD.astype(jnp.float32))
    z_NxD = jax.random.normal(key, (n, embed_VxD.shape[1]), jnp.float32)
    return (sigma * z_NxD).astype(embed_VxD.dtype)


def mean_rows(embed_VxD, pieces: Sequence[Sequence[int]]) -> jax.Array:
    """``[N, D]``: row ``i`` is the mean of ``embed_VxD[pieces[i]]`` (a new token's sub-piece
    embeddings, ``e_t = (1/k) sum_j E[p_j]``), computed in float32, in the embedding's dtype.

    Raises ValueError for an empty ``pieces`` or an empty piece list, an id outside
    ``[0, V)``; TypeError for non-integer ids or a non-float embedding.
    """
    embed_VxD = _matrix("embed_VxD", embed_VxD)
    V = embed_VxD.shape[0]
    if isinstance(pieces, (str, bytes)) or not len(pieces):
        raise ValueError(f"pieces must be a non-empty sequence of id sequences; got {pieces!r}")
    ids, seg = [], []
    for i, p in enumerate(pieces):
        arr = np.asarray(p)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"pieces[{i}] must be a non-empty 1-d sequence of ids; got {p!r}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"pieces[{i}] must hold integer ids; got dtype {arr.dtype}")
        if (arr < 0).any() or (arr >= V).any():
            raise ValueError(f"pieces[{i}]={arr.tolist()} has ids outside [0, {V}) (the "
                             "embedding's rows)")
        ids.append(arr)
        seg.append(np.full(arr.size, i))
    ids, seg = np.concatenate(ids), np.concatenate(seg)
    rows = embed_VxD[ids].astype(jnp.float32)
    sums_NxD = jax.ops.segment_sum(rows, seg, num_segments=len(pieces))
    counts_N = np.bincount(seg, minlength=len(pieces)).astype(np.float32)
    return (sums_NxD / counts_N[:, None]).astype(embed_VxD.dtype)


def _replace_leaf(params, path, fn, argname):
    flat, treedef = flatten_with_paths(params)
    found = [p for p, _ in flat]
    if path not in found:
        raise ValueError(f"{argname}={path!r} is not a leaf path of params; paths: "
                         f"{found[:12]}{' ...' if len(found) > 12 else ''}")
    return jax.tree.unflatten(treedef, [fn(x) if p == path else x for p, x in flat])


def extend_embedding(params, new_rows_NxD, *, embed: str = "embed", head: Optional[str] = None,
                     head_rows_NxD=None):
    """``params`` with ``N`` rows appended to the ``[V, D]`` embedding at path ``embed`` (and,
    for an untied output head ``[D, V]`` at path ``head``, ``N`` columns ``head_rows_NxD.T``,
    default ``new_rows_NxD``). Rows ``0..V-1`` and every other leaf are unchanged::

        E' = [E; R]  (V+N x D)        W' = [W, R_head^T]  (D x V+N)

    Paths are ``/``-joined key paths (``jaxeff.select.paths``); for ``jaxeff.models.llama``
    params the defaults fit a tied model (SmolLM2); pass ``head="head"`` when untied. Remember to
    grow the model's config too (``cfg.replace(vocab_size=V + N)``).

    Raises:
      ValueError: a path that is not a leaf; an embedding that is not 2-d; rows whose width is not
        ``D``; a head whose shape is not ``[D, V]``.
      TypeError: rows or embedding that are not floating point.
    """
    new_rows_NxD = _matrix("new_rows_NxD", jnp.asarray(new_rows_NxD))
    head_rows_NxD = new_rows_NxD if head_rows_NxD is None else _matrix(
        "head_rows_NxD", jnp.asarray(head_rows_NxD))
    shape = {}

    def grow_rows(e_VxD):
        e_VxD = _matrix(f"the leaf embed={embed!r}", e_VxD)
        if new_rows_NxD.shape[1] != e_VxD.shape[1]:
            raise ValueError(f"new_rows_NxD has width {new_rows_NxD.shape[1]} but the embedding "
                             f"{embed!r} is {tuple(e_VxD.shape)} ([V, D])")
        shape["V"] = e_VxD.shape[0]
        return jnp.concatenate([e_VxD, new_rows_NxD.astype(e_VxD.dtype)], axis=0)

    out = _replace_leaf(params, embed, grow_rows, "embed")
    if head is None:
        return out

    def grow_cols(w_DxV):
        w_DxV = _matrix(f"the leaf head={head!r}", w_DxV)
        D, V = new_rows_NxD.shape[1], shape["V"]
        if tuple(w_DxV.shape) != (D, V):
            raise ValueError(f"head {head!r} has shape {tuple(w_DxV.shape)}; expected [D, V] = "
                             f"{(D, V)} to match the embedding")
        if head_rows_NxD.shape != new_rows_NxD.shape:
            raise ValueError(f"head_rows_NxD has shape {tuple(head_rows_NxD.shape)}; expected "
                             f"{tuple(new_rows_NxD.shape)} (one column per new row)")
        return jnp.concatenate([w_DxV, head_rows_NxD.T.astype(w_DxV.dtype)], axis=1)

    return _replace_leaf(out, head, grow_cols, "head")
