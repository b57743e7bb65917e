"""Sharding rules for optimizer states and structured params (jaxeff.state_sharding) on 8 devices.

For each technique, on a (data=2, fsdp=4) mesh of 8 simulated CPU devices with the params FSDP
sharded: (a) a few training steps give the single-device losses; (b) the compiled optimizer update
(``tx.update`` + ``apply_updates`` jitted with the derived in/out shardings) holds no all-gather
whose result is the full shape of a large weight matrix; (c) the state comes out placed as
:func:`derive_shardings` says, and the specs are the ones the rules promise.

What (b) compiles: GaLore with the randomized refresh (the exact SVD refresh all-gathers each
projected gradient: measured and reported in ``jaxeff.state_sharding``'s docstring); Sophia's
update without the refresh (the refresh runs the model, whose FSDP forward gathers weights);
pruning with SPDF's static masks (gradual pruning's mask recomputation in ``sparsity.py``
gathers the selected weights; the training run (a) uses gradual pruning).
"""
import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxeff import sharding as shd
from jaxeff import state_sharding as ss
from jaxeff import train
from jaxeff.models import llama
from jaxeff.optim import (_compress as compress, _galore as galore, _sophia as sophia,
                          _sparsity as sparsity)
from jaxeff.params import (_growth as growth, _lora as lora, _lowrank as lowrank,
                           _quantized as quantized, _sltrain as sltrain)
from jaxeff.params import combine, materialize, partition, trainable_mask

CFG = llama.PRESETS["tiny"].replace(d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=256,
                                    max_seq_len=32)
SELECT = "layers/(wq|wk|wv|wo|w_gate|w_up|w_down)$"
B, L, STEPS = 8, 32, 3
LR = 1e-3   # every case's learning rate: one Adam/Sophia step moves a weight by at most ~LR
FS = "fsdp"


@pytest.fixture(scope="module")
def mesh():
    return shd.make_mesh({"data": 2, "fsdp": 4})


@pytest.fixture(scope="module")
def dense():
    """Random params of the model's shapes drawn with NumPy (llama.init_params compiles for ~15 s
    on a loaded 2-core machine)."""
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map_with_path(
        lambda p, s: jnp.asarray(np.ones(s.shape, np.float32) if "norm" in jax.tree_util.keystr(p)
                                 else rng.normal(0, 0.05, s.shape).astype(np.float32)),
        llama.abstract_params(CFG))


def _batches():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        t = rng.integers(0, CFG.vocab_size, (B, L + 1)).astype(np.int32)
        out.append({"inputs": t[:, :-1], "targets": t[:, 1:],
                    "segment_ids": np.ones((B, L), np.int32),
                    "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
                    "loss_mask": np.ones((B, L), np.float32)})
    return out


def _dense_loss(p, frozen, batch):
    del frozen
    return llama.loss_fn(p, batch, CFG)


def _structured_loss(t, frozen, batch):
    return llama.loss_fn(materialize(combine(t, frozen)), batch, CFG)


@dataclasses.dataclass
class Case:
    tx: Any
    params: Any                     # what the optimizer trains
    frozen: Any = None              # closed-over arrays (structured indices, quantized codes)
    loss: Callable = _dense_loss
    extra: Optional[Callable] = None            # (params, batch, key) -> update kwargs
    update_kw: dict = dataclasses.field(default_factory=dict)  # kwargs for the (b) compile
    check_tx: Any = None            # another transform with the same state for the (b) compile


def _logits(p, batch):
    return llama.forward(p, batch["inputs"], CFG, batch["segment_ids"], batch["positions"])


