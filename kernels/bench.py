"""Benchmark every jaxeff Pallas kernel against its XLA-compiled jnp reference.

GPU:   python -m jaxeff.kernels.bench --out /tmp/kernels_bench.json
       (or `python kernels/bench.py --out ...` from the repository root)
CPU:   python -m jaxeff.kernels.bench --smoke      (tiny shapes, interpret mode)

For every case: compile both implementations, check the kernel against the reference (max abs
error, and max error relative to max |reference|), time each (jax.block_until_ready, warmups,
min over 3 repeats of the mean of `iters` calls) and report the achieved TFLOP/s or GB/s. Each
case runs inside try/except: an error is recorded and the next case runs. A global time budget
(--budget seconds) skips the remaining cases once spent. Prints a table; writes JSON to --out.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import traceback

if __package__ in (None, ""):  # `python kernels/bench.py`: import the folder as `kernels`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "kernels"  # noqa: A001 -- lets the relative imports below resolve

import jax
import jax.numpy as jnp

from . import dequant_matmul as quant_matmul
from . import fused_optim, group_quant
from . import packed_attention as attn_mod
from . import sparse_lowrank as sltrain_matmul

ROWS: list[dict] = []
START = time.time()


def log(*a):
    print(f"[{time.time() - START:6.1f}s]", *a, flush=True)


def timeit(fn, args, iters, warmup=2):
    """Returns (compile+first-call seconds, ms per call)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / iters)
    return first, best * 1e3


def timeit_carry(step, state, consts, iters, warmup=2):
    """Times state = step(*state, *consts) (donated state), ms per call."""
    t0 = time.perf_counter()
    state = jax.block_until_ready(step(*state, *consts))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        state = jax.block_until_ready(step(*state, *consts))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            state = step(*state, *consts)
        jax.block_until_ready(state)
        best = min(best, (time.perf_counter() - t0) / iters)
    return first, best * 1e3


