"""Prepacking vs padding for the prefill of a batch of chat prompts on SmolLM2-135M.

    python -m experiments.study_prepack                 # CPU: 32 prompts of 40-256 tokens
    python -m experiments.study_prepack --smoke         # 8 short prompts, one repeat
    python -m experiments.study_prepack --device gpu    # GPU: 64 prompts of 40-1024 tokens

"Prepacking: A Simple Method for Fast Prefilling and Increased Throughput in Large Language
Models" (Zhao et al., 2024). Prompts: ``--prompts`` ChatML prompts of SmolLM2-135M-Instruct
(``jaxeff.models.pretrained("smollm2-135m")``, system prompt included), each asking to continue a
run of consecutive tinyshakespeare lines; the target token length of each is drawn from a
long-tailed log-normal (median ``--median`` tokens, sigma 0.8, clipped to [40, ``--max-len``]),
so a few long prompts set the padded length while most are short -- the case the paper targets.

Three prefills of the same prompts, each jitted once and timed over ``--repeats`` calls after a
warm-up (median wall seconds and median CPU seconds of this process, all threads):

* ``padded``:  ``jaxeff.models.prefill`` of the left-padded ``[B, P_max]`` block into a cache of
  ``P_max + N`` slots (what ``generate`` does without ``prepack``);
* ``packed``:  ``jaxeff.data.pack_prompts`` (first-fit-decreasing, rows of ``P_max`` tokens, the
  paper's bin size) then ``jaxeff.models.prefill_packed`` into the same cache layout;
* ``packed_2x``: the same with rows of ``2 P_max`` tokens (fewer rows; fuller only where rows of
  ``P_max`` leave gaps the short prompts cannot fill).

Reported per prefill: token-forwards (``B P_max`` vs ``R L``) against the real prompt tokens (the
padding waste); matmul FLOPs (:func:`flops`: linears per token-forward, attention per scored
(query, key) pair -- ``B P_max (P_max + N)`` padded, ``R L^2`` packed with the dense reference
attention on CPU -- and the head) against the FLOPs the real tokens need (causal pairs within each
prompt); XLA's compiled memory (``memory_analysis``: temporaries -- activations and workspace,
what packing shrinks -- and the output cache; the parameters are the same input for all three);
the times; and the largest difference of the last-token logits and of the cache's real slots
against ``padded``. Finally ``generate`` with and
without ``prepack=True`` decodes ``--new-tokens`` greedy tokens for every prompt and the two token
arrays are compared (they must be identical).

The CPU run is sized for a shared 2-core machine (under ~6 CPU-minutes); wall times there are
inflated by other jobs (the 1-minute load average is recorded) -- prefer the CPU seconds. The
GPU mode is the same code with larger sizes; it has not been run yet. Results:
``experiments/results/study_prepack[_gpu].json``.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import statistics
import sys
import time

import numpy as np

DEFAULTS = {  # device -> prompts, median, max_len, new_tokens, repeats
    "cpu": dict(prompts=32, median=64, max_len=256, new_tokens=16, repeats=3),
    "gpu": dict(prompts=64, median=160, max_len=1024, new_tokens=64, repeats=10),
    "smoke": dict(prompts=8, median=48, max_len=64, new_tokens=4, repeats=1),
}


def build_prompts(tok, lines, n, median, max_len, seed):
    """``n`` chat prompts continuing consecutive lines; log-normal target lengths (in tokens)."""
    rng = np.random.default_rng(seed)
    targets = np.clip(np.round(rng.lognormal(np.log(median), 0.8, n)), 40, max_len).astype(int)
    prompts = []
    for target in targets:
        start = int(rng.integers(0, len(lines) - 400))
        text, best = "", None
        for line in lines[start:start + 400]:
            text += line + "\n"
            ids = tok.apply_chat_template(
                [{"role": "user", "content": "Continue this scene:\n" + text}])
            if ids.size > max_len:
                break
            best = ids
            if ids.size >= target:
                break
        if best is None:            # one very long line: cut its tokens
            best = ids[:max_len]
        prompts.append(np.asarray(best, np.int32))
    return prompts


def _timed(fn, args, repeats):
    """Compile, warm up, then time ``repeats`` calls: (compile s, [wall s], [cpu s], out)."""
    import jax

    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(*args))
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(compiled(*args))
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return compiled, compile_s, walls, cpus, out


def flops(cfg, token_forwards, attended_pairs, prompts):
    """Matmul FLOPs of a prefill: ``2 W`` per token-forward (W: weights of the block linears),
    ``4 H K`` per (query, key) pair scored in each layer, and the head for each prompt's last
    token. (XLA's ``cost_analysis`` counts a ``scan`` body once, not once per layer.)"""
    D, F, H, G, K = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    w = D * (H * K + 2 * G * K) + H * K * D + 3 * D * F
    return cfg.n_layers * (2 * w * token_forwards + 4 * H * K * attended_pairs) \
        + 2 * D * cfg.vocab_size * prompts


def _memory(compiled):
    mem = compiled.memory_analysis()
    return {"temp_mb": mem.temp_size_in_bytes / 2**20,
            "output_mb": mem.output_size_in_bytes / 2**20,
            "argument_mb": mem.argument_size_in_bytes / 2**20}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                    help="auto: the GPU when JAX sees one")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    for name in ("prompts", "median", "max_len", "new_tokens", "repeats"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default=None, help="compute dtype (default float32 on CPU, "
                                                  "bfloat16 on GPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from jaxeff.data import find_shared_data, pack_prompts
    from jaxeff.models import generate, prefill, prefill_packed, pretrained

    backend = jax.default_backend()
    device = ("gpu" if backend == "gpu" else "cpu") if args.device == "auto" else args.device
    if device == "gpu" and backend != "gpu":
        raise SystemExit(f"--device gpu but JAX's backend is {backend!r} (install jax[cuda])")
    sizes = dict(DEFAULTS["smoke" if args.smoke else device])
    sizes.update({k: getattr(args, k) for k in sizes if getattr(args, k) is not None})
    dtype = args.dtype or ("bfloat16" if device == "gpu" else "float32")
    out_path = args.out or os.path.join(
        "experiments", "results",
        "study_prepack" + ("_smoke" if args.smoke else "") + ("_gpu" if device == "gpu" else "")
        + ".json")
    cpu0, wall0 = time.process_time(), time.perf_counter()

    cfg, params, tok = pretrained("smollm2-135m", compute_dtype=dtype)
    path = find_shared_data("tinyshakespeare.txt")
    if path is None:
        raise SystemExit("tinyshakespeare.txt not found: set JAXEFF_SHARED_DATA to its folder")
    with open(path) as f:
        lines = [l for l in f.read().splitlines() if l.strip()]
    prompts = build_prompts(tok, lines, sizes["prompts"], sizes["median"], sizes["max_len"],
                            args.seed)
    lengths = np.array([p.size for p in prompts])
    B, P, N = len(prompts), int(lengths.max()), sizes["new_tokens"]
    slots = P + N
    print(f"{B} prompts, lengths min {lengths.min()} median {int(np.median(lengths))} "
          f"mean {lengths.mean():.0f} max {P}; {lengths.sum()} real tokens; backend {backend}, "
          f"compute {dtype}", flush=True)

    tokens = np.zeros((B, P), np.int32)
    real = np.zeros((B, P), bool)
    for b, p in enumerate(prompts):
        tokens[b, P - p.size:], real[b, P - p.size:] = p, True
    padded_fn = functools.partial(prefill, cfg=cfg, slots=slots)
    packed_fn = functools.partial(prefill_packed, cfg=cfg, slots=slots)

    # the work a prefill cannot avoid: real tokens, causal (query, key) pairs within each prompt
    needed_flops = flops(cfg, int(lengths.sum()), int((lengths * (lengths + 1) // 2).sum()), B)
    runs = {}
    variants = [("padded", None), ("packed", P), ("packed_2x", 2 * P)]
    ref = None
    for name, row_len in variants:
        if row_len is None:      # every query slot scores all S cache slots
            fn, forwards, pairs = padded_fn, B * P, B * P * slots
            kwargs = dict(tokens_BxP=jnp.asarray(tokens), real_BxP=jnp.asarray(real))
            rows = B
        else:
            t0 = time.perf_counter()
            packed = pack_prompts(prompts, row_len)
            plan_s = time.perf_counter() - t0
            rows = packed.tokens_RxL.shape[0]
            forwards = packed.tokens_RxL.size
            pairs = rows * row_len * row_len     # the dense reference scores the whole row
            fn = packed_fn
            kwargs = dict(packed=jax.tree.map(jnp.asarray, packed))
        call = jax.jit(lambda p, kw, fn=fn: fn(p, **kw))
        compiled, compile_s, walls, cpus, (logits, cache) = _timed(call, (params, kwargs),
                                                                    sizes["repeats"])
        r = {"rows": rows, "row_len": row_len or P, "token_forwards": int(forwards),
             "padding_fraction": 1 - float(lengths.sum()) / forwards,
             "gflops": flops(cfg, forwards, pairs, B) / 1e9,
             "flop_waste": 1 - needed_flops / flops(cfg, forwards, pairs, B),
             "compile_s": compile_s, "wall_s": statistics.median(walls),
             "cpu_s": statistics.median(cpus), "wall_all": walls, "cpu_all": cpus,
             **_memory(compiled)}
        if row_len is not None:
            r["plan_s"] = plan_s
        if ref is None:
            ref = (np.asarray(logits, np.float32), cache)
        else:
            valid = np.asarray(ref[1].valid_BxS)[None, :, :, None, None]
            r["max_abs_logit_diff"] = float(np.abs(np.asarray(logits, np.float32) - ref[0]).max())
            r["same_argmax"] = bool((np.argmax(logits, -1) == np.argmax(ref[0], -1)).all())
            r["max_abs_cache_diff"] = max(
                float(np.abs(np.where(valid, np.asarray(a, np.float32) - np.asarray(b, np.float32),
                                      0)).max())
                for a, b in ((cache.k_NxBxSxGxK, ref[1].k_NxBxSxGxK),
                             (cache.v_NxBxSxGxK, ref[1].v_NxBxSxGxK)))
        runs[name] = r
        print(f"{name:10s} {rows:3d} rows x {r['row_len']:4d}: {forwards:6d} token-forwards "
              f"({100 * r['padding_fraction']:.0f}% padding), {r['gflops']:.0f} GFLOP "
              f"({100 * r['flop_waste']:.0f}% wasted), "
              f"temp {r['temp_mb']:.0f} MB, {r['wall_s']:.2f} s wall / {r['cpu_s']:.2f} CPU-s "
              f"(compile {compile_s:.1f} s)"
              + (f", max |dlogit| {r['max_abs_logit_diff']:.1e}" if "max_abs_logit_diff" in r
                 else ""), flush=True)

    t0 = time.perf_counter()
    want = np.asarray(generate(params, cfg, prompts, N))
    gen_padded_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = np.asarray(generate(params, cfg, prompts, N, prepack=True))
    gen_packed_s = time.perf_counter() - t0
    same = bool(np.array_equal(want, got))
    print(f"generate {N} greedy tokens x {B} prompts: identical={same} "
          f"({int((want != got).any(axis=1).sum())} rows differ); wall incl. compile "
          f"{gen_padded_s:.1f} s padded, {gen_packed_s:.1f} s prepacked", flush=True)
    print(f"  e.g. {tok.decode(prompts[0][-12:])!r} -> {tok.decode(got[0])!r}")

    pad, pk = runs["padded"], runs["packed"]
    report = {
        "study": "prepack", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m experiments.study_prepack " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, backend {backend} "
                   f"({jax.devices()[0].device_kind}); load average {os.getloadavg()[0]:.1f} at "
                   f"the end (shared machine: wall times inflated, prefer cpu_s)",
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized)", "compute_dtype": dtype,
        "sizes": sizes, "prompt_lengths": lengths.tolist(), "real_tokens": int(lengths.sum()),
        "cache_slots": slots, "needed_gflops": needed_flops / 1e9, "prefill": runs,
        "speedup_packed_wall": pad["wall_s"] / pk["wall_s"],
        "speedup_packed_cpu": pad["cpu_s"] / pk["cpu_s"],
        "temp_memory_ratio_packed": pk["temp_mb"] / pad["temp_mb"],
        "generate": {"new_tokens": N, "identical": same,
                     "rows_differing": int((want != got).any(axis=1).sum()),
                     "wall_s_incl_compile": {"padded": gen_padded_s, "prepacked": gen_packed_s}},
        "total_cpu_s": time.process_time() - cpu0, "total_wall_s": time.perf_counter() - wall0,
        "ran_on_gpu": device == "gpu",
    }
    print(f"packed vs padded prefill: {report['speedup_packed_wall']:.2f}x wall, "
          f"{report['speedup_packed_cpu']:.2f}x CPU-s, temp memory "
          f"{report['temp_memory_ratio_packed']:.2f}x; total {report['total_cpu_s']:.0f} CPU-s "
          f"/ {report['total_wall_s']:.0f} s wall", flush=True)
    from experiments.common import write_json
    write_json(report, out_path)
    return report


if __name__ == "__main__":
    main()
