"""Low-rank only: the SLTrain recipe's rank on the same projections, W = L R, no sparse part.

The ablation of "SLTrain: a sparse plus low-rank approach for parameter and memory efficient
pretraining" (Han et al., 2024): ``jaxeff.params.lowrank(rank).init`` (balanced Gaussian factors
whose product has the dense init's std) on ``layers/(wq|wk|wv|wo|w_gate|w_up|w_down)``, rank
``d_model // 4`` as in the sltrain recipe; AdamW with the baseline's schedule, weight decay 0.
"""

import jax

from experiments.recipes.sltrain import SELECT, train_structured, workload_rank
from experiments.speedrun import Recipe, RecipeResult
from jaxeff.params import lowrank


def run(ctx) -> RecipeResult:
    rank = workload_rank(ctx.cfg)
    factors = lowrank(rank, select=SELECT).init(jax.random.key(ctx.seed + 1), ctx.init_params())
    res = train_structured(ctx, "lowrank-only", factors)
    res.extra.update(rank=rank)
    return res


RECIPE = Recipe(name="lowrank-only", description=__doc__.strip().splitlines()[0], run=run)
