"""Tests for jaxeff.data.mixture: scheduled mixtures, phase switching, resume."""
import json
import pickle

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxeff.data import (MixtureSchedule, PhaseMap, SelectIterDataset, check_weights,
                         constant_mixture, mix_map_datasets, upsample_at_end)


def _lookup(sched, n):
    d, k = sched.lookup(range(n))
    return d, k


def test_phase_proportions_within_tolerance_and_exact_per_block():
    total, K = 2000, 20
    s = upsample_at_end([0.7, 0.2, 0.1], [0.2, 0.2, 0.6], total=total, fraction=0.2,
                        block_size=K, seed=3)
    d, _ = _lookup(s, total)
    main, end = d[:1600], d[1600:]
    for seg, w in ((main, [0.7, 0.2, 0.1]), (end, [0.2, 0.2, 0.6])):
        frac = np.bincount(seg, minlength=3) / seg.size
        np.testing.assert_allclose(frac, w, atol=0.01)
    # every block carries exactly the apportioned counts (the in-block order is a permutation)
    for b in range(0, 80):
        c = np.bincount(d[b * K:(b + 1) * K], minlength=3)
        np.testing.assert_array_equal(c, [14, 4, 2])
    assert not np.array_equal(d[:K], d[K:2 * K])  # blocks are shuffled differently


def test_small_weight_is_honoured_on_average_via_carry():
    s = constant_mixture([0.99, 0.01], total=6400, block_size=64)
    d, _ = _lookup(s, 6400)
    assert abs((d == 1).mean() - 0.01) < 0.002   # naive per-block rounding would give 1/64


def test_no_skips_or_repeats_per_domain():
    s = upsample_at_end([0.5, 0.5], [0.1, 0.9], total=1000, fraction=0.3, block_size=16,
                        length=2000)
    d, k = _lookup(s, 1500)  # past `total` too
    for dom in range(2):
        np.testing.assert_array_equal(k[d == dom], np.arange((d == dom).sum()))


def test_pure_and_picklable():
    a = upsample_at_end([0.6, 0.4], [0.1, 0.9], total=500, fraction=0.1, block_size=8, seed=1)
    b = pickle.loads(pickle.dumps(a))
    idx = [0, 7, 123, 499, 450, 3]
    assert [a[i] for i in idx] == [b[i] for i in idx]
    c = upsample_at_end([0.6, 0.4], [0.1, 0.9], total=500, fraction=0.1, block_size=8, seed=1)
    # random access in any order gives the same answers as sequential access
    assert [c[i] for i in reversed(range(500))] == [a[i] for i in reversed(range(500))]


def test_callable_weights():
    s = MixtureSchedule(lambda p: [1 - p, p], total=1000, block_size=10, num_domains=2)
    d, _ = _lookup(s, 1000)
    assert (d[:100] == 1).mean() < 0.1 and (d[-100:] == 1).mean() > 0.9


def test_map_dataset_mixture_content():
    a = grain.MapDataset.source([f"a{i}" for i in range(5)])
    b = grain.MapDataset.source([f"b{i}" for i in range(50)])
    s = upsample_at_end([0.9, 0.1], [0.2, 0.8], total=40, fraction=0.5, block_size=10)
    ds = mix_map_datasets([a, b], s)
    assert len(ds) == 40
    out = [ds[i] for i in range(40)]
    d, k = _lookup(s, 40)
    expect = [(["a", "b"][di] + str(ki % [5, 50][di])) for di, ki in zip(d, k)]
    assert out == expect
    assert sum(x.startswith("b") for x in out[20:]) == 16


def _tagged(tag, n):
    return grain.MapDataset.source([{"x": np.array([tag * 1000 + i])} for i in range(n)]) \
        .to_iter_dataset()


@pytest.fixture
def select_ds():
    s = upsample_at_end([0.75, 0.25], [0.25, 0.75], total=40, fraction=0.5, block_size=4)
    return SelectIterDataset([_tagged(0, 100), _tagged(1, 100)], s), s


