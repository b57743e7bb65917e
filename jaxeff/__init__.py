"""jaxeff: efficient-training techniques from recent papers as pure, composable JAX transformations.

Subpackages (each a flat namespace of functions and classes, optax's layout):

* ``jaxeff.optim`` -- optax gradient transformations: ``sophia``, ``galore``, ``compress_state``,
  ``prune``, ``layerwise``, ``param_ema``, ...
* ``jaxeff.params`` -- parameter-pytree transforms: ``sltrain``, ``lora``, ``lowrank``,
  ``materialize``, ``partition`` / ``combine``, ``stack_depth``, ``widen``, ``gptq``, ``rtn``, ...
* ``jaxeff.data`` -- corpora, tokenizers and Grain pipeline stages: ``make_lm_dataset``,
  ``make_meco_dataset``, ``select_top``, ``near_duplicates``, mixtures, ...
* ``jaxeff.schedules`` -- learning-rate schedules: ``wsd``, ``power``, ``infinite``, ``rewarm``.
* ``jaxeff.losses`` -- distillation and EFT losses.
* ``jaxeff.models`` -- reference models (a LLaMA-style decoder, a BERT encoder), GGUF /
  safetensors loaders, ``pretrained("smollm2-135m")`` and KV-cache ``generate``.
* ``jaxeff.kernels`` -- Pallas kernels with their ``jnp`` reference twins and dispatchers.
* ``jaxeff.select`` (the one selector convention: one path per leaf with or without an
  ``nnx.Variable``, ``is_weight_matrix`` -- the default selection of matrix transforms --, and
  ``MatrixLayout`` / ``matrix_axes=``, the one matrix view), ``jaxeff.train``,
  ``jaxeff.checkpoint``, ``jaxeff.sharding``, ``jaxeff.state_sharding``, ``jaxeff.distributed``.

Subpackages load on first use (PEP 562), so ``import jaxeff`` itself does not import JAX.

Example::

    import jaxeff
    tx = jaxeff.optim.galore(1e-3, rank=0.25)
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = ("optim", "params", "data", "schedules", "losses", "models", "kernels", "select",
               "train", "checkpoint", "sharding", "state_sharding", "distributed")

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name):
    if name in _SUBMODULES:
        module = importlib.import_module(f"jaxeff.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'jaxeff' has no attribute {name!r}; its subpackages are "
                         f"{', '.join(_SUBMODULES)}")


def __dir__():
    return sorted(__all__)
