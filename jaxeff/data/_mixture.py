"""Mixture schedules: domain weights as a function of training progress, as Grain selection maps.

"Does your data spark joy? Performance gains from domain upsampling at the end of training"
(Blakeney et al., 2024) trains on a natural mixture and upsamples chosen domains over the last
10-20% of training. Grain's ``MapDataset.mix`` interleaves with *fixed* proportions, so the
schedule lives here as a pure, picklable index map (a ``grain.transforms.DatasetSelectionMap``)::

    i  ->  (domain d, index k within domain d)

built from prefix counts, so it depends only on ``i`` (resume at any step is trivial and no
domain element is skipped or repeated: the elements of domain ``d`` are visited as
``k = 0, 1, 2, ...`` in order).

Construction (:class:`MixtureSchedule`): items are grouped in blocks of ``K = block_size``.
Block ``b`` (items ``[bK, (b+1)K)``) gets the weights ``w(p_b)`` at progress
``p_b = bK / total`` and exact per-domain counts ``c_{b,d}`` (largest-remainder apportionment of
``K w_d + e_d``, where ``e_d`` carries the rounding error of earlier blocks, so small weights are
honoured on average; a domain whose weight is 0 gets nothing and its carry is reset), so a
weight change takes effect at the first block starting at or after it. The ``K`` slots of a
block are a seeded permutation of the domain labels. Then::

    domain(i) = layout_b[i mod K],   k(i) = sum_{b' < b} c_{b',d} + #{j < i mod K: layout_b[j] = d}

With ``block_size = batch_size`` and rows mixed after packing, every batch has exactly the
scheduled composition and weight changes land on step boundaries.

Two Grain stages consume a selection map:
  * :func:`mix_map_datasets` -- ``MapDataset.select_from_datasets`` (document level, random access).
  * :class:`SelectIterDataset` -- sequential parents (e.g. per-domain *packed* streams); the
    state holds the global index, per-parent cursors and each parent's own state.
:class:`PhaseMap` (``i -> (phase, i - start)``) switches between pipelines at fixed element
counts; MeCo's cooldown and multigrid shape schedules use it with :class:`SelectIterDataset`.
"""
from __future__ import annotations

import math
import sys
import threading
from typing import Callable, Sequence

import grain
import numpy as np

from jaxeff._checks import check_fraction, check_int
from jaxeff.data._corpus import as_document
from jaxeff.data._pipeline import EncodeDocument, _source, pack_lm

__all__ = ["MixtureSchedule", "PhaseMap", "SelectIterDataset", "mix_map_datasets",
           "constant_mixture", "upsample_at_end", "check_weights",
           "make_mixture_lm_dataset", "size_weights"]


def check_weights(name: str, weights, num: int | None = None) -> np.ndarray:
    """Validate domain weights: finite, >= 0, summing to a positive value; returns them normalised.

    Raises:
      ValueError: wrong length, a negative / non-finite entry, or a non-positive sum.
    """
    try:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a sequence of numbers; got {weights!r}") from e
    if num is not None and w.shape[0] != num:
        raise ValueError(f"{name} must have {num} entries (one per domain); got {w.shape[0]}: "
                         f"{weights!r}")
    if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"{name} must be finite, >= 0 and sum to a positive value; got "
                         f"{weights!r}")
    return w / w.sum()