def _case(name, dense) -> Case:
    if name == "adamw":
        return Case(optax.adamw(LR, weight_decay=0.1), dense)
    if name == "sophia":
        tx = sophia.sophia(LR, sophia.gnb(_logits), update_interval=2)
        ex = sophia.sophia_extra_args()
        return Case(tx, dense, extra=ex, update_kw=dict(refresh=False))
    if name == "galore":
        # one case for GaLore and 8-bit GaLore (the update compile grows per projected leaf):
        # wq (projected on the right, param sharded on m) and w_down keep f32 low-rank moments,
        # w_up (left, param sharded on n) keeps int8 ones (compress_state selects its moments)
        sel = "layers/(wq|w_up|w_down)$"
        inner = compress.compress_state(optax.scale_by_adam(), "int8", group_size=32,
                                        min_size=256, select="layers/w_up$")
        return Case(galore.galore(LR, inner, rank=8, select=sel, update_proj_gap=2,
                                  refresh=galore.Randomized(n_iter=1), key=1), dense)
    if name == "prune":
        # gradual magnitude pruning: (b) compiles its mask recomputation, which selects the
        # top-k by bisection on sharded sums (no flattening, no cumsum), so it gathers nothing
        sched = sparsity.cubic_sparsity(0.5, start_step=0, end_step=2)
        return Case(sparsity.prune(optax.adamw(LR), sched, select=SELECT), dense)
    if name == "structured":
        # SLTrain factors on the attention projections, frozen 4-bit RTN codes on the MLP (one
        # case: the model's gradient compile is most of this file's time)
        factors = _jit(lambda d: sltrain.sltrain(8, 0.05, alpha=2.0,
                                                 select="layers/(wq|wk|wv|wo)$").init(
            jax.random.key(1), quantized.rtn(d, 4, 32, select="layers/(w_gate|w_up|w_down)$")))(
                dense)
        trainable, frozen = partition(factors)
        return Case(optax.adamw(LR), trainable, frozen, _structured_loss)
    raise ValueError(name)


def _shardings(case, dense, mesh):
    """Param shardings (FSDP of the dense model, carried onto structured leaves), frozen-part and
    optimizer-state shardings from the helper."""
    if case.frozen is None:
        psh = shd.fsdp_shardings(case.params, mesh)
        return psh, None, ss.derive_shardings(jax.eval_shape(case.tx.init, case.params),
                                              case.params, psh)
    full = combine(case.params, case.frozen)
    sh = ss.derive_shardings(full, dense, shd.fsdp_shardings(dense, mesh))
    mask = trainable_mask(full)
    psh = jax.tree.map(lambda s, m: s if m else None, sh, mask)
    fsh = jax.tree.map(lambda s, m: None if m else s, sh, mask)
    osh = ss.derive_shardings(jax.eval_shape(case.tx.init, case.params), case.params, psh)
    return psh, fsh, osh


_GRAD_FNS: dict = {}


def _jit(fn, **kw):
    """``jax.jit`` without LLVM's optimizations: compiles ~2.7x faster on CPU (this file's time
    is compilation); the HLO the all-gather check reads is the same."""
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kw)


def _grad_fn(case, psh, fsh, mesh):
    """The jitted loss-and-gradient, shared by the cases with the same loss and param layout (the
    model's compile dominates this file's time)."""
    key = (case.loss, jax.tree.structure(case.params), mesh is not None)
    if key not in _GRAD_FNS:
        def fn(params, frozen, batch):
            (loss, _), g = jax.value_and_grad(case.loss, has_aux=True)(params, frozen, batch)
            return loss, g
        _GRAD_FNS[key] = _jit(fn) if mesh is None else _jit(
            fn, in_shardings=(psh, fsh, shd.batch_sharding(mesh)),
            out_shardings=(shd.replicated(mesh), psh))
    return _GRAD_FNS[key]


def _update_fn(case, psh=None, osh=None, mesh=None, **kw):
    """``tx.update`` + ``apply_updates``, jitted with the derived in/out shardings on a mesh."""
    def upd(grads, opt_state, params, batch, key):
        extra = case.extra(params, batch, key) if case.extra else {}
        u, s = case.tx.update(grads, opt_state, params, **{**extra, **kw})
        return optax.apply_updates(params, u), s
    if mesh is None:
        return _jit(upd)
    rep = shd.replicated(mesh)
    return _jit(upd, in_shardings=(psh, osh, psh, shd.batch_sharding(mesh), rep),
                   out_shardings=(psh, osh))


def _train(case, shardings=None, mesh=None):
    params, frozen, opt_state = case.params, case.frozen, _jit(case.tx.init)(case.params)
    batches = _batches()
    if shardings is None:
        grad, upd = _grad_fn(case, None, None, None), _update_fn(case)
    else:
        psh, fsh, osh = shardings
        grad, upd = _grad_fn(case, psh, fsh, mesh), _update_fn(case, psh, osh, mesh)
        params, opt_state = jax.device_put(params, psh), jax.device_put(opt_state, osh)
        frozen = jax.device_put(frozen, fsh) if frozen is not None else None
        batches = [jax.device_put(b, shd.batch_sharding(mesh)) for b in batches]
    losses = []
    for i, b in enumerate(batches):
        loss, g = grad(params, frozen, b)
        params, opt_state = upd(g, opt_state, params, b, jax.random.key(i))
        losses.append(float(loss))
    return losses, params, opt_state, frozen, upd


