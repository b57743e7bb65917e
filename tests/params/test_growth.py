"""G_stack depth growth, the growth-timing rule and the train-state switch at growth."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxeff import train
from jaxeff.models import llama
from jaxeff.params import gather_layers, grow_train_state, growth_tokens, layer_count, stack_depth

CFG = llama.LlamaConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48,
                        max_seq_len=16)


def _params(cfg=CFG, seed=0):
    """Reference-layout params from NumPy (no XLA compile: keeps the tests fast)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), s.dtype),
                        llama.abstract_params(cfg))


def _count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


def _toy_params(n_layers, seed=0):
    """A cheap stand-in with the reference layout (embedding, stacked layers, head)."""
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    return {"embed": f(8, 8), "layers": {"w": 0.3 * f(n_layers, 8, 8),
                                         "norm": jnp.ones((n_layers, 8))},
            "head": f(8, 8)}


def _toy_loss(p, b):
    def body(x, lp):
        return x + jnp.tanh(x * lp["norm"]) @ lp["w"], None
    x, _ = jax.lax.scan(body, p["embed"][b["inputs"]], p["layers"])
    logp = jax.nn.log_softmax(x @ p["head"])
    return -jnp.mean(jnp.take_along_axis(logp, b["targets"][..., None], -1)), {}


def _toy_batch(i):
    t = np.random.default_rng(i).integers(0, 8, (4, 6)).astype(np.int32)
    return {"inputs": t, "targets": (t + 1) % 8}


@pytest.mark.parametrize("order", ["stack", "interleave"])
def test_stack_depth_order_stacked_layout(order):
    src = _params()
    grown = stack_depth(src, 4, order=order)
    L = CFG.n_layers
    for name, w in grown["layers"].items():
        w, s = np.asarray(w), np.asarray(src["layers"][name])
        assert w.shape[0] == 4 * L
        for i in range(4 * L):
            j = i % L if order == "stack" else i // 4
            np.testing.assert_array_equal(w[i], s[j])  # bitwise
    for name in ("embed", "final_norm", "head"):
        np.testing.assert_array_equal(grown[name], src[name])
    layer_n = _count(src["layers"])
    assert _count(grown) == _count(src) + 3 * layer_n
    # no aliasing: every output buffer is fresh (donating either tree stays safe)
    ptrs = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(src)}
    assert not ptrs & {x.unsafe_buffer_pointer() for x in jax.tree.leaves(grown)}


