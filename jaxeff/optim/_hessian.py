"""Diagonal-Hessian estimators for Sophia: Gauss-Newton-Bartlett (Sophia-G), Hutchinson (Sophia-H).

Paper: "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model Pre-training"
(Liu et al., 2023), Section 2.3.

* **GNB** (:func:`gnb`): sample y_hat ~ softmax(logits) per token, take
  g_hat = grad of the mean cross-entropy against y_hat, and return ``h_hat = B * g_hat ⊙ g_hat``
  with B the number of (unmasked) tokens. E[h_hat] is the diagonal of the Gauss-Newton matrix of
  the mean loss. Needs ``logits_fn(params, batch) -> logits_[...]xV``, given once at construction.
* **Hutchinson** (:func:`hutchinson`): ``h_hat = mean_i u_i ⊙ (H u_i)`` over ``n_probes`` probes u
  (Rademacher or Gaussian) via a Hessian-vector product; unbiased for diag(H). Needs
  ``loss_fn(params, batch)`` at construction (or ``obj_fn(params)`` passed to ``update``, the
  optax.contrib calling convention).

An estimator is a frozen, **non-callable** dataclass (so ``optax.inject_hyperparams`` does not
mistake it for a schedule). Sophia calls :meth:`estimate_leaves` with a list of the leaves it
optimizes and ``merge(leaves) -> full params``, so only those leaves are differentiated while the
model still sees the **unmasked** parameters (the optax ``partition`` bug, TECHNIQUES.md §1).
:meth:`estimate` is the whole-tree convenience for direct use.

Sharding: under ``jit`` with ``NamedSharding`` the estimate is computed on the global batch, so it
is the global-batch estimate automatically. Under ``shard_map``/``pmap`` set ``axis_name``: the
per-device g_hat (GNB) or H u (Hutchinson) are summed/averaged over it before squaring.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from jaxeff._checks import check_callable, check_choice, check_float, check_int, check_optional

__all__ = ["GaussNewtonBartlett", "Hutchinson", "gnb", "hutchinson"]


def _scalar_loss(out):
    """Accept ``loss`` or ``(loss, aux)``."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _whole_tree(estimator, params, **kw):
    leaves, treedef = jax.tree.flatten(params)
    merge = lambda xs: jax.tree.unflatten(treedef, xs)
    return jax.tree.unflatten(treedef, estimator.estimate_leaves(merge, leaves, **kw))


@dataclasses.dataclass(frozen=True, eq=False)
class GaussNewtonBartlett:
    """Gauss-Newton-Bartlett diagonal estimator (Sophia-G). Build it with :func:`gnb`."""

    logits_fn: Callable[[Any, Any], jax.Array]
    mask_key: Optional[str] = "loss_mask"
    batch_size: Optional[int] = None
    grad_clip: Optional[float] = None
    max_rows: Optional[int] = None
    axis_name: Optional[str] = None

    default_rho = 0.04  # reference SophiaG constructor default (paper GPT-2 125M: 0.05)
    name = "gnb"

    def __post_init__(self):
        check_callable("logits_fn", self.logits_fn,
                       "a callable logits_fn(params, batch) -> logits_[...]xV (gnb needs it)")
        check_optional(check_int, "batch_size", self.batch_size, 1)
        check_optional(check_float, "grad_clip", self.grad_clip, 0.0, min_open=True)
        check_optional(check_int, "max_rows", self.max_rows, 1)

    def estimate_leaves(self, merge, xs, *, batch=None, key=None, obj_fn=None):
        """``[B * g_hat**2 for each leaf of xs]`` with g_hat from labels sampled from the model."""
        del obj_fn
        if batch is None:
            raise ValueError("the GNB estimator needs the batch: call update(..., batch=batch, "
                             "key=key) (see jaxeff.optim.sophia_extra_args)")
        if key is None:
            raise ValueError("the GNB estimator needs a PRNG key to sample labels; got key=None")
        if self.max_rows is not None:
            batch = jax.tree.map(lambda a: a[: self.max_rows], batch)
        logits, vjp_fn = jax.vjp(lambda ps: self.logits_fn(merge(ps), batch), list(xs))
        if not hasattr(logits, "ndim") or logits.ndim < 1 or logits.shape[-1] < 1 or \
                not jnp.issubdtype(logits.dtype, jnp.floating):
            raise ValueError("gnb's logits_fn(params, batch) must return float logits_[...]xV "
                             "(a last vocabulary axis to sample labels from); got "
                             f"{type(logits).__name__} of shape {getattr(logits, 'shape', None)}"
                             f" and dtype {getattr(logits, 'dtype', None)}")
        logits32 = logits.astype(jnp.float32)
        y_hat = jax.random.categorical(key, jax.lax.stop_gradient(logits32), axis=-1)
        if self.mask_key is not None and isinstance(batch, dict) and self.mask_key in batch:
            mask = jnp.asarray(batch[self.mask_key], jnp.float32)
            if mask.shape != logits.shape[:-1]:
                raise ValueError(f"batch[{self.mask_key!r}] has shape {mask.shape}; it must "
                                 f"match the logits' leading axes {logits.shape[:-1]}")
        else:
            mask = jnp.ones(logits.shape[:-1], jnp.float32)
        n_tokens = jnp.sum(mask)
        if self.axis_name is not None:
            n_tokens = jax.lax.psum(n_tokens, self.axis_name)
        if self.batch_size is not None:
            n_tokens = jnp.float32(self.batch_size)
        # d mean_CE(logits, y_hat) / d logits, pulled back through the model in one VJP
        # (no second forward pass).
        onehot = jax.nn.one_hot(y_hat, logits.shape[-1], dtype=jnp.float32)
        weight = mask / jnp.maximum(n_tokens, 1.0)
        cot = (jax.nn.softmax(logits32, axis=-1) - onehot) * weight[..., None]
        (g_hat,) = vjp_fn(cot.astype(logits.dtype))
        if self.axis_name is not None:
            g_hat = jax.lax.psum(g_hat, self.axis_name)
        if self.grad_clip is not None:
            g_hat, _ = optax.clip_by_global_norm(self.grad_clip).update(g_hat, None)
        return [n_tokens * jnp.square(g.astype(jnp.float32)) for g in g_hat]

    def estimate(self, params, *, batch, key):
        """Whole-tree estimate ``B * g_hat ⊙ g_hat`` (float32), same structure as ``params``."""
        return _whole_tree(self, params, batch=batch, key=key)