def _forbidden(dense) -> set:
    """Full shapes of the large weight matrices: whole leaf, one matrix of a stack (either
    orientation), and the leaf flattened."""
    out = set()
    for x in jax.tree.leaves(dense):
        if x.ndim >= 2 and x.size >= 2 ** 12:
            m, n = x.shape[-2:]
            out |= {tuple(x.shape), (m, n), (n, m), (x.size,)}
    return out


def _update_hlo(case, shardings, mesh, upd=None) -> str:
    """Compiled HLO of the sharded optimizer update: ``upd`` (the training one) unless the case
    names other kwargs (Sophia's refresh=False: its refresh runs the model, whose FSDP forward
    gathers weights legitimately) or another transform with the same state."""
    psh, _, osh = shardings
    if case.check_tx is not None:
        case = dataclasses.replace(case, tx=case.check_tx)
    if upd is None or case.update_kw or case.check_tx is not None:
        upd = _update_fn(case, psh, osh, mesh, **case.update_kw)
    a = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)  # noqa
    return upd.lower(a(case.params), jax.eval_shape(case.tx.init, case.params), a(case.params),
                     a(_batches()[0]), jax.random.key(0)).compile().as_text()


def _eq(sh, *spec):
    """``sh`` has ``spec`` (trailing unsharded axes ignored)."""
    def strip(t):
        t = list(t)
        while t and t[-1] is None:
            t.pop()
        return tuple(t)
    return strip(sh.spec) == strip(spec)


CASES = ["adamw", "sophia", "galore", "prune", "structured"]


def _expectations(name, osh, psh, fsh):
    """The specs the rules promise for this technique (w_up [2, 64, 256] shards its 256 axis;
    wq [2, 64, 64] its first 64 axis)."""
    leaves = lambda t: {jax.tree_util.keystr(p): s for p, s in  # noqa: E731
                        jax.tree_util.tree_flatten_with_path(t)[0]}
    o = leaves(osh)
    if name == "adamw":
        assert _eq(o["[0].mu['layers']['w_up']"], None, None, FS)
    if name == "sophia":
        assert _eq(o["[0].h['layers']['w_up']"], None, None, FS)
        assert _eq(o["[0].h['layers']['wq']"], None, FS)
        assert _eq(o["[0].key"])
    if name == "galore":
        # projectors [2, 64, 8] (wq: right, n=64; w_up: left, m=64) and [2, 64, 8] (w_down:
        # right, n=64) are replicated: the param shards the other dimension
        assert all(_eq(s) for k, s in o.items() if ".projectors" in k)
        inner = "[0].inner_state.inner"
        assert _eq(o[inner + ".mu['layers']['wq']"], None, FS)          # [2, 64, 8]: m
        assert _eq(o[inner + ".nu['layers']['w_down']"], None, FS)      # [2, 256, 8]: m
        # int8 codes of w_up's [2, 8, 256] moments: [2, 8, 8, 32], the group axis follows n
        assert _eq(o[inner + ".nu['layers']['w_up'].codes"], None, None, FS)
        assert _eq(o[inner + ".nu['layers']['w_up'].scale"], None, None, FS)
    if name == "prune":
        assert _eq(o[".masks['layers']['w_up']"], None, None, FS)
        assert _eq(o[".masks['layers']['wq']"], None, FS) and _eq(o[".masks['head']"])
        assert _eq(o[".inner_state[0].mu['layers']['w_up']"], None, None, FS)
    if name == "structured":
        w = psh["layers"]["wq"]            # dense [2, 64, 64] sharded on its input axis
        assert _eq(w.A, None, FS) and _eq(w.B) and w.indices is None
        assert _eq(w.values, None, FS) and _eq(fsh["layers"]["wq"].indices, None, FS)
        assert _eq(o["[0].mu['layers']['wq'].A"], None, FS)
        assert _eq(o["[0].nu['layers']['wq'].values"], None, FS)
        q = fsh["layers"]["w_down"]        # dense [2, 256, 64] sharded on IN = 256
        assert _eq(q.packed, None, FS) and _eq(q.scale, None, FS) and _eq(q.perm, None, FS)
        assert _eq(fsh["layers"]["w_up"].packed, None, None, FS)   # [2, 64, 256]: OUT
        assert _eq(o["[0].mu['head']"], None, FS)


