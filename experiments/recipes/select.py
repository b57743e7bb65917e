"""Data selection: dedup + target-aware moment matching keeps half the bytes; vs a random half.

Pipeline (no pretrained model; scoring takes seconds):

1. redundancy reduction on the training documents: exact duplicates, then MinHash-LSH near
   duplicates (byte 5-grams, 128 permutations, Jaccard >= 0.8, first 32 KB of each document);
2. cheap embeddings: hashed byte 1-4-gram features (4096 dims) of every document;
3. target-aware score (moment matching, the linear-kernel MMD gradient; see
   ``jaxeff.data.selection``): ``<x_i - mu_train, mu_target - mu_train>`` with the target set =
   the validation documents that ``ctx.eval_batches()`` does NOT use (disjoint from evaluation);
4. keep the best-scored documents up to ``KEEP`` of the pool's bytes (``select_top`` with
   ``sizes``), train the baseline recipe on them for ``ctx.steps`` (the reported history), and
   train the same recipe on random documents with the same number of bytes
   (``extra['random_*']``).

The recipe trains twice, so it costs about two baseline runs plus a few seconds of scoring.
"""

import numpy as np

from experiments.speedrun import Recipe
from jaxeff.data import Corpus
from jaxeff.data import exact_duplicates, near_duplicates
from jaxeff.data import apply_selection, hashed_ngram_features, moment_matching_scores, select_top

KEEP = 0.5


def choose(ctx):
    """The selected corpus, an equal-size random corpus, and a report."""
    pool = ctx.train_corpus
    ex = exact_duplicates(pool)
    pool = apply_selection(pool, ex)
    nd, _ = near_duplicates(pool, threshold=0.8, max_bytes=32768)
    dup_names = [pool[int(i)].meta["module"] for i in nd.dropped]
    pool = apply_selection(pool, nd)
    eval_ids = {d.meta["id"] for d in list(ctx.val_corpus)[::4]}  # what eval_batches() uses
    target = [d for d in ctx.val_corpus if d.meta["id"] not in eval_ids]
    feats = hashed_ngram_features(list(pool) + target)
    scores = moment_matching_scores(feats[:len(pool)], feats[len(pool):])
    sizes = np.array([len(d.text.encode("utf-8")) for d in pool])
    sel = select_top(scores, keep_fraction=KEEP, sizes=sizes)   # half of the bytes
    chosen = apply_selection(pool, sel)
    perm = np.random.default_rng(ctx.seed).permutation(len(pool))
    n_rand = int(np.searchsorted(np.cumsum(sizes[perm]), sizes[sel.kept].sum()) + 1)
    rand_idx = np.sort(perm[:min(n_rand, len(pool))])             # random docs, same bytes
    random = Corpus([pool[int(i)] for i in rand_idx], f"{pool.name}:random{rand_idx.size}")
    order = np.argsort(scores)
    report = {
        "exact_duplicates_dropped": int(ex.dropped.size),
        "near_duplicates_dropped": int(nd.dropped.size),
        "near_duplicate_examples": dup_names[:8],
        "target_docs": len(target),
        "kept_docs": int(sel.kept.size), "random_docs": int(rand_idx.size),
        "pool_docs": len(pool),
        "kept_bytes": chosen.num_chars, "random_bytes": random.num_chars,
        "pool_bytes": pool.num_chars,
        "lowest_scored": [pool[int(i)].meta["module"] for i in order[:8]],
        "highest_scored": [pool[int(i)].meta["module"] for i in order[::-1][:8]],
    }
    return chosen, random, report


def run(ctx):
    chosen, random, extra = choose(ctx)
    print(f"  select: kept {extra['kept_docs']}/{extra['pool_docs']} docs "
          f"({extra['kept_bytes']:,} of {extra['pool_bytes']:,} chars); dropped "
          f"{extra['exact_duplicates_dropped']} exact + {extra['near_duplicates_dropped']} near "
          f"duplicates; lowest: {extra['lowest_scored'][:4]}", flush=True)
    res = ctx.train("select", ctx.init_params(), ctx.adamw(),
                    data=ctx.train_data(corpus=chosen))
    rnd = ctx.train("select-random", ctx.init_params(), ctx.adamw(),
                    data=ctx.train_data(corpus=random))
    extra["random_final_val_loss"] = rnd["history"][-1]["val_loss"]
    extra["selected_final_val_loss"] = res["history"][-1]["val_loss"]
    extra["random_history"] = rnd["history"]
    print(f"  select: selected {extra['selected_final_val_loss']:.4f} vs random "
          f"{extra['random_final_val_loss']:.4f}", flush=True)
    return ctx.result(res, **extra)


RECIPE = Recipe(name="select", description=__doc__.strip().splitlines()[0], run=run)
