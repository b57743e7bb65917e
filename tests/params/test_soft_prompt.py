"""Soft prompts (prompt tuning, PVP init): identity at P = 0, masks, positions and segments on both
reference models, gradients reach only the prompts, bad inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.models import bert, llama
from jaxeff.params import init_prompts, prepend_prompts, strip_prompts, tree_size

BCFG = bert.BertConfig(vocab_size=30, d_model=16, n_layers=2, n_heads=4, d_ff=24, max_positions=12)
LCFG = llama.LlamaConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=24,
                         max_seq_len=32)


def bert_prompted(params, prompts, ids, mask):
    x = prepend_prompts(prompts, bert.embed(params, ids, BCFG), mask)
    return strip_prompts(bert.encode(params, x.x, BCFG, x.mask), prompts.shape[0])


def test_zero_prompts_are_the_plain_models():
    bp = bert.init_params(jax.random.key(0), BCFG)
    lp = llama.init_params(jax.random.key(0), LCFG)
    ids = jax.random.randint(jax.random.key(1), (2, 6), 0, 30)
    mask = jnp.array([[1] * 6, [1] * 4 + [0] * 2])
    none = init_prompts(0, 0, 16)
    assert none.shape == (0, 16)
    np.testing.assert_array_equal(bert_prompted(bp, none, ids, mask),
                                  bert.forward(bp, ids, BCFG, mask))
    seg = jnp.array([[1] * 6, [1] * 4 + [0] * 2])
    x = prepend_prompts(none, llama.embed(lp, ids, LCFG), segment_ids_BxL=seg,
                        positions_BxL=jnp.broadcast_to(jnp.arange(6), (2, 6)))
    np.testing.assert_array_equal(
        llama.forward_embeds(lp, x.x, LCFG, x.segment_ids, x.positions),
        llama.forward(lp, ids, LCFG, seg))


def test_llama_prompts_equal_to_token_embeddings_equal_the_concatenated_text():
    """Prompts set to the embeddings of a token prefix reproduce the model on [prefix; text]:
    positions 0..P-1 then pos + P, one segment."""
    lp = llama.init_params(jax.random.key(0), LCFG)
    prefix = jax.random.randint(jax.random.key(1), (3,), 0, 50)
    ids = jax.random.randint(jax.random.key(2), (2, 5), 0, 50)
    prompts = lp["embed"][prefix]
    want = llama.forward(lp, jnp.concatenate([jnp.broadcast_to(prefix, (2, 3)), ids], 1), LCFG)
    x = prepend_prompts(prompts, llama.embed(lp, ids, LCFG),
                        segment_ids_BxL=jnp.ones((2, 5), jnp.int32),
                        positions_BxL=jnp.broadcast_to(jnp.arange(5), (2, 5)))
    np.testing.assert_array_equal(x.positions[0], [0, 1, 2, 3, 4, 5, 6, 7])
    np.testing.assert_allclose(llama.forward_embeds(lp, x.x, LCFG, x.segment_ids, x.positions),
                               want, atol=1e-5)
    # the defaults (one segment, 0..T-1) are the same thing
    np.testing.assert_allclose(llama.forward_embeds(lp, x.x, LCFG), want, atol=1e-5)


def test_llama_padding_left_or_right_does_not_change_the_real_tokens():
    lp = llama.init_params(jax.random.key(0), LCFG)
    prompts = init_prompts(jax.random.key(3), 2, 16, std=0.5)
    ids = jax.random.randint(jax.random.key(2), (1, 4), 0, 50)

    def run(ids, seg, pos):
        x = prepend_prompts(prompts, llama.embed(lp, ids, LCFG), segment_ids_BxL=seg,
                            positions_BxL=pos)
        return strip_prompts(llama.forward_embeds(lp, x.x, LCFG, x.segment_ids, x.positions), 2)

    alone = run(ids, jnp.full((1, 4), 3), jnp.arange(4)[None])
    pad = jnp.array([[7, 7]])
    right = run(jnp.concatenate([ids, pad], 1), jnp.array([[3] * 4 + [0] * 2]),
                jnp.array([[0, 1, 2, 3, 0, 0]]))
    left = run(jnp.concatenate([pad, ids], 1), jnp.array([[0] * 2 + [3] * 4]),
               jnp.array([[0, 0, 0, 1, 2, 3]]))
    np.testing.assert_allclose(right[:, :4], alone, atol=1e-5)
    np.testing.assert_allclose(left[:, 2:], alone, atol=1e-5)
    # the prompts are seen: other prompts, other logits
    x = prepend_prompts(prompts + 1.0, llama.embed(lp, ids, LCFG))
    assert not np.allclose(strip_prompts(llama.forward_embeds(lp, x.x, LCFG), 2), alone)


def test_bert_padding_is_masked_and_prompts_are_not():
    bp = bert.init_params(jax.random.key(0), BCFG)
    bp = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(5), x.shape), bp)
    prompts = init_prompts(jax.random.key(3), 3, 16, std=1.0)
    ids = jax.random.randint(jax.random.key(2), (1, 4), 0, 30)
    alone = bert_prompted(bp, prompts, ids, jnp.ones((1, 4)))
    padded = jnp.concatenate([ids, jnp.array([[5, 9, 2]])], 1)
    out = bert_prompted(bp, prompts, padded, jnp.array([[1] * 4 + [0] * 3]))
    assert out.shape == (1, 7, 16)
    np.testing.assert_allclose(out[:, :4], alone, atol=1e-5)
    x = prepend_prompts(prompts, bert.embed(bp, ids, BCFG), jnp.ones((1, 4), jnp.int32))
    np.testing.assert_array_equal(x.mask, [[1] * 7])
    np.testing.assert_array_equal(x.x[0, :3], prompts)
    assert x.segment_ids is None and x.positions is None
    assert not np.allclose(bert_prompted(bp, prompts * 2.0, ids, jnp.ones((1, 4))), alone)


def test_gradient_reaches_only_the_prompts():
    bp = bert.init_params(jax.random.key(0), BCFG)
    prompts = init_prompts(jax.random.key(3), 4, 16)
    ids = jax.random.randint(jax.random.key(2), (2, 5), 0, 30)
    loss = lambda pr, p: jnp.sum(bert_prompted(p, pr, ids, jnp.ones((2, 5))) ** 2)  # noqa: E731
    g = jax.grad(loss)(prompts, bp)
    assert g.shape == (4, 16) and float(jnp.abs(g).max()) > 0
    assert tree_size(prompts) == 4 * 16


def test_pvp_init_copies_the_source():
    src = init_prompts(jax.random.key(0), 3, 8)
    p = init_prompts(None, 3, 8, source=src)
    np.testing.assert_array_equal(p, src)
    assert p is not src
    assert init_prompts(None, 3, 8, source=src, dtype=jnp.bfloat16).dtype == jnp.bfloat16
    std = float(jnp.std(init_prompts(jax.random.key(1), 64, 64, std=0.5)))
    assert 0.45 < std < 0.55


def test_bad_inputs():
    src = jnp.zeros((3, 8))
    with pytest.raises(ValueError, match=r"source must have shape .* \(3, 9\)"):
        init_prompts(None, 3, 9, source=src)
    with pytest.raises(TypeError, match="key must be None when source"):
        init_prompts(0, 3, 8, source=src)
    with pytest.raises(TypeError, match="key must be a jax.random key"):
        init_prompts(None, 3, 8)
    with pytest.raises(ValueError, match="non-finite"):
        init_prompts(None, 3, 8, source=src.at[0, 0].set(jnp.nan))
    with pytest.raises(TypeError, match="source must be floating"):
        init_prompts(None, 3, 8, source=jnp.zeros((3, 8), jnp.int32))
    with pytest.raises(ValueError, match="n_prompts"):
        init_prompts(0, -1, 8)
    with pytest.raises(TypeError, match="n_prompts"):
        init_prompts(0, 2.0, 8)
    with pytest.raises(ValueError, match="std"):
        init_prompts(0, 2, 8, std=0.0)
    with pytest.raises(TypeError, match="dtype"):
        init_prompts(0, 2, 8, dtype=jnp.int32)
    x = jnp.zeros((2, 5, 8))
    with pytest.raises(ValueError, match=r"prompts_PxD must be \[n_prompts, 8\]"):
        prepend_prompts(jnp.zeros((3, 7)), x)
    with pytest.raises(ValueError, match="prompts_PxD"):
        prepend_prompts(jnp.zeros(8), x)
    with pytest.raises(ValueError, match="x_BxLxD"):
        prepend_prompts(src, jnp.zeros((5, 8)))
    with pytest.raises(ValueError, match=r"mask_BxL must have shape .* \(2, 5\)"):
        prepend_prompts(src, x, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="segment_ids_BxL"):
        prepend_prompts(src, x, segment_ids_BxL=jnp.ones((5,)))
    with pytest.raises(ValueError, match="positions_BxL"):
        prepend_prompts(src, x, positions_BxL=jnp.ones((1, 5)))
    with pytest.raises(ValueError, match="at least n_prompts=6"):
        strip_prompts(x, 6)
    with pytest.raises(ValueError, match="n_prompts"):
        strip_prompts(x, -1)
