"""GPTQ on flax NNX models without editing their forward (jaxeff.params.gptq_nnx), and
list_layers on NNX's integer-keyed layer dicts."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.params import (capture_linear_inputs, gptq, gptq_model, gptq_nnx, hessian_init,
                           hessian_update, list_layers, QuantizedWeight, rtn_weight)

V, D, T = 64, 32, 16


class Block(nnx.Module):
    def __init__(self, rngs):
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=D, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, 2 * D, rngs=rngs)
        self.down = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        mask = nnx.make_causal_mask(jnp.ones(x.shape[:2]))
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class TinyLM(nnx.Module):
    def __init__(self, rngs, n_layers=1):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.layers = nnx.List([Block(rngs) for _ in range(n_layers)])
        self.ln = nnx.LayerNorm(D, rngs=rngs)
        self.lm_head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln(x))


def _tokens(seed, n, b=4):
    """Correlated token streams (random walks mod V), so the linear inputs are anisotropic."""
    rng = np.random.default_rng(seed)
    return [jnp.asarray(np.cumsum(rng.integers(0, 3, (b, T)), axis=1) % V, jnp.int32)
            for _ in range(n)]


def _rtn_model(model, bits, group_size):
    out = nnx.clone(model)
    for _, mod in nnx.iter_graph(out):
        if isinstance(mod, (nnx.Linear, nnx.LinearGeneral)):
            k = mod.kernel.get_value()
            n = len(mod.axis) if isinstance(mod, nnx.LinearGeneral) else 1
            w = k.reshape(math.prod(k.shape[:n]), -1)
            mod.kernel.set_value(rtn_weight(w, bits, group_size).materialize().reshape(k.shape))
    return out


def test_tiny_transformer_close_to_fp32_and_beats_rtn():
    model = TinyLM(nnx.Rngs(0))
    calib, held = _tokens(0, 4), _tokens(1, 3)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    q4, stats = gptq_nnx(model, calib, 4, 8, return_stats=True)
    # every linear of the forward, in forward order (q/k/v share one input)
    assert [p for p, _ in stats["errors"]] == [
        "layers/0/attn/query/kernel", "layers/0/attn/key/kernel", "layers/0/attn/value/kernel",
        "layers/0/attn/out/kernel", "layers/0/up/kernel", "layers/0/down/kernel",
        "lm_head/kernel"]
    # the user's model is untouched; the copy holds the dequantized codes
    jax.tree.map(np.testing.assert_array_equal, before,
                 jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model))))
    qw = stats["quantized"]["layers/0/attn/out/kernel"]
    assert isinstance(qw, QuantizedWeight) and qw.shape == (D, D)
    np.testing.assert_array_equal(np.asarray(qw.materialize()).reshape(4, D // 4, D),
                                  np.asarray(q4.layers[0].attn.out.kernel.get_value()))
    np.testing.assert_array_equal(np.asarray(q4.embed.embedding.get_value()),
                                  np.asarray(model.embed.embedding.get_value()))

    fwd = nnx.jit(lambda m, x: m(x))
    ref = [fwd(model, x) for x in held]

    def err(m):
        return float(np.mean([jnp.mean((fwd(m, x) - r) ** 2) for x, r in zip(held, ref)]))
    scale = float(np.mean([jnp.mean(r ** 2) for r in ref]))
    # 4 bits: close to fp32 (measured 0.7% of the output's mean square), and GPTQ beats RTN on
    # held-out inputs (measured 3x lower squared error)
    assert err(q4) < 0.02 * scale
    assert err(q4) < 0.6 * err(_rtn_model(model, 4, 8))


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.gelu(self.up(x)))


def test_sequential_matches_manual_gptq():
    mlp = MLP(nnx.Rngs(1))
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((16, 16)) * np.geomspace(1, 0.05, 16)[:, None]
    calib = [jnp.asarray(rng.standard_normal((8, 16)) @ mix, jnp.float32) for _ in range(3)]
    q = gptq_nnx(mlp, calib, 3, 8)
    # manual reference: the input of `down` goes through the already quantized `up`
    h = hessian_init(16)
    for x in calib:
        h = hessian_update(h, x)
    up = gptq(mlp.up.kernel.get_value(), h, 3, 8).materialize()
    h = hessian_init(32)
    for x in calib:
        h = hessian_update(h, nnx.gelu(x @ up + mlp.up.bias.get_value()))
    down = gptq(mlp.down.kernel.get_value(), h, 3, 8).materialize()
    np.testing.assert_allclose(np.asarray(q.up.kernel.get_value()), np.asarray(up), atol=1e-6)
    np.testing.assert_allclose(np.asarray(q.down.kernel.get_value()), np.asarray(down),
                               atol=1e-6)
    # block mode: both quantized from the fp32 inputs, so `down` differs
    qb = gptq_nnx(mlp, calib, 3, 8, block=r"")
    np.testing.assert_allclose(np.asarray(qb.up.kernel.get_value()), np.asarray(up), atol=1e-6)
    assert not np.allclose(np.asarray(qb.down.kernel.get_value()), np.asarray(down))
    # select: only `down`
    qd = gptq_nnx(mlp, calib, 3, 8, select=r"down")
    np.testing.assert_array_equal(np.asarray(qd.up.kernel.get_value()),
                                  np.asarray(mlp.up.kernel.get_value()))


def test_gptq_nnx_bad_inputs():
    mlp = MLP(nnx.Rngs(1))
    calib = [jnp.ones((4, 16))]
    with pytest.raises(ValueError, match="matches no leaf"):
        gptq_nnx(mlp, calib, 4, select="nothing")
    with pytest.raises(ValueError, match="never calls.*down"):
        gptq_nnx(mlp, calib, 4, select="up|down", forward=lambda m, x: m.up(x))
    with pytest.raises(ValueError, match="calibration_batches is empty"):
        gptq_nnx(mlp, [], 4)
    with pytest.raises(ValueError, match="bits must be one of"):
        gptq_nnx(mlp, calib, 6)
    with pytest.raises(TypeError, match="model must be an nnx.Module"):
        gptq_nnx({"w": jnp.ones((4, 4))}, calib, 4)
    with pytest.raises(TypeError, match="forward must be"):
        gptq_nnx(mlp, calib, 4, forward="call")
    with pytest.raises(ValueError, match="token_mask shape"):
        gptq_nnx(mlp, calib, 4, token_mask=lambda b: jnp.ones((3,), bool))


def test_capture_linear_inputs_restores_classes():
    mlp = MLP(nnx.Rngs(1))
    seen = []
    original = nnx.Linear.__call__
    with capture_linear_inputs(lambda m, x: seen.append((m is mlp.up, x.shape))):
        mlp(jnp.ones((2, 16)))
    assert seen == [(True, (2, 16)), (False, (2, 32))]
    assert nnx.Linear.__call__ is original
    mlp(jnp.ones((2, 16)))
    assert len(seen) == 2


def test_list_layers_on_integer_keyed_dict():
    # nnx.state / nnx.to_pure_dict hold a list of modules as {0: ..., 1: ...}
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.5, jnp.float32)  # noqa: E731
    params = {"emb": f(40, 8), "layers": {0: {"a": f(8, 8)}, 1: {"a": f(8, 8)}}}
    calib = [{"inputs": jnp.asarray(rng.integers(0, 40, (2, 8)), jnp.int32)} for _ in range(2)]

    def layer(lp, x, batch, capture):
        if capture is not None:
            capture["a"] = x
        return jnp.tanh(x @ lp["a"])

    model = list_layers(lambda p, b: p["emb"][b["inputs"]], layer)
    q = gptq_model(params, model, calib, 4, select="layers/1/a", progress=False)
    assert set(q["layers"]) == {0, 1}
    assert q["layers"][0]["a"] is params["layers"][0]["a"]
    assert isinstance(q["layers"][1]["a"], QuantizedWeight)
