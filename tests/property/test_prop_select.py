"""Property tests for jaxeff.select: regex, predicate and bool-tree selectors agree; paths."""
import re

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, strategies as st

from jaxeff.select import path_str, paths, select_mask, select_values

NAMES = st.sampled_from(["w", "wq", "w_up", "norm", "layers", "head", "b0", "x_1"])


def _trees(depth=2):
    leaf = st.builds(lambda n: jnp.zeros((n,)), st.integers(1, 3))
    return st.recursive(leaf, lambda kids: st.one_of(
        st.dictionaries(NAMES, kids, min_size=1, max_size=3),
        st.lists(kids, min_size=1, max_size=3).map(tuple)), max_leaves=8)


@given(_trees(), st.sampled_from(["w", "^w", "_", "q$", "layers/", "[0-9]", "^(w|b0)$", "."]))
def test_regex_predicate_and_bool_tree_give_one_mask(tree, pattern):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    expect = [re.search(pattern, path_str(p)) is not None for p, _ in flat]
    by_regex = jax.tree.leaves(select_mask(pattern, tree, allow_empty=True))
    by_pred = jax.tree.leaves(select_mask(lambda p, x: re.search(pattern, p) is not None, tree,
                                          allow_empty=True))
    by_tree = jax.tree.leaves(select_mask(jax.tree.unflatten(treedef, expect), tree,
                                          allow_empty=True))
    assert by_regex == by_pred == by_tree == expect
    if not any(expect):
        with pytest.raises(ValueError):
            select_mask(pattern, tree)


@given(_trees())
def test_paths_are_slash_joined_unique_and_in_flatten_order(tree):
    ps = paths(tree)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    assert len(ps) == len(flat) == len(jax.tree.leaves(tree))
    assert len(set(ps)) == len(ps)                        # a path names one leaf
    for p, (kp, _) in zip(ps, flat):
        assert p == path_str(kp) and p.count("/") == max(len(kp) - 1, 0)
        assert not kp or all(seg for seg in p.split("/"))  # no empty segment (root leaf: '')


@given(_trees(), st.sampled_from(["w", "^w", "q$", "."]), st.integers(-5, 5))
def test_values_follow_the_mask(tree, pattern, value):
    mask = jax.tree.leaves(select_mask(pattern, tree, allow_empty=True))
    vals = jax.tree.leaves(select_values([(pattern, value)], tree, argname="v", allow_empty=True),
                           is_leaf=lambda x: x is None)
    assert [v == value for v in vals] == mask
    assert all(v is None for v, m in zip(vals, mask) if not m)
