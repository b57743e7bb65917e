"""The main job: train the reference workload with a baseline and with every jaxeff recipe.

    python -m experiments.speedrun                    # all recipes, 100 steps each, ~10 min on 2 cores
    python -m experiments.speedrun --quick            # 1-minute smoke run
    python -m experiments.speedrun --recipes baseline,sophia --steps 400 --model small
    python -m experiments.speedrun --seeds 3          # 3 seeds: mean and 95% t-interval, ~30 min

For each recipe it reports tokens and wall-clock to reach the baseline's final validation loss,
the final validation loss, the bytes of parameters + optimizer state, and steps/s — as a table on
stdout, ``summary.json`` and a PNG of validation loss against tokens, in ``runs/<timestamp>/``.

Seeds (``--seeds N``, from ``--seed``): seed s sets model init, data order and the train state's
key. Each seed's target is that seed's baseline final loss, so ratios are paired per seed. With
N >= 2 every number is reported as the mean over seeds and a two-sided 95% Student-t interval,
``mean +- t_{0.975, N-1} s / sqrt(N)`` (:func:`t_interval`), with t-interval bands in the plot and
every seed's rows and histories in ``summary.json``. The default is N = 1: one seed of all
recipes is the ~10-minute main job on 2 CPU cores; each further seed adds as much again, so
intervals are for studies (``--seeds 3``, ``experiments/study_horizon.py``). ``summary.json``
records the software and hardware that make numbers differ between machines
(:func:`machine_info`).

A recipe is a module in ``experiments/recipes/`` that defines ``RECIPE = Recipe(name,
description, run)``; ``run(ctx)`` returns a :class:`RecipeResult`, usually by calling
``ctx.train(...)`` (one training segment with the standard data, evaluation and logging).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import optax

from jaxeff import data as jdata
from jaxeff.data import _epochs as epochs
from jaxeff import schedules, train
from jaxeff.models import llama
from jaxeff.params import materialize


# ----------------------------------------------------------------------------------------------
# Recipe protocol


@dataclasses.dataclass
class RecipeResult:
    """What a recipe reports: eval history rows ``{'step','tokens','val_loss','wall_s'}``, the
    training wall-clock (compilation included, evaluation excluded), steps/s, the bytes of the
    trained parameters and optimizer state, and free-form extra numbers."""

    history: list
    wall_s: float
    steps_per_s: float
    param_bytes: int
    opt_state_bytes: int
    extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    run: Callable[["SpeedrunContext"], RecipeResult]


def tree_bytes(tree) -> int:
    """Bytes of all array leaves of a pytree (structured leaves count their stored factors)."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                   for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


# ----------------------------------------------------------------------------------------------
# Context shared by all recipes


