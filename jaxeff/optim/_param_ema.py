"""Parameter EMA as an optax transformation (Polyak averaging of the weights, kept in float32).

``optax.ema`` averages the *updates* flowing through the chain, not the parameters. This
transform passes updates through unchanged and keeps, in its state, an exponential moving average
of the parameters *after* the step (``params + updates``, as ``optax.apply_updates`` makes
them), so put it **last** in the chain.

Example::

    import jax.numpy as jnp, optax, jaxeff
    params = {"w": jnp.ones(3)}
    tx = optax.chain(optax.adamw(1e-2), jaxeff.optim.param_ema(0.999))
    opt_state = tx.init(params)
    updates, opt_state = tx.update({"w": jnp.ones(3)}, opt_state, params)
    params = optax.apply_updates(params, updates)
    avg = jaxeff.optim.ema_params(opt_state, like=params)   # evaluate with the averaged weights

Update rule, with ``theta_t = apply_updates(params, updates)`` and ``d_t`` the decay at step t::

    ema_0 = float32(params_0)                     (init)
    ema_t = theta_t + d_t (ema_{t-1} - theta_t)   (= d_t ema_{t-1} + (1 - d_t) theta_t)

``d_t = decay`` or ``decay(count)`` for a schedule; with ``warmup=True``
``d_t = min(decay, (1 + t) / (10 + t))`` (the warmup of TensorFlow's
``ExponentialMovingAverage(num_updates=...)`` and timm's EMA), so early averages are not
dominated by the initial weights. ``decay = 0`` copies the current params exactly; constant
params are a fixed point exactly. The average is float32 whatever the param dtype (bf16 loses
increments of ``(1 - 0.999) * delta``).

Paper: "Acceleration of Stochastic Approximation by Averaging" (Polyak and Juditsky, 1992); used
for LAE's offline module ("A Unified Continual Learning Framework with General
Parameter-Efficient Tuning", Gao et al., 2023). The state is a NamedTuple of arrays (Orbax-safe;
shards like the params).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from jaxeff._checks import check_decay, check_float_dtype
from jaxeff.state_sharding import register_rule

__all__ = ["ParamEMAState", "param_ema", "ema_params"]


class ParamEMAState(NamedTuple):
    """``count``: int32 steps taken; ``ema``: float32 params-shaped average."""

    count: jax.Array
    ema: Any


@register_rule(ParamEMAState)
def _param_ema_shardings(s: ParamEMAState, ctx):
    """Sharding (``jaxeff.state_sharding``): the average takes the param sharding, ``count``
    replicated."""
    return s._replace(count=ctx.replicated(s.count), ema=ctx.walk(s.ema))


def param_ema(decay: Union[float, Callable[[jax.Array], jax.Array]] = 0.999, *,
              warmup: bool = False, dtype=jnp.float32) -> optax.GradientTransformation:
    """Keep an EMA of the parameters in the optimizer state; updates pass through unchanged.

    ``ema_t = theta_t + d_t (ema_{t-1} - theta_t)`` with ``theta_t = params + updates`` (see the
    module docstring). Place it last in an ``optax.chain``.

    Args:
      decay: a float in [0, 1) (default 0.999) or a schedule ``count -> decay`` (values are not
        checked under tracing).
      warmup: use ``min(decay, (1 + t) / (10 + t))`` (default False).
      dtype: dtype of the average (default float32; a floating dtype).

    Raises:
      ValueError / TypeError: ``decay`` outside [0, 1) or of the wrong type; TypeError for a
      non-floating ``dtype``; at update time, ValueError when ``params`` is not passed.
    """
    if not callable(decay):
        check_decay(decay)
    dtype = check_float_dtype("dtype", dtype, allow_none=False)
    if not isinstance(warmup, bool):
        raise TypeError(f"warmup must be a bool; got {warmup!r}")

    def init_fn(params):
        return ParamEMAState(count=jnp.zeros((), jnp.int32),
                             ema=jax.tree.map(lambda p: jnp.asarray(p, dtype), params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("param_ema needs the current params: call tx.update(updates, state, "
                             "params)")
        d = decay(state.count) if callable(decay) else decay
        d = jnp.asarray(d, jnp.float32)
        if warmup:
            t = state.count.astype(jnp.float32)
            d = jnp.minimum(d, (1.0 + t) / (10.0 + t))
        new_params = optax.apply_updates(params, updates)

        def one(avg, p):
            p = jnp.asarray(p, dtype)
            return (p + d.astype(dtype) * (avg - p)).astype(dtype)

        ema = jax.tree.map(one, state.ema, new_params)
        return updates, ParamEMAState(count=optax.safe_increment(state.count), ema=ema)

    return optax.GradientTransformation(init_fn, update_fn)


def ema_params(opt_state, like=None):
    """The EMA params held by the single :class:`ParamEMAState` inside ``opt_state`` (searched
    through chains, ``multi_transform``, ``inject_hyperparams``...).

    With ``like`` (a params pytree) the average is cast to ``like``'s leaf dtypes.

    Raises ValueError when ``opt_state`` holds no ParamEMAState or more than one.
    """
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ParamEMAState))
             if isinstance(s, ParamEMAState)]
    if len(found) != 1:
        raise ValueError(f"opt_state must hold exactly one ParamEMAState (from param_ema); "
                         f"found {len(found)}")
    ema = found[0].ema
    if like is None:
        return ema
    return jax.tree.map(lambda a, p: a.astype(jnp.asarray(p).dtype), ema, like)

