"""Prepacking plan: hand-packed cases, first-fit-decreasing parity with a plain re-implementation,
round trip of every prompt, and argument errors."""
import numpy as np
import pytest

from jaxeff.data import fill_rate, pack_prompts


def _prompts(lengths):
    return [list(range(10 * b + 1, 10 * b + 1 + n)) for b, n in enumerate(lengths)]


def _ffd(lengths, row_len, best=False):
    """First-(best-)fit-decreasing written out plainly: (row, start) per prompt."""
    free, place = [], {}
    for b in sorted(range(len(lengths)), key=lambda b: -lengths[b]):
        fits = [r for r, f in enumerate(free) if f >= lengths[b]]
        if not fits:
            free.append(row_len)
            fits = [len(free) - 1]
        r = min(fits, key=lambda r: free[r]) if best else fits[0]
        place[b] = (r, row_len - free[r])
        free[r] -= lengths[b]
    return [place[b] for b in range(len(lengths))]


def test_first_fit_decreasing_by_hand():
    # L = 8, lengths 5 3 7 2 4 1 -> sorted 7 5 4 3 2 1:
    # row 0: 7 (prompt 2) + 1 (prompt 5); row 1: 5 (0) + 3 (1); row 2: 4 (4) + 2 (3) + padding
    p = pack_prompts(_prompts([5, 3, 7, 2, 4, 1]), 8, pad_id=99)
    assert p.row_B.tolist() == [1, 1, 0, 2, 2, 0]
    assert p.start_B.tolist() == [0, 5, 0, 4, 0, 7]
    assert p.length_B.tolist() == [5, 3, 7, 2, 4, 1]
    assert p.tokens_RxL.tolist() == [[21, 22, 23, 24, 25, 26, 27, 51],
                                     [1, 2, 3, 4, 5, 11, 12, 13],
                                     [41, 42, 43, 44, 31, 32, 99, 99]]
    assert p.segment_ids_RxL.tolist() == [[1] * 7 + [2], [1] * 5 + [2] * 3,
                                          [1] * 4 + [2] * 2 + [0] * 2]
    assert p.positions_RxL.tolist() == [[0, 1, 2, 3, 4, 5, 6, 0], [0, 1, 2, 3, 4, 0, 1, 2],
                                        [0, 1, 2, 3, 0, 1, 0, 0]]
    assert p.tokens_RxL.dtype == p.row_B.dtype == np.int32
    assert fill_rate({"segment_ids": p.segment_ids_RxL}) == 22 / 24


def test_best_fit_takes_the_tightest_row():
    # L = 10, sorted 8 6 3 1: 8 -> row 0 (2 free), 6 -> row 1, 3 -> row 1 (1 free); the last 1
    # goes to the first row that fits (row 0) under first fit, to the tightest (row 1) under best
    first = pack_prompts(_prompts([8, 6, 3, 1]), 10)
    best = pack_prompts(_prompts([8, 6, 3, 1]), 10, packing="best_fit")
    assert first.row_B.tolist() == [0, 1, 1, 0] and first.start_B.tolist() == [0, 0, 6, 8]
    assert best.row_B.tolist() == [0, 1, 1, 1] and best.start_B.tolist() == [0, 0, 6, 9]


def test_default_row_is_the_longest_prompt_and_ties_keep_input_order():
    p = pack_prompts(_prompts([3, 4, 3, 1]))
    assert p.tokens_RxL.shape == (3, 4)
    # sorted 4 (1), 3 (0), 3 (2), 1 (3): 4 fills row 0; 3 and 3 open rows 1 and 2; 1 -> row 1
    assert p.row_B.tolist() == [1, 0, 2, 1] and p.start_B.tolist() == [0, 0, 0, 3]
    one = pack_prompts(np.array([[5, 6, 7]]))              # an int [B, P] array
    assert one.tokens_RxL.tolist() == [[5, 6, 7]] and one.row_B.tolist() == [0]


@pytest.mark.parametrize("packing", ["first_fit", "best_fit"])
def test_matches_plain_decreasing_bin_packing_and_round_trips(packing):
    rng = np.random.default_rng(0)
    for trial in range(20):
        lengths = rng.integers(1, 40, size=int(rng.integers(1, 30))).tolist()
        row_len = max(lengths) + int(rng.integers(0, 30))
        prompts = _prompts(lengths)
        p = pack_prompts(prompts, row_len, packing=packing)
        want = _ffd(lengths, row_len, best=packing == "best_fit")
        assert list(zip(p.row_B.tolist(), p.start_B.tolist())) == want
        assert p.tokens_RxL.shape == (max(r for r, _ in want) + 1, row_len)
        cover = np.zeros(p.tokens_RxL.shape, int)
        for b, prompt in enumerate(prompts):
            r, s, n = p.row_B[b], p.start_B[b], p.length_B[b]
            assert p.tokens_RxL[r, s:s + n].tolist() == prompt
            assert p.positions_RxL[r, s:s + n].tolist() == list(range(n))
            assert len(set(p.segment_ids_RxL[r, s:s + n].tolist())) == 1
            cover[r, s:s + n] += 1
        assert cover.max() == 1 and ((cover == 1) == (p.segment_ids_RxL != 0)).all()


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"row_len=4 is shorter than prompts\[1\] \(5 tokens\)"):
        pack_prompts([[1, 2], [1, 2, 3, 4, 5]], 4)
    with pytest.raises(ValueError, match="row_len"):
        pack_prompts([[1, 2]], 0)
    with pytest.raises(TypeError, match="row_len"):
        pack_prompts([[1, 2]], 2.5)
    with pytest.raises(ValueError, match="packing"):
        pack_prompts([[1, 2]], packing="concat")
    with pytest.raises(ValueError, match="at least one prompt"):
        pack_prompts([])
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a non-empty 1-D"):
        pack_prompts([[1], []])
    with pytest.raises(TypeError, match=r"prompts\[0\] must hold integer"):
        pack_prompts([[1.5, 2.0]])
    with pytest.raises(ValueError, match=r"prompts\[0\] holds a negative"):
        pack_prompts([[1, -2]])
    with pytest.raises(ValueError, match="pad_id"):
        pack_prompts([[1, 2]], pad_id=-1)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        pack_prompts(np.array([1, 2, 3]))
