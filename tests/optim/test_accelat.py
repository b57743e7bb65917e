"""AccelAT learning-rate controller (jaxeff.optim.accelat) and set_learning_rate."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxeff.optim import accelat, AccelATState, set_learning_rate


def _run(ctl, metrics, state=None):
    state = ctl.init() if state is None else state
    lrs = []
    for a in metrics:
        lr, state = ctl.update(state, a)
        lrs.append(lr)
    return lrs, state


def test_window2_trace_by_hand():
    # slope = a_t - a_{t-1}; flat (< 0.01) -> halve; the window restarts at the decay epoch.
    ctl = accelat(0.1, window=2, threshold=0.01, factor=0.5, patience=1, min_lr=0.02)
    metrics = [0.30, 0.50, 0.60, 0.605, 0.70, 0.702, 0.703, 0.704, 0.705]
    lrs, state = _run(ctl, metrics)
    # e1: one point; e2 +.2, e3 +.1: keep; e4 +.005: 0.05; e5 +.095: keep; e6 +.002: 0.025;
    # e7 +.001: max(0.0125, 0.02) = 0.02; then at min_lr: no change.
    np.testing.assert_allclose(lrs, [0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.02, 0.02, 0.02],
                               rtol=1e-6)
    assert int(state.n_decays) == 3 and int(state.epoch) == 9


def test_window3_min_mode_patience_trace_by_hand():
    # loss, window 3: slope = (a_t - a_{t-2}) / 2, sign flipped; patience 2.
    ctl = accelat(1.0, window=3, threshold=0.1, factor=0.1, patience=2, mode="min")
    metrics = [3.0, 2.0, 1.5, 1.4, 1.35, 1.34, 1.2, 1.1, 1.09, 1.08]
    lrs, state = _run(ctl, metrics)
    # e3: -(1.5-3)/2 = .75 ok; e4: .3 ok; e5: .075 flat (1); e6: .03 flat (2) -> 0.1, window
    # restarts at 1.34; e7: 2 points; e8: (1.34-1.1)/2 = .12 ok; e9: .055 flat (1);
    # e10: .01 flat (2) -> 0.01.
    np.testing.assert_allclose(lrs, [1, 1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.01], rtol=1e-6)
    assert int(state.bad_epochs) == 0 and int(state.n_valid) == 1


def test_inject_hyperparams_round_trip():
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.asarray([1.0, 2.0, -1.0])}
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    opt_state = tx.init(params)
    opt_state = set_learning_rate(opt_state, 0.025)
    assert opt_state.hyperparams["learning_rate"].dtype == jnp.float32
    updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
    np.testing.assert_allclose(np.asarray(updates["w"]), [-0.025, -0.05, 0.025], rtol=1e-6)
    assert opt_state.hyperparams["learning_rate"] == np.float32(0.025)  # kept across updates
    # inside a chain, and driven by the controller
    tx2 = optax.chain(optax.clip_by_global_norm(10.0),
                      optax.inject_hyperparams(optax.adam)(learning_rate=1e-3))
    st2 = tx2.init(params)
    ctl = accelat(1e-3, threshold=0.01)
    lr, s = ctl.update(ctl.init(), 0.5)
    lr, s = ctl.update(s, 0.5)                                          # flat: halve
    st2 = set_learning_rate(st2, lr)
    assert float(st2[1].hyperparams["learning_rate"]) == pytest.approx(5e-4)


def test_set_learning_rate_errors():
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="no optax.inject_hyperparams state"):
        set_learning_rate(optax.sgd(0.1).init(params), 0.1)
    sched = optax.inject_hyperparams(optax.sgd)(learning_rate=optax.linear_schedule(1., 0., 10))
    with pytest.raises(ValueError, match="is a schedule"):
        set_learning_rate(sched.init(params), 0.1)
    two = optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
                      optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
    with pytest.raises(ValueError, match="2 inject_hyperparams states"):
        set_learning_rate(two.init(params), 0.1)
    one = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1).init(params)
    with pytest.raises(ValueError, match="learning_rate must be"):
        set_learning_rate(one, -1.0)
    with pytest.raises(ValueError, match="no optax.inject_hyperparams state"):
        set_learning_rate(one, 0.1, name="momentum")


def test_bad_arguments():
    for kw, err in ((dict(learning_rate=0.0), ValueError), (dict(window=1), ValueError),
                    (dict(window=2.0), TypeError), (dict(factor=1.0), ValueError),
                    (dict(factor=0.0), ValueError), (dict(patience=0), ValueError),
                    (dict(min_lr=0.5), ValueError), (dict(mode="up"), ValueError),
                    (dict(threshold=float("nan")), ValueError)):
        args = dict(learning_rate=0.1) | kw
        with pytest.raises(err, match=next(iter(kw))):
            accelat(args.pop("learning_rate"), **args)
    ctl = accelat(0.1)
    with pytest.raises(ValueError, match="metric"):
        ctl.update(ctl.init(), float("inf"))
    with pytest.raises(TypeError, match="metric"):
        ctl.update(ctl.init(), "0.5")
    with pytest.raises(ValueError, match="window=2"):
        ctl.update(accelat(0.1, window=3).init(), 0.5)


def test_state_checkpoint_round_trip(tmp_path):
    ctl = accelat(0.1, window=3, threshold=0.02, patience=1)
    metrics = [0.1, 0.3, 0.4, 0.41, 0.42, 0.5, 0.6, 0.61, 0.615, 0.62]
    full, _ = _run(ctl, metrics)
    first, mid = _run(ctl, metrics[:5])
    assert all(isinstance(x, jax.Array) for x in mid)                   # arrays only
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ctl", mid)
    ckpt.wait_until_finished()
    back = ckpt.restore(tmp_path / "ctl", jax.tree.map(ocp.utils.to_shape_dtype_struct, mid))
    rest, _ = _run(ctl, metrics[5:], AccelATState(*back))
    assert first + rest == full
    assert len(set(full)) > 1                                           # it did decay
