"""Training loop: step, evaluation, kill -9 + resume bit-identical, 8 devices == 1 device."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxeff import train
from jaxeff.models import llama

CFG = llama.LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                        max_seq_len=32)


class ArrayIterator:
    """A deterministic batch iterator with a JSON-able position (for the checkpoint tests)."""

    def __init__(self, seed=0, batch=8, length=16, vocab=64):
        self.seed, self.batch, self.length, self.vocab, self.i = seed, batch, length, vocab, 0

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.i])
        self.i += 1
        t = rng.integers(0, self.vocab, (self.batch, self.length + 1)).astype(np.int32)
        # two documents per row, to exercise segment ids
        seg = np.where(np.arange(self.length) < self.length // 2, 1, 2).astype(np.int32)
        seg = np.broadcast_to(seg, (self.batch, self.length)).copy()
        pos = np.concatenate([np.arange(self.length // 2), np.arange(self.length - self.length // 2)])
        return {"inputs": t[:, :-1], "targets": t[:, 1:], "segment_ids": seg,
                "positions": np.broadcast_to(pos, seg.shape).astype(np.int32).copy(),
                "loss_mask": np.ones(seg.shape, np.float32)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = int(s["i"])


def _loss(p, b):
    return llama.loss_fn(p, b, CFG)


def test_loss_decreases_and_metrics():
    params = llama.init_params(jax.random.key(0), CFG)
    tx = optax.adamw(3e-3)
    state = train.init_train_state(params, tx)
    step = train.make_train_step(_loss, tx)
    it = ArrayIterator()
    b = next(it)
    losses = []
    for _ in range(15):
        state, m = step(state, b)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.5
    assert int(state.step) == 15
    assert set(m) >= {"loss", "grad_norm", "update_norm", "tokens"}


def test_evaluate_token_weighted():
    params = llama.init_params(jax.random.key(0), CFG)
    ev = train.make_eval_fn(_loss)
    it = ArrayIterator()
    b1, b2 = next(it), next(it)
    b2["loss_mask"][:, 4:] = 0.0
    l1, n1 = ev(params, b1)
    l2, n2 = ev(params, b2)
    got = train.evaluate(ev, params, [b1, b2])
    np.testing.assert_allclose(got, (float(l1) + float(l2)) / (float(n1) + float(n2)), rtol=1e-6)
    with pytest.raises(ValueError, match="no predicted tokens"):
        b2z = dict(b2, loss_mask=np.zeros_like(b2["loss_mask"]))
        train.evaluate(ev, params, [b2z])


def test_bad_arguments():
    with pytest.raises(TypeError, match="tx"):
        train.make_train_step(_loss, "adam")
    with pytest.raises(TypeError, match="loss_fn"):
        train.make_train_step(None, optax.sgd(1.0))


SCRIPT = textwrap.dedent("""
    import sys, jax, optax
    sys.path.insert(0, {testdir!r})
    from test_train import ArrayIterator, CFG, _loss
    from jaxeff import train, checkpoint
    from jaxeff.models import llama
    ckdir, metrics, kill = sys.argv[1], sys.argv[2], int(sys.argv[3])
    params = llama.init_params(jax.random.key(0), CFG)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-3))
    state = train.init_train_state(params, tx, seed=1)
    step = train.make_train_step(_loss, tx)
    ck = checkpoint.Checkpointer(ckdir) if ckdir != "-" else None
    train.fit(state, step, ArrayIterator(), steps=12, log_every=1, metrics_path=metrics,
              checkpointer=ck, checkpoint_every=4, resume=True, progress=False,
              kill_at_step=kill if kill > 0 else None)
""")


def _losses(path):
    rows = [json.loads(l) for l in open(path)]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_kill9_resume_is_bit_identical(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(testdir=os.path.dirname(__file__)))
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    ref = tmp_path / "ref.jsonl"
    subprocess.run([sys.executable, str(script), "-", str(ref), "0"], check=True, env=env)
    run = tmp_path / "run.jsonl"
    ck = tmp_path / "ck"
    # killed after step 6 (the last checkpoint is step 4), then resumed to the end
    p = subprocess.run([sys.executable, str(script), str(ck), str(run), "6"], env=env)
    assert p.returncode == -9
    subprocess.run([sys.executable, str(script), str(ck), str(run), "0"], check=True, env=env)
    a, b = _losses(ref), _losses(run)
    assert sorted(b) == list(range(1, 13))
    for s in range(1, 13):
        assert a[s] == b[s], (s, a[s], b[s])   # bit-identical, steps 5-6 recomputed after resume


def test_eight_devices_equal_one():
    assert len(jax.devices()) == 8
    from jaxeff import sharding
    params = llama.init_params(jax.random.key(0), CFG)
    tx = optax.adamw(3e-3)
    batches = [next(it) for it in [ArrayIterator()] for _ in range(4)]

    def run(mesh):
        state = train.init_train_state(params, tx)
        step = train.make_train_step(_loss, tx, mesh=mesh, donate=False)
        out = []
        for b in batches:
            state, m = step(state, b)
            out.append(float(m["loss"]))
        return out, state

    one, _ = run(None)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    eight, st = run(mesh)
    np.testing.assert_allclose(eight, one, rtol=2e-5)
    # the large params really are split over the fsdp axis
    w = st.params["layers"]["w_up"]
    assert len(w.sharding.device_set) == 8 and not w.sharding.is_fully_replicated
