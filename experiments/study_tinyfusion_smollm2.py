"""TinyFusion depth pruning of a real model: SmolLM2-135M-Instruct, 30 -> 15 layers (2:1), 20 (3:2).

    python -m experiments.study_tinyfusion_smollm2                    # 2:1 and 3:2 (556 CPU-s)
    python -m experiments.study_tinyfusion_smollm2 --ratios 2:1       # 15 layers only
    python -m experiments.study_tinyfusion_smollm2 --smoke            # 2 steps each: the wiring

"TinyFusion: Diffusion Transformers Learned Shallow" (Fang et al., 2024; VainF/TinyFusion) learns
which layers to keep: the 30 layers are split into groups of M consecutive layers, each keeping N;
per group a logit per keep-pattern is sampled per example with a hard Gumbel-softmax
(straight-through, tau 4 -> 0.1, logits x 100), each layer runs ``x <- m Block(x) + (1 - m) x``
and a LoRA (r 8, alpha 16) trained jointly stands in for the fine-tune that follows
(``jaxeff.params.init_depth_pruning`` / ``sample_layer_mask`` / ``gated_scan`` /
``pruning_optimizer``: AdamW, gates lr 1e-3, LoRA lr 1e-4, clip 1.0 -- the reference's values).
The argmax pattern is kept (``kept_layers``) and the search's LoRA discarded, as in the reference.

Compared keep patterns, each cut from the original weights with ``jaxeff.params.prune_depth`` (a
real ``n_layers = k`` llama params tree: ``llama.forward``, ``generate``, ``save_safetensors``):

* ``learned``: TinyFusion's argmax pattern;
* ``first-k``: layers ``0 .. k-1`` (drop the top of the network);
* ``first of each group``: the first N layers of every group of M (2:1: every other layer, 0, 2,
  .., 28). This is also the argmax of the untrained logits (all equal; ties go to the first
  pattern), so a learned pattern equal to it means the gates did not move the argmax.

Each is then recovered by the same short LoRA fine-tune (``jaxeff.params.lora`` r 8, alpha 16 on
every linear of the shallow model, unmerged product in the forward, AdamW lr 1e-3 under a WSD
schedule, clip 1.0; the same batches for every pattern) and merged back to plain weights
(``LoRA.merge``); the held-out loss is measured before and after, and for the fp32 30-layer model.

Data: tinyshakespeare (``shared/data/tinyshakespeare.txt``, the whole file, 341,094 SmolLM2 tokens). Held out:
the last 8 x 257 tokens (8 rows of 256 predictions, no BOS). Search and recovery draw random
65-token windows (64 predictions) from the tokens before the last 16,384 (the gap keeps them off
the held-out text); search and recovery use different draws. English only: the stdlib-code corpus
is left out so that one domain shift (chat model -> Shakespeare) is all the fine-tune sees.

What this horizon can and cannot show: the paper searches for thousands of steps and fine-tunes
for hundreds of thousands; here the search is a few dozen steps of 4 x 64 tokens and recovery
24 steps, on a 2-core CPU. At lr 1e-4 for 32 steps the search's LoRA moves little (``||B||``
0.77 after the search, reported), so the gates mostly learn the pattern whose *immediate* loss is
lowest rather than the most recoverable one; and 24 LoRA steps recover only part of what is lost
(measured: 15 and 20 layers end at 8.06 and 5.44 against the 30-layer 3.659).
The numbers rank patterns under a short recovery on one text; they do not say which pattern
would win after a full fine-tune. Results: ``experiments/results/study_tinyfusion_smollm2.json``.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import time

import numpy as np

SELECT = r"layers/(wq|wk|wv|wo|w_gate|w_up|w_down)$"
EVAL_ROWS, EVAL_LEN, GAP = 8, 256, 16_384


def _cpu():
    return time.process_time()


def _windows(pool, rows, length, rng):
    starts = rng.integers(0, pool.size - length - 1, rows)
    return np.stack([pool[s:s + length + 1] for s in starts]).astype(np.int32)


def simple_patterns(n_layers, group_size, keep):
    """``first-k`` and ``first of each group`` keep lists for ``group_size:keep`` pruning."""
    k = n_layers * keep // group_size
    return {"first-k": list(range(k)),
            "first of each group": [g * group_size + i for g in range(n_layers // group_size)
                                    for i in range(keep)]}


def search(params, cfg, batches, group_size, keep, args):
    """TinyFusion: learn the ``group_size:keep`` pattern jointly with a LoRA; returns a report."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxeff.models import llama
    from jaxeff.params import (gated_scan, init_depth_pruning, kept_layers, lora, partition,
                               combine, pruning_optimizer, sample_layer_mask, temperature_schedule)

    key = jax.random.key(args.seed)
    adapted = lora(args.rank, args.alpha, select=SELECT).from_dense(key, params)
    lora_tr, frozen = partition(adapted)
    tr = {"logits": init_depth_pruning(key, params, group_size=group_size, keep=keep)["logits"],
          "lora": lora_tr}
    tx = pruning_optimizer(gate_lr=args.gate_lr, lora_lr=args.search_lora_lr)
    opt = tx.init(tr)
    tau = temperature_schedule(len(batches), args.tau_start, args.tau_end)

    def loss(tr, frozen, tok_BxT, k, i):
        inp, tgt = tok_BxT[:, :-1], tok_BxT[:, 1:]
        m_BxL = sample_layer_mask(tr["logits"], k, group_size=group_size, keep=keep, tau=tau(i),
                                  scaling=args.scaling, batch_size=inp.shape[0])
        p = combine(tr["lora"], frozen)             # LoRAWeight leaves: x W + s (x A) B
        seg = jnp.ones_like(inp)
        pos = jnp.broadcast_to(jnp.arange(inp.shape[1]), inp.shape)
        h = llama.embed(p, inp, cfg)
        h = gated_scan(lambda lp, z: llama.block(lp, z, cfg, seg, pos), p["layers"], h, m_BxL)
        return llama.cross_entropy(llama.logits(p, h, cfg), tgt, jnp.ones(tgt.shape))[0]

    @jax.jit
    def step(tr, opt, frozen, tok_BxT, i):
        l, g = jax.value_and_grad(loss)(tr, frozen, tok_BxT, jax.random.fold_in(key, i), i)
        up, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, up), opt, l

    c0, w0 = _cpu(), time.perf_counter()
    curve, keeps = [], []
    for i, b in enumerate(batches):
        tr, opt, l = step(tr, opt, frozen, jnp.asarray(b), i)
        curve.append(float(l))
        keeps.append(kept_layers(tr["logits"], group_size=group_size, keep=keep))
        print(f"  search {group_size}:{keep} step {i + 1}/{len(batches)} tau {float(tau(i)):.2f} "
              f"loss {curve[-1]:.3f} keep {keeps[-1]}", flush=True)
    logits = np.asarray(tr["logits"])
    probs = np.asarray(jax.nn.softmax(tr["logits"] * args.scaling, axis=-1))
    b_norm = float(jnp.sqrt(sum(jnp.sum(w.B ** 2) for w in jax.tree.leaves(
        tr["lora"], is_leaf=lambda x: hasattr(x, "B")) if hasattr(w, "B"))))
    init_keep = simple_patterns(cfg.n_layers, group_size, keep)["first of each group"]
    learned = keeps[-1]
    return {"learned": learned, "train_loss": curve, "keep_per_step": keeps,
            "final_logits": logits.round(5).tolist(),
            "pattern_probs_tau1": probs.round(4).tolist(),
            "groups_moved_from_init_argmax": int(sum(
                a != b for a, b in zip(np.array(learned).reshape(-1, keep).tolist(),
                                       np.array(init_keep).reshape(-1, keep).tolist()))),
            "lora_B_norm_after_search": b_norm,
            "tokens": int(sum(b[:, 1:].size for b in batches)),
            "cpu_s": _cpu() - c0, "wall_s": time.perf_counter() - w0}


