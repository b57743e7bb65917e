"""Study: parameter-efficient tuning of all-MiniLM-L6-v2 on a few-shot classification task.

    python -m experiments.study_peft            # ~4 CPU-min (CPU-s are reported in the JSON)
    python -m experiments.study_peft --quick    # smoke run (a few steps)

Task (built offline from the Python standard library that ships with the interpreter, read by
``jaxeff.data.load_stdlib_corpus``): classify a **docstring** (module, class or function,
``ast.get_docstring``, at least 40 characters, deduplicated, its first 48 WordPiece tokens with
[CLS]/[SEP]) by the top-level package it comes from. Target task: 6 packages (email, importlib,
multiprocessing, http, unittest, xml), 16 training docstrings per class (few-shot, PVP's regime)
and 32 test docstrings per class. Source task for PVP: 6 other packages (tkinter, idlelib,
distutils, asyncio, logging, lib2to3), 96 training docstrings per class. Docstrings are split at
random within a package (docstrings of one file can land on both sides).

Every method puts a new linear head (zero init) on the mean-pooled final hidden states of the
text tokens and trains with Adam, batch 16, the same number of steps; learning rates were set
once, not tuned: head 3e-3 everywhere; full fine-tuning backbone 5e-5; LoRA (rank 8, alpha 16 on
wq, wv; ``jaxeff.params.lora``, applied unmerged through ``jaxeff.params.linear``) 1e-3; soft
prompts (8 vectors after the embedding layer, ``jaxeff.params.prepend_prompts``) 1e-2, random
init at the standard deviation of the real embedding-layer outputs; PVP: the same prompts first
trained on the source task (its own head, the same steps), then copied into the target task
(``init_prompts(source=...)``, new head); UniPT (``jaxeff.params.unipt``, width 96, on the 7
per-layer states of ``bert.forward(..., return_layers=True)``) 1e-3; a linear probe (head only) as
the floor.

Memory: ``memory_analysis()`` of each compiled training step (``temp`` = activations, gradients
and scratch; the frozen backbone, trainable parameters and optimizer state are arguments), at the
training shape and, compile-only, at batch 32 x 128 tokens; UniPT also with features computed
once and cached (the step takes the 7 feature tensors, the backbone is not in it).

Results (2026-12-02, the shared 2-core CPU VM at load 11-19, jax 0.10.2, seed 0, defaults: 30
steps of batch 16 per method and 30 source steps; 191 CPU-s in all, 1444 s wall inflated by the
load; ``experiments/results/study_peft.json``). Memory in MiB from ``memory_analysis``; "big" is
batch 32 x 128 tokens, compile-only::

    method               test acc  trainable   temp (big)      peak (big)
    linear probe          0.828        2,310    13.5 (80)       99.6 (167)
    full fine-tuning      0.880   22,715,526   147.2 (1393)    667.1 (1912)
    LoRA r8 wq,wv         0.854       76,038   186.2 (1206)    274.0 (1293)
    prompts, random       0.823        5,382   212.9 (1257)    299.1 (1343)
    prompts, PVP init     0.823        5,382   212.9 (1257)    299.1 (1343)
    UniPT width 96        0.802      335,334    24.5 (155)     118.2 (249)
    UniPT, cached feats     -              -    22.0 (152)      37.6 (201)

One seed and 192 test docstrings: one standard error near 0.85 is about 0.026, so only full
fine-tuning vs the frozen-feature methods is clearly apart. Memory is the clear result: UniPT's
step needs 8x less scratch than LoRA or prompts at the big shape (they keep every backbone
activation for the backward pass even though the backbone does not train), about 2x the
probe's. Accuracy at 30 steps is not a win for UniPT: it ends below the linear probe (its
up-projection starts at zero and has few steps to grow). PVP's source-trained prompts (0.698 on
the source task) reached a lower target loss (0.825 vs 0.874 over the last 5 steps) but the same
accuracy as random prompts: no transfer gain shown at this size. Prompts were placed after the
embedding layer and trained at one learning rate (1e-2), untuned.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import compiled_memory, write_json
from jaxeff import data as jdata
from jaxeff.models import bert, pretrained
from jaxeff.params import (combine, init_prompts, linear_logits, lora, partition, prepend_prompts,
                           strip_prompts, tree_bytes, tree_size, unipt)

TARGET = ("email", "importlib", "multiprocessing", "http", "unittest", "xml")
SOURCE = ("tkinter", "idlelib", "distutils", "asyncio", "logging", "lib2to3")
MAX_LEN = 48
N_PROMPTS = 8
UNIPT_WIDTH = 96
LR = {"head": 3e-3, "backbone": 5e-5, "lora": 1e-3, "prompts": 1e-2, "unipt": 1e-3}
METHODS = ("probe", "full", "lora", "prompts_random", "prompts_pvp", "unipt")


# ----------------------------------------------------------------------------- data
def docstrings_by_package(packages):
    """Deduplicated docstrings (>= 40 chars) of each top-level stdlib package."""
    out = {p: [] for p in packages}
    seen = set()
    for doc in jdata.load_stdlib_corpus("all"):
        dom = doc.meta["domain"]
        if dom not in out:
            continue
        try:
            tree = ast.parse(doc.text)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                s = ast.get_docstring(node)
                if s and len(s) >= 40 and s not in seen:
                    seen.add(s)
                    out[dom].append(s)
    return out


def build_task(tok, packages, n_train, n_test, seed):
    """``{'train': (ids, mask, y), 'test': ...}``: WordPiece ids padded to MAX_LEN."""
    docs = docstrings_by_package(packages)
    rng = np.random.default_rng(seed)
    split = {"train": ([], []), "test": ([], [])}
    for c, pkg in enumerate(packages):
        texts = docs[pkg]
        if len(texts) < n_train + n_test:
            raise ValueError(f"{pkg} has {len(texts)} docstrings < {n_train + n_test}")
        order = rng.permutation(len(texts))
        split["train"][0].extend(texts[i] for i in order[:n_train])
        split["test"][0].extend(texts[i] for i in order[n_train:n_train + n_test])
        split["train"][1].extend([c] * n_train)
        split["test"][1].extend([c] * n_test)
    out = {}
    for name, (texts, ys) in split.items():
        ids, mask = tok.encode_batch(texts, max_length=MAX_LEN)
        pad = MAX_LEN - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=tok.pad_id)
        out[name] = (ids, np.pad(mask, ((0, 0), (0, pad))), np.asarray(ys, np.int32))
    return out


# ----------------------------------------------------------------------------- methods
def make_method(name, cfg, params, n_classes, key, source_prompts=None, prompt_std=1.0):
    """``(trainable, frozen, logits_fn, labels)``: ``logits_fn(trainable, frozen, ids, mask)``;
    ``labels`` names each trainable leaf's learning-rate group."""
    D = cfg.d_model
    head = {"w": jnp.zeros((D, n_classes)), "b": jnp.zeros((n_classes,))}
    k1, k2 = jax.random.split(key)

    def pooled_logits(t, h_BxLxD, mask):
        return linear_logits(t["head"], bert.mean_pool(h_BxLxD, mask))

    if name in ("probe", "full"):
        def logits_fn(t, f, ids, mask):
            backbone = t["backbone"] if name == "full" else f["backbone"]
            return pooled_logits(t, bert.forward(backbone, ids, cfg, mask), mask)
        if name == "full":
            return {"backbone": params, "head": head}, {}, logits_fn, {"backbone": "backbone"}
        return {"head": head}, {"backbone": params}, logits_fn, {}
    if name == "lora":
        adapted = lora(rank=8, alpha=16, select=r"layers/(wq|wv)$").from_dense(k1, params)
        t, f = partition(adapted)

        def logits_fn(t, f, ids, mask):
            return pooled_logits(t, bert.forward(combine(t["lora"], f["lora"]), ids, cfg, mask),
                                 mask)
        return {"lora": t, "head": head}, {"lora": f}, logits_fn, {"lora": "lora"}
    if name.startswith("prompts"):
        prompts = (init_prompts(None, N_PROMPTS, D, source=source_prompts)
                   if source_prompts is not None
                   else init_prompts(k1, N_PROMPTS, D, std=prompt_std))

        def logits_fn(t, f, ids, mask):
            x = prepend_prompts(t["prompts"], bert.embed(f["backbone"], ids, cfg), mask)
            h = strip_prompts(bert.encode(f["backbone"], x.x, cfg, x.mask), N_PROMPTS)
            return pooled_logits(t, h, mask)
        return ({"prompts": prompts, "head": head}, {"backbone": params}, logits_fn,
                {"prompts": "prompts"})
    if name == "unipt":
        net = unipt(cfg.n_layers + 1, D, UNIPT_WIDTH)

        def logits_fn(t, f, ids, mask):
            _, layers = bert.forward(f["backbone"], ids, cfg, mask, return_layers=True)
            return pooled_logits(t, net.apply(t["side"], layers, mask), mask)
        return ({"side": net.init(k1), "head": head}, {"backbone": params}, logits_fn,
                {"side": "unipt"})
    raise ValueError(f"unknown method {name!r}; valid: {METHODS}")


