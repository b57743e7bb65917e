"""Post-training quantization study: RTN vs GPTQ on the reference model.

    python -m experiments.quantize_study                     # train tiny (200 steps), full grid
    python -m experiments.quantize_study --quick             # smoke run (~2 minutes)
    python -m experiments.quantize_study --params runs/q/params --bits 4,3   # reuse a checkpoint

Trains the reference LLaMA (``jaxeff.models.llama`` preset, the speedrun's baseline recipe) or
restores its params from an Orbax checkpoint, then quantizes the linear layers inside the blocks
(``layers/(wq|wk|wv|wo|w_gate|w_up|w_down)``; embeddings, head and norms stay dense, as in the
paper) at 8/4/3/2 bits with round-to-nearest and with GPTQ ("GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", Frantar et al., ICLR 2023), for group
sizes none/128/32 (where the input dims allow) and act-order off/on. GPTQ calibrates on
``--calib`` random training segments (default 128, as in the paper) of the training length.

Reports validation loss, perplexity (per byte: the tokenizer is byte-level), the mean
KL(fp32 || quantized) of the next-token distributions on the validation tokens, the model's bytes
and the quantization wall-clock (including XLA compilation: every setting compiles its own
solve; ``--warm`` also times a second, compiled run) as a Markdown table on stdout and
``quantize_study.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from experiments.speedrun import build_context, parse_args as speedrun_args
from jaxeff import train
from jaxeff.models import llama
from jaxeff.params import calibration_batches, gptq_model, llama_like
from jaxeff.params import rtn, tree_nbytes
from jaxeff.params import materialize

SELECT = "layers/(wq|wk|wv|wo|w_gate|w_up|w_down)$"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=None, help="training steps (speedrun default)")
    p.add_argument("--params", default=None, help="Orbax checkpoint of params: skip training")
    p.add_argument("--bits", default="8,4,3,2")
    p.add_argument("--groups", default="none,128,32")
    p.add_argument("--act-order", default="off,on", help="GPTQ act-order settings to run")
    p.add_argument("--calib", type=int, default=128, help="calibration segments")
    p.add_argument("--calib-batch", type=int, default=16, help="segments per calibration batch")
    p.add_argument("--warm", action="store_true",
                   help="run each GPTQ setting twice and also report the second (compiled) time")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _groups_ok(params, gs):
    """Group size usable for every selected weight (divides each input dim; a group as large as
    the input dim is the same as no groups for that weight)."""
    if gs is None:
        return True
    dims = [params["layers"][n].shape[-2] for n in
            ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")]
    return all(d % gs == 0 for d in dims)


def main(argv=None):
    args = parse_args(argv)
    sargs = speedrun_args(["--model", args.model, "--seed", str(args.seed), "--no-progress"]
                          + (["--quick"] if args.quick else [])
                          + (["--steps", str(args.steps)] if args.steps else [])
                          + (["--out", args.out] if args.out else []))
    ctx = build_context(sargs)
    cfg = ctx.cfg
    ckpt = ocp.StandardCheckpointer()
    if args.params:
        params = ckpt.restore(os.path.abspath(args.params), llama.abstract_params(cfg))
        train_s = 0.0
    else:
        t = time.perf_counter()
        res = ctx.train("fp32", ctx.init_params(), ctx.adamw())
        params = res["state"].params
        train_s = time.perf_counter() - t
        ckpt.save(os.path.abspath(os.path.join(ctx.out_dir, "params")), params)
        ckpt.wait_until_finished()
    eval_fn = train.make_eval_fn(lambda p, b: llama.loss_fn(p, b, cfg))
    evals = ctx.eval_batches()

    def val_loss(p):
        return train.evaluate(eval_fn, materialize(p), evals)

    # KL(fp32 || quantized) of the next-token distributions: far less noisy than the loss
    # difference when quantization barely moves the loss.
    logp = jax.jit(lambda p, b: jax.nn.log_softmax(
        llama.forward(materialize(p), b["inputs"], cfg, b["segment_ids"], b["positions"]), -1))
    fp_logp = [logp(params, b) for b in evals]

    @jax.jit
    def kl_sum(p, b, lp_fp):
        kl = jnp.sum(jnp.exp(lp_fp) * (lp_fp - logp(p, b)), -1)
        return jnp.sum(kl * b["loss_mask"]), jnp.sum(b["loss_mask"])

    def kl_to_fp(p):
        tot = [kl_sum(p, b, lp) for b, lp in zip(evals, fp_logp)]
        return float(sum(t[0] for t in tot) / sum(t[1] for t in tot))

    n_cal = 16 if args.quick else args.calib
    calib = calibration_batches(n_cal, ctx.seq_len, min(args.calib_batch, n_cal), seed=1234,
                                corpus=ctx.train_corpus, tokenizer=ctx.tokenizer)
    model = llama_like(llama, cfg)
    bits_list = [int(b) for b in args.bits.split(",")]
    groups = [None if g == "none" else int(g) for g in args.groups.split(",")]
    groups = [g for g in groups if _groups_ok(params, g)]
    orders = [a == "on" for a in args.act_order.split(",")]

    fp_loss = val_loss(params)
    rows = [{"method": "fp32", "bits": 32, "group": "-", "act_order": "-", "val_loss": fp_loss,
             "ppl": math.exp(fp_loss), "kl": 0.0, "bytes": tree_nbytes(params), "quant_s": 0.0,
             "warm_s": None}]
    print(f"model={args.model} params={llama.param_count(params):,} train_s={train_s:.0f} "
          f"fp32 val_loss={fp_loss:.4f} calib={len(calib)}x{calib[0]['inputs'].shape}",
          flush=True)
    for bits in bits_list:
        for gs in groups:
            t = time.perf_counter()
            q = rtn(params, bits, gs, select=SELECT)
            jax.block_until_ready(q)
            settings = [("rtn", None, q, time.perf_counter() - t)]
            for ao in orders:
                times = []
                for _ in range(2 if args.warm else 1):
                    t = time.perf_counter()
                    q = gptq_model(params, model, calib, bits, gs, select=SELECT, act_order=ao,
                                   progress=False)
                    jax.block_until_ready(q)
                    times.append(time.perf_counter() - t)
                settings.append(("gptq", ao, q, times))
            for method, ao, q, secs in settings:
                secs, warm = (secs[0], secs[-1] if len(secs) > 1 else None) \
                    if isinstance(secs, list) else (secs, None)
                loss = val_loss(q)
                row = {"method": method, "bits": bits, "group": gs or "none",
                       "act_order": "-" if ao is None else ("on" if ao else "off"),
                       "val_loss": loss, "ppl": math.exp(min(loss, 50.0)), "kl": kl_to_fp(q),
                       "bytes": tree_nbytes(q), "quant_s": secs, "warm_s": warm}
                rows.append(row)
                print(f"  {method:4s} {bits}b g={row['group']!s:4s} ao={row['act_order']:3s} "
                      f"loss={loss:.4f} ppl={row['ppl']:.3f} kl={row['kl']:.2e} "
                      f"bytes={row['bytes']:,} t={secs:.1f}s" + (f" warm={warm:.1f}s" if warm else ""), flush=True)

    lines = ["| method | bits | group | act-order | val loss | ppl/byte | KL to fp32 | "
             "model bytes | quantize s (warm) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        warm = f" ({r['warm_s']:.1f})" if r["warm_s"] else ""
        lines.append(f"| {r['method']} | {r['bits']} | {r['group']} | {r['act_order']} | "
                     f"{r['val_loss']:.4f} | {r['ppl']:.3f} | {r['kl']:.2e} | {r['bytes']:,} | "
                     f"{r['quant_s']:.1f}{warm} |")
    table = "\n".join(lines)
    print(table)
    summary = {"command": " ".join(["python -m experiments.quantize_study"]
                                   + (argv if argv is not None else sys.argv[1:])),
               "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": f"{platform.machine()} {os.cpu_count()} CPUs, "
                          f"jax {jax.__version__} {jax.default_backend()}",
               "model": args.model, "train_steps": ctx.steps, "train_s": train_s,
               "calib_segments": sum(b["inputs"].shape[0] for b in calib),
               "seq_len": ctx.seq_len, "rows": rows, "table": table}
    with open(os.path.join(ctx.out_dir, "quantize_study.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