def recover(params, cfg, keep, batches, eval_fn, eval_ids, args):
    """Prune to ``keep``, measure held-out loss, LoRA-recover, merge, measure again."""
    import jax
    import jax.numpy as jnp

    from jaxeff.models import llama
    from jaxeff.params import LoRA, combine, lora, partition, prune_depth

    c0, w0 = _cpu(), time.perf_counter()
    small = cfg.replace(n_layers=len(keep))
    shallow = prune_depth(params, keep)
    before = float(eval_fn(shallow, eval_ids, small))
    adapted = lora(args.rank, args.alpha, select=SELECT).from_dense(
        jax.random.key(args.seed + 1), shallow)
    tr, frozen = partition(adapted)
    tx, step = _recovery_step(args.recover_lr, len(batches), small)
    opt = tx.init(tr)
    curve = []
    for i, b in enumerate(batches):
        tr, opt, l = step(tr, opt, frozen, jnp.asarray(b))
        curve.append(float(l))
        if (i + 1) % 5 == 0 or i + 1 == len(batches):
            print(f"  recover {len(keep)}L step {i + 1}/{len(batches)} loss {curve[-1]:.3f}",
                  flush=True)
    merged = LoRA.merge(combine(tr, frozen))      # plain arrays: a real n_layers=k llama tree
    assert jax.tree.structure(merged) == jax.tree.structure(llama.abstract_params(small))
    after = float(eval_fn(merged, eval_ids, small))
    return {"keep": list(keep), "n_layers": len(keep), "heldout_before": before,
            "heldout_after": after, "train_loss": curve,
            "cpu_s": _cpu() - c0, "wall_s": time.perf_counter() - w0}


