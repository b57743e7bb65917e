"""Horizon study: each flagship recipe at a horizon where its mechanism can act, with seeds.

    python -m experiments.study_horizon --smoke          # end to end in a few minutes (no verdicts)
    python -m experiments.study_horizon --plan           # settings + time estimate, runs nothing
    python -m experiments.study_horizon                  # the CPU study (~60 min, 2 idle cores)
    python -m experiments.study_horizon --device gpu     # tiny + small at ~20 tokens/param, 3 seeds

Recipes (``experiments/recipes/*``, unchanged): baseline (AdamW + WSD), sophia (Sophia-G), galore,
galore-8bit, sltrain, gstack (G_stack), meco, select (data selection), sparse-75 (gradual
pruning). Each recipe keeps its paper-scaled hyperparameters (see its docstring); this study only
sets the workload and the learning rate.

CPU horizon (``SETTINGS['cpu']``): ``tiny`` preset (1.05M params), 8 x 64 byte tokens a step,
1,000 steps (512,000 tokens per run, 0.05 epochs of the stdlib split). The step count is set by
Sophia: k = 10 (the paper's) needs 1,000 steps for 100 Hessian refreshes. What that does to the
other mechanisms: MeCo's plain cooldown is the last 100 steps (the paper's 10%); G_stack grows at
4.3% of the budget (43 steps) -- the fraction the paper's timing rule gives at its 3B/300B
setting; the rule applied literally at our N = 1e6, D = 5e5 says ``d > D`` (never grow), see
``experiments/recipes/gstack.py``; GaLore refreshes every 250 steps (4 refreshes; paper: 200);
sparse-75 prunes every 20 steps through 25-75% of the run.

Learning rate: a 3-point sweep (0.5x, 1x, 2x each recipe's own paper-scaled lr, which is relative
to the baseline's 3e-3) at a short horizon (``sweep_steps``, seed 0) for the baseline and for
each recipe; the long runs use each one's best point (lowest final validation loss). Long runs:
``seeds`` seeds (model init and data order). Per seed the target is that seed's tuned baseline's
final validation loss; ``tokens_ratio`` = recipe tokens to target / baseline tokens to target,
paired by seed; mean and two-sided 95% Student-t interval over seeds
(``experiments.speedrun.t_interval``).

Verdicts (:func:`verdict`), per paper claim:

* speed-up claims (Sophia 2x, G_stack, MeCo 1.5x, data selection): "reproduced in direction" if
  every seed reaches the target and the ratio's interval lies below 1; "not reproduced" if it
  lies above 1, or if the paired final-loss difference (recipe - baseline) has its interval
  above 0; otherwise "inconclusive".
* equal-loss-with-less-memory claims (GaLore, 8-bit GaLore, SLTrain; sparse-75 tested as "equal
  loss to dense at equal tokens", which is stronger than its paper's average-parameter claim):
  state bytes below the baseline's, and the final-loss difference interval below +1% of the
  baseline's loss ("reproduced"); interval above +1% ("not reproduced"); otherwise inconclusive.

Time estimate: ``--plan`` projects the wall-clock from the last ``--smoke`` run's measurements
(per recipe, from its last seed, whose compiles hit the persistent cache: seconds per training
step between the first and last evaluation, fixed cost = compile + setup, seconds per
evaluation), which uses the same model and batch as the full CPU run, and divides by the smoke's
load factor (mean 1-minute load average / cores, >= 1) for an idle machine. Rough: the smoke's
GaLore refreshes every 7 steps (gap = steps // 4), the full run's every 250, so GaLore's
per-step cost is over-estimated. Outputs: ``experiments/results/
study_horizon_<mode>.{json,png}`` (``--out`` for the run's per-recipe logs, default
``runs/study_horizon-<stamp>``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Optional

import numpy as np

from experiments import speedrun
from experiments.recipes import meco as meco_recipe
from jaxeff.models import llama

RECIPES = ("baseline", "sophia", "galore", "galore-8bit", "sltrain", "gstack", "meco", "select",
           "sparse-75")
SPEEDUP = {"sophia": "Sophia-G: ~2x fewer steps than AdamW to the same loss (Liu et al., 2023)",
           "gstack": "G_stack: fewer tokens to the same loss (2.2x at 7B; Du et al., 2024)",
           "meco": "MeCo: ~1.5x less data to the same quality (Gao et al., 2025)",
           "select": "data selection: fewer tokens to the same loss than unselected data"}
EQUAL = {"galore": "GaLore: full-rank loss with less optimizer memory (Zhao et al., 2024)",
         "galore-8bit": "8-bit GaLore: full-rank loss with less memory (Zhao et al., 2024)",
         "sltrain": "SLTrain: full-rank loss with fewer stored weights (Han et al., 2024)",
         "sparse-75": "75% gradual pruning: dense loss at equal tokens (stronger than Jin et al. "
                      "2025's average-parameter claim)"}
EQUAL_MARGIN = 0.01      # relative final-loss margin of the equal-loss claims
# the plain Grain pipeline's single-thread rate in the default main job
# (experiments/results/speedrun_default.json, meco's pipeline_plain_tokens_per_s)
PIPELINE_TOKENS_PER_S = 643_648
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One study configuration (``SETTINGS``)."""
    models: tuple
    batch_size: int
    seq_len: int
    steps: dict            # model -> long-run steps
    eval_every: int
    eval_batches: int
    seeds: int
    sweep_steps: int
    sweep_mults: tuple
    sweep_recipes: Optional[tuple]   # None: every recipe
    corpus: str            # 'stdlib' or 'site-packages'
    note: str = ""
    data_workers: int = 0  # > 0: pre-pack batches in that many processes (experiments.prepacked)


