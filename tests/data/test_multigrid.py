"""Tests for jaxeff.data.multigrid: constant tokens per step, lr scaling, shape-following data."""
import json

import jax
import numpy as np
import optax
import pytest

from jaxeff.data import ByteTokenizer, Corpus, Document
from jaxeff.data import MultigridSchedule, make_multigrid_dataset

TOK = ByteTokenizer()


def test_stages_constant_tokens_and_linear_lr():
    s = MultigridSchedule(16, 128, 200, seq_factors=(0.25, 0.5, 1.0), num_cycles=2,
                          final_fraction=0.2)
    assert s.stages[0].start == 0 and s.stages[-1].stop == 200
    for a, b in zip(s.stages, s.stages[1:]):
        assert a.stop == b.start and a.shape_index != b.shape_index
    for st in s.stages:
        assert st.batch_size * st.seq_len == 16 * 128                   # B * L constant
        assert st.lr_scale == pytest.approx(st.batch_size / 16)          # lr ∝ B
    assert s.shape(0) == (64, 32) and s.shape(199) == (16, 128)
    assert sum(st.stop - st.start for st in s.stages if st.seq_len == 128) >= 40  # final 20%
    assert set(s.shapes) == {(64, 32), (32, 64), (16, 128)}
    sq = MultigridSchedule(16, 128, 200, lr_scaling="sqrt")
    assert sq.stages[0].lr_scale == pytest.approx(2.0)


def test_selection_map_is_prefix_count_and_lr_traceable():
    s = MultigridSchedule(8, 64, 90, num_cycles=3, final_fraction=0.1)
    seen = {}
    for step in range(90):
        j, k = s[step]
        assert k == seen.get(j, 0)
        seen[j] = k + 1
        assert s.shapes[j] == s.shape(step)
    lr = jax.jit(s.lr_scale)
    assert [float(lr(st.start)) for st in s.stages] == [st.lr_scale for st in s.stages]
    sched = s.scale_schedule(optax.constant_schedule(1e-3))
    assert float(sched(0)) == pytest.approx(1e-3 * s.stages[0].lr_scale)


def test_dataset_follows_shapes_and_resumes():
    docs = Corpus([Document("x = %d\n" % i * (3 + i % 5), {"id": str(i), "domain": "d"})
                   for i in range(30)], "c")
    s = MultigridSchedule(2, 32, 12, seq_factors=(0.5, 1.0), num_cycles=2, final_fraction=0.25)
    ds = make_multigrid_dataset(docs, TOK, s, seed=0, shard=(0, 1), shuffle_window=0,
                                num_packing_bins=2)
    it = iter(ds)
    batches = [next(it) for _ in range(12)]
    assert [b["inputs"].shape for b in batches] == [(s.shape(i)) for i in range(12)]
    with pytest.raises(StopIteration):
        next(it)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    it2 = iter(ds)
    it2.set_state(state)
    for b in batches[5:]:
        got = next(it2)
        for k in b:
            np.testing.assert_array_equal(got[k], b[k])


def test_bad_inputs():
    with pytest.raises(ValueError, match="integers"):
        MultigridSchedule(3, 10, 100, seq_factors=(0.25, 1.0))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        MultigridSchedule(16, 128, 100, seq_factors=(2.0,))
    with pytest.raises(ValueError, match="final_fraction"):
        MultigridSchedule(16, 128, 100, final_fraction=1.5)
    with pytest.raises(ValueError, match="lr_scaling"):
        MultigridSchedule(16, 128, 100, lr_scaling="cubic")
    with pytest.raises(ValueError, match="stages"):
        MultigridSchedule(16, 128, 4, num_cycles=3)
    with pytest.raises(TypeError, match="MultigridSchedule"):
        make_multigrid_dataset([], TOK, object(), seed=0)
