"""SLTrain: pre-train with sparse-plus-low-rank projections W = (alpha/r) A B + S (delta 3%).

Paper: "SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining"
(Han et al., 2024). The attention and MLP projections ``layers/(wq|wk|wv|wo|w_gate|w_up|w_down)``
become ``jaxeff.params.sltrain`` leaves initialised as in the paper (B = 0, so W = S at init);
embeddings, head and norms stay dense. Rank and alpha scaled to the workload: the paper uses
rank ~ d_model/4 (256 at d=1024, 512 at d=2048) and alpha/r = 1/4 at its smallest size (60M:
r=128, alpha=32), so here ``rank = d_model // 4`` and ``alpha = rank / 4``; delta = 0.03. AdamW
with the baseline's schedule, weight decay 0 (paper). The int32 support indices stay out of the
optimizer (``partition``/``combine``). Reported extras: stored-parameter and optimizer-state bytes
as ratios to dense AdamW on the same model.
"""

import jax

from experiments.speedrun import Recipe, RecipeResult, tree_bytes
from jaxeff.models import llama
from jaxeff.params import param_report
from jaxeff.params import sltrain
from jaxeff.params import combine, materialize, partition

SELECT = "layers/(wq|wk|wv|wo|w_gate|w_up|w_down)$"
DENSITY = 0.03


def workload_rank(cfg) -> int:
    """``d_model // 4``, the paper's rank-to-width ratio at 350M/1B."""
    return max(1, cfg.d_model // 4)


def train_structured(ctx, name: str, factors, weight_decay: float = 0.0) -> RecipeResult:
    """Train a tree with structured leaves: trainable part in the train state, frozen part
    (integer indices, frozen bases) closed over; report bytes as ratios to dense AdamW."""
    trainable, frozen = partition(factors)
    cfg = ctx.cfg

    def dense(t):
        return materialize(combine(t, frozen))

    def loss_fn(t, batch):
        return llama.loss_fn(dense(t), batch, cfg)

    tx = ctx.adamw(weight_decay=weight_decay)
    res = ctx.train(name, trainable, tx, loss_fn=loss_fn, eval_params=dense)
    dense_params = ctx.init_params()
    dense_param_bytes = tree_bytes(dense_params)
    dense_opt_bytes = tree_bytes(jax.eval_shape(ctx.adamw().init, dense_params))
    param_bytes = res["param_bytes"] + tree_bytes(frozen)
    rep = param_report(factors)
    out = ctx.result(res, stored_param_ratio=param_bytes / dense_param_bytes,
                     opt_state_ratio=res["opt_state_bytes"] / dense_opt_bytes,
                     trainable_params=rep.trainable_params, dense_params=rep.dense_params,
                     stored_params=rep.stored_params)
    out.param_bytes = param_bytes
    return out


def run(ctx) -> RecipeResult:
    rank = workload_rank(ctx.cfg)
    method = sltrain(rank, DENSITY, alpha=rank / 4, select=SELECT)
    factors = method.init(jax.random.key(ctx.seed + 1), ctx.init_params())
    res = train_structured(ctx, "sltrain", factors)
    res.extra.update(rank=rank, density=DENSITY, alpha=rank / 4)
    return res


RECIPE = Recipe(name="sltrain", description=__doc__.strip().splitlines()[0], run=run)
