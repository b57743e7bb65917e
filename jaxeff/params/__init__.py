"""Transformations of parameter pytrees: structured weights, growth, pruning, quantization,
averaging and elastic sub-networks.

Every technique module is a submodule (``jaxeff.params.sltrain`` is the module; its entry point
is ``jaxeff.params.sltrain.sltrain``); the other public names are also exported here.

* structured weights: :mod:`~jaxeff.params.structured` (``materialize``), ``sltrain``,
  ``lowrank``, ``lora``, ``accounting``;
* growth and pruning: ``growth`` (G_stack), ``widen``, ``depth_prune`` (TinyFusion);
* quantization: ``quantized`` (RTN, packed codes), ``gptq``, ``gptq_driver``;
* averaging and continual learning: ``averaging`` (soups, EMA, LAE), ``classifier_alignment``
  (SLCA), ``nearest_mean``; elastic sub-networks: ``elastic``.
"""
from jaxeff.params import (accounting, averaging, classifier_alignment, depth_prune, elastic,
                           gptq, gptq_driver, growth, layers, lora, lowrank, nearest_mean,
                           quantized, sltrain, structured, widen)
from jaxeff.params.accounting import ParamReport, param_report, tree_bytes, tree_size
from jaxeff.params.averaging import (GreedySoup, ema_update, greedy_soup, lae_accumulate,
                                     lae_ensemble, uniform_soup)
from jaxeff.params.depth_prune import prune_depth
from jaxeff.params.elastic import ElasticSize, elastic_loss, extract_subnetwork
from jaxeff.params.gptq_driver import gptq_model
from jaxeff.params.growth import grow_train_state, growth_tokens, stack_depth
from jaxeff.params.lora import LoRA, LoRAWeight
from jaxeff.params.lowrank import LowRank, LowRankWeight, truncated_svd
from jaxeff.params.quantized import QuantizedWeight, rtn
from jaxeff.params.sltrain import SLTrain, SLTrainWeight
from jaxeff.params.structured import (StructuredWeight, combine, is_structured, materialize,
                                      partition, trainable_mask)
from jaxeff.params.widen import GrowthWarning

__all__ = [
    # submodules
    "accounting", "averaging", "classifier_alignment", "depth_prune", "elastic", "gptq",
    "gptq_driver", "growth", "layers", "lora", "lowrank", "nearest_mean", "quantized", "sltrain",
    "structured", "widen",
    # names
    "ParamReport", "param_report", "tree_bytes", "tree_size",
    "GreedySoup", "ema_update", "greedy_soup", "lae_accumulate", "lae_ensemble", "uniform_soup",
    "prune_depth", "ElasticSize", "elastic_loss", "extract_subnetwork",
    "gptq_model", "grow_train_state", "growth_tokens", "stack_depth",
    "LoRA", "LoRAWeight", "LowRank", "LowRankWeight", "truncated_svd",
    "QuantizedWeight", "rtn", "SLTrain", "SLTrainWeight",
    "StructuredWeight", "combine", "is_structured", "materialize", "partition", "trainable_mask",
    "GrowthWarning",
]