@functools.lru_cache(maxsize=None)
def _recovery_step(lr, steps, cfg):
    """The recovery optimizer and its jitted step (cached: one compile per shallow depth)."""
    import jax
    import optax

    from jaxeff.models import llama
    from jaxeff.params import combine
    from jaxeff.schedules import wsd

    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(wsd(lr, steps, min(3, steps - 1), decay_fraction=0.2),
                                 weight_decay=0.0))

    @jax.jit
    def step(tr, opt, frozen, tok_BxT):
        l, g = jax.value_and_grad(
            lambda t: llama.next_token_loss(combine(t, frozen), tok_BxT, cfg))(tr)
        up, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, up), opt, l
    return tx, step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratios", default="2:1,3:2", help="M:N, keep N of every M layers")
    ap.add_argument("--search-steps", type=int, default=32)
    ap.add_argument("--recover-steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=4, help="rows per step (one mask draw each)")
    ap.add_argument("--seq", type=int, default=64, help="predictions per row")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--gate-lr", type=float, default=1e-3)
    ap.add_argument("--search-lora-lr", type=float, default=1e-4)
    ap.add_argument("--recover-lr", type=float, default=1e-3)
    ap.add_argument("--scaling", type=float, default=100.0)
    ap.add_argument("--tau-start", type=float, default=4.0)
    ap.add_argument("--tau-end", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="2 search and 2 recovery steps")
    ap.add_argument("--data", default=None, help="tinyshakespeare.txt (default: "
                    "jaxeff.data.find_shared_data's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.search_steps = args.recover_steps = 2
    out_path = args.out or os.path.join(
        "experiments", "results",
        "study_tinyfusion_smollm2" + ("_smoke" if args.smoke else "") + ".json")
    ratios = []
    for r in args.ratios.split(","):
        m, n = (int(v) for v in r.split(":"))
        if not 0 < n < m:
            raise ValueError(f"--ratios entries must be M:N with 0 < N < M; got {r!r}")
        ratios.append((m, n))

    c_start, w_start, load_start = _cpu(), time.perf_counter(), os.getloadavg()[0]
    import jax

    from jaxeff.models import llama, pretrained

    from jaxeff.data import find_shared_data

    cfg, params, tok = pretrained("smollm2-135m")
    path = args.data or find_shared_data("tinyshakespeare.txt")
    if path is None:
        raise FileNotFoundError("tinyshakespeare.txt not found in $JAXEFF_SHARED_DATA or "
                                "../shared/data/; pass --data")
    with open(path) as f:
        ids = np.asarray(tok.encode(f.read()), np.int32)
    eval_ids = ids[-EVAL_ROWS * (EVAL_LEN + 1):].reshape(EVAL_ROWS, EVAL_LEN + 1)
    pool = ids[:-GAP]
    rng_s, rng_r = np.random.default_rng(args.seed), np.random.default_rng(args.seed + 1000)
    eval_fn = jax.jit(llama.next_token_loss, static_argnums=2)
    c0 = _cpu()
    fp32 = float(eval_fn(params, eval_ids, cfg))
    print(f"fp32 30-layer held-out loss {fp32:.4f} ({_cpu() - c0:.1f} CPU-s)", flush=True)
    report = {"study": "tinyfusion_smollm2", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF -> f32)",
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": "python -m experiments.study_tinyfusion_smollm2 " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "data")},
              "data": {"text": "tinyshakespeare.txt", "text_tokens": int(ids.size),
                       "heldout": f"last {EVAL_ROWS} x {EVAL_LEN + 1} tokens "
                                  f"({EVAL_ROWS * EVAL_LEN} predictions)",
                       "train_pool_tokens": int(pool.size),
                       "rows_per_step": f"{args.batch} x {args.seq + 1} tokens"},
              "fp32_30_layers_heldout": fp32, "ratios": {}}
    for m, n in ratios:
        name = f"{m}:{n}"
        print(f"== {name}: {cfg.n_layers} -> {cfg.n_layers * n // m} layers", flush=True)
        s_batches = [_windows(pool, args.batch, args.seq, rng_s) for _ in range(args.search_steps)]
        r_batches = [_windows(pool, args.batch, args.seq, rng_r)
                     for _ in range(args.recover_steps)]
        found = search(params, cfg, s_batches, m, n, args)
        patterns = {"learned (TinyFusion)": found["learned"],
                    **simple_patterns(cfg.n_layers, m, n)}
        rows, done = {}, {}
        for pname, keep in patterns.items():
            if tuple(keep) in done:           # same layers: same shallow model, same numbers
                rows[pname] = dict(rows[done[tuple(keep)]], same_as=done[tuple(keep)])
                continue
            print(f" {pname}: keep {keep}", flush=True)
            rows[pname] = recover(params, cfg, keep, r_batches, eval_fn, eval_ids, args)
            done[tuple(keep)] = pname
            print(f" {pname}: held-out {rows[pname]['heldout_before']:.4f} -> "
                  f"{rows[pname]['heldout_after']:.4f}", flush=True)
        report["ratios"][name] = {"search": found, "patterns": rows,
                                  "recovery_tokens": int(sum(b[:, 1:].size for b in r_batches))}
    report["cpu_s_total"] = _cpu() - c_start
    report["wall_s_total"] = time.perf_counter() - w_start
    report["machine"] = (f"{platform.machine()} {os.cpu_count()} cpus; 1-min load average "
                         f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
                         f"(shared machine: wall times inflated; CPU-s is the cost measure)")
    print(f"\nfp32 30 layers: held-out {fp32:.4f}")
    print("| ratio | pattern | layers kept | held-out before | after recovery |")
    print("|---|---|---|---|---|")
    for name, r in report["ratios"].items():
        for pname, row in r["patterns"].items():
            print(f"| {name} | {pname} | {row['keep']} | {row['heldout_before']:.4f} | "
                  f"{row['heldout_after']:.4f} |")
    print(f"CPU {report['cpu_s_total']:.0f} s, wall {report['wall_s_total']:.0f} s; "
          f"{report['machine']}")
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
