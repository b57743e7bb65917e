"""Tests for jaxeff.data.objectives: span corruption, UL2, prefix LM, MLM and their pipelines."""
import json

import grain
import numpy as np
import pytest

from jaxeff.data import ByteTokenizer, Corpus, Document
from jaxeff.data import (BYTE_UL2_MODE_IDS, BYTE_UL2_SENTINELS, Denoiser, MLMTransform,
                         UL2Transform, decoder_only, make_ul2_dataset, max_chunk_len, mlm_mask,
                         prefix_lm_split, random_spans_noise_mask, span_corrupt, span_reconstruct,
                         ul2_denoisers, ul2_example)

TOK = ByteTokenizer()
SENT = BYTE_UL2_SENTINELS


def _text_tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n).astype(np.int32)


@pytest.mark.parametrize("mu,r", [(3, 0.15), (8, 0.15), (3, 0.5), (64, 0.15), (64, 0.5)])
def test_span_corruption_counts_and_reconstruction(mu, r):
    n = 512
    t = _text_tokens(n)
    for seed in range(5):
        mask = random_spans_noise_mask(n, r, mu, seed)
        n_noise = int(mask.sum())
        assert n_noise == round(r * n)
        starts = int((mask & ~np.concatenate([[False], mask[:-1]])).sum())
        assert starts == max(1, round(n_noise / mu))                # n_spans spans
        inp, tgt = span_corrupt(t, seed, rate=r, mean_span=mu, sentinel_ids=SENT,
                                reuse_sentinels=starts > len(SENT))
        assert np.isin(inp, SENT).sum() == np.isin(tgt, SENT).sum() == starts
        # sentinels consistent: the k-th sentinel of inputs equals the k-th of targets
        np.testing.assert_array_equal(inp[np.isin(inp, SENT)], tgt[np.isin(tgt, SENT)])
        assert tgt[0] in SENT
        np.testing.assert_array_equal(span_reconstruct(inp, tgt, SENT), t)
        assert len(inp) + len(tgt) == n + 2 * starts


def test_noise_fraction_with_many_lengths():
    fr = [random_spans_noise_mask(n, 0.15, 3, n).mean() for n in range(40, 400, 7)]
    assert abs(np.mean(fr) - 0.15) < 0.01


def test_prefix_lm_split():
    t = _text_tokens(100)
    a, b = prefix_lm_split(t, 0, 0.25)
    assert len(b) == 25 and np.array_equal(np.concatenate([a, b]), t)
    splits = [len(prefix_lm_split(t, s)[0]) for s in range(200)]
    assert min(splits) >= 1 and max(splits) <= 99 and 35 < np.mean(splits) < 65


def test_ul2_example_and_decoder_only():
    t = _text_tokens(300)
    den = ul2_denoisers()
    picks = []
    for s in range(350):
        ex = ul2_example(t, s)
        d = den[int(ex["denoiser"])]
        picks.append(int(ex["denoiser"]))
        assert ex["inputs"][0] == d.mode_id == ex["mode"]
        if d.kind == "prefix":
            np.testing.assert_array_equal(np.concatenate([ex["inputs"][1:], ex["targets"]]), t)
        else:
            np.testing.assert_array_equal(span_reconstruct(ex["inputs"][1:], ex["targets"], SENT),
                                          t)
    counts = np.bincount(picks, minlength=7)
    assert counts.min() > 25   # uniform over 7 denoisers: 50 expected each
    dec = decoder_only(np.array([1, 2, 3]), np.array([4, 5]))
    assert dec["tokens"].tolist() == [1, 2, 3, 4, 5]
    assert dec["loss_mask"].tolist() == [0, 0, 0, 1, 1]


def test_ul2_weights_select_denoiser():
    t = _text_tokens(64)
    ex = [int(ul2_example(t, s, weights=[0, 0, 0, 0, 0, 0, 1])["denoiser"]) for s in range(20)]
    assert set(ex) == {6}


def test_mlm_rate_and_replacement_split():
    t = _text_tokens(40000, 1)
    out = mlm_mask(t, 3, rate=0.3, mask_id=259, vocab_size=256)
    sel = out["loss_mask"] > 0
    assert abs(sel.mean() - 0.3) < 0.01
    masked = (out["inputs"] == 259) & sel
    same = (out["inputs"] == t) & sel
    assert abs(masked.sum() / sel.sum() - 0.8) < 0.02
    assert 0.08 < same.sum() / sel.sum() < 0.13           # 10% kept + random hits of itself
    np.testing.assert_array_equal(out["inputs"][~sel], t[~sel])
    np.testing.assert_array_equal(out["targets"], t)
    again = mlm_mask(t, 3, rate=0.3, mask_id=259, vocab_size=256)
    np.testing.assert_array_equal(again["inputs"], out["inputs"])  # pure in (tokens, seed)