def _apportion(desired: np.ndarray, allowed: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total``, proportional to ``desired`` over ``allowed``
    (largest remainder; ties go to the lower domain index)."""
    a = np.where(allowed, np.maximum(desired, 0.0), 0.0)
    if a.sum() <= 0:
        a = allowed.astype(np.float64)
    q = a * (total / a.sum())
    c = np.floor(q).astype(np.int64)
    rem = total - int(c.sum())
    if rem > 0:
        frac = np.where(allowed, q - c, -1.0)
        order = np.argsort(-frac, kind="stable")
        c[order[:rem]] += 1
    return c


class MixtureSchedule(grain.transforms.DatasetSelectionMap):
    """Pure index map ``i -> (domain, index in domain)`` following a weight schedule.

    See the module docstring for the construction (blocks, carried rounding error, prefix
    counts). Weights are normalised to sum to 1.

    Args:
      weights: one of
        * a sequence of D non-negative weights (constant mixture);
        * a list of phases ``[(start_fraction, weights), ...]`` with increasing starts, the
          first at 0.0 (piecewise constant; a phase lasts until the next start, the last one
          forever);
        * a callable ``progress -> weights`` (progress = item / total, may exceed 1 after
          ``total``; ``num_domains`` is then required).
      total: the number of items that makes progress 1.0 (e.g. ``steps * batch_size`` rows).
      block_size: K, items per block (default 64; use the batch size for row-level mixing).
      seed: seed of the in-block permutations (default 0).
      length: ``len()`` of the map (default ``total``); ``None``-like infinity via
        ``sys.maxsize``.
      num_domains: D, required with a callable.

    Raises:
      ValueError: weights that are negative / non-finite / do not sum to a positive value,
        phases out of order or outside [0, 1], non-positive ``total`` / ``block_size``.
    """

    def __init__(self, weights, *, total: int, block_size: int = 64, seed: int = 0,
                 length: int | None = None, num_domains: int | None = None):
        self.total = check_int("total", total, 1)
        self.block_size = check_int("block_size", block_size, 1)
        self.seed = check_int("seed", seed, 0)
        self.length = self.total if length is None else check_int("length", length, 1)
        if callable(weights):
            self.num_domains = check_int("num_domains", num_domains, 1)
            self._fn: Callable | None = weights
            self._phases = None
        else:
            self._fn = None
            if (isinstance(weights, Sequence) and len(weights) > 0
                    and isinstance(weights[0], (tuple, list)) and len(weights[0]) == 2
                    and isinstance(weights[0][1], (Sequence, np.ndarray))):
                phases = list(weights)
            else:
                phases = [(0.0, weights)]
            starts = [check_fraction(f"phase start {j}", s) for j, (s, _) in enumerate(phases)]
            if starts[0] != 0.0 or any(b <= a for a, b in zip(starts, starts[1:])):
                raise ValueError(f"phase starts must begin at 0.0 and increase strictly; got "
                                 f"{starts}")
            num = num_domains or len(np.asarray(phases[0][1]).reshape(-1))
            self._phases = [(s, check_weights(f"weights of phase {j}", w, num))
                            for j, (s, (_, w)) in enumerate(zip(starts, phases))]
            self.num_domains = num
        self._counts = np.zeros((0, self.num_domains), np.int64)
        self._cum = np.zeros((1, self.num_domains), np.int64)
        self._carry = np.zeros(self.num_domains)
        self._lock = threading.Lock()
        self._last = None
        self._extend(math.ceil(self.total / self.block_size) + 1)

    def __getstate__(self):  # picklable for Grain workers: the lock is recreated
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- weights ------------------------------------------------------------------------------
    def weights_at(self, progress: float) -> np.ndarray:
        """Normalised domain weights at training ``progress`` (item / total)."""
        if self._fn is not None:
            return check_weights(f"weights({progress:.4f})", self._fn(float(progress)),
                                 self.num_domains)
        w = self._phases[0][1]
        for start, pw in self._phases:
            if progress >= start:
                w = pw
        return w

    def _extend(self, num_blocks: int) -> None:
        if num_blocks <= self._counts.shape[0]:
            return
        with self._lock:  # blocks are appended in order, so the result is deterministic
            self._extend_locked(num_blocks)

    def _extend_locked(self, num_blocks: int) -> None:
        have = self._counts.shape[0]
        if num_blocks <= have:
            return
        # Blocks past the current end are computed in chunks to amortise the work.
        num_blocks = max(num_blocks, 2 * have)
        rows = []
        for b in range(have, num_blocks):
            w = self.weights_at(b * self.block_size / self.total)
            allowed = w > 0
            desired = w * self.block_size + self._carry
            c = _apportion(desired, allowed, self.block_size)
            self._carry = np.where(allowed, desired - c, 0.0)
            rows.append(c)
        counts = np.concatenate([self._counts, np.asarray(rows, np.int64)])
        # _cum first: readers check _counts' length, then index _cum.
        self._cum = np.concatenate([np.zeros((1, self.num_domains), np.int64),
                                    np.cumsum(counts, axis=0)])
        self._counts = counts

    def _layout(self, b: int) -> np.ndarray:
        cached = self._last  # (block, layout); one tuple assignment, so thread-safe
        if cached is not None and cached[0] == b:
            return cached[1]
        labels = np.repeat(np.arange(self.num_domains), self._counts[b])
        layout = np.random.default_rng((self.seed, b)).permutation(labels)
        self._last = (b, layout)
        return layout

    # -- DatasetSelectionMap ----------------------------------------------------------------
    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[int, int]:
        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a schedule of length {self.length}")
        b, o = divmod(index, self.block_size)
        self._extend(b + 1)
        layout = self._layout(b)
        d = int(layout[o])
        return d, int(self._cum[b, d] + np.count_nonzero(layout[:o] == d))

    def lookup(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised ``__getitem__``: arrays of domains and in-domain indices."""
        out = [self[int(i)] for i in np.asarray(indices).reshape(-1)]
        if not out:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        d, k = zip(*out)
        return np.asarray(d), np.asarray(k)

    def __repr__(self) -> str:
        kind = "callable" if self._fn is not None else f"{len(self._phases)} phase(s)"
        return (f"MixtureSchedule({kind}, domains={self.num_domains}, total={self.total}, "
                f"block_size={self.block_size}, seed={self.seed})")


def constant_mixture(weights, *, total: int, block_size: int = 64, seed: int = 0,
                     length: int | None = None) -> MixtureSchedule:
    """A :class:`MixtureSchedule` with constant ``weights`` (see it for args and errors)."""
    return MixtureSchedule(weights, total=total, block_size=block_size, seed=seed, length=length)


def upsample_at_end(base_weights, end_weights, *, total: int, fraction: float = 0.1,
                    block_size: int = 64, seed: int = 0,
                    length: int | None = None) -> MixtureSchedule:
    """Domain upsampling at the end of training (Blakeney et al., 2024, "spark joy").

    ``w(p) = base_weights`` for ``p < 1 - fraction``, ``end_weights`` after (the paper upsamples
    domain data over the last 10-20%; 5-30% tried).

    Args:
      base_weights: weights for the main phase.  end_weights: weights for the final phase.
      total: items that make progress 1.0.  fraction: final-phase fraction in [0, 1]
        (default 0.1; 0 = never, 1 = always ``end_weights``).
      block_size, seed, length: as in :class:`MixtureSchedule`.

    Raises:
      ValueError: ``fraction`` outside [0, 1] or bad weights (see :func:`check_weights`).
    """
    fraction = check_fraction("fraction", fraction)
    base = check_weights("base_weights", base_weights)
    end = check_weights("end_weights", end_weights, base.shape[0])
    if fraction == 0.0:
        phases = [(0.0, base)]
    elif fraction == 1.0:
        phases = [(0.0, end)]
    else:
        phases = [(0.0, base), (1.0 - fraction, end)]
    return MixtureSchedule(phases, total=total, block_size=block_size, seed=seed, length=length)


class PhaseMap(grain.transforms.DatasetSelectionMap):
    """``i -> (phase, i - start_phase)``: switch pipelines at fixed element counts.

    Phase ``j`` covers ``[boundaries[j-1], boundaries[j])`` (phase 0 starts at 0, the last phase
    never ends). Each phase restarts its own pipeline at index 0.

    Args:
      boundaries: strictly increasing ints >= 0 (phase start points after the first).
      length: ``len()`` (default ``sys.maxsize``).

    Raises:
      ValueError: boundaries not increasing ints >= 0.
    """

    def __init__(self, boundaries: Sequence[int], length: int | None = None):
        bounds = [check_int(f"boundaries[{j}]", b, 0) for j, b in enumerate(boundaries)]
        if any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"boundaries must increase strictly; got {list(boundaries)}")
        self.boundaries = tuple(bounds)
        self.length = sys.maxsize if length is None else check_int("length", length, 1)

    def phase(self, index: int) -> int:
        """The phase of element ``index``."""
        return int(np.searchsorted(self.boundaries, index, side="right"))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[int, int]:
        p = self.phase(index)
        return p, int(index) - (self.boundaries[p - 1] if p else 0)

    def __repr__(self) -> str:
        return f"PhaseMap(boundaries={self.boundaries})"


