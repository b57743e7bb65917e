"""Function-preserving width/depth growth (Net2Net, bert2BERT FPI), AKI, and their errors."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxeff.models import llama
from jaxeff.params import GrowthWarning, insert_identity_layers, widen

CFG = llama.LlamaConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24,
                        max_seq_len=8)
X = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 8)), jnp.int32)


def llama_spec(cfg, tied=False):
    """The logical-axis spec of the reference LLaMA layout (plain data)."""
    G, R = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads
    emb = [(r"^embed$", -1, "tied")] if tied else [(r"^embed$", -1, "out"),
                                                   (r"^head$", -2, "in")]
    return {
        "mlp": [(r"layers/(w_gate|w_up)$", -1, "out"), (r"layers/w_down$", -2, "in")],
        "kv_heads": {"units": G, "axes": [(r"layers/(wq|wk|wv)$", -1, "out"),
                                          (r"layers/wo$", -2, "in")]},
        "q_per_kv": {"units": R, "axes": [(r"layers/wq$", -1, "out", "kv_heads"),
                                          (r"layers/wo$", -2, "in", "kv_heads")]},
        "d_model": emb + [(r"layers/(wq|wk|wv|w_gate|w_up)$", -2, "in"),
                          (r"layers/(wo|w_down)$", -1, "out"),
                          (r"layers/(attn_norm|mlp_norm)$", -1, "norm"),
                          (r"^final_norm$", -1, "norm")],
    }


def _params(cfg=CFG, seed=0):
    rng = np.random.default_rng(seed)
    p = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype),
                     llama.abstract_params(cfg))
    # non-trivial norm scales, so copying them is actually checked
    for k in ("attn_norm", "mlp_norm"):
        p["layers"][k] = 1.0 + p["layers"][k]
    p["final_norm"] = 1.0 + p["final_norm"]
    return p


def _cfg_of(p, base=CFG):
    """The config of the grown shapes with the head width kept (an explicit ``head_dim``)."""
    lay, hd = p["layers"], base.head_dim
    return base.replace(d_model=p["embed"].shape[1], d_ff=lay["w_up"].shape[-1],
                        n_heads=lay["wq"].shape[-1] // hd, n_kv_heads=lay["wk"].shape[-1] // hd,
                        n_layers=lay["wq"].shape[0], head_dim=hd)


_fwd = jax.jit(llama.forward, static_argnums=2)


def _forward(p, cfg):
    return np.asarray(_fwd(p, X, cfg))


@pytest.fixture(scope="module")
def ref():
    p = _params()
    return p, _forward(p, CFG)


KEY = jax.random.key(7)
CASES = {
    # MLP hidden size: any mapping is exact (Net2Net random mapping, random split shares)
    "mlp_random": ({"mlp": 30}, dict(mapping="random", split="random", key=KEY)),
    # GQA: add KV heads with their query groups, and query heads within each group
    "heads_gqa": ({"kv_heads": 3, "q_per_kv": 3}, dict(mapping="random", key=KEY)),
    # residual width x2 with uniform duplication, together with the heads (head_dim fixed)
    "d_model_x2": ({"d_model": 32, "kv_heads": 4, "mlp": 30}, dict(split="random", key=KEY)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_function_preserving_widening(ref, case):
    p, out = ref
    sizes, kw = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error", GrowthWarning)   # every case here must be exact
        q, maps = widen(p, llama_spec(CFG), sizes, **kw)
    np.testing.assert_allclose(_forward(q, _cfg_of(q)), out, atol=1e-5)
    assert set(maps) == set(sizes)


def test_kept_units_identical_and_duplicates_sum_to_original(ref):
    p, _ = ref
    g = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
                  22, 23, 5, 5, 0])
    q, maps = widen(p, llama_spec(CFG), {"mlp": 27}, mapping={"mlp": g})
    np.testing.assert_array_equal(maps["mlp"], g)
    np.testing.assert_array_equal(q["layers"]["w_up"][..., :24], p["layers"]["w_up"])
    np.testing.assert_array_equal(q["layers"]["w_up"][..., 24], p["layers"]["w_up"][..., 5])
    wd, wd0 = np.asarray(q["layers"]["w_down"]), np.asarray(p["layers"]["w_down"])
    np.testing.assert_allclose(wd[:, 5] + wd[:, 24] + wd[:, 25], wd0[:, 5], rtol=1e-6)
    np.testing.assert_allclose(wd[:, 5], wd0[:, 5] / 3, rtol=1e-6)
    np.testing.assert_allclose(wd[:, 0] + wd[:, 26], wd0[:, 0], rtol=1e-6)
    np.testing.assert_array_equal(wd[:, 1], wd0[:, 1])


def test_identity_layers_are_exact(ref):
    p, out = ref
    q = insert_identity_layers(p, [0, 2, 3], zero=r"(wo|w_down)$")
    assert q["layers"]["wq"].shape[0] == 5
    np.testing.assert_array_equal(q["layers"]["wo"][0], 0)
    np.testing.assert_array_equal(q["layers"]["wq"][1], p["layers"]["wq"][0])
    np.testing.assert_array_equal(q["layers"]["wq"][2], p["layers"]["wq"][0])  # copies previous
    np.testing.assert_array_equal(q["layers"]["w_down"][4], p["layers"]["w_down"][1])
    np.testing.assert_allclose(_forward(q, _cfg_of(q)), out, atol=1e-6)
    # per-layer layout: the zero selector is relative to one layer
    per = {"blocks": [jax.tree.map(lambda w, i=i: w[i], p["layers"]) for i in range(2)]}
    r = insert_identity_layers(per, [2], layers="blocks", zero=r"^(wo|w_down)$", source="next")
    assert len(r["blocks"]) == 3 and not np.any(r["blocks"][2]["wo"])
    np.testing.assert_array_equal(r["blocks"][2]["wq"], per["blocks"][1]["wq"])


def test_approximate_growth_is_flagged(ref):
    p, out = ref
    with pytest.warns(GrowthWarning, match="d_model.*unequally"):
        q, _ = widen(p, llama_spec(CFG), {"d_model": 24, "kv_heads": 3})
    assert np.abs(_forward(q, _cfg_of(q)) - out).max() > 1e-4   # it is indeed not exact
    with pytest.raises(ValueError, match="approximate"):
        widen(p, llama_spec(CFG), {"d_model": 24, "kv_heads": 3}, on_approx="raise")
    tied_cfg = CFG.replace(tie_embeddings=True)
    pt = _params(tied_cfg)
    with pytest.warns(GrowthWarning, match="tied"):
        widen(pt, llama_spec(tied_cfg, tied=True), {"d_model": 32, "kv_heads": 4})


def test_aki_takes_new_units_from_the_layer_above(ref):
    p, out = ref
    q, maps = widen(p, llama_spec(CFG), {"mlp": 30}, method="aki")
    g = maps["mlp"]
    up, up0 = np.asarray(q["layers"]["w_up"]), np.asarray(p["layers"]["w_up"])
    np.testing.assert_array_equal(up[:, :, :24], up0)                    # kept units: own layer
    np.testing.assert_array_equal(up[0, :, 24:], up0[1][:, g[24:]])       # new: layer above
    np.testing.assert_array_equal(up[1, :, 24:], up0[1][:, g[24:]])       # top layer: itself
    fpi, _ = widen(p, llama_spec(CFG), {"mlp": 30})
    np.testing.assert_array_equal(q["layers"]["w_down"], fpi["layers"]["w_down"])  # EXPIN as FPI
    assert np.abs(_forward(q, _cfg_of(q)) - out).max() > 1e-4          # not function-preserving
    # the same on a per-layer layout
    per = {"layers": [jax.tree.map(lambda w, i=i: w[i], p["layers"]) for i in range(2)],
           **{k: v for k, v in p.items() if k != "layers"}}
    qp, _ = widen(per, llama_spec(CFG), {"mlp": 30}, method="aki")
    np.testing.assert_array_equal(qp["layers"][0]["w_up"], up[0])


def test_widen_sharded_matches_single_device(ref):
    p, _ = ref
    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    sh = jax.tree.map(lambda w: jax.device_put(w, NamedSharding(
        mesh, P(*([None] * (w.ndim - 1)), "fsdp") if w.shape[-1] % 8 == 0 else P())), p)
    fn = jax.jit(lambda t: widen(t, llama_spec(CFG), {"d_model": 32})[0])
    out = fn(sh)
    assert len(out["embed"].sharding.device_set) == 8
    jax.tree.map(np.testing.assert_array_equal, out,
                 widen(p, llama_spec(CFG), {"d_model": 32})[0])


def test_bad_inputs(ref):
    p, _ = ref
    spec = llama_spec(CFG)
    with pytest.raises(ValueError, match=r"sizes\['mlp'\]=8 must be an int >= the current 24"):
        widen(p, spec, {"mlp": 8})
    with pytest.raises(ValueError, match="incompatible head"):
        widen(p, {"heads": {"units": 3, "axes": spec["kv_heads"]["axes"]}}, {"heads": 4})
    with pytest.raises(ValueError, match="matches no leaf"):
        widen(p, {"mlp": [(r"layers/w_in$", -1, "out")]}, {"mlp": 30})
    with pytest.raises(ValueError, match="which spec lacks"):
        widen(p, spec, {"vocab": 40})
    with pytest.raises(ValueError, match="every one of the 24"):
        widen(p, spec, {"mlp": 25}, mapping={"mlp": np.zeros(25, int)})
    with pytest.raises(ValueError, match="needs key"):
        widen(p, spec, {"mlp": 25}, mapping="random")
    with pytest.raises(ValueError, match="role"):
        widen(p, {"mlp": [(r"w_up$", -1, "copy")]}, {"mlp": 30})
    with pytest.raises(ValueError, match="positions"):
        insert_identity_layers(p, [0, 0], zero=r"wo$")
    with pytest.raises(ValueError, match="zero"):
        insert_identity_layers(p, [1], zero=r"w_out$")
    with pytest.raises(ValueError, match="layers='blocks' matches nothing"):
        widen(p, spec, {"mlp": 30}, method="aki", layers="blocks")
