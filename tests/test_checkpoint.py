"""Checkpointer faults (issue 15): corrupt steps, disk full, changed structure/dtype/hparams."""
import errno
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxeff import train
from jaxeff.checkpoint import (Checkpointer, CorruptCheckpointWarning,
                               HyperparameterChangeWarning)


def _state(seed=0, tx=None):
    r = np.random.default_rng(seed)
    params = {"w": jnp.asarray(r.normal(size=(64, 8)), jnp.float32),
              "b": jnp.asarray(r.normal(size=(8,)), jnp.float32)}
    return train.init_train_state(params, tx or optax.adam(1e-3))


def _two_steps(d):
    ck = Checkpointer(d, max_to_keep=None)
    s1 = _state(1)
    s2 = _state(2)
    ck.save(s1, step=1)
    ck.save(s2, step=2)
    return ck, s1, s2


def _eq(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_max_to_keep_and_missing_step(tmp_path):
    with pytest.raises(ValueError, match=r"max_to_keep must be None \(keep every step\).*got 0"):
        Checkpointer(tmp_path / "a", max_to_keep=0)
    with pytest.raises(TypeError, match="max_to_keep"):
        Checkpointer(tmp_path / "a", max_to_keep=1.5)
    ck = Checkpointer(tmp_path / "b", max_to_keep=None)
    for s in range(4):
        ck.save({"x": jnp.ones(3) * s}, step=s)
    assert ck.all_steps() == [0, 1, 2, 3]                 # None keeps every step
    with pytest.raises(TypeError, match=r"save\(\) needs step=.*dict has no \.step"):
        ck.save({"x": jnp.ones(3)})
    with pytest.raises(ValueError, match="step must be an int >= 0; got -1"):
        ck.save({"x": jnp.ones(3)}, step=-1)
    with pytest.raises(FileNotFoundError, match="no checkpoint step 9"):
        ck.restore({"x": jnp.ones(3)}, step=9)


@pytest.mark.parametrize("damage", ["truncate_metadata", "flip_data", "delete_data"])
def test_corrupt_newest_step_falls_back_with_a_warning(tmp_path, damage):
    ck, s1, s2 = _two_steps(tmp_path / "ck")
    root = tmp_path / "ck" / "2" / "state"
    if damage == "truncate_metadata":
        p = root / "_METADATA"
        p.write_bytes(p.read_bytes()[:40])
    else:
        chunks = [os.path.join(r, f) for r, _, fs in os.walk(root / "ocdbt.process_0" / "d")
                  for f in fs]
        big = max(chunks, key=os.path.getsize)
        if damage == "delete_data":
            os.remove(big)
        else:
            data = bytearray(open(big, "rb").read())
            for i in range(len(data) // 2, len(data) // 2 + 16):
                data[i] ^= 0xFF
            open(big, "wb").write(bytes(data))
    fresh = Checkpointer(tmp_path / "ck", max_to_keep=None)
    with pytest.warns(CorruptCheckpointWarning, match="checkpoint step 2 .* unreadable"):
        got = fresh.restore(_state(0))
    _eq(got, s1)
    with pytest.raises(ValueError, match="checkpoint step 2 .* is unreadable"):
        fresh.restore(_state(0), step=2)                    # explicit step: no fallback
    _eq(fresh.restore(_state(0), step=1), s1)


def test_every_step_corrupt_raises(tmp_path):
    ck, _, _ = _two_steps(tmp_path / "ck")
    for s in ("1", "2"):
        p = tmp_path / "ck" / s / "state" / "_METADATA"
        p.write_bytes(b"{")
    with pytest.warns(CorruptCheckpointWarning):
        with pytest.raises(ValueError, match=r"no readable checkpoint.*steps \[2, 1\]"):
            Checkpointer(tmp_path / "ck").restore(_state(0))


def test_disk_full_gives_one_clear_error_and_no_temp_dir(tmp_path, monkeypatch):
    import tensorstore as ts
    ck = Checkpointer(tmp_path / "ck")
    s1 = _state(1)
    ck.save(s1, step=1)

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ts.TensorStore, "write", full)
    with pytest.raises(OSError, match=r"step 2 under .*ck failed.*disk full.*\[1\] are intact") \
            as e:
        ck.save(_state(2), step=2)
    assert e.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path / "ck")) == ["1"]      # temporary directory removed
    monkeypatch.undo()
    ck.save(_state(3), step=3)                               # space freed: saving works again
    assert ck.all_steps() == [1, 3]
    _eq(ck.restore(_state(0), step=1), s1)


