"""Data selection: a scoring stage (doc -> score, batched in JAX, cacheable) and a selection stage.

Scorers (higher = keep, unless ``higher_is_better=False`` at selection):
  * :func:`loss_scores` -- mean loss per document under a reference model (any
    ``apply_fn(params, inputs_BxL) -> logits_BxLxV``), per token or per byte (bits per byte).
    Perplexity filtering (e.g. POINTS, Liu et al., 2024) keeps the lowest.
  * :func:`predictive_strength` -- PreSelect ("Predictive Data Selection: The Data That Predicts
    Is the Data That Teaches", Shum et al., 2025): with per-document normalised losses
    ``l[m, i]`` of M models and their benchmark scores ``s[m]``,
    ``S_i = #{(a, b): s_a > s_b and l[a, i] < l[b, i]}`` in ``[0, M(M-1)/2]``; then
    :func:`preselect_labels` (top-scoring documents vs an equal number of the lowest),
    :func:`train_logreg` (logistic regression in JAX on :func:`hashed_ngram_features`, in place
    of the paper's fastText) and :func:`logreg_scores` score everything cheaply.
  * :func:`moment_matching_scores` -- target-distribution-aware selection in the spirit of
    GOT-D ("Get more for less: Principled Data Selection for Warming Up Fine-Tuning in LLMs",
    Kang et al., 2024) with a **moment-matching** criterion instead of entropic OT: with
    embeddings ``x``, pre-training mean ``mu_P`` and target mean ``mu_T``, adding mass ``eps`` on
    candidate ``x_i`` changes ``MMD^2 = ||mu - mu_T||^2`` (linear kernel) at rate
    ``2 <mu_P - mu_T, x_i - mu_P>``, so ``score_i = <x_i - mu_P, mu_T - mu_P>`` (largest =
    moves the training distribution fastest toward the target).
  * redundancy: see :mod:`jaxeff.data.dedup`.

Selection (:func:`select_top`): keep a top fraction or a threshold, ties broken by index
(deterministic and monotone in the score), report what was dropped, and raise on an empty
result. :func:`apply_selection` turns it into a Corpus or a Grain ``MapDataset``.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
from typing import Callable, NamedTuple, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxeff.data._corpus import Corpus, Document, as_document, corpus_fingerprint
from jaxeff.data._mixture import check_fraction

__all__ = ["hashed_ngram_features", "loss_scores", "predictive_strength", "preselect_labels",
           "LogReg", "train_logreg", "logreg_scores", "moment_matching_scores", "Selection",
           "select_top", "apply_selection", "cached_scores"]


def _texts(docs) -> list[str]:
    out = [as_document(d, f"docs[{i}]").text for i, d in enumerate(docs)]
    if not out:
        raise ValueError("docs is empty; nothing to score")
    return out


def hashed_ngram_features(docs, *, ngrams: Sequence[int] = (1, 2, 3, 4), dim: int = 4096,
                          max_bytes: int | None = 65536) -> np.ndarray:
    """Cheap embedding: L2-normalised ``log1p`` counts of hashed UTF-8 byte n-grams.

    ``h(g) = mix(sum_j g_j 257^j) mod dim`` for every n-gram ``g`` of each length in ``ngrams``
    (the hashing trick, as in fastText's n-gram buckets); ``x = log1p(counts) / ||.||``.

    Args:
      docs: Documents or strings.  ngrams: n-gram lengths (default 1-4).
      dim: feature dimension (default 4096).  max_bytes: read at most this many leading bytes
        per document (default 65536; None = all).

    Raises:
      ValueError: empty docs, ``dim`` < 1, n-gram lengths < 1.  TypeError: bad elements.
    """
    if dim < 1 or not ngrams or min(ngrams) < 1:
        raise ValueError(f"dim must be >= 1 and ngrams lengths >= 1; got dim={dim}, "
                         f"ngrams={ngrams}")
    texts = _texts(docs)
    feats = np.zeros((len(texts), dim), np.float32)
    for i, text in enumerate(texts):
        b = np.frombuffer(text.encode("utf-8", "replace")[:max_bytes], np.uint8).astype(np.uint64)
        for n in ngrams:
            if b.shape[0] < n:
                continue
            h = np.zeros(b.shape[0] - n + 1, np.uint64)
            for j in range(n):
                h = h * np.uint64(257) + b[j:b.shape[0] - n + 1 + j] + np.uint64(1)
            h = (h + np.uint64(n)) * np.uint64(0x9E3779B97F4A7C15)  # Fibonacci mixing
            feats[i] += np.bincount((h >> np.uint64(32)) % np.uint64(dim),
                                    minlength=dim).astype(np.float32)
    feats = np.log1p(feats)
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnums=0)
def _batch_nll(apply_fn, params, inputs, targets, mask):
    logits = apply_fn(params, inputs).astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    return (nll * mask).sum(-1)


def loss_scores(apply_fn: Callable, params, docs, tokenizer, *, seq_len: int = 256,
                batch_size: int = 16, max_windows: int | None = 2, per: str = "token"
                ) -> np.ndarray:
    """Mean loss of each document under a reference model, computed in jitted batches.

    Each document ``[BOS] + tok(text) + [EOS]`` is cut into windows of ``seq_len + 1`` (stride
    ``seq_len``, at most ``max_windows``), padded to a fixed ``[batch_size, seq_len]`` so one
    compilation serves all. ``per='token'``: ``sum NLL / #targets`` (nats/token);
    ``per='byte'``: ``sum NLL / (ln 2 * #target bytes)`` (bits per byte, PreSelect's
    normalisation; ``#target bytes`` = UTF-8 bytes of the decoded targets, EOS counts as 1).

    Args:
      apply_fn: ``(params, inputs int32[B, L]) -> logits [B, L, V]`` (causal).
      params: its parameters.  docs: Documents or strings.  tokenizer: a Tokenizer.
      seq_len, batch_size: window length and batch size (defaults 256, 16).
      max_windows: windows per document (default 2; None = the whole document).
      per: 'token' (default) or 'byte'.

    Raises:
      ValueError: bad ``per`` / sizes, empty docs.
    """
    if per not in ("token", "byte"):
        raise ValueError(f"per must be 'token' or 'byte'; got {per!r}")
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1; got {seq_len}, {batch_size}")
    texts = _texts(docs)
    rows, owner, nbytes = [], [], []
    for i, text in enumerate(texts):
        t = np.concatenate([[tokenizer.bos_id], np.asarray(tokenizer.encode(text), np.int64),
                            [tokenizer.eos_id]]).astype(np.int32)
        starts = list(range(0, max(t.shape[0] - 1, 1), seq_len))[:max_windows]
        for s in starts:
            w = t[s:s + seq_len + 1]
            rows.append(w)
            owner.append(i)
            if per == "byte":
                tg = w[1:]
                nbytes.append(len(tokenizer.decode(tg).encode("utf-8"))
                              + int((tg == tokenizer.eos_id).sum()))

    sums = np.zeros(len(texts))
    counts = np.zeros(len(texts))
    pad = int(tokenizer.pad_id)
    for b0 in range(0, len(rows), batch_size):
        chunk = rows[b0:b0 + batch_size]
        inp = np.full((batch_size, seq_len), pad, np.int32)
        tgt = np.full((batch_size, seq_len), pad, np.int32)
        msk = np.zeros((batch_size, seq_len), np.float32)
        for r, w in enumerate(chunk):
            n = w.shape[0] - 1
            inp[r, :n], tgt[r, :n], msk[r, :n] = w[:-1], w[1:], 1.0
        out = np.asarray(_batch_nll(apply_fn, params, inp, tgt, msk))
        for r, w in enumerate(chunk):
            sums[owner[b0 + r]] += out[r]
            counts[owner[b0 + r]] += w.shape[0] - 1
    if per == "byte":
        counts = np.zeros(len(texts))
        np.add.at(counts, np.asarray(owner), np.asarray(nbytes, np.float64))
        return (sums / np.maximum(counts, 1) / math.log(2)).astype(np.float32)
    return (sums / np.maximum(counts, 1)).astype(np.float32)


@jax.jit
def _strength(losses_MxN, bench_M):
    better = bench_M[:, None] > bench_M[None, :]                       # a beats b on benchmark
    lower = losses_MxN[:, None, :] < losses_MxN[None, :, :]            # a has lower loss on doc
    return jnp.sum(better[..., None] & lower, axis=(0, 1)).astype(jnp.int32)


def predictive_strength(losses, benchmark_scores) -> np.ndarray:
    """PreSelect score per document: model pairs whose loss order matches the benchmark order.

    ``S_i = sum_{a, b: s_a > s_b} [l_{a,i} < l_{b,i}]``, in ``[0, M(M-1)/2]`` (equal benchmark
    scores form no pair; equal losses do not count).

    Args:
      losses: ``[M, N]`` normalised losses (e.g. bits per byte) of M models on N documents.
      benchmark_scores: ``[M]`` (higher = better model).

    Raises:
      ValueError: shapes that disagree, fewer than 2 models, non-finite values.
    """
    l = np.asarray(losses, np.float32)
    s = _scores_1d(benchmark_scores, "benchmark_scores", "model").astype(np.float32)
    if l.ndim != 2 or l.shape[0] != s.shape[0] or l.shape[0] < 2:
        raise ValueError(f"losses must be [M, N] with M = len(benchmark_scores) >= 2; got "
                         f"{l.shape} and {s.shape}")
    if not (np.isfinite(l).all() and np.isfinite(s).all()):
        raise ValueError("losses and benchmark_scores must be finite")
    return np.asarray(_strength(jnp.asarray(l), jnp.asarray(s)))


def _scores_1d(scores, name: str = "scores", per: str = "document") -> np.ndarray:
    """``scores`` as a 1-D float64 array; a 2-D (or 0-D) input raises instead of flattening."""
    sc = np.asarray(scores, np.float64)
    if sc.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array with one score per {per}; got shape "
                         f"{sc.shape} (reduce to one score per {per} first, e.g. "
                         f".mean(axis=-1))")
    return sc


def preselect_labels(scores, *, positive_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Training set for the cheap classifier: ``(indices, labels)``.

    Positives: documents with the maximal score, or the top ``positive_fraction`` if more
    (PreSelect uses the score-15 documents of 15 pairs); negatives: an equal number of the
    lowest-scoring documents (ties by index). Positives and negatives never overlap.

    Raises:
      ValueError: fewer than 2 documents, a fraction outside (0, 1], or no score spread.
    """
    sc = _scores_1d(scores)
    f = check_fraction("positive_fraction", positive_fraction)
    if sc.shape[0] < 2 or f == 0.0:
        raise ValueError(f"need >= 2 scores and positive_fraction > 0; got {sc.shape[0]}, {f}")
    order = np.lexsort((np.arange(sc.shape[0]), -sc))           # best first, ties by index
    n_top = int((sc == sc.max()).sum())
    k = max(1, min(n_top, int(math.ceil(f * sc.shape[0])), sc.shape[0] // 2))
    pos, neg = order[:k], order[::-1][:k]
    if sc[pos].min() <= sc[neg].max():
        raise ValueError("scores do not separate positives from negatives (no spread)")
    idx = np.concatenate([pos, neg])
    return idx, np.concatenate([np.ones(k, np.float32), np.zeros(k, np.float32)])


class LogReg(NamedTuple):
    """Logistic-regression parameters: ``p(keep | x) = sigmoid(x @ w + b)``."""

    w: jax.Array
    b: jax.Array


def train_logreg(features, labels, *, l2: float = 1e-3, steps: int = 300,
                 learning_rate: float = 0.1) -> LogReg:
    """Full-batch logistic regression (Adam, ``steps`` iterations, L2 ``l2``), jitted in JAX.

    ``min_w,b mean(softplus(-y' (x w + b))) + l2 ||w||^2`` with ``y' = 2y - 1``. Deterministic
    (zero initialisation). The paper's fastText classifier is replaced by this to stay in JAX.

    Raises:
      ValueError: shape mismatch, labels not in {0, 1}, a single class.
    """
    x = jnp.asarray(features, jnp.float32)
    y = np.asarray(labels, np.float32).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"features [N, D] and labels [N] must agree; got {x.shape}, {y.shape}")
    if not np.isin(y, (0.0, 1.0)).all() or len(np.unique(y)) < 2:
        raise ValueError("labels must be 0/1 and contain both classes")
    return _fit_logreg(x, jnp.asarray(2 * y - 1), jnp.float32(l2), int(steps),
                       float(learning_rate))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _fit_logreg(x, ys, l2, steps, learning_rate):
    tx = optax.adam(learning_rate)

    def loss(p):
        return jnp.mean(jax.nn.softplus(-ys * (x @ p.w + p.b))) + l2 * jnp.sum(p.w ** 2)

    def body(carry, _):
        p, st = carry
        u, st = tx.update(jax.grad(loss)(p), st, p)
        return (optax.apply_updates(p, u), st), None

    params = LogReg(jnp.zeros(x.shape[1]), jnp.zeros(()))
    (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
    return params


@jax.jit
def _logits(params, x):
    return x @ params.w + params.b


def logreg_scores(params: LogReg, features, *, batch_size: int = 4096) -> np.ndarray:
    """Logits ``x @ w + b`` of every document, in jitted batches."""
    x = np.asarray(features, np.float32)
    return np.concatenate([np.asarray(_logits(params, x[i:i + batch_size]))
                           for i in range(0, x.shape[0], batch_size)]) if len(x) else \
        np.zeros(0, np.float32)


@jax.jit
def _moment_scores(c, t, r):
    mu_p = r.mean(0)
    return (c - mu_p) @ (t.mean(0) - mu_p)


def moment_matching_scores(candidates, target, reference=None) -> np.ndarray:
    """Target-aware score ``<x_i - mu_P, mu_T - mu_P>`` (see the module docstring).

    Args:
      candidates: ``[N, D]`` embeddings of the candidate pool.
      target: ``[M, D]`` embeddings of the target set (mu_T = their mean).
      reference: ``[K, D]`` embeddings of the current training distribution (mu_P; default the
        candidate pool).

    Raises:
      ValueError: empty sets or mismatched dimensions.
    """
    c = jnp.asarray(candidates, jnp.float32)
    t = jnp.asarray(target, jnp.float32)
    r = c if reference is None else jnp.asarray(reference, jnp.float32)
    if c.ndim != 2 or t.ndim != 2 or r.ndim != 2 or 0 in (c.shape[0], t.shape[0], r.shape[0]) \
            or not c.shape[1] == t.shape[1] == r.shape[1]:
        raise ValueError(f"candidates, target, reference must be non-empty [*, D] with one D; "
                         f"got {c.shape}, {t.shape}, {r.shape}")
    return np.asarray(_moment_scores(c, t, r))


class Selection(NamedTuple):
    """Result of a selection stage: kept / dropped indices (sorted) and the cut score."""

    kept: np.ndarray
    dropped: np.ndarray
    threshold: float
    num_total: int

    def report(self) -> dict:
        """``{'kept', 'dropped', 'kept_fraction', 'threshold', 'dropped_indices'}``."""
        return {"kept": int(self.kept.size), "dropped": int(self.dropped.size),
                "kept_fraction": self.kept.size / max(self.num_total, 1),
                "threshold": float(self.threshold),
                "dropped_indices": self.dropped.tolist()}


def select_top(scores, *, keep_fraction: float | None = None, threshold: float | None = None,
               higher_is_better: bool = True, sizes=None) -> Selection:
    """Keep the best ``keep_fraction`` of the documents or those past ``threshold``.

    Order: score (best first), then index, so the result is deterministic and monotone: if
    ``i`` is kept, every document with a strictly better score is kept. ``keep_fraction`` keeps
    ``ceil(f N)`` documents, or with ``sizes`` (e.g. token counts) the shortest best-first
    prefix whose total size reaches ``f * sum(sizes)`` (a token budget).

    Raises:
      ValueError: both or neither of ``keep_fraction`` / ``threshold``, a fraction outside
        [0, 1], scores that are not 1-D (one per document; a 2-D array is not flattened), NaN
        scores, negative or mis-shaped ``sizes``, or an empty result (nothing is silently
        dropped).
    """
    sc = _scores_1d(scores)
    if sizes is not None:
        sizes = np.asarray(sizes, np.float64)
        if sizes.shape != sc.shape or (sizes < 0).any():
            raise ValueError(f"sizes must be {sc.shape[0]} non-negative numbers; got shape "
                             f"{sizes.shape}")
    if (keep_fraction is None) == (threshold is None):
        raise ValueError("give exactly one of keep_fraction or threshold; got "
                         f"keep_fraction={keep_fraction!r}, threshold={threshold!r}")
    if sc.size == 0 or np.isnan(sc).any():
        raise ValueError(f"scores must be non-empty and free of NaN; got {sc.size} scores with "
                         f"{int(np.isnan(sc).sum())} NaN")
    signed = sc if higher_is_better else -sc
    order = np.lexsort((np.arange(sc.size), -signed))
    if keep_fraction is not None:
        f = check_fraction("keep_fraction", keep_fraction)
        if sizes is None:
            k = int(math.ceil(f * sc.size - 1e-9))
        else:
            total = f * sizes.sum()
            k = 0 if total <= 0 else min(sc.size, int(np.searchsorted(
                np.cumsum(sizes[order]), total * (1 - 1e-12)) + 1))
        kept = order[:k]
        cut = float(sc[order[k - 1]]) if k else float("nan")
    else:
        t = float(threshold)
        kept = np.flatnonzero(signed >= (t if higher_is_better else -t))
        cut = t
    if kept.size == 0:
        raise ValueError(f"selection keeps no document (keep_fraction={keep_fraction!r}, "
                         f"threshold={threshold!r}, best score {sc[order[0]]:.4g}); refusing to "
                         "return an empty dataset")
    kept = np.sort(kept)
    return Selection(kept, np.setdiff1d(np.arange(sc.size), kept), cut, int(sc.size))


class _IndexMap(grain.transforms.DatasetSelectionMap):
    def __init__(self, indices):
        self.indices = np.asarray(indices, np.int64)

    def __len__(self):
        return int(self.indices.size)

    def __getitem__(self, i):
        return 0, int(self.indices[i])


def apply_selection(data, selection: Selection | Sequence[int]):
    """The kept elements: a :class:`Corpus` for a Corpus / sequence, a ``MapDataset`` for one.

    Raises:
      ValueError: an empty selection or an index out of range.
    """
    idx = np.asarray(selection.kept if isinstance(selection, Selection) else selection,
                     np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError("apply_selection: the selection is empty")
    n = len(data)
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"selection indices must be in [0, {n}); got [{idx.min()}, {idx.max()}]")
    if isinstance(data, grain.MapDataset):
        return grain.MapDataset.select_from_datasets([data], _IndexMap(idx))
    name = getattr(data, "name", "corpus")
    return Corpus([data[int(i)] for i in idx], f"{name}:selected{idx.size}")


def cached_scores(path: str, compute: Callable[[], np.ndarray], *, key: str = "",
                  corpus=None) -> np.ndarray:
    """Load scores from ``path`` (``.npz``) if its key matches, else compute and save them.

    The cache key is ``sha256(key + corpus_fingerprint(corpus))`` (the fingerprint only when
    ``corpus`` is given), so changed data or scorer settings recompute.

    Raises:
      ValueError: ``compute`` returns something that is not a 1-D array.
    """
    h = hashlib.sha256(key.encode())
    if corpus is not None:
        h.update(corpus_fingerprint(corpus).encode())
    digest = h.hexdigest()
    if os.path.exists(path):
        with np.load(path) as z:
            if str(z["key"]) == digest:
                return z["scores"]
    scores = np.asarray(compute())
    if scores.ndim != 1:
        raise ValueError(f"compute() must return a 1-D score array; got shape {scores.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, scores=scores, key=np.asarray(digest))
    os.replace(tmp, path)
    return scores
