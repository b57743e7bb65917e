"""Optimizers as optax gradient transformations, in optax's layout: flat public functions over
private modules (``jaxeff.optim.galore`` is the function; it lives in ``_galore.py``).

Example::

    import jax, jaxeff
    tx = jaxeff.optim.galore(1e-3, rank=0.25)            # GaLore-Adam on every weight matrix
    state = tx.init({"w": jax.numpy.ones((8, 4))})

* AccelAT accuracy-gradient learning-rate controller (Nikfam et al. 2023), host side:
  ``ACCELAT_MODES``, ``accelat``, ``AccelATState``, ``LRController``, ``set_learning_rate``.
* int8 / FP8 (COAT DRE) compressed optimizer states: ``compress_state``, ``CompressedState``,
  ``dequantize``, ``describe_state``, ``dre_exponent``, ``FORMATS``, ``group_dequantize``,
  ``group_quantize``, ``GroupQuantized``, ``GroupQuantizedDRE``, ``is_quantized``, ``quantize``,
  ``quantize_like``, ``quantize_state``.
* GaLore low-rank gradient projection (Zhao et al. 2024): ``galore``, ``GaLoreState``,
  ``MOMENT_POLICIES``, ``PROJ_TYPES``, ``scale_by_galore``,
  ``scale_by_reference_adam`` (galore-torch's Adam, for ``reference_mode=True``).
* diagonal-Hessian estimators for Sophia: ``GaussNewtonBartlett``, ``gnb``, ``Hutchinson``,
  ``hutchinson``.
* layer-wise learning-rate decay and the SLCA slow learner: ``DEFAULT_EMBED``,
  ``DEFAULT_LAYER_INDEX``, ``DEFAULT_STACKED``, ``layer_multipliers``, ``layerwise``,
  ``layerwise_scale``, ``leaf_depths``, ``scale_by_layer``, ``slow_learner``.
* an EMA of the parameters: ``ema_params``, ``param_ema``, ``ParamEMAState``.
* GaLore projectors: SVD and randomized refresh: ``align_signs``, ``random_orthonormal``,
  ``Randomized``, ``randomized_projector``, ``reproject_moment``, ``resolve_refresh``,
  ``svd_projector``.
* Sophia-G / Sophia-H (Liu et al. 2023): ``is_refresh_step``, ``scale_by_sophia``, ``sophia``,
  ``sophia_extra_args``, ``sophia_win_rate``, ``SophiaState``, ``split_refresh``.
* pruning masks during pre-training: ``apply_masks``, ``densify``, ``prune``, ``SparseState``,
  ``sparsity_stats``, ``spdf``.
* sparsity schedules (cubic, geometric, Journey-Matters): ``constant_sparsity``,
  ``cubic_sparsity``, ``geometric_sparsity``, ``journey_schedule``, ``journey_window``.
"""
from jaxeff.optim._accelat import (ACCELAT_MODES, accelat, AccelATState, LRController,
                                   set_learning_rate)
from jaxeff.optim._compress import (compress_state, CompressedState, dequantize, describe_state,
                                    dre_exponent, FORMATS, group_dequantize, group_quantize,
                                    GroupQuantized, GroupQuantizedDRE, is_quantized, quantize,
                                    quantize_like, quantize_state)
from jaxeff.optim._galore import (galore, GaLoreState, MOMENT_POLICIES, PROJ_TYPES,
                                  scale_by_galore, scale_by_reference_adam)
from jaxeff.optim._hessian import GaussNewtonBartlett, gnb, Hutchinson, hutchinson
from jaxeff.optim._layerwise import (DEFAULT_EMBED, DEFAULT_LAYER_INDEX, DEFAULT_STACKED,
                                     layer_multipliers, layerwise, layerwise_scale, leaf_depths,
                                     scale_by_layer, slow_learner)
from jaxeff.optim._param_ema import ema_params, param_ema, ParamEMAState
from jaxeff.optim._projection import (align_signs, random_orthonormal, Randomized,
                                      randomized_projector, reproject_moment, resolve_refresh,
                                      svd_projector)
from jaxeff.optim._sophia import (is_refresh_step, scale_by_sophia, sophia, sophia_extra_args,
                                  sophia_win_rate, SophiaState, split_refresh)
from jaxeff.optim._sparsity import apply_masks, densify, prune, SparseState, sparsity_stats, spdf
from jaxeff.optim._sparsity_schedules import (constant_sparsity, cubic_sparsity,
                                              geometric_sparsity, journey_schedule, journey_window)

__all__ = [
    "ACCELAT_MODES", "accelat", "AccelATState", "LRController", "set_learning_rate",
    "compress_state", "CompressedState", "dequantize", "describe_state", "dre_exponent",
    "FORMATS", "group_dequantize", "group_quantize", "GroupQuantized", "GroupQuantizedDRE",
    "is_quantized", "quantize", "quantize_like", "quantize_state", "galore", "GaLoreState",
    "MOMENT_POLICIES", "PROJ_TYPES", "scale_by_galore", "scale_by_reference_adam",
    "GaussNewtonBartlett",
    "gnb", "Hutchinson", "hutchinson", "DEFAULT_EMBED", "DEFAULT_LAYER_INDEX",
    "DEFAULT_STACKED", "layer_multipliers", "layerwise", "layerwise_scale", "leaf_depths",
    "scale_by_layer", "slow_learner", "ema_params", "param_ema", "ParamEMAState",
    "align_signs", "random_orthonormal", "Randomized", "randomized_projector",
    "reproject_moment", "resolve_refresh", "svd_projector", "is_refresh_step",
    "scale_by_sophia", "sophia", "sophia_extra_args", "sophia_win_rate", "SophiaState",
    "split_refresh", "apply_masks", "densify", "prune", "SparseState", "sparsity_stats",
    "spdf", "constant_sparsity", "cubic_sparsity", "geometric_sparsity", "journey_schedule",
    "journey_window",
]
