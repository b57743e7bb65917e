"""One selector convention for every jaxeff transform.

Which leaves a transform touches, and with which per-leaf setting, is given the same way
everywhere (DESIGN.md, "One selector convention"):

* a **regex** string, matched with ``re.search`` against the leaf's ``/``-joined key path
  (e.g. ``"layers/(wq|wk|wv|wo|w_up|w_gate|w_down)$"``);
* a **predicate** ``(path: str, leaf) -> bool``;
* a **pytree of bools** with the same structure as the tree;
* ``None`` or ``True``: every leaf; ``False``: none.

Per-leaf *values* (a rank, a refresh gap, a projection type) use :func:`select_values`: a single
value for every selected leaf, an ordered list of ``(regex, value)`` rules (first match wins,
``None`` = leave the leaf alone), a callable ``(path, leaf) -> value | None`` or a pytree of values.

Stacked (scanned) layers: a leaf with more than two axes is a batch of matrices over its leading
axes; the matrix is the last two axes (``matrix_shape``). Transforms that work on matrices use
this rule unless they take explicit dimension numbers.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence, Union

import jax

Selector = Union[None, bool, str, Callable[[str, Any], bool], Any]

__all__ = ["path_str", "paths", "select_mask", "select_values", "matrix_shape", "count_selected"]


def _key_name(k) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return str(k.name)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_str(path) -> str:
    """Join a ``jax.tree_util`` key path into ``"a/b/0/c"``."""
    return "/".join(_key_name(k) for k in path)


def paths(tree, is_leaf=None) -> list[str]:
    """The ``/``-joined paths of every leaf of ``tree``, in flatten order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [path_str(p) for p, _ in flat]


def _compile(pattern: str, argname: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{argname}={pattern!r} is not a valid regex: {e}") from None


def select_mask(select: Selector, tree, *, argname: str = "select", allow_empty: bool = False,
                is_leaf=None):
    """Resolve a selector into a pytree of Python bools with the structure of ``tree``.

    Raises ``ValueError`` naming ``argname`` when the selector matches no leaf (unless
    ``allow_empty``), and ``TypeError`` for a selector of an unsupported type.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    if select is None or select is True:
        bools = [True] * len(flat)
    elif select is False:
        bools = [False] * len(flat)
    elif isinstance(select, str):
        rx = _compile(select, argname)
        bools = [bool(rx.search(path_str(p))) for p, _ in flat]
    elif callable(select) and not _is_pytree_of_bools(select):
        bools = [bool(select(path_str(p), leaf)) for p, leaf in flat]
    else:
        try:
            sel_flat = treedef.flatten_up_to(select)
        except (ValueError, TypeError) as e:
            raise TypeError(
                f"{argname} must be a regex string, a predicate (path, leaf) -> bool, or a pytree "
                f"of bools with the tree's structure; got {type(select).__name__} that does not "
                f"match the tree: {e}") from None
        bools = []
        for s in sel_flat:
            if not isinstance(s, bool):
                raise TypeError(f"{argname} pytree must hold Python bools; got {type(s).__name__}")
            bools.append(s)
    if not allow_empty and flat and not any(bools):
        raise ValueError(
            f"{argname}={_describe(select)} matches no leaf; leaf paths are: "
            f"{', '.join(path_str(p) for p, _ in flat[:12])}{' ...' if len(flat) > 12 else ''}")
    return jax.tree_util.tree_unflatten(treedef, bools)


def _is_pytree_of_bools(x) -> bool:
    leaves = jax.tree_util.tree_leaves(x)
    return bool(leaves) and all(isinstance(v, bool) for v in leaves) and not isinstance(x, bool)


def _describe(select) -> str:
    if isinstance(select, str):
        return repr(select)
    if callable(select):
        return getattr(select, "__name__", "predicate")
    return type(select).__name__


def select_values(spec, tree, *, argname: str, default=None, allow_empty: bool = False,
                  is_leaf=None):
    """Resolve a per-leaf value spec into a pytree of values (``default`` where unset).

    ``spec`` is one of: a list/tuple of ``(regex, value)`` rules (first match wins); a callable
    ``(path, leaf) -> value | None``; a pytree of values with the tree's structure; or a plain
    value applied to every leaf. Raises ``ValueError`` naming ``argname`` when no leaf gets a
    value (unless ``allow_empty``).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    if isinstance(spec, (list, tuple)) and all(
            isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str) for r in spec):
        rules = [(_compile(rx, argname), v) for rx, v in spec]
        vals = []
        for p, _ in flat:
            s = path_str(p)
            vals.append(next((v for rx, v in rules if rx.search(s)), default))
    elif callable(spec):
        vals = [spec(path_str(p), leaf) for p, leaf in flat]
        vals = [default if v is None else v for v in vals]
    else:
        try:
            vals = treedef.flatten_up_to(spec)
        except (ValueError, TypeError):
            vals = [spec] * len(flat)
    if not allow_empty and flat and all(v is None for v in vals):
        raise ValueError(f"{argname}={_describe(spec)} gives no leaf a value; leaf paths are: "
                         f"{', '.join(path_str(p) for p, _ in flat[:12])}")
    return jax.tree_util.tree_unflatten(treedef, vals)


def matrix_shape(shape: Sequence[int]) -> tuple[tuple[int, ...], int, int]:
    """Split a leaf shape into ``(batch_shape, m, n)``: the matrix is the last two axes."""
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"a matrix leaf needs at least 2 axes; got shape {shape}")
    return shape[:-2], shape[-2], shape[-1]


def count_selected(mask) -> int:
    """Number of ``True`` leaves in a resolved mask."""
    return sum(bool(b) for b in jax.tree_util.tree_leaves(mask))
