"""Real multi-controller JAX: 2 processes x 2 CPU devices train together, checkpoint together,
and the checkpoint restores in ONE process (this one) with identical parameters.

``experiments/multihost.py`` is the worker. Two workers join over ``jax.distributed`` (Gloo CPU
collectives, coordinator on 127.0.0.1 at a free port), each reads its own Grain shard of the
data, and they train Sophia-G (refresh every 2 steps, so the GNB estimator runs across
processes) on a global ``fsdp=2 x data=2`` mesh whose fsdp axis spans the processes. A third,
single-process run with 4 local devices consumes the same global batches (both shards read in
one process) as the reference. All three run at once, with LLVM -O0 to halve compile time.

Also here: argument validation of :mod:`jaxeff.distributed` and its one-process path.
"""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxeff import checkpoint, distributed
from jaxeff import sharding as shd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
TIMEOUT_S = 300          # all three processes together; ~20-30 s on an idle 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    return env


def _tail(path, n=4000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError as e:
        return f"<no log: {e}>"


def _run_all(cmds, logdir):
    """Run the commands concurrently; on a failure or timeout kill the rest. Returns
    ``{index: exit code and output tail}`` of every process that did not exit cleanly."""
    procs, logs = [], []
    try:
        for i, cmd in enumerate(cmds):
            log = os.path.join(logdir, f"proc{i}.log")
            logs.append(log)
            with open(log, "w") as f:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f,
                                              stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT_S
        # wait for all; stop early when one fails (its peers would block in collectives)
        while time.monotonic() < deadline and any(pr.poll() is None for pr in procs):
            if any(pr.poll() not in (None, 0) for pr in procs):
                break
            time.sleep(0.2)
    finally:
        codes = []
        for pr in procs:           # no leftover processes, whatever happened
            if pr.poll() is None:
                pr.kill()
                pr.wait()
                codes.append("killed (still running)")
            else:
                codes.append(pr.returncode)
    failed = {i: c for i, c in enumerate(codes) if c != 0}
    return {i: f"--- process {i}: exit {c}, {' '.join(cmds[i][2:])}\n{_tail(logs[i])}"
            for i, c in failed.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    common = [sys.executable, "-m", "experiments.multihost", "--steps", str(STEPS),
              "--recipe", "sophia"]
    for attempt in range(2):   # a second try only if the picked port was taken meanwhile
        d = tmp_path_factory.mktemp("multihost")
        port = _free_port()
        workers = [common + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                             "--process-id", str(p), "--local-devices", "2",
                             "--ckpt-dir", str(d / "ckpt"), "--out", str(d / f"worker{p}.json")]
                   for p in range(2)]
        ref = common + ["--simulate-shards", "2", "--local-devices", "4",
                        "--mesh", "fsdp=2,data=2", "--save-params", str(d / "ref_params.npz"),
                        "--out", str(d / "ref.json")]
        failures = _run_all(workers + [ref], str(d))
        if not failures:
            break
        if attempt or "already in use" not in "".join(failures.values()).lower():
            pytest.fail("multi-process run failed:\n" + "\n".join(failures.values()))
    load = lambda name: json.load(open(d / name))
    return {"dir": d, "w": [load("worker0.json"), load("worker1.json")], "ref": load("ref.json")}


def test_two_processes_agree(runs):
    w0, w1 = runs["w"]
    for p, w in enumerate(runs["w"]):
        assert (w["process_id"], w["num_processes"], w["devices"], w["local_devices"]) == (p, 2, 4, 2)
        assert w["mesh"] == {"fsdp": 2, "data": 2}
    # one SPMD program: the replicated loss and the gathered parameters are the same bits
    assert w0["losses"] == w1["losses"]
    assert w0["param_sha256"] == w1["param_sha256"]
    assert w0["losses"][-1] < w0["losses"][0], w0["losses"]
    assert all(np.isfinite(w0["losses"]))
    # each process read its own shard: different batches
    assert set(w0["data_sha256"]["0"]).isdisjoint(w1["data_sha256"]["1"])


def test_two_processes_match_one_process_on_same_batches(runs):
    ref, (w0, w1) = runs["ref"], runs["w"]
    assert ref["num_processes"] == 1 and ref["devices"] == 4
    # the reference consumed exactly the batches of both shards, in process order
    assert ref["data_sha256"]["0"] == w0["data_sha256"]["0"][:STEPS]
    assert ref["data_sha256"]["1"] == w1["data_sha256"]["1"][:STEPS]
    # same math; only the reduction order of the collectives differs
    np.testing.assert_allclose(w0["losses"], ref["losses"], rtol=2e-5)


def test_resume_in_two_processes_is_exact(runs):
    for w in runs["w"]:
        assert w["checkpoint_step"] == STEPS
        assert w["resume_param_sha256"] == w["param_sha256"]
        assert w["data_resumed_same"], "the restored Grain iterator did not rewind"
        assert w["loss_after_restore"] == w["loss_after_checkpoint"]
        assert w["json_data_resumed_same"], "the per-process JSON data state did not rewind"


def test_checkpoint_written_by_both_restores_in_one_process(runs):
    from experiments import multihost
    d, w0 = runs["dir"], runs["w"][0]
    step_dir = d / "ckpt" / str(STEPS)
    # both processes wrote: their own array shards and their own iterator positions
    assert (step_dir / "state" / "ocdbt.process_0").is_dir()
    assert (step_dir / "state" / "ocdbt.process_1").is_dir()
    for p in range(2):   # (equal positions: both shards have read the same number of rows)
        assert "next_row" in json.loads((step_dir / "data" / f"process_{p}-of-2.json").read_text())
    json_step = d / "ckpt-json" / str(STEPS + 1) / "data"
    assert sorted(f.name for f in json_step.iterdir() if f.suffix == ".json") == [
        "process_0-of-2.json", "process_1-of-2.json"]

    # restore here: one process, one device
    *_, init_state = multihost.state_initializer("sophia")
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
                          jax.eval_shape(init_state))
    ck = checkpoint.Checkpointer(str(d / "ckpt"))
    assert ck.latest_step() == STEPS
    state = ck.restore(target)
    assert int(state.step) == STEPS
    assert {x.sharding for x in jax.tree.leaves(state)} == {one}
    assert multihost.leaf_hashes(jax.device_get(state.params)) == w0["param_sha256"]
    # the 2-process parameters are the single-process run's, within float tolerance
    ref = np.load(d / "ref_params.npz")
    got = multihost.leaf_hashes(jax.device_get(state.params))
    for name, x in zip(got, jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_allclose(x, ref[name.replace("/", ".")], rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    # 2 processes' data positions cannot go into one process's iterator: a clear error
    with pytest.raises(ValueError, match="process 0 of 1.*process counts \\[2\\]"):
        ck.restore(target, _JsonIt())
    ck.close()


class _JsonIt:
    def get_state(self):
        return {}

    def set_state(self, state):
        pass


# -- jaxeff.distributed in this (single) process -----------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(coordinator="127.0.0.1:1234"), "give all of"),
    (dict(coordinator="localhost", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(coordinator="h:99999", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(coordinator="h:1234", num_processes=0, process_id=0), "num_processes"),
    (dict(coordinator="h:1234", num_processes=2, process_id=2), "process_id"),
    (dict(coordinator="h:1234", num_processes=2, process_id=True), "process_id"),
    (dict(local_devices=0), "local_devices"),
    (dict(local_device_ids=[]), "local_device_ids"),
    (dict(local_device_ids="0"), "local_device_ids"),
    (dict(cpu_collectives="nccl"), "cpu_collectives"),
    (dict(timeout_s=0), "timeout_s"),
])
def test_initialize_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        distributed.initialize(**kw)


def test_initialize_rejects_non_string_coordinator():
    with pytest.raises(TypeError, match="coordinator"):
        distributed.initialize(1234, 2, 0)


def test_make_global_batch_one_process():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    local = {"inputs": np.arange(48, dtype=np.int32).reshape(8, 6),
             "loss_mask": np.ones((8, 6), np.float32)}
    out = distributed.make_global_batch(local, mesh)
    assert out["inputs"].sharding == shd.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(out["inputs"]), local["inputs"])
    with pytest.raises(ValueError, match="divisible"):
        distributed.make_global_batch({"x": np.zeros((6, 2))}, mesh)
    with pytest.raises(ValueError, match="same leading batch axis"):
        distributed.make_global_batch({"x": np.zeros((8, 2)), "y": np.zeros((4, 2))}, mesh)
