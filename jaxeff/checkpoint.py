"""Orbax checkpoints of a train state together with its Grain data-iterator state.

One checkpoint step holds two items: ``state`` (any pytree of arrays, e.g.
:class:`jaxeff.train.TrainState`, saved with ``StandardSave``) and ``data`` (the iterator's
state, saved with Grain's own ``grain.checkpoint.CheckpointSave``, or as JSON for an iterator
that has ``get_state``/``set_state`` returning a JSON-able dict). Saves are synchronous, so a
process killed right after ``save`` returns loses nothing it saved.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]


def _is_grain_iterator(it) -> bool:
    try:
        import grain
        return isinstance(it, grain.DatasetIterator)
    except Exception:  # pragma: no cover - grain always present as a dependency
        return False


class Checkpointer:
    """Save/restore ``(state, data_iterator)`` pairs under ``directory``.

    Args:
      directory: where checkpoint steps live (created if absent).
      max_to_keep: how many recent steps to keep.
    """

    def __init__(self, directory: str, max_to_keep: int = 2):
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path; got {type(directory).__name__}")
        self.directory = os.path.abspath(os.fspath(directory))
        os.makedirs(self.directory, exist_ok=True)
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False)
        self._mgr = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> Optional[int]:
        return self._mgr.latest_step()

    def _data_args(self, data, save: bool):
        import grain
        if data is None:
            return None
        if _is_grain_iterator(data):
            return (grain.checkpoint.CheckpointSave(data) if save
                    else grain.checkpoint.CheckpointRestore(data))
        if hasattr(data, "get_state") and hasattr(data, "set_state"):
            return ocp.args.JsonSave(data.get_state()) if save else ocp.args.JsonRestore()
        raise TypeError(
            f"data iterator of type {type(data).__name__} has no get_state/set_state, so its "
            "position cannot be checkpointed; pass data=None to checkpoint the state alone")

    def save(self, state, data=None, step: Optional[int] = None) -> int:
        """Save ``state`` (and ``data``'s iterator state) as checkpoint ``step`` (default
        ``state.step``). Returns the step saved."""
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
        """Restore the state into the structure/shardings of ``state_like`` and, when given,
        set ``data``'s iterator position in place. Returns the restored state."""
        if step is None:
            step = self._mgr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
        items = {"state": ocp.args.StandardRestore(abstract)}
        d = self._data_args(data, save=False)
        if d is not None:
            items["data"] = d
        out = self._mgr.restore(step, args=ocp.args.Composite(**items))
        if d is not None and not _is_grain_iterator(data):
            data.set_state(out["data"])
        return out["state"]

    def close(self):
        self._mgr.close()
