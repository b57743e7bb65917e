"""Study: width growth of a trained model, and learned (TinyFusion) vs fixed 2:1 depth pruning.

    python -m experiments.study_growth            # a few minutes on 2 CPU cores
    python -m experiments.study_growth --quick    # smoke run

Part A, width (Net2Net / bert2BERT): train a narrow model (d_model 64, 2 heads / 1 KV head, d_ff
128) for S steps, widen it 2x in every dimension (d_model 128, 4 heads / 2 KV heads, d_ff 256,
head_dim fixed) and continue for T steps with a fresh AdamW; compare with the wide model trained
from scratch for S+T steps (same tokens) and the narrow one trained for S+T steps. Growth variants:
FPI with equal splits (exact; copies stay identical forever), FPI with random splits (exact, breaks
the symmetry), AKI (not function-preserving). Exactness is checked on a batch (max |logit diff|).

Part B, depth pruning 2:1 (TinyFusion): train an 8-layer model, then keep 4 layers by (a) the
learned pattern (gates + LoRA, reference hyper-parameters, K search steps), (b) fixed patterns
(every first / every second layer of each pair, the first half), (c) the pair-respecting pattern
with the best loss right after pruning (a calibration baseline; all 16 are evaluated). Each shallow
model gets the same recovery fine-tune of R steps; the table shows the loss before and after.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.speedrun import SpeedrunContext
from jaxeff import train
from jaxeff.models import llama
from jaxeff.params import _depth_prune as dp
from jaxeff.params import widen

NARROW = llama.LlamaConfig(vocab_size=264, d_model=64, n_layers=4, n_heads=2, n_kv_heads=1,
                           d_ff=128, max_seq_len=128)
WIDE = NARROW.replace(d_model=128, n_heads=4, n_kv_heads=2, d_ff=256)
DEEP = NARROW.replace(n_layers=8)


def llama_width_spec(cfg: llama.LlamaConfig) -> dict:
    """Logical-axis spec of the reference LLaMA layout for :func:`jaxeff.params.widen`."""
    G, R = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads
    emb = ([(r"^embed$", -1, "tied")] if cfg.tie_embeddings
           else [(r"^embed$", -1, "out"), (r"^head$", -2, "in")])
    return {
        "mlp": [(r"layers/(w_gate|w_up)$", -1, "out"), (r"layers/w_down$", -2, "in")],
        "kv_heads": {"units": G, "axes": [(r"layers/(wq|wk|wv)$", -1, "out"),
                                          (r"layers/wo$", -2, "in")]},
        "q_per_kv": {"units": R, "axes": [(r"layers/wq$", -1, "out", "kv_heads"),
                                          (r"layers/wo$", -2, "in", "kv_heads")]},
        "d_model": emb + [(r"layers/(wq|wk|wv|w_gate|w_up)$", -2, "in"),
                          (r"layers/(wo|w_down)$", -1, "out"),
                          (r"layers/(attn_norm|mlp_norm)$", -1, "norm"),
                          (r"^final_norm$", -1, "norm")],
    }


def _ctx(args, cfg, out):
    return SpeedrunContext(cfg=cfg, steps=1, batch_size=args.batch_size, seq_len=args.seq_len,
                           peak_lr=args.lr, eval_every=10 ** 9, eval_batches_n=args.eval_batches,
                           out_dir=out, seed=args.seed, progress=not args.no_progress)


def _seg(ctx, name, params, cfg, steps, lr=None):
    ctx.cfg = cfg                # ctx.train evaluates with ctx.cfg's loss
    res = ctx.train(name, params, ctx.adamw(peak_lr=lr, steps=steps), steps=steps,
                    loss_fn=ctx.loss_fn(cfg), data=ctx.train_data())
    return res


def _val(ctx, params, cfg):
    return train.evaluate(train.make_eval_fn(ctx.loss_fn(cfg)), params, ctx.eval_batches())


def width_study(args, out):
    S, T = args.width_steps
    ctx = _ctx(args, NARROW, out)
    sizes = {"d_model": WIDE.d_model, "kv_heads": WIDE.n_kv_heads, "mlp": WIDE.d_ff}
    spec = llama_width_spec(NARROW)
    rows = []
    small = _seg(ctx, "narrow-S", ctx.init_params(NARROW), NARROW, S)
    p_small, w_small = small["state"].params, small["wall_s"]
    x = jnp.asarray(ctx.eval_batches()[0]["inputs"])
    ref = llama.forward(p_small, x, NARROW)
    variants = {"FPI equal split": dict(), "FPI random split": dict(split="random"),
                "AKI": dict(method="aki")}
    for name, kw in variants.items():
        grown, _ = widen(p_small, spec, sizes, key=jax.random.key(args.seed), **kw)
        diff = float(jnp.abs(llama.forward(grown, x, WIDE) - ref).max())
        at_growth = _val(ctx, grown, WIDE)
        res = _seg(ctx, f"grown-{name}", grown, WIDE, T)
        rows.append({"run": f"narrow {S} + widen ({name}) + {T}", "max_logit_diff": diff,
                     "val_at_growth": at_growth, "final_val": res["history"][-1]["val_loss"],
                     "wall_s": w_small + res["wall_s"]})
    for name, cfg in (("wide", WIDE), ("narrow", NARROW)):
        res = _seg(ctx, f"{name}-scratch", ctx.init_params(cfg), cfg, S + T)
        rows.append({"run": f"{name} from scratch, {S + T} steps", "max_logit_diff": None,
                     "val_at_growth": None, "final_val": res["history"][-1]["val_loss"],
                     "wall_s": res["wall_s"]})
    return rows, {"narrow_val_at_S": small["history"][-1]["val_loss"]}


def _search(ctx, params, cfg, steps, seed):
    """TinyFusion: learn the 2:1 keep pattern jointly with a LoRA recovery update."""
    tr = dp.init_depth_pruning(jax.random.key(seed), params, group_size=2, keep=1,
                               lora=r"layers/(wq|wk|wv|wo|w_gate|w_up|w_down)$", rank=8)
    tx = dp.pruning_optimizer(gate_lr=1e-3, lora_lr=1e-4)
    opt = tx.init(tr)
    tau = dp.temperature_schedule(steps)

    def loss(tr, batch, key, step):
        inp = batch["inputs"]
        m = dp.sample_layer_mask(tr["logits"], key, tau=tau(step), scaling=100.0,
                                 batch_size=inp.shape[0])
        p = dp.merge_lora(params, tr["lora"], alpha=16.0)
        seg, pos = batch["segment_ids"], batch["positions"]
        h = llama.embed(p, inp, cfg)
        h = dp.gated_scan(lambda lp, z: llama.block(lp, z, cfg, seg, pos), p["layers"], h, m)
        return llama.cross_entropy(llama.logits(p, h, cfg), batch["targets"],
                                   batch["loss_mask"])[0]

    @jax.jit
    def step(tr, opt, batch, i):
        g = jax.grad(loss)(tr, batch, jax.random.fold_in(jax.random.key(seed + 1), i), i)
        up, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, up), opt

    data = ctx.train_data(seed=seed + 7)
    t = time.perf_counter()
    for i in range(steps):
        tr, opt = step(tr, opt, next(data), i)
    jax.block_until_ready(tr)
    return tr["logits"], time.perf_counter() - t


def depth_study(args, out):
    P_steps, K, R = args.depth_steps
    ctx = _ctx(args, DEEP, out)
    deep = _seg(ctx, "deep-8L", ctx.init_params(DEEP), DEEP, P_steps)
    params = deep["state"].params
    shallow = DEEP.replace(n_layers=4)
    eval_fn = train.make_eval_fn(ctx.loss_fn(shallow))
    immediate = {}
    for pick in itertools.product((0, 1), repeat=4):           # all 16 pair-respecting patterns
        keep = [2 * g + k for g, k in enumerate(pick)]
        immediate[tuple(keep)] = train.evaluate(eval_fn, dp.prune_depth(params, keep),
                                                ctx.eval_batches())
    logits, search_s = _search(ctx, params, DEEP, K, args.seed)
    learned = tuple(dp.kept_layers(logits))
    best = min(immediate, key=immediate.get)
    cands = {"learned (TinyFusion)": learned, "best immediate loss (calibration)": best,
             "first of each pair": (0, 2, 4, 6), "second of each pair": (1, 3, 5, 7),
             "first half": (0, 1, 2, 3)}
    rows, done = [], {}
    for name, keep in cands.items():
        if keep in done:                      # same pattern: same fine-tune, report once more
            rows.append(dict(done[keep], method=name))
            continue
        pruned = dp.prune_depth(params, list(keep))
        before = immediate.get(keep) or train.evaluate(eval_fn, pruned, ctx.eval_batches())
        res = _seg(ctx, f"recover-{'-'.join(map(str, keep))}", pruned, shallow, R,
                   lr=args.lr / 3)
        done[keep] = {"method": name, "keep": list(keep), "val_before_ft": before,
                      "val_after_ft": res["history"][-1]["val_loss"]}
        rows.append(done[keep])
    ranks = sorted(immediate.values())
    extra = {"deep_val": deep["history"][-1]["val_loss"], "search_steps": K,
             "search_wall_s": search_s, "learned_pattern": list(learned),
             "learned_immediate_rank": ranks.index(immediate[learned]) + 1,
             "gate_probs": np.asarray(jax.nn.softmax(logits * 100.0, -1)).round(3).tolist(),
             "immediate_losses": {"-".join(map(str, k)): v for k, v in immediate.items()}}
    return rows, extra


def _f(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.width_steps = (4, 4) if args.quick else (150, 150)
    args.depth_steps = (6, 4, 4) if args.quick else (300, 100, 100)
    out = args.out or os.path.join(
        "runs", "study_growth-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    wrows, wextra = width_study(args, out)
    drows, dextra = depth_study(args, out)
    S, T = args.width_steps
    lines = [f"Width growth (narrow d64/2h/ff128 -> wide d128/4h/ff256; {S}+{T} steps, "
             f"batch {args.batch_size}x{args.seq_len}); narrow val at step {S}: "
             f"{wextra['narrow_val_at_S']:.4f}",
             f"{'run':<44} {'max|dlogit|':>11} {'val@growth':>10} {'final val':>9} {'wall s':>7}"]
    for r in wrows:
        lines.append(f"{r['run']:<44} {_f(r['max_logit_diff'], '.1e'):>11} "
                     f"{_f(r['val_at_growth']):>10} {r['final_val']:>9.4f} {r['wall_s']:>7.1f}")
    Pn, K, R = args.depth_steps
    lines += ["", f"Depth pruning 2:1 (8 -> 4 layers, d64; trained {Pn} steps, val "
              f"{dextra['deep_val']:.4f}; TinyFusion search {K} steps in "
              f"{dextra['search_wall_s']:.1f}s; recovery fine-tune {R} steps each)",
              f"{'method':<36} {'kept layers':<14} {'val before ft':>13} {'val after ft':>12}"]
    for r in drows:
        lines.append(f"{r['method']:<36} {str(r['keep']):<14} {r['val_before_ft']:>13.4f} "
                     f"{r['val_after_ft']:>12.4f}")
    lines.append(f"learned pattern ranks {dextra['learned_immediate_rank']}/16 by loss right "
                 f"after pruning; gate probabilities {dextra['gate_probs']}")
    table = "\n".join(lines)
    print(table, flush=True)
    summary = {"command": "python -m experiments.study_growth " + " ".join(argv or []),
               "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "cpus": os.cpu_count(), "width": wrows, "width_extra": wextra, "depth": drows,
               "depth_extra": dextra, "table": table, "total_wall_s": time.perf_counter() - t0}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print(f"wrote {out}/summary.json ({summary['total_wall_s']:.0f}s)", flush=True)
    return summary


if __name__ == "__main__":
    main()
