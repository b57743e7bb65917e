"""Reference models for experiments, notebooks and tests (the library itself is model-agnostic).

* ``jaxeff.models.llama`` -- a LLaMA-style decoder as plain functions over a dict of arrays
  (segment-id attention, RoPE on restarted positions, GQA, SwiGLU, stacked/scanned layers).
"""
from jaxeff.models import llama

__all__ = ["llama"]
