"""TinyFusion learnable depth pruning: patterns, Gumbel sampling, gated scan, LoRA, pruning."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxeff.models import llama
from jaxeff.params import (argmax_layer_mask, gated_scan, init_depth_pruning, init_lora,
                           keep_patterns, kept_layers, merge_lora, prune_depth, pruning_optimizer,
                           sample_layer_mask, temperature_schedule)

CFG = llama.LlamaConfig(vocab_size=32, d_model=16, n_layers=4, n_heads=2, n_kv_heads=1, d_ff=24,
                        max_seq_len=8)
X = jnp.asarray(np.random.default_rng(0).integers(0, 32, (3, 8)), jnp.int32)


def _params(cfg=CFG, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype),
                        llama.abstract_params(cfg))


@functools.partial(jax.jit, static_argnums=3)
def gated_forward(params, inputs, mask, cfg=CFG):
    seg = jnp.ones_like(inputs)
    pos = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    x = llama.embed(params, inputs, cfg)
    x = gated_scan(lambda lp, h: llama.block(lp, h, cfg, seg, pos), params["layers"], x, mask)
    return llama.logits(params, x, cfg)


_fwd = jax.jit(llama.forward, static_argnums=2)


def test_keep_patterns():
    p = keep_patterns(4, 2)
    assert p.shape == (6, 4) and set(p.sum(1)) == {2.0}
    assert len({tuple(r) for r in p}) == 6
    np.testing.assert_array_equal(keep_patterns(2, 1), [[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="keep=3 must be <= group_size=2"):
        keep_patterns(2, 3)
    with pytest.raises(ValueError, match="group_size"):
        keep_patterns(0, 1)


@pytest.mark.parametrize("m,n", [(2, 1), (4, 2)])
def test_hard_samples_keep_exactly_n_per_group(m, n):
    logits = jnp.asarray(np.random.default_rng(m).normal(size=(5, keep_patterns(m, n).shape[0])),
                         jnp.float32)
    sample = jax.jit(functools.partial(sample_layer_mask, group_size=m, keep=n, tau=0.7, scaling=1.0,
                                       batch_size=16))
    masks = np.asarray(sample(logits, jax.random.key(0)))
    assert masks.shape == (16, 5 * m)
    assert set(np.unique(masks)) <= {0.0, 1.0}                            # exactly 0/1
    np.testing.assert_array_equal(masks.reshape(16, 5, m).sum(-1), n)
    # draws differ between examples (per-sample Gumbel noise, the reference)
    assert len({tuple(r) for r in masks}) > 1
    # a confident group always samples its argmax pattern
    sure = logits.at[:, 0].set(30.0)
    np.testing.assert_array_equal(sample(sure, jax.random.key(1)),
                                  np.broadcast_to(argmax_layer_mask(sure, group_size=m, keep=n),
                                                  (16, 5 * m)))


def test_all_ones_mask_is_the_original_and_pruned_equals_argmax_masked():
    p = _params()
    ref = np.asarray(_fwd(p, X, CFG))
    ones = jnp.ones((X.shape[0], 4))
    np.testing.assert_allclose(gated_forward(p, X, ones), ref, atol=1e-6)
    logits = jnp.asarray([[0.1, 0.9], [0.7, 0.2]])      # keeps layers 1 and 2
    keep = kept_layers(logits)
    assert keep == [1, 2]
    pruned = prune_depth(p, keep)
    # per-example masks: row 0 is the argmax pattern, row 1 another one, row 2 all ones
    rows = jnp.stack([argmax_layer_mask(logits), jnp.asarray([1.0, 0, 0, 1]), jnp.ones(4)])
    out = np.asarray(gated_forward(p, X, rows))
    np.testing.assert_allclose(np.asarray(_fwd(pruned, X, CFG))[0], out[0], atol=1e-6)
    np.testing.assert_allclose(out[2], ref[2], atol=1e-6)
    assert np.abs(out[1] - ref[1]).max() > 1e-3


def test_logit_and_lora_gradients_are_nonzero():
    rng = np.random.default_rng(4)
    p = {"layers": {"w": jnp.asarray(rng.normal(size=(4, 8, 8)), jnp.float32)}}
    tr = init_depth_pruning(jax.random.key(0), p, lora=r"layers/w$", rank=2)
    x = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)

    def loss(tr, key):
        m = sample_layer_mask(tr["logits"], key, tau=1.0, scaling=1.0, batch_size=3)
        q = merge_lora(p, tr["lora"])
        y = gated_scan(lambda lp, h: h + jnp.tanh(h @ lp["w"]), q["layers"], x, m)
        return jnp.sum(y ** 2)

    g = jax.jit(jax.grad(loss))(tr, jax.random.key(3))
    assert float(jnp.abs(g["logits"]).sum()) > 0
    assert float(jnp.abs(g["lora"]["layers"]["w"]["b"]).sum()) > 0


def test_lora_starts_at_zero_and_merges():
    p = _params()
    lo = init_lora(jax.random.key(0), p, r"layers/wo$", rank=3)
    assert lo["layers"]["wo"]["a"].shape == (4, 16, 3) and lo["layers"]["wo"]["b"].shape == (4, 3, 16)
    jax.tree.map(np.testing.assert_array_equal, merge_lora(p, lo), p)
    lo["layers"]["wo"]["b"] = jnp.ones_like(lo["layers"]["wo"]["b"])
    merged = merge_lora(p, lo, alpha=6.0)
    want = p["layers"]["wo"] + 2.0 * lo["layers"]["wo"]["a"] @ lo["layers"]["wo"]["b"]
    np.testing.assert_allclose(merged["layers"]["wo"], want, rtol=1e-6)
    np.testing.assert_array_equal(merged["layers"]["wq"], p["layers"]["wq"])
    with pytest.raises(ValueError, match="matrix"):
        init_lora(jax.random.key(0), p, r"final_norm$")


# A toy where the right answer is known: each group of two layers holds one layer that adds the
# wanted vector and one that adds a harmful one; the gates must learn to keep the useful ones.
GOOD = [1, 2, 5, 6]


def _toy():
    rng = np.random.default_rng(1)
    target = rng.normal(size=(4, 8)).astype(np.float32)
    v = np.zeros((8, 8), np.float32)
    for gi in range(4):
        for li in (2 * gi, 2 * gi + 1):
            v[li] = target[gi] if li in GOOD else 3 * rng.normal(size=8)
    return {"layers": {"v": jnp.asarray(v)}}, jnp.asarray(target.sum(0))


def _toy_step(tx, total=60):
    tau = temperature_schedule(total)

    def loss(tr, params, target, key, step):
        m = sample_layer_mask(tr["logits"], key, tau=tau(step), batch_size=4)
        x = jnp.zeros((4, 8))
        y = gated_scan(lambda lp, h: h + lp["v"], params["layers"], x, m)
        return jnp.mean((y - target) ** 2)

    @jax.jit
    def step(tr, opt, params, target, key, i):
        g = jax.grad(loss)(tr, params, target, jax.random.fold_in(key, i), i)
        up, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, up), opt

    return step


def test_gates_learn_the_recoverable_layers_and_checkpoint(tmp_path):
    params, target = _toy()
    tr = init_depth_pruning(jax.random.key(0), params)
    assert tr["logits"].shape == (4, 2) and float(tr["logits"][0, 0]) == pytest.approx(0.02)
    tx = pruning_optimizer(gate_lr=5e-2)
    opt = tx.init(tr)
    step = _toy_step(tx)
    key = jax.random.key(5)
    for i in range(30):
        tr, opt = step(tr, opt, params, target, key, i)
    # Orbax round trip of (trainables, optimizer state), then continue bit-identically
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "tf", (tr, opt))
    ckpt.wait_until_finished()
    tr2, opt2 = ckpt.restore(tmp_path / "tf",
                             jax.tree.map(ocp.utils.to_shape_dtype_struct, (tr, opt)))
    for i in range(30, 60):
        tr, opt = step(tr, opt, params, target, key, i)
        tr2, opt2 = step(tr2, opt2, params, target, key, i)
    jax.tree.map(np.testing.assert_array_equal, (tr, opt), (tr2, opt2))
    assert kept_layers(tr["logits"]) == GOOD
    shallow = prune_depth(params, kept_layers(tr["logits"]))
    np.testing.assert_array_equal(shallow["layers"]["v"], params["layers"]["v"][jnp.asarray(GOOD)])


def test_gated_scan_sharded_matches_single_device():
    params, _ = _toy()
    x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 8)), jnp.float32)
    m = jnp.asarray(np.random.default_rng(3).integers(0, 2, (8, 8)), jnp.float32)
    fn = jax.jit(lambda p, x, m: gated_scan(lambda lp, h: jnp.tanh(h + lp["v"]),
                                            p["layers"], x, m))
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
    np.testing.assert_allclose(fn(params, put(x), put(m)), fn(params, x, m), rtol=1e-6)


def test_prune_depth_layouts_and_errors():
    p = _params()
    q = prune_depth(p, [0, 3])
    assert q["layers"]["wq"].shape[0] == 2
    np.testing.assert_array_equal(q["layers"]["w_up"][1], p["layers"]["w_up"][3])
    np.testing.assert_array_equal(q["embed"], p["embed"])
    per = {"blocks": {f"b{i}": {"w": jnp.full((2,), i)} for i in range(4)}}
    r = prune_depth(per, [1, 2], layers="blocks")
    assert sorted(r["blocks"]) == ["b0", "b1"]
    assert int(r["blocks"]["b0"]["w"][0]) == 1 and int(r["blocks"]["b1"]["w"][0]) == 2
    for bad in ([], [2, 1], [1, 1], [0, 4]):
        with pytest.raises(ValueError, match="keep|indices"):
            prune_depth(p, bad)
    with pytest.raises(ValueError, match="not divisible by group_size=3"):
        init_depth_pruning(jax.random.key(0), p, group_size=3)
    with pytest.raises(ValueError, match=r"\[n_groups, C\(2,1\) = 2\]"):
        sample_layer_mask(jnp.zeros((2, 3)), jax.random.key(0))
    with pytest.raises(ValueError, match="mask must be"):
        gated_scan(lambda lp, h: h, p["layers"], jnp.zeros((3, 8, 16)), jnp.ones(5))
    with pytest.raises(ValueError, match="layers='blocks' matches nothing"):
        init_depth_pruning(jax.random.key(0), p, layers="blocks")


# --- the shallow model is a real llama params tree (pruned by each pattern, recovered by LoRA) --

CFG6 = CFG.replace(n_layers=6, tie_embeddings=True)


def _hard_mask(keep, n):
    return jnp.zeros(n).at[jnp.asarray(keep)].set(1.0)


@pytest.mark.parametrize("m,n", [(2, 1), (3, 2)])
def test_pruned_by_pattern_is_a_real_llama_equal_to_the_gated_model(m, n):
    from jaxeff.params import layer_count

    p = _params(CFG6, seed=m)
    k = CFG6.n_layers * n // m
    logits = jnp.asarray(np.random.default_rng(m).normal(size=(CFG6.n_layers // m,
                                                              keep_patterns(m, n).shape[0])))
    patterns = {"first-k": list(range(k)),
                "first of each group": [g * m + i for g in range(CFG6.n_layers // m)
                                        for i in range(n)],
                "learned": kept_layers(logits, group_size=m, keep=n)}
    assert len(patterns["learned"]) == k
    np.testing.assert_array_equal(_hard_mask(patterns["learned"], 6),
                                  argmax_layer_mask(logits, group_size=m, keep=n))
    small = CFG6.replace(n_layers=k)
    for name, keep in patterns.items():
        shallow = prune_depth(p, keep)
        assert layer_count(shallow) == k
        assert jax.tree.structure(shallow) == jax.tree.structure(llama.abstract_params(small))
        gated = np.asarray(gated_forward(p, X, _hard_mask(keep, 6), CFG6))
        np.testing.assert_allclose(np.asarray(_fwd(shallow, X, small)), gated, atol=1e-5,
                                   err_msg=name)


def test_recovered_shallow_model_saves_loads_and_generates(tmp_path):
    from jaxeff.models import generate, load_safetensors, save_safetensors
    from jaxeff.params import LoRA, combine, lora, partition

    p = _params(CFG6, seed=5)
    small = CFG6.replace(n_layers=3)
    shallow = prune_depth(p, [1, 2, 4])
    # recovery with the library's LoRA on the shallow model, merged back to plain arrays
    adapted = lora(2, 4.0, select=r"layers/(wq|wo|w_down)$").from_dense(jax.random.key(1), shallow)
    tr, frozen = partition(adapted)
    tr = jax.tree.map(lambda b: b + 0.1, tr)                   # as if trained: B != 0
    merged = LoRA.merge(combine(tr, frozen))
    assert jax.tree.structure(merged) == jax.tree.structure(shallow)
    np.testing.assert_allclose(_fwd(merged, X, small), _fwd(combine(tr, frozen), X, small),
                               atol=1e-4)                      # merged == unmerged product
    save_safetensors(tmp_path / "shallow.safetensors", merged, small)
    back = load_safetensors(tmp_path / "shallow.safetensors", small)
    jax.tree.map(np.testing.assert_array_equal, back, merged)
    out = np.asarray(generate(back, small, X[:2, :4], 3))
    assert out.shape == (2, 3)
    np.testing.assert_array_equal(out[:, 0], np.argmax(_fwd(merged, X[:2, :4], small)[:, -1], -1))


def test_merge_lora_is_the_library_lora():
    from jaxeff.params import LoRA, lora
    p = _params()
    sel = r"layers/(wq|w_up)$"
    adapted = lora(3, 6.0, select=sel).from_dense(jax.random.key(2), p)
    factors = init_lora(jax.random.key(2), p, sel, rank=3)
    np.testing.assert_array_equal(factors["layers"]["wq"]["a"], adapted["layers"]["wq"].A)
    bump = lambda t: jax.tree.map(lambda x: x + 0.5, t)
    factors = {"layers": {k: {"a": v["a"], "b": bump(v["b"])} for k, v in
                          factors["layers"].items()}}
    adapted = jax.tree.map(lambda w: w.replace(B=w.B + 0.5) if hasattr(w, "B") else w, adapted,
                           is_leaf=lambda w: hasattr(w, "B"))
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6),
                 merge_lora(p, factors, alpha=6.0), LoRA.merge(adapted))
    with pytest.raises(ValueError, match="params lacks"):
        merge_lora(p, {"layers": {"nope": factors["layers"]["wq"]}})
    with pytest.raises(ValueError, match="do not fit"):
        merge_lora(p, {"layers": {"w_down": factors["layers"]["w_up"]}})
    with pytest.raises(ValueError, match="alpha"):
        merge_lora(p, factors, alpha=0.0)
