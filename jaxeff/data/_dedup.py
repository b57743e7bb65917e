"""Redundancy reduction: exact, MinHash-LSH near-duplicate and embedding-cluster deduplication.

"Less is More: Selective Reduction of CT Data for Self-Supervised Pre-Training" (2024) removes
redundant samples by hashing and embedding similarity before pre-training; the text analogues:

* **exact**: ``sha1`` of the whitespace-normalised text; the first occurrence is kept.
* **MinHash-LSH** (Broder, 1997; near-dedup as in "Deduplicating Training Data Makes Language
  Models Better", Lee et al., 2022): shingles = UTF-8 byte ``k``-grams hashed to 64 bits;
  signature ``sig_j = min_g h_j(g)`` with multiply-shift hashes ``h_j(x) = (a_j x + b_j) >> 32``
  (``a_j`` odd); ``P[sig_j(A) = sig_j(B)] ~= J(A, B)``. LSH banding (``bands x rows = num_perm``)
  proposes pairs that agree on a whole band (``P = 1 - (1 - J^r)^b``); a pair is a duplicate if
  the signature agreement is ``>= threshold``. Duplicates form connected components (union-find)
  and each component keeps its lowest index, so the result is idempotent.
* **embedding clusters** (SemDeDup, Abbas et al., 2023): spherical k-means in JAX on
  L2-normalised embeddings, then inside each cluster a document is dropped if its cosine
  similarity to an earlier kept document of the cluster is ``> 1 - eps``.

Each returns a :class:`jaxeff.data.Selection` (kept / dropped indices) for
:func:`jaxeff.data.apply_selection`.
"""
from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff._checks import check_fraction
from jaxeff.data._selection import Selection, _texts

__all__ = ["exact_duplicates", "shingle_hashes", "minhash_signatures", "lsh_params",
           "near_duplicates", "kmeans", "semantic_duplicates"]


def _selection(keep: np.ndarray) -> Selection:
    kept = np.flatnonzero(keep)
    return Selection(kept, np.flatnonzero(~keep), float("nan"), int(keep.size))


def exact_duplicates(docs, *, normalize_whitespace: bool = True) -> Selection:
    """Drop exact duplicates (after whitespace normalisation); keep each first occurrence.

    Raises:
      ValueError: empty docs.  TypeError: elements that are not Documents / strings.
    """
    seen, keep = set(), []
    for text in _texts(docs):
        key = " ".join(text.split()) if normalize_whitespace else text
        h = hashlib.sha1(key.encode("utf-8", "surrogatepass")).digest()
        keep.append(h not in seen)
        seen.add(h)
    return _selection(np.asarray(keep))


def shingle_hashes(text: str, k: int = 5) -> np.ndarray:
    """Distinct 64-bit hashes of the UTF-8 byte ``k``-grams of ``text`` (whole text if shorter)."""
    b = np.frombuffer(text.encode("utf-8", "replace"), np.uint8).astype(np.uint64)
    if b.shape[0] == 0:
        return np.zeros(1, np.uint64)
    k = min(k, b.shape[0])
    h = np.zeros(b.shape[0] - k + 1, np.uint64)
    for j in range(k):
        h = h * np.uint64(1099511628211) + b[j:b.shape[0] - k + 1 + j]  # FNV-style, wraps
    h ^= h >> np.uint64(29)
    return np.unique(h * np.uint64(0xBF58476D1CE4E5B9))


