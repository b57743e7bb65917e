"""Losses as pure functions on logits and hidden states, flat over private modules.

* logit distillation and hidden-state matching: ``distillation_loss``, ``HIDDEN_KINDS``,
  ``hidden_state_loss``, ``init_projection``, ``kd_loss``, ``masked_mean``, ``project``,
  ``REDUCTIONS``.
* emulated fine-tuning (EFT) up-scaling and its sampler: ``eft_generate``, ``eft_logprobs``,
  ``eft_sample``.
"""
from jaxeff.losses._distill import (distillation_loss, HIDDEN_KINDS, hidden_state_loss,
                                    init_projection, kd_loss, masked_mean, project, REDUCTIONS)
from jaxeff.losses._eft import eft_generate, eft_logprobs, eft_sample

__all__ = [
    "distillation_loss", "HIDDEN_KINDS", "hidden_state_loss", "init_projection", "kd_loss",
    "masked_mean", "project", "REDUCTIONS", "eft_generate", "eft_logprobs", "eft_sample",
]
