"""Data-pipeline throughput: tokenize + pack + batch, in tokens/s on one CPU core.

Measures, in one process pinned to one core (``os.sched_setaffinity``), how fast
``jaxeff.data.make_lm_dataset`` turns the default stdlib corpus into packed batches, for
each Grain packer, and the fill rate (non-pad fraction). Compare the tokens/s against what
the model consumes per second (tokens per step / step time) to see whether data loading can
be the bottleneck.

Usage::

    .venv/bin/python experiments/bench_pipeline.py [--seq-len 256] [--batch-size 32]
        [--batches 200] [--packings first_fit,best_fit,concat] [--bins 64]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxeff import data  # noqa: E402  pylint: disable=wrong-import-position


def _time_corpus():
    data.corpus._read_stdlib.cache_clear()  # pylint: disable=protected-access
    t0 = time.perf_counter()
    corpus = data.load_stdlib_corpus("all")
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    fp = data.corpus_fingerprint(corpus)
    t_fp = time.perf_counter() - t0
    return corpus, t_read, t_fp, fp


def _bench(corpus, tok, seq_len, batch_size, n_batches, packing, bins, seed=0):
    ds = data.make_lm_dataset(corpus, tok, seq_len, batch_size, seed=seed, packing=packing,
                              num_packing_bins=bins, shard=(0, 1))
    it = iter(ds)
    warm = [next(it) for _ in range(5)]  # window fill + thread start-up
    del warm
    t0 = time.perf_counter()
    used = 0
    for _ in range(n_batches):
        b = next(it)
        used += int((b["segment_ids"] != 0).sum())
    dt = time.perf_counter() - t0
    slots = n_batches * batch_size * seq_len
    return slots / dt, used / dt, used / slots, dt / n_batches


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--bins", type=int, default=64)
    p.add_argument("--packings", default="first_fit,best_fit,concat")
    p.add_argument("--all-cores", action="store_true", help="do not pin to one core")
    args = p.parse_args(argv)
    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    corpus, t_read, t_fp, fp = _time_corpus()
    tok = data.ByteTokenizer()
    t0 = time.perf_counter()
    n_tok = sum(len(tok.encode(d.text)) + 2 for d in corpus)
    t_tok = time.perf_counter() - t0
    print(f"machine: {platform.machine()} {platform.processor() or ''} "
          f"python {platform.python_version()}, cores used: "
          f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}")
    print(f"corpus: {len(corpus)} docs, {corpus.num_chars / 1e6:.2f} M chars, {n_tok / 1e6:.2f} M "
          f"byte tokens; read {t_read * 1e3:.0f} ms (uncached), fingerprint {t_fp * 1e3:.0f} ms "
          f"({fp[:16]}...)")
    print(f"tokenize only (ByteTokenizer): {n_tok / t_tok / 1e6:.1f} M tokens/s")
    print(f"seq_len={args.seq_len} batch_size={args.batch_size} bins={args.bins} "
          f"batches={args.batches}")
    print(f"{'packing':>10} | {'slots/s':>10} | {'tokens/s':>10} | {'fill':>6} | {'ms/batch':>8}")
    for packing in args.packings.split(","):
        slots_s, used_s, fill, per = _bench(corpus, tok, args.seq_len, args.batch_size,
                                            args.batches, packing, args.bins)
        print(f"{packing:>10} | {slots_s / 1e6:8.2f} M | {used_s / 1e6:8.2f} M | {fill:6.3f} | "
              f"{per * 1e3:8.2f}")


if __name__ == "__main__":
    main()
