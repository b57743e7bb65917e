"""Orbax checkpoints of a train state together with its Grain data-iterator state.

One checkpoint step holds two items: ``state`` (any pytree of arrays, e.g.
:class:`jaxeff.train.TrainState`, saved with ``StandardSave``) and ``data`` (the iterator's
state, saved with Grain's own ``grain.checkpoint.CheckpointSave``, or as JSON for an iterator
that has ``get_state``/``set_state`` returning a JSON-able dict). Saves are synchronous, so a
process killed right after ``save`` returns loses nothing it saved.

Multi-process (JAX multi-controller, :mod:`jaxeff.distributed`): ``save`` and ``restore`` are
collective, so every process calls them with the same step, on a ``directory`` every process
can reach (a shared file system or a ``gs://`` bucket). Each process writes the shards of the
global ``state`` arrays it owns (Orbax/OCDBT) and its own data-iterator position
(``data/process_{p}-of-{P}.json``: Grain's handler does this for Grain iterators, and a
per-process JSON handler here for other iterators, since Orbax's ``JsonSave`` writes on process
0 only). ``restore`` reads the state into the shapes and shardings of ``state_like``, so a
checkpoint written by P processes restores in any other topology, including one process on one
device; its data positions restore only with the same number of processes (each process gets
its own), otherwise pass ``data=None``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

__all__ = ["Checkpointer"]

_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")


def _is_grain_iterator(it) -> bool:
    try:
        import grain
        return isinstance(it, grain.DatasetIterator)
    except Exception:  # pragma: no cover - grain always present as a dependency
        return False


def _process_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class _ProcessJsonHandler(ocp.CheckpointHandler):
    """Orbax item handler: each process writes/reads its own ``process_{p}-of-{P}.json``.

    Hand-written because Orbax's ``JsonCheckpointHandler`` writes on the primary process only
    (one JSON for all), while each process's data iterator has its own position; the naming
    matches Grain's own per-process handler.
    """

    def save(self, directory: epath.Path, args: "_ProcessJsonSave"):
        (directory / _process_file()).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: Optional["_ProcessJsonRestore"] = None):
        return json.loads((directory / _process_file()).read_text())

    def metadata(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(_ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class _ProcessJsonSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(_ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class _ProcessJsonRestore(ocp.args.CheckpointArgs):
    pass


class Checkpointer:
    """Save/restore ``(state, data_iterator)`` pairs under ``directory``.

    Multi-process use: see the module docstring (every process constructs it with the same
    ``directory`` and calls ``save``/``restore`` together).

    Args:
      directory: where checkpoint steps live (created if absent); a local path or a URL
        Orbax understands (``gs://bucket/run``).
      max_to_keep: how many recent steps to keep (default 2).

    Raises:
      TypeError: ``directory`` is not a path.
    """

    def __init__(self, directory: str, max_to_keep: int = 2):
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path; got {type(directory).__name__}")
        directory = os.fspath(directory)
        if "://" in directory:   # gs://..., created by Orbax
            self.directory = directory
        else:
            self.directory = os.path.abspath(directory)
            os.makedirs(self.directory, exist_ok=True)
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False)
        self._mgr = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> Optional[int]:
        return self._mgr.latest_step()

    def _saved_data(self, step: int) -> tuple[set, bool]:
        """``({(p, P) of per-process data files}, has a single JSON file)`` of ``step``."""
        path = epath.Path(self.directory) / str(step) / "data"
        if not path.exists():
            return set(), False
        names = [p.name for p in path.iterdir()]
        per_process = {(int(m.group(1)), int(m.group(2)))
                       for m in map(_PROCESS_FILE.match, names) if m}
        return per_process, "metadata" in names

    def _data_args(self, data, save: bool, step: Optional[int] = None):
        import grain
        if data is None:
            return None
        grain_it = _is_grain_iterator(data)
        if not grain_it and not (hasattr(data, "get_state") and hasattr(data, "set_state")):
            raise TypeError(
                f"data iterator of type {type(data).__name__} has no get_state/set_state, so its "
                "position cannot be checkpointed; pass data=None to checkpoint the state alone")
        multi = jax.process_count() > 1
        if save:
            if grain_it:
                return grain.checkpoint.CheckpointSave(data)
            return _ProcessJsonSave(data.get_state()) if multi else ocp.args.JsonSave(
                data.get_state())
        per_process, single_json = self._saved_data(step)
        mine = (jax.process_index(), jax.process_count())
        if mine in per_process:
            return (grain.checkpoint.CheckpointRestore(data) if grain_it
                    else _ProcessJsonRestore())
        if not multi and single_json and not grain_it:
            return ocp.args.JsonRestore()
        counts = sorted({n for _, n in per_process}) or ([1] if single_json else [])
        raise ValueError(
            f"checkpoint step {step} under {self.directory} holds no data-iterator state for "
            f"process {mine[0]} of {mine[1]} (saved by process counts {counts or 'none'}); "
            "restore with the same number of processes, or pass data=None to restore the "
            "state alone")

    def save(self, state, data=None, step: Optional[int] = None) -> int:
        """Save ``state`` (and ``data``'s iterator state) as checkpoint ``step`` (default
        ``state.step``). Returns the step saved. Collective in multi-process runs."""
        if step is None:
            step = int(state.step)
        items = {"state": ocp.args.StandardSave(state)}
        d = self._data_args(data, save=True)
        if d is not None:
            items["data"] = d
        self._mgr.save(step, args=ocp.args.Composite(**items), force=True)
        self._mgr.wait_until_finished()
        return step

    def restore(self, state_like, data=None, step: Optional[int] = None):
        """Restore the state into the structure/shardings of ``state_like`` (arrays or
        ``jax.ShapeDtypeStruct``s with shardings) and, when given, set ``data``'s iterator
        position in place. Returns the restored state. Collective in multi-process runs.

        Raises:
          FileNotFoundError: no checkpoint under ``directory``.
          ValueError: ``data`` given but the step holds no iterator state for this process
            (saved without data, or by a different number of processes).
        """
        if step is None:
            step = self._mgr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
        items = {"state": ocp.args.StandardRestore(abstract)}
        d = self._data_args(data, save=False, step=step)
        if d is not None:
            items["data"] = d
        out = self._mgr.restore(step, args=ocp.args.Composite(**items))
        if d is not None and not _is_grain_iterator(data):
            data.set_state(out["data"])
        return out["state"]

    def close(self):
        self._mgr.close()
