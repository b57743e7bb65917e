"""MeCo: module-path metadata prefix (loss-masked) for 90% of training, plain cooldown for 10%.

"Metadata Conditioning Accelerates Language Model Pre-training" (Gao et al., 2025). Every
training document is ``BOS + "URL: <module.path>\\n\\n" + text + EOS`` with the prefix masked
from the loss until step ``0.9 * steps``, then plain documents (a fresh loader), with the
baseline optimiser and schedule. Validation (``ctx.eval_batches()``) is plain text, as for the
baseline. Extra numbers:

* ``steer_*``: validation loss on the package with the most validation documents when each
  document is prefixed with its true module path vs a wrong one (``tkinter.ttk``, or
  ``email.message`` for tkinter), and plain; the prefix is masked, so all three score the same
  target tokens.
* ``pipeline_tokens_per_s``: throughput of tokenize + MeCo prefix + pack + batch, one process,
  one Grain map thread (Python-bound, so one core), measured over 60 batches after the first;
  ``pipeline_plain_tokens_per_s`` the same for the plain pipeline.
"""

import collections
import functools
import time

from experiments.speedrun import Recipe
from jaxeff import train
from jaxeff.data import Corpus, fill_rate, make_eval_batches
from jaxeff.data import conditioned_eval_batches, make_meco_dataset, meco_switch_step

COOLDOWN = 0.1
WRONG = ("tkinter.ttk", "email.message")


def _meco_stream(corpus, tokenizer, seq_len, batch_size, seed, shard, n_local):
    """One pre-packing worker's shard (``experiments.prepacked``): the cooldown switch sits at
    the same fraction of the worker's ``n_local`` batches, hence at the same global step."""
    return make_meco_dataset(corpus, tokenizer, seq_len, batch_size, total_steps=n_local,
                             cooldown_fraction=COOLDOWN, field="module", seed=seed, shard=shard)


def _prepacked_stream(ctx, seed):
    factory = functools.partial(_meco_stream, ctx.train_corpus, ctx.tokenizer, ctx.seq_len,
                                ctx.batch_size, seed)
    return ("meco", len(ctx.train_corpus), seed, ctx.seq_len, ctx.batch_size, ctx.steps), factory


def prefetch(ctx, seed):
    """Start pre-packing this recipe's stream for ``seed`` (a no-op without a prepacker)."""
    if ctx.prepacker is not None:
        ctx.prepacker.prefetch(*_prepacked_stream(ctx, seed), ctx.steps)


def _meco_data(ctx, seed=None, live=False):
    seed = ctx.seed if seed is None else seed
    if ctx.prepacker is not None and not live:
        return ctx.prepacker.batches(*_prepacked_stream(ctx, seed), ctx.steps)
    return make_meco_dataset(ctx.train_corpus, ctx.tokenizer, ctx.seq_len, ctx.batch_size,
                             total_steps=ctx.steps, cooldown_fraction=COOLDOWN, field="module",
                             seed=seed)


def _rate(it, num_batches):
    t0 = time.perf_counter()
    first = next(it)
    t1 = time.perf_counter()
    batches = [next(it) for _ in range(num_batches)]
    t2 = time.perf_counter()
    return num_batches * first["inputs"].size / (t2 - t1), t1 - t0, batches


def pipeline_throughput(ctx, num_batches: int = 60) -> dict:
    """Tokens/s of the MeCo data pipeline alone (no model) after its first batch, and of the
    plain pipeline (``ctx.train_data``) measured the same way in the same process."""
    meco, first_s, batches = _rate(iter(_meco_data(ctx, seed=ctx.seed + 17, live=True)),
                                   num_batches)
    plain, _, _ = _rate(ctx.train_data(seed=ctx.seed + 17, prepacked=False), num_batches)
    return {"pipeline_tokens_per_s": meco, "pipeline_first_batch_s": first_s,
            "pipeline_fill_rate": fill_rate(batches), "pipeline_plain_tokens_per_s": plain}


def steering(ctx, params, max_batches: int = 8) -> dict:
    """Loss on one package with true vs wrong vs no metadata (same target tokens)."""
    by_domain = collections.defaultdict(list)
    for d in ctx.val_corpus:
        by_domain[d.meta["domain"]].append(d)
    package = max(sorted(by_domain), key=lambda k: (len(by_domain[k]),
                                                     sum(len(d.text) for d in by_domain[k])))
    docs = Corpus(by_domain[package], f"val:{package}")
    wrong = WRONG[0] if not WRONG[0].startswith(package + ".") else WRONG[1]
    eval_fn = train.make_eval_fn(ctx.loss_fn())
    kw = dict(max_batches=max_batches)
    out = {"steer_package": package, "steer_wrong_metadata": wrong,
           "steer_docs": len(docs)}
    for name, meta in (("true", None), ("wrong", wrong)):
        batches = conditioned_eval_batches(docs, ctx.tokenizer, ctx.seq_len, ctx.batch_size,
                                           metadata=meta, field="module", **kw)
        out[f"steer_loss_{name}_metadata"] = train.evaluate(eval_fn, params, batches)
    plain = make_eval_batches(docs, ctx.tokenizer, ctx.seq_len, ctx.batch_size, **kw)
    out["steer_loss_plain"] = train.evaluate(eval_fn, params, plain)
    out["steer_wrong_minus_true"] = (out["steer_loss_wrong_metadata"]
                                     - out["steer_loss_true_metadata"])
    return out


def run(ctx):
    extra = pipeline_throughput(ctx)
    print(f"  meco pipeline: {extra['pipeline_tokens_per_s']:,.0f} tokens/s (plain "
          f"{extra['pipeline_plain_tokens_per_s']:,.0f}; fill {extra['pipeline_fill_rate']:.3f})",
          flush=True)
    res = ctx.train("meco", ctx.init_params(), ctx.adamw(), data=iter(_meco_data(ctx)))
    extra.update(steering(ctx, res["state"].params))
    extra["switch_step"] = meco_switch_step(ctx.steps, COOLDOWN)
    print("  meco steering: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in extra.items() if k.startswith("steer")),
          flush=True)
    return ctx.result(res, **extra)


RECIPE = Recipe(name="meco", description=__doc__.strip().splitlines()[0], run=run)
