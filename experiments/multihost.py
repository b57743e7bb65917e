"""Multi-controller training worker: one process per host, a global mesh, a jaxeff recipe.

Every process runs this same script; each trains the same model on a global mesh
(``--mesh``, default ``fsdp=<processes>,data=<local devices>``: parameters and optimizer state
split across the processes, the batch across all devices) from its own Grain shard of the data
(``jaxeff.data.make_lm_dataset`` shards documents by ``jax.process_index()``), turned into the
global batch with :func:`jaxeff.distributed.make_global_batch`. After ``--steps`` steps all
processes write one Orbax checkpoint together (train state + each process's Grain iterator
position, :class:`jaxeff.checkpoint.Checkpointer`), take one more step, restore that checkpoint
(state and data) and retake the step, which must give the same loss. Each process writes a JSON
report (``--out``, which may contain ``{process_id}``): losses, SHA-256 of every parameter
leaf (gathered), of its local batches, and the resume check.

Two processes with 2 CPU devices each, on one machine (what ``tests/test_multiprocess.py``
does)::

    python -m experiments.multihost --coordinator 127.0.0.1:12345 --num-processes 2 \\
        --process-id 0 --local-devices 2 --ckpt-dir /tmp/mh/ckpt --out /tmp/mh/r0.json &
    python -m experiments.multihost --coordinator 127.0.0.1:12345 --num-processes 2 \\
        --process-id 1 --local-devices 2 --ckpt-dir /tmp/mh/ckpt --out /tmp/mh/r1.json

The single-process reference on the same global batches (4 local devices, the same mesh; the
data of both shards read in one process and concatenated in process order), which also
restores the 2-process checkpoint onto one device and reports its parameter hashes::

    python -m experiments.multihost --simulate-shards 2 --local-devices 4 \\
        --mesh fsdp=2,data=2 --restore-from /tmp/mh/ckpt --out /tmp/mh/ref.json

(``--ckpt-dir D`` also writes ``D-json``: the same resume check through the checkpointer's
JSON data-state path.) Caveat, CPU only: GaLore (``--recipe galore``) deadlocks with 2 or more
CPU devices per process on a 2-core machine (jaxlib's batched LAPACK SVD waits on the intra-op
thread pool it runs on; seen with jax 0.10.2); ``--local-devices 1`` works.

Running on a TPU pod slice or multi-GPU hosts -- the same script, one process per host:

* TPU pod slice: run the identical command on every host at once, e.g. ``gcloud compute tpus
  tpu-vm ssh NAME --zone Z --worker=all --command "cd jaxeff && python -m experiments.multihost
  --auto --mesh fsdp=32 --batch-size 256 --ckpt-dir gs://BUCKET/run1 --out /tmp/r.json"``.
  ``--auto`` lets ``jax.distributed.initialize()`` detect coordinator, process count and id.
* Multi-GPU hosts: on host ``r`` of ``H``, ``python -m experiments.multihost --coordinator
  HOST0:PORT --num-processes H --process-id r --mesh fsdp=H,data=8 ...`` (one process per host
  owning all its GPUs), or one process per GPU with ``--local-device-ids <gpu>`` and
  ``--num-processes`` = total GPUs. Under Slurm or Open MPI ``--auto`` works too.
* Mesh: the ``--mesh`` sizes must multiply to the global device count. ``make_mesh`` reshapes
  ``jax.devices()``, which lists devices process by process, so the first axis is the one that
  spans hosts: ``fsdp=<hosts>,data=<devices per host>`` splits parameters and optimizer state
  across hosts (their all-gathers and gradient reduce-scatters cross hosts, the reduction over
  ``data`` stays inside a host); ``data=<hosts>,fsdp=<devices per host>`` keeps a parameter
  copy per host and all-reduces gradients across hosts; ``fsdp=<all devices>`` is plain FSDP.
* Data: ``--batch-size`` is global; each process reads ``batch_size / processes`` rows of its
  own document shard (``make_lm_dataset``'s default ``shard=(process_index, process_count)``),
  and ``make_global_batch`` assembles the global array without any host-to-host copy.
* Checkpoints: ``--ckpt-dir`` must be one location every host can write (a ``gs://`` bucket,
  NFS); all hosts call save/restore together, each writes its own parameter shards and its own
  data-iterator position, and the checkpoint restores in any other topology (a different mesh,
  one host, one device) as long as the data positions are restored with the same host count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

RECIPES = ("sophia", "galore", "adamw")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_argument_group("runtime")
    g.add_argument("--coordinator", help="HOST:PORT of process 0 (multi-process runs)")
    g.add_argument("--num-processes", type=int, default=1)
    g.add_argument("--process-id", type=int, default=0)
    g.add_argument("--auto", action="store_true",
                   help="jax.distributed.initialize() auto-detection (TPU pods, Slurm, MPI)")
    g.add_argument("--local-devices", type=int, default=None,
                   help="simulated CPU devices of this process (CPU only)")
    g.add_argument("--local-device-ids", default=None,
                   help="comma-separated accelerator ids this process owns, e.g. 0")
    g.add_argument("--simulate-shards", type=int, default=1,
                   help="single process only: read the data of this many process shards and "
                        "concatenate them (the reference for a multi-process run)")
    g.add_argument("--mesh", default=None,
                   help="e.g. 'fsdp=2,data=2' (default: fsdp=<processes>,data=<local devices>)")
    t = p.add_argument_group("workload")
    t.add_argument("--recipe", choices=RECIPES, default="sophia")
    t.add_argument("--steps", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=8, help="global batch (rows)")
    t.add_argument("--seq-len", type=int, default=32)
    t.add_argument("--d-model", type=int, default=64)
    t.add_argument("--n-layers", type=int, default=2)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("outputs")
    o.add_argument("--ckpt-dir", default=None,
                   help="after --steps steps: checkpoint here, step, restore, retake the step")
    o.add_argument("--restore-from", default=None,
                   help="restore this checkpoint's latest state onto one device and report it")
    o.add_argument("--save-params", default=None,
                   help=".npz of the final parameters (written by process 0)")
    o.add_argument("--out", required=True,
                   help="JSON report path; may contain {process_id}")
    args = p.parse_args(argv)
    if args.simulate_shards < 1:
        p.error(f"--simulate-shards must be >= 1; got {args.simulate_shards}")
    if args.simulate_shards > 1 and (args.num_processes > 1 or args.auto):
        p.error("--simulate-shards is for a single-process run")
    if args.num_processes > 1 and not args.coordinator:
        p.error("--num-processes > 1 needs --coordinator HOST:PORT (or use --auto)")
    if args.ckpt_dir and args.simulate_shards > 1:
        p.error("--ckpt-dir needs one data shard per process (not --simulate-shards)")
    if args.steps < 1:
        p.error(f"--steps must be >= 1; got {args.steps}")
    return args


def start_runtime(args) -> None:
    """Join the multi-controller runtime (or just set the CPU device count in one process)."""
    import jax
    from jaxeff import distributed
    ids = ([int(i) for i in args.local_device_ids.split(",")] if args.local_device_ids
           else None)
    if args.auto:
        distributed.initialize(local_devices=args.local_devices, local_device_ids=ids)
    elif args.num_processes > 1:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               args.local_devices, local_device_ids=ids, timeout_s=120)
    elif args.local_devices is not None:
        jax.config.update("jax_num_cpu_devices", args.local_devices)


def model_config(d_model: int = 64, n_layers: int = 2, seq_len: int = 32):
    """The tiny workload's decoder, shrunk (``d_ff = 2 d_model``)."""
    from jaxeff.models import llama
    return llama.PRESETS["tiny"].replace(d_model=d_model, n_layers=n_layers, d_ff=2 * d_model,
                                         max_seq_len=seq_len)


