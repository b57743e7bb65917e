"""Study: domain upsampling at the end of training (Blakeney et al., 2024, "spark joy").

    python -m experiments.study_upsampling   # email; 2 runs of 150 steps, ~10 min on busy 2 cores
    python -m experiments.study_upsampling --family xml --steps 200 --end-weight 0.5

Two runs of the tiny reference model with the same optimiser, seed and number of steps; the
training rows come from two packed streams, the chosen package family (``--family``) and the
rest of the stdlib, mixed per batch by :func:`jaxeff.data.make_mixture_lm_dataset`:

* ``natural``: constant weights = each stream's share of the training characters;
* ``upsample``: the same weights, then ``--end-weight`` for the family over the final
  ``--fraction`` of the steps (``upsample_at_end``).

The corpus is split with its own ``val_fraction`` (default 0.2, so the family has held-out
documents). It reports the validation loss on the family's held-out documents and on the rest
(the cost), for both runs, and writes ``runs/upsampling-<time>/summary.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import jax
import optax

from jaxeff import schedules, train
from jaxeff.data import ByteTokenizer, Corpus, load_stdlib_corpus, make_eval_batches
from jaxeff.data import constant_mixture, make_mixture_lm_dataset, size_weights, upsample_at_end
from jaxeff.models import llama


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="email", help="top-level package to upsample")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--fraction", type=float, default=0.2, help="final upsampling fraction")
    p.add_argument("--end-weight", type=float, default=0.5, help="family weight at the end")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _split(corpus, family):
    fam = Corpus([d for d in corpus if d.meta["domain"] == family], f"{family}")
    rest = Corpus([d for d in corpus if d.meta["domain"] != family], f"not-{family}")
    return fam, rest


def run_one(name, schedule, args, cfg, streams, evals):
    tok = ByteTokenizer()
    data = iter(make_mixture_lm_dataset(streams, tok, args.seq_len, args.batch_size, schedule,
                                        seed=args.seed, shard=(0, 1)))
    sched = schedules.wsd(args.lr, total_steps=args.steps, warmup=max(1, args.steps // 10),
                          decay_fraction=0.2, shape="1-sqrt")
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=0.1))
    params = llama.init_params(jax.random.key(args.seed), cfg)
    loss = lambda p, b: llama.loss_fn(p, b, cfg)  # noqa: E731
    state = train.init_train_state(params, tx, seed=args.seed)
    t0 = time.perf_counter()
    res = train.fit(state, train.make_train_step(loss, tx), data, steps=args.steps,
                    progress=False, desc=name)
    eval_fn = train.make_eval_fn(loss)
    out = {k: train.evaluate(eval_fn, res["state"].params, b) for k, b in evals.items()}
    out["train_s"] = time.perf_counter() - t0
    print(f"  {name:<9} " + "  ".join(f"{k}={v:.4f}" for k, v in out.items()), flush=True)
    return out


def main(argv=None):
    args = parse_args(argv)
    tok = ByteTokenizer()
    cfg = llama.PRESETS["tiny"]
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, args.seq_len))
    train_c = load_stdlib_corpus("train", val_fraction=args.val_fraction)
    val_c = load_stdlib_corpus("validation", val_fraction=args.val_fraction)
    fam_tr, rest_tr = _split(train_c, args.family)
    fam_va, rest_va = _split(val_c, args.family)
    if len(fam_tr) == 0 or len(fam_va) == 0:
        raise SystemExit(f"--family {args.family!r} needs train and validation documents; got "
                         f"{len(fam_tr)} / {len(fam_va)} (try another family or --val-fraction)")
    natural = size_weights([fam_tr, rest_tr])
    end = [args.end_weight, 1.0 - args.end_weight]
    total = args.steps * args.batch_size
    evals = {"val_family": make_eval_batches(fam_va, tok, args.seq_len, args.batch_size,
                                             max_batches=args.eval_batches),
             "val_rest": make_eval_batches(rest_va, tok, args.seq_len, args.batch_size,
                                           max_batches=args.eval_batches)}
    print(f"study_upsampling: family={args.family} ({len(fam_tr)} train / {len(fam_va)} val docs,"
          f" natural weight {natural[0]:.3f}) -> {args.end_weight} over the last "
          f"{args.fraction:.0%} of {args.steps} steps, batch {args.batch_size}x{args.seq_len}",
          flush=True)
    runs = {
        "natural": constant_mixture(natural, total=total, block_size=args.batch_size,
                                    seed=args.seed),
        "upsample": upsample_at_end(natural, end, total=total, fraction=args.fraction,
                                    block_size=args.batch_size, seed=args.seed),
    }
    results = {n: run_one(n, s, args, cfg, [fam_tr, rest_tr], evals) for n, s in runs.items()}
    delta = {k: results["upsample"][k] - results["natural"][k] for k in evals}
    print(f"  delta (upsample - natural): family {delta['val_family']:+.4f}, "
          f"rest {delta['val_rest']:+.4f} (negative = better)", flush=True)
    out = args.out or os.path.join("runs", "upsampling-"
                                   + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    summary = {"command": "python -m experiments.study_upsampling " + " ".join(argv or []),
               "args": vars(args), "natural_weights": natural.tolist(), "results": results,
               "delta": delta, "devices": str(jax.devices()), "cpus": os.cpu_count()}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {out}/summary.json", flush=True)
    return summary


if __name__ == "__main__":
    main()
