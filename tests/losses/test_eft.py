"""Tests for jaxeff.losses.eft: the EFT combination, its sampler and the decoding loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.losses import _eft as eft
from jaxeff.losses import eft_generate

eft_logprobs = jax.jit(eft.eft_logprobs)
eft_sample = jax.jit(eft.eft_sample, static_argnames=("temperature",))


def _logits(seed, shape=(2, 3, 7), scale=2.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def test_beta_zero_is_the_large_base_model():
    lb, ft, sb = _logits(0), _logits(1), _logits(2)
    np.testing.assert_allclose(eft.eft_logprobs(lb, ft, sb, beta=0.0),
                               jax.nn.log_softmax(lb, -1), atol=1e-6)
    # an unchanged small model (ft == base) also leaves the large model alone, for any beta
    np.testing.assert_allclose(eft_logprobs(lb, sb, sb, beta=3.0),
                               jax.nn.log_softmax(lb, -1), atol=1e-6)


def test_hand_computed_product_of_experts():
    lb = jnp.log(jnp.array([0.5, 0.3, 0.2]))
    ft = jnp.log(jnp.array([0.2, 0.6, 0.2]))
    sb = jnp.log(jnp.array([0.4, 0.4, 0.2]))
    for beta in (1.0, 0.5, 2.0):
        q = np.array([0.5, 0.3, 0.2]) * (np.array([0.2, 0.6, 0.2]) / np.array([0.4, 0.4, 0.2])
                                          ) ** beta
        np.testing.assert_allclose(np.exp(eft_logprobs(lb, ft, sb, beta=beta)), q / q.sum(),
                                   rtol=1e-5)
    # traced beta works under jit
    f = jax.jit(lambda b: eft_logprobs(lb, ft, sb, beta=b))
    np.testing.assert_allclose(f(jnp.float32(0.5)), eft_logprobs(lb, ft, sb, beta=0.5),
                               rtol=1e-6)


def test_sampling_is_pure_greedy_at_zero_and_matches_distribution():
    lb, ft, sb = _logits(3, (5,)), _logits(4, (5,)), _logits(5, (5,))
    logp = eft_logprobs(lb, ft, sb)
    assert int(eft_sample(jax.random.key(0), lb, ft, sb, temperature=0.0)) == int(
        jnp.argmax(logp))
    keys = jax.random.split(jax.random.key(7), 4000)
    draws = jax.jit(jax.vmap(lambda k: eft.eft_sample(k, lb, ft, sb)))(keys)
    freq = np.bincount(np.asarray(draws), minlength=5) / 4000
    np.testing.assert_allclose(freq, np.exp(logp), atol=0.03)
    a = eft_sample(jax.random.key(1), lb, ft, sb)
    b = eft_sample(jax.random.key(1), lb, ft, sb)
    assert int(a) == int(b)


def test_generate_beta_zero_greedy_equals_greedy_decoding_of_large_base():
    V = 6
    tables = [jnp.asarray(_logits(i, (V, V), 3.0)) for i in range(3)]
    # a "causal LM" whose next-token logits depend on the current token only
    fns = [lambda toks, t=t: t[toks] for t in tables]
    prompt = jnp.array([[1, 2], [3, 0]], jnp.int32)
    out = jax.jit(lambda k, p: eft_generate(k, fns, p, 5, beta=0.0, temperature=0.0))(
        jax.random.key(0), prompt)
    assert out.shape == (2, 7)
    np.testing.assert_array_equal(out[:, :2], prompt)
    want = np.array(prompt)
    for _ in range(5):
        nxt = np.argmax(np.asarray(tables[0])[want[:, -1]], -1)
        want = np.concatenate([want, nxt[:, None]], 1)
    np.testing.assert_array_equal(out, want)
    # with beta = 1 and sampling: deterministic in the key, tokens in range
    gen = jax.jit(lambda k: eft_generate(k, fns, prompt, 4))
    s1, s2 = gen(jax.random.key(3)), gen(jax.random.key(3))
    np.testing.assert_array_equal(s1, s2)
    assert int(s1.min()) >= 0 and int(s1.max()) < V


@pytest.mark.parametrize("call, match", [
    (lambda: eft.eft_logprobs(jnp.zeros((2, 5)), jnp.zeros((2, 5)), jnp.zeros((2, 4))), "same shape"),
    (lambda: eft.eft_logprobs(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3), beta=float("inf")), "beta"),
    (lambda: eft.eft_sample(jax.random.key(0), jnp.zeros(3), jnp.zeros(3), jnp.zeros(3),
                        temperature=-0.5), "temperature"),
    (lambda: eft_generate(jax.random.key(0), [lambda x: x] * 2, jnp.zeros((1, 2), jnp.int32), 3),
     "three callables"),
    (lambda: eft_generate(jax.random.key(0), [lambda x: x] * 3, jnp.zeros((1, 2), jnp.int32), 0),
     "max_new_tokens"),
    (lambda: eft_generate(jax.random.key(0), [lambda x: x] * 3, jnp.zeros((2,), jnp.int32), 2),
     "prompt"),
])
def test_bad_inputs(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize("call, err, match", [
    (lambda: eft.eft_logprobs(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3), beta=float("nan")),
     ValueError, "beta must be a finite number; got nan"),
    (lambda: eft.eft_logprobs(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3), beta="1"),
     TypeError, "beta must be a number or an array"),
    (lambda: eft.eft_sample(jax.random.key(0), jnp.zeros(3), jnp.zeros(3), jnp.zeros(3),
                            temperature="1"), TypeError, "temperature .* must be a real number"),
    (lambda: eft.eft_sample(jax.random.key(0), jnp.zeros(3), jnp.zeros(3), jnp.zeros(3),
                            temperature=float("nan")), ValueError, "temperature"),
    (lambda: eft_generate(jax.random.key(0), [lambda x: x] * 3, jnp.zeros((1, 2), jnp.int32),
                          2.0), TypeError, "max_new_tokens must be an int >= 1; got 2.0"),
])
def test_bad_input_types_and_non_finite(call, err, match):
    with pytest.raises(err, match=match):
        call()
