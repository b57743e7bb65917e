"""Losses as pure functions on logits and hidden states: distillation and EFT up-scaling.

* :mod:`jaxeff.losses.distill` -- logit distillation with temperature (teacher-only or mixed with
  labels) and hidden-state matching with an optional projection.
* :mod:`jaxeff.losses.eft` -- emulated fine-tuning: combine a large base model with the
  fine-tuning delta of a small pair, plus a pure sampler.
"""
from jaxeff.losses.distill import (distillation_loss, hidden_state_loss, init_projection,
                                   kd_loss, masked_mean, project)
from jaxeff.losses.eft import eft_generate, eft_logprobs, eft_sample

__all__ = ["distillation_loss", "hidden_state_loss", "init_projection", "kd_loss",
           "masked_mean", "project", "eft_generate", "eft_logprobs", "eft_sample"]