def mix_map_datasets(datasets: Sequence[grain.MapDataset],
                     schedule: grain.transforms.DatasetSelectionMap) -> grain.MapDataset:
    """Document-level scheduled mixture: ``out[i] = datasets[d][k]`` with ``(d, k) = schedule[i]``.

    Index ``k`` wraps modulo ``len(datasets[d])`` for Grain sources (``.shuffle().repeat()``
    the parents for a fresh order every epoch).

    Raises:
      ValueError: no datasets, an empty dataset, or a count mismatch with the schedule.
    """
    _check_parents(datasets, schedule, grain.MapDataset)
    for j, ds in enumerate(datasets):
        if len(ds) == 0:
            raise ValueError(f"datasets[{j}] is empty; every mixture source needs elements")
    return grain.MapDataset.select_from_datasets(list(datasets), schedule)


def _check_parents(parents, selection_map, kind):
    if not isinstance(parents, Sequence) or len(parents) == 0:
        raise ValueError(f"parents must be a non-empty sequence of datasets; got {parents!r}")
    for j, p in enumerate(parents):
        if not isinstance(p, kind):
            raise TypeError(f"parents[{j}] must be a grain.{kind.__name__}; got "
                            f"{type(p).__name__}")
    n = getattr(selection_map, "num_domains", None)
    if n is None and isinstance(selection_map, PhaseMap):
        n = len(selection_map.boundaries) + 1
    if n is not None and n != len(parents):
        raise ValueError(f"the selection map addresses {n} sources but {len(parents)} were given")