SETTINGS = {
    "cpu": Setting(models=("tiny",), batch_size=8, seq_len=64, steps={"tiny": 1000},
                   eval_every=50, eval_batches=8, seeds=2, sweep_steps=150,
                   sweep_mults=(0.5, 1.0, 2.0), sweep_recipes=None, corpus="stdlib",
                   note="2-core CPU, ~60 min on an idle machine"),
    # ~20 tokens per parameter: tiny 1.05M params x 20 = 21M tokens = 1,000 steps of 80 x 256;
    # small 3.25M x 20 = 65M = 1,000 steps of 256 x 256 (the site-packages corpus: 87M train
    # tokens, so < 1 epoch; the 10.3M-token stdlib split would repeat 6x). The lr sweep runs on
    # tiny only (200 steps, seed 0); small reuses tiny's choice.
    "gpu": Setting(models=("tiny", "small"), batch_size=0, seq_len=256,
                   steps={"tiny": 1000, "small": 1000}, eval_every=100, eval_batches=16,
                   seeds=3, sweep_steps=200, sweep_mults=(0.5, 1.0, 2.0),
                   sweep_recipes=None, corpus="site-packages",
                   note="one H200 (16 host cores), target 9 min; not run yet. Its ~2.6B "
                        "training tokens would need ~70 min of the single-thread Grain "
                        "pipeline (0.64M tokens/s), so batches are pre-packed in 14 worker "
                        "processes, each seed's streams while the previous seed trains",
                   data_workers=14),
    # the smoke: the CPU run's model and batch (so its timings calibrate --plan), 30 steps,
    # 2 seeds, the sweep for the baseline only
    "smoke": Setting(models=("tiny",), batch_size=8, seq_len=64, steps={"tiny": 30},
                     eval_every=10, eval_batches=2, seeds=2, sweep_steps=10,
                     sweep_mults=(0.5, 1.0, 2.0), sweep_recipes=("baseline",), corpus="stdlib",
                     note="end-to-end check; numbers mean nothing"),
}
GPU_BATCH = {"tiny": 80, "small": 256}


def _log(msg):
    print(msg, flush=True)


def make_context(setting: Setting, model: str, out_dir: str,
                 prepacker=None) -> speedrun.SpeedrunContext:
    cfg = llama.PRESETS[model]
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, setting.seq_len))
    bs = setting.batch_size or GPU_BATCH[model]
    ctx = speedrun.SpeedrunContext(cfg=cfg, steps=setting.steps[model], batch_size=bs,
                                   seq_len=setting.seq_len, peak_lr=3e-3,
                                   eval_every=setting.eval_every,
                                   eval_batches_n=setting.eval_batches, out_dir=out_dir,
                                   progress=False, prepacker=prepacker)
    if setting.corpus == "site-packages":
        from jaxeff import data as jdata
        from jaxeff.data import _epochs as epochs
        ctx.train_corpus = jdata.load_site_packages_corpus("train")
        ctx.val_corpus = jdata.load_site_packages_corpus("validation")
        ctx.unique_tokens = epochs.unique_target_tokens(ctx.train_corpus, ctx.tokenizer)
    return ctx


