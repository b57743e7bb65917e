"""Study: continued pre-training on new package families -- re-warming, the infinite schedule,
replay, a repeated high-quality subset, distillation to the old model, and a soup.

    python -m experiments.study_continued_pretraining            # ~5 minutes on 2 idle cores
    python -m experiments.study_continued_pretraining --quick    # smoke run (~1 minute)
    python -m experiments.study_continued_pretraining --variants rewarm,infinite --steps2 200

The embedded corpus (the Python stdlib) is split by top-level package (``meta['domain']``): the
*new* families (``--new``; default ``pydoc_data``, the Sphinx help topics: English prose with reST
markup inside Python string literals) against everything else (*old*, code). Documents longer
than ``--chunk`` characters are cut at line ends into parts first, so a one-module family has
held-out parts (the split hashes ids). ``--new email,xml,http,urllib,html,xmlrpc,wsgiref`` is a
code -> code alternative. The tiny reference model is

1. **pre-trained on old** with the infinite schedule (``jaxeff.schedules.infinite``: warmup,
   cooldown to eta_c, constant) for ``--steps1`` steps -> checkpoint **A** (at eta_c), then the
   anneal branch (``--anneal`` steps, eta_c -> eta_min, still on old data) -> **A'**, the
   "released" pre-trained model;
2. **continued on new** for ``--steps2`` steps in several ways (same data order and seed):

   ================  ======  =============================================================
   variant           start   stage 2
   ================  ======  =============================================================
   constant-min      A'      no re-warming: eta_min throughout (lower bound on forgetting)
   rewarm            A'      re-warm eta_min -> peak over 10%, cosine to eta_min (Gupta et
                             al., 2023; ``schedules.rewarm``)
   infinite          A       resume at the constant eta_c, no re-warming, anneal to eta_min
                             over the last 20% (Singh et al., 2025)
   rewarm+replay     A'      ``rewarm`` with ``--replay`` of every batch from old data
                             (stability gap strategy 3: a mixture close to pre-training)
   rewarm+hq-epochs  A'      ``rewarm`` on a small high-quality sub-corpus of new repeated for
                             ~``--hq-epochs`` epochs (stability gap strategies 1-2)
   rewarm+kd         A'      ``rewarm`` + ``--kd-weight`` * logit distillation to A' on the
                             new batches (``jaxeff.losses.kd_loss``; an LwF-style regulariser)
   scratch           init    new data only from random init, WSD schedule (reference)
   soup(A',rewarm)   --      uniform soup of A' and ``rewarm`` (``params.averaging``), no
                             training
   ================  ======  =============================================================

Stage switches keep the optimizer state (Adam's moments and count) and switch the learning-rate
schedule: every run shares one compiled step whose AdamW learning rate is an injected
hyperparameter set from the stage's ``jaxeff.schedules`` function at each step.

"High quality" is a transparent proxy, information density ``len(zlib(text)) / len(text)``
(boilerplate and repetition score low), highest first, until the subset holds
``steps2 * batch * seq_len / hq_epochs`` tokens; :mod:`jaxeff.data.epochs` counts the epochs
actually made. Reported: the loss on held-out *old* documents (forgetting = its increase over
A') and on held-out *new* documents (``--eval-batches * batch`` evenly spaced held-out documents
per domain, one row each), at the end and the worst old loss seen during stage 2
(the stability gap), plus the wall-clock. Writes ``runs/continued-<time>/summary.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import chunk_documents, concat_batches, cpu_seconds, eval_docs
from jaxeff import schedules, train
from jaxeff.data import (ByteTokenizer, Corpus, load_stdlib_corpus, make_eval_batches,
                         make_lm_dataset, split_corpus)
from jaxeff.data import CountingIterator, EpochCounter, unique_target_tokens
from jaxeff.losses import kd_loss
from jaxeff.models import llama
from jaxeff.params import uniform_soup

#: Default new domain: the Sphinx-generated help topics (English prose with reST markup, held in
#: Python string literals) -- a real shift away from the code of every other package.
NEW_FAMILIES = ("pydoc_data",)
#: A code -> code alternative (``--new email,xml,http,urllib,html,xmlrpc,wsgiref``).
WEB_FAMILIES = ("email", "xml", "http", "urllib", "html", "xmlrpc", "wsgiref")
VARIANTS = ("constant-min", "rewarm", "infinite", "rewarm+replay", "rewarm+hq-epochs",
            "rewarm+kd", "scratch", "soup")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new", default=",".join(NEW_FAMILIES),
                   help="comma-separated top-level packages of the new domain (e.g. "
                        + ",".join(WEB_FAMILIES) + ")")
    p.add_argument("--chunk", type=int, default=4096,
                   help="split documents longer than this many characters (at line ends) into "
                        "documents, so a one-module family has held-out parts")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {VARIANTS}")
    p.add_argument("--steps1", type=int, default=200, help="stage-1 steps up to checkpoint A")
    p.add_argument("--anneal", type=int, default=40, help="anneal branch A -> A' (steps)")
    p.add_argument("--steps2", type=int, default=100, help="stage-2 steps per variant")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--eta-c", type=float, default=0.25, help="eta_c / peak (infinite schedule)")
    p.add_argument("--eta-min", type=float, default=0.02, help="eta_min / peak")
    p.add_argument("--replay", type=float, default=0.25, help="old-data share of each batch")
    p.add_argument("--hq-epochs", type=float, default=4.0, help="target epochs on the HQ subset")
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--eval-batches", type=int, default=6)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: few steps, tiny batches")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.steps1, a.anneal, a.steps2, a.batch_size, a.seq_len = 20, 6, 12, 4, 64
        a.eval_batches, a.eval_every = 2, 6
    bad = [v for v in a.variants.split(",") if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {VARIANTS}")
    if not 0 < a.replay < 1:
        p.error(f"--replay must be in (0, 1); got {a.replay}")
    return a


# ------------------------------------------------------------------------------- helpers
def optimizer(peak):
    """The baseline AdamW with the learning rate as an injected hyperparameter, so every variant
    shares one compiled step and takes its learning rate from its own schedule (host side)."""
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.inject_hyperparams(optax.adamw)(learning_rate=peak, b1=0.9, b2=0.95,
                                                             weight_decay=0.1))


def set_lr(opt_state, lr):
    """Write ``lr`` into every injected ``learning_rate`` of ``opt_state``."""
    def visit(s):
        if hasattr(s, "hyperparams") and "learning_rate" in s.hyperparams:
            return s._replace(hyperparams={**s.hyperparams,
                                           "learning_rate": jnp.asarray(lr, jnp.float32)})
        return s
    return jax.tree.map(visit, opt_state, is_leaf=lambda s: hasattr(s, "hyperparams"))


def with_teacher(it, teacher_params):
    for b in it:
        yield {**b, "teacher_params": teacher_params}


def quality(text: str) -> float:
    """Information density ``len(zlib(text)) / len(text)``: a transparent proxy for quality
    (boilerplate and repetitive text compress well and score low)."""
    raw = text.encode("utf-8", errors="replace")
    return len(zlib.compress(raw, 6)) / max(1, len(raw))


def hq_subset(docs, tok, target_tokens):
    """The highest-:func:`quality` documents of ``docs``, until they hold about
    ``target_tokens`` tokens (at least one document)."""
    ranked = sorted(docs, key=lambda d: -quality(d.text))
    keep, total = [], 0
    for d in ranked:
        n = len(tok.encode(d.text)) + 1
        if total + n <= target_tokens or not keep:
            keep.append(d)
            total += n
        if total >= 0.9 * target_tokens:
            break
    return Corpus(keep, "new:hq")


class Runner:
    """Shared model, loss, evaluation, and the training loop with periodic two-domain evals.

    One jitted step per loss (plain / with distillation), reused by every variant: the state
    structure is the same everywhere and the learning rate is set per step from the schedule.
    """

    def __init__(self, args, cfg, evals, tx):
        self.args, self.cfg, self.evals, self.tx = args, cfg, evals, tx
        self.loss = lambda p, b: llama.loss_fn(p, b, cfg)  # noqa: E731
        self.eval_fn = train.make_eval_fn(self.loss)
        self._steps = {}

    def evaluate(self, params) -> dict:
        return {k: train.evaluate(self.eval_fn, params, b) for k, b in self.evals.items()}

    def kd_loss_fn(self, p, b):
        ce, aux = self.loss(p, b)
        student = llama.forward(p, b["inputs"], self.cfg, b["segment_ids"], b["positions"])
        teacher = llama.forward(b["teacher_params"], b["inputs"], self.cfg, b["segment_ids"],
                                b["positions"])
        kd = kd_loss(student, teacher, b["loss_mask"], temperature=self.args.kd_temperature)
        return ce + self.args.kd_weight * kd, {**aux, "kd": kd}

    def step_fn(self, kd: bool):
        if kd not in self._steps:  # no donation: checkpoints A and A' start several variants
            self._steps[kd] = train.make_train_step(self.kd_loss_fn if kd else self.loss,
                                                    self.tx, donate=False)
        return self._steps[kd]

    def run(self, name, state, schedule, data, steps, kd=False):
        """``steps`` steps from ``state``; step ``s`` (0-based, of this stage) uses
        ``schedule(s)``, a :mod:`jaxeff.schedules` function."""
        step = self.step_fn(kd)
        lrs = np.asarray(jax.vmap(schedule)(jnp.arange(steps)), np.float32)
        curve, t0 = [], time.perf_counter()
        for s in range(steps):
            state = state.replace(opt_state=set_lr(state.opt_state, lrs[s]))
            state, _ = step(state, next(data))
            if (s + 1) % self.args.eval_every == 0 and s + 1 != steps:
                curve.append({"step": s + 1, **self.evaluate(state.params)})
        jax.block_until_ready(state.params)
        wall = time.perf_counter() - t0
        final = self.evaluate(state.params)
        curve.append({"step": steps, **final})
        print(f"  {name:<18} old={final['old']:.4f} new={final['new']:.4f}  lr {lrs[0]:.2e}"
              f"..{lrs.max():.2e}..{lrs[-1]:.2e}  ({wall:.0f}s)", flush=True)
        return state, {"final": final, "curve": curve, "train_s": wall,
                       "lr": [float(lrs[0]), float(lrs.max()), float(lrs[-1])]}


# ------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    tok = ByteTokenizer()
    cfg = llama.PRESETS["tiny"].replace(max_seq_len=max(256, args.seq_len))
    new_fams = tuple(f.strip() for f in args.new.split(",") if f.strip())
    variants = args.variants.split(",")
    B, Lq, peak = args.batch_size, args.seq_len, args.lr
    eta_c, eta_min = args.eta_c * peak, args.eta_min * peak

    docs = load_stdlib_corpus("all")
    corpus = Corpus(chunk_documents(docs, args.chunk), "stdlib-chunked")
    part = lambda split, new: Corpus(  # noqa: E731
        [d for d in split_corpus(corpus, split, args.val_fraction)
         if (d.meta["domain"] in new_fams) == new], f"{'new' if new else 'old'}:{split}")
    old_tr, new_tr = part("train", False), part("train", True)
    old_va, new_va = part("validation", False), part("validation", True)
    if not len(new_tr) or not len(new_va):
        raise SystemExit(f"--new {args.new!r}: need train and validation documents; got "
                         f"{len(new_tr)} / {len(new_va)}")
    evals = {k: make_eval_batches(eval_docs(c, args.eval_batches * B, Lq), tok, Lq, B,
                                  max_batches=args.eval_batches)
             for k, c in (("old", old_va), ("new", new_va))}
    tx = optimizer(peak)
    runner = Runner(args, cfg, evals, tx)
    data = lambda c, b=B, seed=args.seed: iter(make_lm_dataset(  # noqa: E731
        c, tok, Lq, b, seed=seed, shard=(0, 1)))
    u_new = unique_target_tokens(new_tr, tok)
    print(f"study_continued_pretraining: old={len(old_tr)} docs, new={len(new_tr)} docs "
          f"({u_new:,} unique target tokens; families {','.join(new_fams)}); tiny model "
          f"({llama.param_count(llama.abstract_params(cfg)):,} params), batch {B}x{Lq}, "
          f"steps {args.steps1}+{args.anneal} then {args.steps2} per variant", flush=True)

    # ---- stage 1: infinite schedule on old data; A at the end of the constant phase, A' annealed
    T1 = args.steps1 + args.anneal
    sched1 = schedules.infinite(peak, T1, warmup_end=0.05, cooldown_end=0.15,
                                anneal_start=args.steps1 / T1, eta_c=eta_c, eta_min=eta_min)
    params0 = llama.init_params(jax.random.key(args.seed), cfg)
    old_it = data(old_tr)
    state_a, r_a = runner.run("stage1 -> A", train.init_train_state(params0, tx, args.seed),
                              sched1, old_it, args.steps1)
    state_a2, r_a2 = runner.run("anneal A -> A'", state_a,
                                lambda s: sched1(s + args.steps1), old_it, args.anneal)
    base_old, base_new = r_a2["final"]["old"], r_a2["final"]["new"]
    results = {"A": r_a, "A'": r_a2}
    S2 = args.steps2
    # Stage switches keep the whole optimizer state (Adam moments and count); the learning rate
    # comes from the new stage's schedule, indexed from 0.
    rewarm = schedules.rewarm(eta_min, peak, S2, warmup=max(1, S2 // 10), decay="cosine",
                              final=eta_min)

    for v in variants:
        if v == "constant-min":
            _, results[v] = runner.run(v, state_a2, lambda s: jnp.full_like(
                s, eta_min, dtype=jnp.float32), data(new_tr), S2)
        elif v == "rewarm":
            state_rw, results[v] = runner.run(v, state_a2, rewarm, data(new_tr), S2)
        elif v == "infinite":
            resume = schedules.infinite(eta_c, S2, warmup_end=0.0, cooldown_end=0.0,
                                        anneal_start=0.8, eta_c=eta_c, eta_min=eta_min)
            _, results[v] = runner.run(v, state_a, resume, data(new_tr), S2)
        elif v == "rewarm+replay":
            n_old = max(1, int(round(args.replay * B)))
            it = concat_batches(data(new_tr, B - n_old), data(old_tr, n_old, args.seed + 1))
            _, results[v] = runner.run(v, state_a2, rewarm, it, S2)
            results[v]["replay_rows"] = n_old
        elif v == "rewarm+hq-epochs":
            hq = hq_subset(new_tr, tok, int(S2 * B * Lq / args.hq_epochs))
            counter = EpochCounter(unique_target_tokens(hq, tok))
            it = CountingIterator(data(hq), counter)
            _, results[v] = runner.run(v, state_a2, rewarm, it, S2)
            results[v].update(hq_docs=len(hq), hq_unique_tokens=counter.unique_tokens,
                              epochs=counter.epochs)
        elif v == "rewarm+kd":
            it = with_teacher(data(new_tr), state_a2.params)
            _, results[v] = runner.run(v, state_a2, rewarm, it, S2, kd=True)
        elif v == "scratch":
            wsd = schedules.wsd(peak, S2, warmup=max(1, S2 // 10), decay_fraction=0.2)
            _, results[v] = runner.run(v, train.init_train_state(params0, tx, args.seed), wsd,
                                       data(new_tr), S2)
    if "soup" in variants:
        if "rewarm" not in results:
            warnings.warn("variant 'soup' needs 'rewarm'; skipped")
        else:
            soup = uniform_soup([state_a2.params, state_rw.params])
            final = runner.evaluate(soup)
            results["soup"] = {"final": final, "curve": [], "train_s": 0.0}
            print(f"  {'soup':<18} old={final['old']:.4f} new={final['new']:.4f}", flush=True)

    # ---- report
    epochs_new = S2 * B * Lq / u_new
    header = (f"{'variant':<18} {'old loss':>9} {'forget':>8} {'worst old':>9} {'new loss':>9} "
              f"{'new gain':>9} {'train s':>8}")
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        f = r["final"]
        worst = max([c["old"] for c in r["curve"]] or [f["old"]])
        lines.append(f"{name:<18} {f['old']:9.4f} {f['old'] - base_old:+8.4f} {worst:9.4f} "
                     f"{f['new']:9.4f} {base_new - f['new']:+9.4f} {r['train_s']:8.1f}")
    table = "\n".join(lines)
    print("\n" + table)
    print(f"(forget = old loss - A' old loss {base_old:.4f}; new gain = A' new loss "
          f"{base_new:.4f} - new loss; stage 2 = {epochs_new:.3f} epochs of the new data"
          + (f"; hq subset {results['rewarm+hq-epochs']['epochs']:.2f} epochs"
             if "rewarm+hq-epochs" in results else "") + ")")
    out = args.out or os.path.join("runs", "continued-"
                                   + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    summary = {"command": "python -m experiments.study_continued_pretraining "
               + " ".join(argv if argv is not None else sys.argv[1:]),
               "args": vars(args), "new_families": new_fams, "results": results,
               "table": table, "total_wall_s": time.perf_counter() - t_start,
               "total_cpu_s": cpu_seconds(),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "devices": str(jax.devices())}}
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1, default=float)
    print(f"wrote {out}/summary.json (total {summary['total_wall_s']:.0f}s wall, "
          f"{summary['total_cpu_s']:.0f}s CPU)", flush=True)
    return summary


if __name__ == "__main__":
    main()
