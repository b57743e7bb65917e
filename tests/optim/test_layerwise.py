"""Tests for jaxeff.optim.layerwise: LLRD multipliers, slow learner, identity at decay 1."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxeff.optim import (layer_multipliers, layerwise, layerwise_scale, scale_by_layer,
                          slow_learner)

L = 3


def stacked_params():
    r = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)  # noqa: E731
    return {"embed": f(16, 4), "layers": {"wq": f(L, 8, 4), "norm": f(L, 4)},
            "final_norm": f(4), "head": f(4, 16)}


def per_layer_params():
    r = np.random.default_rng(1)
    f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)  # noqa: E731
    return {"embed": f(10, 4), "layers": [{"w": f(4, 4)} for _ in range(L)], "head": f(4, 10)}


def test_multipliers_exactly_as_specified_stacked():
    m = layer_multipliers(stacked_params(), 0.5, L)
    assert m["embed"] == 0.5 ** (L + 1)                          # depth 0
    np.testing.assert_array_equal(m["layers"]["wq"], [0.5 ** 3, 0.5 ** 2, 0.5 ** 1])
    np.testing.assert_array_equal(m["layers"]["norm"], [0.5 ** 3, 0.5 ** 2, 0.5 ** 1])
    assert m["final_norm"] == 1.0 and m["head"] == 1.0          # depth L + 1


def test_multipliers_per_layer_paths_and_overrides():
    m = layer_multipliers(per_layer_params(), 0.8, L)
    assert [m["layers"][i]["w"] for i in range(L)] == pytest.approx(
        [0.8 ** 3, 0.8 ** 2, 0.8 ** 1])
    assert m["embed"] == pytest.approx(0.8 ** 4) and m["head"] == 1.0
    m = layer_multipliers(per_layer_params(), 0.8, L, depth=[(r"^head$", 2)])
    assert m["head"] == pytest.approx(0.8 ** 2)


def test_updates_scaled_per_layer_slice():
    p = stacked_params()
    ones = jax.tree.map(jnp.ones_like, p)
    tx = layerwise_scale(0.5, L)
    u, _ = jax.jit(tx.update)(ones, tx.init(p), p)
    for i, want in enumerate([0.125, 0.25, 0.5]):
        np.testing.assert_array_equal(u["layers"]["wq"][i], want)
        np.testing.assert_array_equal(u["layers"]["norm"][i], want)
    np.testing.assert_array_equal(u["embed"], 0.0625)
    np.testing.assert_array_equal(u["head"], 1.0)


def _train(tx, n=3, p=None):
    p = stacked_params() if p is None else p
    s = tx.init(p)

    @jax.jit
    def step(p, s, i):
        g = jax.tree.map(lambda x: jnp.sin(x * (i + 1.0)), p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for i in range(n):
        p, s = step(p, s, i)
    return p, s


def test_decay_one_is_the_base_optimizer_bit_identically():
    base = optax.adamw(1e-2, weight_decay=0.1)
    p1, _ = _train(base)
    p2, _ = _train(layerwise(optax.adamw(1e-2, weight_decay=0.1), 1.0, L))
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(a, b)


def test_slow_learner_scales_all_but_the_head():
    p = stacked_params()
    ones = jax.tree.map(jnp.ones_like, p)
    tx = slow_learner(optax.sgd(1.0), 0.01)
    u, _ = tx.update(ones, tx.init(p), p)
    np.testing.assert_allclose(u["head"], -1.0)
    for k in ("embed", "final_norm"):
        np.testing.assert_allclose(u[k], -0.01)
    np.testing.assert_allclose(u["layers"]["wq"], -0.01)
    # combined with LLRD: multiplier = decay^(L+1-l) * slow_scale on slow leaves
    m = layer_multipliers(p, 0.5, L, slow=r"^layers/", slow_scale=0.1)
    np.testing.assert_allclose(m["layers"]["wq"], [0.0125, 0.025, 0.05])
    assert m["embed"] == 0.0625


def test_orbax_round_trip_and_sharded_equals_single(tmp_path):
    tx = layerwise(optax.adam(1e-2), 0.7, L)
    p, s = _train(tx, 2)
    ck = ocp.StandardCheckpointer()
    ck.save(tmp_path / "c", {"p": p, "s": s})
    ck.wait_until_finished()
    r = ck.restore(tmp_path / "c", {"p": p, "s": s})
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((r["p"], r["s"]))):
        np.testing.assert_array_equal(a, b)
    mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
    sh = jax.tree.map(lambda x: NamedSharding(mesh, P()), stacked_params())
    sh["embed"] = NamedSharding(mesh, P("d", None))
    sh["head"] = NamedSharding(mesh, P(None, "d"))
    sh["layers"]["wq"] = NamedSharding(mesh, P(None, "d", None))
    p_sh, s_sh = _train(tx, 2, jax.device_put(stacked_params(), sh))
    assert len(p_sh["layers"]["wq"].sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((p_sh, s_sh))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw, match", [
    (dict(decay=0.0, num_layers=L), "decay"),
    (dict(decay=1.5, num_layers=L), "decay"),
    (dict(decay=0.5), "num_layers"),
    (dict(decay=0.5, num_layers=0), "num_layers"),
    (dict(slow_scale=2.0), "slow_scale"),
    (dict(slow="a", fast="b"), "not both"),
    (dict(slow_scale=0.1), "slow= or fast="),
    (dict(layer_index="layers/"), "capturing group"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        layerwise_scale(**kw)


@pytest.mark.parametrize("kw, err, match", [     # wrong types / non-finite: one shared check
    (dict(decay="0.9", num_layers=L), TypeError, "decay must be a real number"),
    (dict(decay=float("nan"), num_layers=L), ValueError, "decay must be a finite number > 0.0"),
    (dict(decay=0.9, num_layers=2.0), TypeError, "num_layers must be an int >= 1; got 2.0"),
    (dict(decay=0.9, num_layers=True), TypeError, "num_layers must be an int"),
    (dict(slow_scale=float("inf"), slow="a"), ValueError, "slow_scale must be a finite number"),
])
def test_bad_argument_types(kw, err, match):
    with pytest.raises(err, match=match):
        layerwise_scale(**kw)


def test_bad_trees_at_init():
    with pytest.raises(ValueError, match="axis 0 must be the 5 layers"):
        layerwise_scale(0.5, 5).init(stacked_params())
    with pytest.raises(ValueError, match="layer index 2"):
        layerwise_scale(0.5, 2).init(per_layer_params())
    with pytest.raises(ValueError, match="matches no leaf"):
        slow_learner(optax.sgd(1.0), fast="nothing_here").init(stacked_params())
    with pytest.raises(ValueError, match="layer axis"):
        scale_by_layer([1.0, 2.0]).update({"x": jnp.ones((3,))}, optax.EmptyState())