def test_select_iter_follows_schedule_and_resumes(select_ds, tmp_path):
    ds, s = select_ds
    it = iter(ds)
    got = [int(next(it)["x"][0]) for _ in range(10)]
    d, k = _lookup(s, 40)
    assert got == [int(di * 1000 + ki) for di, ki in zip(d[:10], k[:10])]
    state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as grain.checkpoint does
    expect = [int(next(it)["x"][0]) for _ in range(25)]
    it2 = iter(ds)
    it2.set_state(state)
    assert [int(next(it2)["x"][0]) for _ in range(25)] == expect
    # Orbax through grain.checkpoint
    it3 = iter(ds)
    for _ in range(7):
        next(it3)
    with ocp.CheckpointManager(tmp_path / "ck") as m:
        m.save(7, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it3)))
        m.wait_until_finished()
        nxt = [int(next(it3)["x"][0]) for _ in range(5)]
        it4 = iter(ds)
        m.restore(7, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(it4)))
    assert [int(next(it4)["x"][0]) for _ in range(5)] == nxt


def test_select_iter_stops_at_length(select_ds):
    ds, _ = select_ds
    assert len(list(ds)) == 40


def test_phase_map_switches_and_restarts():
    pm = PhaseMap([3, 5])
    assert [pm[i] for i in range(7)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1)]
    ds = SelectIterDataset([_tagged(0, 10), _tagged(1, 10), _tagged(2, 10)], pm)
    out = [int(e["x"][0]) for e, _ in zip(ds, range(7))]
    assert out == [0, 1, 2, 1000, 1001, 2000, 2001]


def test_bad_inputs():
    with pytest.raises(ValueError, match="fraction"):
        upsample_at_end([1, 1], [1, 2], total=10, fraction=1.5)
    with pytest.raises(ValueError, match="fraction"):
        upsample_at_end([1, 1], [1, 2], total=10, fraction=-0.1)
    with pytest.raises(ValueError, match="positive"):
        constant_mixture([0, 0], total=10)
    with pytest.raises(ValueError, match="positive"):
        check_weights("w", [1, -1])
    with pytest.raises(ValueError, match="2 entries"):
        upsample_at_end([1, 1], [1, 2, 3], total=10)
    with pytest.raises(ValueError, match="phase starts"):
        MixtureSchedule([(0.5, [1, 1]), (0.2, [1, 0])], total=10)
    with pytest.raises(ValueError, match="total"):
        constant_mixture([1], total=0)
    with pytest.raises(ValueError, match="empty"):
        mix_map_datasets([grain.MapDataset.source([1]), grain.MapDataset.source([])],
                         constant_mixture([1, 1], total=4))
    with pytest.raises(ValueError, match="non-empty"):
        SelectIterDataset([], PhaseMap([]))
    with pytest.raises(ValueError, match="addresses 2 sources"):
        SelectIterDataset([_tagged(0, 3)], constant_mixture([1, 1], total=4))
    with pytest.raises(ValueError, match="increase"):
        PhaseMap([3, 3])
    with pytest.raises(TypeError, match="IterDataset"):
        SelectIterDataset([grain.MapDataset.source([1])], PhaseMap([]))


def test_non_prefix_map_is_rejected_at_iteration():
    class Bad(grain.transforms.DatasetSelectionMap):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return 0, 2 * i

    it = iter(SelectIterDataset([_tagged(0, 10)], Bad()))
    next(it)
    with pytest.raises(RuntimeError, match="sequential"):
        next(it)


def test_mixture_lm_dataset_batches_follow_schedule():
    from jaxeff.data import ByteTokenizer, Corpus, Document
    from jaxeff.data import make_mixture_lm_dataset, size_weights
    tok = ByteTokenizer()
    a = Corpus([Document("a" * (5 + i), {"id": f"a{i}"}) for i in range(8)], "a")
    b = Corpus([Document("b" * (5 + i), {"id": f"b{i}"}) for i in range(8)], "b")
    w = size_weights([a, b])
    np.testing.assert_allclose(w, [0.5, 0.5])
    s = upsample_at_end([0.75, 0.25], [0.0, 1.0], total=24, fraction=0.5, block_size=4,
                        length=48)
    ds = make_mixture_lm_dataset([a, b], tok, 16, 4, s, seed=0, shard=(0, 1),
                                 num_packing_bins=2)
    it = iter(ds)
    for step in range(6):
        x = next(it)["inputs"]
        n_b = sum(int((row == ord("b")).any()) for row in x)
        assert n_b == (1 if step < 3 else 4)        # exact composition of every batch
        assert not any(((row == ord("a")).any() and (row == ord("b")).any()) for row in x)
    state = json.loads(json.dumps(it.get_state()))
    expect = [next(it) for _ in range(3)]
    it2 = iter(ds)
    it2.set_state(state)
    for e in expect:
        got = next(it2)
        for k in e:
            np.testing.assert_array_equal(got[k], e[k])
    with pytest.raises(ValueError, match="empty"):
        size_weights([a, Corpus([], "e")])
