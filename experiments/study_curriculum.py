"""Study: curriculum by a reference model's loss (BIOptimus 2023; Platanios et al. 2019 pacing).

    python -m experiments.study_curriculum      # 196 CPU-s measured (3 arms of 120 steps)

Data: Python stdlib docstrings (``experiments.common.stdlib_docstrings``; hash split 90/10).
Difficulty: per-byte loss of each training docstring under a *reference* ``tiny`` llama trained
``--ref-steps`` steps on a uniform stream (``jaxeff.data.loss_scores``, first 2 windows). Then
the ``tiny`` llama is trained from the same initialisation for ``--steps`` batches (equal tokens)
on documents drawn by a :class:`jaxeff.data.CurriculumMap` (uniform with replacement over the
eligible set) in three arms:

* ``random``: competence 1 throughout (uniform sampling);
* ``curriculum``: easiest first, ``root_pacing(c0, 2)`` reaching every document at
  ``--ramp`` of the expected draws;
* ``anti``: the same pacing on negated scores (hardest first), to see whether order matters.

It reports held-out loss (nats/byte) during and after training and the mean reference loss of
the documents each arm drew. At this size (~150K training tokens, a quarter of an epoch) the study
shows early-training effects of the order, not what a curriculum does over a full pre-training.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from experiments.common import adamw_wsd, cost_footer, stdlib_docstrings, write_json
from jaxeff import train
from jaxeff.data import (ByteTokenizer, CurriculumMap, loss_scores, make_curriculum_lm_dataset,
                         make_eval_batches, make_lm_dataset, root_pacing, split_corpus)
from jaxeff.models import llama

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--ref-steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--c0", type=float, default=0.1)
    p.add_argument("--ramp", type=float, default=0.8)
    p.add_argument("--eval-every", type=int, default=30)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "study_curriculum.json"))
    return p.parse_args(argv)


def _setup(args):
    cfg = llama.PRESETS["tiny"].replace(max_seq_len=max(256, args.seq_len))
    tx = adamw_wsd(args.lr, args.steps)
    loss = lambda p, b: llama.loss_fn(p, b, cfg)  # noqa: E731
    return cfg, tx, loss


def main(argv=None):
    args = parse_args(argv)
    t_all, c_all = time.perf_counter(), time.process_time()
    tok = ByteTokenizer()
    corpus = stdlib_docstrings()
    train_c = split_corpus(corpus, "train", 0.1)
    val_c = split_corpus(corpus, "validation", 0.1)
    cfg, tx, loss = _setup(args)
    print(f"study_curriculum: {len(train_c)} train / {len(val_c)} held-out docstrings", flush=True)

    # 1. reference model and difficulty scores
    t0, c0 = time.perf_counter(), time.process_time()
    ref_state = train.init_train_state(llama.init_params(jax.random.key(args.seed + 1), cfg), tx)
    ref_data = iter(make_lm_dataset(train_c, tok, args.seq_len, args.batch_size,
                                    seed=args.seed + 1, shard=(0, 1)))
    ref = train.fit(ref_state, train.make_train_step(loss, tx), ref_data, steps=args.ref_steps,
                    progress=False)["state"].params
    apply_fn = lambda p, x: llama.forward(p, x, cfg)  # noqa: E731
    scores = loss_scores(apply_fn, ref, train_c, tok, seq_len=args.seq_len, batch_size=32,
                         max_windows=2, per="byte")
    ref_cost = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    print(f"  reference ({args.ref_steps} steps) + scores: bits/byte min {scores.min():.3f} "
          f"median {np.median(scores):.3f} max {scores.max():.3f} ({ref_cost['cpu_s']:.0f} CPU-s)",
          flush=True)

    mean_len = np.mean([len(d.text.encode()) + 2 for d in train_c])
    per_step = args.batch_size * args.seq_len / mean_len      # documents per step (no padding)
    draws = int(np.ceil(args.steps * per_step * 1.5))         # enough for every arm
    total = int(args.ramp * args.steps * per_step)
    evals = make_eval_batches(val_c, tok, args.seq_len, args.batch_size,
                              max_batches=args.eval_batches)
    arms = {"random": (scores, lambda p: 1.0),
            "curriculum": (scores, root_pacing(args.c0, 2.0)),
            "anti": (-scores, root_pacing(args.c0, 2.0))}
    results = {}
    for name, (sc, pacing) in arms.items():
        data = iter(make_curriculum_lm_dataset(train_c, sc, tok, args.seq_len, args.batch_size,
                                               pacing, total=total, seed=args.seed,
                                               length=draws, shard=(0, 1)))
        state = train.init_train_state(llama.init_params(jax.random.key(args.seed), cfg), tx)
        eval_fn = train.make_eval_fn(loss)
        t0, c0 = time.perf_counter(), time.process_time()
        res = train.fit(state, train.make_train_step(loss, tx), data, steps=args.steps,
                        eval_fn=eval_fn, eval_batches=lambda: evals, eval_every=args.eval_every,
                        progress=False, desc=name)
        cmap = CurriculumMap(sc, pacing, total=total, seed=args.seed, length=draws)
        n_used = int(args.steps * per_step)
        drawn = np.asarray([cmap[i][1] for i in range(n_used)])
        half = n_used // 2
        results[name] = {
            "heldout": res["history"][-1]["val_loss"],
            "curve": [(h["step"], round(h["val_loss"], 4)) for h in res["history"]],
            "drawn_ref_bits_per_byte": {"first_half": float(scores[drawn[:half]].mean()),
                                        "second_half": float(scores[drawn[half:]].mean())},
            "distinct_docs_drawn": int(np.unique(drawn).size),
            "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
        r = results[name]
        print(f"  {name:<10} heldout={r['heldout']:.4f} curve={r['curve']} drawn ref loss "
              f"{r['drawn_ref_bits_per_byte']['first_half']:.3f} -> "
              f"{r['drawn_ref_bits_per_byte']['second_half']:.3f} ({r['cpu_s']:.0f} CPU-s)",
              flush=True)
    summary = {
        "command": "python -m experiments.study_curriculum " + " ".join(argv or []),
        "args": vars(args), "data": "stdlib docstrings, 200-600 chars, hash split 90/10",
        "train_docs": len(train_c), "heldout_docs": len(val_c),
        "train_tokens_per_arm": args.steps * args.batch_size * args.seq_len,
        "docs_per_step_estimate": per_step, "competence_total_draws": total,
        "reference": {"steps": args.ref_steps, **ref_cost,
                      "bits_per_byte": {"min": float(scores.min()),
                                        "median": float(np.median(scores)),
                                        "max": float(scores.max())}},
        "arms": results,
        "heldout_delta_vs_random": {k: results[k]["heldout"] - results["random"]["heldout"]
                                    for k in results},
        **cost_footer(t_all, c_all),
    }
    write_json(summary, args.out)
    return summary


if __name__ == "__main__":
    main()