def make_tx(trainable, labels):
    """Adam with one learning rate per group (``LR``): ``labels[k]`` for the top-level entry
    ``k``, 'head' for the rest."""
    tree_labels = {k: jax.tree.map(lambda _, g=labels.get(k, "head"): g, v)
                   for k, v in trainable.items()}
    groups = set(jax.tree.leaves(tree_labels))
    return optax.multi_transform({g: optax.adam(LR[g]) for g in groups}, tree_labels)


def loss_of(logits_fn):
    def loss(t, f, ids, mask, y):
        z = logits_fn(t, f, ids, mask)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, y))
    return loss


def compile_step(loss, tx, trainable, frozen, batch):
    def step(t, opt, f, ids, mask, y):
        value, g = jax.value_and_grad(loss)(t, f, ids, mask, y)
        upd, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, upd), opt, value
    opt = tx.init(trainable)
    compiled = jax.jit(step).lower(trainable, opt, frozen, *batch).compile()
    return compiled, opt


def train(name, cfg, params, data, args, key, **kw):
    """Train one method; returns the trained trainable tree, its record and its logits_fn."""
    ids, mask, y = data["train"]
    n_classes = int(y.max()) + 1
    t, f, logits_fn, labels = make_method(name, cfg, params, n_classes, key, **kw)
    tx = make_tx(t, labels)
    loss = loss_of(logits_fn)
    B = args.batch
    c0, w0 = time.process_time(), time.time()
    step, opt = compile_step(loss, tx, t, f, (ids[:B], mask[:B], y[:B]))
    mem = compiled_memory(step)
    big = args.big_batch, args.big_len
    big_batch = (np.zeros(big, np.int32), np.ones(big, np.int32), np.zeros(big[0], np.int32))
    mem_big = compiled_memory(compile_step(loss, tx, t, f, big_batch)[0])
    compile_cpu = time.process_time() - c0
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    order, losses = np.array([], int), []
    for s in range(args.steps):
        if len(order) < B:
            order = np.concatenate([order, rng.permutation(len(y))])
        idx, order = order[:B], order[B:]
        t, opt, value = step(t, opt, f, ids[idx], mask[idx], y[idx])
        losses.append(float(value))
    rec = {"trainable_params": tree_size(t), "trainable_plus_adam_bytes": 3 * tree_bytes(t),
           "step_memory": mem, "step_memory_big": mem_big, "losses": losses,
           "train_cpu_s": time.process_time() - c0 - compile_cpu, "compile_cpu_s": compile_cpu,
           "wall_s": time.time() - w0}
    return t, f, logits_fn, rec


