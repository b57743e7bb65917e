"""Study: vocabulary extension of SmolLM2-135M for Python code -- compression and the loss per
byte for three initialisations of the new embeddings, right after extension and after a short
continued pre-training.

    python -m experiments.study_vocab_extension            # ~3-4 CPU-minutes (N=1024, 6 steps)
    python -m experiments.study_vocab_extension --smoke    # tiny sizes, checks the plumbing

1. **Tokens.** ``jaxeff.models.extend_bpe`` continues SmolLM2's BPE on the stdlib corpus's
   training split (``jaxeff.data.load_stdlib_corpus``): N in ``--ns`` (256, 512, 1024) new merges,
   old ids unchanged (one run to the largest N; the smaller ones are its prefixes,
   ``VocabExtension.truncate``). Reported: bytes per token on the held-out split (all of it) before/after.
2. **Initialisations** of the ``--n`` new rows of the tied embedding (``jaxeff.params
   .extend_embedding``): ``random`` (``random_rows``: N(0, sigma^2), sigma of the old rows),
   ``mean`` of the sub-piece embeddings (``mean_rows``), ``distill`` (BIOptimus's contextualized
   weight distillation, ``jaxeff.models.distill_new_rows``, from the mean, ``--distill-steps`` x
   ``--batch`` contexts of ``--distill-len`` tokens, each seen once; objective in its docstring).
   The objective of all three is also measured on ``2 x --batch`` held-out contexts.
3. **Loss per byte** on ``--eval-segments`` held-out segments of ``--eval-chars`` characters
   (each predicted after one ``<|endoftext|>``; total NLL in nats over all text tokens / UTF-8
   bytes, so models with different tokenizers are comparable) for the unextended model and each
   initialisation, right after extension and after ``--steps`` steps of continued pre-training
   on the same batches (``--batch`` training segments of ``--train-chars`` characters per step,
   identical text for every run, each tokenized by its run's tokenizer). Only the (tied)
   embedding trains (Adam, constant ``--lr``, mean next-token loss), for the unextended model too.

What this small horizon can show: whether compression is real on held-out code, and which
initialisation starts closest to the old model and recovers fastest in a few steps. It cannot
show the long-run effect of extension (papers train for thousands of steps), and it trains only
embeddings. Results: ``experiments/results/study_vocab_extension.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def _segments(docs, n, chars, rng):
    """``n`` text segments of about ``chars`` characters, starting at a line start."""
    docs = [d.text for d in docs if len(d.text) > 2 * chars]
    out = []
    while len(out) < n:
        t = docs[rng.integers(len(docs))]
        s = int(rng.integers(len(t) - chars))
        s = t.rfind("\n", 0, s) + 1
        out.append(t[s:s + chars])
    return out


def _batch(tok, texts, length, start_id):
    """Inputs/targets/segment ids/loss mask for texts each predicted after ``start_id``."""
    B = len(texts)
    inputs, targets = np.zeros((B, length), np.int32), np.zeros((B, length), np.int32)
    seg = np.zeros((B, length), np.int32)
    for b, t in enumerate(texts):
        ids = np.concatenate([[start_id], tok.encode(t)]).astype(np.int32)
        n = ids.size - 1
        if n > length:
            raise ValueError(f"segment of {n} tokens > padded length {length}")
        inputs[b, :n], targets[b, :n], seg[b, :n] = ids[:-1], ids[1:], 1
    return {"inputs": inputs, "targets": targets, "segment_ids": seg, "loss_mask": seg}


def _pad_len(toks, texts, mult=32):
    n = max(len(t.encode(x)) for t in toks for x in texts) + 1
    return -(-n // mult) * mult


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", default="256,512,1024")
    ap.add_argument("--n", type=int, default=1024, help="new tokens for the loss study")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--train-chars", type=int, default=256)
    ap.add_argument("--eval-segments", type=int, default=4)
    ap.add_argument("--eval-chars", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--distill-steps", type=int, default=10)
    ap.add_argument("--distill-len", type=int, default=48)
    ap.add_argument("--distill-lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "study_vocab_extension.json"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.ns, args.n, args.steps, args.batch = "64", 64, 2, 2
        args.eval_segments, args.eval_chars, args.train_chars = 2, 256, 128
        args.distill_steps, args.distill_len = 2, 32
        args.out = args.out.replace(".json", "_smoke.json")

    import jax
    import jax.numpy as jnp
    import optax

    from jaxeff.data import load_stdlib_corpus
    from jaxeff.models import (distill_new_rows, distillation_objective, distillation_samples,
                               extend_bpe, llama, pretrained)
    from jaxeff.params import extend_embedding, mean_rows, random_rows

    c0, w0 = time.process_time(), time.perf_counter()
    cfg, params, tok = pretrained("smollm2-135m")
    train = load_stdlib_corpus("train")
    val = load_stdlib_corpus("validation")
    train_texts = [d.text for d in train]
    if args.smoke:
        train_texts = train_texts[:40]
    val_text = "".join(d.text for d in val)
    out = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized)", "args": vars(args),
           "corpus": {"train_docs": len(train_texts), "train_chars": sum(map(len, train_texts)),
                      "val_docs": len(val), "val_bytes": len(val_text.encode())}}

    # 1. tokens and compression ---------------------------------------------------------
    nbytes = len(val_text.encode())
    old_tokens = int(tok.encode(val_text).size)
    comp = {"old": {"tokens": old_tokens, "bytes_per_token": nbytes / old_tokens}}
    ns = sorted({int(x) for x in args.ns.split(",")} | {args.n})
    t0 = time.process_time()
    full = extend_bpe(tok, train_texts, ns[-1])
    comp["extend_cpu_s"] = time.process_time() - t0
    exts = {}
    for n in ns:
        ext = full.truncate(n) if n < full.n_new else full
        ids = ext.tokenizer.encode(val_text)
        assert ext.tokenizer.decode(ids) == val_text
        exts[n] = ext
        comp[str(n)] = {"tokens": int(ids.size), "bytes_per_token": nbytes / ids.size,
                        "token_reduction": 1 - ids.size / old_tokens,
                        "new_tokens_used_on_val": int(np.unique(ids[ids >= ext.old_vocab_size]).size),
                        "first_tokens": list(ext.tokens[:12])}
        print(f"N={n}: bytes/token {comp['old']['bytes_per_token']:.3f} -> "
              f"{nbytes / ids.size:.3f} ({100 * (1 - ids.size / old_tokens):.1f}% fewer tokens)",
              flush=True)
    out["compression"] = comp

    def save(stage):
        out["stage_done"] = stage
        out["cpu_s"] = time.process_time() - c0
        out["wall_s"] = time.perf_counter() - w0
        out["load_avg_1min_end"] = os.getloadavg()[0]
        out["machine"] = f"{platform.machine()} {os.cpu_count()} CPUs (shared; wall times inflated)"
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)

    save("compression")
    ext = exts[args.n]
    V, N = ext.old_vocab_size, ext.n_new
    ecfg = cfg.replace(vocab_size=V + N)

    # 2. loss per byte right after extension: unextended, random, mean -------------------
    rng = np.random.default_rng(args.seed)
    eot = tok.backend.token_to_id("<|endoftext|>")
    eval_texts = _segments(val, args.eval_segments, args.eval_chars, rng)
    train_batches = [_segments(train, args.batch, args.train_chars, rng)
                     for _ in range(args.steps)]
    all_train = [t for b in train_batches for t in b]
    eval_len = _pad_len([tok, ext.tokenizer], eval_texts)
    train_len = _pad_len([tok, ext.tokenizer], all_train)
    eval_bytes = sum(len(t.encode()) for t in eval_texts)
    out["eval"] = {"segments": len(eval_texts), "bytes": eval_bytes}

    def make(c):
        def loss(embed, rest, batch):
            return llama.loss_fn({**rest, "embed": embed}, batch, c)

        tx = optax.adam(args.lr)

        @jax.jit
        def step(embed, opt, rest, batch):
            (l, _), g = jax.value_and_grad(loss, has_aux=True)(embed, rest, batch)
            u, opt = tx.update(g, opt, embed)
            return optax.apply_updates(embed, u), opt, l

        @jax.jit
        def nll_sum(embed, rest, batch):
            l, aux = loss(embed, rest, batch)
            return l * aux["tokens"], aux["tokens"]

        return tx, step, nll_sum

    fns = {"old": make(cfg), "ext": make(ecfg)}
    rest = {k: v for k, v in params.items() if k != "embed"}
    toks = {"old": tok, "ext": ext.tokenizer}
    eval_batch = {kind: {k: jnp.asarray(v) for k, v in _batch(t, eval_texts, eval_len,
                                                             eot).items()}
                  for kind, t in toks.items()}

    def per_byte(kind, embed):
        s, n = fns[kind][2](embed, rest, eval_batch[kind])
        return float(s) / eval_bytes, int(n)

    runs = {"unextended": ("old", params["embed"]),
            "random": ("ext", extend_embedding(
                params, random_rows(jax.random.key(args.seed), params["embed"], N))["embed"]),
            "mean": ("ext", extend_embedding(params, mean_rows(params["embed"],
                                                               ext.pieces))["embed"])}
    results = {}

    def before(name):
        c1 = time.process_time()
        lpb, n_eval = per_byte(*runs[name])
        results[name] = {"loss_per_byte_before": lpb, "bits_per_byte_before": lpb / np.log(2),
                         "eval_tokens": n_eval, "eval_cpu_s": time.process_time() - c1}
        out["loss_per_byte"] = results
        print(f"{name:10s} loss/byte right after extension {lpb:.4f} ({n_eval} eval tokens)",
              flush=True)
        save(f"before {name}")

    for name in list(runs):
        before(name)

    # 3. contextualized weight distillation (from the mean) -----------------------------
    t0 = time.process_time()
    mean_new = runs["mean"][1][V:]
    samples = distillation_samples(ext, train_texts, seq_len=args.distill_len,
                                   n_samples=args.distill_steps * args.batch, seed=args.seed)
    res = distill_new_rows(params, cfg, ext, mean_new, samples, steps=args.distill_steps,
                           batch_size=args.batch, learning_rate=args.distill_lr)
    out["distill"] = {"objective": res.objective.tolist(), "hidden": res.hidden.tolist(),
                      "kl": res.kl.tolist(), "cpu_s": time.process_time() - t0,
                      "contexts": int(samples.student_ids.shape[0]),
                      "new_tokens_in_contexts": int(np.unique(
                          samples.student_ids[samples.student_ids >= V]).size)}
    runs["distill"] = ("ext", extend_embedding(params, res.rows)["embed"])
    held = distillation_samples(ext, [d.text for d in val], seq_len=args.distill_len,
                                n_samples=2 * args.batch, seed=args.seed)
    out["distill"]["heldout_objective"] = {
        k: dict(zip(("J", "hidden", "kl"),
                    distillation_objective(params, cfg, ext, runs[k][1][V:], held)))
        for k in ("random", "mean", "distill")}
    print(f"distill: J {res.objective[0]:.4f} -> {res.objective[-1]:.4f} on its batches; "
          f"held-out contexts: " + ", ".join(f"{k} {v['J']:.4f}" for k, v in
                                            out["distill"]["heldout_objective"].items())
          + f" ({time.process_time() - t0:.0f} CPU-s)", flush=True)
    save("distill")
    before("distill")

    # 4. continued pre-training: same steps, same text, embedding only -------------------
    for name, (kind, embed) in runs.items():
        tx, step, _ = fns[kind]
        c1, w1 = time.process_time(), time.perf_counter()
        opt, curve, train_tokens = tx.init(embed), [], 0
        for texts in train_batches:
            b = _batch(toks[kind], texts, train_len, eot)
            train_tokens += int(b["loss_mask"].sum())
            embed, opt, l = step(embed, opt, rest, {k: jnp.asarray(v) for k, v in b.items()})
            curve.append(float(l))
        after, _ = per_byte(kind, embed)
        results[name].update({
            "loss_per_byte_after": after, "bits_per_byte_after": after / np.log(2),
            "train_tokens": train_tokens, "train_loss_curve": curve,
            "max_old_row_change": float(jnp.max(jnp.abs(embed[:V] - params["embed"]))),
            "train_cpu_s": time.process_time() - c1, "train_wall_s": time.perf_counter() - w1})
        print(f"{name:10s} loss/byte {results[name]['loss_per_byte_before']:.4f} -> "
              f"{after:.4f} after {args.steps} steps ({time.process_time() - c1:.0f} CPU-s)",
              flush=True)
        save(f"train {name}")
    save("all")
    print(f"total {out['cpu_s']:.0f} CPU-s, {out['wall_s']:.0f} s wall, load "
          f"{out['load_avg_1min_end']:.1f}; wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
