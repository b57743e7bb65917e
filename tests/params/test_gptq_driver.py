"""Sequential model-level GPTQ (jaxeff.params.gptq_driver): a toy model and the reference LLaMA."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.models import llama
from jaxeff.params import gptq, hessian_init, hessian_update
from jaxeff.params import calibration_batches, gptq_model, list_layers, llama_like
from jaxeff.params import QuantizedWeight, rtn
from jaxeff.params import materialize

D = 16


def _toy_layer(lp, x, batch, capture):
    """u = x * norm; z = tanh(u a) * (u b); y = x + z c. 'a' and 'b' share their input."""
    u = x * lp["norm"]
    z = jnp.tanh(u @ lp["a"]) * (u @ lp["b"])
    if capture is not None:
        capture.update(a=u, b=u, c=z)
    return x + z @ lp["c"]


def _toy():
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.5, jnp.float32)  # noqa: E731
    params = {"emb": f(40, D),
              "layers": [{"a": f(D, D), "b": f(D, D), "c": f(D, D), "norm": 1 + f(D)}
                         for _ in range(2)]}
    seg = np.ones((2, 8), np.int32)
    seg[1, 5:] = 0
    calib = [{"inputs": jnp.asarray(rng.integers(0, 40, (2, 8)), jnp.int32),
              "segment_ids": jnp.asarray(seg)} for _ in range(3)]
    model = list_layers(lambda p, b: p["emb"][b["inputs"]], _toy_layer)
    return params, calib, model


def test_sequential_matches_manual_layerwise_gptq():
    params, calib, model = _toy()
    q, stats = gptq_model(params, model, calib, 4, 8, progress=False, return_stats=True)
    # Manual reference: each layer's Hessians from the outputs of the quantized earlier layers.
    hs = [params["emb"][b["inputs"]] for b in calib]
    for i, lp in enumerate(params["layers"]):
        hu, hz = hessian_init(D), hessian_init(D)
        for h, b in zip(hs, calib):
            cap = {}
            _toy_layer(lp, h, b, cap)
            hu = hessian_update(hu, cap["a"], b["segment_ids"] > 0)
            hz = hessian_update(hz, cap["c"], b["segment_ids"] > 0)
        expect = {n: gptq(lp[n], hh, 4, 8) for n, hh in (("a", hu), ("b", hu), ("c", hz))}
        for n, e in expect.items():
            got = q["layers"][i][n]
            assert isinstance(got, QuantizedWeight) and got.shape == (D, D)
            assert np.mean(np.asarray(got.codes) != np.asarray(e.codes)) <= 0.02
            np.testing.assert_allclose(np.asarray(got.materialize()),
                                       np.asarray(e.materialize()), atol=0.05)
        dense = dict(lp, **{n: e.materialize() for n, e in expect.items()})
        hs = [_toy_layer(dense, h, b, None) for h, b in zip(hs, calib)]
    assert q["layers"][0]["norm"] is params["layers"][0]["norm"]
    assert [(i, n) for i, n, _ in stats["errors"]] == [(0, "a"), (0, "b"), (0, "c"),
                                                       (1, "a"), (1, "b"), (1, "c")]


def test_true_sequential():
    params, calib, model = _toy()
    q = gptq_model(params, model, calib, 4, 8, progress=False)
    qt = gptq_model(params, model, calib, 4, 8, progress=False, true_sequential=True)
    # 'a' and 'b' (first group) see the same inputs either way; 'c' sees their quantized output.
    for n in ("a", "b"):
        np.testing.assert_array_equal(np.asarray(qt["layers"][0][n].packed),
                                      np.asarray(q["layers"][0][n].packed))
    assert np.any(np.asarray(qt["layers"][0]["c"].packed) != np.asarray(q["layers"][0]["c"].packed))


def test_driver_bad_inputs():
    params, calib, model = _toy()
    with pytest.raises(ValueError, match="matches no leaf"):
        gptq_model(params, model, calib, 4, select="nothing", progress=False)
    with pytest.raises(ValueError, match="no layer captures.*emb"):
        gptq_model(params, model, calib, 4, select="emb|/a$", progress=False)
    with pytest.raises(ValueError, match="calib is empty"):
        gptq_model(params, model, [], 4, progress=False)
    with pytest.raises(ValueError, match="bits must be one of"):
        gptq_model(params, model, calib, 6, progress=False)
    with pytest.raises(ValueError, match="group_size=12 does not divide"):
        gptq_model(params, model, calib, 4, 12, progress=False)
    with pytest.raises(ValueError, match="percdamp"):
        gptq_model(params, model, calib, 4, percdamp=float("nan"), progress=False)


def test_llama_sequential_beats_rtn():
    cfg = llama.LlamaConfig(vocab_size=48, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                            d_ff=32, max_seq_len=16)
    rng = np.random.default_rng(1)
    # NumPy init (jax.random costs seconds of compilation per shape); matrices of std 0.15.
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.15,
                                                jnp.float32), llama.abstract_params(cfg))
    params["layers"]["attn_norm"] = jnp.ones_like(params["layers"]["attn_norm"])
    params["layers"]["mlp_norm"] = jnp.ones_like(params["layers"]["mlp_norm"])
    params["final_norm"] = jnp.ones_like(params["final_norm"])
    calib = [{"inputs": jnp.asarray(rng.integers(0, 48, (2, 16)), jnp.int32)} for _ in range(3)]
    sel = "layers/(wq|wk|wv|wo|w_gate|w_up|w_down)$"
    model = llama_like(llama, cfg)
    q = gptq_model(params, model, calib, 3, 8, select=sel, act_order=True, progress=False)
    for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        leaf = q["layers"][n]
        assert isinstance(leaf, QuantizedWeight) and leaf.shape == params["layers"][n].shape
    assert q["embed"] is params["embed"]

    fwd = jax.jit(lambda p, x: llama.forward(p, x, cfg))

    def dist(p):
        return sum(float(jnp.sum((fwd(p, b["inputs"]) - fwd(params, b["inputs"])) ** 2))
                   for b in calib)

    assert dist(materialize(q)) < dist(materialize(rtn(params, 3, 8, select=sel)))


def test_calibration_batches_from_jaxeff_data():
    # >= 1024 documents: Grain's index_shuffle is slow (ms per element) on tiny datasets.
    docs = [f"doc {i}: " + "text to calibrate on. " * (1 + i % 3) for i in range(1100)]
    cal = calibration_batches(5, 16, 2, seed=0, corpus=docs)
    assert [b["inputs"].shape for b in cal] == [(2, 16), (2, 16), (1, 16)]
    assert {"inputs", "segment_ids", "positions"} <= set(cal[0])
    with pytest.raises(ValueError, match="n_segments must be a positive int"):
        calibration_batches(0)


def test_layer_without_calibration_tokens_warns_with_its_name_and_uses_rtn():
    params, calib, model = _toy()
    empty = [dict(b, segment_ids=jnp.zeros_like(b["segment_ids"])) for b in calib]
    with pytest.warns(UserWarning, match=r"layer 0 \(a, b\) is all zero.*round-to-nearest"):
        q = gptq_model(params, model, empty, 4, 8, progress=False)
    r = rtn(params, 4, 8, select=r"layers/0/a$")
    np.testing.assert_array_equal(np.asarray(q["layers"][0]["a"].materialize()),
                                  np.asarray(r["layers"][0]["a"].materialize()))


def test_bert_like_matches_manual_gptq_of_the_first_layer_with_padding_masked():
    from jaxeff.models import bert
    from jaxeff.params import bert_like
    cfg = bert.BertConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                          max_positions=16, pooler=False)
    params = bert.init_params(jax.random.key(0), cfg)
    rng = np.random.default_rng(1)
    mask = np.ones((3, 8), np.int32)
    mask[1, 5:] = 0
    calib = [{"inputs": jnp.asarray(rng.integers(0, 50, (3, 8)), jnp.int32),
              "mask": jnp.asarray(mask)} for _ in range(2)]
    q = gptq_model(params, bert_like(bert, cfg), calib, 4, 8, progress=False)
    names = ("wq", "wk", "wv", "wo", "w_in", "w_out")
    assert all(isinstance(q["layers"][n], QuantizedWeight) and
               q["layers"][n].shape == params["layers"][n].shape for n in names)
    # Layer 0's wq by hand: H from the embedded inputs of the real (unmasked) tokens only.
    h = hessian_init(16)
    for b in calib:
        x = bert.embed(params, b["inputs"], cfg)
        h = hessian_update(h, x, b["mask"] > 0)
    expect = gptq(params["layers"]["wq"][0], h, 4, 8)
    got = jax.tree.map(lambda x: x[0], q["layers"]["wq"])
    np.testing.assert_allclose(np.asarray(got.materialize()), np.asarray(expect.materialize()),
                               atol=1e-5)
    # The quantized encoder still runs (dense view) and stays close to fp32.
    e0 = bert.sentence_embedding(params, calib[0]["inputs"], calib[0]["mask"], cfg)
    e1 = bert.sentence_embedding(materialize(q), calib[0]["inputs"], calib[0]["mask"], cfg)
    assert float(jnp.min(jnp.sum(e0 * e1, -1))) > 0.9
