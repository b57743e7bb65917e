"""GGUF and safetensors checkpoints: tiny random models written with the libraries' own writers
and read back bit-exactly; llama.cpp's q/k row order; HF config round trips and errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("safetensors")

from jaxeff.models import (bert, config_from_hf, hf_config, llama, load_gguf,  # noqa: E402
                           load_safetensors, permute_qk, save_safetensors, unpermute_qk)

CFG = llama.LlamaConfig(vocab_size=40, d_model=24, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=40,
                        max_seq_len=64, rope_base=5e4, norm_eps=1e-5, tie_embeddings=True,
                        head_dim=8)
BCFG = bert.BertConfig(vocab_size=30, d_model=16, n_layers=2, n_heads=4, d_ff=24,
                       max_positions=20)


def llamacpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, written out independently."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def random_params(cfg, seed=0):
    """Random params including non-unit norm scales (so a swapped norm would be caught)."""
    init = llama.init_params if isinstance(cfg, llama.LlamaConfig) else bert.init_params
    p = init(jax.random.key(seed), cfg)
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])


def write_llama_gguf(path, cfg, params, qtype=None):
    """A GGUF file as llama.cpp's converter writes it: [out, in] rows, q/k permuted."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layers)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_context_length(cfg.max_seq_len)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)

    def put(name, x):
        x = np.ascontiguousarray(np.asarray(x, np.float32))
        if qtype is not None and x.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, x)

    put("token_embd.weight", params["embed"])
    put("output_norm.weight", params["final_norm"])
    if not cfg.tie_embeddings:
        put("output.weight", np.asarray(params["head"]).T)
    names = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
             "wo": "attn_output", "mlp_norm": "ffn_norm", "w_gate": "ffn_gate", "w_up": "ffn_up",
             "w_down": "ffn_down"}
    for i in range(cfg.n_layers):
        for key, name in names.items():
            x = np.asarray(params["layers"][key][i])
            if x.ndim == 2:
                x = x.T
            if key == "wq":
                x = llamacpp_permute(x, cfg.n_heads)
            if key == "wk":
                x = llamacpp_permute(x, cfg.n_kv_heads)
            put(f"blk.{i}.{name}.weight", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_permute_matches_llamacpp_and_round_trips():
    w = np.random.default_rng(0).normal(size=(6 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(permute_qk(w, 6), llamacpp_permute(w, 6))
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, 6), 6), w)
    assert not np.array_equal(permute_qk(w, 6), w)
    with pytest.raises(ValueError, match="n_heads=5"):
        permute_qk(w, 5)


