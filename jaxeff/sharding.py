"""Meshes and shardings for data-parallel and FSDP-style training over ``NamedSharding``.

``make_mesh({'data': 2, 'fsdp': 4})`` builds a mesh over the available devices;
``fsdp_shardings(tree, mesh)`` shards each large leaf's largest divisible axis over the ``fsdp``
mesh axis (replicating small leaves); ``batch_sharding(mesh)`` splits the batch axis over every
mesh axis. Under ``jit`` the computation is then the same as on one device, only distributed.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["make_mesh", "parse_mesh", "fsdp_shardings", "batch_sharding", "replicated",
           "shard_tree", "collectives"]


def parse_mesh(spec: str) -> dict[str, int]:
    """Parse ``"data=2,fsdp=4"`` into ``{'data': 2, 'fsdp': 4}``."""
    out = {}
    for part in spec.split(","):
        name, _, size = part.partition("=")
        if not name.strip() or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"mesh={spec!r}: expected comma-separated name=size pairs with "
                             f"positive sizes, e.g. 'data=2,fsdp=4'")
        out[name.strip()] = int(size)
    return out


def make_mesh(axes: Mapping[str, int] | str, devices=None) -> Mesh:
    """A ``Mesh`` with the given named axis sizes; their product must equal the device count
    used (the first ``prod(sizes)`` devices)."""
    if isinstance(axes, str):
        axes = parse_mesh(axes)
    devices = list(jax.devices() if devices is None else devices)
    n = int(np.prod(list(axes.values())))
    if n > len(devices):
        raise ValueError(f"mesh axes {dict(axes)} need {n} devices; only {len(devices)} present")
    arr = np.array(devices[:n]).reshape(tuple(axes.values()))
    return Mesh(arr, tuple(axes.keys()))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Shard axis 0 (the batch) over all mesh axes together."""
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def _fsdp_spec(shape, size: int, axis: str, min_size: int) -> P:
    if size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    # the largest axis that the fsdp size divides
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % size == 0:
            spec = [None] * len(shape)
            spec[i] = axis
            return P(*spec)
    return P()


def fsdp_shardings(tree, mesh: Mesh, axis: str = "fsdp", min_size: int = 2 ** 12):
    """Per-leaf ``NamedSharding``: leaves with at least ``min_size`` elements are split along
    their largest axis divisible by ``mesh.shape[axis]``; the rest are replicated. Works on
    arrays and ``ShapeDtypeStruct``s (so it can feed ``jit``'s ``out_shardings``)."""
    size = mesh.shape.get(axis, 1)
    return jax.tree.map(
        lambda x: NamedSharding(mesh, _fsdp_spec(np.shape(x), size, axis, min_size)), tree)


def shard_tree(tree, shardings: Optional[object]):
    """``jax.device_put`` a tree onto its shardings (a no-op when ``shardings`` is None)."""
    if shardings is None:
        return tree
    return jax.device_put(tree, shardings)


_COLLECTIVE = re.compile(r"=\s*(.+?)\s+(all-gather|all-reduce|all-to-all|reduce-scatter|"
                         r"collective-permute)(?:-start)?\(")


def collectives(hlo_text: str, ops=("all-gather",)) -> list:
    """``(op, result_shape)`` for every collective of a kind in ``ops`` in HLO text.

    Use on ``jax.jit(f, ...).lower(*args).compile().as_text()`` to see what a sharded program
    communicates, e.g. that an optimizer update gathers no full weight matrix. Kinds: 'all-gather',
    'all-reduce', 'all-to-all', 'reduce-scatter', 'collective-permute' (async ``-start`` forms
    included); a tuple-shaped result gives one entry per element. Raises nothing: unknown kinds
    simply match no line.
    """
    out = []
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if m and m.group(2) in ops:
            for dims in re.findall(r"[a-z]\w*\[([\d,]*)\]", m.group(1)):
                out.append((m.group(2), tuple(int(d) for d in dims.split(",") if d)))
    return out
