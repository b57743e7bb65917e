"""Tests for jaxeff.data.epochs: unique target tokens, repetition reports, counting iterator."""
import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.checkpoint import Checkpointer

from jaxeff.data import ByteTokenizer, Document, make_lm_dataset
from jaxeff.data import (CountingIterator, EpochCounter, RepeatedDataWarning, check_repetition,
                         repetition_report, unique_target_tokens)

TOK = ByteTokenizer()
DOCS = [Document("ab", {"id": "a"}), Document("cde", {"id": "b"}),
        Document("x" * 70, {"id": "c"}), Document("hello world, " * 5, {"id": "d"})]


def test_unique_target_tokens_hand_computed():
    # "ab": BOS a b EOS = 4 tokens -> 3 targets; "cde": 5 tokens -> 4 targets
    assert unique_target_tokens(DOCS[:2], TOK) == 7
    assert unique_target_tokens(["ab"], TOK, add_bos=False) == 2
    assert unique_target_tokens([{"tokens": np.arange(10)}], TOK) == 9


def test_one_epoch_of_the_pipeline_trains_exactly_the_unique_targets():
    ds = make_lm_dataset(DOCS, TOK, 16, 2, seed=0, repeat=False, shuffle=False,
                         drop_remainder=False, shard=(0, 1))
    counter = EpochCounter(unique_target_tokens(DOCS, TOK))
    for b in ds:
        counter.update(b)
    assert counter.tokens == unique_target_tokens(DOCS, TOK)
    assert counter.epochs == 1.0


def test_repetition_report_and_warning():
    r = repetition_report(250, 100)
    assert (r.epochs, r.min_times_seen, r.max_times_seen, r.repeated_tokens) == (2.5, 2, 3, 150)
    assert r.repeated_fraction == pytest.approx(0.6)
    r = repetition_report(100, 100)
    assert (r.min_times_seen, r.max_times_seen, r.repeated_tokens) == (1, 1, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_repetition(100, 100)                       # exactly one epoch: fine
        check_repetition(350, 100, max_epochs=4)         # allowed repetition
    with pytest.warns(RepeatedDataWarning, match=r"2\.50 epochs.*Repeat"):
        check_repetition(250, 100, what="speedrun")


def test_counting_iterator_warns_once_and_resumes_exactly(tmp_path):
    U = unique_target_tokens(DOCS, TOK)
    # shuffle=False: Grain's index shuffle is slow for a 4-document corpus (pipeline docstring)
    make = lambda: iter(make_lm_dataset(DOCS, TOK, 16, 2, seed=1, shard=(0, 1),  # noqa: E731
                                        shuffle=False))
    it = CountingIterator(make(), EpochCounter(U), max_epochs=1.0)
    with pytest.warns(RepeatedDataWarning) as rec:
        for _ in range(12):
            next(it)
    assert len(rec) == 1
    assert it.counter.batches == 12 and it.counter.epochs > 1.0
    state = json.loads(json.dumps(it.get_state()))      # plain JSON
    ck = Checkpointer(str(tmp_path / "ck"))              # and the project's checkpointer
    ck.save({"x": jnp.zeros(2)}, it, step=12)
    want = [next(it) for _ in range(3)]
    it2 = CountingIterator(make(), EpochCounter(U), max_epochs=1.0)
    ck.restore({"x": jnp.zeros(2)}, it2)
    assert it2.get_state() == state
    it2 = CountingIterator(make(), EpochCounter(U), max_epochs=1.0)
    it2.set_state(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # already warned before the checkpoint
        got = [next(it2) for _ in range(3)]
    for a, b in zip(want, got):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert it2.counter.get_state() == it.counter.get_state()


@pytest.mark.parametrize("call, exc, match", [
    (lambda: unique_target_tokens([], TOK), ValueError, "empty"),
    (lambda: unique_target_tokens([3], TOK), TypeError, "corpus"),
    (lambda: repetition_report(-1, 10), ValueError, "tokens"),
    (lambda: repetition_report(10, 0), ValueError, "unique_tokens"),
    (lambda: check_repetition(10, 10, max_epochs=0), ValueError, "max_epochs"),
    (lambda: EpochCounter(0), ValueError, "unique_tokens"),
    (lambda: EpochCounter(5).update({"inputs": np.zeros(3)}), ValueError, "loss_mask"),
    (lambda: EpochCounter(5).set_state({"tokens": 1, "batches": 1, "unique_tokens": 6}),
     ValueError, "unique_tokens"),
    (lambda: CountingIterator([1, 2], EpochCounter(5)), TypeError, "iterator"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