def test_unpermuted_rows_under_rotate_half_equal_interleaved_rope():
    """What the permutation is for: llama.cpp's interleaved RoPE on the permuted rows gives the
    same attention scores as llama.rope (rotate-half) on the original rows."""
    rng = np.random.default_rng(1)
    H, K, D, L, base = 3, 8, 10, 5, 1e4
    wq, wk = rng.normal(size=(H * K, D)), rng.normal(size=(H * K, D))
    x = rng.normal(size=(1, L, D))
    pos = np.arange(L)[None]

    def interleaved(y):            # pairs (2i, 2i+1) rotate by pos * base^(-2i/K)
        ang = pos[..., None] * base ** (-np.arange(K // 2) * 2.0 / K)
        c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
        a, b = y[..., 0::2], y[..., 1::2]
        out = np.empty_like(y)
        out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
        return out

    split = lambda y: y.reshape(1, L, H, K)  # noqa: E731
    q_cpp = interleaved(split(x @ permute_qk(wq, H).T))
    k_cpp = interleaved(split(x @ permute_qk(wk, H).T))
    q_hf = np.asarray(llama.rope(jnp.asarray(split(x @ wq.T), jnp.float32), pos, base))
    k_hf = np.asarray(llama.rope(jnp.asarray(split(x @ wk.T), jnp.float32), pos, base))
    s_cpp = np.einsum("blhk,bmhk->bhlm", q_cpp, k_cpp)
    s_hf = np.einsum("blhk,bmhk->bhlm", q_hf, k_hf)
    np.testing.assert_allclose(s_hf, s_cpp, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_round_trip_is_bit_exact(tmp_path, tied):
    cfg = CFG.replace(tie_embeddings=tied)
    params = random_params(cfg)
    write_llama_gguf(tmp_path / "m.gguf", cfg, params)
    cfg2, params2 = load_gguf(tmp_path / "m.gguf")
    assert cfg2 == cfg
    assert_trees_equal(params2, params)


def test_gguf_quantized_tensors_are_dequantized_by_gguf(tmp_path):
    params = random_params(CFG)
    q = gguf.GGMLQuantizationType.Q8_0
    cfg = CFG.replace(d_model=32, d_ff=64, head_dim=8, n_heads=4, n_kv_heads=2)  # 32-blocks
    params = random_params(cfg)
    write_llama_gguf(tmp_path / "q.gguf", cfg, params, qtype=q)
    _, got = load_gguf(tmp_path / "q.gguf")
    want_wq = gguf.quants.dequantize(gguf.quants.quantize(
        llamacpp_permute(np.asarray(params["layers"]["wq"][1]).T, 4), q), q)
    np.testing.assert_array_equal(np.asarray(got["layers"]["wq"][1]),
                                  unpermute_qk(want_wq, 4).T)
    err = np.abs(np.asarray(got["layers"]["w_up"]) - np.asarray(params["layers"]["w_up"])).max()
    assert 0 < err < 0.01          # really quantized, and close


def test_gguf_overrides_and_bad_architecture(tmp_path):
    write_llama_gguf(tmp_path / "m.gguf", CFG, random_params(CFG))
    cfg, p = load_gguf(tmp_path / "m.gguf", dtype="bfloat16", max_seq_len=16)
    assert cfg.max_seq_len == 16 and p["layers"]["wq"].dtype == jnp.bfloat16
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="architecture='gpt2'"):
        load_gguf(tmp_path / "g.gguf")


@pytest.mark.parametrize("cfg", [CFG, CFG.replace(tie_embeddings=False), BCFG,
                                 BCFG.__class__(**{**BCFG.__dict__, "pooler": False})],
                         ids=["llama-tied", "llama-head", "bert", "bert-nopooler"])
def test_safetensors_round_trip_is_bit_exact(tmp_path, cfg):
    params = random_params(cfg)
    save_safetensors(tmp_path / "m.safetensors", params, cfg)
    assert_trees_equal(load_safetensors(tmp_path / "m.safetensors", cfg), params)


def test_safetensors_uses_hf_names_and_layout(tmp_path):
    from safetensors.numpy import load_file
    params = random_params(CFG.replace(tie_embeddings=False))
    save_safetensors(tmp_path / "m.safetensors", params, CFG.replace(tie_embeddings=False))
    t = load_file(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(t["model.layers.1.self_attn.k_proj.weight"],
                                  np.asarray(params["layers"]["wk"][1]).T)
    assert t["model.layers.0.mlp.down_proj.weight"].shape == (CFG.d_model, CFG.d_ff)
    assert t["lm_head.weight"].shape == (CFG.vocab_size, CFG.d_model)
    assert len(t) == 2 + 1 + 9 * CFG.n_layers
    bp = random_params(BCFG)
    save_safetensors(tmp_path / "b.safetensors", bp, BCFG)
    tb = load_file(tmp_path / "b.safetensors")
    np.testing.assert_array_equal(tb["encoder.layer.1.intermediate.dense.weight"],
                                  np.asarray(bp["layers"]["w_in"][1]).T)


def test_safetensors_errors_name_the_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file
    params = random_params(CFG)
    save_safetensors(tmp_path / "m.safetensors", params, CFG)
    t = load_file(tmp_path / "m.safetensors")
    missing = {k: v for k, v in t.items() if k != "model.norm.weight"}
    save_file(missing, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_safetensors(tmp_path / "a.safetensors", CFG)
    save_file({**t, "model.extra.weight": np.zeros(3, np.float32)}, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="model.extra.weight"):
        load_safetensors(tmp_path / "b.safetensors", CFG)
    with pytest.raises(ValueError, match="shape"):
        load_safetensors(tmp_path / "m.safetensors", CFG.replace(d_ff=41))
    bad_head = {**t, "lm_head.weight": t["model.embed_tokens.weight"] + 1}
    save_file(bad_head, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="tie_embeddings"):
        load_safetensors(tmp_path / "c.safetensors", CFG)
    with pytest.raises(ValueError, match="lack"):
        save_safetensors(tmp_path / "d.safetensors", {"embed": params["embed"]}, CFG)
    with pytest.raises(TypeError, match="LlamaConfig"):
        load_safetensors(tmp_path / "m.safetensors", {"d_model": 3})


def test_save_materializes_structured_weights(tmp_path):
    from jaxeff.params import materialize, rtn_weight
    cfg = CFG.replace(d_model=32, d_ff=64, n_heads=4, n_kv_heads=2)
    params = random_params(cfg)
    q = dict(params, layers=dict(params["layers"],
                                 w_up=rtn_weight(params["layers"]["w_up"], bits=4, group_size=32)))
    save_safetensors(tmp_path / "q.safetensors", q, cfg)
    got = load_safetensors(tmp_path / "q.safetensors", cfg)
    np.testing.assert_array_equal(np.asarray(got["layers"]["w_up"]),
                                  np.asarray(materialize(q)["layers"]["w_up"]))


def test_hf_config_round_trip_and_unsupported(tmp_path):
    for cfg in (CFG, BCFG):
        (tmp_path / "config.json").write_text(json.dumps(hf_config(cfg)))
        got = config_from_hf(tmp_path / "config.json")
        assert got == cfg
    with pytest.raises(ValueError, match="rope_scaling"):
        config_from_hf({**hf_config(CFG), "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        config_from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="position_embedding_type"):
        config_from_hf({**hf_config(BCFG), "position_embedding_type": "relative_key"})
