"""jaxeff on user models: flax NNX through nnx.Optimizer / nnx.split, equinox, a plain dict.

One path per leaf whether or not it sits in an ``nnx.Variable`` (``jaxeff.select``), weight
matrices selected by default (no biases, norm scales, embeddings), flax attention layouts as one
matrix per kernel. Tiny models: every test runs in seconds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxeff.optim as jo
import jaxeff.params as jp
from jaxeff import select as S

V, D, L, B, T = 16, 8, 1, 2, 6


class Block(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=D, decode=False, rngs=rngs)
        self.up = nnx.Linear(D, 2 * D, rngs=rngs)
        self.down = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x_BxTxD):
        x_BxTxD = x_BxTxD + self.attn(self.norm(x_BxTxD))
        return x_BxTxD + self.down(nnx.relu(self.up(x_BxTxD)))


class Tiny(nnx.Module):
    """Embed -> L blocks (LayerNorm, MultiHeadAttention [D, H, hd] kernels, MLP) -> head."""

    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(L)])
        self.head = nnx.Linear(D, V, rngs=rngs)

    def __call__(self, tok_BxT):
        x = self.embed(tok_BxT)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


_BUILT = {}


def _model():
    """A fresh copy of one Tiny (building flax modules eagerly costs seconds on CPU)."""
    if "m" not in _BUILT:
        _BUILT["m"] = Tiny()
    return nnx.clone(_BUILT["m"])


def _tokens(seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, T)), jnp.int32)


def _loss(model, tok_BxT):
    logits_BxTxV = model(tok_BxT[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, tok_BxT[:, 1:]).mean()


def _train(model, tx, steps=3, **update_kw):
    """``steps`` nnx.jit steps through nnx.Optimizer; returns (optimizer, losses)."""
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, tok):
        loss, grads = nnx.value_and_grad(_loss)(model, tok)
        opt.update(model, grads, **{k: (tok if v == "batch" else v) for k, v in update_kw.items()})
        return loss

    return opt, [float(step(model, opt, _tokens(i % 2))) for i in range(steps)]


def _arrays(tree):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(tree) if isinstance(tree, nnx.State)
                        else tree)


MATRICES = {f"blocks/{i}/{n}" for i in range(L) for n in
            ("attn/query/kernel", "attn/key/kernel", "attn/value/kernel", "attn/out/kernel",
             "up/kernel", "down/kernel")} | {"head/kernel"}


# ----------------------------------------------------------------------------- paths, defaults
def test_a_leaf_has_one_path_with_or_without_its_variable():
    model = _model()
    wrapped = nnx.state(model, nnx.Param)                  # what nnx.Optimizer gives tx.init
    plain = nnx.to_pure_dict(wrapped)                       # what tx.update sees: plain arrays
    assert S.paths(wrapped) == S.paths(plain)
    ps = S.paths(wrapped)
    assert "blocks/0/attn/value/kernel" in ps              # the real submodule `value` stays
    assert not any(p.endswith("/value") for p in ps)
    # Only the Variable's own component goes: a dict key or attribute named value is kept.
    assert S.paths({"a": {"value": jnp.ones(2)}}) == ["a/value"]
    assert S.paths({"a": nnx.Param(jnp.ones(2))}) == ["a"]
    m = S.select_mask(r"kernel$", wrapped)
    assert S.count_selected(m) == len(MATRICES) + L * 0 and jax.tree.structure(m) == \
        jax.tree.structure(wrapped)


def test_default_selection_is_the_weight_matrices():
    state = nnx.state(_model(), nnx.Param)
    chosen = {p for p, x in S.flatten_with_paths(state)[0] if S.is_weight_matrix(p, x)}
    assert chosen == MATRICES           # not embed/embedding, norm scale/bias, [H, hd] biases
    llama = {"embed": jnp.zeros((V, D)), "final_norm": jnp.zeros(D), "head": jnp.zeros((D, V)),
             "layers": {"attn_norm": jnp.zeros((L, D)), "wq": jnp.zeros((L, D, D))}}
    assert [p for p, x in S.flatten_with_paths(llama)[0] if S.is_weight_matrix(p, x)] == \
        ["head", "layers/wq"]
    assert not S.is_weight_matrix("w", jnp.zeros((4, 4), jnp.int32))


def test_flax_layouts_are_one_matrix_per_kernel():
    model = _model()
    state = nnx.state(model, nnx.Param)
    flat = dict(S.flatten_with_paths(state)[0])
    q = S.MatrixLayout.for_leaf("blocks/0/attn/query/kernel",
                                flat["blocks/0/attn/query/kernel"].shape)
    o = S.MatrixLayout.for_leaf("blocks/0/attn/out/kernel", flat["blocks/0/attn/out/kernel"].shape)
    assert (q.batch_shape, q.m, q.n) == ((), D, D) and (o.batch_shape, o.m, o.n) == ((), D, D)
    # The module's own layouts agree (LinearGeneral axes), and decide for nnx.Einsum.
    rules = dict(S.flax_matrix_axes(model))
    assert rules[r"^blocks/0/attn/query/kernel$"] == ((0,), (1, 2))
    assert rules[r"^blocks/0/attn/out/kernel$"] == ((0, 1), (2,))
    ein = nnx.Einsum("btd,dnh->btnh", (D, 2, 4), rngs=nnx.Rngs(0))
    (_, axes), = S.flax_matrix_axes(ein)
    assert axes == ((0,), (1, 2))
    stacked = S.MatrixLayout.for_leaf("layers/wq", (L, D, 3))
    assert (stacked.batch_shape, stacked.m, stacked.n) == ((L,), D, 3)


# ----------------------------------------------------------------------------- optimizers
def test_galore_through_nnx_optimizer_matches_plain_arrays():
    """nnx.Optimizer inits on Variables and updates on arrays: the same leaves are projected,
    rank=0.25 is a quarter of the real D x (H*hd) matrix, and one step equals plain optax."""
    model = _model()
    # select=r"kernel$" failed at init or at update before (issue 16); identity inner: no
    # amplification of rounding between the two compiled programs
    tx = jo.galore(1e-2, optax.identity(), rank=0.25, update_proj_gap=2, select=r"kernel$")
    params0 = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    grads = nnx.to_pure_dict(nnx.grad(_loss)(model, _tokens()))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    gal = opt.opt_state[0]
    assert set(gal.projectors) == MATRICES          # keyed by param path (Variables stripped)
    # r = min(m, n) // 4 = 2 everywhere (min is 8); 'std' projects the smaller side
    assert [tuple(p.shape) for (p,) in (ps.values() for ps in gal.projectors.values())] == \
        [(D, 2)] * len(MATRICES)
    nnx.jit(lambda m, o, t: o.update(m, nnx.grad(_loss)(m, t)))(model, opt, _tokens())
    upd, _ = jax.jit(tx.update)(grads, tx.init(params0), params0)
    want = optax.apply_updates(params0, upd)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert S.paths(got) == S.paths(want)
    for a, b, p0 in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(params0)):
        np.testing.assert_allclose(a - p0, b - p0, rtol=1e-4, atol=1e-7)
    assert not np.array_equal(got["head"]["kernel"], params0["head"]["kernel"])


def test_sophia_through_nnx_optimizer_and_multi_transform():
    model = _model()
    graphdef = nnx.graphdef(model)
    rest = nnx.state(model, nnx.Not(nnx.Param))

    def logits_fn(params, tok):
        return nnx.merge(graphdef, params, rest)(tok[:, :-1])

    est = jo.gnb(logits_fn, mask_key=None)
    key = jax.random.key(0)
    _, losses = _train(model, jo.sophia(1e-2, est, update_interval=2), steps=3,
                       batch="batch", key=key)
    assert all(np.isfinite(losses))
    # Sophia on the weight matrices, Adam on the rest; the estimator needs the unmasked params.
    model = _model()
    labels = lambda p: jax.tree.map(lambda m: "s" if m else "a",  # noqa: E731
                                    S.select_mask(S.is_weight_matrix, p))
    tx = optax.multi_transform({"s": jo.sophia(1e-2, est, update_interval=1),
                                "a": optax.adam(1e-2)}, labels)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, tok):
        grads = nnx.grad(_loss)(model, tok)
        full = nnx.as_pure(nnx.state(model, nnx.Param))     # what nnx.Optimizer passes as params
        opt.update(model, grads, batch=tok, key=key, unmasked_params=full)

    before = _arrays(nnx.state(model, nnx.Param))
    step(model, opt, _tokens())
    after = _arrays(nnx.state(model, nnx.Param))
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
    assert all(jax.tree.leaves(moved))
    sst = [s for s in jax.tree.leaves(opt.opt_state, is_leaf=lambda x: hasattr(x, "n_refresh"))
           if hasattr(s, "n_refresh")]
    assert len(sst) == 1 and int(sst[0].n_refresh.get_value()) == 1


def test_compress_state_selects_by_path_at_init_and_update():
    model = _model()
    tx = optax.chain(jo.compress_state(optax.scale_by_adam(), "int8", group_size=8, min_size=0,
                                       select=r"kernel$"), optax.scale(-1e-2))
    opt, losses = _train(model, tx, steps=3)
    assert all(np.isfinite(losses))
    inner = nnx.as_pure(opt.opt_state)[0].inner
    mu = dict(S.flatten_with_paths(inner.mu, is_leaf=jo.is_quantized)[0])
    assert jo.is_quantized(mu["blocks/0/attn/value/kernel"])
    assert not jo.is_quantized(mu["blocks/0/attn/value/bias"])


def test_prune_masks_through_nnx_optimizer():
    model = _model()
    tx = jo.prune(optax.sgd(1e-2), lambda step: 0.5, select=S.is_weight_matrix)
    opt, losses = _train(model, tx, steps=2)
    params = dict(S.flatten_with_paths(nnx.state(model, nnx.Param))[0])
    k = np.concatenate([np.asarray(x).ravel() for p, x in params.items() if p in MATRICES])
    assert abs((k == 0).mean() - 0.5) < 0.01              # global magnitude pruning: half zero
    assert (np.asarray(params["blocks/0/attn/query/bias"]) != 0).any()
    assert all(np.isfinite(losses))


def test_layerwise_lr_through_nnx_optimizer():
    """Slow learner: every leaf but the head moves at 0.01x the SGD step, through nnx.Optimizer."""
    tok = _tokens()
    m_ref, m_slow = _model(), _model()
    grads = nnx.to_pure_dict(nnx.grad(_loss)(m_ref, tok))
    p0 = _arrays(nnx.state(m_ref, nnx.Param))
    for m, tx in ((m_ref, optax.sgd(0.1)), (m_slow, jo.slow_learner(optax.sgd(0.1), 0.01))):
        opt = nnx.Optimizer(m, tx, wrt=nnx.Param)
        nnx.jit(lambda m, o, t: o.update(m, nnx.grad(_loss)(m, t)))(m, opt, tok)
    d_ref = jax.tree.map(lambda a, b: a - b, _arrays(nnx.state(m_ref, nnx.Param)), p0)
    d_slow = jax.tree.map(lambda a, b: a - b, _arrays(nnx.state(m_slow, nnx.Param)), p0)
    np.testing.assert_allclose(d_slow["head"]["kernel"], d_ref["head"]["kernel"], rtol=1e-5)
    np.testing.assert_allclose(d_slow["blocks"][0]["attn"]["value"]["kernel"],
                               0.01 * d_ref["blocks"][0]["attn"]["value"]["kernel"], rtol=1e-3,
                               atol=1e-7)
    assert grads["head"]["kernel"].shape == (D, V)
    # depth-based decay finds blocks/<i> in NNX paths
    depths = jo.leaf_depths(nnx.state(m_ref, nnx.Param), L)
    flat = dict(S.flatten_with_paths(depths)[0])
    assert flat["embed/embedding"] == 0 and flat["blocks/0/up/kernel"] == 1 and \
        flat["head/kernel"] == L + 1


def test_param_ema_through_nnx_optimizer():
    model = _model()
    p0 = _arrays(nnx.state(model, nnx.Param))
    opt, _ = _train(model, optax.chain(optax.sgd(1e-1), jo.param_ema(0.5)), steps=1)
    ema = nnx.to_pure_dict(jo.ema_params(nnx.as_pure(opt.opt_state)))
    p1 = _arrays(nnx.state(model, nnx.Param))
    jax.tree.map(lambda e, a, b: np.testing.assert_allclose(e, 0.5 * a + 0.5 * b, rtol=1e-6),
                 ema, p0, p1)


# ----------------------------------------------------------------------------- structured weights
def test_sltrain_on_nnx_via_split_and_merge():
    """The sltrain docstring recipe: split, init factors, train on (trainable, frozen), merge."""
    model = _model()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    factors = jp.sltrain(rank=0.25, density=0.1).init(0, params)     # int seed -> key
    flat = dict(S.flatten_with_paths(factors, is_leaf=jp.is_structured)[0])
    assert {p for p, x in flat.items() if jp.is_structured(x)} == MATRICES
    q = flat["blocks/0/attn/query/kernel"]
    assert q.A.shape == (D, 2) and q.B.shape == (2, D) and q.materialize().shape == (D, 2, 4)
    trainable, frozen = jp.partition(factors)             # SLTrain trains dense leaves too
    assert S.count_selected(jax.tree.map(lambda x: x is not None, trainable)) > 0

    def loss(t, tok):
        return _loss(nnx.merge(graphdef, jp.materialize(jp.combine(t, frozen)), rest), tok)

    tx = optax.adam(1e-2)

    @jax.jit
    def step(t, st, tok):
        lv, g = jax.value_and_grad(loss)(t, tok)
        u, st = tx.update(g, st, t)
        return optax.apply_updates(t, u), st, lv

    st, losses = tx.init(trainable), []
    for _ in range(3):
        trainable, st, lv = step(trainable, st, _tokens(0))
        losses.append(float(lv))
    assert losses[-1] < losses[0]
    nnx.update(model, jp.materialize(jp.combine(trainable, frozen)))
    np.testing.assert_allclose(float(_loss(model, _tokens(0))), float(loss(trainable, _tokens(0))),
                               rtol=1e-5)


def test_lora_on_nnx_trains_only_adapters():
    model = _model()
    base_loss = float(_loss(model, _tokens()))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    adapted = jp.lora(rank=0.25).from_dense(jax.random.key(0), params)
    trainable, frozen = jp.partition(adapted)
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    n_adapter = sum(w.A.size + w.B.size for w in jax.tree.leaves(adapted, is_leaf=jp.is_structured)
                    if jp.is_structured(w))
    assert n_train == n_adapter                        # no embedding, norm, bias trains
    merged = nnx.merge(graphdef, jp.materialize(jp.combine(trainable, frozen)), rest)
    np.testing.assert_allclose(float(_loss(merged, _tokens())), base_loss, rtol=1e-6)
    t2, _ = jp.partition(adapted, train_dense=r"^head/bias$")
    assert sum(x.size for x in jax.tree.leaves(t2)) == n_adapter + V


def test_rtn_on_nnx_quantizes_the_kernels_with_flax_layouts():
    state = nnx.state(_model(), nnx.Param)
    q = jp.rtn(state, 8)
    flat = dict(S.flatten_with_paths(q, is_leaf=jp.is_structured)[0])
    assert {p for p, x in flat.items() if jp.is_structured(x)} == MATRICES
    dense = dict(S.flatten_with_paths(state)[0])
    for p in ("blocks/0/attn/query/kernel", "blocks/0/attn/out/kernel", "head/kernel"):
        w = np.asarray(dense[p])
        deq = np.asarray(flat[p].materialize())
        assert deq.shape == w.shape and np.abs(deq - w).max() < 0.02 * np.abs(w).max()
    assert flat["blocks/0/attn/query/kernel"].shape == (D, D)      # one D x (H*hd) matrix
    q2 = jp.rtn(state, 4, matrix_axes=[(r"query/kernel$", ((0, 1), (2,)))], select=r"query/kernel$")
    assert dict(S.flatten_with_paths(q2, is_leaf=jp.is_structured)[0])[
        "blocks/0/attn/query/kernel"].shape == (2 * D, 4)


# ----------------------------------------------------------------------------- other frameworks
def test_equinox_model():
    eqx = pytest.importorskip("equinox")
    mlp = eqx.nn.MLP(D, V, width_size=12, depth=1, key=jax.random.key(0))
    params, static = eqx.partition(mlp, eqx.is_array)
    assert [p for p, x in S.flatten_with_paths(params)[0] if S.is_weight_matrix(p, x)] == \
        ["layers/0/weight", "layers/1/weight"]
    x_BxD = jnp.asarray(np.random.default_rng(0).standard_normal((4, D)), jnp.float32)

    def loss(p):
        return jnp.mean(jax.vmap(eqx.combine(p, static))(x_BxD) ** 2)

    tx = jo.galore(1e-2, rank=0.5, update_proj_gap=1)
    st = tx.init(params)
    u, st = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))(params, st)
    assert jax.tree.map(lambda p: p.shape, st[0].projectors) == {        # [12, D], [V, 12]
        "layers/0/weight": {"right": (D, 4)}, "layers/1/weight": {"right": (12, 6)}}
    assert float(loss(optax.apply_updates(params, u))) < float(loss(params))
    # equinox weights are [out, in]: say so with matrix_axes
    f = jp.sltrain(2, 0.2, matrix_axes=((1,), (0,))).init(jax.random.key(1), params)
    assert f.layers[0].weight.A.shape == (D, 2) and f.layers[0].weight.materialize().shape == \
        (12, D)


def test_plain_dict():
    rng = np.random.default_rng(0)
    p = {"embed": jnp.asarray(rng.standard_normal((V, D)), jnp.float32),
         "w": jnp.asarray(rng.standard_normal((D, 12)), jnp.float32),
         "b": jnp.zeros(12), "norm": jnp.ones(D)}
    assert [x.shape for x in jax.tree.leaves(jp.lora(0.5).from_dense(0, p)["w"])][1:] == \
        [(D, 4), (4, 12)]
    q = jp.rtn(p, 8)
    assert jp.is_structured(q["w"]) and not jp.is_structured(q["embed"])
    st = jo.galore(1e-3, rank=0.5).init(p)
    assert len(st[0].projectors) == 1
    lr = jp.lowrank(0.5).from_dense(None, p)
    assert lr["w"].rank == 4 and not jp.is_structured(lr["embed"])
