"""GaLore benchmark: train-step time of jaxeff GaLore (exact SVD / randomized refresh) vs
optax.contrib.galore and AdamW on the reference workload, and projector-refresh time exact vs
randomized on n x n matrices, side by side in one process.

    python -m experiments.bench_galore                        # tiny llama; refresh 1024, 2048
    python -m experiments.bench_galore --sizes 1024,2048,4096 --out runs/bench_galore.json
    python -m experiments.bench_galore --model 125m --batch 8 --seq 512 --skip-refresh   # GPU

**Step time.** Every variant is a whole train step (``jaxeff.train.make_train_step``: loss, grad,
``clip_by_global_norm(1.0)``, optimizer) on the tiny llama with a batch of 16 x 128 tokens:

* ``adamw``: optax.adamw (0.9, 0.95, wd 0.1), the baseline;
* ``galore-svd``: jaxeff GaLore, rank 1/4 of each projection's smaller dimension on
  ``layers/(wq|wk|wv|wo|w_gate|w_up|w_down)``, exact SVD refresh, Adam inside;
* ``galore-rand``: the same with the randomized refresh (subspace iteration, 2 iterations,
  oversampling 8, warm start);
* ``galore-8bit``: ``galore-svd`` with ``compress_state(scale_by_adam(), 'int8')`` inside;
* ``optax-galore``: optax.contrib.galore with the same rank (32 = 128/4). It cannot batch over
  the stacked layer axis, so its stacked leaves are given as (L*m) x n matrices
  (``GaLoreDimensionNumbers(reduction_axis=(0, 1), output_axis=2)``): not the same algorithm,
  but the nearest it can run.

All variants refresh every ``--gap`` steps. After compiling and one warm-up interval, each round
times one interval of ``gap`` steps per variant (variants interleaved, so load drifts hit all
alike), step by step: ``refresh ms`` is the interval's first step (t % gap == 0, the SVD),
``step ms`` the median of the others, ``amortized`` the interval mean; medians over rounds, with
ratios to AdamW.

**Refresh time.** ``svd_projector`` (f32 SVD, the reference) against ``randomized_projector``
(warm-started from the previous projector) at rank n/4 on an n x n matrix with a power-law
spectrum, jitted, median of ``--reps`` calls; ``captured`` = ||P^T G||_F^2 / ||U_r^T G||_F^2, the
share of the exact top-r energy the randomized projector keeps.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import random_batch, write_json
from jaxeff import train
from jaxeff.models import llama
from jaxeff.optim import compress_state
from jaxeff.optim import Randomized, galore
from jaxeff.optim import randomized_projector, svd_projector

SELECT = "layers/(wq|wk|wv|wo|w_gate|w_up|w_down)$"
PROJ = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def variants(cfg, gap, lr=1e-3):
    clip = optax.clip_by_global_norm(1.0)
    rank = min(cfg.d_model, cfg.d_ff) // 4
    def optax_dims(params):
        dims = optax.contrib.GaLoreDimensionNumbers(reduction_axis=(0, 1), output_axis=2)
        return {k: ({n: (dims if n in PROJ else None) for n in v} if k == "layers" else None)
                for k, v in params.items()}

    out = {
        "adamw": optax.chain(clip, optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.1)),
        "galore-svd": optax.chain(clip, galore(lr, rank=0.25, select=SELECT, update_proj_gap=gap,
                                               weight_decay=0.1)),
        "galore-rand": optax.chain(clip, galore(lr, rank=0.25, select=SELECT, update_proj_gap=gap,
                                                refresh=Randomized(8, 2), weight_decay=0.1)),
        "galore-8bit": optax.chain(clip, galore(lr, compress_state(optax.scale_by_adam(), "int8"),
                                                rank=0.25, select=SELECT, update_proj_gap=gap,
                                                weight_decay=0.1)),
    }
    if hasattr(optax.contrib, "galore"):  # optax >= 0.2.6
        out["optax-galore"] = optax.chain(clip, optax.contrib.galore(
            lr, rank=rank, update_proj_gap=gap, scale=0.25, weight_decay=0.1,
            weight_dimension_numbers=optax_dims))
    return out


def bench_steps(args):
    cfg = llama.PRESETS[args.model].replace(max_seq_len=max(args.seq, 16))
    params = llama.init_params(jax.random.key(0), cfg)
    batch = random_batch(cfg, args.batch, args.seq)
    loss = lambda p, b: llama.loss_fn(p, b, cfg)
    txs = variants(cfg, args.gap)
    if args.only:
        txs = {n: t for n, t in txs.items() if n in args.only.split(",")}
    steps, states, compile_s, opt_bytes = {}, {}, {}, {}
    for name, tx in txs.items():
        t0 = time.perf_counter()
        state = train.init_train_state(jax.tree.map(jnp.copy, params), tx, seed=0)
        opt_bytes[name] = int(sum(x.nbytes for x in jax.tree.leaves(state.opt_state)))
        steps[name] = train.make_train_step(loss, tx, donate=True).lower(state, batch).compile()
        compile_s[name] = time.perf_counter() - t0
        for _ in range(args.gap):  # warm-up interval
            state, _ = steps[name](state, batch)
        states[name] = jax.block_until_ready(state)
        print(f"  {name}: compiled in {compile_s[name]:.1f}s", flush=True)
    per = {n: {"refresh": [], "step": [], "amortized": []} for n in txs}
    for _ in range(args.rounds):
        for name in txs:
            state, ts = states[name], []
            for _ in range(args.gap):
                t0 = time.perf_counter()
                state, _ = steps[name](state, batch)
                jax.block_until_ready(state)
                ts.append(time.perf_counter() - t0)
            states[name] = state
            per[name]["refresh"].append(ts[0])
            per[name]["step"].append(statistics.median(ts[1:]))
            per[name]["amortized"].append(sum(ts) / len(ts))
    rows = []
    base = {k: statistics.median(per["adamw"][k]) for k in ("step", "amortized")} \
        if "adamw" in per else None
    print(f"\n{'variant':<13} {'step ms':>8} {'x adamw':>8} {'refresh ms':>10} {'amortized':>9} "
          f"{'x adamw':>8} {'opt MB':>7} {'compile s':>9}")
    for name in txs:
        m = {k: statistics.median(v) for k, v in per[name].items()}
        row = {"variant": name, **{f"{k}_ms": 1e3 * v for k, v in m.items()},
               "step_ratio": m["step"] / base["step"] if base else None,
               "amortized_ratio": m["amortized"] / base["amortized"] if base else None,
               "opt_state_bytes": opt_bytes[name], "compile_s": compile_s[name]}
        rows.append(row)
        f = lambda v: "-" if v is None else f"{v:.2f}"
        print(f"{name:<13} {1e3 * m['step']:>8.1f} {f(row['step_ratio']):>8} "
              f"{1e3 * m['refresh']:>10.1f} {1e3 * m['amortized']:>9.1f} "
              f"{f(row['amortized_ratio']):>8} {opt_bytes[name] / 2**20:>7.2f} "
              f"{compile_s[name]:>9.1f}")
    return {"model": args.model, "batch": args.batch, "seq": args.seq, "gap": args.gap,
            "rounds": args.rounds, "rows": rows}


def test_matrix(n, seed=0):
    """n x n with singular values ~ 1/(i+1) (a gradient-like decay), made with two matmuls."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, (n, n)) / np.sqrt(n)
    y = jax.random.normal(k2, (n, n)) / np.sqrt(n)
    return (x * (1.0 / jnp.arange(1, n + 1))) @ y.T


