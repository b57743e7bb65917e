"""Tests for jaxeff.data.dedup: exact, MinHash-LSH and embedding-cluster deduplication."""
import jax
import numpy as np
import pytest

from jaxeff.data import (exact_duplicates, kmeans, lsh_params, minhash_signatures,
                         near_duplicates, semantic_duplicates, shingle_hashes)


def _random_text(rng, n=600):
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9)))
             for _ in range(n // 5)]
    return " ".join(words)


def _perturb(text, rng, frac=0.02):
    chars = list(text)
    for i in rng.choice(len(chars), int(frac * len(chars)), replace=False):
        chars[i] = "#"
    return "".join(chars)


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    base = [_random_text(rng) for _ in range(30)]
    docs = list(base)
    dup_of = {}
    for j, src in enumerate([3, 7, 7, 12, 25]):
        dup_of[len(docs)] = src
        docs.append(_perturb(base[src], rng))
    return docs, dup_of


def test_exact_duplicates_keep_first():
    sel = exact_duplicates(["a b", "c", "a  b\n", "c", "d"])
    assert sel.kept.tolist() == [0, 1, 4] and sel.dropped.tolist() == [2, 3]
    assert exact_duplicates(["a b", "a  b"], normalize_whitespace=False).dropped.size == 0


def test_minhash_estimates_jaccard():
    rng = np.random.default_rng(1)
    a = _random_text(rng, 2000)
    b = _perturb(a, rng, 0.03)
    sa, sb = set(shingle_hashes(a).tolist()), set(shingle_hashes(b).tolist())
    true_j = len(sa & sb) / len(sa | sb)
    sig = minhash_signatures([a, b], num_perm=256)
    est = float(np.mean(sig[0] == sig[1]))
    assert abs(est - true_j) < 0.08
    np.testing.assert_array_equal(sig, minhash_signatures([a, b], num_perm=256))  # seeded


def test_minhash_finds_planted_near_duplicates_and_is_idempotent(planted):
    docs, dup_of = planted
    sel, pairs = near_duplicates(docs, threshold=0.7)
    assert set(sel.dropped.tolist()) == set(dup_of)             # exactly the planted copies
    for i, j in pairs:
        assert dup_of.get(j) == i or dup_of.get(j) == dup_of.get(i) or dup_of.get(i) == j
    kept_docs = [docs[i] for i in sel.kept]
    again, _ = near_duplicates(kept_docs, threshold=0.7)
    assert again.dropped.size == 0                               # idempotent
    b, r = lsh_params(0.7, 128)
    assert b * r <= 128 and abs((1 / b) ** (1 / r) - 0.7) < 0.1


def test_kmeans_recovers_separated_clusters():
    # shapes chosen to share one compilation with the semantic-dedup test (N <= 64, D=16, k=4)
    rng = np.random.default_rng(0)
    centers = np.eye(16)[:4] * 5
    x = np.concatenate([c + 0.3 * rng.normal(size=(15, 16)) for c in centers])
    c1, a1 = kmeans(x, 4, jax.random.key(1))
    c2, a2 = kmeans(x, 4, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
    a1 = np.asarray(a1)
    assert a1.shape == (60,) and np.asarray(c1).shape == (4, 16)
    for g in range(4):                                           # each true group: one label
        assert len(set(a1[g * 15:(g + 1) * 15].tolist())) == 1
    assert len(set(a1.tolist())) == 4


def test_semantic_duplicates_drop_near_copies_and_idempotent():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 16))
    near = x[[2, 5, 9]] + 1e-3 * rng.normal(size=(3, 16))
    emb = np.concatenate([x, near])
    sel = semantic_duplicates(emb, eps=0.01, num_clusters=4)
    assert sel.dropped.tolist() == [40, 41, 42]
    again = semantic_duplicates(emb[sel.kept], eps=0.01, num_clusters=4)
    assert again.dropped.size == 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="threshold"):
        near_duplicates(["a", "b"], threshold=1.5)
    with pytest.raises(ValueError, match="bands"):
        near_duplicates(["a", "b"], bands=0)
    with pytest.raises(ValueError, match="exactly one of docs or signatures"):
        near_duplicates()
    with pytest.raises(ValueError, match="eps"):
        semantic_duplicates(np.ones((3, 2)), eps=-1)
    with pytest.raises(ValueError, match="k must be"):
        kmeans(np.ones((3, 2)), 5, jax.random.key(0))
    with pytest.raises(ValueError, match="empty"):
        exact_duplicates([])
    with pytest.raises(TypeError,
                       match=r"docs\[0\] must be a Document, a str or a dict with a .text."):
        exact_duplicates([1, 2])


def test_plain_dicts_with_text_are_documents():
    docs = [{"text": "same words here", "url": "a.org"}, {"text": "same words here"},
            {"text": "other"}]
    sel = exact_duplicates(docs)
    assert sel.dropped.tolist() == [1]
