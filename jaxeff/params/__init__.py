"""Transformations of parameter pytrees, flat over private modules (``jaxeff.params.sltrain`` is the
function; it lives in ``_sltrain.py``): structured weights, growth, pruning, quantization,
averaging and elastic sub-networks.

* parameter and byte counts: ``param_report``, ``ParamReport``, ``tree_bytes``, ``tree_size``.
* model soups, EMA, LAE: ``check_decay``, ``ema_update``, ``greedy_soup``, ``GreedySoup``,
  ``lae_accumulate``, ``lae_ensemble``, ``uniform_soup``.
* SLCA classifier alignment: ``align_classifier``, ``alignment_optimizer``, ``batch_class_stats``,
  ``class_covariance``, ``ClassStats``, ``init_class_stats``, ``logit_norm``,
  ``merge_class_stats``, ``sample_pseudo_features``, ``update_class_stats``.
* learnable depth pruning (TinyFusion 2024): ``argmax_layer_mask``, ``gated_scan``,
  ``init_depth_pruning``, ``init_lora``, ``keep_patterns``, ``kept_layers``, ``merge_lora``,
  ``prune_depth``, ``pruning_optimizer``, ``sample_layer_mask``, ``temperature_schedule``.
* elastic sub-networks (Matryoshka / Starbucks): ``elastic_loss``, ``ElasticSize``,
  ``extract_subnetwork``, ``resolve_size``, ``spec_units``.
* GPTQ (Frantar et al. 2023): ``aligned_block_size``, ``check_gptq_inputs``, ``check_hessian``,
  ``check_ok``, ``check_solver_args``, ``gptq``, ``gptq_solve``, ``gptq_solve_grid`` (any
  per-column grid), ``gptq_weight``, ``GPTQResult``, ``hessian_init``, ``hessian_update``,
  ``HessianState``, ``map_solve``, ``quant_error``, ``UniformGrid``.
* GPTQ over a whole model: ``bert_like``, ``calibration_batches``, ``default_token_mask``,
  ``gptq_model``, ``GRIDS``, ``LayerwiseModel``, ``list_layers``, ``llama_like``,
  ``stacked_layerwise``; on a flax NNX
  model without editing its forward: ``gptq_nnx``, ``capture_linear_inputs``.
* vocabulary extension, embedding rows for new tokens (BIOptimus 2023; Wada et al. 2024):
  ``extend_embedding``, ``mean_rows``, ``random_rows``.
* G_stack depth growth (Du et al. 2024): ``DEFAULT_GROWTH_FACTOR``, ``grow_train_state``,
  ``growth_tokens``, ``stack_depth``.
* layer-container navigation: ``gather_layers``, ``layer_count``, ``stacked_layers``.
* the weight-kernel seam: ``linear`` (``x @ W`` for dense and structured weights, through the
  ``jaxeff.kernels`` Pallas kernels where they win).
* LoRA adapters: ``LoRA``, ``lora``, ``LoRAWeight``.
* low-rank factors, PELA, SVFit: ``LowRank``, ``lowrank``, ``LowRankWeight``,
  ``pela_feature_loss``, ``pela_rank``, ``pela_weight_perturbation``, ``resolve_rank``, ``SVFit``,
  ``svfit``, ``SVFitWeight``, ``truncated_svd``.
* nearest-class-mean classifier: ``add_classes``, ``batch_onehot``, ``ClassMeans``,
  ``init_class_means``, ``linear_logits``, ``METRICS``, ``nmc_head``, ``nmc_predict``,
  ``nmc_scores``, ``update_class_means``.
* power-of-two weights (ShiftAddViT 2023), RTN and GPTQ-style: ``Pow2Grid``, ``pow2_decode``,
  ``pow2_encode``, ``pow2_gptq``, ``pow2_gptq_weight``, ``pow2_rtn``, ``pow2_rtn_weight``,
  ``pow2_scale``, ``Pow2Weight``.
* RTN quantization and packed codes: ``check_quant_args``, ``codes_per_word``, ``find_params``,
  ``pack``, ``quantize_codes``, ``quantize_matrices``, ``QuantizedWeight``, ``rtn``,
  ``rtn_weight``, ``stack_quantized``, ``tree_nbytes``, ``unpack``, ``VALID_BITS``.
* SLTrain sparse plus low-rank (Han et al. 2024): ``SLTrain``, ``sltrain``, ``sltrain_preset``,
  ``SLTRAIN_PRESETS``, ``SLTrainWeight``.
* structured weights: ``materialize``, ``partition`` / ``combine``: ``array_fields``, ``combine``,
  ``is_structured``, ``map_matrices``, ``materialize``, ``MatrixLayout``, ``normal``,
  ``partition``, ``structured_rule``, ``StructuredWeight``, ``trainable_mask``, ``uniform``.
* soft-prompt tuning, PVP's pre-trained prompts (Lester et al. 2021; PVP 2023):
  ``init_prompts``, ``prepend_prompts``, ``Prompted``, ``strip_prompts``.
* UniPT side network on frozen per-layer features (UniPT 2023): ``UniPT``, ``unipt``.
* function-preserving width growth (Net2Net / bert2BERT): ``GrowthWarning``,
  ``insert_identity_layers``, ``ROLES``, ``widen``, ``dim_axes``, ``explicit_units``.
"""
from jaxeff.params._accounting import param_report, ParamReport, tree_bytes, tree_size
from jaxeff.params._averaging import (check_decay, ema_update, greedy_soup, GreedySoup,
                                      lae_accumulate, lae_ensemble, uniform_soup)
