"""Reference decoder: packed documents are isolated, presets, config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.models import llama

CFG = llama.LlamaConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                        max_seq_len=32)


def test_packed_equals_separate_documents():
    """Two documents packed in one row give the same logits as each run alone."""
    p = llama.init_params(jax.random.key(0), CFG)
    a = jax.random.randint(jax.random.key(1), (1, 7), 0, 50)
    b = jax.random.randint(jax.random.key(2), (1, 9), 0, 50)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[1] * 7 + [2] * 9])
    pos = jnp.array([list(range(7)) + list(range(9))])
    out = llama.forward(p, packed, CFG, seg, pos)
    np.testing.assert_allclose(out[:, :7], llama.forward(p, a, CFG), atol=1e-5)
    np.testing.assert_allclose(out[:, 7:], llama.forward(p, b, CFG), atol=1e-5)


def test_padding_gives_finite_logits_and_causality():
    p = llama.init_params(jax.random.key(0), CFG)
    x = jax.random.randint(jax.random.key(1), (2, 8), 0, 50)
    seg = jnp.array([[1] * 5 + [0] * 3, [1] * 8])
    out = llama.forward(p, x, CFG, seg)
    assert bool(jnp.all(jnp.isfinite(out)))
    # changing a later token does not change earlier logits
    x2 = x.at[:, 6].set((x[:, 6] + 1) % 50)
    out2 = llama.forward(p, x2, CFG, seg)
    np.testing.assert_allclose(out[:, :6], out2[:, :6], atol=1e-6)
    assert not np.allclose(out[1, 6:], out2[1, 6:])


def test_tied_embeddings_and_shapes():
    cfg = CFG.replace(tie_embeddings=True)
    p = llama.init_params(jax.random.key(0), cfg)
    assert "head" not in p
    assert p["layers"]["wq"].shape == (2, 32, 32) and p["layers"]["wk"].shape == (2, 32, 16)
    out = llama.forward(p, jnp.zeros((1, 4), jnp.int32), cfg)
    assert out.shape == (1, 4, 50)


def test_block_capture_hook():
    p = llama.init_params(jax.random.key(0), CFG)
    lp = jax.tree.map(lambda x: x[0], p["layers"])
    x = llama.embed(p, jnp.zeros((1, 4), jnp.int32), CFG)
    cap = {}
    llama.block(lp, x, CFG, jnp.ones((1, 4), jnp.int32), jnp.arange(4)[None], capture=cap)
    assert set(cap) == {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
    for name, act in cap.items():
        assert act.shape[-1] == lp[name].shape[0], name


def test_presets_abstract_counts():
    counts = {k: llama.param_count(llama.abstract_params(c)) / 1e6 for k, c in llama.PRESETS.items()}
    assert 1.0 <= counts["tiny"] <= 5.0
    assert 110 <= counts["125m"] <= 140 and 330 <= counts["350m"] <= 400
    assert 1000 <= counts["1b"] <= 1500


def test_loss_at_init_is_log_vocab():
    p = llama.init_params(jax.random.key(0), CFG)
    x = jax.random.randint(jax.random.key(3), (2, 16), 0, 50)
    loss, aux = llama.loss_fn(p, {"inputs": x, "targets": x}, CFG)
    assert abs(float(loss) - np.log(50)) < 0.1 and float(aux["tokens"]) == 32


@pytest.mark.parametrize("kw,match", [({"n_heads": 5}, "divisible"), ({"n_kv_heads": 3}, "multiple"),
                                      ({"d_model": 0}, "d_model"), ({"n_layers": -1}, "n_layers")])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        CFG.replace(**kw)


def test_forward_embeds_and_return_layers():
    """forward = forward_embeds(embed(.)); return_layers gives the n_layers + 1 states of the
    same pass, after the final hidden state when return_hidden is also set."""
    p = llama.init_params(jax.random.key(0), CFG)
    x = jax.random.randint(jax.random.key(1), (2, 6), 0, 50)
    out = llama.forward(p, x, CFG)
    np.testing.assert_array_equal(llama.forward_embeds(p, llama.embed(p, x, CFG), CFG), out)
    out2, h, layers = llama.forward(p, x, CFG, return_hidden=True, return_layers=True)
    assert layers.shape == (CFG.n_layers + 1, 2, 6, CFG.d_model)
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(layers[-1], h)
    np.testing.assert_array_equal(layers[0], llama.embed(p, x, CFG))
    _, layers2 = llama.forward(p, x, CFG, return_layers=True)
    np.testing.assert_array_equal(layers2, layers)
    with pytest.raises(ValueError, match="x_BxLxD must be"):
        llama.forward_embeds(p, jnp.zeros((2, 6, 5)), CFG)
