"""8-bit GaLore: the 'galore' recipe with its Adam moments stored as block-wise int8 between steps.

"GaLore" (Zhao et al., 2024), 8-bit variant: ``jaxeff.optim.compress_state(
scale_by_adam(0.9, 0.95), 'int8')`` as GaLore's inner transform (groups of 128 with absmax scale
and dynamic range expansion, tensors under 4096 values kept in f32; the paper uses bitsandbytes'
8-bit Adam). Everything else as the 'galore' recipe; the extra numbers include the
optimizer-state ratio to AdamW.
"""

import optax

from experiments.recipes import galore as galore_recipe
from experiments.speedrun import Recipe
from jaxeff.optim import compress_state


def run(ctx):
    inner = compress_state(optax.scale_by_adam(b1=0.9, b2=0.95), "int8")
    return galore_recipe.run(ctx, name="galore-8bit", inner=inner)


RECIPE = Recipe(name="galore-8bit", description=__doc__.strip().splitlines()[0], run=run)
