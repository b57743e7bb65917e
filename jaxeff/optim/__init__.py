"""Optimizers as optax gradient transformations.

Every technique module is a submodule (``jaxeff.optim.galore`` is the module; its entry point is
``jaxeff.optim.galore.galore``); the other public names are also exported here.

* :mod:`~jaxeff.optim.sophia`, :mod:`~jaxeff.optim.hessian` -- Sophia-G / Sophia-H and their
  diagonal-Hessian estimators.
* :mod:`~jaxeff.optim.galore`, :mod:`~jaxeff.optim.projection` -- GaLore low-rank gradient
  projection.
* :mod:`~jaxeff.optim.compress` -- int8 / FP8 (COAT DRE) compressed optimizer states.
* :mod:`~jaxeff.optim.sparsity` -- pruning masks and sparsity schedules during pre-training.
* :mod:`~jaxeff.optim.param_ema` -- an EMA of the parameters (not of the updates).
* :mod:`~jaxeff.optim.layerwise` -- layer-wise learning-rate decay and the SLCA slow learner.
"""
from jaxeff.optim import (compress, galore, hessian, layerwise, param_ema, projection,
                          sophia, sparsity, sparsity_schedules)
from jaxeff.optim.compress import (CompressedState, GroupQuantized, GroupQuantizedDRE,
                                   compress_state, describe_state)
from jaxeff.optim.galore import GaLoreState, Randomized, scale_by_galore
from jaxeff.optim.hessian import GaussNewtonBartlett, Hutchinson, gnb, hutchinson
from jaxeff.optim.layerwise import layer_multipliers, slow_learner
from jaxeff.optim.param_ema import ParamEMAState, ema_params
from jaxeff.optim.sophia import (SophiaState, scale_by_sophia, sophia_extra_args,
                                 sophia_win_rate, split_refresh)
from jaxeff.optim.sparsity import (SparseState, apply_masks, cubic_sparsity, densify,
                                   journey_schedule, prune, sparsity_stats)

__all__ = [
    # submodules
    "compress", "galore", "hessian", "layerwise", "param_ema", "projection", "sophia", "sparsity",
    "sparsity_schedules",
    # names
    "CompressedState", "GroupQuantized", "GroupQuantizedDRE", "compress_state", "describe_state",
    "GaLoreState", "Randomized", "scale_by_galore",
    "GaussNewtonBartlett", "Hutchinson", "gnb", "hutchinson",
    "layer_multipliers", "slow_learner",
    "ParamEMAState", "ema_params",
    "SophiaState", "scale_by_sophia", "sophia_extra_args", "sophia_win_rate",
    "split_refresh",
    "SparseState", "apply_masks", "cubic_sparsity", "densify", "journey_schedule", "prune",
    "sparsity_stats",
]