def make_recipe(name: str, cfg, lr: float):
    """``(tx, extra_args, metrics_fn)`` of a recipe at a constant learning rate, its refresh
    intervals shrunk so a few steps exercise them (Sophia k=2, GaLore gap=2)."""
    import optax
    from jaxeff.models import llama
    if name == "sophia":
        from jaxeff.optim import gnb, sophia, sophia_extra_args, sophia_win_rate

        def logits_fn(params, batch):
            return llama.forward(params, batch["inputs"], cfg, batch["segment_ids"],
                                 batch["positions"])

        tx = optax.chain(optax.clip_by_global_norm(1.0),
                         sophia(lr, gnb(logits_fn), rho=0.05, weight_decay=0.2,
                                update_interval=2))
        return tx, sophia_extra_args(), lambda s: {"win_rate": sophia_win_rate(s)}
    if name == "galore":
        from jaxeff.optim import galore
        tx = optax.chain(optax.clip_by_global_norm(1.0),
                         galore(lr * 4, optax.scale_by_adam(b1=0.9, b2=0.95), rank=0.25,
                                update_proj_gap=2, scale=0.25,
                                select="layers/(wq|wk|wv|wo|w_gate|w_up|w_down)$"))
        return tx, None, None
    if name == "adamw":
        return optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.1), None, None
    raise ValueError(f"recipe must be one of {RECIPES}; got {name!r}")


