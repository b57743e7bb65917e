"""Curriculum: draw documents easiest first, widening the eligible set by a pacing function.

BIOptimus ("BIOptimus: Pre-training an Optimal Biomedical Language Model with Curriculum
Learning for Named Entity Recognition", Pavlova & Makhlouf, BioNLP 2023) pre-trains with
curriculum learning: easier data first. Its abstract does not fix the difficulty measure or the
pace, so the stage here is the competence-based formulation of "Competence-based Curriculum
Learning for Neural Machine Translation" (Platanios et al., 2019) with a pluggable difficulty:

* difficulty ``d_j`` per document, lower = easier: any 1-D score, e.g. a reference model's loss
  (:func:`jaxeff.data.loss_scores`), a length, a precomputed array. Documents are ranked
  ``order = argsort(d)`` (ties by index).
* competence ``c(p)`` in (0, 1] at progress ``p = i / total`` (``i`` = draw index, ``total`` = the
  draw at which competence reaches 1):

      linear:   c(p) = min(1, c0 + (1 - c0) p)
      root-k:   c(p) = min(1, (c0^k + (1 - c0^k) p)^(1/k))           (k = 2: "square root")
      step-K:   c(p) = c0 + (1 - c0) min(floor(K p), K - 1) / (K - 1)  (K stages; c0 = 1/K
                                                                    gives (floor(K p) + 1) / K)

* draw ``i`` is uniform over the ``n(i) = clip(ceil(c(i / total) N), 1, N)`` easiest documents:
  ``out[i] = docs[order[u_i]]``, ``u_i ~ U{0, ..., n(i) - 1}`` from
  ``np.random.default_rng((seed, i))`` -- with replacement, as Platanios et al. sample batches
  from the eligible set; past ``total`` every document is eligible (uniform sampling).

The draw depends only on ``(i, scores, pacing, seed)``, so the stage is a pure
``grain.transforms.DatasetSelectionMap`` (:class:`CurriculumMap`) under
``MapDataset.select_from_datasets``: random access, and an iterator's state is its position
(``get_state`` / ``set_state``, ``grain.checkpoint``), so resuming equals the uninterrupted run.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import grain
import numpy as np

from jaxeff._checks import check_callable, check_choice, check_float, check_int
from jaxeff.data._pipeline import make_lm_dataset

__all__ = ["Pacing", "linear_pacing", "root_pacing", "step_pacing", "CurriculumMap",
           "curriculum_dataset", "make_curriculum_lm_dataset"]

PACINGS = ("linear", "root", "step")


class Pacing:
    """A competence schedule ``c(progress)`` (module docstring formulas); picklable for Grain.

    Build with :func:`linear_pacing`, :func:`root_pacing` or :func:`step_pacing`. Calling it with
    a number or an array of progress values returns competences in ``[c0, 1]``.
    """

    def __init__(self, kind: str, c0: float, power: float = 2.0, stages: int = 2):
        self.kind = check_choice("kind", kind, PACINGS)
        self.c0 = check_float("c0", c0, 0.0, 1.0, min_open=True)
        self.power = check_float("power", power, 0.0, min_open=True)
        self.stages = check_int("stages", stages, 2)

    def __call__(self, progress):
        p = np.maximum(np.asarray(progress, np.float64), 0.0)
        if self.kind == "linear":
            c = self.c0 + (1.0 - self.c0) * p
        elif self.kind == "root":
            c0k = self.c0 ** self.power
            c = (c0k + (1.0 - c0k) * p) ** (1.0 / self.power)
        else:
            j = np.minimum(np.floor(self.stages * p), self.stages - 1)
            c = self.c0 + (1.0 - self.c0) * j / (self.stages - 1)
        c = np.minimum(c, 1.0)
        return float(c) if c.ndim == 0 else c

    def __repr__(self):
        extra = {"linear": "", "root": f", power={self.power}",
                 "step": f", stages={self.stages}"}[self.kind]
        return f"Pacing({self.kind!r}, c0={self.c0}{extra})"


def linear_pacing(c0: float = 0.1) -> Pacing:
    """``c(p) = min(1, c0 + (1 - c0) p)`` (Platanios et al., 2019). Raises ValueError unless
    ``0 < c0 <= 1``."""
    return Pacing("linear", c0)


def root_pacing(c0: float = 0.1, power: float = 2.0) -> Pacing:
    """``c(p) = min(1, (c0^k + (1 - c0^k) p)^(1/k))`` with ``k = power`` (Platanios et al.,
    2019: k = 2 trains longest on the hardest data). Raises ValueError unless ``0 < c0 <= 1``
    and ``power > 0``."""
    return Pacing("root", c0, power=power)


def step_pacing(stages: int = 4, c0: Optional[float] = None) -> Pacing:
    """``K = stages`` equal stages, competence ``c0 + (1 - c0) j / (K - 1)`` in stage ``j``
    (the "baby steps" of Spitkovsky et al., 2010); ``c0`` defaults to ``1 / K``:
    ``(floor(K p) + 1) / K``.
    Raises ValueError unless ``stages >= 2`` and ``0 < c0 <= 1``."""
    stages = check_int("stages", stages, 2)
    return Pacing("step", 1.0 / stages if c0 is None else c0, stages=stages)


def _difficulty(scores) -> np.ndarray:
    sc = np.asarray(scores, np.float64)
    if sc.ndim != 1 or sc.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array with one difficulty per "
                         f"document; got shape {sc.shape}")
    if not np.isfinite(sc).all():
        raise ValueError(f"scores must be finite; got {int((~np.isfinite(sc)).sum())} NaN/inf "
                         f"of {sc.size}")
    return sc


class CurriculumMap(grain.transforms.DatasetSelectionMap):
    """Pure map ``draw i -> (0, document index)``: uniform over the ``n(i)`` easiest documents.

    Args:
      scores: ``[N]`` difficulties, lower = easier (finite).
      pacing: a :class:`Pacing` or any callable ``progress -> competence in (0, 1]``.
      total: draws at which progress reaches 1 (competence 1 from there on).
      seed: seed of the draws (default 0).
      length: ``len()`` (draws; default ``total``).

    Raises:
      ValueError: bad scores (not 1-D, empty, NaN), non-positive ``total`` / ``length``, a
        pacing value outside (0, 1] (when drawn).  TypeError: a non-callable pacing.
    """

    def __init__(self, scores, pacing: Callable, *, total: int, seed: int = 0,
                 length: Optional[int] = None):
        self.scores = _difficulty(scores)
        self.order = np.lexsort((np.arange(self.scores.size), self.scores))
        self.pacing = check_callable("pacing", pacing, "a pacing function progress -> (0, 1]")
        self.total = check_int("total", total, 1)
        self.seed = check_int("seed", seed, 0)
        self.length = self.total if length is None else check_int("length", length, 1)
        self.num_docs = int(self.scores.size)

    def competence(self, index: int) -> float:
        """``c(index / total)``, checked to lie in (0, 1]."""
        c = self.pacing(index / self.total)
        return check_float(f"pacing({index / self.total:.6g})", c, 0.0, 1.0, min_open=True)

    def eligible(self, index: int) -> int:
        """``n(i) = clip(ceil(c(i / total) N), 1, N)``: how many of the easiest are eligible."""
        n = math.ceil(self.competence(index) * self.num_docs - 1e-9)
        return min(max(n, 1), self.num_docs)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[int, int]:
        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a curriculum of length "
                             f"{self.length}")
        u = int(np.random.default_rng((self.seed, index)).integers(self.eligible(index)))
        return 0, int(self.order[u])

    def __repr__(self):
        return (f"CurriculumMap({self.num_docs} documents, {self.pacing!r}, total={self.total}, "
                f"length={self.length}, seed={self.seed})")


def curriculum_dataset(docs, scores, pacing: Callable, *, total: int, seed: int = 0,
                       length: Optional[int] = None) -> grain.MapDataset:
    """``out[i] = docs[j]`` with ``(0, j) = CurriculumMap(scores, pacing, ...)[i]``.

    Args:
      docs: a ``grain.MapDataset`` or a sequence (e.g. a :class:`jaxeff.data.Corpus`) of the
        N documents that ``scores`` rank.
      scores, pacing, total, seed, length: as :class:`CurriculumMap`.

    Raises:
      ValueError: ``len(scores) != len(docs)``, or what :class:`CurriculumMap` raises.

    Example::

        from jaxeff import data
        ds = data.curriculum_dataset(["hard", "easy", "mid"], [2.0, 0.0, 1.0],
                                     data.step_pacing(3), total=30, length=60)
        assert {ds[i] for i in range(10)} == {"easy"}           # stage 0: the easiest third
        assert {ds[i] for i in range(10, 20)} <= {"easy", "mid"}
    """
    ds = docs if isinstance(docs, grain.MapDataset) else grain.MapDataset.source(docs)
    cmap = CurriculumMap(scores, pacing, total=total, seed=seed, length=length)
    if cmap.num_docs != len(ds):
        raise ValueError(f"scores has {cmap.num_docs} entries but docs has {len(ds)}; one "
                         "difficulty per document")
    return grain.MapDataset.select_from_datasets([ds], cmap)


def make_curriculum_lm_dataset(docs, scores, tokenizer, seq_len: int, batch_size: int,
                               pacing: Callable, *, total: int, seed: int,
                               length: Optional[int] = None, **lm_kwargs) -> grain.IterDataset:
    """Packed LM batches whose documents follow a curriculum: :func:`curriculum_dataset` into
    :func:`jaxeff.data.make_lm_dataset` with ``shuffle=False, repeat=False`` (a shuffle would
    undo the order; the map already draws ``length`` documents). First-fit packing still
    reorders documents within its ``num_packing_bins`` bins.

    Raises:
      ValueError: ``shuffle`` / ``repeat`` in ``lm_kwargs``, or what the two stages raise.
    """
    for k in ("shuffle", "repeat"):
        if k in lm_kwargs:
            raise ValueError(f"make_curriculum_lm_dataset sets {k}=False itself (the curriculum "
                             f"fixes the order and the number of draws); got {k}={lm_kwargs[k]!r}")
    ds = curriculum_dataset(docs, scores, pacing, total=total, seed=seed, length=length)
    return make_lm_dataset(ds, tokenizer, seq_len, batch_size, seed=seed, shuffle=False,
                           repeat=False, **lm_kwargs)
