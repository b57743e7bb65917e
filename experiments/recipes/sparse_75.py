"""Sparse-75: gradual global magnitude pruning to 75% with the Journey-Matters geometric schedule.

Paper: "The Journey Matters: Average Parameter Count over Pre-training Unifies Sparse and Dense
Scaling Laws" (Jin et al., 2025): prune the projections ``layers/(wq|wk|wv|wo|w_gate|w_up|
w_down)`` from 25% to 75% of cumulative sparse compute (``journey_schedule(0.75)``, the paper's
window), a pruning round every ``steps // 50`` steps, one global magnitude threshold; the masks
live in the optimizer state (``jaxeff.optim.prune`` around the baseline's AdamW). Reports the
average non-zero count ``N_bar`` over training, and bytes as ratios to dense AdamW (weights are
stored dense plus a bool mask: the savings are in non-zeros, which need a sparse kernel to turn
into speed or memory).
"""

import jax

from experiments.recipes.sltrain import SELECT
from experiments.speedrun import Recipe, RecipeResult, tree_bytes
from jaxeff.optim import journey_schedule, prune, sparsity_stats

SPARSITY = 0.75


def run(ctx) -> RecipeResult:
    every = max(1, ctx.steps // 50)
    sched = journey_schedule(SPARSITY, total_steps=ctx.steps, every=every)
    tx = prune(ctx.adamw(), sched, select=SELECT)
    params = ctx.init_params()
    res = ctx.train("sparse-75", params, tx)
    stats = sparsity_stats(res["state"].opt_state, res["state"].params)
    dense_opt = tree_bytes(jax.eval_shape(ctx.adamw().init, params))
    return ctx.result(res, final_density=float(stats["density"]),
                      mean_density=float(stats["mean_density"]),
                      mean_nonzero_params=float(stats["mean_nonzero"]),
                      mean_nonzero_ratio=float(stats["mean_nonzero"]) / stats["total"],
                      stored_param_ratio=res["param_bytes"] / tree_bytes(params),
                      opt_state_ratio=res["opt_state_bytes"] / dense_opt, every=every)


RECIPE = Recipe(name="sparse-75", description=__doc__.strip().splitlines()[0], run=run)
