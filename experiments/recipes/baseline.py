"""Baseline: AdamW (0.9, 0.95, wd 0.1, clip 1.0) on a warmup-stable-decay schedule."""

from experiments.speedrun import Recipe


def run(ctx):
    params = ctx.init_params()
    return ctx.result(ctx.train("baseline", params, ctx.adamw()))


RECIPE = Recipe(name="baseline", description=__doc__.strip().splitlines()[0], run=run)
