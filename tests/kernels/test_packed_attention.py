"""Tests for jaxeff.kernels.packed_attention: interpret-mode kernel vs reference, dispatch, errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.kernels import _common
from jaxeff.kernels import packed_attention as A

TOL = 1e-5  # f32, TECHNIQUES.md §20 observed mha f32 <= 2e-6
# Jitted once per shape: op-by-op eager dispatch compiles every primitive separately (slow).
_reference = jax.jit(A.attention_reference, static_argnames=("causal", "sm_scale"))


def _inputs(seed, b, t, h, kv, d):
    """NumPy draws (eager jax.random compiles its kernels op by op: seconds per call on CPU)."""
    rng = np.random.default_rng(seed)
    shapes = [(b, t, h, d), (b, t, kv, d), (b, t, kv, d), (b, t, h, d)]
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)


def _value_and_grads(fn, q, k, v, seg, ct, causal):
    """One compile: (output, grads of sum(out * ct) w.r.t. q, k, v)."""
    def loss(q, k, v):
        out = fn(q, k, v, seg, causal=causal)
        return jnp.sum(out * ct), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _naive(q, k, v, seg, causal):
    """Per-head NumPy loop of the module formula (float64)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    g = h // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            logits = q[bi, :, hi] @ k[bi, :, hi // g].T / math.sqrt(d)
            allowed = np.ones((t, t), bool)
            if seg is not None:
                s = np.asarray(seg[bi])
                allowed &= s[:, None] == s[None, :]
            if causal:
                allowed &= np.tril(np.ones((t, t), bool))
            logits = np.where(allowed, logits, -np.inf)
            w = np.exp(logits - logits.max(1, keepdims=True))
            out[bi, :, hi] = (w / w.sum(1, keepdims=True)) @ v[bi, :, hi // g]
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_numpy_formula(causal):
    q, k, v, _ = _inputs(0, 2, 7, 4, 2, 8)
    seg = jnp.array([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 3, 3, 3]], jnp.int32)
    got = _reference(q, k, v, seg, causal=causal)
    np.testing.assert_allclose(got, _naive(q, k, v, seg, causal), atol=1e-5)


def test_pallas_gqa_packed_segments_ragged_causal():
    """GQA (H=4, KV=2), three segments + id-0 padding, T=20 (not a block multiple)."""
    q, k, v, ct = _inputs(1, 1, 20, 4, 2, 16)
    seg = jnp.array([[1] * 7 + [2] * 6 + [3] * 4 + [0] * 3], jnp.int32)
    pal = lambda *a, **kw: A.attention(*a, interpret=True, **kw)
    out_p, g_p = _value_and_grads(pal, q, k, v, seg, ct, True)
    out_r, g_r = _value_and_grads(_reference, q, k, v, seg, ct, True)
    np.testing.assert_allclose(out_p, out_r, atol=TOL)
    for a, b in zip(g_p, g_r):
        np.testing.assert_allclose(a, b, atol=TOL)


def test_tpu_flash_path_gqa_segments_in_tpu_interpret_mode():
    """The TPU path (JAX's splash attention, GQA without repeating K/V, T padded to 128),
    fwd + grads, under a forced TPU interpret mode."""
    from jax.experimental.pallas import tpu as pltpu
    q, k, v, ct = _inputs(6, 1, 20, 2, 1, 8)
    seg = jnp.array([[1] * 12 + [2] * 5 + [0] * 3], jnp.int32)
    tpu = lambda *a, **kw: A.attention_pallas(*a, platform="tpu", **kw)
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        out_p, g_p = _value_and_grads(tpu, q, k, v, seg, ct, True)
    out_r, g_r = _value_and_grads(_reference, q, k, v, seg, ct, True)
    np.testing.assert_allclose(out_p, out_r, atol=TOL)
    for a, b in zip(g_p, g_r):
        np.testing.assert_allclose(a, b, atol=TOL)


def test_tpu_splash_path_gqa_full_mask_interpret_flag():
    """interpret=True alone selects TPU interpret mode for the forward and the backward kernels;
    GQA group 2, non-causal with segments (splash's FullMask + SegmentIds)."""
    q, k, v, ct = _inputs(7, 1, 20, 4, 2, 8)
    seg = jnp.array([[1] * 9 + [2] * 11], jnp.int32)
    tpu = lambda *a, **kw: A.attention_pallas(*a, platform="tpu", interpret=True, **kw)
    out_p, g_p = _value_and_grads(tpu, q, k, v, seg, ct, False)
    out_r, g_r = _value_and_grads(_reference, q, k, v, seg, ct, False)
    np.testing.assert_allclose(out_p, out_r, atol=TOL)
    for a, b in zip(g_p, g_r):
        np.testing.assert_allclose(a, b, atol=TOL)


def test_pallas_full_attention_padding_is_masked():
    """Non-causal, no segment ids, T=24 padded to 32: the padding must not leak in (forward)."""
    q, k, v, _ = _inputs(2, 2, 24, 2, 2, 8)
    out_p = jax.jit(lambda q, k, v: A.attention_pallas(q, k, v, causal=False, interpret=True))(
        q, k, v)
    np.testing.assert_allclose(out_p, _reference(q, k, v, None, causal=False), atol=TOL)


def test_pallas_single_token():
    q, k, v, _ = _inputs(3, 1, 1, 2, 1, 8)
    out = A.attention_pallas(q, k, v, interpret=True)
    # One token attends only to itself: the output is its value, repeated per query head.
    np.testing.assert_allclose(out, jnp.repeat(v, 2, axis=2), atol=TOL)


def test_dispatcher_uses_reference_on_cpu():
    assert jax.default_backend() == "cpu"
    assert _common.resolve_impl(None, False, name="attention") == "reference"
    assert _common.resolve_impl(None, True, name="attention") == "pallas"
    q, k, v, _ = _inputs(4, 1, 6, 2, 1, 4)
    np.testing.assert_array_equal(jax.jit(A.attention)(q, k, v), _reference(q, k, v))


def test_bad_inputs_raise_clear_errors():
    q, k, v, _ = _inputs(5, 1, 8, 3, 2, 4)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        A.attention(q, k, v)
    q, k, v, _ = _inputs(5, 1, 8, 2, 1, 4)
    with pytest.raises(ValueError, match="segment_ids must be"):
        A.attention(q, k, v, jnp.ones((1, 7), jnp.int32))
    with pytest.raises(TypeError, match="segment_ids must be integer"):
        A.attention(q, k, v, jnp.ones((1, 8)))
    with pytest.raises(TypeError, match="q must have dtype"):
        A.attention(q.astype(jnp.int32), k, v)
    with pytest.raises(ValueError, match="q must have 4 axes"):
        A.attention(q[0], k, v)
    with pytest.raises(ValueError, match="block_q must be a power of two"):
        A.attention_pallas(q, k, v, block_q=48, interpret=True)
    with pytest.raises(ValueError, match="impl must be"):
        A.attention(q, k, v, impl="triton")
