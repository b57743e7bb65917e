"""AccelAT: a learning-rate controller driven by the gradient of a validation metric over epochs.

"AccelAT: A Framework for Accelerating the Adversarial Training of Deep Neural Networks through
Accuracy Gradient" (Nikfam et al., 2023) adjusts the learning rate per epoch from the accuracy
gradient: while validation accuracy still climbs the learning rate stays, once it flattens the
learning rate drops. The abstract fixes no exact rule; this one, per epoch ``t`` with metric
``a_t`` (``mode='max'``: accuracy; ``'min'``: a loss, sign flipped)::

    g_t = least-squares slope of the last `window` metrics measured at the current lr
          (window 2: g_t = a_t - a_{t-1}, the plain accuracy gradient; window 3: (a_t - a_{t-2})/2)
    no decision until `window` metrics at the current lr exist
    bad_t = bad_{t-1} + 1  if g_t < threshold  else 0
    if bad_t >= patience and lr > min_lr:
        lr <- max(lr * factor, min_lr);  bad <- 0;  the window restarts from a_t

so a decision after a decay only uses epochs trained at the new rate (``a_t``, the metric
reached with the old one, is the new window's first point). ``min_lr`` bounds the decay.

Host side, no ``jit``: :func:`accelat` returns an :class:`LRController` whose ``update(state,
metric)`` reads one epoch's metric and returns ``(next_lr, state)``; :func:`set_learning_rate`
writes the rate into an ``optax.inject_hyperparams`` state (``opt_state.hyperparams[
'learning_rate']``). The state is a NamedTuple of arrays, so Orbax checkpoints it with the rest of
a train state. It lives in ``jaxeff.optim`` (not ``jaxeff.schedules``, whose members are pure
``step -> lr`` functions that ``jit``) because it is stateful and acts on an optimizer state.

Example::

    import jax.numpy as jnp, optax, jaxeff
    params = {"w": jnp.ones(3)}
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    ctl = jaxeff.optim.accelat(0.1, window=2, threshold=0.01)
    opt_state, lr_state = tx.init(params), ctl.init()
    for val_accuracy in [0.30, 0.50, 0.60, 0.605]:     # after each epoch of training
        lr, lr_state = ctl.update(lr_state, val_accuracy)
        opt_state = jaxeff.optim.set_learning_rate(opt_state, lr)
    assert abs(float(opt_state.hyperparams["learning_rate"]) - 0.05) < 1e-7
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxeff._checks import check_choice, check_float, check_int

__all__ = ["accelat", "AccelATState", "LRController", "set_learning_rate", "ACCELAT_MODES"]

ACCELAT_MODES = ("max", "min")


class AccelATState(NamedTuple):
    """Controller state (arrays only: checkpointable).

    ``learning_rate`` f32 ``[]``; ``metrics`` f32 ``[window]``: the last ``n_valid`` metrics at
    the current lr, right-aligned (oldest first); ``n_valid``, ``bad_epochs`` (consecutive
    epochs with slope below threshold), ``epoch`` (metrics seen), ``n_decays``: int32 ``[]``.
    """

    learning_rate: jnp.ndarray
    metrics: jnp.ndarray
    n_valid: jnp.ndarray
    bad_epochs: jnp.ndarray
    epoch: jnp.ndarray
    n_decays: jnp.ndarray


class LRController(NamedTuple):
    """``init() -> state`` and ``update(state, metric) -> (next_lr, state)`` (host side)."""

    init: Callable[[], AccelATState]
    update: Callable[[AccelATState, float], tuple]


def _slope(y: np.ndarray) -> float:
    """Least-squares slope of ``y`` against ``0 .. len(y) - 1``."""
    x = np.arange(y.size, dtype=np.float64) - (y.size - 1) / 2
    return float(np.dot(x, y - y.mean()) / np.dot(x, x))


def accelat(learning_rate: float, *, window: int = 2, threshold: float = 0.0,
            factor: float = 0.5, patience: int = 1, min_lr: float = 0.0,
            mode: str = "max") -> LRController:
    """AccelAT's accuracy-gradient learning-rate controller (rule in the module docstring).

    Args:
      learning_rate: the initial rate (> 0).
      window: metrics the slope is fitted over, >= 2 (default 2: ``a_t - a_{t-1}``).
      threshold: the slope (metric units per epoch, after the ``mode`` sign) below which an
        epoch counts as flat (default 0.0: decay when the metric stops improving).
      factor: multiplier of a decay, in (0, 1) (default 0.5).
      patience: consecutive flat epochs before a decay, >= 1 (default 1).
      min_lr: the rate never drops below it, in [0, learning_rate] (default 0.0).
      mode: ``'max'`` (accuracy, default) or ``'min'`` (a loss).
    Returns an :class:`LRController`. ``update`` raises ``ValueError`` for a non-finite metric
    or a state of another window, ``TypeError`` for a non-number.
    Raises ``ValueError`` / ``TypeError`` naming the bad argument.
    """
    lr0 = check_float("learning_rate", learning_rate, 0.0, min_open=True)
    window = check_int("window", window, 2)
    threshold = check_float("threshold", threshold)
    factor = check_float("factor", factor, 0.0, 1.0, min_open=True, max_open=True)
    patience = check_int("patience", patience, 1)
    min_lr = check_float("min_lr", min_lr, 0.0, lr0)
    sign = 1.0 if check_choice("mode", mode, ACCELAT_MODES) == "max" else -1.0

    def init() -> AccelATState:
        z = jnp.zeros((), jnp.int32)
        return AccelATState(jnp.asarray(lr0, jnp.float32), jnp.zeros((window,), jnp.float32),
                            z, z, z, z)

    def update(state: AccelATState, metric) -> tuple:
        a = check_float("metric", metric)
        if not isinstance(state, AccelATState) or np.shape(state.metrics) != (window,):
            raise ValueError(f"state must be an AccelATState of this controller (window="
                             f"{window}); got {type(state).__name__} with metrics of shape "
                             f"{np.shape(getattr(state, 'metrics', None))}")
        lr = float(state.learning_rate)
        hist = np.append(np.asarray(state.metrics, np.float32)[1:], np.float32(a))
        n_valid = min(int(state.n_valid) + 1, window)
        bad, n_decays = int(state.bad_epochs), int(state.n_decays)
        if n_valid == window:
            bad = bad + 1 if sign * _slope(hist.astype(np.float64)) < threshold else 0
            if bad >= patience and lr > min_lr:
                lr = max(lr * factor, min_lr)
                bad, n_decays, n_valid = 0, n_decays + 1, 1
        new = AccelATState(jnp.asarray(lr, jnp.float32), jnp.asarray(hist),
                           jnp.asarray(n_valid, jnp.int32), jnp.asarray(bad, jnp.int32),
                           jnp.asarray(int(state.epoch) + 1, jnp.int32),
                           jnp.asarray(n_decays, jnp.int32))
        return float(new.learning_rate), new

    return LRController(init, update)


def _find_injected(tree, name, path="opt_state"):
    """``(path, state)`` of every ``inject_hyperparams`` state holding hyperparameter ``name``."""
    found = []
    if hasattr(tree, "hyperparams") and isinstance(getattr(tree, "hyperparams"), dict) \
            and hasattr(tree, "_replace") and name in tree.hyperparams:
        found.append((path, tree))
    if isinstance(tree, dict):
        for k, v in tree.items():
            found += _find_injected(v, name, f"{path}[{k!r}]")
    elif isinstance(tree, (tuple, list)):
        for i, v in enumerate(tree):
            found += _find_injected(v, name, f"{path}[{i}]")
    return found


def _replace_injected(tree, name, value):
    if hasattr(tree, "hyperparams") and isinstance(getattr(tree, "hyperparams"), dict) \
            and hasattr(tree, "_replace") and name in tree.hyperparams:
        old = tree.hyperparams[name]
        hp = dict(tree.hyperparams)
        hp[name] = jnp.asarray(value, dtype=jnp.asarray(old).dtype).reshape(jnp.shape(old))
        return tree._replace(hyperparams=hp)
    if isinstance(tree, dict):
        return type(tree)({k: _replace_injected(v, name, value) for k, v in tree.items()})
    if isinstance(tree, tuple) and hasattr(tree, "_replace"):
        return type(tree)(*[_replace_injected(v, name, value) for v in tree])
    if isinstance(tree, (tuple, list)):
        return type(tree)(_replace_injected(v, name, value) for v in tree)
    return tree


def set_learning_rate(opt_state, learning_rate: float, name: str = "learning_rate"):
    """Write ``learning_rate`` into the one ``optax.inject_hyperparams`` state of ``opt_state``.

    ``opt_state`` is the state itself or any nest of tuples / lists / dicts / NamedTuples
    holding it (``optax.chain``). The value keeps the hyperparameter's dtype and shape; the
    next ``tx.update`` uses it. Returns the new ``opt_state``.
    Raises ``ValueError`` when no injected state (or more than one) holds ``name``, when that
    hyperparameter is a schedule (``inject_hyperparams`` would overwrite the value at every
    step), or for a learning rate that is not a finite number >= 0.
    """
    lr = check_float("learning_rate", learning_rate, 0.0)
    found = _find_injected(opt_state, name)
    if not found:
        raise ValueError(f"opt_state holds no optax.inject_hyperparams state with hyperparameter "
                         f"{name!r}; build the optimizer as optax.inject_hyperparams(optax.sgd)("
                         f"{name}=...) so its rate can be set")
    if len(found) > 1:
        raise ValueError(f"opt_state holds {len(found)} inject_hyperparams states with {name!r} "
                         f"({', '.join(p for p, _ in found)}); set the one you mean on its "
                         f"sub-state")
    path, st = found[0]
    if name in (getattr(st, "hyperparams_states", None) or {}):
        raise ValueError(f"hyperparameter {name!r} at {path} is a schedule: inject_hyperparams "
                         f"recomputes it at every step, so a value set here would be lost; pass "
                         f"a number as {name} instead")
    return _replace_injected(opt_state, name, lr)
