"""Sparsity schedules for gradual pruning during pre-training: constant, geometric, cubic
(Zhu & Gupta, 2017) and the Journey-Matters window.

Each returns ``step -> sparsity`` (a jnp scalar in [0, 1]) for :func:`jaxeff.optim.prune`.
Paper for the window: "The Journey Matters: Average Parameter Count over Pre-training Unifies
Sparse and Dense Scaling Laws" (Jin et al., 2025). Split out of ``sparsity.py`` to keep each
module short; ``jaxeff.optim.sparsity`` re-exports everything here.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

from jaxeff._checks import check_choice, check_fraction, check_int

__all__ = ["constant_sparsity", "geometric_sparsity", "cubic_sparsity", "journey_window",
           "journey_schedule"]


def _check_sparsity(s, name="final_sparsity"):
    return check_fraction(name, s, open_right=True)


def _check_window(start_step, end_step, every):
    start_step = check_int("start_step", start_step, 0)
    if check_int("end_step", end_step) < start_step:
        raise ValueError(f"end_step must be an int >= start_step={start_step}; got {end_step}")
    check_int("every", every, 1)


def constant_sparsity(sparsity: float) -> Callable:
    """``s_t = sparsity`` for every step (SPDF's static mask). Raises ValueError outside [0, 1)."""
    _check_sparsity(sparsity, "sparsity")
    return lambda step: jnp.full((), sparsity, jnp.float32)


def geometric_sparsity(final_sparsity: float = 0.75, *, start_step: int, end_step: int,
                       every: int = 100) -> Callable:
    """Journey-Matters geometric pruning schedule.

    ``n = (end_step - start_step) // every + 1`` rounds at ``start_step + k*every``;
    ``q = 1 - (1 - s)^(1/n)``; from round k on the kept fraction is ``(1-q)^(k+1)``, so the last
    round reaches ``s`` exactly; 0 before ``start_step``. Paper: "The Journey Matters" (2025),
    reference tjingrant/sparse-llm-code ``calculate_per_step_sparsity``.
    Raises ValueError/TypeError for a sparsity outside [0, 1) or a bad window.
    """
    _check_sparsity(final_sparsity)
    _check_window(start_step, end_step, every)
    n = (end_step - start_step) // every + 1
    keep_per_round = (1.0 - final_sparsity) ** (1.0 / n)

    def schedule(step):
        step = jnp.asarray(step, jnp.int32)
        k = jnp.clip((step - start_step) // every, 0, n - 1)
        s = 1.0 - jnp.float32(keep_per_round) ** (k + 1).astype(jnp.float32)
        s = jnp.where(k == n - 1, jnp.float32(final_sparsity), s)
        return jnp.where(step < start_step, 0.0, s).astype(jnp.float32)
    return schedule


def cubic_sparsity(final_sparsity: float, *, start_step: int, end_step: int, every: int = 1,
                   initial_sparsity: float = 0.0) -> Callable:
    """Zhu & Gupta cubic schedule ``s_t = s_f + (s_i - s_f) (1 - (t - t0)/(t1 - t0))^3``.

    Evaluated at the pruning steps ``t0 + k*every`` (held in between), ``s_f`` from ``t1`` on,
    0 before ``t0``. Paper: "To prune, or not to prune" (Zhu & Gupta, 2017).
    Raises ValueError/TypeError for sparsities outside [0, 1) or a bad window.
    """
    _check_sparsity(final_sparsity)
    _check_sparsity(initial_sparsity, "initial_sparsity")
    _check_window(start_step, end_step, every)
    span = max(end_step - start_step, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.int32)
        t = jnp.clip((step - start_step) // every * every, 0, span).astype(jnp.float32)
        s = final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - t / span) ** 3
        s = jnp.where(step >= end_step, final_sparsity, s)
        return jnp.where(step < start_step, 0.0, s).astype(jnp.float32)
    return schedule


def _geometric_density(total_steps, s, start_step, end_step, every) -> np.ndarray:
    n = (end_step - start_step) // every + 1
    t = np.arange(total_steps)
    k = np.clip((t - start_step) // every, 0, n - 1)
    return np.where(t < start_step, 1.0, (1.0 - s) ** ((k + 1) / n))


def journey_window(final_sparsity: float, total_steps: int, start: float = 0.25,
                   end: float = 0.75, every: int = 100, window: str = "compute"
                   ) -> tuple[int, int]:
    """``(start_step, end_step)`` of the Journey-Matters pruning window, on the ``every`` grid.

    ``window='compute'`` (default, the paper's definition): ``start``/``end`` are fractions of
    cumulative sparse compute (proportional to the density of the pruned weights), solved by
    fixed-point iteration on the grid; sparsellm-1b-20p (20%, 11200 steps, every 100) gives
    steps 2500 -> 8100 as in the reference run. ``'steps'``: fractions of the steps (simpler,
    not the paper's). Raises ValueError for bad fractions, window, steps or every.
    """
    _check_sparsity(final_sparsity)
    start = check_fraction("start", start)
    end = check_fraction("end", end)
    if start > end:
        raise ValueError(f"need 0 <= start <= end <= 1; got start={start}, end={end}")
    check_choice("window", window, ("steps", "compute"))
    check_int("total_steps", total_steps, 1)
    check_int("every", every, 1)
    grid = np.arange(0, total_steps, every)

    def snap(frac):
        return int(grid[np.argmin(np.abs(grid - frac * total_steps))])

    st, en = snap(start), snap(end)
    if window == "steps":
        return st, en
    for _ in range(100):
        d = _geometric_density(total_steps, final_sparsity, st, en, every)
        before = np.concatenate([[0.0], np.cumsum(d)])[grid] / d.sum()
        nst = int(grid[np.argmin(np.abs(before - start))])
        nen = int(grid[np.argmin(np.abs(before - end))])
        if (nst, nen) == (st, en):
            break
        st, en = nst, max(nen, nst)
    return st, en


def journey_schedule(final_sparsity: float = 0.75, *, total_steps: int, start: float = 0.25,
                     end: float = 0.75, every: int = 100, window: str = "compute") -> Callable:
    """The paper's default: geometric pruning to ``final_sparsity`` over 25% -> 75% of training.

    Paper: "The Journey Matters" (Jin et al., 2025). ``window`` as in :func:`journey_window`
    (``'compute'`` default, the paper's cumulative-compute window; ``'steps'`` for step
    fractions). Mean density over the window -> ``-s/ln(1-s)`` as every -> 0. Raises as
    :func:`journey_window` and :func:`geometric_sparsity`.
    """
    st, en = journey_window(final_sparsity, total_steps, start, end, every, window)
    return geometric_sparsity(final_sparsity, start_step=st, end_step=en, every=every)
