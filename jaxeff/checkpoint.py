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

Faults, and what ``Checkpointer`` does about them:

* **A killed save** (``kill -9`` mid-write) leaves an uncommitted temporary directory that Orbax
  ignores: the previous step restores bit-identically.
* **An unreadable newest step** (truncated or bit-flipped files: a ``JSONDecodeError``, a
  tensorstore ``DATA_LOSS``, or -- since Orbax stores raw chunks without checksums, so a flipped
  bit in an array restores silently -- a CRC32 per leaf, stored with the step, that no longer
  matches; leaves that are not fully addressable (multi-process shards) and cast leaves are not
  checksummed): ``restore()`` without ``step=`` warns (``CorruptCheckpointWarning``,
  naming the step and the error) and falls back to the next older step; with an explicit
  ``step=`` it raises ``ValueError`` naming that step.
* **Disk full / any OSError while saving**: one ``OSError`` (same errno) naming the step and the
  directory; the temporary directory is removed and earlier steps are untouched. Orbax's
  per-thread error logs of that save are not repeated.
* **A changed state structure** (another optimizer, another model): ``ValueError`` listing the
  differing leaf paths; ``restore(..., partial=True)`` restores the leaves the checkpoint has
  (e.g. the params) and keeps ``state_like``'s values for the others (the fresh optimizer state).
* **A changed dtype** (restoring float32 into a bfloat16 ``state_like``): ``TypeError`` naming the
  leaf and both dtypes, unless ``cast=True``.
* **Changed hyperparameters**: ``Checkpointer(..., hparams={...})`` stores the dict (JSON) with
  every step; ``restore`` warns (``HyperparameterChangeWarning``) for each key whose value
  differs from the checkpoint's, with the old and the new value.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import gc
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import warnings
import zlib
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxeff._checks import check_int

__all__ = ["Checkpointer", "CorruptCheckpointWarning", "HyperparameterChangeWarning"]

_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")
_MAX_LISTED = 8
# After a failed save, how long the step's temporary directory must stay absent before it counts
# as removed, and the most time spent removing it (see `Checkpointer._remove_tmp_dirs`).
_TMP_QUIET_S = 0.5
_TMP_DEADLINE_S = 30.0


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint step could not be read; an older step was restored instead."""


class HyperparameterChangeWarning(UserWarning):
    """A hyperparameter differs between the checkpoint and the resuming run."""


def _is_grain_iterator(it) -> bool:
    try:
        import grain
        return isinstance(it, grain.DatasetIterator)
    except Exception:  # pragma: no cover - grain always present as a dependency
        return False


def _process_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _key_text(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _dotted(path) -> str:
    """A key path as Orbax names the leaf (``opt_state.0.mu.w``)."""
    return ".".join(_key_text(k) for k in path)


def _checksums(tree) -> dict:
    """``{dotted path: crc32}`` of every fully addressable leaf's bytes (a bit flip in a saved
    array is otherwise restored silently: Orbax stores raw chunks without checksums)."""
    out = {}
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if getattr(x, "is_fully_addressable", True) and hasattr(x, "dtype"):
            out[_dotted(p)] = zlib.crc32(np.ascontiguousarray(np.asarray(x)).view(np.uint8))
    return out


def _listed(items) -> str:
    items = sorted(items)
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


class _DropOrbaxThreadErrors(logging.Filter):
    """Hold back Orbax's per-thread error logs of one save (the caller raises one error)."""

    def __init__(self):
        super().__init__()
        self.held = []

    def filter(self, record):
        msg = record.getMessage()
        if "raised an exception" in msg or "exception was never retrieved" in msg:
            self.held.append(record)
            return False
        return True


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


