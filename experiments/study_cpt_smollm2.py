"""Study: continued pre-training of the real SmolLM2-135M on Python code -- full AdamW vs GaLore
vs LoRA vs 8-bit states, re-warming vs the infinite schedule, with and without English replay.

    python -m experiments.study_cpt_smollm2                 # ~6-8 CPU-minutes on 2 idle cores
    python -m experiments.study_cpt_smollm2 --smoke         # 2 steps per arm (a wiring check)
    python -m experiments.study_cpt_smollm2 --arms adamw-rewarm,lora-rewarm --steps 30

On a CPU shared with many jobs, ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`` (one thread per
op) ran this ~3x faster in wall time than XLA's default thread pool (which waits on its slowest,
descheduled thread); the recorded run used it.

SmolLM2-135M-Instruct (``jaxeff.models.pretrained("smollm2-135m")``, 134.5M params, its BPE
tokenizer) is continued for ``--steps`` steps of ``--batch-size x --seq-len`` tokens on the
*new* domain, the Python standard library (``jaxeff.data.load_stdlib_corpus``, documents cut at
line ends into 4,096-character parts, split by id hash; ``experiments.common.chunk_documents``).
The *old* domain is English text: tinyshakespeare (``jaxeff.data.load_tinyshakespeare``, 4,096-
character chunks split by hash). Every arm starts from the same weights, sees the same batches
in the same order (fixed seed) and takes the same number of steps:

  =====================  ==================================================================
  arm                    optimizer, schedule, data
  =====================  ==================================================================
  adamw-rewarm           full AdamW (b2 0.95, wd 0.1), re-warm ``eta_min -> peak`` over 1/8
                         of the steps, cosine to ``eta_min`` (``jaxeff.schedules.rewarm``;
                         Gupta et al., 2023)
  adamw-infinite         full AdamW, no re-warming: resume at the constant ``eta_c`` and
                         anneal to ``eta_min`` over the last 20% (``schedules.infinite``; Singh
                         et al., 2025). SmolLM2 ships one annealed checkpoint, not the
                         checkpoint at ``eta_c`` that the schedule branches from, so this arm
                         resumes the annealed weights at ``eta_c``
  adamw-rewarm+replay    ``adamw-rewarm`` with ``--replay`` of every batch English: the last
                         rows of each code batch replaced by tinyshakespeare rows
                         (``experiments.common.concat_batches``), so its code rows are a subset
                         of the other arms' batches
  galore-rewarm          ``jaxeff.optim.galore`` (rank ``--galore-rank`` on the 210 attention
                         and MLP matrices, Adam b2 0.95 inside, scale ``--galore-scale``;
                         embedding and norms full Adam; projectors by the randomized refresh,
                         ``--galore-refresh svd`` for the paper's exact SVD), re-warm
  lora-rewarm            ``jaxeff.params.lora`` (rank ``--lora-rank``, alpha 2 x rank, on the
                         same 210 matrices) + ``partition``: only the adapters train, AdamW at
                         ``--lora-lr-mult`` x the peak (LoRA's usual larger learning rate), re-warm
  int8-rewarm            ``jaxeff.optim.compress_state(optax.adamw(...), "int8")`` (8-bit
                         moments with dynamic range expansion, group 128), re-warm
  =====================  ==================================================================

Why these six rather than the cross product: the optimizer comparison (AdamW / GaLore / LoRA /
8-bit) is made at the one schedule the paper recommends for continuing (re-warming), and the
schedule and replay comparisons at full AdamW, the baseline; each question changes one thing
against ``adamw-rewarm``.

Reported per arm: the held-out loss on both domains before and after (``--eval-rows`` held-out
documents per domain, each its first ``--seq-len + 1`` tokens as one row, no BOS; the same rows
for every arm), the optimizer-state bytes (``jaxeff.params.tree_bytes`` of the optimizer state)
and trainable parameters, the training CPU seconds (all threads) and wall seconds, and the
per-step training loss. Results: ``experiments/results/study_cpt_smollm2.json``.

What this horizon can and cannot show: the default is 10 steps x 256 tokens (2.5K code tokens),
because one fwd+bwd of the 135M model costs ~1-2 CPU-seconds per 256 tokens here. It shows the
*direction* and rough size of the early adaptation/forgetting trade-off and the optimizer-state
memory (exact), and that every optimizer path runs on the real llama params tree. It cannot show
converged CPT quality, the stability gap over a long run, or a ranking that survives tuning (one
learning rate per method, untuned). SmolLM2 was pre-trained on a mix that includes Python code,
so "new" is a shift in emphasis, not an unseen domain; and English replay comes from the same
corpus as the English evaluation (disjoint documents), which flatters replay compared with
replaying the real pre-training mix.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import (chunk_documents, concat_batches, cpu_seconds, eval_docs,
                                rows_loss, run_record, token_rows, write_json)
from experiments.study_ptq_smollm2 import SELECT
from jaxeff import schedules, train
from jaxeff.data import (Corpus, load_stdlib_corpus, load_tinyshakespeare, make_lm_dataset,
                         split_corpus)
from jaxeff.models import llama, pretrained
from jaxeff.optim import compress_state, galore
from jaxeff.params import combine, lora, partition, tree_bytes

ARMS = ("adamw-rewarm", "adamw-infinite", "adamw-rewarm+replay", "int8-rewarm", "lora-rewarm",
        "galore-rewarm")
OPTIMIZERS = ("adamw", "galore", "lora", "int8")
SCHEDULES = ("rewarm", "infinite")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "study_cpt_smollm2.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=",".join(ARMS),
                   help="comma-separated <optimizer>-<schedule>[+replay]; optimizer in "
                        f"{OPTIMIZERS}, schedule in {SCHEDULES}")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    p.add_argument("--eta-c", type=float, default=0.25, help="eta_c / peak (infinite)")
    p.add_argument("--eta-min", type=float, default=0.1, help="eta_min / peak")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--replay", type=float, default=0.25, help="English share of each batch")
    p.add_argument("--galore-rank", type=int, default=128)
    p.add_argument("--galore-scale", type=float, default=1.0,
                   help="GaLore's output scale (1.0: the update size of Adam at equal lr; the "
                        "paper's 0.25 goes with a 4x larger lr)")
    p.add_argument("--galore-refresh", choices=("randomized", "svd"), default="randomized",
                   help="projector at step 0: warm-started subspace iteration (default) or the "
                        "paper's exact SVD (minutes of CPU for the 210 matrices here)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-lr-mult", type=float, default=5.0)
    p.add_argument("--eval-rows", type=int, default=24, help="held-out rows per domain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="2 steps per arm, 8 eval rows")
    p.add_argument("--out", default=None, help=f"results JSON (default {RESULTS}; --smoke: "
                                               "runs/cpt_smollm2-smoke.json)")
    a = p.parse_args(argv)
    if a.smoke:
        a.steps, a.eval_rows = 2, 8
    arms = a.arms.split(",")
    for arm in arms:
        opt, _, rest = arm.partition("-")
        sched = rest.split("+")[0]
        if opt not in OPTIMIZERS or sched not in SCHEDULES or rest not in (sched, sched + "+replay"):
            p.error(f"--arms: {arm!r} is not <optimizer>-<schedule>[+replay] with optimizer in "
                    f"{OPTIMIZERS} and schedule in {SCHEDULES}")
    if not 0 < a.replay < 1 or round(a.replay * a.batch_size) < 1:
        p.error(f"--replay {a.replay} must be in (0, 1) and give at least one row of "
                f"--batch-size {a.batch_size}")
    if a.steps < 1:
        p.error(f"--steps must be >= 1; got {a.steps}")
    return a


def schedule_for(name: str, peak: float, steps: int, args):
    """The stage's learning rate: re-warm from ``eta_min`` or resume at the constant ``eta_c``."""
    eta_min, eta_c = args.eta_min * peak, args.eta_c * peak
    if name == "rewarm":
        return schedules.rewarm(eta_min, peak, steps, warmup=max(1, steps // 8), decay="cosine",
                                final=eta_min)
    return schedules.infinite(eta_c, steps, warmup_end=0.0, cooldown_end=0.0, anneal_start=0.8,
                              eta_c=eta_c, eta_min=eta_min)


def build_arm(arm: str, params, args):
    """``(trainable, frozen, tx, lr_schedule)`` of one arm; ``frozen`` is None unless LoRA."""
    opt, _, rest = arm.partition("-")
    peak = args.lr * (args.lora_lr_mult if opt == "lora" else 1.0)
    lr = schedule_for(rest.split("+")[0], peak, args.steps, args)

    def adamw():
        return optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=args.weight_decay)

    frozen = None
    trainable = jax.tree.map(jnp.copy, params)    # the step donates its state's buffers
    if opt == "adamw":
        core = adamw()
    elif opt == "int8":
        core = compress_state(adamw(), "int8")
    elif opt == "galore":
        core = galore(lr, optax.scale_by_adam(b1=0.9, b2=0.95), rank=args.galore_rank,
                      scale=args.galore_scale, select=SELECT, weight_decay=args.weight_decay,
                      refresh=args.galore_refresh)
    else:
        adapted = lora(args.lora_rank, 2.0 * args.lora_rank, select=SELECT).from_dense(
            jax.random.key(args.seed), params)
        trainable, frozen = partition(adapted)
        core = adamw()
    return trainable, frozen, optax.chain(optax.clip_by_global_norm(1.0), core), lr


