"""BERT encoder: parity with a NumPy transcription of HF BertModel + sentence-transformers pooling."""
import math

import jax
import numpy as np
import pytest

from jaxeff.models import bert

CFG = bert.BertConfig(vocab_size=30, d_model=16, n_layers=2, n_heads=4, d_ff=24, max_positions=12)


def numpy_bert(p, ids, mask, cfg):
    """HF BertModel's forward (eval mode) with the extended attention mask, in float64 NumPy."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), p)
    erf = np.vectorize(math.erf)

    def ln(x, s, b):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * s + b

    B, L = ids.shape
    x = ln(p["tok_embed"][ids] + p["pos_embed"][:L] + p["type_embed"][0],
           p["embed_norm_scale"], p["embed_norm_bias"])
    ext = (1.0 - mask[:, None, None, :]) * np.finfo(np.float32).min
    H, K = cfg.n_heads, cfg.d_model // cfg.n_heads
    for i in range(cfg.n_layers):
        lp = {k: v[i] for k, v in p["layers"].items()}
        heads = lambda y: y.reshape(B, L, H, K).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = (heads(x @ lp[f"w{n}"] + lp[f"b{n}"]) for n in "qkv")
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(K) + ext
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        ctx = (a @ v).transpose(0, 2, 1, 3).reshape(B, L, -1)
        x = ln(x + ctx @ lp["wo"] + lp["bo"], lp["attn_norm_scale"], lp["attn_norm_bias"])
        u = x @ lp["w_in"] + lp["b_in"]
        u = 0.5 * u * (1 + erf(u / math.sqrt(2)))
        x = ln(x + u @ lp["w_out"] + lp["b_out"], lp["mlp_norm_scale"], lp["mlp_norm_bias"])
    m = mask[..., None]
    e = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return x, e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def test_forward_and_sentence_embedding_match_numpy():
    p = bert.init_params(jax.random.key(0), CFG)
    p = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), p)
    ids = np.array(jax.random.randint(jax.random.key(2), (3, 9), 0, 30))
    mask = np.ones((3, 9), np.float32)
    mask[1, 5:], mask[2, 2:] = 0, 0
    h_want, e_want = numpy_bert(p, ids, mask, CFG)
    h = jax.jit(bert.forward, static_argnums=2)(p, ids, CFG, mask)
    np.testing.assert_allclose(np.asarray(h)[mask > 0], h_want[mask > 0], atol=2e-5)
    embed = jax.jit(bert.sentence_embedding, static_argnums=3)
    e = embed(p, ids, mask, CFG)
    np.testing.assert_allclose(np.asarray(e), e_want, atol=2e-6)
    # a padded row embeds exactly like the same sentence alone
    alone = embed(p, ids[1:2, :5], mask[1:2, :5], CFG)
    np.testing.assert_allclose(np.asarray(alone)[0], np.asarray(e)[1], atol=1e-6)


def test_pooler_and_errors():
    p = bert.init_params(jax.random.key(0), CFG)
    h = bert.forward(p, np.zeros((2, 3), np.int32), CFG)
    assert bert.pool(p, h).shape == (2, CFG.d_model)
    no_pool = bert.BertConfig(**{**CFG.__dict__, "pooler": False})
    p2 = bert.init_params(jax.random.key(0), no_pool)
    assert "pooler_w" not in p2
    with pytest.raises(ValueError, match="pooler"):
        bert.pool(p2, h)
    with pytest.raises(ValueError, match="max_positions=12"):
        bert.forward(p, np.zeros((1, 13), np.int32), CFG)
    with pytest.raises(ValueError, match="divisible"):
        bert.BertConfig(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="n_layers"):
        bert.BertConfig(n_layers=0)


def test_embed_encode_and_return_layers():
    """forward = encode(embed(.)); return_layers gives the n_layers + 1 states of that pass."""
    p = bert.init_params(jax.random.key(0), CFG)
    ids = np.array(jax.random.randint(jax.random.key(2), (2, 7), 0, 30))
    mask = np.ones((2, 7), np.int32)
    mask[1, 4:] = 0
    h = bert.forward(p, ids, CFG, mask)
    x = bert.embed(p, ids, CFG)
    np.testing.assert_array_equal(np.asarray(bert.encode(p, x, CFG, mask)), np.asarray(h))
    h2, layers = bert.forward(p, ids, CFG, mask, return_layers=True)
    assert layers.shape == (CFG.n_layers + 1, 2, 7, CFG.d_model)
    np.testing.assert_array_equal(np.asarray(h2), np.asarray(h))
    np.testing.assert_array_equal(np.asarray(layers[-1]), np.asarray(h))
    np.testing.assert_array_equal(np.asarray(layers[0]), np.asarray(x))
    with pytest.raises(ValueError, match="x_BxLxD must be"):
        bert.encode(p, x[..., :4], CFG)
    with pytest.raises(ValueError, match="mask_BxL must have shape"):
        bert.encode(p, x, CFG, mask[:, :3])


def test_lora_applies_unmerged_through_linear():
    """Every projection goes through jaxeff.params.linear: a LoRA-adapted tree runs unmerged
    and equals the merged dense model."""
    from jaxeff.params import LoRA, lora, LoRAWeight
    p = bert.init_params(jax.random.key(0), CFG)
    adapted = lora(rank=2, select=r"layers/w").from_dense(jax.random.key(1), p)
    is_lora = lambda w: isinstance(w, LoRAWeight)  # noqa: E731
    adapted = jax.tree.map(lambda w: w.replace(B=w.B + 0.1) if is_lora(w) else w, adapted,
                           is_leaf=is_lora)          # B = 0 at init: make the adapters count
    ids = np.array(jax.random.randint(jax.random.key(2), (2, 5), 0, 30))
    merged = LoRA.merge(adapted)
    assert not np.allclose(np.asarray(bert.forward(merged, ids, CFG)),
                           np.asarray(bert.forward(p, ids, CFG)))
    np.testing.assert_allclose(np.asarray(bert.forward(adapted, ids, CFG)),
                               np.asarray(bert.forward(merged, ids, CFG)), atol=1e-5)
