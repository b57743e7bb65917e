"""Prepacked prefill equals the padded prefill: last-token logits, every real cache slot, the
decode that continues from the cache, and whole generations (greedy and sampled)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.data import pack_prompts
from jaxeff.models import decode_step, generate, llama, prefill, prefill_packed

CFG = llama.LlamaConfig(vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                        max_seq_len=40)
PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [6, 5], [3, 5, 8, 9, 7], [1], [2, 7, 1, 8, 2, 8, 1, 8, 2],
           [11, 12, 13]]


@pytest.fixture(scope="module")
def params():
    p = llama.init_params(jax.random.key(1), CFG)
    # larger weights than init so the greedy continuation is not one repeated token
    return jax.tree.map(lambda x: x * 8 if x.ndim == 3 else x, p)


def _left_pad(prompts):
    P = max(map(len, prompts))
    tokens = np.zeros((len(prompts), P), np.int32)
    real = np.zeros((len(prompts), P), bool)
    for b, r in enumerate(prompts):
        tokens[b, P - len(r):], real[b, P - len(r):] = r, True
    return tokens, real


@functools.partial(jax.jit, static_argnames="slots")
def _padded(params, tokens, real, slots):
    return prefill(params, CFG, tokens, real, slots)


@functools.partial(jax.jit, static_argnames="slots")
def _packed(params, packed, slots):
    return prefill_packed(params, CFG, packed, slots)


@pytest.mark.parametrize("row_len", [None, 20])
def test_packed_prefill_equals_padded_prefill(params, row_len):
    tokens, real = _left_pad(PROMPTS)
    P, slots = tokens.shape[1], tokens.shape[1] + 3
    packed = pack_prompts(PROMPTS, row_len)
    assert packed.tokens_RxL.shape[0] < len(PROMPTS)          # something was packed together
    want_logits, want = _padded(params, tokens, real, slots)
    logits, cache = _packed(params, packed, slots)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache.valid_BxS, want.valid_BxS)
    np.testing.assert_array_equal(cache.pad_B, want.pad_B)
    assert cache.k_NxBxSxGxK.shape == want.k_NxBxSxGxK.shape == (2, len(PROMPTS), slots, 2, 8)
    valid = np.asarray(want.valid_BxS)[None, :, :, None, None]
    for got, ref in ((cache.k_NxBxSxGxK, want.k_NxBxSxGxK), (cache.v_NxBxSxGxK, want.v_NxBxSxGxK)):
        np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, ref, 0),
                                   rtol=1e-5, atol=1e-5)
        assert not np.asarray(got)[~np.broadcast_to(valid, got.shape)].any()  # the rest is zero
    # decoding continues identically from either cache
    nxt = jnp.argmax(want_logits, axis=-1).astype(jnp.int32)
    step_want, _ = decode_step(params, CFG, want, nxt, P)
    step, _ = decode_step(params, CFG, cache, nxt, P)
    np.testing.assert_allclose(step, step_want, rtol=1e-5, atol=1e-5)


def test_prepacked_generation_equals_padded_generation(params):
    want = np.asarray(generate(params, CFG, PROMPTS, 8))
    assert len(set(map(tuple, want.tolist()))) > 1
    np.testing.assert_array_equal(generate(params, CFG, PROMPTS, 8, prepack=True, row_len=16),
                                  want)


def test_prepacked_sampling_equals_padded_sampling(params):
    key = jax.random.key(5)
    np.testing.assert_array_equal(
        generate(params, CFG, PROMPTS, 8, key=key, temperature=1.0, prepack=True),
        generate(params, CFG, PROMPTS, 8, key=key, temperature=1.0))


def test_prepack_errors_name_the_argument(params):
    with pytest.raises(ValueError, match="row_len=12 is used only with prepack=True"):
        generate(params, CFG, PROMPTS, 2, row_len=12)
    with pytest.raises(TypeError, match="prepack"):
        generate(params, CFG, PROMPTS, 2, prepack=1)
    with pytest.raises(ValueError, match=r"row_len=5 is shorter than prompts\[4\] \(9 tokens\)"):
        generate(params, CFG, PROMPTS, 2, prepack=True, row_len=5)
    with pytest.raises(ValueError, match="slots=4 is fewer than the longest prompt"):
        prefill_packed(params, CFG, pack_prompts(PROMPTS), 4)


def test_packed_prefill_through_the_pallas_attention_kernel():
    """The GPU path: the packed rows attend through the Pallas kernel (interpret mode here)."""
    cfg = llama.LlamaConfig(vocab_size=50, d_model=128, n_layers=1, n_heads=2, n_kv_heads=1,
                            d_ff=128, max_seq_len=16)
    p = llama.init_params(jax.random.key(2), cfg)
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3]]
    tokens, real = _left_pad(prompts)
    want_logits, want = prefill(p, cfg, tokens, real, 6)
    packed = jax.tree.map(jnp.asarray, pack_prompts(prompts, 8))
    jaxpr = str(jax.make_jaxpr(
        lambda p: prefill_packed(p, cfg.replace(impl="pallas", interpret=True), packed, 6))(p))
    assert "jaxeff_attention_fwd" in jaxpr
    logits, cache = jax.jit(lambda p: prefill_packed(
        p, cfg.replace(impl="pallas", interpret=True), packed, 6))(p)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)
    valid = np.asarray(want.valid_BxS)[None, :, :, None, None]
    np.testing.assert_allclose(np.where(valid, cache.k_NxBxSxGxK, 0),
                               np.where(valid, want.k_NxBxSxGxK, 0), rtol=1e-4, atol=1e-4)
