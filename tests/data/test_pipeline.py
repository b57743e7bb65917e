"""Tests for jaxeff.data.pipeline: packing invariants, loss mask, resume, sharding."""
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import grain

from jaxeff.data import (BATCH_KEYS, ByteTokenizer, Corpus, Document, fill_rate,
                         load_stdlib_corpus, make_eval_batches, make_lm_dataset)
from jaxeff.data import pack_lm

TOK = ByteTokenizer()
PAD, BOS, EOS = TOK.pad_id, TOK.bos_id, TOK.eos_id


@pytest.fixture(scope="module")
def small_corpus():
    """200 stdlib modules cut to 5..304 chars so many documents (not just pieces) get packed.

    Not fewer documents: Grain's index_shuffle costs ~9 ms per element for n = 12 (measured).
    """
    docs = load_stdlib_corpus("all")[100:300]
    return Corpus([Document(f"#{d.meta['id']}\n" + d.text[:(50 + 37 * i) % 300 + 5],
                            dict(d.meta)) for i, d in enumerate(docs)], "small")


def _doc_tokens(corpus):
    return [np.concatenate([[BOS], TOK.encode(d.text), [EOS]]).astype(np.int32) for d in corpus]


def _expected_pieces(tokens, seq_len):
    """Independent re-statement of long_docs='split': stride L, length L + 1."""
    out = []
    for t in tokens:
        if len(t) <= seq_len + 1:
            out.append(tuple(t))
        else:
            out.extend(tuple(t[s:s + seq_len + 1]) for s in range(0, len(t) - 1, seq_len))
    return out


def _segments(batches):
    """Rebuild each packed segment's tokens (length L + 1 row = inputs + last target)."""
    pieces = []
    for b in batches:
        for i in range(b["inputs"].shape[0]):
            seg = b["segment_ids"][i]
            row = np.concatenate([b["inputs"][i], b["targets"][i, -1:]])
            seg_full = np.concatenate([seg, [seg[-1] if b["targets"][i, -1] != PAD else 0]])
            for k in np.unique(seg_full[seg_full > 0]):
                pieces.append(tuple(row[seg_full == k]))
    return pieces


def _check_row_invariants(b, seq_len):
    assert set(b) == set(BATCH_KEYS)
    for k in BATCH_KEYS:
        assert b[k].shape[1] == seq_len
        assert b[k].dtype == (np.float32 if k == "loss_mask" else np.int32), k
    seg, pos, lm = b["segment_ids"], b["positions"], b["loss_mask"]
    for i in range(seg.shape[0]):
        ids = seg[i][seg[i] > 0]
        if ids.size == 0:  # an empty padding row (eval batches pad the last batch)
            assert np.all(lm[i] == 0) and np.all(b["inputs"][i] == PAD)
            continue
        # Segment ids start at 1 and increase by one, padding (0) only at the end.
        assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
        assert np.all(seg[i][len(ids):] == 0)
        for k in np.unique(ids):
            np.testing.assert_array_equal(pos[i][seg[i] == k], np.arange((seg[i] == k).sum()))
        # loss_mask formula on the L - 1 positions whose next segment id is visible.
        expect = ((seg[i][:-1] == seg[i][1:]) & (seg[i][:-1] != 0)).astype(np.float32)
        np.testing.assert_array_equal(lm[i][:-1], expect)
        assert np.all(b["inputs"][i][seg[i] == 0] == PAD)


def test_hand_example_exact():
    corpus = [Document("ab"), Document("cde"), Document("f")]
    (b,) = list(make_lm_dataset(corpus, TOK, seq_len=8, batch_size=2, seed=0, shuffle=False,
                                repeat=False, num_packing_bins=2, shard=(0, 1)))
    # Rows of L+1 = 9: [BOS a b EOS BOS c d e EOS] and [BOS f EOS pad...].
    np.testing.assert_array_equal(b["inputs"], [[BOS, 97, 98, EOS, BOS, 99, 100, 101],
                                                [BOS, 102, EOS, PAD, PAD, PAD, PAD, PAD]])
    np.testing.assert_array_equal(b["targets"], [[97, 98, EOS, BOS, 99, 100, 101, EOS],
                                                 [102, EOS, PAD, PAD, PAD, PAD, PAD, PAD]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 1, 2, 2, 2, 2],
                                                     [1, 1, 1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3, 0, 1, 2, 3],
                                                   [0, 1, 2, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 1, 0, 1, 1, 1, 1],
                                                   [1, 1, 0, 0, 0, 0, 0, 0]])
    assert b["loss_mask"].sum() == (4 - 1) + (5 - 1) + (3 - 1)
    assert fill_rate(b) == pytest.approx(11 / 16)