@dataclasses.dataclass
class SpeedrunContext:
    """The workload: model config, data, schedule, evaluation, and a ``train`` helper."""

    cfg: llama.LlamaConfig
    steps: int
    batch_size: int
    seq_len: int
    peak_lr: float
    eval_every: int
    eval_batches_n: int
    out_dir: str
    seed: int = 0
    quick: bool = False
    mesh: Any = None
    progress: bool = True
    prepacker: Any = None     # an experiments.prepacked.Prepacker: batches pre-packed in parallel

    def __post_init__(self):
        self.tokenizer = jdata.ByteTokenizer()
        jdata.validate_tokenizer(self.tokenizer, self.cfg.vocab_size)
        self.train_corpus = jdata.load_stdlib_corpus("train")
        self.val_corpus = jdata.load_stdlib_corpus("validation")
        self.unique_tokens = epochs.unique_target_tokens(self.train_corpus, self.tokenizer)
        self._eval = None

    # -- data ------------------------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def train_data(self, corpus=None, seed: Optional[int] = None, max_epochs: float = 1.0,
                   prepacked: bool = True, **kw):
        """An iterator of training batches (Grain; checkpointable) that counts the epochs it
        has served (``it.counter.epochs``) and warns (``RepeatedDataWarning``) once it repeats
        ``corpus`` (default: the training split) more than ``max_epochs`` times.

        With a ``prepacker`` (GPU studies) and ``prepacked`` (default True) the run's
        ``self.steps`` batches are pre-packed in parallel worker processes
        (:mod:`experiments.prepacked`; the same batches for every recipe with this corpus and
        seed) and the iterator is not checkpointable; ``prepacked=False`` keeps the live
        pipeline (e.g. to measure its throughput)."""
        corpus = self.train_corpus if corpus is None else corpus
        seed = self.seed if seed is None else seed
        if self.prepacker is not None and prepacked:
            it = self.prepacker.batches(*self._stream(corpus, seed, kw), self.steps)
        else:
            it = iter(jdata.make_lm_dataset(corpus, self.tokenizer, self.seq_len,
                                            self.batch_size, seed=seed, **kw))
        unique = (self.unique_tokens if corpus is self.train_corpus
                  else epochs.unique_target_tokens(corpus, self.tokenizer))
        what = f"speedrun data ({getattr(corpus, 'name', 'custom corpus')})"
        return epochs.CountingIterator(it, epochs.EpochCounter(unique),
                                       max_epochs=max_epochs, what=what)

    def _stream(self, corpus, seed: int, kw: dict):
        """``(key, factory)`` of a pre-packed training stream (:mod:`experiments.prepacked`)."""
        key = ("lm", getattr(corpus, "name", None), len(corpus), seed, self.seq_len,
               self.batch_size, tuple(sorted(kw.items())))
        return key, functools.partial(_lm_stream, corpus, self.tokenizer, self.seq_len,
                                      self.batch_size, seed, kw)

    def prefetch_data(self, seed: int, steps: Optional[int] = None):
        """Start pre-packing the default training stream of ``seed`` (``steps`` batches,
        default ``self.steps``) in the background; a no-op without a ``prepacker``."""
        if self.prepacker is not None:
            self.prepacker.prefetch(*self._stream(self.train_corpus, seed, {}),
                                    steps or self.steps)

    def eval_batches(self):
        """The fixed validation batches (every 4th validation document, in order)."""
        if self._eval is None:
            docs = jdata.Corpus(list(self.val_corpus)[::4], "stdlib:validation/4")
            self._eval = jdata.make_eval_batches(docs, self.tokenizer, self.seq_len,
                                                 self.batch_size, max_batches=self.eval_batches_n)
        return self._eval

    # -- model and optimiser ---------------------------------------------------------------
    def init_params(self, cfg: Optional[llama.LlamaConfig] = None, seed: Optional[int] = None):
        return llama.init_params(jax.random.key(self.seed if seed is None else seed),
                                 cfg or self.cfg)

    def loss_fn(self, cfg: Optional[llama.LlamaConfig] = None, structured: bool = False):
        """``(params, batch) -> (loss, aux)``; with ``structured`` the params are materialized
        first (for structured-weight recipes)."""
        cfg = cfg or self.cfg
        if structured:
            return lambda p, b: llama.loss_fn(materialize(p), b, cfg)
        return lambda p, b: llama.loss_fn(p, b, cfg)

    def schedule(self, peak_lr: Optional[float] = None, steps: Optional[int] = None,
                 warmup: Optional[int] = None):
        """The baseline's warmup-stable-decay schedule (10% warmup, 20% 1-sqrt cooldown)."""
        steps = steps or self.steps
        return schedules.wsd(peak_lr or self.peak_lr, total_steps=steps,
                             warmup=max(1, steps // 10) if warmup is None else warmup,
                             decay_fraction=0.2, shape="1-sqrt")

    def adamw(self, peak_lr: Optional[float] = None, weight_decay: float = 0.1,
              steps: Optional[int] = None):
        """The baseline optimiser: clip 1.0, AdamW(0.9, 0.95) on the WSD schedule."""
        return optax.chain(optax.clip_by_global_norm(1.0),
                           optax.adamw(self.schedule(peak_lr, steps), b1=0.9, b2=0.95,
                                       weight_decay=weight_decay))

    # -- training --------------------------------------------------------------------------
    def make_step(self, loss_fn, tx, **kw):
        """``train.make_train_step`` on this run's mesh (for recipes that build their own step,
        e.g. Sophia's separately compiled refresh step)."""
        return train.make_train_step(loss_fn, tx, mesh=self.mesh, **kw)

    def train(self, name: str, params, tx, *, steps: Optional[int] = None, loss_fn=None,
              extra_args=None, metrics_fn=None, data=None, eval_params=None,
              tokens_offset: int = 0, state=None, structured: bool = False,
              step_fn=None, cfg: Optional[llama.LlamaConfig] = None) -> dict:
        """One training segment; returns ``train.fit``'s result plus ``param_bytes``,
        ``opt_state_bytes`` and ``epochs`` (of the data iterator so far).

        ``structured`` materializes params for the loss and evaluation; ``step_fn`` replaces the
        standard step (``loss_fn``/``extra_args``/``metrics_fn`` are then ignored); ``cfg`` is the
        model config of this segment (width- or depth-changing recipes), default the run's."""
        steps = self.steps if steps is None else steps
        loss_fn = loss_fn or self.loss_fn(cfg, structured=structured)
        if eval_params is None:
            eval_params = materialize if structured else (lambda p: p)
        dense_loss = self.loss_fn(cfg)
        state = state or train.init_train_state(params, tx, seed=self.seed)
        if step_fn is None:
            step_fn = self.make_step(loss_fn, tx, extra_args=extra_args, metrics_fn=metrics_fn)
        data = data or self.train_data()
        res = train.fit(state, step_fn, data, steps=steps,
                        eval_fn=train.make_eval_fn(dense_loss), eval_batches=self.eval_batches,
                        eval_every=self.eval_every, eval_params=eval_params,
                        tokens_per_step=self.tokens_per_step, tokens_offset=tokens_offset,
                        metrics_path=os.path.join(self.out_dir, f"{name}.jsonl"),
                        progress=self.progress, desc=name)
        res["param_bytes"] = tree_bytes(res["state"].params)
        res["opt_state_bytes"] = tree_bytes(res["state"].opt_state)
        counter = getattr(data, "counter", None)
        res["epochs"] = counter.epochs if counter is not None else None
        return res

    def result(self, res: dict, **extra) -> RecipeResult:
        """Turn one ``train`` segment into a :class:`RecipeResult`."""
        if res.get("epochs") is not None:
            extra = {"epochs": round(res["epochs"], 4), **extra}
        return RecipeResult(history=res["history"], wall_s=res["wall_s"],
                            steps_per_s=res["steps_per_s"], param_bytes=res["param_bytes"],
                            opt_state_bytes=res["opt_state_bytes"], extra=extra)


def _lm_stream(corpus, tokenizer, seq_len, batch_size, seed, kw, shard, n_local):
    """A pre-packing worker's stream (:mod:`experiments.prepacked`): shard ``shard`` of the
    training pipeline (``n_local`` is not needed: the stream does not depend on its length)."""
    del n_local
    return jdata.make_lm_dataset(corpus, tokenizer, seq_len, batch_size, seed=seed, shard=shard,
                                 **kw)


# ----------------------------------------------------------------------------------------------
# Reporting


def reach(history: list, target: float) -> tuple[Optional[float], Optional[float]]:
    """Tokens and wall-clock at which the validation loss first reaches ``target``, linearly
    interpolated between evaluations (None if never reached)."""
    prev = None
    for row in history:
        if row["val_loss"] <= target:
            if prev is None or prev["val_loss"] == row["val_loss"]:
                return float(row["tokens"]), float(row.get("wall_s", float("nan")))
            f = (prev["val_loss"] - target) / (prev["val_loss"] - row["val_loss"])
            tok = prev["tokens"] + f * (row["tokens"] - prev["tokens"])
            wall = prev.get("wall_s", 0.0) + f * (row.get("wall_s", 0.0) - prev.get("wall_s", 0.0))
            return float(tok), float(wall)
        prev = row
    return None, None


def summarize(results: dict[str, RecipeResult], baseline: str = "baseline") -> list[dict]:
    base = results.get(baseline)
    target = base.history[-1]["val_loss"] if base else None
    b_tok, b_wall = reach(base.history, target) if base else (None, None)
    base_bytes = (base.param_bytes + base.opt_state_bytes) if base else None
    rows = []
    for name, r in results.items():
        tok, wall = reach(r.history, target) if target is not None else (None, None)
        nbytes = r.param_bytes + r.opt_state_bytes
        rows.append({
            "recipe": name,
            "final_val_loss": r.history[-1]["val_loss"] if r.history else float("nan"),
            "tokens": r.history[-1]["tokens"] if r.history else 0,
            "tokens_to_target": tok,
            "tokens_ratio": (tok / b_tok) if tok and b_tok else None,
            "wall_to_target_s": wall,
            "wall_ratio": (wall / b_wall) if wall and b_wall else None,
            "param_bytes": r.param_bytes, "opt_state_bytes": r.opt_state_bytes,
            "bytes_ratio": nbytes / base_bytes if base_bytes else None,
            "steps_per_s": r.steps_per_s, "wall_s": r.wall_s, "extra": r.extra,
        })
    return rows


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict], target: Optional[float]) -> str:
    head = (f"{'recipe':<14} {'final val':>9} {'tokens->target':>15} {'x base':>7} "
            f"{'wall->target':>12} {'x base':>7} {'param+opt MB':>12} {'x base':>7} {'steps/s':>8}")
    lines = [f"target = baseline final validation loss = {_fmt(target, '.4f')}", head,
             "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['recipe']:<14} {r['final_val_loss']:>9.4f} {_fmt(r['tokens_to_target'], ',.0f'):>15} "
            f"{_fmt(r['tokens_ratio'], '.2f'):>7} {_fmt(r['wall_to_target_s'], '.1f'):>12} "
            f"{_fmt(r['wall_ratio'], '.2f'):>7} "
            f"{(r['param_bytes'] + r['opt_state_bytes']) / 2**20:>12.2f} "
            f"{_fmt(r['bytes_ratio'], '.2f'):>7} {r['steps_per_s']:>8.2f}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def t_interval(values, confidence: float = 0.95) -> dict:
    """Mean and two-sided Student-t interval of independent samples (seeds).

    ``mean +- t_{(1+c)/2, n-1} * s / sqrt(n)``, ``s`` the sample standard deviation (ddof 1).
    ``None`` entries (e.g. a target not reached) are counted in ``missing`` and make the interval
    undefined (``lo = hi = None``; the mean is over the others), as is n < 2.

    Returns ``{'mean', 'lo', 'hi', 'std', 'n', 'missing', 'method'}``.
    """
    vals = [float(v) for v in values if v is not None]
    missing = len(list(values)) - len(vals)
    out = {"mean": float(np.mean(vals)) if vals else None, "lo": None, "hi": None,
           "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None, "n": len(vals),
           "missing": missing, "method": f"student-t {confidence:.0%} two-sided"}
    if len(vals) >= 2 and missing == 0:
        from scipy import stats
        t = float(stats.t.ppf((1 + confidence) / 2, len(vals) - 1))
        half = t * out["std"] / np.sqrt(len(vals))
        out["lo"], out["hi"] = out["mean"] - half, out["mean"] + half
    return out


SEED_METRICS = ("final_val_loss", "tokens_to_target", "tokens_ratio", "wall_to_target_s",
                "wall_ratio", "steps_per_s", "wall_s")


def aggregate(rows_by_seed: dict) -> list[dict]:
    """One row per recipe over seeds: the first seed's row with each of ``SEED_METRICS`` replaced
    by its mean, plus ``ci95`` (:func:`t_interval` of each metric) and ``per_seed`` values. A
    recipe missing in some seed (it failed there) is aggregated over the seeds it has."""
    seeds = list(rows_by_seed)
    names = []
    for sd in seeds:
        names += [r["recipe"] for r in rows_by_seed[sd] if r["recipe"] not in names]
    out = []
    for name in names:
        rows = {sd: r for sd in seeds for r in rows_by_seed[sd] if r["recipe"] == name}
        row = dict(next(iter(rows.values())))
        row["seeds"] = list(rows)
        row["per_seed"] = {m: [rows[sd][m] for sd in rows] for m in SEED_METRICS}
        row["ci95"] = {m: t_interval(row["per_seed"][m]) for m in SEED_METRICS}
        for m in SEED_METRICS:
            row[m] = row["ci95"][m]["mean"]
        out.append(row)
    return out


def _fmt_ci(ci, spec):
    if ci is None:
        return "-"
    if ci.get("mean") is None:
        return f"not reached ({ci['missing']} of {ci['missing']})" if ci.get("missing") else "-"
    text = format(ci["mean"], spec)
    if ci.get("lo") is not None:
        text += f" [{format(ci['lo'], spec)}, {format(ci['hi'], spec)}]"
    elif ci.get("missing"):
        text += f" ({ci['missing']} of {ci['n'] + ci['missing']} missing)"
    return text


def print_interval_table(rows: list[dict]) -> str:
    """The per-recipe means with their 95% t-intervals (rows from :func:`aggregate`)."""
    n = max(len(r["seeds"]) for r in rows)
    lines = [f"mean [95% Student-t interval] over {n} seeds "
             "(target: each seed's baseline final loss)",
             f"{'recipe':<14} {'final val':>26} {'tokens x base':>22} {'wall x base':>22}"]
    lines.append("-" * len(lines[-1]))
    for r in rows:
        ci = r["ci95"]
        lines.append(f"{r['recipe']:<14} {_fmt_ci(ci['final_val_loss'], '.4f'):>26} "
                     f"{_fmt_ci(ci['tokens_ratio'], '.2f'):>22} "
                     f"{_fmt_ci(ci['wall_ratio'], '.2f'):>22}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def plot(results: dict[str, RecipeResult], path: str, target: Optional[float],
         results_by_seed: Optional[dict] = None, title: str = "jaxeff speedrun"):
    """Validation loss against tokens; with ``results_by_seed`` (``{seed: {recipe: result}}``,
    >= 2 seeds) the mean curve with a 95% t-interval band per evaluation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    multi = results_by_seed is not None and len(results_by_seed) >= 2
    for name, r in results.items():
        lw = 2.5 if name == "baseline" else 1.3
        if not multi:
            ax.plot([h["tokens"] for h in r.history], [h["val_loss"] for h in r.history],
                    marker="o", ms=3, label=name, lw=lw)
            continue
        hists = [res[name].history for res in results_by_seed.values() if name in res]
        n = min(len(h) for h in hists)
        tok = [hists[0][i]["tokens"] for i in range(n)]
        cis = [t_interval([h[i]["val_loss"] for h in hists]) for i in range(n)]
        (line,) = ax.plot(tok, [c["mean"] for c in cis], marker="o", ms=3, lw=lw,
                          label=f"{name} (n={len(hists)})")
        if all(c["lo"] is not None for c in cis):
            ax.fill_between(tok, [c["lo"] for c in cis], [c["hi"] for c in cis],
                            color=line.get_color(), alpha=0.2, lw=0)
    if target is not None:
        ax.axhline(target, color="k", ls=":", lw=0.8, label="baseline final" +
                   (" (mean)" if multi else ""))
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(title + (" (95% t-interval bands)" if multi else ""))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cpuinfo() -> dict:
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                wanted = ("model name", "flags", "cpu MHz", "cache size", "vendor_id")
                if k in wanted and k not in info:
                    info[k] = v.strip()
    except OSError as e:
        info["error"] = f"{type(e).__name__}: {e}"
    return info


def machine_info() -> dict:
    """What can make the same command give different numbers on two machines: jax/jaxlib/numpy
    versions, BLAS, XLA flags and thread settings, CPU model and flags (``/proc/cpuinfo``)."""
    import jaxlib
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"].get("blas")
    except Exception as e:  # numpy < 1.25 or a build without the dict
        blas = f"unknown ({type(e).__name__})"
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("XLA_", "JAX_", "TF_CPP")) or k in (
               "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    cpu = _cpuinfo()
    return {"platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "jax_backend": jax.default_backend(), "devices": len(jax.devices()),
            "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "numpy": np.__version__, "optax": optax.__version__,
            "blas": blas, "env": env, "cpu_model": cpu.get("model name"),
            "cpu_vendor": cpu.get("vendor_id"), "cpu_cache": cpu.get("cache size"),
            "cpu_flags": cpu.get("flags"), "cpuinfo_error": cpu.get("error")}


def _log(msg):
    print(msg, flush=True)


def run_seeds(ctx: SpeedrunContext, names: list, seeds: list, log=_log) -> tuple[dict, dict]:
    """Run recipes ``names`` for each seed (``ctx.seed`` and ``ctx.out_dir`` set per seed: with
    several seeds each writes to ``<out>/seed<s>/``). Returns ``({seed: {recipe: result}},
    {seed: {recipe: error text}})``; a failing recipe is reported, the others still run."""
    from experiments.recipes import load
    base_out = ctx.out_dir
    results, errors = {}, {}
    for sd in seeds:
        ctx.seed = sd
        ctx.out_dir = base_out if len(seeds) == 1 else os.path.join(base_out, f"seed{sd}")
        os.makedirs(ctx.out_dir, exist_ok=True)
        results[sd], errors[sd] = {}, {}
        for n in names:
            t = time.perf_counter()
            try:
                results[sd][n] = load(n).run(ctx)
            except Exception as e:  # a broken recipe is reported, and the job fails at the end
                import traceback
                traceback.print_exc()
                errors[sd][n] = f"{type(e).__name__}: {e}"
            log(f"  {n} (seed {sd}): done in {time.perf_counter() - t:.1f}s")
    ctx.out_dir = base_out
    return results, errors


# ----------------------------------------------------------------------------------------------
# Main


def build_context(args) -> SpeedrunContext:
    if args.model not in llama.PRESETS:
        raise SystemExit(f"--model must be one of {sorted(llama.PRESETS)}; got {args.model!r}")
    cfg = llama.PRESETS[args.model]
    if args.quick:
        steps, bs, seq, ev_every, ev_n = args.steps or 12, 4, 64, 6, 2
    else:
        steps, bs, seq, ev_every, ev_n = args.steps or 100, 16, 128, 10, 8
    steps = max(int(steps), 1)
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, seq))
    mesh = None
    if args.mesh:
        from jaxeff.sharding import make_mesh
        mesh = make_mesh(args.mesh)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or os.path.join("runs", stamp)
    os.makedirs(out, exist_ok=True)
    return SpeedrunContext(cfg=cfg, steps=steps, batch_size=args.batch_size or bs,
                           seq_len=args.seq_len or seq, peak_lr=args.lr,
                           eval_every=max(1, min(ev_every, steps)), eval_batches_n=ev_n,
                           out_dir=out, seed=args.seed, quick=args.quick, mesh=mesh,
                           progress=not args.no_progress)


def parse_args(argv=None):
    from experiments.recipes import available
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="all",
                   help=f"comma-separated recipes or 'all' (available: {', '.join(available())})")
    p.add_argument("--steps", type=int, default=None, help="training steps per recipe")
    p.add_argument("--model", default="tiny", help="model preset (default tiny)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--lr", type=float, default=3e-3, help="baseline peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="first seed (model init and data order)")
    p.add_argument("--seeds", type=int, default=1,
                   help="number of seeds (seed, seed+1, ...); >= 2 reports means and 95%% "
                        "t-intervals (default 1: the ~10-minute main job)")
    p.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=4 (needs that many devices)")
    p.add_argument("--quick", action="store_true", help="1-minute smoke run")
    p.add_argument("--out", default=None, help="output directory (default runs/<timestamp>)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from experiments.recipes import available, load
    args = parse_args(argv)
    names = available() if args.recipes == "all" else [r.strip() for r in args.recipes.split(",")]
    unknown = [n for n in names if n not in available()]
    if unknown:
        raise SystemExit(f"--recipes: unknown {unknown}; available: {available()}")
    if "baseline" in names:  # the baseline runs first: it sets the target
        names = ["baseline"] + [n for n in names if n != "baseline"]
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1; got {args.seeds}")
    ctx = build_context(args)
    print(f"jaxeff speedrun: model={args.model} ({llama.param_count(ctx.init_params()):,} params) "
          f"steps={ctx.steps} batch={ctx.batch_size}x{ctx.seq_len} recipes={names} -> {ctx.out_dir}",
          flush=True)
    planned = epochs.check_repetition(ctx.steps * ctx.tokens_per_step, ctx.unique_tokens,
                                      what=f"each recipe ({ctx.steps} steps)")
    print(f"  each recipe trains on at most {planned.tokens:,} target tokens = "
          f"{planned.epochs:.3f} epochs of the {ctx.unique_tokens:,}-token training split", flush=True)
    seeds = list(range(args.seed, args.seed + args.seeds))
    t0 = time.perf_counter()
    by_seed, errors_by_seed = run_seeds(ctx, names, seeds)
    rows_by_seed, tables = {}, []
    for sd in seeds:
        res = by_seed[sd]
        tgt = res["baseline"].history[-1]["val_loss"] if "baseline" in res else None
        rows_by_seed[sd] = summarize(res)
        if len(seeds) > 1:
            print(f"seed {sd}:", flush=True)
        tables.append(print_table(rows_by_seed[sd], tgt))
    results = by_seed[seeds[0]]
    errors = {(n if len(seeds) == 1 else f"{n}@seed{sd}"): e
              for sd in seeds for n, e in errors_by_seed[sd].items()}
    if len(seeds) == 1:
        rows = rows_by_seed[seeds[0]]
        target = results["baseline"].history[-1]["val_loss"] if "baseline" in results else None
        table = tables[0]
        print("one seed: no interval (--seeds N >= 2 reports means with 95% t-intervals)",
              flush=True)
    else:
        rows = aggregate(rows_by_seed)
        finals = [by_seed[sd]["baseline"].history[-1]["val_loss"] for sd in seeds
                  if "baseline" in by_seed[sd]]
        target = float(np.mean(finals)) if finals else None
        table = "\n\n".join(tables + [print_interval_table(rows)])
    plot(results, os.path.join(ctx.out_dir, "val_loss.png"), target,
         results_by_seed=by_seed if len(seeds) > 1 else None)
    summary = {
        "command": " ".join(["python -m experiments.speedrun"] + (argv or sys.argv[1:])),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "model": dataclasses.asdict(ctx.cfg), "steps": ctx.steps, "batch_size": ctx.batch_size,
        "seq_len": ctx.seq_len, "tokens_per_step": ctx.tokens_per_step,
        "corpus": {"name": ctx.train_corpus.name,
                   "fingerprint": jdata.corpus_fingerprint(jdata.load_stdlib_corpus("all"))},
        "unique_train_tokens": ctx.unique_tokens, "planned_epochs": planned.epochs,
        "seeds": seeds, "interval": "two-sided 95% Student-t over seeds (n-1 dof); "
                                    "each seed's target is its own baseline's final loss",
        "target_val_loss": target, "rows": rows, "errors": errors,
        "histories": {k: v.history for k, v in results.items()},
        "per_seed": {str(sd): {"target_val_loss": (by_seed[sd]["baseline"].history[-1]["val_loss"]
                                                   if "baseline" in by_seed[sd] else None),
                               "rows": rows_by_seed[sd], "errors": errors_by_seed[sd],
                               "histories": {k: v.history for k, v in by_seed[sd].items()}}
                     for sd in seeds},
        "total_wall_s": time.perf_counter() - t0, "table": table,
    }
    with open(os.path.join(ctx.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print(f"wrote {ctx.out_dir}/summary.json and val_loss.png", flush=True)
    if errors:
        print(f"FAILED recipes: {errors}", file=sys.stderr)
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    main()