@dataclasses.dataclass(frozen=True, eq=False)
class Hutchinson:
    """Hutchinson diagonal estimator (Sophia-H). Build it with :func:`hutchinson`."""

    loss_fn: Optional[Callable[[Any, Any], Any]] = None
    n_probes: int = 1
    distribution: str = "rademacher"
    axis_name: Optional[str] = None

    default_rho = 0.01  # paper / levanter gamma for Sophia-H
    name = "hutchinson"

    def __post_init__(self):
        check_optional(check_callable, "loss_fn", self.loss_fn,
                       "a callable (params, batch) -> loss (hutchinson's loss_fn)")
        check_int("n_probes", self.n_probes, 1)
        check_choice("distribution", self.distribution, ("rademacher", "gaussian"))

    def _probe(self, key, xs):
        keys = jax.random.split(key, len(xs))
        if self.distribution == "rademacher":
            return [jax.random.rademacher(k, x.shape, jnp.float32).astype(x.dtype)
                    for k, x in zip(keys, xs)]
        return [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
                for k, x in zip(keys, xs)]

    def estimate_leaves(self, merge, xs, *, batch=None, key=None, obj_fn=None):
        """``mean over probes of u ⊙ (H u)`` for each leaf of xs (float32)."""
        if key is None:
            raise ValueError("the Hutchinson estimator needs a PRNG key for its probes; got "
                             "key=None")
        if self.loss_fn is not None:
            if batch is None:
                raise ValueError("the Hutchinson estimator's loss_fn needs the batch: call "
                                 "update(..., batch=batch, key=key)")
            f = lambda ps: _scalar_loss(self.loss_fn(merge(ps), batch))
        elif obj_fn is not None:
            f = lambda ps: _scalar_loss(obj_fn(merge(ps)))
        else:
            raise ValueError("the Hutchinson estimator has no loss_fn: build it with "
                             "hutchinson(loss_fn) or pass obj_fn=lambda params: loss to update()")
        xs = list(xs)
        for i, x in enumerate(xs):
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"the Hutchinson estimator differentiates the params, but leaf "
                                f"{i} (of those Sophia owns) has dtype {x.dtype}, shape "
                                f"{tuple(x.shape)}; only float params can be estimated (exclude "
                                "it with optax.partition / multi_transform)")
        grad_f = jax.grad(f)

        def one(k):
            u = self._probe(k, xs)
            hu = jax.jvp(grad_f, (xs,), (u,))[1]  # forward-over-reverse HVP
            if self.axis_name is not None:
                hu = jax.lax.pmean(hu, self.axis_name)
            return [ui.astype(jnp.float32) * hui.astype(jnp.float32) for ui, hui in zip(u, hu)]

        if self.n_probes == 1:
            return one(key)
        # Probes run one after another (scan), so memory does not grow with n_probes.
        zeros = [jnp.zeros(x.shape, jnp.float32) for x in xs]
        total, _ = jax.lax.scan(lambda acc, k: ([a + e for a, e in zip(acc, one(k))], None),
                                zeros, jax.random.split(key, self.n_probes))
        return [t / self.n_probes for t in total]

    def estimate(self, params, *, batch=None, key, obj_fn=None):
        """Whole-tree estimate ``mean u ⊙ (H u)`` (float32), same structure as ``params``."""
        return _whole_tree(self, params, batch=batch, key=key, obj_fn=obj_fn)


