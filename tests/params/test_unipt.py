"""UniPT side network: parity with a NumPy transcription of the reference module, zero init = the
backbone, no backbone gradient (zero, and not even in the backward graph), masks, causality,
parameter count, bad inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.models import bert, llama
from jaxeff.params import lora, partition, combine, tree_size, unipt

# d_ff = 40 appears nowhere else in these shapes: the jaxpr test counts ops by it
BCFG = bert.BertConfig(vocab_size=30, d_model=16, n_layers=2, n_heads=4, d_ff=40, max_positions=12)
LCFG = llama.LlamaConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=24,
                         max_seq_len=32)


def numpy_unipt(side, layers, mask, causal):
    """The reference forward (module_adapter.py), one layer and one token at a time, float64."""
    p = {k: np.asarray(v, np.float64) for k, v in side.items()}
    h = np.asarray(layers, np.float64)
    m = np.asarray(mask, np.float64)
    relu = lambda x: np.maximum(x, 0.0)  # noqa: E731
    N, B, L, _ = h.shape
    anchor = h[-1]
    a = relu(anchor) @ p["anchor_w"] + p["anchor_b"]
    out = np.zeros_like(anchor)
    for b in range(B):
        merged, conf = [], []
        for n in range(N):
            t = relu(h[n, b]) @ p["down_w"][n] + p["down_b"][n]
            rows, gates = [], []
            for i in range(L):
                keys = [j for j in range(L) if m[b, j] > 0 and (not causal or j <= i)]
                w = np.zeros(L)
                for j in keys:
                    w[j] = relu(a[b, i] @ t[j])
                w = w / max(w.sum(), 1e-6)
                rows.append(w @ t + (t[i] if causal else t[0]))
                seen = [j for j in range(L) if m[b, j] > 0 and (not causal or j <= i)]
                mean = t[seen].sum(0) / max(len(seen), 1)
                gates.append((a[b, i] if causal else a[b, 0]) * mean @ p["gate_w"])
            merged.append(np.stack(rows))
            conf.append(np.array(gates))
        c = np.exp(np.stack(conf) - np.max(conf, 0))
        c /= c.sum(0)                                                 # softmax over layers
        z = np.sum(c[..., None] * np.stack(merged), 0)
        out[b] = anchor[b] + relu(z) @ p["up_w"] + p["up_b"]
    return out


def nonzero_side(net, key):
    """Initialised side params with a nonzero up-projection (at init it is zero)."""
    side = net.init(key)
    k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
    side["up_w"] = 0.3 * jax.random.normal(k1, side["up_w"].shape)
    side["up_b"] = 0.1 * jax.random.normal(k2, side["up_b"].shape)
    return side


@pytest.mark.parametrize("causal", [False, True])
def test_matches_the_reference_formulas(causal):
    net = unipt(3, 8, 4, causal=causal)
    side = nonzero_side(net, jax.random.key(0))
    layers = jax.random.normal(jax.random.key(1), (3, 2, 5, 8))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    got = jax.jit(net.apply)(side, layers, mask)
    np.testing.assert_allclose(np.asarray(got), numpy_unipt(side, layers, mask, causal),
                               atol=2e-5)


def test_zero_init_is_the_backbone_and_parameter_count():
    net = unipt(BCFG.n_layers + 1, 16, 6)
    side = net.init(jax.random.key(0))
    assert tree_size(side) == net.param_count() == 3 * 16 * 6 + 3 * 6 + 2 * 16 * 6 + 2 * 6 + 16
    bp = bert.init_params(jax.random.key(0), BCFG)
    ids = jax.random.randint(jax.random.key(2), (2, 5), 0, 30)
    mask = jnp.array([[1] * 5, [1] * 3 + [0] * 2])
    h, layers = bert.forward(bp, ids, BCFG, mask, return_layers=True)
    np.testing.assert_array_equal(net.apply(side, layers, mask), h)
    anchor = h + 1.0
    np.testing.assert_array_equal(net.apply(side, layers, mask, anchor), anchor)


def test_padding_is_masked_on_bert():
    """A padded row's real tokens come out as the same row alone (interaction and means)."""
    net = unipt(BCFG.n_layers + 1, 16, 6)
    side = nonzero_side(net, jax.random.key(3))
    bp = bert.init_params(jax.random.key(0), BCFG)
    ids = jax.random.randint(jax.random.key(2), (1, 4), 0, 30)
    run = jax.jit(lambda ids, mask: net.apply(
        side, bert.forward(bp, ids, BCFG, mask, return_layers=True)[1], mask))
    alone = run(ids, jnp.ones((1, 4)))
    padded = run(jnp.concatenate([ids, jnp.array([[3, 8]])], 1), jnp.array([[1] * 4 + [0] * 2]))
    np.testing.assert_allclose(padded[:, :4], alone, atol=1e-5)