@pytest.mark.parametrize("packing", ["first_fit", "concat"])
def test_per_token_loss_mask_carried_through_packing(packing):
    """A MeCo-style encode: the first 3 tokens (BOS + 2 metadata tokens) are not targets."""

    def encode(doc):
        t = np.concatenate([[BOS], TOK.encode("M:" + doc.text), [EOS]]).astype(np.int32)
        m = np.ones(len(t), np.float32)
        m[:3] = 0.0
        return {"tokens": t, "loss_mask": m}

    corpus = [Document("ab"), Document("xyz")]
    (b,) = list(make_lm_dataset(corpus, TOK, seq_len=12, batch_size=1, seed=0, shuffle=False,
                                repeat=False, packing=packing, encode=encode, shard=(0, 1)))
    # Row of 13: [BOS M : a b EOS | BOS M : x y z EOS].
    np.testing.assert_array_equal(b["targets"][0], [77, 58, 97, 98, EOS, BOS, 77, 58, 120, 121,
                                                    122, EOS])
    np.testing.assert_array_equal(b["segment_ids"][0], [1] * 6 + [2] * 6)
    # Targets 'M' ':' masked (with BOS: 1 + len(meta) positions), the first document token is
    # a target, the cross-document transition is masked.
    np.testing.assert_array_equal(b["loss_mask"][0], [0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1])


@pytest.mark.parametrize("packing", ["first_fit", "best_fit"])
def test_fit_packing_preserves_every_piece(small_corpus, packing):
    seq_len = 64
    tokens = _doc_tokens(small_corpus)
    batches = list(make_lm_dataset(small_corpus, TOK, seq_len, 4, seed=3, packing=packing,
                                   num_packing_bins=8, shuffle=False, repeat=False,
                                   drop_remainder=False, shard=(0, 1)))
    for b in batches:
        _check_row_invariants(b, seq_len)
    # Every segment is exactly one piece of one document: nothing lost, nothing mixed.
    assert sorted(_segments(batches)) == sorted(_expected_pieces(tokens, seq_len))
    # Every next-token transition of every document is a target exactly once.
    assert sum(b["loss_mask"].sum() for b in batches) == sum(len(t) - 1 for t in tokens)
    assert fill_rate(batches) > 0.8


def test_concat_packing_preserves_stream(small_corpus):
    seq_len = 64
    tokens = _doc_tokens(small_corpus)
    batches = list(make_lm_dataset(small_corpus, TOK, seq_len, 4, seed=0, packing="concat",
                                   shuffle=False, repeat=False, drop_remainder=False,
                                   shard=(0, 1)))
    for b in batches:
        _check_row_invariants(b, seq_len)
    stream = np.concatenate([np.concatenate([b["inputs"][i], b["targets"][i, -1:]])
                             for b in batches for i in range(b["inputs"].shape[0])])
    expect = np.concatenate([np.array(p) for p in _expected_pieces(tokens, seq_len)])
    np.testing.assert_array_equal(stream[stream != PAD], expect)
    n_rows = sum(b["inputs"].shape[0] for b in batches)
    lost = sum(len(t) - 1 for t in tokens) - sum(b["loss_mask"].sum() for b in batches)
    assert 0 <= lost < n_rows  # at most the one transition across each row boundary
    assert fill_rate(batches) > 0.99 * (len(expect) / (n_rows * (seq_len + 1)))


def test_truncate_keeps_prefix():
    corpus = [Document("x" * 50), Document("short")]
    batches = list(make_lm_dataset(corpus, TOK, 16, 2, seed=0, long_docs="truncate",
                                   shuffle=False, repeat=False, drop_remainder=False,
                                   shard=(0, 1)))
    segs = _segments(batches)
    assert sorted(segs) == sorted([tuple([BOS] + [120] * 16), tuple([BOS, *b"short", EOS])])
    assert sum(b["loss_mask"].sum() for b in batches) == 16 + 6