def main(argv=None):
    args = parse_args(argv)
    t_start, c_start = time.perf_counter(), cpu_seconds()
    load0 = os.getloadavg()[0]
    B, L = args.batch_size, args.seq_len
    cfg, params, tok = pretrained("smollm2-135m")

    code = Corpus(chunk_documents(load_stdlib_corpus("all"), 4096), "stdlib-chunked")
    code_tr, code_va = split_corpus(code, "train", 0.1), split_corpus(code, "validation", 0.1)
    eng_tr = load_tinyshakespeare(split="train", val_fraction=0.1)
    eng_va = load_tinyshakespeare(split="validation", val_fraction=0.1)
    # held-out rows: evenly spaced documents, cut to 8 characters per token (plenty), first L+1
    rows = {"old": token_rows(eval_docs(eng_va, args.eval_rows, 8 * (L + 1)), tok, L + 1),
            "new": token_rows(eval_docs(code_va, args.eval_rows, 8 * (L + 1)), tok, L + 1)}
    loss_fn = jax.jit(lambda p, r: llama.next_token_loss(p, r, cfg))

    def evaluate(p):
        return {k: rows_loss(loss_fn, p, r, 8) for k, r in rows.items()}

    def data(corpus, b, seed):
        return iter(make_lm_dataset(corpus, tok, L, b, seed=seed, shard=(0, 1),
                                    vocab_size=cfg.vocab_size))

    arms = args.arms.split(",")
    print(f"study_cpt_smollm2: SmolLM2-135M ({llama.param_count(params):,} params), code "
          f"{len(code_tr)} train / {len(code_va)} held-out docs, English {len(eng_tr)} / "
          f"{len(eng_va)}; {args.steps} steps x {B}x{L} tokens per arm; eval rows "
          f"{ {k: r.shape for k, r in rows.items()} }; arms {arms}", flush=True)
    base = evaluate(params)
    print(f"  before: old (English) {base['old']:.4f}  new (code) {base['new']:.4f}", flush=True)

    out = args.out or (os.path.join("runs", "cpt_smollm2-smoke.json") if args.smoke else RESULTS)
    partial = out + ".partial"   # rewritten after every arm (a failing later arm keeps these)
    results = {}
    for arm in arms:
        trainable, frozen, tx, lr = build_arm(arm, params, args)
        if frozen is None:
            def loss(t, b):
                return llama.loss_fn(t, b, cfg)
        else:
            def loss(t, b):
                return llama.loss_fn(combine(t, b["frozen"]), b, cfg)
        step = train.make_train_step(loss, tx)
        state = train.init_train_state(trainable, tx, args.seed)
        state_bytes = tree_bytes(state.opt_state)
        it = data(code_tr, B, args.seed)
        n_old = 0
        if arm.endswith("+replay"):
            n_old = int(round(args.replay * B))
            it = concat_batches(it, data(eng_tr, n_old, args.seed + 1), B - n_old)
        t0, c0, curve = time.perf_counter(), cpu_seconds(), []
        for s in range(args.steps):
            batch = next(it)
            if frozen is not None:
                batch = {**batch, "frozen": frozen}
            state, m = step(state, batch)
            curve.append(float(m["loss"]))
            print(f"  {arm:<20} step {s + 1:>3}/{args.steps}  loss {curve[-1]:.4f}  "
                  f"lr {float(lr(s)):.2e}  ({time.perf_counter() - t0:.0f}s)", flush=True)
        train_wall, train_cpu = time.perf_counter() - t0, cpu_seconds() - c0
        final = evaluate(state.params if frozen is None else combine(state.params, frozen))
        results[arm] = {
            "old_before": base["old"], "new_before": base["new"],
            "old_after": final["old"], "new_after": final["new"],
            "forgetting": final["old"] - base["old"], "new_gain": base["new"] - final["new"],
            "opt_state_bytes": state_bytes,
            "trainable_params": llama.param_count(state.params),
            "replay_rows": n_old, "train_loss": curve, "train_wall_s": train_wall,
            "train_cpu_s": train_cpu,
            "lr": [float(lr(0)), float(max(lr(s) for s in range(args.steps))),
                   float(lr(args.steps - 1))]}
        print(f"  {arm:<20} old {final['old']:.4f} ({final['old'] - base['old']:+.4f})  new "
              f"{final['new']:.4f} ({final['new'] - base['new']:+.4f})  state "
              f"{state_bytes / 2**20:.0f} MiB  {train_cpu:.0f} CPU-s", flush=True)
        del state, trainable, frozen
        write_json(json.loads(json.dumps({"partial": True, "before": base, "results": results},
                                         default=float)), partial)

    ref = results.get("adamw-rewarm", {}).get("opt_state_bytes")
    header = (f"{'arm':<20} {'old after':>9} {'forget':>8} {'new after':>9} {'new gain':>9} "
              f"{'state MiB':>9} {'x AdamW':>7} {'train':>10}")
    lines = [header, "-" * len(header)]
    for arm, r in results.items():
        ratio = f"{r['opt_state_bytes'] / ref:7.3f}" if ref else f"{'-':>7}"
        lines.append(f"{arm:<20} {r['old_after']:9.4f} {r['forgetting']:+8.4f} "
                     f"{r['new_after']:9.4f} {r['new_gain']:+9.4f} "
                     f"{r['opt_state_bytes'] / 2**20:9.1f} {ratio} "
                     f"{r['trainable_params'] / 1e6:8.2f}M")
    table = "\n".join(lines)
    print(f"\nbefore: old {base['old']:.4f}, new {base['new']:.4f}\n{table}")
    summary = {
        "study": "cpt_smollm2",
        **run_record("study_cpt_smollm2", argv, t_start, c_start, load0),
        "args": vars(args), "before": base, "results": results, "table": table,
        "eval_rows": {k: list(r.shape) for k, r in rows.items()}}
    write_json(json.loads(json.dumps(summary, default=float)), out)
    os.remove(partial)
    print(f"total {summary['total_wall_s']:.0f}s wall, {summary['total_cpu_s']:.0f} CPU-s, "
          f"load {load0:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
    return summary


if __name__ == "__main__":
    main()
