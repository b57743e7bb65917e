"""Multigrid shape schedules: (batch size, sequence length) per step at constant tokens per step.

"A Multigrid Method for Efficiently Training Video Models" (Wu et al., CVPR 2020) trains on a
schedule of smaller clips with proportionally larger batches (``B T S^2`` constant) and scales
the learning rate with the batch size (``lr ∝ B``). The language-model analogue schedules the
sequence length ``L_s = f_s L`` with ``B_s = B L / L_s`` so every step sees ``B L`` tokens:

    long cycle (repeated ``num_cycles`` times over the first ``1 - final_fraction`` of steps):
        shapes (B / f, f L) for f in seq_factors, each for an equal number of steps
        (the reference gives every long-cycle shape the same number of iterations)
    final phase: the base shape (B, L)
    lr scale:  'linear' B_s / B (paper), 'sqrt' sqrt(B_s / B) or 'none'

:class:`MultigridSchedule` is also a prefix-count ``DatasetSelectionMap`` ``step -> (shape,
k-th step of that shape)``; :func:`make_multigrid_dataset` routes one packed pipeline per
distinct shape through :class:`jaxeff.data.SelectIterDataset`, so batch ``s`` has
shape ``[B_s, L_s]`` and the iterator state (step, per-shape cursors and pipelines) resumes in
the right stage. The loop recompiles once per distinct shape (``len(seq_factors)`` at most + 1).
Each shape's pipeline reads the corpus with its own seed (``seed + j``), so a document can
appear in two shapes' streams within one epoch.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import grain
import jax.numpy as jnp
import numpy as np

from jaxeff._checks import check_fraction, check_int
from jaxeff.data._mixture import SelectIterDataset
from jaxeff.data._pipeline import make_lm_dataset

__all__ = ["Stage", "MultigridSchedule", "make_multigrid_dataset", "LR_SCALINGS"]

LR_SCALINGS = ("linear", "sqrt", "none")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: steps ``[start, stop)`` at shape ``(batch_size, seq_len)`` with ``lr_scale``;
    ``shape_index`` identifies the shape (and its data pipeline)."""

    start: int
    stop: int
    batch_size: int
    seq_len: int
    lr_scale: float
    shape_index: int




