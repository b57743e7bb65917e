"""The reference model reaches the Pallas kernels through jaxeff.params.linear and the
jaxeff.kernels attention dispatcher (interpret mode on CPU)."""
import jax
import jax.numpy as jnp
import numpy as np

import jaxeff.kernels
from jaxeff.models import llama
from jaxeff.params import materialize, rtn, sltrain

CFG = llama.LlamaConfig(vocab_size=50, d_model=128, n_layers=1, n_heads=2, n_kv_heads=1,
                        d_ff=128, max_seq_len=16)
SEL = r"layers/(wq|wk|wv|wo|w_gate|w_up|w_down)$"


def _inputs():
    x = jnp.asarray(np.random.default_rng(0).integers(0, 50, (1, 8)), jnp.int32)
    seg = jnp.asarray([[1] * 5 + [2] * 3], jnp.int32)
    pos = jnp.asarray([list(range(5)) + list(range(3))], jnp.int32)
    return x, seg, pos


def test_kernel_dispatcher_is_a_valid_attention_fn():
    """forward(..., attention_fn=jaxeff.kernels.attention) was a TypeError (causal by position)."""
    p = llama.init_params(jax.random.key(0), CFG)
    x, seg, pos = _inputs()
    got = llama.forward(p, x, CFG, seg, pos, attention_fn=jaxeff.kernels.attention)
    np.testing.assert_allclose(got, llama.forward(p, x, CFG, seg, pos), rtol=1e-6, atol=1e-6)


def test_forced_pallas_forward_contains_kernels_and_matches_reference():
    """4-bit RTN projections + attention: quant_matmul and flash attention kernels in the jaxpr."""
    p = rtn(llama.init_params(jax.random.key(0), CFG), 4, 128, select=SEL)
    x, seg, pos = _inputs()
    cfg_k = CFG.replace(impl="pallas", interpret=True)
    jaxpr = str(jax.make_jaxpr(lambda p: llama.forward(p, x, cfg_k, seg, pos))(p))
    assert "jaxeff_quant_matmul" in jaxpr and "jaxeff_attention_fwd" in jaxpr
    assert "pallas_call" not in str(jax.make_jaxpr(lambda p: llama.forward(p, x, CFG, seg, pos))(p))
    got = jax.jit(lambda p: llama.forward(p, x, cfg_k, seg, pos))(p)
    want = jax.jit(lambda p: llama.forward(materialize(p), x, CFG, seg, pos))(p)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_sltrain_model_gradient_reaches_sddmm_kernel():
    p = llama.init_params(jax.random.key(0), CFG)
    f = sltrain(rank=4, density=0.05, select=SEL).from_dense(jax.random.key(1), p)
    x, seg, pos = _inputs()
    cfg_k = CFG.replace(impl="pallas", interpret=True)
    loss = lambda f, cfg: jnp.sum(llama.forward(f, x, cfg, seg, pos) ** 2)  # noqa: E731
    grad = lambda cfg: jax.grad(loss, allow_int=True)  # noqa: E731
    assert "jaxeff_sltrain_sddmm" in str(jax.make_jaxpr(grad(cfg_k), static_argnums=1)(f, cfg_k))
    ref_cfg = CFG.replace(impl="reference")
    assert "pallas_call" not in str(jax.make_jaxpr(grad(ref_cfg), static_argnums=1)(f, ref_cfg))
