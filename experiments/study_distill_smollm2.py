"""Study: SmolLM2-135M as the teacher of a small student with its tokenizer -- logit
distillation (``jaxeff.losses.kd_loss`` + CE) vs CE only, at equal tokens.

    python -m experiments.study_distill_smollm2              # ~6-8 CPU-minutes on 2 idle cores
    python -m experiments.study_distill_smollm2 --smoke      # 3 steps per arm (a wiring check)
    python -m experiments.study_distill_smollm2 --arms ce,kd+ce,kd --steps 200

Teacher: SmolLM2-135M-Instruct (``jaxeff.models.pretrained("smollm2-135m")``), frozen. Student:
a ``jaxeff.models.llama`` decoder with SmolLM2's 49,152-token vocabulary and tied embeddings,
``--layers`` layers of width ``--d-model`` (default 4 x 256, 4 heads of 64, 2 KV heads, SwiGLU
768, RoPE base 1e5 as the teacher: 15.7M params, 12.6M of them the embedding). Its embedding
starts (``--embed-init projected``, default) as the teacher's embedding projected onto its top
``d`` principal directions, ``E_s = E_t V_d`` with ``V_d`` the top-``d`` right singular vectors
of ``E_t [V, 576]`` (the least-squares best rank-``d`` view of the teacher's token geometry, so
tied output logits start from the teacher's token similarities), rescaled to the llama init's
std 0.02 (unscaled, the student starts at a held-out loss of ~37); ``random`` is the llama
default N(0, 0.02). The rest of the student is the llama default init. Both arms start from the
same student.

Arms, identical batches (tinyshakespeare train split, ``--batch-size x --seq-len`` packed rows,
fixed seed), identical AdamW and WSD schedule, equal steps (so equal tokens):

* ``ce``     next-token cross-entropy against the text;
* ``kd+ce``  ``alpha * kd_loss(student, teacher, T) + (1 - alpha) * CE`` (Hinton et al., 2015;
             ``--alpha`` 0.5, ``--temperature`` 1);
* ``kd``     the distillation term alone (alpha 1; not in the default set).

Teacher logits are computed on the fly inside the jitted step (one teacher forward per KD
batch, ``stop_gradient``; no cache). Evaluation: the loss against the ground-truth next token on
``--eval-rows`` held-out tinyshakespeare documents (validation split by hash; each its first
``--seq-len + 1`` tokens, no BOS), for the student before training, every ``--eval-every``
steps and at the end, and for the teacher once (the reference). Results:
``experiments/results/study_distill_smollm2.json``.

What this horizon can and cannot show: 41K training tokens per arm (a few CPU-minutes). It
shows whether the teacher's soft targets make the early student learn faster per token than the
text alone -- the regime where KD is expected to help most -- on real teacher logits. It cannot
show the converged gap, whether KD still helps once the student has seen many more tokens, or
the best alpha / temperature (one setting, untuned). The teacher is an instruct model whose
English loss on Shakespeare is ~3.5, itself far from the text, which caps what KD can transfer.
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

from experiments.common import cpu_seconds, eval_docs, rows_loss, run_record, token_rows, write_json
from jaxeff import schedules, train
from jaxeff.data import load_tinyshakespeare, make_lm_dataset
from jaxeff.losses import kd_loss
from jaxeff.models import llama, pretrained

ARMS = ("ce", "kd+ce", "kd")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "study_distill_smollm2.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default="ce,kd+ce", help=f"comma-separated subset of {ARMS}")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embed-init", choices=("projected", "random"), default="projected")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (WSD)")
    p.add_argument("--alpha", type=float, default=0.5, help="KD weight in kd+ce")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--eval-rows", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="3 steps per arm, 8 eval rows")
    p.add_argument("--out", default=None, help=f"results JSON (default {RESULTS}; --smoke: "
                                               "runs/distill_smollm2-smoke.json)")
    a = p.parse_args(argv)
    if a.smoke:
        a.steps, a.eval_rows, a.eval_every = 3, 8, 2
    bad = [x for x in a.arms.split(",") if x not in ARMS]
    if bad:
        p.error(f"--arms: unknown {bad}; choose from {ARMS}")
    if not 0 <= a.alpha <= 1:
        p.error(f"--alpha must be in [0, 1]; got {a.alpha}")
    if a.d_model % 64:
        p.error(f"--d-model must be a multiple of the head width 64; got {a.d_model}")
    return a


def student_config(teacher_cfg: llama.LlamaConfig, args) -> llama.LlamaConfig:
    """The teacher's vocabulary, tied embeddings and RoPE base at width ``d_model``, heads of
    the teacher's 64, half as many KV heads, SwiGLU 3 x d."""
    h = args.d_model // 64
    return llama.LlamaConfig(vocab_size=teacher_cfg.vocab_size, d_model=args.d_model,
                             n_layers=args.layers, n_heads=h, n_kv_heads=max(1, h // 2),
                             d_ff=3 * args.d_model, max_seq_len=max(256, args.seq_len),
                             rope_base=teacher_cfg.rope_base, tie_embeddings=True,
                             norm_eps=teacher_cfg.norm_eps)


def projected_embedding(embed_VxDt: jax.Array, d: int, std: float = 0.02) -> jax.Array:
    """``c E_t V_d``: the teacher embedding in its top-``d`` principal (right singular)
    directions (eigenvectors of ``E_t^T E_t``, largest first), scaled by ``c`` so its entries
    have the llama init's ``std`` (the teacher's rows are ~50x larger and would start the tied
    head at logits of hundreds)."""
    e = jnp.asarray(embed_VxDt, jnp.float32)
    _, vecs_DtxDt = jnp.linalg.eigh(e.T @ e)
    e_VxD = e @ vecs_DtxDt[:, ::-1][:, :d]
    return e_VxD * (std / jnp.std(e_VxD))


def main(argv=None):
    args = parse_args(argv)
    t_start, c_start = time.perf_counter(), cpu_seconds()
    load0 = os.getloadavg()[0]
    B, L = args.batch_size, args.seq_len
    tcfg, tparams, tok = pretrained("smollm2-135m")
    scfg = student_config(tcfg, args)
    s0 = llama.init_params(jax.random.key(args.seed), scfg)
    if args.embed_init == "projected":
        s0 = {**s0, "embed": projected_embedding(tparams["embed"], scfg.d_model)}

    eng_tr = load_tinyshakespeare(split="train", val_fraction=0.1)
    eng_va = load_tinyshakespeare(split="validation", val_fraction=0.1)
    rows = token_rows(eval_docs(eng_va, args.eval_rows, 8 * (L + 1)), tok, L + 1)
    s_loss = jax.jit(lambda p, r: llama.next_token_loss(p, r, scfg))
    teacher_loss = rows_loss(jax.jit(lambda p, r: llama.next_token_loss(p, r, tcfg)), tparams,
                             rows, 8)
    init_loss = rows_loss(s_loss, s0, rows, 8)
    print(f"study_distill_smollm2: teacher SmolLM2-135M ({llama.param_count(tparams):,} params, "
          f"held-out loss {teacher_loss:.4f}); student {scfg.n_layers}x{scfg.d_model} "
          f"({llama.param_count(s0):,} params, embedding {args.embed_init}, held-out loss "
          f"{init_loss:.4f}); {args.steps} steps x {B}x{L} tokens per arm; eval rows "
          f"{rows.shape}", flush=True)

    def loss(p, b, alpha):
        """``alpha * kd + (1 - alpha) * CE`` with the teacher's logits on the fly."""
        logits_s = llama.forward(p, b["inputs"], scfg, b["segment_ids"], b["positions"])
        ce, n = llama.cross_entropy(logits_s, b["targets"], b["loss_mask"])
        aux = {"tokens": n, "ce": ce}
        if alpha == 0.0:
            return ce, aux
        logits_t = llama.forward(b["teacher"], b["inputs"], tcfg, b["segment_ids"],
                                 b["positions"])
        kd = kd_loss(logits_s, logits_t, b["loss_mask"], temperature=args.temperature)
        return alpha * kd + (1.0 - alpha) * ce, {**aux, "kd": kd}

    lr = schedules.wsd(args.lr, args.steps, warmup=max(1, args.steps // 10), decay_fraction=0.2)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.1))
    results = {}
    for arm in args.arms.split(","):
        alpha = {"ce": 0.0, "kd+ce": args.alpha, "kd": 1.0}[arm]
        step = train.make_train_step(lambda p, b, a=alpha: loss(p, b, a), tx)
        state = train.init_train_state(jax.tree.map(jnp.copy, s0), tx, args.seed)
        it = iter(make_lm_dataset(eng_tr, tok, L, B, seed=args.seed, shard=(0, 1),
                                  vocab_size=tcfg.vocab_size))
        t0, c0 = time.perf_counter(), cpu_seconds()
        curve, evals = [], [{"step": 0, "loss": init_loss}]
        for s in range(args.steps):
            batch = next(it)
            if alpha:
                batch = {**batch, "teacher": tparams}
            state, m = step(state, batch)
            curve.append({k: float(v) for k, v in m.items() if k in ("loss", "ce", "kd")})
            if (s + 1) % args.eval_every == 0 or s + 1 == args.steps:
                evals.append({"step": s + 1, "loss": rows_loss(s_loss, state.params, rows, 8)})
                print(f"  {arm:<6} step {s + 1:>4}/{args.steps}  train ce "
                      f"{curve[-1]['ce']:.4f}  held-out {evals[-1]['loss']:.4f}  "
                      f"({time.perf_counter() - t0:.0f}s, {cpu_seconds() - c0:.0f} CPU-s)",
                      flush=True)
        results[arm] = {"alpha": alpha, "final": evals[-1]["loss"], "evals": evals,
                        "train": curve, "train_wall_s": time.perf_counter() - t0,
                        "train_cpu_s": cpu_seconds() - c0, "tokens": args.steps * B * L}
        del state

    lines = [f"{'arm':<6} {'alpha':>5} {'held-out':>9} {'vs ce':>8} {'train CPU-s':>11}",
             "-" * 43]
    for arm, r in results.items():
        vs = r["final"] - results["ce"]["final"] if "ce" in results else float("nan")
        lines.append(f"{arm:<6} {r['alpha']:5.2f} {r['final']:9.4f} {vs:+8.4f} "
                     f"{r['train_cpu_s']:11.0f}")
    table = "\n".join(lines)
    print(f"\nteacher {teacher_loss:.4f}, student at init {init_loss:.4f}\n{table}")
    summary = {
        "study": "distill_smollm2",
        **run_record("study_distill_smollm2", argv, t_start, c_start, load0),
        "args": vars(args), "student_config": {k: getattr(scfg, k) for k in (
            "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "head_dim")},
        "student_params": llama.param_count(s0), "teacher_loss": teacher_loss,
        "student_init_loss": init_loss, "results": results, "table": table,
        "eval_rows": list(rows.shape), "tokens_per_arm": args.steps * B * L}
    out = args.out or (os.path.join("runs", "distill_smollm2-smoke.json") if args.smoke
                       else RESULTS)
    write_json(json.loads(json.dumps(summary, default=float)), out)
    print(f"total {summary['total_wall_s']:.0f}s wall, {summary['total_cpu_s']:.0f} CPU-s, "
          f"load {load0:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
    return summary


if __name__ == "__main__":
    main()