class _SelectIterator(grain.DatasetIterator):
    """Sequential parents routed by a selection map; state = index, cursors, parent states."""

    def __init__(self, parents, selection_map):
        super().__init__(parents)
        self._map = selection_map
        self._index = 0
        self._cursors = [0] * len(parents)

    def __next__(self):
        if self._index >= len(self._map):
            raise StopIteration
        d, k = self._map[self._index]
        if k != self._cursors[d]:
            raise RuntimeError(
                f"selection map asks source {d} for element {k} at index {self._index}, but "
                f"that source is sequential and next yields element {self._cursors[d]}; use a "
                "prefix-count map (MixtureSchedule, PhaseMap) with SelectIterDataset")
        elem = next(self._parents[d])  # StopIteration of a finite source ends the mixture
        self._cursors[d] += 1
        self._index += 1
        return elem

    def get_state(self):
        return {"index": self._index, "cursors": list(self._cursors),
                "parents": [p.get_state() for p in self._parents]}

    def set_state(self, state):
        if len(state["parents"]) != len(self._parents):
            raise ValueError(f"state has {len(state['parents'])} parent states; this iterator "
                             f"has {len(self._parents)} sources")
        for p, s in zip(self._parents, state["parents"]):
            p.set_state(s)
        self._index = int(state["index"])
        self._cursors = [int(c) for c in state["cursors"]]

    def __str__(self):
        return f"SelectIterator({len(self._parents)} sources, {self._map!r})"


class SelectIterDataset(grain.IterDataset):
    """Route ``next()`` to sequential parents by a selection map (row-level mixing, phases).

    Element ``i`` is the next element of parent ``d`` where ``(d, k) = selection_map[i]``; ``k``
    must equal the number of earlier elements taken from ``d`` (true for prefix-count maps:
    :class:`MixtureSchedule`, :class:`PhaseMap`), else ``RuntimeError``. The iterator state is
    ``{'index', 'cursors', 'parents'}`` (JSON, so ``grain.checkpoint`` saves it); because the
    map is pure in ``i``, a restored iterator continues in the right phase / mixture.

    Args:
      parents: non-empty sequence of ``grain.IterDataset`` (e.g. per-domain packed streams).
      selection_map: a ``grain.transforms.DatasetSelectionMap``.

    Raises:
      ValueError / TypeError: empty parents, a non-IterDataset parent, or a map that addresses
        a different number of sources.
    """

    def __init__(self, parents: Sequence[grain.IterDataset],
                 selection_map: grain.transforms.DatasetSelectionMap):
        _check_parents(parents, selection_map, grain.IterDataset)
        super().__init__(list(parents))
        self._map = selection_map

    def __iter__(self):
        return _SelectIterator([p.__iter__() for p in self._parents], self._map)

    def __str__(self):
        return f"SelectIterDataset({len(self._parents)} sources, {self._map!r})"


def size_weights(corpora: Sequence) -> np.ndarray:
    """Natural mixture weights: each corpus' share of the total characters.

    Raises:
      ValueError: an empty corpus (names its position).
    """
    sizes = []
    for j, c in enumerate(corpora):
        if len(c) == 0:
            raise ValueError(f"corpora[{j}] is empty; every mixture source needs documents")
        sizes.append(sum(len(as_document(d, f"corpora[{j}] element").text) for d in c))
    return check_weights("corpus sizes", sizes)


def make_mixture_lm_dataset(corpora: Sequence, tokenizer, seq_len: int, batch_size: int,
                            schedule: MixtureSchedule, *, seed: int,
                            num_packing_bins: int = 64, shard=None) -> grain.IterDataset:
    """Packed LM batches whose rows follow a domain ``schedule`` (row-level mixing).

    Per domain ``d``: ``source.shuffle(seed + d).repeat() -> encode -> pack_lm`` gives a stream
    of packed rows; :class:`SelectIterDataset` takes row ``i`` from domain ``schedule[i][0]``;
    rows are batched by ``batch_size``. Use ``schedule.total = steps * batch_size`` and
    ``block_size = batch_size`` so every batch has exactly the scheduled composition. Rows never
    mix domains, each domain keeps its own position (no document skipped or repeated within an
    epoch of that domain), and the state resumes at any step.

    Raises:
      ValueError: empty corpora, a schedule for another number of domains, bad arguments.
    """
    if not isinstance(schedule, MixtureSchedule):
        raise TypeError(f"schedule must be a MixtureSchedule; got {type(schedule).__name__}")
    size_weights(corpora)  # validates non-empty
    streams = []
    for d, corpus in enumerate(corpora):
        ds = _source(corpus, shard).shuffle(seed=seed + d).repeat().map(EncodeDocument(tokenizer))
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=16))
        streams.append(pack_lm(it, seq_len, pad_id=int(tokenizer.pad_id),
                               num_packing_bins=num_packing_bins, seed=seed + d))
    return SelectIterDataset(streams, schedule).batch(batch_size, drop_remainder=True)
