"""Pre-packed batches (experiments.prepacked): the same batches as the sharded live pipelines,
round-robin; compact storage is lossless; a used-up stream raises."""
import functools

import numpy as np
import pytest

from experiments import prepacked
from experiments.speedrun import _lm_stream
from jaxeff import data as jdata


def _corpus():
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
    docs = [jdata.Document(" ".join(rng.choice(words, size=int(rng.integers(5, 60)))),
                           {"id": i, "domain": "d"}) for i in range(64)]
    return jdata.Corpus(docs, "toy")


def test_workers_for():
    assert prepacked.workers_for(1000, 14) == 10
    assert prepacked.workers_for(200, 14) == 10
    assert prepacked.workers_for(7, 4) == 1          # a prime: one worker, still exact
    assert prepacked.workers_for(12, 16) == 12
    with pytest.raises(ValueError, match="n_batches"):
        prepacked.workers_for(0, 4)


def test_compact_is_lossless():
    x = np.array([0, 1, 70000], np.int32)             # 70000 does not fit uint16: kept as is
    assert prepacked._compact("inputs", x).dtype == np.int32
    m = np.array([0.0, 1.0, 0.5], np.float32)         # a fractional mask is not a uint8
    assert prepacked._compact("loss_mask", m).dtype == np.float32
    assert prepacked._compact("inputs", np.array([3, 263], np.int32)).dtype == np.uint16


def test_round_robin_equals_sharded_pipelines():
    corpus, tok = _corpus(), jdata.ByteTokenizer()
    factory = functools.partial(_lm_stream, corpus, tok, 32, 2, 5, {})
    pp = prepacked.Prepacker(2)
    try:
        it = pp.batches("k", factory, 6)              # 2 workers x 3 batches
        got = [next(it) for _ in range(6)]
        with pytest.raises(RuntimeError, match="used up"):
            next(it)
        again = pp.batches("k", factory, 4)           # the cached stream's prefix
        assert all(np.array_equal(next(again)["inputs"], g["inputs"]) for g in got[:4])
    finally:
        pp.close()
    live = [iter(jdata.make_lm_dataset(corpus, tok, 32, 2, seed=5, shard=(i, 2)))
            for i in range(2)]
    for g, b in enumerate(got):
        ref = next(live[g % 2])
        assert set(b) == set(ref)
        for key in ref:
            assert b[key].dtype == ref[key].dtype, key
            np.testing.assert_array_equal(b[key], ref[key], err_msg=key)