def _run_one(ctx, setting, name, steps, lr_mult, seed, out_dir):
    """One recipe run (``speedrun.run_seeds``); returns ``(RecipeResult or None, error text or
    None, seconds)``."""
    ctx.steps, ctx.peak_lr, ctx.seed = steps, 3e-3 * lr_mult, seed
    ctx.eval_every = max(1, min(setting.eval_every, steps))
    os.makedirs(out_dir, exist_ok=True)
    ctx.out_dir = out_dir
    t = time.perf_counter()
    res, err = speedrun.run_seeds(ctx, [name], [seed], log=lambda m: None)
    return res[seed].get(name), err[seed].get(name), time.perf_counter() - t


def timing(result: speedrun.RecipeResult, total_s: float, steps: int) -> dict:
    """Seconds per training step (between the first and last evaluation), fixed seconds
    (compile + setup) and seconds per evaluation, from one run's history and total time."""
    h = result.history
    if len(h) >= 2 and h[-1]["step"] > h[0]["step"]:
        per_step = (h[-1]["wall_s"] - h[0]["wall_s"]) / (h[-1]["step"] - h[0]["step"])
    else:
        per_step = result.wall_s / max(steps, 1)
    fixed = max(0.0, result.wall_s - per_step * steps)
    per_eval = max(0.0, total_s - result.wall_s) / max(len(h), 1)
    return {"per_step_s": per_step, "fixed_s": fixed, "per_eval_s": per_eval}


def verdict(name: str, row: dict, base_row: dict, diff: dict) -> tuple[str, str]:
    """``(verdict, claim)`` for a recipe from its aggregated row (module docstring)."""
    ratio = row["ci95"]["tokens_ratio"]
    if name in SPEEDUP:
        claim = SPEEDUP[name]
        if ratio["missing"] == 0 and ratio["hi"] is not None:
            if ratio["hi"] < 1.0:
                return "reproduced in direction", claim
            if ratio["lo"] > 1.0:
                return "not reproduced", claim
        if diff["lo"] is not None and diff["lo"] > 0:
            return "not reproduced", claim
        return "inconclusive", claim
    claim = EQUAL.get(name, name)
    margin = EQUAL_MARGIN * base_row["final_val_loss"]
    less_memory = row["bytes_ratio"] is not None and row["bytes_ratio"] < 1.0
    if diff["hi"] is not None and diff["hi"] < margin and less_memory:
        return "reproduced in direction", claim
    if (diff["lo"] is not None and diff["lo"] > margin) or not less_memory:
        return "not reproduced", claim
    return "inconclusive", claim


def plan(setting: Setting, recipes, calib: Optional[dict]) -> dict:
    """Runs and projected seconds (from ``calib``: ``{recipe: timing}`` of a smoke run)."""
    runs, total = [], 0.0
    for model in setting.models:
        sweep = [r for r in recipes if setting.sweep_recipes is None or r in setting.sweep_recipes]
        if model != setting.models[0]:
            sweep = []
        for r in recipes:
            passes = 2 if r == "select" else 1          # select also trains a random subset
            for kind, steps, n in (("sweep", setting.sweep_steps,
                                    len(setting.sweep_mults) if r in sweep else 0),
                                   ("long", setting.steps[model], setting.seeds)):
                if not n:
                    continue
                est = None
                if calib and r in calib:
                    c = calib[r]
                    evals = steps // max(1, min(setting.eval_every, steps)) + 1
                    est = n * (c["fixed_s"] + passes * (steps * c["per_step_s"]
                                                        + evals * c["per_eval_s"]))
                    total += est
                bs = setting.batch_size or GPU_BATCH[model]
                runs.append({"model": model, "recipe": r, "kind": kind, "steps": steps,
                             "runs": n, "est_s": est,
                             "tokens": n * passes * steps * bs * setting.seq_len})
    return {"runs": runs, "est_total_s": total if calib else None,
            "tokens": sum(r["tokens"] for r in runs)}


