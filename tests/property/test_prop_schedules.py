"""Property tests for jaxeff.schedules: wsd / power / infinite / rewarm are finite,
non-negative, bounded by peak, rise then fall, continuous at their phase boundaries and hit the
documented values there."""
import numpy as np
import jax.numpy as jnp
from hypothesis import assume, given, strategies as st

from jaxeff import schedules as S

PEAK = st.floats(1e-6, 10.0)
SHAPES = st.sampled_from(S.DECAY_SHAPES)
MAX_T = 300
DELTA = 1e-3     # continuity probe: |eta(b - DELTA) - eta(b + DELTA)| small at a boundary b


def _check(fn, peak, total, boundaries, exact):
    """One evaluation of ``fn`` on: integer steps 0 .. T + 4, a fine grid, ``b -+ DELTA`` at each
    boundary ``b > 0`` and the ``exact`` steps."""
    bs = [b for b in boundaries if b > 0]
    assert total <= MAX_T and len(bs) <= 4 and len(exact) <= 4
    # one grid of a fixed size for every example (a new shape would recompile every op)
    ints = np.arange(0, MAX_T + 5, dtype=np.float32)
    probe = np.array([b + d for b in bs for d in (-DELTA, DELTA)] + [0] * (8 - 2 * len(bs)),
                     np.float32)
    at = np.array([step for step, _ in exact] + [0] * (4 - len(exact)), np.float32)
    grid = np.concatenate([ints, np.linspace(0, total, 257, dtype=np.float32), probe, at])
    v = np.asarray(fn(jnp.asarray(grid)), np.float64)
    assert np.all(np.isfinite(v)) and np.all(v >= 0) and np.all(v <= peak * (1 + 1e-6))
    vi = v[: total + 5]
    top = int(np.argmax(vi))
    tol = 1e-6 * peak
    assert np.all(np.diff(vi[: top + 1]) >= -tol) and np.all(np.diff(vi[top:]) <= tol)
    vp = v[ints.size + 257: ints.size + 257 + 2 * len(bs)].reshape(-1, 2)
    assert np.all(np.abs(vp[:, 0] - vp[:, 1]) <= 0.05 * peak), (bs, vp)     # continuous
    got = v[v.size - at.size:][:len(exact)]
    np.testing.assert_allclose(got, [w for _, w in exact], rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(vi[-1], vi[-3], rtol=1e-6, atol=1e-12)     # constant after T


@given(PEAK, st.integers(1, 300), st.floats(0, 1), st.floats(0, 1), SHAPES, st.floats(0, 1))
def test_wsd(peak, total, warm_frac, decay_fraction, shape, final_frac):
    decay = int(round(decay_fraction * total))
    warm = int(warm_frac * (total - decay))
    final = final_frac * peak
    fn = S.wsd(peak, total, warm, decay_fraction, shape, final)
    stable_end = total - decay
    # a zero-length decay (D = 0) drops from peak to final at T: continuous only with D > 0
    _check(fn, peak, total, [warm] + ([stable_end, total] if decay else []),
           [(warm, peak if warm < stable_end or decay == 0 else final), (total, final)])


@given(PEAK, st.integers(1, 300), st.floats(0.01, 0.5), st.floats(0.5, 0.99),
       st.sampled_from(["cosine", "inv-sqrt", "linear"]), st.floats(0.1, 1), st.floats(0.1, 1))
def test_infinite(peak, total, warm_end, anneal_start, cooldown, c_frac, min_frac):
    cool_end = (warm_end + anneal_start) / 2
    eta_c, eta_min = c_frac * peak, min_frac * c_frac * peak
    fn = S.infinite(peak, total, warm_end, cool_end, anneal_start, eta_c, eta_min, cooldown)
    w, c, a = (int(round(f * total)) for f in (warm_end, cool_end, anneal_start))
    assume(0 < w < c < a < total)
    _check(fn, peak, total, [w, c, a, total], [(w, peak), (c, eta_c), (total, eta_min)])


@given(st.floats(0, 1), PEAK, st.integers(1, 300), st.floats(0, 1), SHAPES, st.floats(0, 1),
       st.floats(0, 1))
def test_rewarm(prev_frac, peak, total, warm_frac, decay, final_frac, stable_fraction):
    warm = int(warm_frac * total)
    prev, final = prev_frac * peak, final_frac * peak
    fn = S.rewarm(prev, peak, total, warm, decay, final, stable_fraction)
    s = warm + int(round(stable_fraction * (total - warm)))
    exact = [(total, final)] + ([(0, prev)] if warm > 0 else []) + ([(warm, peak)]
                                                                     if warm < total else [])
    _check(fn, peak, total, [warm] + ([s, total] if s < total else []), exact)


@given(PEAK, st.integers(1, 64), st.integers(1, 4096), st.integers(0, 50), st.integers(60, 300),
       st.floats(0, 1), SHAPES)
def test_power_without_final_value(peak, batch, tokens, warm, total, decay_fraction, decay):
    fn = S.power(peak, batch, tokens, warm, total, decay_fraction, decay=decay)
    dec = int(round(decay_fraction * total))
    stable_end = total - dec
    assume(warm <= stable_end)
    _check(fn, peak, total, [warm] + ([stable_end, total] if dec else []), [(total, 0.0)])
