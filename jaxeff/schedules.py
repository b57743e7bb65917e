"""Learning-rate schedules: warmup-stable-decay, Power, infinite, and re-warming.

Every constructor validates its arguments in Python and returns a pure ``optax.Schedule``
(``step -> lr``) written with ``jnp.where``: no Python branching on the step, so the schedule
jit-compiles and works on traced counts (``optax.scale_by_learning_rate``,
``optax.inject_hyperparams``). Before step 0 the value is the step-0 value; after the last step
the value stays at the final value.

optax 0.2.8 has none of these; ``optax.join_schedules`` passes each piece ``step - boundary``,
which makes re-warming from a previous final value awkward, so the phases are written out here.

Papers:
* WSD: "MiniCPM: Unveiling the Potential of Small Language Models with Scalable Training
  Strategies" (Hu et al., 2024); the 1-sqrt cooldown: "Scaling Laws and Compute-Optimal Training
  Beyond Fixed Training Durations" (Hägele et al., 2024).
* Power: "Power Scheduler: A Batch Size and Token Number Agnostic Learning Rate Scheduler"
  (Shen et al., 2024).
* Infinite: "Beyond Cosine Decay: On the effectiveness of Infinite Learning Rate Schedule for
  Continual Pre-training" (Singh et al., 2025).
* Re-warming: "Continual Pre-Training of Large Language Models: How to (re)warm your model?"
  (Gupta et al., 2023).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jaxeff._checks import check_choice, check_float

__all__ = ["decay_shape", "wsd", "power", "infinite", "rewarm", "DECAY_SHAPES"]

#: Decay shapes f(p), p in [0, 1] the fraction of the decay done: f(0) = 1, f(1) = 0.
DECAY_SHAPES = ("1-sqrt", "linear", "cosine", "exp", "inv-sqrt")

# 'exp' decays by 2**-_EXP_HALVINGS over the phase (MiniCPM's 0.5**((s-T)/T_half) with
# T_half = decay/10), shifted and rescaled so that it ends exactly at the final value.
_EXP_HALVINGS = 10.0
# 'inv-sqrt' uses g(p) = 1/sqrt(1 + _INV_SQRT_SCALE * p) - 1 (Singh et al., 2025).
_INV_SQRT_SCALE = 10.0


# ----------------------------------------------------------------------------- validation
def _number(name, value, *, min_value=None, max_value=None, strict_min=False, integer=False):
    """``jaxeff._checks.check_float`` (finite, in range); ``integer``: a whole number of steps
    (``100`` or ``100.0``), returned as an int."""
    v = check_float(name, value, min_value, max_value, min_open=strict_min)
    if integer:
        if v != int(v):
            raise ValueError(f"{name} must be a whole number of steps; got {value!r}")
        return int(v)
    return v


def _fraction(name, value):
    return _number(name, value, min_value=0.0, max_value=1.0)


def _shape(name, shape, allowed=DECAY_SHAPES):
    return check_choice(name, shape, allowed)


# ----------------------------------------------------------------------------- pieces
def decay_shape(p, shape: str = "1-sqrt"):
    """Decay factor ``f(p)`` for ``p`` in [0, 1] (clipped): ``f(0) = 1``, ``f(1) = 0``, monotone.

    Shapes: ``'1-sqrt'``: 1 - sqrt(p) (Hägele et al., 2024: 0.293 at p = 0.5);
    ``'linear'``: 1 - p; ``'cosine'``: (1 + cos(pi p)) / 2; ``'exp'``: (2^(-10 p) - 2^(-10)) /
    (1 - 2^(-10)) (MiniCPM's exponential decay with ten half-lives, shifted to end at 0);
    ``'inv-sqrt'``: 1 - g(p) / g(1) with g(p) = 1/sqrt(1 + 10 p) - 1 (Singh et al., 2025).

    Raises ``ValueError`` for an unknown ``shape``.
    """
    _shape("shape", shape)
    p = jnp.clip(jnp.asarray(p, jnp.float32), 0.0, 1.0)
    if shape == "1-sqrt":
        f = 1.0 - jnp.sqrt(p)
    elif shape == "linear":
        f = 1.0 - p
    elif shape == "cosine":
        f = 0.5 * (1.0 + jnp.cos(jnp.pi * p))
    elif shape == "exp":
        end = 2.0 ** -_EXP_HALVINGS
        f = (jnp.exp2(-_EXP_HALVINGS * p) - end) / (1.0 - end)
    else:  # inv-sqrt
        g = lambda x: 1.0 / jnp.sqrt(1.0 + _INV_SQRT_SCALE * x) - 1.0
        f = 1.0 - g(p) / g(1.0)
    # Exact end points, whatever the rounding of cos/exp/sqrt.
    return jnp.where(p >= 1.0, 0.0, jnp.where(p <= 0.0, 1.0, f))


def _interp(start, end, p, shape):
    """``end + (start - end) * f(p)``: exactly ``start`` at p=0 and exactly ``end`` at p=1."""
    f = decay_shape(p, shape)
    return jnp.where(f <= 0.0, end, jnp.where(f >= 1.0, start, end + (start - end) * f))


def _progress(step, begin, length):
    """(step - begin) / length clipped to [0, 1]; a zero-length phase counts as done."""
    if length <= 0:
        return jnp.where(step >= begin, 1.0, 0.0)
    return jnp.clip((step - begin) / float(length), 0.0, 1.0)


def _step(count):
    """The step as float32, clamped at 0: before step 0 every schedule gives its step-0 value."""
    return jnp.maximum(jnp.asarray(count, jnp.float32), 0.0)


# ----------------------------------------------------------------------------- schedules
def wsd(peak: float, total_steps: int, warmup: int, decay_fraction: float = 0.1,
        shape: str = "1-sqrt", final: float = 0.0):
    """Warmup-stable-decay (trapezoidal) schedule.

    With W = ``warmup``, D = round(``decay_fraction`` * T), T = ``total_steps``, S = T - D::

        eta(s) = peak * s / W                          for s < W
               = peak                                  for W <= s < S
               = final + (peak - final) * f((s - S) / D)  for S <= s <= T   (f: ``decay_shape``)

    so eta(W) = peak, eta(T) = final exactly, and eta stays at ``final`` after T.

    Paper: "MiniCPM: Unveiling the Potential of Small Language Models with Scalable Training
    Strategies" (Hu et al., 2024); 1-sqrt cooldown from Hägele et al. (2024).

    Args:
      peak: the stable learning rate (> 0).
      total_steps: T, steps until the end of the decay (> 0).
      warmup: W, linear warmup steps from 0 (>= 0, W + D <= T).
      decay_fraction: D / T, fraction of all steps spent decaying, in [0, 1]; default 0.1.
      shape: one of ``'1-sqrt'`` (default), ``'linear'``, ``'cosine'``, ``'exp'``, ``'inv-sqrt'``.
      final: value at the end of the decay, in [0, peak]; default 0.

    Raises:
      ValueError / TypeError naming the argument for a non-positive ``peak`` or ``total_steps``,
      negative ``warmup``, a fraction outside [0, 1], warmup longer than T - D, an unknown shape
      or ``final`` outside [0, peak].
    """
    peak = _number("peak", peak, min_value=0.0, strict_min=True)
    total = _number("total_steps", total_steps, min_value=0, strict_min=True, integer=True)
    warm = _number("warmup", warmup, min_value=0, integer=True)
    frac = _fraction("decay_fraction", decay_fraction)
    _shape("shape", shape)
    final = _number("final", final, min_value=0.0, max_value=peak)
    decay = int(round(frac * total))
    stable_end = total - decay
    if warm > stable_end:
        raise ValueError(f"warmup={warm} is longer than total_steps - decay steps = {total} - "
                         f"{decay} = {stable_end}; use warmup <= {stable_end}")

    def schedule(count):
        s = _step(count)
        up = peak * _progress(s, 0, warm)
        down = _interp(peak, final, _progress(s, stable_end, decay), shape)
        return jnp.where(s < warm, up, jnp.where(s < stable_end, peak, down))

    return schedule


def power(peak: float, batch_size: int, tokens_per_step: int, warmup: int = 0,
          total_steps: int | None = None, decay_fraction: float = 0.1, a: float = 4.6,
          b: float = -0.51, decay: str = "exp", final: float = 0.0):
    """Power scheduler: a power law in the number of tokens seen, capped at ``peak``.

    With n(s) = s * ``tokens_per_step`` tokens seen after s steps and beta = ``batch_size``
    (sequences per step)::

        eta_pow(s) = min(peak, beta * a * n(s)^b)
        eta(s) = eta_pow(W) * s / W                      for s < W          (warmup)
               = eta_pow(s)                              for W <= s < S
               = final + (eta_pow(S) - final) * f((s - S) / D)  for S <= s <= T   (final decay)

    with D = round(``decay_fraction`` * T), S = T - D. With ``total_steps=None`` there is no
    final decay (the schedule is token-number agnostic, its point). The paper pairs it with muP
    and eta_max = 0.02 (unverified); it decays exponentially at the end (shape unverified, so
    ``decay`` is a parameter).

    Paper: "Power Scheduler: A Batch Size and Token Number Agnostic Learning Rate Scheduler"
    (Shen et al., 2024).

    Args:
      peak: eta_max, the cap (> 0).
      batch_size: beta, the batch size in sequences (> 0).
      tokens_per_step: tokens per optimizer step, usually batch_size * sequence length (> 0).
      warmup: W, linear warmup steps (>= 0); default 0.
      total_steps: T, or ``None`` for no final decay; default ``None``.
      decay_fraction: D / T in [0, 1]; default 0.1 (ignored without ``total_steps``).
      a: amplitude (> 0); default 4.6.
      b: exponent (< 0); default -0.51.
      decay: shape of the final decay (see :func:`decay_shape`); default ``'exp'``.
      final: value at T, in [0, peak]; default 0.

    Raises:
      ValueError / TypeError naming the argument for non-positive ``peak``, ``batch_size``,
      ``tokens_per_step``, ``a``, non-negative ``b``, negative ``warmup``, a fraction outside
      [0, 1], warmup longer than T - D, an unknown ``decay`` shape, ``final`` outside [0, peak]
        or above the power-law value at T - D (the decay would rise).
    """
    peak = _number("peak", peak, min_value=0.0, strict_min=True)
    beta = _number("batch_size", batch_size, min_value=0, strict_min=True, integer=True)
    tps = _number("tokens_per_step", tokens_per_step, min_value=0, strict_min=True, integer=True)
    warm = _number("warmup", warmup, min_value=0, integer=True)
    a = _number("a", a, min_value=0.0, strict_min=True)
    b = _number("b", b)
    if b >= 0:
        raise ValueError(f"b must be < 0 (a decaying power law); got {b!r}")
    frac = _fraction("decay_fraction", decay_fraction)
    _shape("decay", decay)
    final = _number("final", final, min_value=0.0, max_value=peak)
    if total_steps is None:
        stable_end, dec = None, 0
    else:
        total = _number("total_steps", total_steps, min_value=0, strict_min=True, integer=True)
        dec = int(round(frac * total))
        stable_end = total - dec
        if warm > stable_end:
            raise ValueError(f"warmup={warm} is longer than total_steps - decay steps = "
                             f"{total} - {dec} = {stable_end}; use warmup <= {stable_end}")

    def eta_pow(s):
        tokens = jnp.maximum(s * float(tps), 1.0)
        return jnp.minimum(peak, beta * a * tokens ** b)

    if stable_end is not None and final > float(eta_pow(float(stable_end))):
        raise ValueError(f"final={final!r} is above the power-law value where the final decay "
                         f"starts (step {stable_end}: {float(eta_pow(float(stable_end))):.6g}), so "
                         "the 'decay' would rise; use a final at or below it")

    def schedule(count):
        s = _step(count)
        out = jnp.where(s < warm, eta_pow(float(warm)) * _progress(s, 0, warm), eta_pow(s))
        if stable_end is not None:
            down = _interp(eta_pow(float(stable_end)), final,
                           _progress(s, stable_end, dec), decay)
            out = jnp.where(s >= stable_end, down, out)
        return out

    return schedule


def infinite(peak: float, total_steps: int, warmup_end: float = 0.05,
             cooldown_end: float = 0.15, anneal_start: float = 0.8,
             eta_c: float | None = None, eta_min: float | None = None,
             cooldown: str = "cosine"):
    """Infinite schedule: warmup, cooldown to eta_c, constant eta_c, exponential anneal.

    Phase ends are fractions of T = ``total_steps``: W = warmup_end*T, C = cooldown_end*T,
    A = anneal_start*T (rounded to steps)::

        eta(s) = peak * s / W                                       s < W
               = cooldown from peak to eta_c, p = (s - W) / (C - W)  W <= s < C
                   cosine:   eta_c + (peak - eta_c) (1 + cos(pi p)) / 2
                   inv-sqrt: peak + (eta_c - peak) g(p) / g(1), g(p) = 1/sqrt(1 + 10 p) - 1
                   linear:   peak + (eta_c - peak) p
               = eta_c                                              C <= s < A
               = eta_c * exp(-ln(eta_c / eta_min) (s - A) / (T - A))   A <= s <= T

    so eta(C) = eta_c, eta(T) = eta_min exactly, and the anneal is linear in log eta. Later
    continual-pre-training tasks resume at eta_c without re-warming; the anneal branches off.
    The default phase ends (5%, 15%, 80%) and eta_c = 0.1 peak, eta_min = 0.01 peak follow a
    third-party implementation (unverified against the paper).

    Paper: "Beyond Cosine Decay: On the effectiveness of Infinite Learning Rate Schedule for
    Continual Pre-training" (Singh et al., 2025).

    Args:
      peak: eta_max (> 0).
      total_steps: T (> 0).
      warmup_end, cooldown_end, anneal_start: phase ends as fractions of T, each in [0, 1],
        non-decreasing; defaults 0.05, 0.15, 0.8.
      eta_c: the constant value, in (0, peak]; default 0.1 * peak.
      eta_min: the final value, in (0, eta_c]; default 0.01 * peak.
      cooldown: ``'cosine'`` (default), ``'inv-sqrt'`` or ``'linear'``.

    Raises:
      ValueError / TypeError naming the argument for non-positive ``peak``/``total_steps``,
      fractions outside [0, 1] or out of order, eta_c / eta_min out of range, unknown cooldown.
    """
    peak = _number("peak", peak, min_value=0.0, strict_min=True)
    total = _number("total_steps", total_steps, min_value=0, strict_min=True, integer=True)
    fw = _fraction("warmup_end", warmup_end)
    fc = _fraction("cooldown_end", cooldown_end)
    fa = _fraction("anneal_start", anneal_start)
    if fc < fw:
        raise ValueError(f"cooldown_end={fc} must be >= warmup_end={fw}")
    if fa < fc:
        raise ValueError(f"anneal_start={fa} must be >= cooldown_end={fc}")
    eta_c = 0.1 * peak if eta_c is None else eta_c
    eta_c = _number("eta_c", eta_c, min_value=0.0, strict_min=True, max_value=peak)
    eta_min = 0.01 * peak if eta_min is None else eta_min
    eta_min = _number("eta_min", eta_min, min_value=0.0, strict_min=True, max_value=eta_c)
    _shape("cooldown", cooldown, ("cosine", "inv-sqrt", "linear"))
    w, c, an = (int(round(f * total)) for f in (fw, fc, fa))
    log_ratio = math.log(eta_c / eta_min)

    def schedule(count):
        s = _step(count)
        up = peak * _progress(s, 0, w)
        cool = _interp(peak, eta_c, _progress(s, w, c - w), cooldown)
        p_anneal = _progress(s, an, total - an)
        anneal = jnp.where(p_anneal >= 1.0, eta_min, eta_c * jnp.exp(-log_ratio * p_anneal))
        return jnp.where(s < w, up, jnp.where(s < c, cool, jnp.where(s < an, eta_c, anneal)))

    return schedule


def rewarm(prev_final: float, peak: float, total_steps: int, warmup: int,
           decay: str = "cosine", final: float = 0.0, stable_fraction: float = 0.0):
    """Re-warming for continued pre-training: warm up from the previous final lr, then decay.

    With W = ``warmup``, T = ``total_steps``, S = W + round(``stable_fraction`` * (T - W))::

        eta(s) = prev_final + (peak - prev_final) * s / W          s < W
               = peak                                              W <= s < S
               = final + (peak - final) * f((s - S) / (T - S))      S <= s <= T

    Step 0 of this schedule is the first step of the new stage (its value is ``prev_final``,
    continuous with the previous stage). The paper re-warms linearly and decays with cosine.

    Paper: "Continual Pre-Training of Large Language Models: How to (re)warm your model?"
    (Gupta et al., 2023).

    Args:
      prev_final: the previous stage's final lr (>= 0, <= peak).
      peak: the new peak (> 0).
      total_steps: T, steps of the new stage (> 0).
      warmup: W, re-warming steps (>= 0, <= T).
      decay: decay shape (see :func:`decay_shape`); default ``'cosine'``.
      final: value at T, in [0, peak]; default 0.
      stable_fraction: fraction of the post-warmup steps held at ``peak``, in [0, 1]; default 0.

    Raises:
      ValueError / TypeError naming the argument for out-of-range values, warmup > T, or an
      unknown shape.
    """
    peak = _number("peak", peak, min_value=0.0, strict_min=True)
    prev_final = _number("prev_final", prev_final, min_value=0.0, max_value=peak)
    total = _number("total_steps", total_steps, min_value=0, strict_min=True, integer=True)
    warm = _number("warmup", warmup, min_value=0, integer=True)
    if warm > total:
        raise ValueError(f"warmup={warm} is longer than total_steps={total}")
    _shape("decay", decay)
    final = _number("final", final, min_value=0.0, max_value=peak)
    sf = _fraction("stable_fraction", stable_fraction)
    stable_end = warm + int(round(sf * (total - warm)))

    def schedule(count):
        s = _step(count)
        up = prev_final + (peak - prev_final) * _progress(s, 0, warm)
        down = _interp(peak, final, _progress(s, stable_end, total - stable_end), decay)
        return jnp.where(s < warm, up, jnp.where(s < stable_end, peak, down))

    return schedule
