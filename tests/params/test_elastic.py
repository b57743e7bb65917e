"""Tests for jaxeff.params.elastic, with the LLaMA adapter (spec + sub-model config)."""
import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.models import llama
from jaxeff.params import ElasticSize, elastic_loss, extract_subnetwork, resolve_size, spec_units

CFG = llama.LlamaConfig(vocab_size=32, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48,
                        max_seq_len=16)


# ----------------------------------------------------------------------------- llama adapter
def llama_spec(cfg):
    """Width spec of the reference LLaMA: MLP hidden units and KV-head groups (each KV head with
    its n_heads / n_kv_heads query heads)."""
    return {"mlp": [(r"layers/(w_gate|w_up)$", -1, "out"), (r"layers/w_down$", -2, "in")],
            "heads": {"units": cfg.n_kv_heads, "axes": [(r"layers/(wq|wk|wv)$", -1, "out"),
                                                        (r"layers/wo$", -2, "in")]}}


def sub_config(cfg, size: ElasticSize):
    """A config object for ``llama.forward`` of a resolved sub-network size: same head_dim, fewer
    heads (LlamaConfig derives head_dim from d_model / n_heads, so a namespace is used)."""
    g = size.widths["heads"]
    return types.SimpleNamespace(**{
        **dataclasses.asdict(cfg), "n_layers": len(size.layers) if size.layers else cfg.n_layers,
        "d_ff": size.widths["mlp"], "n_kv_heads": g, "n_heads": g * (cfg.n_heads // cfg.n_kv_heads),
        "head_dim": cfg.head_dim})


_PARAMS = []


def params():
    if not _PARAMS:  # numpy init of the model's shapes: no XLA compile (CI CPU time)
        r = np.random.default_rng(0)
        _PARAMS.append(jax.tree.map(
            lambda a: jnp.asarray(r.normal(size=a.shape) * 0.1 if len(a.shape) > 1
                                  else 1.0 + 0.1 * r.normal(size=a.shape), a.dtype),
            llama.abstract_params(CFG)))
    return _PARAMS[0]


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 8)), jnp.int32)


def test_full_size_is_the_identity():
    p = params()
    spec = llama_spec(CFG)
    for kw in (dict(), dict(layers=3, widths=1.0), dict(layers=None, widths={"mlp": 48}),
               dict(layers=[0, 1, 2], widths={"heads": 2, "mlp": 48})):
        out = extract_subnetwork(p, spec, **kw)
        assert jax.tree.structure(out) == jax.tree.structure(p)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(p)):
            np.testing.assert_array_equal(a, b)


def test_shapes_and_prefix_slices():
    p = params()
    sub = extract_subnetwork(p, llama_spec(CFG), layers=2, widths={"mlp": 16, "heads": 1})
    hd = CFG.head_dim
    assert sub["layers"]["w_up"].shape == (2, 32, 16)
    assert sub["layers"]["w_down"].shape == (2, 16, 32)
    assert sub["layers"]["wq"].shape == (2, 32, 2 * hd)           # one KV group = 2 query heads
    assert sub["layers"]["wk"].shape == (2, 32, hd)
    assert sub["layers"]["wo"].shape == (2, 2 * hd, 32)
    assert sub["layers"]["attn_norm"].shape == (2, 32) and sub["embed"].shape == (32, 32)
    np.testing.assert_array_equal(sub["layers"]["w_up"], p["layers"]["w_up"][:2, :, :16])
    np.testing.assert_array_equal(sub["layers"]["wq"], p["layers"]["wq"][:2, :, :2 * hd])
    np.testing.assert_array_equal(sub["layers"]["wo"], p["layers"]["wo"][:2, :2 * hd])
    assert spec_units(p, llama_spec(CFG)) == {"mlp": 48, "heads": 2}
    # fraction of every dimension; explicit layer indices
    r = resolve_size(p, llama_spec(CFG), (None, 0.5))
    assert r.widths == {"mlp": 24, "heads": 1} and r.layers is None
    sub = extract_subnetwork(p, None, layers=[2, 0])
    np.testing.assert_array_equal(sub["layers"]["wq"][0], p["layers"]["wq"][2])


def test_sub_model_equals_full_model_with_the_dropped_units_zeroed():
    p = params()
    n, k_mlp, g = 2, 16, 1
    hd, R = CFG.head_dim, CFG.n_heads // CFG.n_kv_heads
    size = resolve_size(p, llama_spec(CFG), (n, {"mlp": k_mlp, "heads": g}))
    sub = extract_subnetwork(p, llama_spec(CFG), layers=n, widths={"mlp": k_mlp, "heads": g})
    lay = dict(p["layers"])
    lay["w_down"] = lay["w_down"].at[:, k_mlp:].set(0.0)           # dropped MLP units: no output
    lay["wo"] = lay["wo"].at[:, g * R * hd:].set(0.0)              # dropped heads: no output
    lay["w_down"] = lay["w_down"].at[n:].set(0.0)                   # dropped layers: identity
    lay["wo"] = lay["wo"].at[n:].set(0.0)
    zeroed = {**p, "layers": lay}
    full = jax.jit(lambda q: llama.forward(q, TOKENS, CFG))(zeroed)
    small = jax.jit(lambda q: llama.forward(q, TOKENS, sub_config(CFG, size)))(sub)
    np.testing.assert_allclose(small, full, rtol=2e-5, atol=2e-5)