def minhash_signatures(docs, *, num_perm: int = 128, shingle: int = 5, seed: int = 0,
                       chunk: int = 16, max_bytes: int | None = None) -> np.ndarray:
    """MinHash signatures ``uint32 [N, num_perm]`` (see the module docstring).

    ``max_bytes`` hashes only each document's leading bytes (default None = all), bounding the
    cost on very long documents.

    Raises:
      ValueError: ``num_perm`` / ``shingle`` < 1, empty docs.
    """
    if num_perm < 1 or shingle < 1:
        raise ValueError(f"num_perm and shingle must be >= 1; got {num_perm}, {shingle}")
    texts = _texts(docs)
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
    out = np.empty((len(texts), num_perm), np.uint32)
    for i, text in enumerate(texts):
        g = shingle_hashes(text if max_bytes is None else
                           text.encode("utf-8", "replace")[:max_bytes].decode("utf-8", "replace"),
                           shingle)
        for j in range(0, num_perm, chunk):
            h = (g[None, :] * a[j:j + chunk, None] + b[j:j + chunk, None]) >> np.uint64(32)
            out[i, j:j + chunk] = h.min(axis=1).astype(np.uint32)
    return out


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows <= num_perm`` whose S-curve midpoint
    ``(1 / bands) ** (1 / rows)`` is closest to ``threshold``."""
    best = None
    for r in range(1, num_perm + 1):
        bnd = num_perm // r
        err = abs((1.0 / bnd) ** (1.0 / r) - threshold)
        if best is None or err < best[0]:
            best = (err, bnd, r)
    return best[1], best[2]


class _UnionFind:
    def __init__(self, n):
        self.parent = np.arange(n)

    def find(self, x):
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, x, y):
        rx, ry = self.find(x), self.find(y)
        if rx != ry:  # the lower index becomes the root, so components keep their first member
            self.parent[max(rx, ry)] = min(rx, ry)


def near_duplicates(docs=None, *, threshold: float = 0.8, num_perm: int = 128,
                    shingle: int = 5, bands: int | None = None, seed: int = 0,
                    signatures: np.ndarray | None = None,
                    max_bytes: int | None = None) -> tuple[Selection, list[tuple]]:
    """MinHash-LSH near-duplicate removal: ``(Selection, verified duplicate pairs)``.

    Args:
      docs: Documents or strings (or give ``signatures``).
      threshold: estimated-Jaccard threshold in [0, 1] (default 0.8).
      num_perm: signature length (default 128).  shingle: byte k-gram length (default 5).
      bands: LSH bands (default from :func:`lsh_params`); rows = ``num_perm // bands``.
      seed: hash seed (default 0).  signatures: precomputed :func:`minhash_signatures`.
      max_bytes: hash only each document's leading bytes (default None = all).

    Raises:
      ValueError: ``threshold`` outside [0, 1], ``bands`` not in [1, num_perm], neither or
        both of ``docs`` / ``signatures``.
    """
    threshold = check_fraction("threshold", threshold)
    if (docs is None) == (signatures is None):
        raise ValueError("give exactly one of docs or signatures")
    sig = (minhash_signatures(docs, num_perm=num_perm, shingle=shingle, seed=seed,
                              max_bytes=max_bytes)
           if signatures is None else np.asarray(signatures, np.uint32))
    n, p = sig.shape
    if bands is None:
        bands, rows = lsh_params(threshold, p)
    else:
        if not 1 <= bands <= p:
            raise ValueError(f"bands must be in [1, num_perm={p}]; got {bands}")
        rows = p // bands
    pairs = set()
    for band in range(bands):
        buckets: dict[bytes, list[int]] = {}
        block = np.ascontiguousarray(sig[:, band * rows:(band + 1) * rows])
        for i in range(n):
            buckets.setdefault(block[i].tobytes(), []).append(i)
        for members in buckets.values():
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    pairs.add((members[x], members[y]))
    uf, verified = _UnionFind(n), []
    for i, j in sorted(pairs):
        if float(np.mean(sig[i] == sig[j])) >= threshold:
            verified.append((i, j))
            uf.union(i, j)
    keep = np.array([uf.find(i) == i for i in range(n)])
    return _selection(keep), verified


def kmeans(x, k: int, key: jax.Array, *, iters: int = 25) -> tuple[jax.Array, jax.Array]:
    """Spherical k-means in JAX: ``(centroids [k, D], assignment [N])``.

    Init: k-means++ ("k-means++: The Advantages of Careful Seeding", Arthur & Vassilvitskii,
    2007) with squared distance ``2 - 2 cos``; each iteration assigns by maximal cosine and sets
    centroids to the normalised member means (an empty cluster keeps its centroid). Jitted
    (N padded to a power of two); deterministic given ``key``.

    Raises:
      ValueError: ``k`` outside [1, N].
    """
    x = jnp.asarray(x, jnp.float32)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N={n}]; got {k}")
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    # Pad N to a power of two (zero rows add nothing to the cluster sums) so that calls with
    # nearby N share one compilation.
    n_pad = max(16, 1 << (n - 1).bit_length())
    xp = jnp.zeros((n_pad, x.shape[1]), jnp.float32).at[:n].set(x)
    c, a = _kmeans_run(xp, jnp.arange(n_pad) < n, key, k, iters)
    return c, a[:n]


@functools.partial(jax.jit, static_argnums=(3, 4))
def _kmeans_run(x, valid, key, k, iters):
    # k-means++ seeding: next centre ~ squared distance 2 - 2 cos to the nearest chosen one.
    keys = jax.random.split(key, k)
    first = jax.random.categorical(keys[0], jnp.where(valid, 0.0, -jnp.inf))
    c0 = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])

    def seed(j, c):
        chosen = jnp.arange(k) < j
        cos = jnp.where(chosen[None, :], x @ c.T, -jnp.inf).max(axis=1)
        d2 = jnp.maximum(2.0 - 2.0 * cos, 0.0)
        logits = jnp.where(valid & (d2 > 1e-12), jnp.log(jnp.maximum(d2, 1e-30)), -jnp.inf)
        logits = jnp.where(jnp.isneginf(logits).all(), jnp.where(valid, 0.0, -jnp.inf), logits)
        return c.at[j].set(x[jax.random.categorical(keys[j], logits)])

    c0 = jax.lax.fori_loop(1, k, seed, c0)

    def step(c, _):
        a = jnp.argmax(x @ c.T, axis=1)
        s = jax.ops.segment_sum(x, a, num_segments=k)
        norm = jnp.linalg.norm(s, axis=1, keepdims=True)
        return jnp.where(norm > 0, s / jnp.maximum(norm, 1e-12), c), None

    c, _ = jax.lax.scan(step, c0, None, length=iters)
    return c, jnp.argmax(x @ c.T, axis=1)


def semantic_duplicates(embeddings, *, eps: float = 0.05, num_clusters: int = 8,
                        key: jax.Array | None = None, iters: int = 25) -> Selection:
    """SemDeDup-style removal: k-means clusters, then cosine ``> 1 - eps`` to a kept earlier
    member of the same cluster drops a document (scan in index order, so the first is kept).

    Args:
      embeddings: ``[N, D]`` (e.g. :func:`jaxeff.data.hashed_ngram_features`).
      eps: in [0, 1] (default 0.05).  num_clusters: k (default 8, clipped to N).
      key: k-means key (default ``jax.random.key(0)``).  iters: k-means iterations.

    Raises:
      ValueError: ``eps`` outside [0, 1] or embeddings that are not ``[N, D]`` with N >= 1.
    """
    eps = check_fraction("eps", eps)
    x = np.asarray(embeddings, np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"embeddings must be [N, D] with N >= 1; got {x.shape}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    key = jax.random.key(0) if key is None else key
    _, assign = kmeans(x, min(num_clusters, x.shape[0]), key, iters=iters)
    assign = np.asarray(assign)
    keep = np.ones(x.shape[0], bool)
    for c in np.unique(assign):
        members = np.flatnonzero(assign == c)
        sim = x[members] @ x[members].T
        kept_local: list[int] = []
        for a in range(members.size):
            if kept_local and sim[a, kept_local].max() > 1.0 - eps:
                keep[members[a]] = False
            else:
                kept_local.append(a)
    return _selection(keep)
