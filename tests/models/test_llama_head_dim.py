"""LlamaConfig.head_dim: optional explicit head width (default None = d_model // n_heads)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.models import llama

_fwd = jax.jit(llama.forward, static_argnums=2)
BASE = llama.LlamaConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_ff=64, max_seq_len=16)


def test_default_is_derived_and_replace_rederives():
    assert BASE.head_dim == 8
    assert llama.PRESETS["tiny"].head_dim == 32
    # replace() recomputes a derived head_dim, exactly as the former property did
    assert BASE.replace(d_model=64).head_dim == 16
    assert BASE.replace(n_heads=2, n_kv_heads=1).head_dim == 16
    # an explicit head_dim is kept by replace()
    explicit = BASE.replace(head_dim=4)
    assert explicit.replace(d_model=64).head_dim == 4
    assert explicit.replace(head_dim=None).head_dim == 8
    # the same resolved shape compares (and hashes) equal: one jit cache entry
    assert BASE == BASE.replace(head_dim=8) and hash(BASE) == hash(BASE.replace(head_dim=8))
    assert {f.name for f in dataclasses.fields(BASE)} >= {"head_dim"}


def test_explicit_equal_to_derived_is_bit_identical():
    x = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 8)), jnp.int32)
    p = llama.init_params(jax.random.key(0), BASE)
    q = llama.init_params(jax.random.key(0), BASE.replace(head_dim=8))
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
        np.testing.assert_array_equal(a, b)
    # the configs are equal and hash equal, so jit reuses one compilation: identical outputs.
    # Compare cache sizes around the second call only: jit objects of the same function share
    # one cache, so other tests in this process may have added entries before.
    a = _fwd(p, x, BASE)
    entries = _fwd._cache_size()
    b = _fwd(q, x, BASE.replace(head_dim=8))
    np.testing.assert_array_equal(a, b)
    assert _fwd._cache_size() == entries


def test_decoupled_head_dim_shapes_and_forward():
    cfg = BASE.replace(head_dim=4)                     # attention width 16 != d_model 32
    p = llama.init_params(jax.random.key(1), cfg)
    lay = p["layers"]
    assert lay["wq"].shape == (2, 32, 16) and lay["wk"].shape == (2, 32, 8)
    assert lay["wo"].shape == (2, 16, 32)
    inputs = jnp.zeros((2, 8), jnp.int32)
    assert np.isfinite(np.asarray(_fwd(p, inputs, cfg))).all()
    # d_model not divisible by n_heads is fine once head_dim is explicit
    odd = llama.LlamaConfig(vocab_size=32, d_model=30, n_layers=1, n_heads=4, n_kv_heads=2,
                            d_ff=32, head_dim=8)
    out = _fwd(llama.init_params(jax.random.key(2), odd), inputs, odd)
    assert out.shape == (2, 8, 32)


def test_fewer_heads_same_head_dim_is_a_slice():
    """A sub-network keeping the first KV group (its query heads) is a LlamaConfig now."""
    p = llama.init_params(jax.random.key(3), BASE)
    hd, R = BASE.head_dim, BASE.n_heads // BASE.n_kv_heads
    sub_cfg = BASE.replace(n_heads=R, n_kv_heads=1, head_dim=hd)
    sub = dict(p, layers=dict(p["layers"], wq=p["layers"]["wq"][..., :R * hd],
                              wk=p["layers"]["wk"][..., :hd], wv=p["layers"]["wv"][..., :hd],
                              wo=p["layers"]["wo"][:, :R * hd]))
    assert _fwd(sub, jnp.zeros((1, 4), jnp.int32), sub_cfg).shape == (1, 4, 32)


@pytest.mark.parametrize("kw, match", [
    (dict(head_dim=0), "head_dim must be a positive int"),
    (dict(head_dim=-8), "head_dim must be a positive int"),
    (dict(head_dim=2.0), "head_dim must be a positive int"),
    (dict(head_dim=True), "head_dim must be a positive int"),
    (dict(head_dim=5), "must be even for RoPE"),
    (dict(d_model=30), "divisible by n_heads"),
    (dict(d_model=36, n_heads=4), "head_dim=9 must be even"),
])
def test_bad_head_dim(kw, match):
    with pytest.raises(ValueError, match=match):
        BASE.replace(**kw)