def state_initializer(recipe: str = "sophia", d_model: int = 64, n_layers: int = 2,
                      seq_len: int = 32, lr: float = 3e-3, seed: int = 0):
    """``(cfg, tx, extra_args, metrics_fn, init_state)``: ``init_state()`` builds the train
    state (params from ``seed``); ``jax.eval_shape(init_state)`` is its abstract twin (what a
    restore needs)."""
    import jax
    from jaxeff import train
    from jaxeff.models import llama
    cfg = model_config(d_model, n_layers, seq_len)
    tx, extra_args, metrics_fn = make_recipe(recipe, cfg, lr)

    def init_state():
        return train.init_train_state(llama.init_params(jax.random.key(seed), cfg), tx,
                                      seed=seed)

    return cfg, tx, extra_args, metrics_fn, init_state


def gather(tree):
    """The full value of every leaf as numpy, on every process (a collective when P > 1)."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    if jax.process_count() > 1:
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, jax.device_get(tree))


def leaf_hashes(tree) -> dict:
    """SHA-256 of every leaf's bytes (numpy leaves), keyed by its '/'-joined path."""
    import jax
    import numpy as np
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path):
            hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()
            for path, x in flat}


def batch_hash(batch) -> str:
    import numpy as np
    h = hashlib.sha256()
    for k in sorted(batch):
        h.update(np.ascontiguousarray(batch[k]).tobytes())
    return h.hexdigest()


