"""Pre-packed training batches: a Grain pipeline run once, in parallel worker processes, into
arrays that every recipe of a study then reads at memory speed.

Why: ``jaxeff.data.make_lm_dataset`` packs in Python at ~0.6M tokens/s per core (Grain's
per-element packers; ``experiments/bench_pipeline.py``). That is ample for the 2-core CPU studies,
whose model steps are slower, but a GPU study that trains ~2.5B tokens in 9 minutes would spend
over an hour in the pipeline. Grain's own ``mp_prefetch`` parallelises it, but it starts its
worker processes anew for every iterator (~10 s each here), and the GPU study opens ~60.

How: a stream is ``factory(shard, n_local)`` -> a Grain ``IterDataset`` of batches (e.g.
``functools.partial`` of ``make_lm_dataset`` with ``shard=(i, k)``). Worker ``i`` of ``k`` pulls
``n_local = n / k`` batches of its shard (documents ``i::k``); global batch ``g`` is worker
``g % k``'s batch ``g // k`` (round-robin, as Grain's ``mp_prefetch`` interleaves its workers).
``k`` is the largest divisor of ``n`` not above ``max_workers``, so every worker serves the same
number of batches and a per-position schedule inside the stream (MeCo's cooldown at a fraction of
``total_steps = n_local``) switches at the same global step as in one process. The batches are
the same documents, packed the same way, as the single-process pipeline, in another order.

Arrays are stored compactly (token ids as uint16 when they fit, segment ids and positions as
uint16, the 0/1 loss mask as uint8) and cast back to the batch format's int32 / float32 on the
way out; a value that does not survive the compact dtype keeps its original dtype (checked, never
truncated). The iterator raises once its ``n`` batches are used up instead of ending silently.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from typing import Callable, Optional

import numpy as np

OUT_DTYPES = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32,
              "positions": np.int32, "loss_mask": np.float32}
_COMPACT = {"inputs": np.uint16, "targets": np.uint16, "segment_ids": np.uint16,
            "positions": np.uint16, "loss_mask": np.uint8}


def workers_for(n_batches: int, max_workers: int) -> int:
    """The largest divisor of ``n_batches`` that is at most ``max_workers`` (>= 1)."""
    if n_batches < 1 or max_workers < 1:
        raise ValueError(f"n_batches and max_workers must be >= 1; got {n_batches}, {max_workers}")
    return max(k for k in range(1, min(n_batches, max_workers) + 1) if n_batches % k == 0)


def _compact(key: str, x: np.ndarray) -> np.ndarray:
    dt = _COMPACT.get(key)
    if dt is None:
        return x
    y = x.astype(dt)
    return y if np.array_equal(y.astype(x.dtype), x) else x


def _worker_init():
    # workers only run numpy and Grain: keep a JAX import in them off the accelerator
    os.environ["JAX_PLATFORMS"] = "cpu"


def produce_shard(factory: Callable, shard: tuple, n_local: int) -> dict:
    """Worker body: ``n_local`` batches of ``factory(shard, n_local)``, stacked and compacted."""
    it = iter(factory(shard, n_local))
    batches = [next(it) for _ in range(n_local)]
    return {k: _compact(k, np.stack([b[k] for b in batches])) for k in batches[0]}


class PrepackedBatches:
    """Iterator over the ``n`` batches of a pre-packed stream (round-robin over its shards)."""

    def __init__(self, shards: list, n: int, name: str = "prepacked stream"):
        self._shards, self.n, self.name, self._g = shards, n, name, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        g = self._g
        if g >= self.n:
            raise RuntimeError(f"{self.name}: all {self.n} pre-packed batches are used up; "
                               f"pre-pack more (n_batches) for a longer run")
        self._g += 1
        k = len(self._shards)
        shard = self._shards[g % k]
        return {key: arr[g // k].astype(OUT_DTYPES.get(key, arr.dtype)) for key, arr in shard.items()}


class Prepacker:
    """A process pool (spawned once, reused by every stream) and a cache of produced streams.

    ``batches(key, factory, n)`` returns a fresh :class:`PrepackedBatches` over the stream
    ``key``; a cached stream with at least ``n`` batches is reused (its first ``n``), so recipes
    that ask for the same data (same corpus, seed and shape) get identical batches.
    """

    def __init__(self, max_workers: int):
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1; got {max_workers}")
        self.max_workers = max_workers
        self._pool: Optional[concurrent.futures.ProcessPoolExecutor] = None
        self._cache: dict = {}
        self.seconds = 0.0      # wall time training waited for streams

    def _executor(self):
        if self._pool is None:   # spawn: the parent has JAX's threads running; fork is unsafe
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.max_workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init)
        return self._pool

    def _usable(self, key, n: int):
        """The cached (or in-flight) stream ``key`` if its first ``n`` batches are the ``n``-batch
        stream: at least ``n`` batches over the same number of workers (round-robin prefix)."""
        hit = self._cache.get(key)
        if hit is not None and hit[1] >= n and len(hit[0]) == workers_for(n, self.max_workers):
            return hit
        return None

    def prefetch(self, key, factory: Callable, n: int) -> None:
        """Start producing stream ``key`` (``n`` batches) in the background, unless a usable
        one is cached or on its way; :meth:`batches` waits for it."""
        if self._usable(key, n) is not None:
            return
        k = workers_for(n, self.max_workers)
        futures = [self._executor().submit(produce_shard, factory, (i, k), n // k)
                   for i in range(k)]
        self._cache[key] = (futures, n)

    def batches(self, key, factory: Callable, n: int) -> PrepackedBatches:
        """A fresh iterator over the first ``n`` batches of stream ``key`` (produced now, or
        taken from the cache / a :meth:`prefetch`). A factory whose stream depends on its
        length (``n_local``, e.g. MeCo's cooldown) must put ``n`` in ``key``."""
        import time
        self.prefetch(key, factory, n)
        hit = self._cache[key]
        shards, have = hit
        if shards and isinstance(shards[0], concurrent.futures.Future):
            t = time.perf_counter()
            shards = [f.result() for f in shards]
            self.seconds += time.perf_counter() - t
            self._cache[key] = (shards, have)
        return PrepackedBatches(shards, n, str(key))

    def clear(self):
        self._cache.clear()

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