def toy_params():
    r = np.random.default_rng(3)
    f = lambda *sh: jnp.asarray(r.normal(size=sh) * 0.3, jnp.float32)  # noqa: E731
    return {"embed": f(11, 8), "layers": {"up": f(3, 8, 12), "down": f(3, 12, 8)},
            "head": f(8, 11)}


def toy_loss(sp, batch, size):
    """A residual MLP LM over stacked layers (cheap to compile, unlike the LLaMA scan)."""
    del size  # shapes carry the sub-network size
    x = sp["embed"][batch["inputs"]]
    for i in range(sp["layers"]["up"].shape[0]):
        x = x + jax.nn.relu(x @ sp["layers"]["up"][i]) @ sp["layers"]["down"][i]
    logp = jax.nn.log_softmax(x @ sp["head"], -1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    return jnp.mean(nll), {"tokens": jnp.asarray(nll.size, jnp.float32)}


def test_elastic_loss_sums_sizes_and_gradients_reach_the_shared_params():
    p = toy_params()
    toks = TOKENS % 11
    batch = {"inputs": toks, "targets": jnp.roll(toks, -1, 1)}
    spec = {"hidden": [(r"layers/up$", -1, "out"), (r"layers/down$", -2, "in")]}
    sizes = [(1, 0.5), (2, {"hidden": 8}), ElasticSize(None, None)]
    loss = elastic_loss(toy_loss, spec, sizes, weights=[1.0, 0.5, 1.0])
    (total, aux), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(p, batch)
    parts = jax.jit(lambda q: [toy_loss(extract_subnetwork(q, spec, layers=n, widths=w), batch,
                                        None)[0] for n, w in sizes])
    manual = [float(x) for x in parts(p)]
    sub = extract_subnetwork(p, spec, layers=1, widths=0.5)
    assert sub["layers"]["up"].shape == (1, 8, 6)
    assert float(total) == pytest.approx(manual[0] + 0.5 * manual[1] + manual[2], rel=1e-5)
    assert float(aux["loss_1"]) == pytest.approx(manual[1], rel=1e-5)
    assert float(jnp.abs(g["layers"]["down"][2]).sum()) > 0.0     # the full size trains layer 3
    # only the smallest size: no gradient outside its units / layers
    small = elastic_loss(toy_loss, spec, [(1, {"hidden": 6})])
    gs = jax.jit(jax.grad(lambda q: small(q, batch)[0]))(p)
    assert float(jnp.abs(gs["layers"]["down"][1:]).sum()) == 0.0
    assert float(jnp.abs(gs["layers"]["down"][:1, 6:]).sum()) == 0.0
    assert float(jnp.abs(gs["layers"]["down"][:1, :6]).sum()) > 0.0
    assert float(jnp.abs(gs["head"]).sum()) > 0.0


def test_per_layer_layout_depth_and_width():
    r = np.random.default_rng(0)
    p = {"blocks": [{"up": jnp.asarray(r.normal(size=(4, 6))),
                     "down": jnp.asarray(r.normal(size=(6, 4)))} for _ in range(3)]}
    spec = {"hidden": [(r"up$", -1, "out"), (r"down$", -2, "in")]}
    sub = extract_subnetwork(p, spec, layers=2, widths={"hidden": 2}, layers_path="blocks")
    assert len(sub["blocks"]) == 2 and sub["blocks"][1]["up"].shape == (4, 2)
    np.testing.assert_array_equal(sub["blocks"][1]["down"], p["blocks"][1]["down"][:2])


@pytest.mark.parametrize("kw, exc, match", [
    (dict(layers=4), ValueError, "4 layers but the model has 3"),
    (dict(layers=[0, 3]), ValueError, r"\[0, 3\)"),
    (dict(widths={"mlp": 49}), ValueError, "larger than the model"),
    (dict(widths={"depth": 2}), ValueError, "lacks"),
    (dict(widths=1.5), ValueError, "fraction"),
    (dict(widths=0.0), ValueError, "fraction"),
    (dict(layers=0), ValueError, ">= 1"),
])
def test_bad_sizes(kw, exc, match):
    with pytest.raises(exc, match=match):
        extract_subnetwork(params(), llama_spec(CFG), **kw)


def test_bad_specs_and_loss_construction():
    p = params()
    with pytest.raises(ValueError, match="needs a spec"):
        extract_subnetwork(p, None, widths=0.5)
    with pytest.raises(ValueError, match="role"):
        extract_subnetwork(p, {"mlp": [(r"w_up$", -1, "grow")]}, widths=0.5)
    with pytest.raises(ValueError, match="disagree"):      # heads without 'units'
        spec_units(p, {"heads": [(r"layers/(wq|wk)$", -1, "out")]})
    with pytest.raises(ValueError, match="matches no leaf"):
        spec_units(p, {"mlp": [(r"nothing$", -1, "out")]})
    with pytest.raises(ValueError, match="non-empty"):
        elastic_loss(lambda *a: (0.0, {}), llama_spec(CFG), [])
    with pytest.raises(ValueError, match="weights"):
        elastic_loss(lambda *a: (0.0, {}), llama_spec(CFG), [(1, None)], weights=[1, 2])
    with pytest.raises(TypeError, match="loss_fn"):
        elastic_loss(None, llama_spec(CFG), [(1, None)])
    with pytest.raises(TypeError, match="pair"):
        elastic_loss(lambda *a: (0.0, {}), llama_spec(CFG), [3])