def _time(fn, *a, reps):
    jax.block_until_ready(fn(*a))  # compile + warm
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*a))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_refresh(args):
    rows = []
    svd = jax.jit(lambda g, r: svd_projector(g, r)[0], static_argnums=1)
    rnd = jax.jit(lambda g, p, k: randomized_projector(g, p, k, 8, 2))
    print(f"\n{'n':>6} {'rank':>5} {'svd s':>8} {'rand s':>8} {'speedup':>8} {'captured':>9}")
    for n in (int(s) for s in args.sizes.split(",")):
        r = n // 4
        g = jax.block_until_ready(test_matrix(n))
        key = jax.random.key(1)
        exact = svd(g, r)
        prev = jnp.asarray(np.linalg.qr(np.random.default_rng(0).standard_normal((n, r)))[0],
                           jnp.float32)
        warm = rnd(g, prev, key)          # refresh from a random start, then time a warm refresh
        t_rnd = _time(rnd, g, warm, key, reps=args.reps)
        t_svd = _time(svd, g, r, reps=1 if n >= 4096 else args.reps) \
            if n <= args.max_svd else None
        p = rnd(g, warm, key)
        captured = float(jnp.sum((p.T @ g) ** 2) / jnp.sum((exact.T @ g) ** 2))
        rows.append({"n": n, "rank": r, "svd_s": t_svd, "randomized_s": t_rnd,
                     "speedup": t_svd / t_rnd if t_svd else None, "captured": captured})
        f = lambda v, s: "-" if v is None else format(v, s)
        print(f"{n:>6} {r:>5} {f(t_svd, '8.3f')} {t_rnd:>8.3f} {f(rows[-1]['speedup'], '8.1f')} "
              f"{captured:>9.4f}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--gap", type=int, default=20, help="projector refresh gap of every variant")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated subset of step variants")
    ap.add_argument("--sizes", default="1024,2048", help="n of the n x n refresh benchmark")
    ap.add_argument("--max-svd", type=int, default=4096, help="largest n timed with exact SVD")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--skip-refresh", action="store_true")
    ap.add_argument("--out", default="runs/bench_galore.json")
    args = ap.parse_args(argv)
    print(f"bench_galore: {jax.default_backend()} x{len(jax.devices())}, jax {jax.__version__}",
          flush=True)
    out = {"command": " ".join(["python -m experiments.bench_galore"] +
                               (argv if argv is not None else sys.argv[1:])),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "backend": jax.default_backend(),
                       "device": str(jax.devices()[0].device_kind)}}
    if not args.skip_steps:
        out["steps"] = bench_steps(args)
    if not args.skip_refresh:
        out["refresh"] = bench_refresh(args)
    write_json(out, args.out)
    return out


if __name__ == "__main__":
    main()