def _assert_same_updates(params8, params1, params0):
    """The 8-device run moved every leaf as the 1-device run did, robustly to reduction order.

    XLA's CPU codegen orders reductions differently per machine and per sharding, and Adam-like
    steps divide by sqrt(v) ~ |g|: a weight whose gradient is near zero can move by a sizeable
    fraction of one step (7.8e-5 of a 1e-3 step was seen on an AVX-512 machine) with nothing wrong.
    A sharding bug (a wrong shard, a lost or doubled update, a leaf left untrained) changes the
    displacement of most weights by O(1) of a step instead. So per leaf: (1) at most 0.1% of the
    weights (at least 2) differ by more than 5% of one step; (2) the others' displacement from the
    initial params agrees to 1e-3 in norm (float32 rounding gives ~1e-6); (3) no weight differs by
    more than two steps (a sign flip in one step is 2 LR)."""
    for x8, x1, x0 in zip(jax.tree.leaves(params8), jax.tree.leaves(params1),
                          jax.tree.leaves(params0)):
        x8, x1, x0 = (np.asarray(v, np.float64) for v in (x8, x1, x0))
        d8, d1 = x8 - x0, x1 - x0
        err = np.abs(d8 - d1)
        inlier = err <= 0.05 * LR
        outliers = int((~inlier).sum())
        assert outliers <= max(2, d1.size // 1000), (x0.shape, outliers, float(err.max()))
        assert np.linalg.norm(err[inlier]) <= 1e-3 * np.linalg.norm(d1), (
            x0.shape, np.linalg.norm(err[inlier]), np.linalg.norm(d1))
        assert err.max() <= 2 * LR, (x0.shape, float(err.max()))


@pytest.mark.parametrize("name", CASES)
def test_sharded_training(name, dense, mesh):
    case = _case(name, dense)
    shardings = _shardings(case, dense, mesh)
    one, params1, *_ = _train(case)
    eight, params, opt_state, frozen, upd = _train(case, shardings, mesh)
    # (a) the same losses (and weights) as on one device
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    _assert_same_updates(params, params1, case.params)
    # (c) the state is placed where the helper says, and the helper says what the rules promise
    psh, fsh, osh = shardings
    for a, s in zip(jax.tree.leaves((params, opt_state, frozen)),
                    jax.tree.leaves((psh, osh, fsh))):
        assert a.sharding.is_equivalent_to(s, a.ndim), (a.shape, a.sharding, s)
    _expectations(name, osh, psh, fsh)
    sharded = [s for s in jax.tree.leaves(osh) if not s.is_fully_replicated]
    assert len(sharded) >= 7
    # (b) no all-gather of a full weight matrix in the optimizer update
    hlo = _update_hlo(case, shardings, mesh, upd)
    gathers = shd.collectives(hlo, ("all-gather",))
    full = [g for g in gathers if g[1] in _forbidden(dense)]
    assert not full, f"{name}: full-weight all-gathers in the update: {full}; all: {gathers}"


def test_same_updates_check_tolerates_noise_and_detects_sharding_bugs():
    """Negative controls for (a)'s weight comparison: reduction-order noise on a few weights
    passes; a shard left without its update, a doubled update or a wrong sign anywhere fails."""
    rng = np.random.default_rng(0)
    p0 = rng.normal(0, 0.05, (64, 256))
    p1 = p0 + LR * np.sign(rng.normal(size=p0.shape)) * rng.uniform(0.2, 1, p0.shape)
    noisy = p1.copy()
    noisy.flat[[3, 999, 12345]] += [7.8e-5, -3e-4, 1.5 * LR]    # near-zero-gradient weights
    _assert_same_updates([noisy], [p1], [p0])
    no_shard = p1.copy()
    no_shard[:16] = p0[:16]                                       # one of 4 shards not updated
    doubled = p0 + 2 * (p1 - p0)
    flipped = p1.copy()
    flipped.flat[:40] = p0.flat[:40] - (p1.flat[:40] - p0.flat[:40])   # 40 signs wrong
    for bad in (no_shard, doubled, flipped):
        with pytest.raises(AssertionError):
            _assert_same_updates([bad], [p1], [p0])


def test_gather_check_detects_a_replicated_state(dense, mesh):
    """Negative control for (b): Adam moments replicated next to FSDP params must gather the
    sharded gradients at full size."""
    case = _case("adamw", dense)
    psh = shd.fsdp_shardings(dense, mesh)
    osh = jax.tree.map(lambda _: shd.replicated(mesh), jax.eval_shape(case.tx.init, dense))
    gathers = shd.collectives(_update_hlo(case, (psh, None, osh), mesh), ("all-gather",))
    assert any(g[1] in _forbidden(dense) for g in gathers), gathers


def test_train_state_shardings_use_the_rules(dense, mesh):
    """jaxeff.train.state_shardings places the opt_state by the rules (GaLore's low-rank moments
    and projectors are not FSDP-split by their own largest axis) and keeps step/rng replicated."""
    tx = galore.galore(1e-3, rank=8, select=SELECT, refresh="randomized")
    state = jax.eval_shape(lambda: train.init_train_state(dense, tx))
    sh = train.state_shardings(state, mesh)
    psh = shd.fsdp_shardings(dense, mesh)
    assert jax.tree.leaves(sh.params) == jax.tree.leaves(psh)
    assert jax.tree.leaves(sh.opt_state) == jax.tree.leaves(ss.derive_shardings(
        state.opt_state, dense, psh, fallback=ss.fsdp_fallback(mesh)))
    # the old rule split the [2, 64, 8] projector of w_up over its 64 axis: P^T G then gathers
    assert _eq(sh.opt_state[0].projectors["layers/wq"]["right"])
    assert sh.step.is_fully_replicated and sh.rng.is_fully_replicated
    # structured params: fsdp_param_shardings carries the dense layout onto the factors
    factors = jax.eval_shape(lambda: sltrain.sltrain(8, 0.05, select=SELECT).init(
        jax.random.key(1), dense))
    fsh = ss.fsdp_param_shardings(factors, mesh)
    assert _eq(fsh["layers"]["w_up"].B, None, None, FS) and _eq(fsh["layers"]["w_up"].A)
    trainable, _ = partition(factors)
    tsh = train.state_shardings(jax.eval_shape(
        lambda: train.init_train_state(trainable, optax.adam(1e-3))), mesh)
    assert tsh.params["layers"]["w_up"].B == fsh["layers"]["w_up"].B
    assert tsh.opt_state[0].mu["layers"]["w_up"].B == fsh["layers"]["w_up"].B


def test_grown_state_is_rederived(dense, mesh):
    """Growth: the grown state's shardings come from the grown params (moments stacked like the
    weights follow them)."""
    tx = optax.adam(1e-3)
    grown = jax.eval_shape(lambda: growth.grow_train_state(
        train.init_train_state(dense, tx), lambda p: growth.stack_depth(p, 2), opt_state="grow"))
    sh = train.state_shardings(grown, mesh)
    assert grown.params["layers"]["w_up"].shape == (4, 64, 256)
    assert _eq(sh.opt_state[0].nu["layers"]["w_up"], None, None, FS)
    assert jax.tree.leaves(sh.opt_state[0].mu) == jax.tree.leaves(sh.params)


def test_rules_without_training(dense, mesh):
    """Rules the training cases do not reach (shapes only, nothing compiled): GaLore's free-axis
    choice and 'full' projection, LoRA and low-rank factors, Adafactor's factored moments."""
    params = {"w": jax.ShapeDtypeStruct((2, 64, 256), jnp.float32)}
    psh = {"w": NamedSharding(mesh, P(None, FS))}                     # the param shards m
    st = jax.eval_shape(galore.scale_by_galore(rank=8, proj_type="left").init, params)
    sh = ss.derive_shardings(st, params, psh)
    assert _eq(sh.projectors["w"]["left"], None, FS)                # P [2, 64, 8]: m
    assert _eq(sh.inner_state.mu["w"], None, None, FS)                # [2, 8, 256]: n, by m's axis
    # projectors are keyed by param path, not matched by shape: two params of one shape sharded
    # on different axes each get their own projector's layout (identity inner: no moments)
    two = {"a": params["w"], "b": params["w"]}
    two_sh = {"a": psh["w"], "b": NamedSharding(mesh, P(None, None, FS))}
    for sel, want in (("^a$", (None, FS)), ("^b$", ())):
        st = jax.eval_shape(galore.scale_by_galore(optax.identity(), rank=8, proj_type="left",
                                                   select=sel).init, two)
        (path, by_side), = ss.derive_shardings(st, two, two_sh).projectors.items()
        assert path == sel[1] and _eq(by_side["left"], *want)
    st = jax.eval_shape(galore.scale_by_galore(rank=8, proj_type="full").init, params)
    sh = ss.derive_shardings(st, params, psh)
    assert _eq(sh.projectors["w"]["left"], None, FS) and _eq(sh.projectors["w"]["right"])
    assert _eq(sh.inner_state.nu["w"])                                # [2, 8, 8]
    dsh = shd.fsdp_shardings(dense, mesh)
    adapted = jax.eval_shape(lambda: lora.lora(8, select=SELECT).from_dense(jax.random.key(0),
                                                                            dense))
    w = ss.derive_shardings(adapted, dense, dsh)["layers"]["w_up"]  # dense sharded on n
    assert _eq(w.base, None, None, FS) and _eq(w.A) and _eq(w.B, None, None, FS)
    low = jax.eval_shape(lambda: lowrank.lowrank(8, select=SELECT).init(jax.random.key(0),
                                                                        dense))
    w = ss.fsdp_param_shardings(low, mesh)["layers"]["w_down"]      # dense sharded on m
    assert _eq(w.L, None, FS) and _eq(w.R)
    st = jax.eval_shape(optax.adafactor(1e-3, min_dim_size_to_factor=32).init, dense)
    sh = ss.derive_shardings(st, dense, dsh)[0]
    for k in ("w_up", "w_down"):     # row factor [2, 64], column factor [2, 256] (the sharded dim)
        assert _eq(sh.v_row["layers"][k]) and _eq(sh.v_col["layers"][k], None, FS)


def test_indivisible_axes_fall_back_to_replication(mesh):
    params = {"w": jnp.zeros((6, 64)), "v": jnp.zeros((7, 10))}
    psh = {"w": NamedSharding(mesh, P(None, FS)), "v": NamedSharding(mesh, P())}
    # an Adafactor-style factor [6] of w, a moment [6, 3] (only axis 0 aligns), a [3, 64] leaf
    state = {"row": {"w": jnp.zeros(64), "v": jnp.zeros(10)},
             "odd": {"w": jnp.zeros((3, 64)), "v": jnp.zeros((7, 10))}}
    sh = ss.derive_shardings(state, params, psh)
    assert _eq(sh["row"]["w"], FS) and _eq(sh["odd"]["w"], None, FS)
    # a spec the leaf's axis does not divide becomes unsharded, never an error
    sh = ss.derive_shardings({"w": jnp.zeros((6, 62))}, {"w": jnp.zeros((6, 62))},
                             {"w": NamedSharding(mesh, P(None, FS))})
    assert sh["w"].is_fully_replicated
    # compressed codes whose group axis the mesh does not divide: replicated group axis
    tx = compress.compress_state(optax.scale_by_adam(), "int8", group_size=64, min_size=0)
    st = jax.eval_shape(tx.init, {"w": jnp.zeros((6, 64 * 3))})
    sh = ss.derive_shardings(st, {"w": jnp.zeros((6, 192))}, {"w": NamedSharding(mesh, P(None,
                                                                                        FS))})
    assert sh.inner.mu["w"].codes.is_fully_replicated


def test_custom_rule_and_bad_inputs(mesh):
    class Mine(tuple):
        pass

    seen = []

    def rule(node, ctx):
        seen.append(ctx.param)
        return ctx.replicated(node)

    jax.tree_util.register_pytree_node(Mine, lambda t: (tuple(t), None), lambda _, c: Mine(c))
    ss.register_rule(Mine, rule)
    sh = ss.derive_shardings({"w": Mine((jnp.zeros((4, 8)),))}, {"w": jnp.zeros((4, 8))},
                             {"w": NamedSharding(mesh, P(FS))})
    assert seen and seen[0].spec == (FS, None) and sh["w"][0].is_fully_replicated
    with pytest.raises(ValueError, match="structure of params"):
        ss.derive_shardings({}, {"w": jnp.zeros(4)}, {"v": NamedSharding(mesh, P())})
    with pytest.raises(TypeError, match="NamedSharding or PartitionSpec"):
        ss.derive_shardings({}, {"w": jnp.zeros(4)}, {"w": "fsdp"})
    with pytest.raises(ValueError, match="mesh is None"):
        ss.derive_shardings({}, {"w": jnp.zeros(4)}, {"w": P()})
    with pytest.raises(ValueError, match="mesh axis 'tp'"):
        ss.derive_shardings({}, {"w": jnp.zeros(4)}, {"w": P("tp")}, mesh)
    with pytest.raises(TypeError, match="cls must be a class"):
        ss.register_rule(3, rule)
