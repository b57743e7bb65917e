"""Property tests for jaxeff.data.pack_lm: every transition trained exactly once, segments and
positions restart at each document, padding never trains."""
from collections import Counter

import grain
import numpy as np
from hypothesis import given, strategies as st

from jaxeff.data._pipeline import pack_lm

PAD = 0


def _docs(lengths):
    """Documents of globally unique token ids (>= 1, PAD = 0), so each transition is one pair."""
    out, nxt = [], 1
    for n in lengths:
        out.append({"tokens": np.arange(nxt, nxt + n, dtype=np.int32),
                    "loss_mask": np.ones(n, np.float32)})
        nxt += n
    return out


def _rows(docs, seq_len, packing, long_docs="split"):
    ds = grain.MapDataset.source(docs).to_iter_dataset()
    return list(pack_lm(ds, seq_len, pad_id=PAD, packing=packing, num_packing_bins=4, seed=0,
                        long_docs=long_docs))


def _trained(rows):
    return Counter((int(i), int(t)) for r in rows
                   for i, t, m in zip(r["inputs"], r["targets"], r["loss_mask"]) if m)


LENGTHS = st.lists(st.integers(1, 20), min_size=1, max_size=8)
SEQ = st.integers(2, 12)


@given(LENGTHS, SEQ, st.sampled_from(["first_fit", "best_fit"]))
def test_bin_packing_trains_every_transition_exactly_once(lengths, seq_len, packing):
    docs = _docs(lengths)
    rows = _rows(docs, seq_len, packing)
    want = Counter((int(a), int(b)) for d in docs for a, b in zip(d["tokens"], d["tokens"][1:]))
    assert _trained(rows) == want                # split long docs: nothing lost, nothing twice
    for r in rows:
        assert all(r[k].shape == (seq_len,) for k in r)
        s, q, m = r["segment_ids"], r["positions"], r["loss_mask"]
        assert np.all(m[s == 0] == 0) and np.all(r["inputs"][s == 0] == PAD)
        for j in range(seq_len):                 # positions restart at 0 with each segment
            if s[j] != 0 and (j == 0 or s[j] != s[j - 1]):
                assert q[j] == 0
            elif s[j] != 0:
                assert q[j] == q[j - 1] + 1 and r["inputs"][j] == r["inputs"][j - 1] + 1
        nz = s[s != 0]                           # segments are 1, 2, ... in row order
        assert np.all(np.diff(nz) >= 0) and (nz.size == 0 or nz[0] == 1)


@given(LENGTHS, SEQ)
def test_concat_packing_trains_each_transition_at_most_once(lengths, seq_len):
    docs = _docs(lengths)
    rows = _rows(docs, seq_len, "concat")
    want = Counter((int(a), int(b)) for d in docs for a, b in zip(d["tokens"], d["tokens"][1:]))
    got = _trained(rows)
    assert all(v == 1 for v in got.values()) and not (got - want)
    # ConcatThenSplit loses at most the one transition across each row boundary
    assert sum(want.values()) - sum(got.values()) <= len(rows)


@given(LENGTHS, SEQ)
def test_truncate_keeps_the_first_transitions_of_each_document(lengths, seq_len):
    docs = _docs(lengths)
    got = _trained(_rows(docs, seq_len, "first_fit", long_docs="truncate"))
    want = Counter((int(a), int(b)) for d in docs
                   for a, b in zip(d["tokens"][:seq_len + 1], d["tokens"][1:seq_len + 1]))
    assert got == want