def test_causal_on_llama_sees_no_later_token():
    net = unipt(LCFG.n_layers + 1, 16, 6, causal=True)
    side = nonzero_side(net, jax.random.key(3))
    lp = llama.init_params(jax.random.key(0), LCFG)

    @jax.jit
    def run(ids):
        _, layers = llama.forward(lp, ids, LCFG, return_layers=True)
        return llama.logits(lp, net.apply(side, layers), LCFG)

    ids = jax.random.randint(jax.random.key(2), (1, 6), 0, 50)
    later = ids.at[0, 4].set((ids[0, 4] + 1) % 50)
    a, b = run(ids), run(later)
    np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert not np.allclose(a[:, 4:], b[:, 4:])
    # the non-causal network does see it
    enc = unipt(LCFG.n_layers + 1, 16, 6)
    feats = lambda ids: llama.forward(lp, ids, LCFG, return_layers=True)[1]  # noqa: E731
    assert not np.allclose(enc.apply(side, feats(ids))[:, :4], enc.apply(side, feats(later))[:, :4])


def _count_ops_with_dim(jaxpr, size):
    """Equations (sub-jaxprs included) with an output that has an axis of ``size``."""
    n = 0
    for eqn in jaxpr.eqns:
        if any(size in getattr(v.aval, "shape", ()) for v in eqn.outvars):
            n += 1
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (list, tuple)) else [param]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _count_ops_with_dim(inner, size)
    return n


def test_backbone_gets_no_gradient_and_no_backward_pass():
    net = unipt(BCFG.n_layers + 1, 16, 6)
    side = nonzero_side(net, jax.random.key(3))
    bp = bert.init_params(jax.random.key(0), BCFG)
    ids = jax.random.randint(jax.random.key(2), (2, 5), 0, 30)

    def loss(side, backbone):          # the backbone forward inside the differentiated function
        _, layers = bert.forward(backbone, ids, BCFG, return_layers=True)
        return jnp.sum(net.apply(side, layers) ** 2)

    g_side, g_backbone = jax.grad(loss, argnums=(0, 1))(side, bp)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_backbone))
    assert all(float(jnp.abs(x).max()) > 0.0 for x in jax.tree.leaves(g_side))
    # JAX never builds the backbone's backward: the ops on the MLP width (d_ff = 40) in the
    # gradient program are exactly the forward's
    F = BCFG.d_ff
    fwd = _count_ops_with_dim(jax.make_jaxpr(loss)(side, bp).jaxpr, F)
    bwd = _count_ops_with_dim(jax.make_jaxpr(jax.grad(loss))(side, bp).jaxpr, F)
    assert fwd > 0 and bwd == fwd
    # control: LoRA on the MLP does back-propagate through the backbone
    train, frozen = partition(lora(rank=2, select=r"w_in$").from_dense(jax.random.key(4), bp))
    lora_loss = lambda t: jnp.sum(bert.forward(combine(t, frozen), ids, BCFG) ** 2)  # noqa: E731
    lfwd = _count_ops_with_dim(jax.make_jaxpr(lora_loss)(train).jaxpr, F)
    assert _count_ops_with_dim(jax.make_jaxpr(jax.grad(lora_loss))(train).jaxpr, F) > lfwd


def test_bad_inputs():
    with pytest.raises(ValueError, match="width"):
        unipt(3, 8, 0)
    with pytest.raises(TypeError, match="n_features"):
        unipt(3.0, 8, 4)
    with pytest.raises(TypeError, match="causal"):
        unipt(3, 8, 4, causal="yes")
    net = unipt(3, 8, 4)
    side = net.init(0)
    with pytest.raises(TypeError, match="key"):
        net.init("k")
    layers = jnp.zeros((3, 2, 5, 8))
    with pytest.raises(ValueError, match=r"n_features=3"):
        net.apply(side, jnp.zeros((2, 2, 5, 8)))
    with pytest.raises(ValueError, match=r"d_model=8"):
        net.apply(side, jnp.zeros((3, 2, 5, 7)))
    with pytest.raises(ValueError, match="layers_NxBxLxD"):
        net.apply(side, jnp.zeros((3, 5, 8)))
    with pytest.raises(ValueError, match=r"mask_BxL must have shape \(2, 5\)"):
        net.apply(side, layers, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"anchor_BxLxD must have shape \(2, 5, 8\)"):
        net.apply(side, layers, None, jnp.zeros((2, 5, 9)))
    with pytest.raises(ValueError, match="side leaf 'down_w'"):
        net.apply({**side, "down_w": jnp.zeros((3, 8, 5))}, layers)
    with pytest.raises(ValueError, match="side has"):
        net.apply({k: v for k, v in side.items() if k != "gate_w"}, layers)