def gnb(logits_fn: Callable[[Any, Any], jax.Array], *, mask_key: Optional[str] = "loss_mask",
        batch_size: Optional[int] = None, grad_clip: Optional[float] = None,
        max_rows: Optional[int] = None, axis_name: Optional[str] = None) -> GaussNewtonBartlett:
    """Gauss-Newton-Bartlett diagonal-Hessian estimator (Sophia-G).

    ``y_hat ~ Categorical(softmax(logits))`` per token; ``g_hat = ∇ (1/B) Σ_t mask_t CE(logits_t,
    y_hat_t)``; returns ``h_hat = B · g_hat ⊙ g_hat``, whose expectation is the diagonal of the
    Gauss-Newton matrix of the mean loss. Cost: one forward and one backward (a single VJP).

    Paper: "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
    Pre-training" (Liu et al., 2023), Algorithm 2.

    Args:
      logits_fn: ``(params, batch) -> logits_[...]xV``, e.g.
        ``lambda p, b: llama.forward(p, b['inputs'], cfg, b['segment_ids'], b['positions'])``.
      mask_key: batch key of a ``[...]`` 0/1 token mask (``'loss_mask'``); ``None`` or absent:
        every token counts.
      batch_size: B; default ``None`` = the number of unmasked tokens in the batch. The
        reference passes a constant ``bs`` = tokens per step.
      grad_clip: clip g_hat to this global norm before squaring (the reference uses 1.0; with
        ``sophia(reference_mode=True)`` an unset clip becomes 1.0). Default ``None``.
      max_rows: estimate on the first ``max_rows`` sequences of the batch only (cheaper; a
        deviation: the reference uses the whole batch). Default ``None``.
      axis_name: mapped axis to sum g_hat over under ``shard_map``/``pmap``; not needed with jit.

    Raises:
      TypeError if ``logits_fn`` is not callable, or ``batch_size`` / ``max_rows`` are not ints;
      ValueError for non-positive ``batch_size``, ``grad_clip`` or ``max_rows``. At trace time,
      ValueError if no batch or key is passed, if ``logits_fn`` returns no ``[..., V]`` float
      logits (e.g. a scalar loss), or if the mask's shape does not match the logits.
    """
    return GaussNewtonBartlett(logits_fn, mask_key, batch_size, grad_clip, max_rows, axis_name)


def hutchinson(loss_fn: Optional[Callable[[Any, Any], Any]] = None, *, n_probes: int = 1,
               distribution: str = "rademacher",
               axis_name: Optional[str] = None) -> Hutchinson:
    """Hutchinson diagonal-Hessian estimator (Sophia-H).

    ``h_hat = (1/n) Σ_i u_i ⊙ (H u_i)`` with i.i.d. probes u_i (Rademacher: ±1, or standard
    Gaussian) and ``H u`` a forward-over-reverse Hessian-vector product of the loss. Unbiased:
    E[u ⊙ Hu] = diag(H). Cost per probe: about one HVP (≈ 2-3 gradients).

    Paper: "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
    Pre-training" (Liu et al., 2023), Algorithm 1; the paper and levanter use Gaussian probes,
    optax.contrib Rademacher (lower variance: no diagonal term).

    Args:
      loss_fn: ``(params, batch) -> loss`` or ``-> (loss, aux)``. Default ``None``: then
        ``update`` must get ``obj_fn=lambda params: loss`` (optax.contrib's convention).
      n_probes: probes averaged per refresh (run sequentially); default 1.
      distribution: ``'rademacher'`` (default) or ``'gaussian'``.
      axis_name: mapped axis to average H u over under ``shard_map``/``pmap``.

    Raises:
      TypeError for a non-callable ``loss_fn`` or a non-int ``n_probes``; ValueError for
      non-positive ``n_probes`` or an unknown ``distribution``. At trace time, ValueError if
      neither ``loss_fn`` nor ``obj_fn`` is available, or no key is passed; TypeError for a
      non-float parameter leaf (no Hessian-vector product exists).
    """
    return Hutchinson(loss_fn, n_probes, distribution, axis_name)