@pytest.mark.parametrize("packing", ["first_fit", "best_fit", "concat"])
def test_resume_from_state_gives_identical_batches(small_corpus, packing):
    ds = make_lm_dataset(small_corpus, TOK, 32, 4, seed=7, num_packing_bins=4, packing=packing,
                         shuffle_window=1024, shard=(0, 1))
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expect = [next(it) for _ in range(4)]
    it2 = iter(ds)
    it2.set_state(state)
    for e in expect:
        got = next(it2)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(got[k], e[k])


def test_resume_through_orbax(small_corpus, tmp_path):
    ds = make_lm_dataset(small_corpus, TOK, 32, 2, seed=1, packing="best_fit",
                         num_packing_bins=4, shuffle_window=1024, shard=(0, 1))
    it = iter(ds)
    for _ in range(3):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        expect = [next(it) for _ in range(3)]
        it2 = iter(ds)
        mngr.restore(3, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(it2)))
    for e in expect:
        got = next(it2)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(got[k], e[k])


def test_shuffle_is_seeded_and_epochs_reshuffle(small_corpus):
    def first(seed):
        return next(iter(make_lm_dataset(small_corpus, TOK, 32, 4, seed=seed, shard=(0, 1),
                                        shuffle_window=1024)))

    np.testing.assert_array_equal(first(5)["inputs"], first(5)["inputs"])
    assert not np.array_equal(first(5)["inputs"], first(6)["inputs"])
    # Two epochs of documents without piece/bin shuffling: same multiset, different order.
    ds = make_lm_dataset(small_corpus[:6], TOK, 1024, 1, seed=0, repeat=2, shuffle_window=0,
                         shard=(0, 1), num_packing_bins=1)
    segs = _segments(list(ds))
    half = len(segs) // 2
    assert sorted(segs[:half]) == sorted(segs[half:]) and segs[:half] != segs[half:]


def test_repeat_is_infinite(small_corpus):
    small = small_corpus[:50]
    one_epoch = len(list(make_lm_dataset(small, TOK, 64, 4, seed=0, repeat=False,
                                         shard=(0, 1))))
    it = iter(make_lm_dataset(small, TOK, 64, 4, seed=0, shard=(0, 1), shuffle_window=0))
    for _ in range(3 * one_epoch + 1):
        next(it)


def test_process_shards_are_disjoint_and_complete(small_corpus):
    def pieces(shard):
        # seq_len 512 > every document: one segment per (uniquely prefixed) document.
        return _segments(make_lm_dataset(small_corpus, TOK, 512, 2, seed=0, repeat=False,
                                         drop_remainder=False, shard=shard, shuffle_window=0))

    s0, s1, full = pieces((0, 2)), pieces((1, 2)), pieces((0, 1))
    assert s0 and s1 and not set(s0) & set(s1)
    assert sorted(s0 + s1) == sorted(full)
    # Default shard comes from jax (one process here).
    assert jax.process_count() == 1
    assert sorted(pieces(None)) == sorted(full)


def test_eval_batches_fixed_and_padded(small_corpus):
    tokens = _doc_tokens(small_corpus)
    ev = make_eval_batches(small_corpus, TOK, 64, 8)
    ev2 = make_eval_batches(small_corpus, TOK, 64, 8)
    assert len(ev) == len(ev2) > 1
    for a, b in zip(ev, ev2):
        _check_row_invariants(a, 64)
        assert a["inputs"].shape == (8, 64)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k])
    assert sum(b["loss_mask"].sum() for b in ev) == sum(len(t) - 1 for t in tokens)
    assert len(make_eval_batches(small_corpus, TOK, 64, 8, max_batches=1)) == 1


def test_batch_shards_over_8_devices(small_corpus):
    """A batch placed with NamedSharding over 8 CPU devices holds the same numbers."""
    b = next(iter(make_lm_dataset(small_corpus, TOK, 16, 8, seed=0, shard=(0, 1),
                                  shuffle_window=0)))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = jax.device_put(b, spec)
    for k in BATCH_KEYS:
        np.testing.assert_array_equal(np.asarray(sharded[k]), b[k])