class MultigridSchedule(grain.transforms.DatasetSelectionMap):
    """A multigrid long-cycle schedule over ``(batch_size, seq_len)``; see the module docstring.

    Args:
      batch_size: base B.  seq_len: base L.  total_steps: steps of the whole run.
      seq_factors: long-cycle length factors f in (0, 1] (default (0.25, 0.5, 1.0)); each
        ``f L`` must be an int and ``B L / (f L)`` an int.
      num_cycles: long cycles (default 1).
      final_fraction: steps at the base shape at the end, in [0, 1] (default 0.2).
      lr_scaling: 'linear' (default; the paper's ``lr ∝ B``), 'sqrt' or 'none'.

    Raises:
      ValueError: non-integer shapes, factors outside (0, 1], a fraction outside [0, 1], an
        unknown ``lr_scaling``, or fewer steps than stages.
    """

    def __init__(self, batch_size: int, seq_len: int, total_steps: int, *,
                 seq_factors: Sequence[float] = (0.25, 0.5, 1.0), num_cycles: int = 1,
                 final_fraction: float = 0.2, lr_scaling: str = "linear"):
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.total_steps = check_int("total_steps", total_steps, 1)
        num_cycles = check_int("num_cycles", num_cycles, 1)
        final_fraction = check_fraction("final_fraction", final_fraction)
        if lr_scaling not in LR_SCALINGS:
            raise ValueError(f"lr_scaling must be one of {LR_SCALINGS}; got {lr_scaling!r}")
        if len(seq_factors) == 0:
            raise ValueError("seq_factors must not be empty")
        tokens = self.batch_size * self.seq_len
        shapes = []  # distinct (B_s, L_s, lr_scale), base shape included
        plan = []
        for f in seq_factors:
            if not (isinstance(f, (int, float)) and 0 < f <= 1):
                raise ValueError(f"seq_factors entries must be in (0, 1]; got {f!r}")
            L_s = f * self.seq_len
            if abs(L_s - round(L_s)) > 1e-9 or round(L_s) < 1 or tokens % round(L_s):
                raise ValueError(f"seq factor {f} gives seq_len {L_s} and batch "
                                 f"{tokens}/{L_s}; both must be integers")
            plan.append((tokens // round(L_s), int(round(L_s))))
        scale = {"linear": lambda r: r, "sqrt": math.sqrt, "none": lambda r: 1.0}[lr_scaling]

        def shape_index(b, l):
            key = (b, l, float(scale(b / self.batch_size)))
            if key not in shapes:
                shapes.append(key)
            return shapes.index(key)

        main = int(round((1.0 - final_fraction) * self.total_steps))
        n_stages = num_cycles * len(plan)
        if main and main < n_stages:
            raise ValueError(f"{main} multigrid steps cannot hold {n_stages} stages; raise "
                             "total_steps or lower num_cycles / final_fraction")
        stages, start = [], 0
        for j in range(n_stages if main else 0):
            stop = (j + 1) * main // n_stages
            b, l = plan[j % len(plan)]
            stages.append(Stage(start, stop, b, l, float(scale(b / self.batch_size)),
                                shape_index(b, l)))
            start = stop
        if start < self.total_steps:
            b, l = self.batch_size, self.seq_len
            stages.append(Stage(start, self.total_steps, b, l, 1.0, shape_index(b, l)))
        # Merge neighbours with the same shape (e.g. the last factor 1.0 and the final phase).
        merged = [stages[0]]
        for s in stages[1:]:
            if s.shape_index == merged[-1].shape_index:
                merged[-1] = dataclasses.replace(merged[-1], stop=s.stop)
            else:
                merged.append(s)
        self.stages = tuple(merged)
        self.shapes = tuple((b, l) for b, l, _ in shapes)
        self.lr_scaling = lr_scaling
        self._starts = np.array([s.start for s in self.stages])
        self._scales = np.array([s.lr_scale for s in self.stages], np.float32)

    # -- queries ----------------------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def num_domains(self) -> int:  # the number of pipelines, for SelectIterDataset's check
        return len(self.shapes)

    def stage(self, step: int) -> Stage:
        """The stage of ``step`` (steps past the end stay in the last stage)."""
        return self.stages[int(np.searchsorted(self._starts, step, side="right")) - 1]

    def shape(self, step: int) -> tuple[int, int]:
        """``(batch_size, seq_len)`` at ``step``."""
        s = self.stage(step)
        return s.batch_size, s.seq_len

    def lr_scale(self, step):
        """The learning-rate multiplier at ``step``; jit-traceable (an optax schedule)."""
        idx = jnp.searchsorted(jnp.asarray(self._starts), step, side="right") - 1
        return jnp.asarray(self._scales)[idx]

    def scale_schedule(self, schedule):
        """``step -> schedule(step) * lr_scale(step)``: wrap a base optax schedule (or float)."""
        if callable(schedule):
            return lambda step: schedule(step) * self.lr_scale(step)
        return lambda step: schedule * self.lr_scale(step)

    # -- DatasetSelectionMap: step -> (shape, k-th step at that shape) ----------------------
    def __len__(self) -> int:
        return self.total_steps

    def __getitem__(self, step: int) -> tuple[int, int]:
        step = int(step)
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} out of range [0, {self.total_steps})")
        cur = self.stage(step)
        k = step - cur.start + sum(s.stop - s.start for s in self.stages
                                   if s.shape_index == cur.shape_index and s.stop <= cur.start)
        return cur.shape_index, k

    def __repr__(self) -> str:
        body = ", ".join(f"[{s.start},{s.stop}): {s.batch_size}x{s.seq_len} lr*{s.lr_scale:g}"
                         for s in self.stages)
        return f"MultigridSchedule({body})"


def make_multigrid_dataset(corpus, tokenizer, schedule: MultigridSchedule, *, seed: int,
                           **lm_kwargs: Any) -> grain.IterDataset:
    """Batches whose shape follows ``schedule``: batch ``s`` is ``[B_s, L_s]``.

    One :func:`make_lm_dataset` per distinct shape (seed ``seed + j`` for shape ``j``), routed
    by the schedule; ends after ``schedule.total_steps`` batches.

    Raises:
      TypeError: ``schedule`` is not a :class:`MultigridSchedule`.
      ValueError: invalid pipeline arguments.
    """
    if not isinstance(schedule, MultigridSchedule):
        raise TypeError(f"schedule must be a MultigridSchedule; got {type(schedule).__name__}")
    parents = [make_lm_dataset(corpus, tokenizer, l, b, seed=seed + j, **lm_kwargs)
               for j, (b, l) in enumerate(schedule.shapes)]
    return SelectIterDataset(parents, schedule)
