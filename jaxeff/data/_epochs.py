"""Epoch accounting: how often the training data has been repeated, and a token-crisis warning.

Works with the existing pipeline (``make_lm_dataset``) without changing it. One epoch of a
corpus trains on its *unique target tokens*: a document of ``n`` tokens (BOS and EOS included)
gives ``n - 1`` targets, so ``U = sum_docs (n_doc - 1)`` (exact for ``long_docs='split'`` with
first/best-fit packing; ``packing='concat'`` loses one target per row boundary). A run that has
trained on ``N`` target tokens (the sum of the batches' ``loss_mask``) has made::

    e = N / U epochs;   with per-epoch reshuffling (make_lm_dataset's default) every target
    token has been seen floor(e) or floor(e) + 1 times, and N - U tokens (when > 0) were repeats

(up to the few packed rows that straddle an epoch boundary). :class:`EpochCounter` accumulates
``N`` from the batches; :class:`CountingIterator` wraps any batch iterator, counts as it goes and
checkpoints its counts together with the inner iterator's state (``get_state``/``set_state``, the
JSON path of :class:`jaxeff.checkpoint.Checkpointer`).

Guidance (:func:`check_repetition` warns with :class:`RepeatedDataWarning` above
``max_epochs``): "To Repeat or Not To Repeat: Insights from Scaling LLM under Token-Crisis" (Xue
et al., 2023) finds multi-epoch degradation -- repeated tokens overfit, larger models degrade
more, dataset size matters more than quality, and dropout is the one regulariser that helped;
"One Epoch Is All You Need" (Komatsuzaki, 2019) recommends a single epoch over more data and
shrinking the model / number of steps instead of repeating. Deliberate repetition of a small
high-quality sub-corpus (the stability-gap mitigation of "Efficient Continual Pre-training by
Mitigating the Stability Gap", Guo et al., 2024) is the exception: raise ``max_epochs`` there.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Any, Iterator, NamedTuple, Optional

import numpy as np

from jaxeff.data._corpus import as_document
from jaxeff.data._tokenizer import validate_tokenizer

__all__ = ["RepeatedDataWarning", "EpochReport", "unique_target_tokens", "repetition_report",
           "check_repetition", "EpochCounter", "CountingIterator"]


class RepeatedDataWarning(UserWarning):
    """A training run repeats its data (more than the allowed number of epochs)."""


class EpochReport(NamedTuple):
    """``epochs = tokens / unique``; each target token seen ``min_times_seen`` or
    ``max_times_seen`` times; ``repeated_tokens = max(0, tokens - unique)`` and their share."""

    tokens: int
    unique_tokens: int
    epochs: float
    min_times_seen: int
    max_times_seen: int
    repeated_tokens: int
    repeated_fraction: float


def _count(name, v, minimum=0):
    if isinstance(v, bool) or not isinstance(v, (numbers.Integral, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {v!r}")
    return int(v)


def unique_target_tokens(corpus, tokenizer, *, add_bos: bool = True,
                         add_eos: bool = True) -> int:
    """``U = sum_docs (n_doc - 1)``: target tokens in one epoch of ``corpus`` (module docstring).

    ``n_doc = len(tokenizer.encode(text)) + add_bos + add_eos``; elements may be
    :class:`Document`, ``str``, dicts with ``'text'`` or dicts with ``'tokens'`` (already
    encoded, taken as is).

    Raises TypeError for another element type, ValueError for an invalid tokenizer or an empty
    corpus.
    """
    validate_tokenizer(tokenizer)
    extra = int(add_bos) + int(add_eos)
    total, n_docs = 0, 0
    for i, d in enumerate(corpus):
        if isinstance(d, Mapping) and "tokens" in d:
            n = int(np.asarray(d["tokens"]).size)
        else:
            n = len(tokenizer.encode(as_document(d, f"corpus[{i}]").text)) + extra
        total += max(n - 1, 0)
        n_docs += 1
    if n_docs == 0:
        raise ValueError("unique_target_tokens: the corpus is empty")
    return total


def repetition_report(tokens: int, unique_tokens: int) -> EpochReport:
    """Epoch numbers for ``tokens`` trained target tokens out of ``unique_tokens`` per epoch.

    Raises ValueError for negative ``tokens`` or non-positive ``unique_tokens``.
    """
    n = _count("tokens", tokens)
    u = _count("unique_tokens", unique_tokens, 1)
    e = n / u
    full, rest = divmod(n, u)
    return EpochReport(tokens=n, unique_tokens=u, epochs=e, min_times_seen=full,
                       max_times_seen=full + (1 if rest else 0), repeated_tokens=max(0, n - u),
                       repeated_fraction=max(0, n - u) / n if n else 0.0)


def check_repetition(tokens: int, unique_tokens: int, *, max_epochs: float = 1.0,
                     what: str = "the run") -> EpochReport:
    """:func:`repetition_report`, warning with :class:`RepeatedDataWarning` when
    ``epochs > max_epochs`` (token-crisis guidance in the message).

    Args:
      tokens: target tokens trained (or planned: steps * batch * seq_len is an upper bound).
      unique_tokens: :func:`unique_target_tokens` of the training corpus.
      max_epochs: allowed epochs (default 1.0, "One Epoch Is All You Need"); > 0.
      what: name used in the message.

    Raises ValueError for bad counts or a non-positive ``max_epochs``.
    """
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, numbers.Real) \
            or not max_epochs > 0 or math.isnan(max_epochs):
        raise ValueError(f"max_epochs must be a number > 0; got {max_epochs!r}")
    r = repetition_report(tokens, unique_tokens)
    if r.epochs > max_epochs:
        warnings.warn(
            f"{what} trains on {r.tokens:,} target tokens = {r.epochs:.2f} epochs of "
            f"{r.unique_tokens:,} unique tokens (each seen {r.min_times_seen}-"
            f"{r.max_times_seen} times; {r.repeated_fraction:.0%} of training is repeats). "
            "Repeated data degrades LLMs, more so for larger models (Xue et al., 2023, "
            "'To Repeat or Not To Repeat'); prefer more unique data or a smaller model / fewer "
            "steps ('One Epoch Is All You Need'), or add dropout if you must repeat.",
            RepeatedDataWarning, stacklevel=2)
    return r


class EpochCounter:
    """Counts trained target tokens (``sum(batch['loss_mask'])``) and batches; host-side.

    ``epochs = tokens / unique_tokens``. ``get_state()`` / ``set_state()`` use plain ints (JSON).

    Raises ValueError for a non-positive ``unique_tokens``; :meth:`update` raises ValueError for a
    batch without ``'loss_mask'`` or ``'targets'``.
    """

    def __init__(self, unique_tokens: int, *, tokens: int = 0, batches: int = 0):
        self.unique_tokens = _count("unique_tokens", unique_tokens, 1)
        self.tokens = _count("tokens", tokens)
        self.batches = _count("batches", batches)

    def update(self, batch: Mapping[str, Any]) -> int:
        """Add one batch; returns the number of target tokens it held."""
        if "loss_mask" in batch:
            n = int(round(float(np.sum(np.asarray(batch["loss_mask"], np.float64)))))
        elif "targets" in batch:
            n = int(np.asarray(batch["targets"]).size)
        else:
            raise ValueError(f"batch has neither 'loss_mask' nor 'targets' (keys: "
                             f"{sorted(batch)})")
        self.tokens += n
        self.batches += 1
        return n

    @property
    def epochs(self) -> float:
        return self.tokens / self.unique_tokens

    def report(self) -> EpochReport:
        return repetition_report(self.tokens, self.unique_tokens)

    def check(self, max_epochs: float = 1.0, what: str = "the run") -> EpochReport:
        """:func:`check_repetition` on the counts so far."""
        return check_repetition(self.tokens, self.unique_tokens, max_epochs=max_epochs,
                                what=what)

    def get_state(self) -> dict:
        return {"tokens": self.tokens, "batches": self.batches,
                "unique_tokens": self.unique_tokens}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if int(state["unique_tokens"]) != self.unique_tokens:
            raise ValueError(f"restored unique_tokens={state['unique_tokens']} differs from this "
                             f"counter's {self.unique_tokens} (a different corpus?)")
        self.tokens = _count("tokens", int(state["tokens"]))
        self.batches = _count("batches", int(state["batches"]))

    def __repr__(self) -> str:
        return (f"EpochCounter(tokens={self.tokens:,}, unique_tokens={self.unique_tokens:,}, "
                f"epochs={self.epochs:.3f})")


class CountingIterator:
    """Wrap a batch iterator: each ``next()`` also updates an :class:`EpochCounter`.

    ``get_state()`` = ``{'inner': inner.get_state() (when it has one), 'counter': ...}``, so a
    :class:`jaxeff.checkpoint.Checkpointer` saves both (as JSON) and resume continues the counts.
    With ``max_epochs`` a :class:`RepeatedDataWarning` is issued once, when the count passes it.

    Raises TypeError for a non-iterator ``iterator``.
    """

    def __init__(self, iterator: Iterator, counter: EpochCounter, *,
                 max_epochs: Optional[float] = None, what: str = "the run"):
        if not hasattr(iterator, "__next__"):
            raise TypeError(f"iterator must be an iterator (call iter(ds) first); got "
                            f"{type(iterator).__name__}")
        if not isinstance(counter, EpochCounter):
            raise TypeError(f"counter must be an EpochCounter; got {type(counter).__name__}")
        if max_epochs is not None:
            check_repetition(0, 1, max_epochs=max_epochs)  # validates max_epochs
        self.inner, self.counter = iterator, counter
        self.max_epochs, self.what = max_epochs, what
        self._warned = max_epochs is not None and counter.epochs > max_epochs

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        self.counter.update(batch)
        if self.max_epochs is not None and not self._warned \
                and self.counter.epochs > self.max_epochs:
            self._warned = True
            self.counter.check(self.max_epochs, self.what)
        return batch

    def get_state(self) -> dict:
        inner = self.inner.get_state() if hasattr(self.inner, "get_state") else None
        return {"inner": inner, "counter": self.counter.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("inner") is not None:
            if not hasattr(self.inner, "set_state"):
                raise ValueError("the saved state has an inner iterator state but the wrapped "
                                 "iterator has no set_state")
            self.inner.set_state(state["inner"])
        self.counter.set_state(state["counter"])
        self._warned = self.max_epochs is not None and self.counter.epochs > self.max_epochs