def _jsonable(name: str, value) -> Any:
    """``value`` round-tripped through JSON (tuples become lists), or a clear TypeError."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be JSON-serialisable (numbers, strings, bools, None, "
                        f"lists and dicts of them); got {value!r}: {e}") from None


class Checkpointer:
    """Save/restore ``(state, data_iterator)`` pairs under ``directory``.

    Multi-process use: see the module docstring (every process constructs it with the same
    ``directory`` and calls ``save``/``restore`` together). Faults (corrupt steps, disk full,
    changed structure, dtypes or hyperparameters): module docstring.

    Args:
      directory: where checkpoint steps live (created if absent); a local path or a URL
        Orbax understands (``gs://bucket/run``).
      max_to_keep: how many recent steps to keep (default 2); ``None`` keeps every step.
      hparams: optional dict of the run's hyperparameters (JSON-serialisable, e.g.
        ``{"lr": 3e-4, "optimizer": "adamw"}``), stored with every step and compared on restore.

    Raises:
      TypeError: ``directory`` is not a path, ``max_to_keep`` not an int, ``hparams`` not a
        JSON-serialisable dict.
      ValueError: ``max_to_keep`` < 1 (0 would delete every save; use None to keep all).
    """

    def __init__(self, directory: str, max_to_keep: Optional[int] = 2,
                 hparams: Optional[Mapping[str, Any]] = None):
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path; got {type(directory).__name__}")
        if max_to_keep is not None:
            try:
                max_to_keep = check_int("max_to_keep", max_to_keep, 1)
            except ValueError:
                raise ValueError(f"max_to_keep must be None (keep every step) or an int >= 1; "
                                 f"got {max_to_keep!r} (0 would delete every save)") from None
        if hparams is not None:
            if not isinstance(hparams, Mapping):
                raise TypeError(f"hparams must be a dict of hyperparameters or None; got "
                                f"{type(hparams).__name__}")
            hparams = _jsonable("hparams", dict(hparams))
        self.hparams = hparams
        directory = os.fspath(directory)
        if "://" in directory:   # gs://..., created by Orbax
            self.directory = directory
        else:
            self.directory = os.path.abspath(directory)
            os.makedirs(self.directory, exist_ok=True)
        self._options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                     enable_async_checkpointing=False)
        self._mgr = ocp.CheckpointManager(self.directory, options=self._options)

    def latest_step(self) -> Optional[int]:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        """The committed steps, oldest first."""
        return sorted(self._mgr.all_steps())

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

    # ------------------------------------------------------------------------------ save
    def save(self, state, data=None, step: Optional[int] = None) -> int:
        """Save ``state`` (and ``data``'s iterator state) as checkpoint ``step`` (default
        ``state.step``), with the ``hparams`` given to the constructor. Returns the step saved.
        Collective in multi-process runs.

        Raises:
          TypeError: no ``step`` given and ``state`` has no ``.step``; a non-int step.
          ValueError: a negative step.
          OSError: writing failed (e.g. disk full, ``errno.ENOSPC``): one error naming the step
            and the directory; the temporary directory is removed, earlier steps are intact.
        """
        if step is None:
            if not hasattr(state, "step"):
                raise TypeError(
                    f"save() needs step=: state of type {type(state).__name__} has no .step "
                    f"attribute to take it from; call save(state, step=N)")
            step = state.step
            try:
                step = int(step)
            except (TypeError, ValueError):
                raise TypeError(f"state.step must be an integer scalar; got {step!r}") from None
        step = check_int("step", step, 0)
        items = {"state": ocp.args.StandardSave(state)}
        d = self._data_args(data, save=True)
        if d is not None:
            items["data"] = d
        custom = {"checksums": _checksums(state)}
        if self.hparams is not None:
            custom["hparams"] = self.hparams
        loggers = [logging.getLogger("absl"), logging.getLogger("asyncio")]
        held = _DropOrbaxThreadErrors()
        for lg in loggers:
            lg.addFilter(held)
        hooks = sys.unraisablehook, threading.excepthook
        failed = None
        try:
            try:
                self._mgr.save(step, args=ocp.args.Composite(**items), force=True,
                               custom_metadata=custom)
                self._mgr.wait_until_finished()
            except OSError as e:
                # Keep the numbers only: the exception's traceback holds the failed save's
                # asyncio tasks alive, and they must be collected below, under the filter.
                failed = e.errno, e.strerror or str(e)
            if failed is not None:
                # Writer threads of the failed save report the same error again through these
                # hooks while they wind down; the one error raised below says it all.
                sys.unraisablehook = held.held.append
                threading.excepthook = held.held.append
                try:
                    left = self._recover_after_failed_save(step)
                finally:
                    sys.unraisablehook, threading.excepthook = hooks
                tmp = ("the temporary directory was removed" if not left else
                       f"the temporary directories {left} could not be removed (remove them "
                       f"by hand)")
                raise OSError(failed[0], f"saving checkpoint step {step} under "
                                         f"{self.directory} failed: {failed[1]}"
                                         f"{' (disk full)' if failed[0] == _errno.ENOSPC else ''}"
                                         f"; {tmp}, earlier steps {self.all_steps()} are intact")
        finally:
            for lg in loggers:
                lg.removeFilter(held)
        for record in held.held:   # the save succeeded: nothing was hidden for a reason
            logging.getLogger(record.name).handle(record)
        return step

    def _recover_after_failed_save(self, step: int) -> list:
        """Close the manager (its threads finish now, not at interpreter exit), remove the
        step's temporary directories, open a fresh manager. Returns the temporary directories
        that could not be removed."""
        try:
            self._mgr.close()
        except Exception:  # the manager is already broken by the failed write
            pass
        # Orbax's writer threads of this save may still run (other arrays' writes): let them
        # end now, so nothing writes into the directory we remove or logs at interpreter exit.
        for t in threading.enumerate():
            if t is not threading.current_thread() and type(t).__module__.startswith("orbax"):
                try:
                    t.join(timeout=60)
                except Exception:  # Orbax's threads re-raise their (same) write error
                    pass
        left = self._remove_tmp_dirs(step)   # also waits out TensorStore's late callbacks
        self._mgr = None                      # drop the failed manager and its tasks, then
        gc.collect()   # unretrieved asyncio task errors are logged (and held back) here
        self._mgr = ocp.CheckpointManager(self.directory, options=self._options)
        return left

    def _remove_tmp_dirs(self, step: int) -> list:
        """Remove step's temporary directories; return those still there (none normally).

        TensorStore's C++ threads may still finish operations the failed save started (the
        OCDBT manifest and data files of arrays opened before the error) after every Python
        thread has ended, and they recreate what was removed. No API waits for them, so remove
        until the directory has stayed clean for `_TMP_QUIET_S` (at most `_TMP_DEADLINE_S`).
        """
        if "://" in self.directory:
            return []
        prefix = f"{step}.orbax-checkpoint-tmp"
        start = quiet_since = time.monotonic()
        while True:
            found = [n for n in os.listdir(self.directory) if n.startswith(prefix)]
            for name in found:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            now = time.monotonic()
            if found:
                quiet_since = now
            if now - quiet_since >= _TMP_QUIET_S or now - start >= _TMP_DEADLINE_S:
                return [n for n in os.listdir(self.directory) if n.startswith(prefix)]
            time.sleep(0.02)

    # --------------------------------------------------------------------------- restore
    def saved_hparams(self, step: Optional[int] = None) -> Optional[dict]:
        """The ``hparams`` stored with ``step`` (default the latest), or None."""
        step = self._mgr.latest_step() if step is None else step
        if step is None:
            return None
        custom = self._mgr.metadata(step).custom_metadata or {}
        return custom.get("hparams")

    def _saved_tree(self, step: int):
        """The saved state's metadata tree of ``step`` (nested dicts/lists of ArrayMetadata),
        read from disk (raises on a truncated or corrupted ``_METADATA``)."""
        meta = ocp.StandardCheckpointHandler().metadata(
            epath.Path(self.directory) / str(step) / "state")
        tree = getattr(meta, "tree", meta)
        if tree is None:
            raise ValueError(f"checkpoint step {step} holds no state metadata")
        return tree

    def _saved_leaves(self, step: int) -> dict:
        """``{dotted path: ArrayMetadata}`` of the saved state of ``step``."""
        tree = self._saved_tree(step)
        leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and
                                 hasattr(x, "dtype"))
        return {m.name: m for m in leaves if hasattr(m, "name")}

    def _check_like(self, saved: dict, like: dict, step: int, cast: bool, partial: bool):
        missing = sorted(set(like) - set(saved))
        extra = sorted(set(saved) - set(like))
        if (missing or extra) and not partial:
            raise ValueError(
                f"the state structure differs from checkpoint step {step} under "
                f"{self.directory} (e.g. another optimizer or model): "
                f"{len(missing)} leaves of state_like are not in the checkpoint "
                f"[{_listed(missing)}] and {len(extra)} saved leaves are not in state_like "
                f"[{_listed(extra)}]. To restore only what both have (e.g. the params, keeping "
                f"state_like's fresh optimizer state), call restore(state_like, partial=True)")
        if partial and not set(like) & set(saved):
            raise ValueError(f"partial restore: no leaf of state_like is in checkpoint step "
                             f"{step} (saved leaves: {_listed(saved)})")
        for path in sorted(set(like) & set(saved)):
            want, have = like[path], saved[path]
            if tuple(want.shape) != tuple(have.shape):
                raise ValueError(f"leaf {path} has shape {tuple(have.shape)} in checkpoint step "
                                 f"{step} but {tuple(want.shape)} in state_like")
            if not cast and jax.numpy.dtype(want.dtype) != jax.numpy.dtype(have.dtype):
                raise TypeError(f"leaf {path} is {jax.numpy.dtype(have.dtype)} in checkpoint "
                                f"step {step} but {jax.numpy.dtype(want.dtype)} in state_like; "
                                f"pass cast=True to cast it on restore")

    def _restore_step(self, step, state_like, data, partial):
        flat, treedef = jax.tree_util.tree_flatten_with_path(state_like)
        items = {}
        if partial:
            saved_tree = self._saved_tree(step)
            like = {_dotted(p): x for p, x in flat}
            default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

            def abstract(m):
                x = like.get(m.name)
                if x is not None:
                    return jax.ShapeDtypeStruct(m.shape, x.dtype,
                                                sharding=getattr(x, "sharding", None) or default)
                return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=default)

            items["state"] = ocp.args.StandardRestore(jax.tree.map(
                abstract, saved_tree,
                is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype")))
        else:
            items["state"] = ocp.args.StandardRestore(
                jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like))
        d = self._data_args(data, save=False, step=step)
        if d is not None:
            items["data"] = d
        out = self._mgr.restore(step, args=ocp.args.Composite(**items))
        state = out["state"]
        got = {_dotted(p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
        sums = (self._mgr.metadata(step).custom_metadata or {}).get("checksums") or {}
        saved = self._saved_leaves(step)
        check = {k: v for k, v in got.items() if k in sums and k in saved
                 and np.dtype(saved[k].dtype) == np.dtype(v.dtype)}   # cast leaves: unchecked
        bad = sorted(k for k, v in _checksums(check).items() if v != sums[k])
        if bad:
            raise ValueError(f"checksum mismatch in leaves {_listed(bad)} (the saved bytes "
                             f"changed after the save)")
        if partial:
            state = jax.tree_util.tree_unflatten(
                treedef, [got.get(_dotted(p), x) for p, x in flat])
        return state, out, d

    def restore(self, state_like, data=None, step: Optional[int] = None, *,
                cast: bool = False, partial: bool = False):
        """Restore the state into the structure/shardings of ``state_like`` (arrays or
        ``jax.ShapeDtypeStruct``s with shardings) and, when given, set ``data``'s iterator
        position in place. Returns the restored state. Collective in multi-process runs.

        Args:
          state_like: the target structure (arrays or ShapeDtypeStructs).
          data: the data iterator to reposition (default None).
          step: the step (default: the latest readable one; unreadable newer steps are skipped
            with a ``CorruptCheckpointWarning``).
          cast: allow leaves whose dtype differs from the checkpoint's (default False).
          partial: restore only the leaves present in both (same dotted paths); the others keep
            ``state_like``'s values, which must then be arrays (default False).

        Warns ``HyperparameterChangeWarning`` for each hyperparameter of this Checkpointer's
        ``hparams`` that differs from the one stored with the restored step.

        Raises:
          FileNotFoundError: no checkpoint under ``directory``.
          ValueError: the state structure or a shape differs (unless ``partial``); ``step``
            given and unreadable; every step unreadable; ``data`` given but the step holds no
            iterator state for this process (saved without data, or by a different number of
            processes).
          TypeError: a dtype differs and not ``cast``.
        """
        explicit = step is not None
        if explicit:
            steps = [check_int("step", step, 0)]
            if steps[0] not in self._mgr.all_steps():
                raise FileNotFoundError(f"no checkpoint step {steps[0]} under {self.directory} "
                                        f"(steps: {self.all_steps()})")
        else:
            steps = sorted(self._mgr.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        like = {_dotted(p): x for p, x in jax.tree_util.tree_flatten_with_path(state_like)[0]}
        bad = []
        for s in steps:
            try:
                saved = self._saved_leaves(s)
            except Exception as e:  # unreadable metadata: a truncated or corrupted step
                self._unreadable(s, e, explicit, bad)
                continue
            self._check_like(saved, like, s, cast, partial)
            if partial:
                for path in set(like) - set(saved):
                    if not hasattr(like[path], "devices") and not hasattr(like[path], "__array__"):
                        raise ValueError(f"partial restore: leaf {path} is not in checkpoint "
                                         f"step {s}, so state_like must hold its value (an "
                                         f"array), not {type(like[path]).__name__}")
            try:
                state, out, d = self._restore_step(s, state_like, data, partial)
            except Exception as e:  # DATA_LOSS, JSONDecodeError, missing files
                if isinstance(e, ValueError) and "holds no data-iterator state" in str(e):
                    raise
                self._unreadable(s, e, explicit, bad)
                continue
            if d is not None and not _is_grain_iterator(data):
                data.set_state(out["data"])
            self._warn_hparams(s)
            return state
        raise ValueError(f"no readable checkpoint under {self.directory}: steps "
                         f"{[b for b, _ in bad]} are all corrupted or truncated; last error: "
                         f"{bad[-1][1]}")

    def _unreadable(self, step, error, explicit, bad):
        text = f"{type(error).__name__}: {error}"
        if len(text) > 500:
            text = text[:500] + " ..."
        if explicit:
            raise ValueError(f"checkpoint step {step} under {self.directory} is unreadable "
                             f"(truncated or corrupted): {text}") from error
        bad.append((step, text))
        warnings.warn(f"checkpoint step {step} under {self.directory} is unreadable (truncated "
                      f"or corrupted: {text}); falling back to the previous step",
                      CorruptCheckpointWarning, stacklevel=3)

    def _warn_hparams(self, step):
        if self.hparams is None:
            return
        try:
            old = self.saved_hparams(step)
        except Exception:  # pragma: no cover - metadata was readable a moment ago
            old = None
        if old is None:
            warnings.warn(f"checkpoint step {step} under {self.directory} stores no hparams, so "
                          f"a changed hyperparameter cannot be detected",
                          HyperparameterChangeWarning, stacklevel=3)
            return
        missing = object()
        for k in sorted(set(old) | set(self.hparams)):
            a, b = old.get(k, missing), self.hparams.get(k, missing)
            if a != b:
                fmt = lambda v: "(absent)" if v is missing else repr(v)  # noqa: E731
                warnings.warn(f"hyperparameter {k!r} changed since checkpoint step {step}: "
                              f"{fmt(a)} -> {fmt(b)}", HyperparameterChangeWarning,
                              stacklevel=3)

    def close(self):
        self._mgr.close()