class JsonStateIterator:
    """Wraps a Grain iterator behind plain ``get_state``/``set_state`` (JSON dicts), so the
    checkpoint goes through :class:`jaxeff.checkpoint.Checkpointer`'s JSON path."""

    def __init__(self, it):
        self.it = it

    def __next__(self):
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    start_runtime(args)            # before anything touches a JAX backend
    phases = {"initialize": time.perf_counter() - t0}
    cpu = {"initialize": time.process_time()}

    def phase(name):  # wall and CPU seconds of each phase (the machine may be shared)
        phases[name] = time.perf_counter() - t0 - sum(phases.values())
        cpu[name] = time.process_time() - sum(cpu.values())

    import jax
    import numpy as np
    from jaxeff import checkpoint, distributed, train
    from jaxeff import data as jdata
    from jaxeff import sharding as shd
    from jaxeff.models import llama

    P, p = jax.process_count(), jax.process_index()
    shards = args.simulate_shards if P == 1 else P
    if args.batch_size % shards:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the "
                         f"{shards} data shards")
    mesh_spec = args.mesh or f"fsdp={P},data={jax.local_device_count()}"
    mesh = shd.make_mesh(mesh_spec)
    if mesh.size != jax.device_count():
        raise ValueError(f"--mesh {mesh_spec} uses {mesh.size} of the {jax.device_count()} "
                         "devices; its sizes must multiply to the global device count")

    cfg, tx, extra_args, metrics_fn, init_state = state_initializer(
        args.recipe, args.d_model, args.n_layers, args.seq_len, args.lr, args.seed)
    shardings = train.state_shardings(jax.eval_shape(init_state), mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            jax.eval_shape(init_state), shardings)
    # jit with out_shardings: each process materialises only its own shards
    state = jax.jit(init_state, out_shardings=shardings)()
    step = train.make_train_step(lambda prm, b: llama.loss_fn(prm, b, cfg), tx,
                                 extra_args=extra_args, metrics_fn=metrics_fn, mesh=mesh,
                                 shardings=shardings)
    phase("init_state")

    # this process's document shard(s); local rows = global batch / shards
    tok = jdata.ByteTokenizer()
    corpus = jdata.load_stdlib_corpus("train")
    my_shards = [p] if P > 1 else list(range(shards))
    iters = [iter(jdata.make_lm_dataset(corpus, tok, args.seq_len, args.batch_size // shards,
                                        seed=args.seed, shard=(s, shards)))
             for s in my_shards]
    data_hashes = {str(s): [] for s in my_shards}

    def next_batch():
        parts = [next(it) for it in iters]
        for s, b in zip(my_shards, parts):
            data_hashes[str(s)].append(batch_hash(b))
        local = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
        return distributed.make_global_batch(local, mesh)

    batch = next_batch()
    phase("first_batch")
    losses, metrics = [], []
    for i in range(args.steps):
        state, m = step(state, batch if i == 0 else next_batch())
        losses.append(float(m["loss"]))
        metrics.append({k: float(v) for k, v in m.items()})
        phase(f"step{i + 1}")
    params = gather(state.params)          # numpy, full arrays, on every process
    report = {"process_id": p, "num_processes": P, "mesh": dict(mesh.shape),
              "devices": jax.device_count(), "local_devices": jax.local_device_count(),
              "recipe": args.recipe, "losses": losses, "metrics": metrics,
              "step": int(state.step), "param_sha256": leaf_hashes(params),
              "data_sha256": {s: list(h) for s, h in data_hashes.items()}}
    if args.save_params and p == 0:
        np.savez(args.save_params, **{k.replace("/", "."): v for k, v in
                                      zip(leaf_hashes(params), jax.tree.leaves(params))})
    phase("gather")

    if args.ckpt_dir:
        # save/restore are collective: every process calls them and writes its own shards
        # and its own data-iterator position (Grain's per-process handler)
        shard_hashes = data_hashes[str(my_shards[0])]
        ckpt = checkpoint.Checkpointer(args.ckpt_dir, max_to_keep=1)
        saved = ckpt.save(state, iters[0])
        state, m = step(state, next_batch())
        loss_next, hash_next = float(m["loss"]), shard_hashes[-1]
        restored = ckpt.restore(abstract, iters[0], step=saved)
        resume_hashes = leaf_hashes(gather(restored.params))
        _, m = step(restored, next_batch())
        ckpt.close()
        # the same through the JSON path (a non-Grain iterator with get_state/set_state)
        wrapped = JsonStateIterator(iters[0])
        ckpt = checkpoint.Checkpointer(args.ckpt_dir.rstrip("/") + "-json", max_to_keep=1)
        ckpt.save(state, wrapped)
        json_saved = wrapped.get_state()
        next(wrapped)
        ckpt.restore(abstract, wrapped)
        ckpt.close()
        report.update(checkpoint_step=saved, loss_after_checkpoint=loss_next,
                      loss_after_restore=float(m["loss"]),
                      data_resumed_same=shard_hashes[-1] == hash_next,
                      resume_param_sha256=resume_hashes,
                      json_data_resumed_same=wrapped.get_state() == json_saved)
        phase("checkpoint_resume")

    if args.restore_from:
        # restore the (possibly multi-process) checkpoint onto ONE device of this process
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        ckpt = checkpoint.Checkpointer(args.restore_from)
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
                              abstract)
        restored = ckpt.restore(target)
        ckpt.close()
        got = gather(restored.params)
        report.update(
            restored_step=int(restored.step),
            restored_devices=sorted({str(d) for x in jax.tree.leaves(restored.params)
                                     for d in x.devices()}),
            restored_param_sha256=leaf_hashes(got),
            restored_max_abs_diff_to_own=max(float(np.max(np.abs(a - b))) for a, b in
                                             zip(jax.tree.leaves(got), jax.tree.leaves(params))))
        phase("restore_one_device")
    report["phases_s"] = {k: round(v, 3) for k, v in phases.items()}
    report["phases_cpu_s"] = {k: round(v, 3) for k, v in cpu.items()}
    report["wall_s"] = time.perf_counter() - t0
    out = args.out.format(process_id=p)
    with open(out + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(out + ".tmp", out)
    if P > 1:
        jax.distributed.shutdown()
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