def accuracy(logits_fn, t, f, split, bs=48):
    ids, mask, y = split
    fn = jax.jit(logits_fn)
    pred = np.concatenate([np.argmax(np.asarray(fn(t, f, ids[i:i + bs], mask[i:i + bs])), -1)
                           for i in range(0, len(y), bs)])
    return float(np.mean(pred == y))


def unipt_cached_memory(cfg, args):
    """Compiled memory of a UniPT step whose inputs are the cached features (no backbone)."""
    net = unipt(cfg.n_layers + 1, cfg.d_model, UNIPT_WIDTH)
    t = {"side": net.init(0), "head": {"w": jnp.zeros((cfg.d_model, 6)), "b": jnp.zeros(6)}}

    def logits_fn(t, f, layers, mask):
        return linear_logits(t["head"], bert.mean_pool(net.apply(t["side"], layers, mask), mask))

    tx = make_tx(t, {"side": "unipt"})
    out = {}
    for tag, (B, L) in (("train", (args.batch, MAX_LEN)), ("big", (args.big_batch, args.big_len))):
        feats = jnp.zeros((cfg.n_layers + 1, B, L, cfg.d_model))
        batch = (feats, jnp.ones((B, L), jnp.int32), jnp.zeros((B,), jnp.int32))
        out[tag] = compiled_memory(compile_step(loss_of(logits_fn), tx, t, {}, batch)[0])
        out[tag]["cached_feature_bytes_per_example"] = int(feats.nbytes // B)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--source-steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train-per-class", type=int, default=16)
    ap.add_argument("--test-per-class", type=int, default=32)
    ap.add_argument("--source-per-class", type=int, default=96)
    ap.add_argument("--big-batch", type=int, default=32)
    ap.add_argument("--big-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="3 steps each, a smoke run")
    ap.add_argument("--out", default="experiments/results/study_peft.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps = args.source_steps = 3
        args.big_batch, args.big_len = 4, 16
        args.out = args.out.replace(".json", "_quick.json")
    cpu0, wall0 = time.process_time(), time.time()
    cfg, params, tok = pretrained("all-minilm-l6-v2")
    target = build_task(tok, TARGET, args.train_per_class, args.test_per_class, args.seed)
    source = build_task(tok, SOURCE, args.source_per_class, 16, args.seed)
    ids, mask, _ = target["train"]
    x = np.asarray(bert.embed(params, ids, cfg))[mask > 0]
    prompt_std = float(x.std())
    print(f"target: {len(target['train'][2])} train / {len(target['test'][2])} test docstrings;"
          f" source: {len(source['train'][2])} train; prompt init std {prompt_std:.3f}", flush=True)
    key = jax.random.key(args.seed)
    results = {}

    src_t, src_f, src_fn, src_rec = train("prompts_random", cfg, params, source, args,
                                          jax.random.fold_in(key, 99), prompt_std=prompt_std)
    src_rec["test_acc_source"] = accuracy(src_fn, src_t, src_f, source["test"])
    print(f"source prompts: acc {src_rec['test_acc_source']:.3f} on the source test split",
          flush=True)
    for i, name in enumerate(METHODS):
        kw = {"prompt_std": prompt_std} if name == "prompts_random" else {}
        if name == "prompts_pvp":
            kw = {"source_prompts": src_t["prompts"]}
        t, f, fn, rec = train(name, cfg, params, target, args, jax.random.fold_in(key, i), **kw)
        rec["test_acc"] = accuracy(fn, t, f, target["test"])
        results[name] = rec
        m = rec["step_memory"]
        print(f"{name:15s} acc {rec['test_acc']:.3f} "
              f"final loss {np.mean(rec['losses'][-5:]):.3f} trainable {rec['trainable_params']:,}"
              f" temp/peak {m['temp'] / 2**20:.1f}/{m['peak'] / 2**20:.1f} MiB (big "
              f"{rec['step_memory_big']['temp'] / 2**20:.1f}/{rec['step_memory_big']['peak'] / 2**20:.1f})"
              f" train {rec['train_cpu_s']:.0f} CPU-s", flush=True)
    cached = unipt_cached_memory(cfg, args)
    print(f"unipt, cached features: temp {cached['train']['temp'] / 2**20:.1f} MiB "
          f"(big {cached['big']['temp'] / 2**20:.1f})", flush=True)
    out = {"config": {k: v for k, v in vars(args).items()}, "target_classes": TARGET,
           "source_classes": SOURCE, "max_len": MAX_LEN, "n_prompts": N_PROMPTS,
           "unipt_width": UNIPT_WIDTH, "lr": LR, "prompt_init_std": prompt_std,
           "backbone_params": tree_size(params), "source_pretraining": src_rec,
           "methods": results, "unipt_cached_features_memory": cached,
           "cpu_s": time.process_time() - cpu0, "wall_s": time.time() - wall0,
           "load_avg_1min": os.getloadavg()[0], "jax": jax.__version__,
           "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(f"total {out['cpu_s']:.0f} CPU-s, wall {out['wall_s']:.0f} s, load {out['load_avg_1min']:.1f}")
    write_json(out, args.out)
    return out


if __name__ == "__main__":
    main()
