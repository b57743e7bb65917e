"""Tests for jaxeff.data.selection: scorers (loss, PreSelect, moment matching) and selection."""
import itertools

import grain
import jax
import numpy as np
import pytest

from jaxeff.data import ByteTokenizer, Corpus, Document
from jaxeff.data import (apply_selection, cached_scores, hashed_ngram_features, logreg_scores,
                         loss_scores, moment_matching_scores, predictive_strength,
                         preselect_labels, select_top, train_logreg)

TOK = ByteTokenizer()


def test_select_top_deterministic_monotone_and_reports():
    rng = np.random.default_rng(0)
    for trial in range(20):
        sc = rng.integers(0, 6, 50).astype(float)           # many ties
        f = rng.uniform(0.05, 1.0)
        a = select_top(sc, keep_fraction=f)
        b = select_top(sc.copy(), keep_fraction=f)
        np.testing.assert_array_equal(a.kept, b.kept)
        assert a.kept.size == int(np.ceil(f * 50 - 1e-9))
        worst_kept = sc[a.kept].min()
        assert (sc[a.dropped] <= worst_kept).all()         # monotone in the score
        assert np.array_equal(np.sort(np.concatenate([a.kept, a.dropped])), np.arange(50))
    sc = np.array([1.0, 3.0, 3.0, 2.0, 0.5])
    s = select_top(sc, keep_fraction=0.4)
    assert s.kept.tolist() == [1, 2]
    s = select_top(sc, keep_fraction=0.2)
    assert s.kept.tolist() == [1]                            # tie broken by index
    s = select_top(sc, threshold=2.0)
    assert s.kept.tolist() == [1, 2, 3] and s.report()["dropped_indices"] == [0, 4]
    s = select_top(sc, keep_fraction=0.4, higher_is_better=False)
    assert s.kept.tolist() == [0, 4]
    assert s.report()["kept_fraction"] == pytest.approx(0.4)


def test_select_errors():
    with pytest.raises(ValueError, match="keeps no document"):
        select_top([1.0, 2.0], threshold=5.0)
    with pytest.raises(ValueError, match="keeps no document"):
        select_top([1.0, 2.0], keep_fraction=0.0)
    with pytest.raises(ValueError, match="keep_fraction"):
        select_top([1.0, 2.0], keep_fraction=1.5)
    with pytest.raises(ValueError, match="exactly one"):
        select_top([1.0], keep_fraction=0.5, threshold=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        select_top([1.0])
    with pytest.raises(ValueError, match="NaN"):
        select_top([1.0, np.nan], keep_fraction=0.5)
    with pytest.raises(ValueError, match="non-empty"):
        select_top([], keep_fraction=0.5)
    with pytest.raises(ValueError, match="empty"):
        apply_selection(Corpus([Document("a", {"id": "a"})]), [])


def test_apply_selection_corpus_and_map_dataset():
    c = Corpus([Document(str(i), {"id": str(i)}) for i in range(6)], "c")
    sel = select_top([0, 5, 1, 4, 2, 3], keep_fraction=0.5)
    sub = apply_selection(c, sel)
    assert [d.text for d in sub] == ["1", "3", "5"]
    ds = apply_selection(grain.MapDataset.source(c), sel)
    assert len(ds) == 3 and [ds[i].text for i in range(3)] == ["1", "3", "5"]


def test_predictive_strength_hand_and_parity():
    bench = np.array([3.0, 2.0, 1.0])                         # model 0 is best
    losses = np.array([[1.0, 3.0, 1.0], [2.0, 2.0, 1.0], [3.0, 1.0, 1.0]])
    assert predictive_strength(losses, bench).tolist() == [3, 0, 0]
    rng = np.random.default_rng(1)
    L, s = rng.normal(size=(6, 40)), rng.normal(size=6)
    ref = np.zeros(40, int)
    for a, b in itertools.permutations(range(6), 2):
        if s[a] > s[b]:
            ref += L[a] < L[b]
    got = predictive_strength(L, s)
    np.testing.assert_array_equal(got, ref)
    assert got.min() >= 0 and got.max() <= 15
    with pytest.raises(ValueError, match="M, N"):
        predictive_strength(L[:1], s[:1])


def test_preselect_classifier_separates_document_kinds():
    code = [f"def f{i}(x):\n    return x + {i}\n" * 3 for i in range(30)]
    prose = [f"The quick brown fox number {i} jumps over the lazy dog. " * 3 for i in range(30)]
    docs = code + prose
    scores = np.array([15] * 30 + [2] * 30)                   # pretend: code predicts well
    idx, y = preselect_labels(scores, positive_fraction=0.2)
    assert y.sum() == 12 and (scores[idx[y == 1]] == 15).all() and (scores[idx[y == 0]] == 2).all()
    x = hashed_ngram_features(docs, dim=1024)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    clf = train_logreg(x[idx], y)
    logits = logreg_scores(clf, x)
    assert logits[:30].min() > logits[30:].max()             # held-out documents ranked right
    with pytest.raises(ValueError, match="spread"):
        preselect_labels(np.ones(10))
    with pytest.raises(ValueError, match="both classes"):
        train_logreg(x[:4], np.ones(4))


def test_hashed_features_deterministic_and_similar():
    a = hashed_ngram_features(["import os\nimport sys\n", "import os\nimport sys\n",
                               "import os\nimport re\n", "zzzz qqqq"])
    np.testing.assert_array_equal(a[0], a[1])
    assert a[0] @ a[2] > 0.7 and a[0] @ a[3] < 0.2


def test_moment_matching_prefers_target_cluster():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(40, 8)) + np.array([3, 0, 0, 0, 0, 0, 0, 0])
    B = rng.normal(size=(40, 8)) + np.array([0, 3, 0, 0, 0, 0, 0, 0])
    cand = np.concatenate([A, B])
    target = rng.normal(size=(20, 8)) + np.array([0, 3, 0, 0, 0, 0, 0, 0])
    sc = moment_matching_scores(cand, target)
    mu_p = cand.mean(0)
    np.testing.assert_allclose(sc, (cand - mu_p) @ (target.mean(0) - mu_p), rtol=1e-4, atol=1e-4)
    kept = select_top(sc, keep_fraction=0.5).kept
    assert (kept >= 40).mean() > 0.9
    with pytest.raises(ValueError, match="one D"):
        moment_matching_scores(cand, target[:, :4])


