"""Emulated fine-tuning (EFT) / LM up-scaling: a large base model plus a small fine-tuning delta.

Paper: "An Emulator for Fine-Tuning Large Language Models using Small Language Models"
(Mitchell et al., 2023). Fine-tuning is read as a reward ``r = log p_ft - log p_base`` learned at
the small scale and added to the large base model's log-probabilities at each step::

    log p_eft(v|x) = log_softmax( log p_Lb(v|x) + beta * (log p_Sft(v|x) - log p_Sb(v|x)) )

(``Lb`` the large base model, ``Sft`` / ``Sb`` the small fine-tuned / base pair).

``beta = 1`` is the paper's up-scaling; ``beta`` scales the emulated fine-tuning (the paper's
test-time behaviour adjustment interpolates rewards the same way); ``beta = 0`` gives the large
base model exactly. All three models must share the vocabulary (same last axis).

:func:`eft_sample` draws the next token from ``p_eft^(1/temperature)`` with an explicit key
(``temperature = 0``: greedy). :func:`eft_generate` decodes ``n`` tokens by calling three
``logits_fn(tokens [B, T]) -> logits [B, T, V]`` on a fixed-size buffer (causal models ignore the
not-yet-written positions), so it jit-compiles to one loop; it recomputes the whole prefix each
step (no KV cache), which is right for small models and tests, not for serving. The paper's
speculative-decoding speed-up is not implemented.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxeff._checks import check_float, check_int

__all__ = ["eft_logprobs", "eft_sample", "eft_generate"]


def _check_three(large_base, small_ft, small_base):
    shapes = {"large_base_logits": tuple(large_base.shape),
              "small_ft_logits": tuple(small_ft.shape),
              "small_base_logits": tuple(small_base.shape)}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"the three logits must have the same shape (same positions and "
                         f"vocabulary); got {shapes}")
    if large_base.ndim < 1 or large_base.shape[-1] < 1:
        raise ValueError(f"logits need a non-empty last (vocabulary) axis; got shape "
                         f"{tuple(large_base.shape)}")


def _check_beta(beta):
    """A finite number, or an array (per-position betas, possibly traced: not checked)."""
    if isinstance(beta, (bool, str)) or beta is None:
        raise TypeError(f"beta must be a number or an array; got {beta!r}")
    if not hasattr(beta, "shape"):
        check_float("beta", beta)


def _check_temperature(temperature):
    return check_float("temperature (0 = greedy)", temperature, 0.0)


def eft_logprobs(large_base_logits, small_ft_logits, small_base_logits, *, beta=1.0):
    """EFT log-probabilities ``log_softmax(log p_Lb + beta (log p_Sft - log p_Sb))``, float32.

    Paper: "An Emulator for Fine-Tuning Large Language Models using Small Language Models"
    (Mitchell et al., 2023).

    Args:
      large_base_logits, small_ft_logits, small_base_logits: ``[..., V]``, the same shape.
      beta: scale of the fine-tuning delta (float or traced scalar); default 1 (up-scaling);
        0 returns ``log_softmax(large_base_logits)``.

    Raises:
      ValueError naming the arguments for shapes that differ; ValueError / TypeError for a
      non-finite or boolean ``beta``.
    """
    large_base_logits, small_ft_logits, small_base_logits = (
        jnp.asarray(large_base_logits), jnp.asarray(small_ft_logits),
        jnp.asarray(small_base_logits))
    _check_three(large_base_logits, small_ft_logits, small_base_logits)
    _check_beta(beta)
    lsm = lambda z: jax.nn.log_softmax(jnp.asarray(z, jnp.float32), axis=-1)  # noqa: E731
    delta = lsm(small_ft_logits) - lsm(small_base_logits)
    return jax.nn.log_softmax(lsm(large_base_logits) + jnp.asarray(beta, jnp.float32) * delta,
                              axis=-1)


def eft_sample(key: jax.Array, large_base_logits, small_ft_logits, small_base_logits, *,
               beta=1.0, temperature: float = 1.0):
    """Sample token ids ``[...]`` from the EFT distribution (pure: all randomness from ``key``).

    ``v ~ softmax(log p_eft / temperature)``; ``temperature = 0`` returns
    ``argmax log p_eft`` (greedy, ``key`` unused).

    Args:
      key: a ``jax.random`` key.
      large_base_logits, small_ft_logits, small_base_logits, beta: as in :func:`eft_logprobs`.
      temperature: >= 0 (default 1).

    Raises what :func:`eft_logprobs` raises; ValueError for a negative or non-finite temperature.
    """
    temperature = _check_temperature(temperature)
    logp = eft_logprobs(large_base_logits, small_ft_logits, small_base_logits, beta=beta)
    if temperature == 0.0:
        return jnp.argmax(logp, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logp / temperature, axis=-1).astype(jnp.int32)


def eft_generate(key: jax.Array, logits_fns: Sequence[Callable], prompt, max_new_tokens: int, *,
                 beta=1.0, temperature: float = 1.0, pad_id: int = 0):
    """Decode ``max_new_tokens`` tokens after ``prompt [B, P]`` from the EFT distribution.

    Each ``logits_fn(tokens [B, P + N]) -> [B, P + N, V]`` must be causal (position ``t`` sees
    ``tokens[:, :t+1]`` only); step ``t`` samples token ``t`` from the logits at ``t - 1`` of the
    three models with key ``fold_in(key, t)``. Unwritten positions hold ``pad_id``.

    Args:
      key: a ``jax.random`` key.
      logits_fns: ``(large_base, small_ft, small_base)`` callables.
      prompt: int ``[B, P]`` with P >= 1.
      max_new_tokens: N >= 1.
      beta, temperature: as in :func:`eft_sample`.
      pad_id: filler for not-yet-generated positions (default 0).

    Returns int32 ``[B, P + N]``: the prompt followed by the sampled tokens.

    Raises:
      ValueError / TypeError naming the argument: not three callables, a prompt that is not
      ``[B, P >= 1]``, ``max_new_tokens < 1``, a bad temperature or beta.
    """
    if (not isinstance(logits_fns, (list, tuple)) or len(logits_fns) != 3
            or not all(callable(f) for f in logits_fns)):
        raise TypeError("logits_fns must be three callables (large_base, small_ft, small_base); "
                        f"got {logits_fns!r}")
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be int [batch, length >= 1]; got shape "
                         f"{tuple(prompt.shape)} dtype {prompt.dtype}")
    check_int("max_new_tokens", max_new_tokens, 1)
    temperature = _check_temperature(temperature)
    _check_beta(beta)
    B, P = prompt.shape
    total = P + int(max_new_tokens)
    buf = jnp.full((B, total), pad_id, jnp.int32).at[:, :P].set(prompt.astype(jnp.int32))
    f_lb, f_ft, f_sb = logits_fns

    def body(t, buf):
        pick = lambda f: jax.lax.dynamic_index_in_dim(f(buf), t - 1, axis=1,  # noqa: E731
                                                      keepdims=False)
        nxt = eft_sample(jax.random.fold_in(key, t), pick(f_lb), pick(f_ft), pick(f_sb),
                         beta=beta, temperature=temperature)
        return jax.lax.dynamic_update_index_in_dim(buf, nxt, t, axis=1)

    return jax.lax.fori_loop(P, total, body, buf)
