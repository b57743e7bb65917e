"""GaLore: Adam on rank-1/4 gradient projections of the attention/MLP matrices, refreshed by SVD.

"GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection" (Zhao et al., 2024).
``jaxeff.optim.galore`` on ``layers/(wq|wk|wv|wo|w_gate|w_up|w_down)`` with rank 1/4 of each
matrix's smaller dimension, the paper's 'std' projection and scale 0.25; embeddings, head and norms
get plain Adam, as in the paper. The paper's refresh gap (200 of 10k+ steps) is scaled to this
run: 4 refreshes (gap = steps // 4). Learning rate: the paper pairs scale 0.25 with a 10x larger
lr than its AdamW baseline; here the baseline's schedule is multiplied by 1/scale = 4, so the
projected matrices take Adam steps of the baseline's size (weight decay 0.1 * scale keeps the
decay per step equal to the baseline's). Adam (0.9, 0.95) and clip 1.0 as the baseline. Extra
numbers: rank fraction, gap, scale and the optimizer-state bytes as a ratio to AdamW's.
"""

import jax
import optax

from experiments.speedrun import Recipe
from jaxeff.optim import galore

SELECT = "layers/(wq|wk|wv|wo|w_gate|w_up|w_down)$"
RANK, SCALE = 0.25, 0.25


def make_tx(ctx, inner=None):
    gap = max(1, ctx.steps // 4)
    inner = inner if inner is not None else optax.scale_by_adam(b1=0.9, b2=0.95)
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        galore(ctx.schedule(ctx.peak_lr / SCALE), inner, rank=RANK, update_proj_gap=gap,
               scale=SCALE, select=SELECT, weight_decay=0.1 * SCALE)), gap


def state_ratio(ctx, tx, params) -> float:
    """Optimizer-state bytes of ``tx`` over the baseline AdamW's (abstract, no allocation)."""
    nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
        jax.eval_shape(t.init, params)))
    return nbytes(tx) / nbytes(ctx.adamw())


def run(ctx, name="galore", inner=None):
    tx, gap = make_tx(ctx, inner)
    params = ctx.init_params()
    ratio = state_ratio(ctx, tx, params)
    return ctx.result(ctx.train(name, params, tx), rank_fraction=RANK, update_proj_gap=gap,
                      scale=SCALE, opt_state_ratio_to_adamw=ratio)


RECIPE = Recipe(name="galore", description=__doc__.strip().splitlines()[0], run=run)
