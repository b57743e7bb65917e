"""Multi-controller JAX: start one process per host and feed it its share of the global batch.

JAX's multi-controller runtime runs one Python process per host (per GPU, or per CPU
"host" in tests); every process runs the same program, owns its local devices, and ``jit``
over a global :class:`jax.sharding.Mesh` makes XLA insert the cross-process collectives.
This module holds the two pieces a training script needs beyond :mod:`jaxeff.sharding`::

    from jaxeff import distributed
    distributed.initialize("10.0.0.1:1234", num_processes=4, process_id=i)   # before any jax op
    mesh = jaxeff.sharding.make_mesh({"data": 4, "fsdp": jax.local_device_count()})
    data = iter(jaxeff.data.make_lm_dataset(corpus, tok, L, B // 4, seed=0))  # shard p of P
    batch = distributed.make_global_batch(next(data), mesh)                  # global jax.Arrays
    sh = jaxeff.train.state_shardings(jax.eval_shape(init_fn), mesh)
    state = jax.jit(init_fn, out_shardings=sh)()      # each process builds only its shards

Everything else is unchanged single-program code: ``jaxeff.train.make_train_step(...,
mesh=mesh, shardings=sh)`` and :class:`jaxeff.checkpoint.Checkpointer` (called by every
process) work as in one process.

On CPU (tests, CI) :func:`initialize` also selects the cross-process CPU collectives (Gloo
over TCP, jax's default in 0.10) and, with ``local_devices=n``, gives the process ``n``
simulated CPU devices. On TPU pod slices, ``initialize()`` with no arguments auto-detects
everything (so do Slurm and Open MPI launches); see ``experiments/multihost.py``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxeff import sharding as shd

__all__ = ["initialize", "make_global_batch", "CPU_COLLECTIVES"]

CPU_COLLECTIVES = ("gloo", "mpi")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_coordinator(coordinator) -> str:
    if not isinstance(coordinator, str):
        raise TypeError(f"coordinator must be a 'HOST:PORT' string; got "
                        f"{type(coordinator).__name__} {coordinator!r}")
    host, sep, port = coordinator.rpartition(":")
    host = host.strip("[]")  # '[::1]:1234' (IPv6)
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator must be 'HOST:PORT' with a port in 1..65535 (e.g. "
                         f"'127.0.0.1:1234'); got {coordinator!r}")
    return coordinator


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, local_devices: Optional[int] = None, *,
               local_device_ids: Optional[Sequence[int]] = None,
               cpu_collectives: Optional[str] = "gloo",
               timeout_s: int = 300) -> None:
    """Join the multi-controller runtime: ``jax.distributed.initialize`` with checked arguments.

    Process ``process_id`` of ``num_processes`` connects to the coordinator service (run by
    process 0 on ``coordinator``); afterwards ``jax.devices()`` lists the devices of all
    processes (global ids), ``jax.local_devices()`` this process's, and ``jit`` over a mesh of
    ``jax.devices()`` runs one SPMD program across all of them. Must run before anything
    initialises a JAX backend (any array op, ``jax.devices()``, ...).

    On CPU the cross-process collectives are ``cpu_collectives`` (sets
    ``jax_cpu_collectives_implementation``; only the CPU backend reads it, so it is harmless on
    GPU/TPU hosts), and ``local_devices`` sets ``jax_num_cpu_devices`` (the same as
    ``XLA_FLAGS=--xla_force_host_platform_device_count=n`` for this process).

    With all of ``coordinator``, ``num_processes`` and ``process_id`` left ``None``, JAX
    auto-detects them (Cloud TPU pod slices, Slurm, Open MPI); give all three otherwise.

    Args:
      coordinator: ``'HOST:PORT'`` of process 0 (reachable from every process); default None.
      num_processes: total number of processes (>= 1); default None.
      process_id: this process's index in ``[0, num_processes)``; default None.
      local_devices: number of simulated CPU devices for this process (>= 1), or None
        (default: leave the CPU device count as configured). CPU only.
      local_device_ids: accelerator ids this process owns (e.g. ``[0]`` for one process per
        GPU); default None = all visible ones.
      cpu_collectives: ``'gloo'`` (default) or ``'mpi'``; None leaves the setting unchanged.
      timeout_s: seconds to wait for all processes to join (default 300).

    Raises:
      TypeError / ValueError: an argument of the wrong type or out of range (named, with the
        value received), or only some of coordinator/num_processes/process_id given.
      RuntimeError: already initialised, or a backend was initialised before this call.
    """
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(f"give all of coordinator, num_processes and process_id, or none (to "
                         f"auto-detect them); got coordinator={coordinator!r}, "
                         f"num_processes={num_processes!r}, process_id={process_id!r}")
    if coordinator is not None:
        _check_coordinator(coordinator)
        if not _is_int(num_processes) or num_processes < 1:
            raise ValueError(f"num_processes must be an int >= 1; got {num_processes!r}")
        if not _is_int(process_id) or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id must be an int in [0, num_processes={num_processes}); "
                             f"got {process_id!r}")
        num_processes, process_id = int(num_processes), int(process_id)
    if local_devices is not None and (not _is_int(local_devices) or local_devices < 1):
        raise ValueError(f"local_devices must be None or an int >= 1; got {local_devices!r}")
    if local_device_ids is not None:
        ids = list(local_device_ids) if not isinstance(local_device_ids, (str, bytes)) else None
        if ids is None or not ids or not all(_is_int(i) and i >= 0 for i in ids):
            raise ValueError(f"local_device_ids must be a non-empty sequence of ints >= 0; got "
                             f"{local_device_ids!r}")
        local_device_ids = [int(i) for i in ids]
    if cpu_collectives is not None and cpu_collectives not in CPU_COLLECTIVES:
        raise ValueError(f"cpu_collectives must be one of {CPU_COLLECTIVES} or None; got "
                         f"{cpu_collectives!r}")
    if not _is_int(timeout_s) or timeout_s < 1:
        raise ValueError(f"timeout_s must be an int >= 1; got {timeout_s!r}")
    if jax.distributed.is_initialized():
        raise RuntimeError("jax.distributed is already initialized in this process")

    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if local_devices is not None:
        # raises RuntimeError itself if a backend already exists
        jax.config.update("jax_num_cpu_devices", int(local_devices))
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               local_device_ids=local_device_ids,
                               initialization_timeout=int(timeout_s))


def make_global_batch(local_batch, mesh: Mesh):
    """Global batch ``jax.Array``s from each process's local rows (a pytree of arrays).

    Every process passes its own ``[B_local, ...]`` rows (e.g. its Grain shard's batch); the
    result is, on every process, the same global ``[B_local * P_batch, ...]`` array with the
    batch axis split over all mesh axes (:func:`jaxeff.sharding.batch_sharding`), where
    ``P_batch`` is the number of processes the mesh spans. For a mesh built over
    ``jax.devices()`` (process-major order, as :func:`jaxeff.sharding.make_mesh` does), process
    ``p``'s rows are global rows ``[p B_local, (p + 1) B_local)``, i.e. the global batch is the
    processes' local batches concatenated in process order. In one process it is a plain
    ``device_put`` of the batch.

    Built on ``jax.make_array_from_process_local_data``.

    Raises:
      ValueError: a leaf with no batch axis, leaves with different batch sizes, or a local
        batch size not divisible by this process's number of batch shards.
    """
    sharding = shd.batch_sharding(mesh)
    leaves = jax.tree.leaves(local_batch)
    if not leaves:
        raise ValueError("local_batch holds no arrays")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        raise ValueError(f"every leaf of local_batch needs the same leading batch axis; got "
                         f"leading sizes {sorted(map(str, sizes))}")
    b_local = sizes.pop()
    local_shards = len(sharding.addressable_devices)  # each device holds distinct rows
    if local_shards == 0:
        raise ValueError(f"process {jax.process_index()} owns no device of the mesh "
                         f"{dict(mesh.shape)}; build the mesh over jax.devices()")
    if b_local % local_shards:
        raise ValueError(f"local batch size {b_local} must be divisible by this process's "
                         f"{local_shards} batch shards (mesh {dict(mesh.shape)})")
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