def test_mlm_specials_and_packed_rows():
    t = np.array([257] + list(range(60)) + [258] * 3, np.int32)
    out = mlm_mask(t, 0, rate=1.0, mask_id=259, vocab_size=264, special_ids=(257, 258))
    assert out["loss_mask"][0] == 0 and out["loss_mask"][-3:].sum() == 0
    assert out["loss_mask"][1:61].all()
    row = {"inputs": np.arange(8, dtype=np.int32)[None].repeat(2, 0),
           "segment_ids": np.array([[1, 1, 1, 2, 2, 0, 0, 0]] * 2, np.int32),
           "positions": np.zeros((2, 8), np.int32)}
    ds = grain.MapDataset.source([row] * 3).random_map(
        MLMTransform(rate=1.0, mask_id=259, vocab_size=264), seed=0)
    o = ds[1]
    assert o["loss_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]] * 2
    np.testing.assert_array_equal(o["targets"], row["inputs"])
    assert "positions" in o
    np.testing.assert_array_equal(ds[1]["inputs"], o["inputs"])   # deterministic per index


def test_ul2_pipeline_rows_and_resume():
    docs = Corpus([Document("".join(chr(97 + (i * j) % 26) for j in range(90 + 13 * i)),
                            {"id": str(i), "domain": "x"}) for i in range(12)], "c")
    ds = make_ul2_dataset(docs, TOK, 64, 2, seed=0, shard=(0, 1), num_packing_bins=2)
    it = iter(ds)
    modes = set(BYTE_UL2_MODE_IDS.values())
    for _ in range(3):
        b = next(it)
        for r in range(2):
            seg, inp = b["segment_ids"][r], b["inputs"][r]
            for s in np.unique(seg[seg > 0]):
                assert inp[seg == s][0] in modes       # every packed example starts with a mode
        assert b["loss_mask"].sum() > 0
    state = json.loads(json.dumps(it.get_state()))
    expect = [next(it) for _ in range(3)]
    it2 = iter(ds)
    it2.set_state(state)
    for e in expect:
        np.testing.assert_array_equal(next(it2)["inputs"], e["inputs"])
    assert max_chunk_len(65, ul2_denoisers()) <= 64


def test_bad_inputs():
    t = _text_tokens(50)
    with pytest.raises(ValueError, match="rate"):
        random_spans_noise_mask(50, 1.5, 3, 0)
    with pytest.raises(ValueError, match="mean_span"):
        random_spans_noise_mask(50, 0.15, 0.5, 0)
    with pytest.raises(ValueError, match="sentinel"):
        span_corrupt(np.array([1, 2, 262, 4]), 0, rate=0.5, mean_span=1, sentinel_ids=SENT)
    with pytest.raises(ValueError, match="rate"):
        mlm_mask(t, 0, rate=-0.1, mask_id=259, vocab_size=264)
    with pytest.raises(ValueError, match="weights"):
        ul2_example(t, 0, weights=[0] * 7)
    with pytest.raises(ValueError, match="weights"):
        UL2Transform(weights=[1, 2])
    with pytest.raises(ValueError, match="kind"):
        Denoiser("bad", 259, 0.1, kind="mlm")
    with pytest.raises(ValueError, match="2 tokens"):
        prefix_lm_split(np.array([1]), 0)
    with pytest.raises(TypeError, match="rng"):
        prefix_lm_split(t, "seed")
    with pytest.raises(ValueError, match="too short"):
        max_chunk_len(3, ul2_denoisers())


def test_mlm_transform_validates_at_construction():
    with pytest.raises(ValueError, match="mask_prob"):
        MLMTransform(rate=0.3, mask_id=259, vocab_size=264, mask_prob=0.95, random_prob=0.1)
    with pytest.raises(ValueError, match="rate"):
        MLMTransform(rate=2.0, mask_id=259, vocab_size=264)


def test_span_corrupt_raises_when_spans_outnumber_sentinels():
    t = _text_tokens(400)
    with pytest.raises(ValueError, match=r"makes 20 spans but sentinel_ids has 1 id\(s\).*"
                                         r"reuse_sentinels=True"):
        span_corrupt(t, 0, rate=0.15, mean_span=3, sentinel_ids=[262])
    with pytest.raises(ValueError, match="makes 20 spans but sentinel_ids has 2"):
        span_corrupt(t, 0, rate=0.15, mean_span=3, sentinel_ids=SENT)
    # enough distinct sentinels: each span gets its own
    many = list(range(1000, 1020))
    inp, tgt = span_corrupt(t, 0, rate=0.15, mean_span=3, sentinel_ids=many)
    assert sorted(inp[np.isin(inp, many)].tolist()) == many
    # explicit reuse: cycled, still decodable
    inp, tgt = span_corrupt(t, 0, rate=0.15, mean_span=3, sentinel_ids=[262],
                            reuse_sentinels=True)
    assert int((inp == 262).sum()) == 20
    np.testing.assert_array_equal(span_reconstruct(inp, tgt, [262]), t)