from jaxeff.params._classifier_alignment import (align_classifier, alignment_optimizer,
                                                 batch_class_stats, class_covariance, ClassStats,
                                                 init_class_stats, logit_norm, merge_class_stats,
                                                 sample_pseudo_features, update_class_stats)
from jaxeff.params._depth_prune import (argmax_layer_mask, gated_scan, init_depth_pruning,
                                        init_lora, keep_patterns, kept_layers, merge_lora,
                                        prune_depth, pruning_optimizer, sample_layer_mask,
                                        temperature_schedule)
from jaxeff.params._elastic import (elastic_loss, ElasticSize, extract_subnetwork, resolve_size,
                                    spec_units)
from jaxeff.params._embedding import extend_embedding, mean_rows, random_rows
from jaxeff.params._gptq import (aligned_block_size, check_gptq_inputs, check_hessian, check_ok,
                                 check_solver_args, gptq, gptq_solve, gptq_solve_grid,
                                 gptq_weight, GPTQResult, hessian_init, hessian_update,
                                 HessianState, map_solve, quant_error, UniformGrid)
from jaxeff.params._gptq_driver import (calibration_batches, default_token_mask, gptq_model,
                                        GRIDS, LayerwiseModel, list_layers, llama_like,
                                        bert_like,
                                        stacked_layerwise)
from jaxeff.params._gptq_nnx import capture_linear_inputs, gptq_nnx
from jaxeff.params._growth import (DEFAULT_GROWTH_FACTOR, grow_train_state, growth_tokens,
                                   stack_depth)
from jaxeff.params._layers import gather_layers, layer_count, stacked_layers
from jaxeff.params._linear import linear
from jaxeff.params._lora import LoRA, lora, LoRAWeight
from jaxeff.params._lowrank import (LowRank, lowrank, LowRankWeight, pela_feature_loss, pela_rank,
                                    pela_weight_perturbation, resolve_rank, SVFit, svfit,
                                    SVFitWeight, truncated_svd)
from jaxeff.params._nearest_mean import (add_classes, batch_onehot, ClassMeans, init_class_means,
                                         linear_logits, METRICS, nmc_head, nmc_predict, nmc_scores,
                                         update_class_means)
from jaxeff.params._pow2 import (Pow2Grid, pow2_decode, pow2_encode, pow2_gptq, pow2_gptq_weight,
                                 pow2_rtn, pow2_rtn_weight, pow2_scale, Pow2Weight)