def test_bad_arguments(small_corpus):
    kw = dict(seed=0, shard=(0, 1))
    cases = [
        (dict(seq_len=0), ValueError, "seq_len must be an int >= 1; got 0"),
        (dict(batch_size=0), ValueError, "batch_size must be an int >= 1; got 0"),
        (dict(packing="greedy"), ValueError, "packing must be one of"),
        (dict(long_docs="drop"), ValueError, "long_docs must be one of"),
        (dict(shard=(2, 2)), ValueError, "shard must be \\(index, count\\)"),
        (dict(shard=(0, 1000)), ValueError, "fewer than the 1000 shards"),
        (dict(seed=-1), ValueError, "seed must be an int >= 0"),
        (dict(repeat=0), ValueError, "repeat must be True, False or an int >= 1"),
        (dict(num_packing_bins=0), ValueError, "num_packing_bins must be"),
    ]
    for over, exc, msg in cases:
        args = dict(seq_len=16, batch_size=2, **kw)
        args.update(over)
        with pytest.raises(exc, match=msg):
            make_lm_dataset(small_corpus, TOK, **args)
    with pytest.raises(TypeError, match="corpus must be a Corpus"):
        make_lm_dataset("a string", TOK, 16, 2, **kw)
    with pytest.raises(TypeError, match="tokenizer must have a callable `encode`"):
        make_lm_dataset(small_corpus, object(), 16, 2, **kw)
    with pytest.raises(TypeError, match="pipeline element must be a Document"):
        next(iter(make_lm_dataset([3.5], TOK, 16, 1, **kw)))
    with pytest.raises(ValueError, match="fill_rate: no batches"):
        fill_rate([])
    with pytest.raises(TypeError, match="pad_id must be an int >= 0; got None"):
        pack_lm(grain.MapDataset.source([]).to_iter_dataset(), 8, pad_id=None)
    with pytest.raises(TypeError, match=r"seq_len must be an int >= 1; got 2.5"):
        make_lm_dataset(small_corpus, TOK, 2.5, 2, **kw)


def test_finite_dataset_smaller_than_a_batch_raises_not_silently_empty():
    docs = [Document("tiny doc", {"id": "a"}), Document("another", {"id": "b"})]
    ds = make_lm_dataset(docs, TOK, 64, 8, seed=0, shard=(0, 1), repeat=False, shuffle=False)
    with pytest.raises(ValueError, match=r"yields no batch: one pass over the corpus \(2 "
                                         r"documents\).*batch_size=8.*drop_remainder=False"):
        next(iter(ds))
    with pytest.raises(ValueError, match="3 passes"):
        next(iter(make_lm_dataset(docs, TOK, 64, 8, seed=0, shard=(0, 1), repeat=3,
                                  shuffle=False)))
    part = list(make_lm_dataset(docs, TOK, 64, 8, seed=0, shard=(0, 1), repeat=False,
                                shuffle=False, drop_remainder=False))
    assert len(part) == 1 and part[0]["inputs"].shape[0] < 8      # the partial batch
    # a finite dataset that fills batches ends normally (StopIteration, no error)
    full = list(make_lm_dataset(docs, TOK, 8, 1, seed=0, shard=(0, 1), repeat=False,
                                shuffle=False))
    assert len(full) >= 2


def test_model_vocab_checked_and_plain_dicts_accepted(small_corpus):
    kw = dict(seed=0, shard=(0, 1), shuffle_window=0)
    with pytest.raises(ValueError, match="vocab_size=256 .* smaller than tokenizer.vocab_size"):
        make_lm_dataset(small_corpus, TOK, 16, 2, vocab_size=256, **kw)
    with pytest.raises(ValueError, match="vocab_size=259"):
        make_eval_batches(small_corpus, TOK, 16, 2, vocab_size=259)
    make_lm_dataset(small_corpus, TOK, 16, 2, vocab_size=264, **kw)
    dicts = [{"text": d.text, "url": "x.org"} for d in list(small_corpus)[:4]]
    a = next(iter(make_lm_dataset(dicts, TOK, 16, 2, shuffle=False, **kw)))
    b = next(iter(make_lm_dataset(list(small_corpus)[:4], TOK, 16, 2, shuffle=False, **kw)))
    for k in BATCH_KEYS:
        np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(ValueError, match="without a 'text' field"):
        next(iter(make_lm_dataset([{"body": "x"}], TOK, 16, 1, **kw)))