def test_stack_depth_per_layer_layouts():
    src = _toy_params(3)
    per = [jax.tree.map(lambda w, i=i: w[i], src["layers"]) for i in range(3)]
    as_list = {"blocks": per, "embed": src["embed"]}
    g = stack_depth(as_list, 2, layers="blocks")
    assert isinstance(g["blocks"], list) and len(g["blocks"]) == 6
    for i in range(6):
        for k in per[0]:
            np.testing.assert_array_equal(g["blocks"][i][k], per[i % 3][k])
    assert _count(g) == _count(as_list) + _count(per)
    # a dict keyed <prefix><i>, nested under a path; interleaved order
    as_dict = {"model": {"h": {f"block_{i}": s for i, s in enumerate(per)}}}
    g = stack_depth(as_dict, 3, layers="model/h", order="interleave")
    assert sorted(g["model"]["h"], key=lambda k: int(k.split("_")[1])) == [
        f"block_{i}" for i in range(9)]
    for i in range(9):
        np.testing.assert_array_equal(g["model"]["h"][f"block_{i}"]["w"], per[i // 3]["w"])
    # a tuple stays a tuple
    g = stack_depth({"layers": tuple(per)}, 2)
    assert isinstance(g["layers"], tuple) and len(g["layers"]) == 6


def test_stack_depth_layer_axis_and_jit_sharded():
    src = _params()
    moved = {"layers": jax.tree.map(lambda w: jnp.moveaxis(w, 0, 1), src["layers"])}
    g = stack_depth(moved, 2, layer_axis=1)
    np.testing.assert_array_equal(g["layers"]["wq"][:, 4], src["layers"]["wq"][1])
    assert layer_count(g, layer_axis=1) == 6

    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    toy = _toy_params(3)
    sharded = jax.tree.map(
        lambda w: jax.device_put(w, NamedSharding(mesh, P(*([None] * (w.ndim - 1)), "fsdp"))),
        toy)
    fn = jax.jit(functools.partial(stack_depth, factor=4))
    out = fn(sharded)
    assert len(out["layers"]["w"].sharding.device_set) == 8
    jax.tree.map(np.testing.assert_array_equal, out, stack_depth(toy, 4))


def test_gather_layers_and_bad_inputs():
    src = _params()
    g = gather_layers(src, [2, 0])
    np.testing.assert_array_equal(g["layers"]["wo"][0], src["layers"]["wo"][2])
    with pytest.raises(ValueError, match="factor"):
        stack_depth(src, 0)
    with pytest.raises(TypeError, match="factor"):
        stack_depth(src, 1.5)
    with pytest.raises(ValueError, match="order"):
        stack_depth(src, 2, order="zigzag")
    with pytest.raises(ValueError, match="layers='blocks' matches nothing"):
        stack_depth(src, 2, layers="blocks")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        gather_layers(src, [0, 3])
    with pytest.raises(ValueError, match="disagree"):
        stack_depth({"layers": {"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 3))}}, 2)
    with pytest.raises(ValueError, match="layer_axis"):
        stack_depth(src, 2, layer_axis=-1)
    assert layer_count(stack_depth(src, 1)) == 3   # factor 1 is a copy


@pytest.mark.parametrize("n,d,billions", [(8e9, 15e12, 6.58), (7e9, 2e12, 11.11),
                                          (13e9, 2e12, 15.84), (70e9, 2e12, 42.48)])
def test_growth_tokens_reproduces_paper_rows(n, d, billions):
    assert round(growth_tokens(n, d) / 1e9, 2) == billions
    assert growth_tokens(n, compute=6 * n * d) == pytest.approx(growth_tokens(n, d))


def test_growth_tokens_bad_inputs():
    with pytest.raises(ValueError, match="exactly one"):
        growth_tokens(1e9)
    with pytest.raises(ValueError, match="exactly one"):
        growth_tokens(1e9, 1e12, compute=1e20)
    with pytest.raises(ValueError, match="n_params"):
        growth_tokens(-1, 1e12)
    with pytest.raises(ValueError, match="tokens"):
        growth_tokens(1e9, 0)


def _tx(steps=20):
    sched = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 5, steps)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.95))


@pytest.fixture(scope="module")
def toy():
    tx = _tx()
    step = train.make_train_step(_toy_loss, tx, donate=False)
    state = train.init_train_state(_toy_params(1), tx, seed=1)
    for i in range(3):
        state, _ = step(state, _toy_batch(i))
    return state, tx, step


def _count_leaves(opt_state):
    return [int(x) for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]
            if str(p[-1]).endswith("count")]


def test_grow_train_state_fresh_is_reference(toy):
    state, tx, step = toy
    grown = grow_train_state(state, functools.partial(stack_depth, factor=4), tx=tx)
    assert int(grown.step) == 0 and not np.array_equal(grown.rng, state.rng)
    assert grown.params["layers"]["w"].shape[0] == 4
    jax.tree.map(np.testing.assert_array_equal, grown.opt_state, tx.init(grown.params))
    grown2, m = step(grown, _toy_batch(9))
    assert int(grown2.step) == 1 and np.isfinite(float(m["loss"]))


def test_grow_train_state_grows_moments(toy):
    state = toy[0]
    grow = functools.partial(stack_depth, factor=4)
    grown = grow_train_state(state, grow, opt_state="grow")
    adam, old = grown.opt_state[1][0], state.opt_state[1][0]
    mu, nu = np.asarray(adam.mu["layers"]["w"]), np.asarray(adam.nu["layers"]["norm"])
    for i in range(4):
        np.testing.assert_array_equal(mu[i], old.mu["layers"]["w"][0])
        np.testing.assert_array_equal(nu[i], old.nu["layers"]["norm"][0])
    np.testing.assert_array_equal(adam.mu["embed"], old.mu["embed"])
    assert set(_count_leaves(grown.opt_state)) == {0}
    kept = grow_train_state(state, grow, opt_state="grow", restart_schedule=False,
                            reset_step=False)
    assert set(_count_leaves(kept.opt_state)) == {3} and int(kept.step) == 3
    np.testing.assert_array_equal(kept.rng, state.rng)
    # no aliasing: every leaf of the grown state is a fresh buffer, so donating it is safe
    old_ptrs = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)}
    assert not old_ptrs & {x.unsafe_buffer_pointer() for x in jax.tree.leaves(kept)}


def test_grow_train_state_bad_inputs(toy):
    state, tx, _ = toy
    grow = functools.partial(stack_depth, factor=2)
    with pytest.raises(ValueError, match="opt_state"):
        grow_train_state(state, grow, tx=tx, opt_state="keep")
    with pytest.raises(ValueError, match="needs tx"):
        grow_train_state(state, grow)
    with pytest.raises(TypeError, match="grow"):
        grow_train_state(state, 4, tx=tx)
    odd = state.replace(opt_state={"m": jnp.zeros((3, 3))})
    with pytest.raises(ValueError, match="params' structure"):
        grow_train_state(odd, grow, opt_state="grow")


def test_grown_state_orbax_roundtrip_continues_bit_identically(toy, tmp_path):
    state, tx, step = toy
    grown = grow_train_state(state, functools.partial(stack_depth, factor=4), tx=tx)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "grown", grown)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "grown",
                            jax.tree.map(ocp.utils.to_shape_dtype_struct, grown))
    a, b = grown, restored
    for i in range(2):
        a, _ = step(a, _toy_batch(10 + i))
        b, _ = step(b, _toy_batch(10 + i))
    jax.tree.map(np.testing.assert_array_equal, a, b)