def _latest_smoke() -> tuple[Optional[dict], float]:
    """The last smoke's per-recipe timings and its load factor ``max(1, mean load / cpus)``
    (``os.getloadavg`` at its start and end): a smoke on a machine shared with other jobs ran
    that many times slower than on an idle one, roughly."""
    p = os.path.join(RESULTS, "study_horizon_smoke.json")
    if not os.path.exists(p):
        return None, 1.0
    with open(p) as f:
        s = json.load(f)
    loads = s.get("loadavg") or []
    cpus = (s.get("machine") or {}).get("cpus") or 1
    factor = max(1.0, float(np.mean([x[0] for x in loads])) / cpus) if loads else 1.0
    return s.get("timing"), factor


def plot_study(by_model: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(by_model)
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.5 * len(models)), squeeze=False)
    for i, m in enumerate(models):
        d = by_model[m]
        ax = axes[i][0]
        for name in d["recipes"]:
            hists = [d["long"][s][name]["history"] for s in d["long"] if name in d["long"][s]]
            if not hists:
                continue
            n = min(len(h) for h in hists)
            tok = [hists[0][j]["tokens"] for j in range(n)]
            cis = [speedrun.t_interval([h[j]["val_loss"] for h in hists]) for j in range(n)]
            (line,) = ax.plot(tok, [c["mean"] for c in cis], lw=2.2 if name == "baseline" else 1.2,
                              label=name)
            if all(c["lo"] is not None for c in cis):
                ax.fill_between(tok, [c["lo"] for c in cis], [c["hi"] for c in cis],
                                color=line.get_color(), alpha=0.2, lw=0)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_title(f"{m}: mean over seeds, 95% t-interval bands")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax = axes[i][1]
        rows = [r for r in d["rows"] if r["recipe"] != "baseline"]
        ys = np.arange(len(rows))
        for y, r in zip(ys, rows):
            ci = r["ci95"]["tokens_ratio"]
            if ci["mean"] is None or ci["missing"]:
                ax.text(1.0, y, f"  target not reached in {ci['missing']} of "
                        f"{ci['n'] + ci['missing']} seeds", va="center", fontsize=7)
                continue
            lo = ci["lo"] if ci["lo"] is not None else ci["mean"]
            hi = ci["hi"] if ci["hi"] is not None else ci["mean"]
            ax.errorbar(ci["mean"], y, xerr=[[ci["mean"] - lo], [hi - ci["mean"]]], fmt="o",
                        capsize=3)
        ax.axvline(1.0, color="k", ls=":", lw=0.8)
        ax.set_yticks(ys, [f"{r['recipe']} ({r['verdict']})" for r in rows], fontsize=7)
        ax.set_xlabel("tokens to target / baseline's (95% t-interval)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--smoke", action="store_true", help="tiny end-to-end run (a few minutes)")
    p.add_argument("--plan", action="store_true", help="print runs and time estimate; run nothing")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--seeds", type=int, default=None, help="override the setting's seed count")
    p.add_argument("--steps", type=int, default=None, help="override the long-run steps")
    p.add_argument("--data-workers", type=int, default=None,
                   help="pre-pack training batches in N worker processes (experiments.prepacked;"
                        " default: the setting's, 14 on the GPU, 0 = the live pipeline on CPU)")
    p.add_argument("--out", default=None)
    p.add_argument("--results", default=RESULTS, help="where the json/png go")
    p.add_argument("--compile-cache", default=os.path.join("runs", ".jax_cache"),
                   help="JAX persistent compilation cache ('' = off): later seeds reuse the "
                        "first seed's executables")
    args = p.parse_args(argv)
    mode = "smoke" if args.smoke else args.device
    setting = SETTINGS[mode]
    if args.seeds is not None or args.steps is not None:
        if args.seeds is not None and args.seeds < 1:
            raise SystemExit(f"--seeds must be >= 1; got {args.seeds}")
        setting = dataclasses.replace(
            setting, seeds=args.seeds or setting.seeds,
            steps={m: args.steps or s for m, s in setting.steps.items()})
    if args.data_workers is not None:
        if args.data_workers < 0:
            raise SystemExit(f"--data-workers must be >= 0; got {args.data_workers}")
        setting = dataclasses.replace(setting, data_workers=args.data_workers)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    bad = [r for r in recipes if r not in RECIPES]
    if bad or "baseline" not in recipes:
        raise SystemExit(f"--recipes must include baseline and come from {RECIPES}; got {recipes}")
    recipes = ["baseline"] + [r for r in recipes if r != "baseline"]
    calib, load = _latest_smoke() if mode == "cpu" else (None, 1.0)   # calibrates the CPU run
    planned = plan(setting, recipes, calib)
    est = planned["est_total_s"]
    if est is not None:
        planned["load_factor"], planned["est_idle_s"] = load, est / load
    _log(f"study_horizon[{mode}]: {setting}\n  {sum(r['runs'] for r in planned['runs'])} runs, "
         f"{planned['tokens'] / 1e6:,.1f}M training tokens (the data pipeline alone: "
         f"{planned['tokens'] / PIPELINE_TOKENS_PER_S / 60:.1f} min at one core's "
         f"{PIPELINE_TOKENS_PER_S:,} tokens/s); "
         + (f"estimated {est / 60:.1f} min from the last smoke's timings, which ran at load "
            f"factor {load:.1f}: ~{est / load / 60:.0f} min on an idle machine" if est is not None
            else "no time estimate (CPU: run --smoke first; GPU: not measured)"))
    if args.plan:
        for r in planned["runs"]:
            _log(f"  {r['model']:<6} {r['recipe']:<12} {r['kind']:<5} {r['runs']} x {r['steps']} "
                 f"steps" + (f"  ~{r['est_s']:.0f} s" if r["est_s"] is not None else ""))
        return planned
    if mode == "gpu":
        import jax
        if jax.default_backend() != "gpu":
            raise SystemExit(f"--device gpu needs a GPU backend; jax has {jax.default_backend()!r}")
    if args.compile_cache:
        import jax
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(args.compile_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or os.path.join("runs", f"study_horizon-{mode}-{stamp}")
    t0 = time.perf_counter()
    loadavg = [list(os.getloadavg())]
    by_model, timings = {}, {}
    chosen_mult = {}
    prepacker = None
    if setting.data_workers:
        from experiments.prepacked import Prepacker
        prepacker = Prepacker(min(setting.data_workers, max(1, (os.cpu_count() or 2) - 2)))
        _log(f"pre-packing training batches with {prepacker.max_workers} worker processes")
    for model in setting.models:
        if prepacker is not None:
            prepacker.clear()           # the previous model's streams
        ctx = make_context(setting, model, out, prepacker)
        n_params = llama.param_count(ctx.init_params())
        _log(f"== {model}: {n_params:,} params, {ctx.batch_size}x{ctx.seq_len} tokens/step, "
             f"{setting.steps[model]} steps = "
             f"{setting.steps[model] * ctx.tokens_per_step:,} tokens "
             f"({setting.steps[model] * ctx.tokens_per_step / n_params:.2f} per param), corpus "
             f"{ctx.train_corpus.name} ({ctx.unique_tokens:,} train tokens)")
        sweep = {}
        if model == setting.models[0]:
            for r in recipes:
                if setting.sweep_recipes is not None and r not in setting.sweep_recipes:
                    chosen_mult[r] = 1.0
                    continue
                sweep[r] = {}
                for m in setting.sweep_mults:
                    res, err, dt = _run_one(ctx, setting, r, setting.sweep_steps, m, 0,
                                            os.path.join(out, model, "sweep", f"{r}-x{m:g}"))
                    loss = res.history[-1]["val_loss"] if res else None
                    sweep[r][str(m)] = {"final_val_loss": loss, "error": err, "seconds": dt}
                    _log(f"  sweep {r:<12} lr x{m:<4g} -> "
                         f"{'-' if loss is None else format(loss, '.4f')} ({dt:.0f} s)")
                ok = {float(k): v["final_val_loss"] for k, v in sweep[r].items()
                      if v["final_val_loss"] is not None and np.isfinite(v["final_val_loss"])}
                chosen_mult[r] = min(ok, key=ok.get) if ok else 1.0
        long, errors = {}, {}
        seeds = list(range(setting.seeds))
        for sd in seeds:
            long[sd] = {}
            ctx.steps = setting.steps[model]
            for s_ahead in (sd, sd + 1):       # this seed's and the next seed's streams
                if s_ahead in seeds:
                    ctx.prefetch_data(s_ahead)
                    if "meco" in recipes:
                        meco_recipe.prefetch(ctx, s_ahead)
            for r in recipes:
                res, err, dt = _run_one(ctx, setting, r, setting.steps[model], chosen_mult[r], sd,
                                        os.path.join(out, model, "long", r, f"seed{sd}"))
                if err:
                    errors[f"{r}@seed{sd}"] = err
                if res is None:
                    continue
                long[sd][r] = res
                if sd == seeds[-1]:   # the last seed: its compiles hit the persistent cache
                    timings[r] = timing(res, dt, setting.steps[model])
                _log(f"  {model} seed {sd} {r:<12} lr x{chosen_mult[r]:g}: final "
                     f"{res.history[-1]['val_loss']:.4f} ({dt:.0f} s)")
        rows_by_seed = {sd: speedrun.summarize(long[sd]) for sd in seeds if "baseline" in long[sd]}
        rows = speedrun.aggregate(rows_by_seed)
        base_row = next(r for r in rows if r["recipe"] == "baseline")
        def final(sd, name):
            return next((x["final_val_loss"] for x in rows_by_seed[sd] if x["recipe"] == name),
                        None)

        for r in rows:   # paired per seed: recipe final loss - that seed's baseline final loss
            diffs = [None if final(sd, r["recipe"]) is None
                     else final(sd, r["recipe"]) - final(sd, "baseline") for sd in rows_by_seed]
            r["final_loss_diff"] = speedrun.t_interval(diffs)
            r["lr_mult"] = chosen_mult[r["recipe"]]
            if r["recipe"] == "baseline":
                r["verdict"], r["claim"] = "-", "the tuned baseline"
            elif mode == "smoke":
                r["verdict"], r["claim"] = "smoke (no verdict)", SPEEDUP.get(r["recipe"], EQUAL.get(
                    r["recipe"], r["recipe"]))
            else:
                r["verdict"], r["claim"] = verdict(r["recipe"], r, base_row, r["final_loss_diff"])
        by_model[model] = {
            "params": n_params, "batch_size": ctx.batch_size, "seq_len": ctx.seq_len,
            "steps": setting.steps[model], "tokens": setting.steps[model] * ctx.tokens_per_step,
            "corpus": ctx.train_corpus.name, "unique_train_tokens": ctx.unique_tokens,
            "sweep": sweep, "lr_mult": dict(chosen_mult), "rows": rows, "errors": errors,
            "recipes": recipes,
            "long": {sd: {r: {"history": res.history, "extra": res.extra}
                          for r, res in long[sd].items()} for sd in long},
        }
        _log(f"-- {model}: tokens to target / baseline's, mean [95% Student-t] over "
             f"{len(rows_by_seed)} seeds; final-loss difference vs baseline; verdict")
        for r in rows:
            tr, df = r["ci95"]["tokens_ratio"], r["final_loss_diff"]
            _log(f"  {r['recipe']:<12} lr x{r['lr_mult']:<4g} "
                 f"ratio {speedrun._fmt_ci(tr, '.3f'):<28}"
                 f" dloss {speedrun._fmt_ci(df, '+.4f'):<30} bytes x{r['bytes_ratio']:.2f}  "
                 f"{r['verdict']}")
    total = time.perf_counter() - t0
    os.makedirs(args.results, exist_ok=True)
    base = os.path.join(args.results, f"study_horizon_{mode}")
    summary = {
        "command": " ".join(["python -m experiments.study_horizon"] + (argv if argv is not None
                                                                       else sys.argv[1:])),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "setting": dataclasses.asdict(setting), "machine": speedrun.machine_info(),
        "interval": "two-sided 95% Student-t over seeds; targets paired per seed",
        "equal_margin": EQUAL_MARGIN, "total_wall_s": total, "estimate_s": est,
        "timing": timings,
        "data_wait_s": None if prepacker is None else prepacker.seconds, "loadavg": loadavg + [list(os.getloadavg())],
        "models": by_model, "out_dir": out,
    }
    with open(base + ".json", "w") as f:
        json.dump(summary, f, indent=1, default=str)
    if prepacker is not None:
        prepacker.close()
    plot_study(by_model, base + ".png")
    _log(f"wrote {base}.json and .png in {total / 60:.1f} min")
    if any(d["errors"] for d in by_model.values()):
        _log(f"FAILED runs: {[d['errors'] for d in by_model.values()]}")
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    main()