def errors(a, b):
    """(max abs err, max abs err / max |b|) over matching pytrees."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    abs_err = max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
                  for x, y in zip(la, lb))
    rel = max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))) /
                    (jnp.max(jnp.abs(y.astype(jnp.float32))) + 1e-30)) for x, y in zip(la, lb))
    return abs_err, rel


def record(kernel, case, impl, ms=None, compile_s=None, flops=None, nbytes=None, err=None,
           rel=None, error=None, **extra):
    row = dict(kernel=kernel, case=case, impl=impl, ms=ms, compile_s=compile_s, error=error)
    if ms:
        if flops:
            row["tflops"] = flops / (ms * 1e-3) / 1e12
        if nbytes:
            row["gbps"] = nbytes / (ms * 1e-3) / 1e9
    if err is not None:
        row["max_abs_err"], row["max_rel_err"] = err, rel
    row.update(extra)
    ROWS.append(row)
    msg = f"{kernel:10s} {case:42s} {impl:16s}"
    if error:
        msg += f" ERROR {error.splitlines()[0][:200]}"
    else:
        msg += f" {ms:9.3f} ms" if ms else ""
        msg += f" {row['tflops']:7.1f} TFLOP/s" if "tflops" in row else ""
        msg += f" {row['gbps']:7.0f} GB/s" if "gbps" in row else ""
        msg += f" err {err:.2e} (rel {rel:.1e})" if err is not None else ""
    log(msg)


def guarded(kernel, case, budget):
    """Decorator: runs a case, records any exception, honours the time budget."""
    def wrap(fn):
        if time.time() - START > budget:
            record(kernel, case, "-", error="skipped: time budget spent")
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- the bench must go on
            tb = traceback.format_exc(limit=4)
            record(kernel, case, "-", error=f"{type(e).__name__}: {str(e)[:2000]}\n{tb[-1500:]}")
        return fn
    return wrap


# ----------------------------------------------------------------------------- cases.

def run_impls(kernel, case, impls, args, loss_ct, argnums, iters, flops_fwd, bwd_factor):
    """Times fwd and fwd+bwd for each impl (reference first) and checks them against it."""
    ref_out = None
    for name, f in impls.items():
        try:
            fwd = jax.jit(f)
            loss = lambda *a, f=f: jnp.sum(f(*a).astype(jnp.float32) * loss_ct.astype(jnp.float32))
            fb = jax.jit(jax.value_and_grad(loss, argnums=argnums))
            c1, ms1 = timeit(fwd, args, iters)
            c2, ms2 = timeit(fb, args, iters)
            out = (fwd(*args), fb(*args)[1])
            if ref_out is None:
                ref_out = out
                (e1, r1), (e2, r2) = (None, None), (None, None)
            else:
                (e1, r1), (e2, r2) = errors(out[0], ref_out[0]), errors(out[1], ref_out[1])
            record(kernel, case, f"{name} fwd", ms1, c1, flops=flops_fwd, err=e1, rel=r1)
            record(kernel, case, f"{name} fwd+bwd", ms2, c2, flops=bwd_factor * flops_fwd, err=e2,
                   rel=r2)
            del out
        except Exception as e:  # noqa: BLE001
            record(kernel, case, name, error=f"{type(e).__name__}: {str(e)[:1500]}\n"
                   f"{traceback.format_exc(limit=3)[-1200:]}")


def bench_attention(cfg, rng):
    interp = cfg.smoke
    cases = ([(1, 40, 4, 2, 16, True, jnp.float32)] if cfg.smoke else
             [(4, 2048, 16, 16, 128, True, jnp.bfloat16),
              (2, 4096, 32, 8, 128, True, jnp.bfloat16),
              (1, 8192, 16, 4, 128, True, jnp.bfloat16),
              (2, 2000, 8, 2, 64, False, jnp.bfloat16),   # ragged T, non-causal
              (1, 1024, 8, 2, 64, True, jnp.float32)])
    for (b, t, h, kv, d, causal, dt) in cases:
        case = f"B{b} T{t} H{h} KV{kv} D{d} {'causal' if causal else 'full'} {jnp.dtype(dt).name}"

        @guarded("attention", case, cfg.budget)
        def _():
            ks = jax.random.split(rng, 4)
            q = jax.random.normal(ks[0], (b, t, h, d), dt)
            k = jax.random.normal(ks[1], (b, t, kv, d), dt)
            v = jax.random.normal(ks[2], (b, t, kv, d), dt)
            ct = jax.random.normal(ks[3], (b, t, h, d), dt)
            docs = 4  # packed: 4 documents per row, the last 3 % of each row is padding (id 0)
            pos = jnp.arange(t)
            seg = jnp.where(pos < int(0.97 * t), 1 + (pos * docs) // t, 0).astype(jnp.int32)
            seg = jnp.broadcast_to(seg, (b, t))
            impls = {
                "xla_reference": lambda q, k, v, s: attn_mod.attention_reference(q, k, v, s,
                                                                                 causal=causal),
                "pallas": lambda q, k, v, s: attn_mod.attention_pallas(q, k, v, s, causal=causal,
                                                                       interpret=interp)}
            if not cfg.smoke and kv == h and t % 128 == 0:
                from jax.experimental.pallas.ops.gpu import attention as jax_attn
                impls["jax_mha"] = lambda q, k, v, s: jax_attn.mha(q, k, v, s, sm_scale=1 / math.sqrt(d),
                                                                   causal=causal)
            run_impls("attention", case, impls, (q, k, v, seg), ct, (0, 1, 2), cfg.iters,
                      4 * b * h * t * t * d * (0.5 if causal else 1.0), 3.5)


def bench_sltrain(cfg, rng):
    interp = cfg.smoke
    cases = ([(24, 40, 56, 8, 0.05, jnp.float32)] if cfg.smoke else
             [(8192, 2048, 2048, 512, 0.03, jnp.bfloat16),
              (8192, 4096, 4096, 256, 0.03, jnp.bfloat16),
              (4096, 2048, 5632, 512, 0.03, jnp.bfloat16)])
    for (n, din, dout, r, dens, dt) in cases:
        case = f"N{n} in{din} out{dout} r{r} d{dens} {jnp.dtype(dt).name}"

        @guarded("sltrain", case, cfg.budget)
        def _():
            ks = jax.random.split(rng, 6)
            x = jax.random.normal(ks[0], (n, din), dt)
            a = (jax.random.normal(ks[1], (din, r)) / math.sqrt(din)).astype(dt)
            bb = (jax.random.normal(ks[2], (r, dout)) / math.sqrt(r)).astype(dt)
            nnz = int(dens * din * dout)
            idx = jnp.sort(jax.random.choice(ks[3], din * dout, (nnz,), replace=False)).astype(jnp.int32)
            vals = (jax.random.normal(ks[4], (nnz,)) / math.sqrt(din)).astype(dt)
            gy = jax.random.normal(ks[5], (n, dout), dt)
            scale = 0.25
            impls = {
                "xla_reference": lambda x, a, b, v: sltrain_matmul.sltrain_matmul_reference(
                    x, a, b, idx, v, scale),
                "pallas": lambda x, a, b, v: sltrain_matmul.sltrain_matmul_pallas(
                    x, a, b, idx, v, scale, fused=False, interpret=interp),
                "pallas_fused": lambda x, a, b, v: sltrain_matmul.sltrain_matmul_pallas(
                    x, a, b, idx, v, scale, fused=True, interpret=interp)}
            run_impls("sltrain", case, impls, (x, a, bb, vals), gy, (0, 1, 2, 3), cfg.iters,
                      2 * n * din * dout + 2 * n * r * (din + dout), 3.0)


def bench_quant_matmul(cfg, rng):
    interp = cfg.smoke
    cases = ([(3, 256, 64, 4, 128, jnp.float32), (5, 256, 32, 2, 256, jnp.float32)] if cfg.smoke
             else [(16, 4096, 4096, 4, 128, jnp.bfloat16),
                   (64, 4096, 4096, 4, 128, jnp.bfloat16),
                   (4096, 4096, 4096, 4, 128, jnp.bfloat16),
                   (16, 4096, 4096, 8, 128, jnp.bfloat16),
                   (16, 4096, 4096, 2, 256, jnp.bfloat16),
                   (16, 4096, 11008, 4, 128, jnp.bfloat16)])
    for (m, din, dout, bits, gs, dt) in cases:
        case = f"M{m} in{din} out{dout} int{bits} g{gs} {jnp.dtype(dt).name}"

        @guarded("quant_mm", case, cfg.budget)
        def _():
            ks = jax.random.split(rng, 2)
            w = jax.random.normal(ks[0], (din, dout)) * 0.02
            x = jax.random.normal(ks[1], (m, din), dt)
            qw, s, z = quant_matmul.rtn_quantize(w, bits, gs)
            wbytes = qw.size * 4 + 2 * s.size * 4
            nbytes = wbytes + x.size * x.dtype.itemsize + m * dout * x.dtype.itemsize
            flops = 2 * m * din * dout
            kw = dict(bits=bits, group_size=gs)
            pal = jax.jit(lambda x, qw, s, z: quant_matmul.quant_matmul_pallas(x, qw, s, z, **kw,
                                                                               interpret=interp))
            ref = jax.jit(lambda x, qw, s, z: quant_matmul.quant_matmul_reference(x, qw, s, z, **kw))
            c0, ms0 = timeit(ref, (x, qw, s, z), cfg.iters)
            yr = ref(x, qw, s, z)
            record("quant_mm", case, "xla_reference", ms0, c0, flops=flops, nbytes=nbytes)
            c1, ms1 = timeit(pal, (x, qw, s, z), cfg.iters)
            e, r = errors(pal(x, qw, s, z), yr)
            record("quant_mm", case, "pallas", ms1, c1, flops=flops, nbytes=nbytes, err=e, rel=r)
            if not cfg.smoke:  # speed of light: the dense bf16 matmul on a pre-dequantized W
                wd = quant_matmul.dequantize(qw, s, z, bits, gs, dt)
                dense = jax.jit(lambda x, w: x @ w)
                c2, ms2 = timeit(dense, (x, wd), cfg.iters)
                record("quant_mm", case, "xla_dense_bf16_W", ms2, c2, flops=flops,
                       nbytes=wd.size * 2 + x.size * 2 + m * dout * 2)


def bench_optim(cfg, rng):
    interp = cfg.smoke
    n = 5000 if cfg.smoke else 64 * 1024 * 1024 + 123  # ragged on purpose
    for op in ("adam", "sophia"):
        case = f"{op} n={n} p,g f32"

        @guarded("optim", case, cfg.budget)
        def _():
            ks = jax.random.split(rng, 3)
            p = jax.random.normal(ks[0], (n,))
            g = jax.random.normal(ks[1], (n,))
            m = jnp.zeros((n,)) + 0.01
            v = jnp.abs(jax.random.normal(ks[2], (n,)))
            if op == "adam":
                kw = dict(lr=1e-3, weight_decay=0.1)
                pal = lambda p, m, v, g: fused_optim.adam_update_pallas(p, g, m, v, 5, interpret=interp,
                                                                        **kw)
                ref = lambda p, m, v, g: fused_optim.adam_update_reference(p, g, m, v, 5, **kw)
                nbytes = 7 * 4 * n
            else:
                kw = dict(lr=1e-3)
                pal = lambda p, m, h, g: (*fused_optim.sophia_update_pallas(p, g, m, h, interpret=interp,
                                                                            **kw), h)
                ref = lambda p, m, h, g: (*fused_optim.sophia_update_reference(p, g, m, h, **kw), h)
                nbytes = 6 * 4 * n
            out_p = jax.jit(pal)(p, m, v, g)
            out_r = jax.jit(ref)(p, m, v, g)
            e, r = errors(out_p, out_r)
            for name, f in (("xla_reference", ref), ("pallas", pal)):
                step = jax.jit(f, donate_argnums=(0, 1, 2))
                state = (p + 0, m + 0, v + 0)
                c, ms = timeit_carry(step, state, (g,), cfg.iters)
                record("optim", case, name, ms, c, nbytes=nbytes,
                       err=e if name == "pallas" else None, rel=r if name == "pallas" else None)

    gcases = [(64, 48, 16)] if cfg.smoke else [(4096, 4096, 256), (2048, 5632, 512),
                                               (4096, 11008, 128)]
    for (mm, nn, r) in gcases:
        case = f"galore G{mm}x{nn} r{r} bf16"

        @guarded("optim", case, cfg.budget)
        def _():
            ks = jax.random.split(rng, 2)
            g = jax.random.normal(ks[0], (mm, nn), jnp.bfloat16)
            proj = jnp.linalg.qr(jax.random.normal(ks[1], (mm, r)))[0].astype(jnp.bfloat16)
            mu, nu = jnp.zeros((r, nn)), jnp.zeros((r, nn)) + 1e-3
            full_p = jax.jit(lambda *a: fused_optim.galore_adam_update_pallas(
                a[2], a[3], a[0], a[1], 3, interpret=interp))
            full_r = jax.jit(lambda *a: fused_optim.galore_adam_update_reference(a[2], a[3], a[0], a[1], 3))
            e, rr = errors(full_p(mu, nu, g, proj), full_r(mu, nu, g, proj))
            flops = 4 * mm * nn * r
            nbytes = 2 * (2 * mm * nn + mm * r) + 4 * 4 * r * nn
            for name, full in (("xla_reference", full_r), ("pallas", full_p)):
                c, ms = timeit(full, (mu, nu, g, proj), cfg.iters)
                record("optim", case, name, ms, c, flops=flops, nbytes=nbytes,
                       err=e if name == "pallas" else None, rel=rr if name == "pallas" else None)


def bench_group_quant(cfg, rng):
    interp = cfg.smoke
    n = 3000 if cfg.smoke else 64 * 1024 * 1024
    for fmt in ("int8", "fp8_coat"):
        case = f"quantize {fmt} n={n} f32, group 128"

        @guarded("group_q", case, cfg.budget)
        def _():
            x = jax.random.normal(rng, (n,)) * jnp.exp(2 * jax.random.normal(jax.random.PRNGKey(7),
                                                                               (n,)))
            if fmt == "int8":
                pal = jax.jit(lambda x: group_quant.quantize_int8_pallas(x, interpret=interp))
                ref = jax.jit(group_quant.quantize_int8_reference)
                deq = lambda o: group_quant.dequantize_int8(o[0], o[1], x.shape)
                nbytes = 4 * n + n + 4 * n // 128
            else:
                pal = jax.jit(lambda x: group_quant.quantize_fp8_pallas(x, interpret=interp))
                ref = jax.jit(group_quant.quantize_fp8_reference)
                deq = lambda o: group_quant.dequantize_fp8(o, x.shape)
                nbytes = 4 * n + n + 12 * n // 128
            op, orf = pal(x), ref(x)
            xp, xr = deq(op), deq(orf)
            e, r = errors(xp, xr)
            codes_differ = float(jnp.mean((op[0].astype(jnp.float32) != orf[0].astype(jnp.float32))))
            rel_q = float(jnp.median(jnp.abs(xr - x) / jnp.maximum(jnp.abs(x), 1e-30)))
            for name, f in (("xla_reference", ref), ("pallas", pal)):
                c, ms = timeit(f, (x,), cfg.iters)
                extra = dict(codes_differ_frac=codes_differ) if name == "pallas" else dict(
                    median_rel_quant_err=rel_q)
                record("group_q", case, name, ms, c, nbytes=nbytes, err=e if name == "pallas" else None,
                       rel=r if name == "pallas" else None, **extra)


SECTIONS = {"attention": bench_attention, "sltrain": bench_sltrain, "quant_mm": bench_quant_matmul,
            "optim": bench_optim, "group_q": bench_group_quant}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    parser.add_argument("--out", default=None, help="write JSON results here")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma list of sections")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per repeat")
    parser.add_argument("--budget", type=float, default=None, help="seconds before skipping")
    cfg = parser.parse_args(argv)
    cfg.iters = cfg.iters or (1 if cfg.smoke else 10)
    cfg.budget = cfg.budget or (600.0 if cfg.smoke else 300.0)
    log(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    if not cfg.smoke and jax.default_backend() == "cpu":
        log("WARNING: no accelerator; use --smoke on CPU")
    rng = jax.random.PRNGKey(0)
    for name in cfg.only.split(","):
        log(f"== {name}")
        try:
            SECTIONS[name](cfg, rng)
        except Exception as e:  # noqa: BLE001
            record(name, "(section)", "-", error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    print("\nkernel     case                                       impl              ms      "
          "rate        err", flush=True)
    for row in ROWS:
        rate = (f"{row['tflops']:7.1f} TF/s" if "tflops" in row else
                f"{row['gbps']:7.0f} GB/s" if "gbps" in row else "")
        err = (f"{row['max_abs_err']:.1e}" if row.get("max_abs_err") is not None else "")
        ms = f"{row['ms']:9.3f}" if row.get("ms") else "    ERROR" if row.get("error") else ""
        print(f"{row['kernel']:10s} {row['case']:42s} {row['impl']:16s} {ms} {rate:12s} {err}",
              flush=True)
    n_err = sum(1 for r in ROWS if r.get("error"))
    log(f"done: {len(ROWS)} rows, {n_err} errors")
    if cfg.out:
        meta = dict(jax=jax.__version__, backend=jax.default_backend(),
                    devices=[str(d) for d in jax.devices()], smoke=cfg.smoke, iters=cfg.iters,
                    wall_s=time.time() - START)
        with open(cfg.out, "w") as f:
            json.dump(dict(meta=meta, rows=ROWS), f, indent=1)
        log(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
