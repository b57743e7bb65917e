"""End-to-end GPU benchmark: kernels vs XLA-only, training and 4-bit decode, in one command.

    python -m experiments.bench_gpu              # 125M preset, bf16 compute; fits ~8 min on an H200
    python -m experiments.bench_gpu --smoke      # tiny preset, 2 steps: checks the script on CPU

Training (synthetic tokens: the benchmark times steps, not learning), for each method with the
model's projections and attention dispatched by backend (``LlamaConfig.impl=None``: the
``jaxeff.kernels`` Pallas kernels where they were measured to win) and forced to XLA
(``impl='reference'``):

* baseline: AdamW (0.9, 0.95, wd 0.1);
* sltrain: SLTrain factors (the paper's 130M setting: rank 256, alpha 16, density 0.03) on every
  block projection, applied through ``jaxeff.params.linear`` (no dense W in the model);
* galore: GaLore-AdamW, rank 128 on the block projections (``--smoke``: ranks 16);
* adam8bit: AdamW with int8 (DRE) moments (``jaxeff.optim.compress_state``);
* sophia: Sophia-G (GNB estimator refreshed every 10 steps, under ``lax.cond``).

Reported per row: training tokens/s (median step time over the timed steps), MFU (model FLOPs
``6 N + 12 L T d`` per token over ``--peak-tflops``, default 989 = H200 dense bf16), and peak
memory: XLA's compiled memory analysis of the step (arguments + outputs + temporaries - aliased
bytes; per program, so rows are comparable within one process) and, on GPU, the device's
``peak_bytes_in_use`` after the row (monotone over the process).

Decode: the model with 4-bit RTN weights (group 128, ``jaxeff.params.rtn``; GPTQ leaves have the
same layout and the same product) vs its dense bf16 weights: a single-token step of ``--decode-
batch`` sequences (a forward of ``[B, 1]`` tokens, no KV cache: the weight traffic of the
projections that dominates small-batch decode), tokens/s = B / step time, for the dequantize
kernel (``impl=None``: Pallas for <= 16 rows on GPU), XLA dequantize + matmul
(``impl='reference'``) and dense weights.

The GPU numbers are not yet measured (no GPU was available when this was written); on CPU only
``--smoke`` is meant to run. Writes ``<out>/bench_gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxeff.models import llama
from jaxeff.optim import compress_state, galore, gnb, sophia, sophia_extra_args
from jaxeff.params import combine, materialize, partition, rtn, sltrain, sltrain_preset

SEL = r"layers/(wq|wk|wv|wo|w_gate|w_up|w_down)$"
METHODS = ("baseline", "sltrain", "galore", "adam8bit", "sophia")
LR = 3e-4


def model_flops_per_token(cfg: llama.LlamaConfig, seq: int) -> float:
    """``6 N + 12 L T d`` (PaLM appendix B): N = parameters without the embedding lookup."""
    n = llama.param_count(llama.abstract_params(cfg))
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.d_model
    return 6.0 * n + 12.0 * cfg.n_layers * seq * cfg.n_heads * cfg.head_dim


def _batch(cfg, batch, seq, seed=0):
    rng = np.random.default_rng(seed)
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq + 1)), jnp.int32)
    half = seq // 2  # two packed documents per row: the segment-id path of the attention
    seg = np.concatenate([np.ones(half), 2 * np.ones(seq - half)]).astype(np.int32)
    pos = np.concatenate([np.arange(half), np.arange(seq - half)]).astype(np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
            "segment_ids": jnp.asarray(np.broadcast_to(seg, (batch, seq))),
            "positions": jnp.asarray(np.broadcast_to(pos, (batch, seq)))}


def _setup(method, cfg, params, small=False):
    """(trainable, frozen, tx, loss(trainable, frozen, batch), extra_args or None)."""
    def loss(p, frozen, batch):
        return llama.loss_fn(combine(p, frozen) if frozen is not None else p, batch, cfg)

    if method == "sltrain":
        kw = sltrain_preset("130m") | (dict(rank=16) if small else {})
        factors = sltrain(**kw, select=SEL).init(jax.random.key(1), params)
        trainable, frozen = partition(factors)
        return trainable, frozen, optax.adamw(LR, 0.9, 0.95, weight_decay=0.1), loss, None
    if method == "baseline":
        tx = optax.adamw(LR, 0.9, 0.95, weight_decay=0.1)
    elif method == "galore":
        tx = galore(LR, rank=16 if small else 128, update_proj_gap=200, weight_decay=0.1,
                    select=SEL)
    elif method == "adam8bit":
        tx = optax.chain(compress_state(optax.scale_by_adam(0.9, 0.95), "int8"),
                         optax.add_decayed_weights(0.1), optax.scale_by_learning_rate(LR))
    elif method == "sophia":
        def logits_fn(p, batch):
            return llama.forward(p, batch["inputs"], cfg, batch["segment_ids"],
                                 batch["positions"])
        tx = sophia(LR, gnb(logits_fn), rho=0.05, weight_decay=0.2, update_interval=10)
        return params, None, tx, loss, sophia_extra_args()
    else:
        raise ValueError(f"method={method!r}; valid: {METHODS}")
    return params, None, tx, loss, None


def _memory_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def _device_peak() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def bench_train(method, cfg, params, batch, steps, warmup, small=False):
    trainable, frozen, tx, loss, extra = _setup(method, cfg, params, small)
    trainable = jax.tree.map(jnp.copy, trainable)  # the step donates it; params are reused
    tx = optax.with_extra_args_support(tx)

    def step(p, opt_state, frozen, batch, key):
        (l, _), g = jax.value_and_grad(loss, has_aux=True)(p, frozen, batch)
        kw = extra(p, batch, key) if extra is not None else {}
        u, opt_state = tx.update(g, opt_state, p, **kw)
        return optax.apply_updates(p, u), opt_state, l

    opt_state = tx.init(trainable)
    key = jax.random.key(0)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(trainable, opt_state, frozen, batch,
                                                          key).compile()
    times = []
    p, s = trainable, opt_state
    for i in range(warmup + steps):
        t = time.perf_counter()
        p, s, l = compiled(p, s, frozen, batch, jax.random.fold_in(key, i))
        l.block_until_ready()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    if not np.isfinite(float(l)):
        raise FloatingPointError(f"{method}: non-finite loss {float(l)}")
    return statistics.median(times), _memory_bytes(compiled), float(l)


def bench_decode(cfg, params, batch_size, steps, warmup):
    """tokens/s of a [B, 1] forward: 4-bit kernel, 4-bit XLA, dense."""
    q = rtn(params, 4, 128, select=SEL)
    dense = jax.tree.map(lambda x: x.astype(jnp.bfloat16), materialize(q))
    toks = jnp.zeros((batch_size, 1), jnp.int32)
    out = {}
    for name, p, impl in (("int4_kernel", q, None), ("int4_xla", q, "reference"),
                          ("dense_bf16", dense, "reference")):
        c = cfg.replace(impl=impl)
        fn = jax.jit(lambda p, t, c=c: llama.forward(p, t, c)[:, -1].argmax(-1))
        fn(p, toks).block_until_ready()
        times = []
        for i in range(warmup + steps):
            t = time.perf_counter()
            fn(p, toks).block_until_ready()
            if i >= warmup:
                times.append(time.perf_counter() - t)
        out[name] = batch_size / statistics.median(times)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny preset, 2 steps (CPU check)")
    ap.add_argument("--model", default=None, help="preset (default 125m; tiny with --smoke)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2 smoke)")
    ap.add_argument("--batch", type=int, default=None, help="sequences (default 8; 2 smoke)")
    ap.add_argument("--seq", type=int, default=None, help="length (default 1024; 64 smoke)")
    ap.add_argument("--decode-batch", type=int, default=8)
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="accelerator peak for MFU (default: H200 dense bf16)")
    ap.add_argument("--out", default="runs/bench_gpu")
    args = ap.parse_args(argv)
    model = args.model or ("tiny" if args.smoke else "125m")
    steps = args.steps or (2 if args.smoke else 10)
    bs, seq = args.batch or (2 if args.smoke else 8), args.seq or (64 if args.smoke else 1024)
    warmup = 1 if args.smoke else 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; valid: {METHODS}")
    cfg = llama.PRESETS[model].replace(compute_dtype="bfloat16",
                                       max_seq_len=max(seq, llama.PRESETS[model].max_seq_len))
    params = llama.init_params(jax.random.key(0), cfg)
    batch = _batch(cfg, bs, seq)
    fpt = model_flops_per_token(cfg, seq)
    dev = jax.devices()[0]
    print(f"bench_gpu: {model} ({llama.param_count(params):,} params), bf16 compute, batch "
          f"{bs}x{seq}, {steps} timed steps, device {dev.device_kind} ({jax.default_backend()})",
          flush=True)
    rows = []
    print(f"{'method':10s} {'path':8s} {'tokens/s':>10s} {'MFU':>7s} {'step mem GiB':>12s} "
          f"{'device peak GiB':>15s}")
    for m in methods:
        for path, impl in (("kernels", None), ("xla", "reference")):
            sec, mem, loss = bench_train(m, cfg.replace(impl=impl), params, batch, steps, warmup,
                                         small=args.smoke)
            tps = bs * seq / sec
            row = dict(method=m, path=path, tokens_per_s=tps,
                       mfu=tps * fpt / (args.peak_tflops * 1e12), step_memory_bytes=mem,
                       device_peak_bytes=_device_peak(), final_loss=loss)
            rows.append(row)
            gib = lambda b: "-" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
            print(f"{m:10s} {path:8s} {tps:10.0f} {row['mfu']:7.2%} {gib(mem):>12s} "
                  f"{gib(row['device_peak_bytes']):>15s}", flush=True)
    decode = bench_decode(cfg, params, args.decode_batch, steps, warmup)
    print("decode tokens/s (B=%d, [B, 1] step): " % args.decode_batch +
          ", ".join(f"{k} {v:.0f}" for k, v in decode.items()), flush=True)
    os.makedirs(args.out, exist_ok=True)
    result = dict(model=model, batch=bs, seq=seq, steps=steps, device=dev.device_kind,
                  backend=jax.default_backend(), jax=jax.__version__, smoke=args.smoke,
                  flops_per_token=fpt, peak_tflops=args.peak_tflops, train=rows, decode=decode,
                  command=" ".join(["python -m experiments.bench_gpu"] + (argv or sys.argv[1:])))
    with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
