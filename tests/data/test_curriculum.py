"""Curriculum: pacing values by hand, which documents are eligible at which draw, determinism,
resume equal to the uninterrupted run, bad inputs."""
import grain
import numpy as np
import pytest

from jaxeff.data import (ByteTokenizer, Corpus, CurriculumMap, Document, curriculum_dataset,
                         linear_pacing, make_curriculum_lm_dataset, root_pacing, step_pacing)


def test_pacing_values_by_hand():
    lin = linear_pacing(0.2)
    np.testing.assert_allclose(lin([0.0, 0.5, 1.0, 2.0]), [0.2, 0.6, 1.0, 1.0])
    root = root_pacing(0.1, power=2)
    np.testing.assert_allclose(root([0.0, 0.5, 1.0]), [0.1, np.sqrt(0.01 + 0.99 * 0.5), 1.0])
    np.testing.assert_allclose(root_pacing(0.5, power=3)(0.5), (0.125 + 0.875 * 0.5) ** (1 / 3))
    np.testing.assert_allclose(step_pacing(4)([0.0, 0.24, 0.25, 0.5, 0.99, 1.0, 3.0]),
                               [0.25, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(step_pacing(3, c0=0.4)([0.0, 0.34, 0.67]), [0.4, 0.7, 1.0])
    assert isinstance(lin(0.3), float)


SCORES = [5.0, 1.0, 4.0, 0.0, 3.0, 2.0]          # easiest first: 3, 1, 5, 4, 2, 0


def test_eligible_documents_at_each_step():
    cmap = CurriculumMap(SCORES, step_pacing(3), total=600, seed=1, length=900)
    np.testing.assert_array_equal(cmap.order, [3, 1, 5, 4, 2, 0])
    # stage 0 (draws 0-199): ceil(6/3) = 2 easiest; stage 1: ceil(6*2/3) = 4; then all 6
    assert [cmap.eligible(i) for i in (0, 199, 200, 399, 400, 599, 600, 899)] == \
        [2, 2, 4, 4, 6, 6, 6, 6]
    drawn = [cmap[i][1] for i in range(900)]
    assert {cmap[i][0] for i in range(900)} == {0}
    assert set(drawn[:200]) == {3, 1}
    assert set(drawn[200:400]) == {3, 1, 5, 4}
    assert set(drawn[400:]) == set(range(6))
    # linear from c0 = 0.5 over 100 draws of 4 docs: n(i) = ceil((0.5 + 0.5 i / 100) * 4)
    lin = CurriculumMap([0, 1, 2, 3], linear_pacing(0.5), total=100)
    assert [lin.eligible(i) for i in (0, 1, 49, 50, 51, 99, 100)] == [2, 3, 3, 3, 4, 4, 4]
    # ties by index; a tiny competence still leaves one document
    tie = CurriculumMap([1.0, 1.0, 0.0], linear_pacing(0.01), total=10)
    np.testing.assert_array_equal(tie.order, [2, 0, 1])
    assert tie.eligible(0) == 1 and tie[0] == (0, 2)


def test_deterministic_given_the_seed_and_resumable():
    docs = Corpus([Document(f"doc {j}", {"id": str(j)}) for j in range(6)])
    make = lambda seed: curriculum_dataset(docs, SCORES, root_pacing(0.3), total=40,  # noqa
                                           seed=seed, length=60)
    a = [d.text for d in make(0)]
    assert a == [d.text for d in make(0)] and a != [d.text for d in make(1)]
    assert len(a) == 60
    it = iter(make(0).to_iter_dataset())
    head = [next(it).text for _ in range(17)]
    state = it.get_state()
    it2 = iter(make(0).to_iter_dataset())
    it2.set_state(state)
    assert head + [d.text for d in it2] == a


def test_packed_batches_resume_exactly():
    docs = Corpus([Document(chr(ord("a") + j) * (5 + 3 * j), {"id": str(j)}) for j in range(12)])
    scores = np.arange(12.0)[::-1]                    # doc 11 easiest
    make = lambda: iter(make_curriculum_lm_dataset(  # noqa: E731
        docs, scores, ByteTokenizer(), 32, 2, step_pacing(2, c0=0.25), total=60, seed=0,
        shard=(0, 1), num_packing_bins=4))
    full = [b["inputs"] for b in make()]
    it = make()
    first = [next(it)["inputs"] for _ in range(3)]
    state = it.get_state()
    it2 = make()
    it2.set_state(state)
    rest = [b["inputs"] for b in it2]
    assert len(full) == len(first) + len(rest) > 4
    for x, y in zip(full, first + rest):
        np.testing.assert_array_equal(x, y)
    letters = lambda b: {chr(t) for t in np.unique(b) if ord("a") <= t <= ord("z")}  # noqa
    # draws 0-29 come from the 3 easiest documents (j, k, l); later draws from all 12
    assert letters(full[0]) <= {"j", "k", "l"}
    assert len(set().union(*map(letters, full))) > 3


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="1-D"):
        CurriculumMap([[1.0, 2.0]], linear_pacing(), total=5)
    with pytest.raises(ValueError, match="finite"):
        CurriculumMap([1.0, np.nan], linear_pacing(), total=5)
    with pytest.raises(ValueError, match="total"):
        CurriculumMap([1.0], linear_pacing(), total=0)
    with pytest.raises(TypeError, match="pacing"):
        CurriculumMap([1.0], 0.5, total=3)
    with pytest.raises(ValueError, match="pacing"):
        CurriculumMap([1.0, 2.0], lambda p: 0.0, total=3)[0]
    with pytest.raises(ValueError, match="pacing"):
        CurriculumMap([1.0, 2.0], lambda p: 1.5, total=3)[0]
    with pytest.raises(IndexError):
        CurriculumMap([1.0], linear_pacing(), total=3)[3]
    with pytest.raises(ValueError, match="c0"):
        linear_pacing(0.0)
    with pytest.raises(ValueError, match="stages"):
        step_pacing(1)
    with pytest.raises(ValueError, match="power"):
        root_pacing(0.1, power=0)
    with pytest.raises(ValueError, match="one difficulty per document"):
        curriculum_dataset(grain.MapDataset.source([1, 2, 3]), [0.0, 1.0], linear_pacing(),
                           total=4)
    with pytest.raises(ValueError, match="shuffle=False itself"):
        make_curriculum_lm_dataset(["a"], [0.0], ByteTokenizer(), 8, 1, linear_pacing(),
                                   total=2, seed=0, shuffle=True)