def test_loss_scores_parity_with_numpy_bigram():
    V = TOK.vocab_size
    table = jax.random.normal(jax.random.key(0), (V, V))

    def apply_fn(p, x):
        return p[x]                                            # bigram logits

    texts = ["hello world", "abc" * 30, "x", "def f():\n    return 1\n" * 5]
    ref_tok, ref_byte = [], []
    logp = np.asarray(jax.nn.log_softmax(table))
    for t in texts:
        ids = [TOK.bos_id] + list(t.encode()) + [TOK.eos_id]
        nll = -np.array([logp[a, b] for a, b in zip(ids[:-1], ids[1:])])
        ref_tok.append(nll.mean())
        ref_byte.append(nll.sum() / np.log(2) / (len(t.encode()) + 1))
    for bs in (1, 3):
        got = loss_scores(apply_fn, table, texts, TOK, seq_len=16, batch_size=bs,
                          max_windows=None)
        np.testing.assert_allclose(got, ref_tok, rtol=1e-5)
    got = loss_scores(apply_fn, table, texts, TOK, seq_len=16, batch_size=3, max_windows=None,
                      per="byte")
    np.testing.assert_allclose(got, ref_byte, rtol=1e-5)
    with pytest.raises(ValueError, match="per"):
        loss_scores(apply_fn, table, texts, TOK, per="word")


def test_cached_scores(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.arange(3.0)

    c = Corpus([Document("a", {"id": "a"})])
    p = str(tmp_path / "s.npz")
    a = cached_scores(p, compute, key="k1", corpus=c)
    b = cached_scores(p, compute, key="k1", corpus=c)
    np.testing.assert_array_equal(a, b)
    assert len(calls) == 1
    cached_scores(p, compute, key="k2", corpus=c)
    assert len(calls) == 2


def test_select_top_token_budget():
    sc = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    sizes = np.array([10, 10, 60, 10, 10])
    assert select_top(sc, keep_fraction=0.2, sizes=sizes).kept.tolist() == [0, 1]
    assert select_top(sc, keep_fraction=0.21, sizes=sizes).kept.tolist() == [0, 1, 2]
    assert select_top(sc, keep_fraction=1.0, sizes=sizes).kept.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="sizes"):
        select_top(sc, keep_fraction=0.5, sizes=[1, 2])


def test_scorers_sharded_over_8_devices_match_single(tmp_path):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import orbax.checkpoint as ocp
    devs = np.array(jax.devices()[:8])
    assert devs.size == 8
    mesh = Mesh(devs, ("d",))
    rng = np.random.default_rng(0)
    L, s = rng.normal(size=(4, 64)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    Ls = jax.device_put(L, NamedSharding(mesh, P(None, "d")))
    np.testing.assert_array_equal(predictive_strength(Ls, s), predictive_strength(L, s))
    c = rng.normal(size=(64, 16)).astype(np.float32)
    t = rng.normal(size=(8, 16)).astype(np.float32)
    cs = jax.device_put(c, NamedSharding(mesh, P("d", None)))
    np.testing.assert_allclose(moment_matching_scores(cs, t), moment_matching_scores(c, t),
                               rtol=1e-5, atol=1e-5)
    # the classifier parameters are plain arrays: Orbax round trip
    clf = train_logreg(c, (c[:, 0] > 0).astype(np.float32), steps=20)
    with ocp.StandardCheckpointer() as ck:
        ck.save(tmp_path / "clf", clf)
        ck.wait_until_finished()
        back = ck.restore(tmp_path / "clf", clf)
    np.testing.assert_array_equal(logreg_scores(back, c), logreg_scores(clf, c))


def test_scores_must_be_one_per_document():
    with pytest.raises(ValueError, match=r"scores must be a 1-D array .* got shape \(2, 3\)"):
        select_top(np.arange(6.0).reshape(2, 3), keep_fraction=0.5)
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        select_top(1.0, keep_fraction=0.5)
    with pytest.raises(ValueError, match=r"scores must be a 1-D array"):
        preselect_labels(np.arange(6.0).reshape(3, 2))
    with pytest.raises(ValueError, match=r"benchmark_scores must be a 1-D array .* per model"):
        predictive_strength(np.ones((2, 5)), np.ones((2, 1)))
    assert len(select_top(np.arange(6.0), keep_fraction=0.5).kept) == 3