from jaxeff.params._quantized import (check_quant_args, codes_per_word, find_params, pack,
                                      quantize_codes, quantize_matrices, QuantizedWeight, rtn,
                                      rtn_weight, stack_quantized, tree_nbytes, unpack,
                                      VALID_BITS)
from jaxeff.params._sltrain import SLTrain, sltrain, sltrain_preset, SLTRAIN_PRESETS, SLTrainWeight
from jaxeff.params._soft_prompt import init_prompts, prepend_prompts, Prompted, strip_prompts
from jaxeff.params._structured import (array_fields, combine, is_structured, map_matrices,
                                       materialize, MatrixLayout, normal, partition,
                                       structured_rule, StructuredWeight, trainable_mask, uniform)
from jaxeff.params._unipt import UniPT, unipt
from jaxeff.params._widen import (dim_axes, explicit_units, GrowthWarning, insert_identity_layers,
                                  ROLES, widen)

__all__ = [
    "param_report", "ParamReport", "tree_bytes", "tree_size", "check_decay", "ema_update",
    "greedy_soup", "GreedySoup", "lae_accumulate", "lae_ensemble", "uniform_soup",
    "align_classifier", "alignment_optimizer", "batch_class_stats", "class_covariance",
    "ClassStats", "init_class_stats", "logit_norm", "merge_class_stats",
    "sample_pseudo_features", "update_class_stats", "argmax_layer_mask", "gated_scan",
    "init_depth_pruning", "init_lora", "keep_patterns", "kept_layers", "merge_lora",
    "prune_depth", "pruning_optimizer", "sample_layer_mask", "temperature_schedule",
    "extend_embedding", "mean_rows", "random_rows",
    "elastic_loss", "ElasticSize", "extract_subnetwork", "resolve_size", "spec_units",
    "aligned_block_size", "check_gptq_inputs", "check_hessian", "check_ok", "check_solver_args",
    "gptq", "gptq_solve", "gptq_solve_grid", "gptq_weight", "GPTQResult", "hessian_init",
    "hessian_update", "HessianState", "map_solve", "quant_error", "UniformGrid",
    "calibration_batches", "capture_linear_inputs", "default_token_mask", "gptq_model", "GRIDS",
    "gptq_nnx", "LayerwiseModel", "list_layers",
    "llama_like", "bert_like", "stacked_layerwise", "DEFAULT_GROWTH_FACTOR", "grow_train_state",
    "growth_tokens", "stack_depth", "gather_layers", "layer_count", "stacked_layers", "linear",
    "LoRA",
    "lora", "LoRAWeight", "LowRank", "lowrank", "LowRankWeight", "pela_feature_loss",
    "pela_rank", "pela_weight_perturbation", "resolve_rank", "SVFit", "svfit", "SVFitWeight",
    "truncated_svd", "add_classes", "batch_onehot", "ClassMeans", "init_class_means",
    "linear_logits", "METRICS", "nmc_head", "nmc_predict", "nmc_scores", "update_class_means",
    "Pow2Grid", "pow2_decode", "pow2_encode", "pow2_gptq", "pow2_gptq_weight", "pow2_rtn",
    "pow2_rtn_weight", "pow2_scale", "Pow2Weight",
    "check_quant_args", "codes_per_word", "find_params", "pack", "quantize_codes",
    "quantize_matrices", "QuantizedWeight", "rtn", "rtn_weight", "stack_quantized", "tree_nbytes", "unpack",
    "VALID_BITS", "SLTrain", "sltrain", "sltrain_preset", "SLTRAIN_PRESETS", "SLTrainWeight",
    "array_fields", "combine", "is_structured", "map_matrices", "materialize", "MatrixLayout",
    "normal", "partition", "structured_rule", "StructuredWeight",
    "trainable_mask", "uniform", "init_prompts", "prepend_prompts", "Prompted", "strip_prompts",
    "UniPT", "unipt", "dim_axes", "explicit_units", "GrowthWarning",
    "insert_identity_layers", "ROLES", "widen",
]
