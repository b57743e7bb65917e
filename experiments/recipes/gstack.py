"""G_stack: train a model 4x shallower, stack it 4x in depth (fresh AdamW, warmup restart), continue.

Paper: "Stacking Your Transformers: A Closer Look at Model Growth for Efficient LLM Pre-Training"
(Du et al., 2024). Same total tokens as the baseline: ``ctx.steps`` steps split between the small
model (``L/g`` layers) and the grown one (``L`` layers), on one data iterator that continues across
the growth (the reference's data skip). The eval history continues in tokens and wall-clock.

Growth timing, scaled to this workload. The paper's rule ``log10 d = 0.88 log10 N + 163.27/log10 C
- 5.74`` is fitted at LLM scale (C ~ 1e20-1e24 FLOPs); at our C (~1e12) it returns d > D (``never
grow``), so it cannot be applied literally. We keep the *fraction of the token budget* at which
the rule says to grow in the paper's headline setting with our growth factor g = 4: a 3B target
trained on 300B tokens (the paper's Figure 4 run), where ``growth_tokens(3e9, 300e9) = 12.96B``
tokens, i.e. 4.3% of the budget. ``run(ctx, fraction=...)`` overrides it (for sensitivity runs).

Schedules: the small model uses the baseline's peak lr with a 10% warmup and no cooldown (the
reference grows from a mid-run checkpoint); the grown model gets a fresh AdamW on the baseline's
WSD schedule over the remaining steps (warmup restarted, 1-sqrt cooldown at the end).
"""

import functools
import time

import optax

from experiments.speedrun import Recipe, RecipeResult
from jaxeff import schedules
from jaxeff.params import grow_train_state, growth_tokens, stack_depth

REFERENCE_TARGET_PARAMS = 3e9      # the paper's 3B run (Figure 4)
REFERENCE_TOKENS = 300e9
GROWTH_FACTOR = 4


def rule_fraction() -> float:
    """Fraction of the token budget spent on the small model, from the paper's timing rule at the
    reference setting (see the module docstring)."""
    return growth_tokens(REFERENCE_TARGET_PARAMS, REFERENCE_TOKENS) / REFERENCE_TOKENS


def _factor(n_layers: int) -> int:
    for g in (GROWTH_FACTOR, 2):
        if n_layers % g == 0 and n_layers >= g:
            return g
    return 1


def run(ctx, fraction=None) -> RecipeResult:
    L = ctx.cfg.n_layers
    g = _factor(L)
    frac = rule_fraction() if fraction is None else float(fraction)
    steps1 = min(max(1, round(frac * ctx.steps)), ctx.steps - 1) if ctx.steps > 1 else 0
    steps2 = ctx.steps - steps1
    small_cfg = ctx.cfg.replace(n_layers=L // g)
    data = ctx.train_data()      # one iterator: the grown model continues where the small stopped

    # phase 1: the small model (L/g layers)
    sched1 = schedules.wsd(ctx.peak_lr, total_steps=max(steps1, 1),
                           warmup=max(1, steps1 // 10) if steps1 > 1 else 0, decay_fraction=0.0)
    tx1 = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(sched1, b1=0.9, b2=0.95, weight_decay=0.1))
    r1 = ctx.train("gstack-small", ctx.init_params(small_cfg), tx1, steps=steps1,
                   loss_fn=ctx.loss_fn(small_cfg), data=data)

    # growth: stack g times; fresh AdamW with the restarted WSD schedule over the rest
    t = time.perf_counter()
    tx2 = ctx.adamw(steps=steps2)
    state = grow_train_state(r1["state"], functools.partial(stack_depth, factor=g), tx=tx2)
    grow_s = time.perf_counter() - t

    r2 = ctx.train("gstack-grown", state.params, tx2, steps=steps2, data=data, state=state,
                   tokens_offset=steps1 * ctx.tokens_per_step)
    offset = r1["wall_s"] + grow_s
    history = [dict(h) for h in r1["history"]]
    history += [dict(h, step=h["step"] + steps1, wall_s=h["wall_s"] + offset)
                for h in r2["history"]]
    wall = offset + r2["wall_s"]
    return RecipeResult(
        history=history, wall_s=wall, steps_per_s=ctx.steps / wall if wall > 0 else float("nan"),
        param_bytes=r2["param_bytes"], opt_state_bytes=r2["opt_state_bytes"],
        extra={"growth_factor": g, "small_layers": L // g, "small_steps": steps1,
               "grown_steps": steps2, "growth_fraction": frac,
               "growth_tokens": steps1 * ctx.tokens_per_step,
               "rule_tokens_at_this_scale": growth_tokens(
                   _param_count(ctx), ctx.steps * ctx.tokens_per_step),
               "small_wall_s": r1["wall_s"], "grow_s": grow_s})


def _param_count(ctx) -> int:
    from jaxeff.models import llama
    return llama.param_count(llama.abstract_params(ctx.cfg))


RECIPE = Recipe(name="gstack", description=__doc__.strip().splitlines()[0], run=run)
