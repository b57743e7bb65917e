"""Tune Sophia-G on the speedrun workload: peak lr x rho, with the win rate the authors steer by.

    python -m experiments.sweep_sophia                          # default grid, 100 steps each
    python -m experiments.sweep_sophia --lrs 3e-3,1e-3 --rhos 0.05,0.5 --steps 200

The Sophia authors advise tuning rho so that the win rate (the fraction of coordinates whose
preconditioned step m / (rho * h) is not clipped) stays in 0.1-0.5, with lr near AdamW's. Each
grid point trains the speedrun's tiny workload with the ``sophia`` recipe's optimizer (the only
change from the baseline), evaluated on the same validation batches; the baseline (AdamW) runs
first in the same process. Writes ``experiments/results/sweep_sophia.json`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from experiments import speedrun
from experiments.common import write_json
from experiments.recipes import baseline as baseline_recipe
from experiments.recipes import sophia as sophia_recipe


def _floats(text: str, name: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--{name} must be comma-separated numbers; got {text!r}")
    if not vals or any(v <= 0 for v in vals):
        raise SystemExit(f"--{name} must be positive numbers; got {text!r}")
    return vals


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lrs", default="3e-3,1e-3", help="Sophia peak learning rates")
    p.add_argument("--rhos", default="0.05,0.3,1.0", help="Sophia rho values")
    p.add_argument("--bias-correction", default="off",
                   help="'off', 'on' or 'both': divide m by 1-b1^t and h by 1-b2^refreshes")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", default="experiments/results/sweep_sophia.json")
    args = p.parse_args(argv)
    lrs, rhos = _floats(args.lrs, "lrs"), _floats(args.rhos, "rhos")
    bcs = {"off": [False], "on": [True], "both": [False, True]}.get(args.bias_correction)
    if bcs is None:
        raise SystemExit(f"--bias-correction must be off, on or both; got {args.bias_correction!r}")
    ctx = speedrun.build_context(speedrun.parse_args(
        ["--steps", str(args.steps), "--out", os.path.join("runs", "sweep_sophia"),
         "--no-progress"]))
    t0 = time.perf_counter()
    base = baseline_recipe.RECIPE.run(ctx)
    rows = [{"optimizer": "adamw", "peak_lr": ctx.peak_lr, "rho": None, "bias_correction": None,
             "final_val_loss": base.history[-1]["val_loss"], "win_rate_mean": None,
             "win_rate_final": None, "steps_per_s": base.steps_per_s}]
    print(f"adamw lr {ctx.peak_lr:g}: {rows[0]['final_val_loss']:.4f}", flush=True)
    for lr, rho, bc in [(lr, rho, bc) for lr in lrs for rho in rhos for bc in bcs]:
        res = sophia_recipe.train_sophia(ctx, name=f"sophia_lr{lr:g}_rho{rho:g}_bc{int(bc)}",
                                         peak_lr=lr, rho=rho, bias_correction=bc)
        wins = res["win_rates"]
        row = {"optimizer": "sophia-g", "peak_lr": lr, "rho": rho, "bias_correction": bc,
               "final_val_loss": res["history"][-1]["val_loss"],
               "win_rate_mean": sum(wins) / len(wins) if wins else None,
               "win_rate_final": wins[-1] if wins else None,
               "steps_per_s": res["steps_per_s"]}
        rows.append(row)
        print(f"sophia lr {lr:g} rho {rho:g} bias correction {bc}: "
              f"{row['final_val_loss']:.4f} "
              f"(win rate mean {row['win_rate_mean']:.3f}, final {row['win_rate_final']:.3f})",
              flush=True)
    out = {"command": " ".join(["python -m experiments.sweep_sophia"] + (argv if argv is not None
                                                                else sys.argv[1:])),
           "steps": ctx.steps, "tokens_per_step": ctx.tokens_per_step,
           "total_wall_s": time.perf_counter() - t0, "rows": rows}
    write_json(out, args.out)
    return out


if __name__ == "__main__":
    main()
