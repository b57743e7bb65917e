"""KV-cache generation equals re-running the whole prefix; ragged batches equal rows alone; eos,
nucleus sampling and argument errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.models import generate, llama, sample_token

CFG = llama.LlamaConfig(vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                        max_seq_len=40, tie_embeddings=True)


@pytest.fixture(scope="module")
def params():
    p = llama.init_params(jax.random.key(0), CFG)
    # larger weights than init so the greedy continuation is not one repeated token
    return jax.tree.map(lambda x: x * 8 if x.ndim == 3 else x, p)


_forward = jax.jit(lambda p, x: llama.forward(p, x, CFG))


def greedy_without_cache(params, prompt, n):
    """Re-run the whole prefix each step (on a fixed buffer: the model is causal, so the unwritten
    tail does not change the logits at the last written position; one compile)."""
    buf = np.zeros((1, CFG.max_seq_len), np.int32)
    buf[0, :len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + n):
        buf[0, t] = int(jnp.argmax(_forward(params, buf)[0, t - 1]))
    return buf[0, len(prompt):len(prompt) + n].tolist()


def test_cached_greedy_equals_recomputing_the_prefix_for_a_ragged_batch(params):
    prompts = [[3, 1, 4, 1, 5, 9, 2], [6, 5], [3, 5, 8, 9, 7]]
    out = np.asarray(generate(params, CFG, prompts, 6))
    assert out.shape == (3, 6) and out.dtype == np.int32
    want = [greedy_without_cache(params, p, 6) for p in prompts]
    assert out.tolist() == want
    assert len(set(map(tuple, want))) > 1 and len(set(want[0])) > 1
    # an unpadded [B, P] array and a single [P] prompt
    assert np.asarray(generate(params, CFG, np.array([prompts[0]]), 6)).tolist() == [want[0]]
    assert np.asarray(generate(params, CFG, np.array(prompts[1]), 6)).tolist() == [want[1]]


def test_eos_stops_a_row_and_fills_it(params):
    prompt = [3, 1, 4, 1, 5, 9, 2]
    free = greedy_without_cache(params, prompt, 6)
    eos = free[2]
    first = free.index(eos)
    out = np.asarray(generate(params, CFG, [prompt, [6, 5]], 6, eos_id=eos))[0].tolist()
    assert out[:first + 1] == free[:first + 1] and out[first + 1:] == [eos] * (5 - first)


def test_sampling_is_keyed_and_tiny_top_p_is_greedy(params):
    prompts = [[3, 1, 4], [2, 7, 1, 8]]
    k = jax.random.key(3)
    a = generate(params, CFG, prompts, 8, key=k, temperature=1.0)
    b = generate(params, CFG, prompts, 8, key=k, temperature=1.0)
    c = generate(params, CFG, prompts, 8, key=jax.random.key(4), temperature=1.0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(
        generate(params, CFG, prompts, 8, key=k, temperature=1.0, top_p=1e-6),
        generate(params, CFG, prompts, 8))


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = jax.vmap(lambda k: sample_token(k, logits, 1.0, 0.75))(
        jax.random.split(jax.random.key(0), 2000))[:, 0]
    counts = np.bincount(np.asarray(draws), minlength=4)
    assert counts[2] == counts[3] == 0                       # 0.5 + 0.3 >= 0.75: two tokens
    assert abs(counts[0] / 2000 - 0.5 / 0.8) < 0.05
    full = jax.vmap(lambda k: sample_token(k, logits, 1.0, 1.0))(
        jax.random.split(jax.random.key(1), 2000))[:, 0]
    assert np.bincount(np.asarray(full), minlength=4)[3] > 40   # top_p = 1: all tokens


def test_errors_name_the_argument(params):
    with pytest.raises(ValueError, match="key is required"):
        generate(params, CFG, [[1, 2]], 3, temperature=0.5)
    with pytest.raises(ValueError, match="max_seq_len=40"):
        generate(params, CFG, [[1] * 30], 11)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(params, CFG, [[1, 2]], 0)
    with pytest.raises(ValueError, match="top_p"):
        generate(params, CFG, [[1, 2]], 2, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(params, CFG, [[1, 2]], 2, temperature=-1.0)
    with pytest.raises(ValueError, match=r"prompt_ids must be in \[0, 37\)"):
        generate(params, CFG, [[1, 37]], 2)
    with pytest.raises(ValueError, match="non-empty"):
        generate(params, CFG, [[1, 2], []], 2)
    with pytest.raises(TypeError, match="integer"):
        generate(params, CFG, np.array([[1.0, 2.0]]), 2)


def test_next_token_loss_shifts_the_stream(params):
    toks = jnp.array([3, 1, 4, 1, 5, 9, 2, 6])
    logits = llama.forward(params, toks[None, :-1], CFG)
    want = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[0]), toks[1:, None], 1))
    np.testing.assert_allclose(llama.next_token_loss(params, toks, CFG), want, rtol=1e-6)
    np.testing.assert_allclose(llama.next_token_loss(params, toks[None], CFG), want, rtol=1e-6)
    with pytest.raises(ValueError, match="T >= 2"):
        llama.next_token_loss(params, toks[:1], CFG)


def test_eft_with_caches_equals_the_uncached_eft_sampler(params):
    from jaxeff.losses import eft_generate
    from jaxeff.models import generate_eft
    small = CFG.replace(d_model=16, n_heads=2, n_kv_heads=1, d_ff=24)
    sft = jax.tree.map(lambda x: x * 8 if x.ndim == 3 else x,
                       llama.init_params(jax.random.key(5), small))
    sb = jax.tree.map(lambda x: x * 8 if x.ndim == 3 else x,
                      llama.init_params(jax.random.key(6), small))
    models = [(params, CFG), (sft, small), (sb, small)]
    prompt = np.array([[3, 1, 4, 1, 5], [2, 7, 1, 8, 2]])
    fns = [jax.jit(lambda x, p=p, c=c: llama.forward(p, x, c)) for p, c in models]
    want = eft_generate(jax.random.key(0), fns, prompt, 6, beta=1.0, temperature=0.0)
    got = generate_eft(models, prompt, 6, beta=1.0)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want)[:, 5:])
    np.testing.assert_array_equal(generate_eft(models, prompt, 6, beta=0.0),
                                  generate(params, CFG, prompt, 6))
    assert not np.array_equal(np.asarray(got), np.asarray(generate(params, CFG, prompt, 6)))
    with pytest.raises(ValueError, match="three"):
        generate_eft(models[:2], prompt, 2)
    with pytest.raises(ValueError, match="vocabulary"):
        generate_eft([models[0], models[1], (sb, small.replace(vocab_size=38))], prompt, 2)
