"""Prepacking: bin-pack prompts of varying lengths into a few rows for one prefill pass.

Paper: "Prepacking: A Simple Method for Fast Prefilling and Increased Throughput in Large
Language Models" (Zhao et al., 2024; reference code siyan-zhao/prepacking). Padding a batch of
prompts to the longest one spends ``B * P_max - sum_b n_b`` token-forwards on padding; prepacking
instead places the prompts (lengths ``n_b``) into ``R`` rows of ``L`` columns, each prompt a
contiguous segment with positions restarting at 0, so the prefill costs ``R * L`` token-forwards
(``>= sum_b n_b``) and a segment-masked attention keeps every prompt independent
(``jaxeff.models.llama``: token i sees j iff ``seg_i == seg_j`` and ``j <= i``)::

    order      = prompts by decreasing length (ties: input order)
    plan       = Grain's first-fit (or best-fit) packer with one bin per prompt over that order
                 = first-fit-decreasing (best-fit-decreasing) bin packing into bins of L
    row b, start b: prompt b occupies tokens_RxL[row_B[b], start_B[b] : start_B[b] + n_b]

The packing algorithm is Grain's (``grain.experimental.FirstFitPackIterDataset`` /
``BestFitPackIterDataset``, the packers ``jaxeff.data.pack_lm`` uses for training rows): with as
many bins as prompts no prompt is ever turned away, so Grain's first fit over the sorted prompts
is exactly first-fit-decreasing. The reference uses ``binpacking.to_constant_volume`` with the
longest prompt as the bin size, which is our default ``row_len``.

:func:`jaxeff.models.prefill_packed` runs the rows once and gathers each prompt's keys, values
and last-token logits into the left-padded cache layout of ``jaxeff.models.prefill``;
``jaxeff.models.generate(..., prepack=True)`` uses it.

Deviation: the reference prefills each prompt without its last token and feeds that token as the
first decode step (to fit Hugging Face's ``generate``); here the packed pass reads every prompt's
last-token logits directly, which is the same computation.

Shape letters: R packed rows, L row length, B prompts.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import grain
import numpy as np

from jaxeff._checks import check_choice, check_int

__all__ = ["PackedPrompts", "pack_prompts", "PROMPT_PACKINGS"]

PROMPT_PACKINGS = ("first_fit", "best_fit")
_PACKERS = {"first_fit": grain.experimental.FirstFitPackIterDataset,
            "best_fit": grain.experimental.BestFitPackIterDataset}


class PackedPrompts(NamedTuple):
    """Packed prompt rows and the plan that places each prompt (host NumPy arrays)."""

    tokens_RxL: np.ndarray       # int32: prompt tokens, pad_id in padding
    segment_ids_RxL: np.ndarray  # int32: 1, 2, ... per prompt within its row; 0 = padding
    positions_RxL: np.ndarray    # int32: 0 .. n_b - 1 within each prompt; 0 in padding
    row_B: np.ndarray            # int32: the row holding prompt b
    start_B: np.ndarray          # int32: the column of prompt b's first token
    length_B: np.ndarray         # int32: n_b, the tokens of prompt b


def _prompt_rows(prompts) -> list[np.ndarray]:
    if isinstance(prompts, (list, tuple)):
        rows = [np.asarray(r) for r in prompts]
    else:
        arr = np.asarray(prompts)
        if arr.ndim != 2:
            raise ValueError(f"prompts must be a list of token sequences or an int [B, P] array; "
                             f"got an array of shape {arr.shape}")
        rows = list(arr)
    if not rows:
        raise ValueError("prompts must hold at least one prompt; got none")
    for b, r in enumerate(rows):
        if r.ndim != 1 or r.size == 0:
            raise ValueError(f"prompts[{b}] must be a non-empty 1-D token sequence; got shape "
                             f"{r.shape}")
        if not np.issubdtype(r.dtype, np.integer):
            raise TypeError(f"prompts[{b}] must hold integer token ids; got dtype {r.dtype}")
        if r.min() < 0:
            raise ValueError(f"prompts[{b}] holds a negative token id ({r.min()})")
    return rows


def pack_prompts(prompts: Sequence, row_len: Optional[int] = None, *,
                 packing: str = "first_fit", pad_id: int = 0) -> PackedPrompts:
    """Bin-pack prompts into rows of ``row_len`` tokens (prepacking; module docstring).

    Prompts go in decreasing length (ties in input order) through Grain's ``packing`` packer with
    one bin per prompt, i.e. first-fit-decreasing (``'first_fit'``) or best-fit-decreasing
    (``'best_fit'``); rows come in the order their bins were opened, segments within a row in
    the order they were placed.

    Args:
      prompts: a non-empty list of non-empty integer token sequences (or an int [B, P] array).
      row_len: L, columns per row (default: the longest prompt, the paper's bin size).
      packing: ``'first_fit'`` (default) or ``'best_fit'``.
      pad_id: id written into the padding cells (default 0; masked out by segment id 0).

    Returns:
      :class:`PackedPrompts`; prompt b is ``tokens_RxL[row_B[b], start_B[b]:][:length_B[b]]``
      (``jaxeff.data.fill_rate({"segment_ids": packed.segment_ids_RxL})``: the fraction of
      cells holding prompt tokens).

    Raises:
      ValueError / TypeError naming the argument: no prompts, an empty or non-integer prompt,
      a negative id, ``row_len`` not a positive int or shorter than the longest prompt
      (``prompts[b]`` named), an unknown ``packing``, a negative ``pad_id``.
    """
    rows = _prompt_rows(prompts)
    check_choice("packing", packing, PROMPT_PACKINGS)
    pad_id = check_int("pad_id", pad_id, 0)
    length_B = np.array([r.size for r in rows], np.int32)
    if row_len is None:
        row_len = int(length_B.max())
    row_len = check_int("row_len", row_len, 1)
    if length_B.max() > row_len:
        b = int(np.argmax(length_B))
        raise ValueError(f"row_len={row_len} is shorter than prompts[{b}] ({length_B[b]} tokens); "
                         f"use row_len >= {length_B.max()} (the default is the longest prompt)")
    order = np.argsort(-length_B, kind="stable")
    elements = [{"tokens": rows[b].astype(np.int32), "index": int(b)} for b in order]
    packer = _PACKERS[packing](grain.MapDataset.source(elements).to_iter_dataset(),
                               length_struct={"tokens": row_len}, num_packing_bins=len(rows),
                               shuffle_bins=False, meta_features=("index",))
    packed = list(packer)
    B = len(rows)
    row_B, start_B = np.zeros(B, np.int32), np.zeros(B, np.int32)
    for r, p in enumerate(packed):
        start = 0
        for b in p["index"]:            # Grain lists a row's prompts in segment order
            row_B[b], start_B[b] = r, start
            start += length_B[b]
    segment_ids_RxL = np.stack([p["tokens_segment_ids"] for p in packed]).astype(np.int32)
    tokens_RxL = np.where(segment_ids_RxL != 0, np.stack([p["tokens"] for p in packed]), pad_id)
    return PackedPrompts(tokens_RxL.astype(np.int32), segment_ids_RxL,
                         np.stack([p["tokens_positions"] for p in packed]).astype(np.int32),
                         row_B, start_B, length_B)