def test_disk_full_output_is_one_error_in_a_fresh_process(tmp_path):
    """The error is not buried under Orbax's thread tracebacks (also none at exit)."""
    script = textwrap.dedent(f"""
        import errno, jax.numpy as jnp, tensorstore as ts
        from jaxeff.checkpoint import Checkpointer
        ck = Checkpointer({str(tmp_path / 'ck')!r})
        ck.save({{"w": jnp.ones((64, 8)), "b": jnp.ones(8)}}, step=1)
        def full(self, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        ts.TensorStore.write = full
        try:
            ck.save({{"w": jnp.ones((64, 8)), "b": jnp.ones(8)}}, step=2)
        except OSError as e:
            print("RAISED", e.errno)
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=120)
    assert "RAISED 28" in p.stdout, p.stderr
    assert "Traceback" not in p.stderr, p.stderr


def test_changed_optimizer_names_paths_and_partial_restores_params(tmp_path):
    ck = Checkpointer(tmp_path / "ck")
    old = _state(1, optax.adam(1e-3))
    ck.save(old, step=5)
    new_like = _state(0, optax.sgd(1e-2, momentum=0.9))
    with pytest.raises(ValueError, match=r"state structure differs from checkpoint step 5.*"
                                         r"opt_state\.0\.trace.*partial=True"):
        ck.restore(new_like)
    got = ck.restore(new_like, partial=True)
    _eq(got.params, old.params)                              # params from the checkpoint
    _eq(got.opt_state, new_like.opt_state)                   # fresh optimizer state kept
    assert int(got.step) == int(old.step)
    assert jax.tree.structure(got) == jax.tree.structure(new_like)
    bigger = train.init_train_state({"w": jnp.zeros((65, 8)), "b": jnp.zeros(8)},
                                    optax.adam(1e-3))
    with pytest.raises(ValueError, match=r"leaf \S*\.w has shape \(64, 8\) in checkpoint "
                                         r"step 5 but \(65, 8\)"):
        ck.restore(bigger)


def test_dtype_change_raises_unless_cast(tmp_path):
    ck = Checkpointer(tmp_path / "ck")
    s = _state(1)
    ck.save(s, step=1)
    like = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, s)
    with pytest.raises(TypeError, match=r"leaf \S*\.[bw] is float32 in checkpoint step 1 "
                                        r"but bfloat16 in state_like; pass cast=True"):
        ck.restore(like)
    got = ck.restore(like, cast=True)
    assert got.params["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got.params["w"], np.float32),
                               np.asarray(s.params["w"]), rtol=1e-2)


def test_hparams_are_stored_and_a_change_is_reported(tmp_path):
    ck = Checkpointer(tmp_path / "ck", hparams={"lr": 1e-3, "optimizer": "adamw",
                                                "betas": (0.9, 0.95)})
    s = _state(1)
    ck.save(s, step=1)
    assert ck.saved_hparams() == {"lr": 1e-3, "optimizer": "adamw", "betas": [0.9, 0.95]}
    same = Checkpointer(tmp_path / "ck", hparams={"lr": 1e-3, "optimizer": "adamw",
                                                  "betas": (0.9, 0.95)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _eq(same.restore(_state(0)), s)
    changed = Checkpointer(tmp_path / "ck", hparams={"lr": 3e-4, "optimizer": "adamw",
                                                     "betas": (0.9, 0.95), "wd": 0.1})
    with pytest.warns(HyperparameterChangeWarning) as rec:
        changed.restore(_state(0))
    msgs = sorted(str(w.message) for w in rec)
    assert any("'lr' changed since checkpoint step 1: 0.001 -> 0.0003" in m for m in msgs)
    assert any("'wd' changed since checkpoint step 1: (absent) -> 0.1" in m for m in msgs)
    with pytest.raises(TypeError, match="hparams must be JSON-serialisable"):
        Checkpointer(tmp_path / "x", hparams={"tx": optax.adam(1e-3)})
    with pytest.raises(TypeError, match="hparams must be a dict"):
        Checkpointer(tmp_path / "x", hparams=[1, 2])


try:
    from hypothesis import given, settings, strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    given = None

if given is not None:
    _DTYPES = st.sampled_from([np.float32, np.int32, np.uint8, np.float16])

    @st.composite
    def _trees(draw):
        n = draw(st.integers(1, 4))
        tree = {}
        for i in range(n):
            dt = draw(_DTYPES)
            shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=5))
            arr = draw(hnp.arrays(dt, shape, elements=hnp.from_dtype(
                np.dtype(dt), allow_nan=False, allow_infinity=False)))
            tree[f"leaf{i}"] = jnp.asarray(arr)
        return {"params": tree, "step": jnp.asarray(draw(st.integers(0, 10**6)), jnp.int32)}

    @settings(max_examples=8, deadline=None)
    @given(tree=_trees())
    def test_property_round_trip_is_exact(tmp_path_factory, tree):
        d = tmp_path_factory.mktemp("prop")
        ck = Checkpointer(d)
        ck.save(tree, step=3)
        like = jax.tree.map(jnp.zeros_like, tree)
        back = ck.restore(like)
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tmp_dir_recreated_after_removal_is_removed_again(tmp_path, monkeypatch):
    """TensorStore's C++ threads can finish a failed save's writes after the removal."""
    import shutil
    ck = Checkpointer(tmp_path / "ck")
    ck.save(_state(1), step=1)
    late = tmp_path / "ck" / "2.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp" / "d"
    late.mkdir(parents=True)
    calls, rmtree = [], shutil.rmtree

    def rmtree_then_late_write(path, **kw):  # the first removal is followed by a late write
        rmtree(path, **kw)
        calls.append(path)
        if len(calls) == 1:
            late.mkdir(parents=True)
            (late / "x").write_bytes(b"0")

    monkeypatch.setattr(shutil, "rmtree", rmtree_then_late_write)
    assert ck._remove_tmp_dirs(2) == []
    assert len(calls) == 2
    assert sorted(os.listdir(tmp_path / "ck")) == ["1"]
