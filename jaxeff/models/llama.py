"""A small LLaMA-style decoder: the reference workload every jaxeff technique is measured on.

Token embedding, pre-RMSNorm blocks with rotary positions, grouped-query causal attention that
respects **segment ids** (packed documents never attend to each other; positions restart per
document), a SwiGLU MLP, a final RMSNorm and an (optionally tied) output head.

The model is plain functions over a plain dict of arrays, so every jaxeff transform (growth,
structured weights, GPTQ, GaLore selectors) sees an ordinary pytree. Blocks are stored as one
stacked layer axis (axis 0) and run with ``lax.scan``. Weights are ``[in, out]`` (``y = x @ W``).
Shape suffixes in names follow nanodo: ``x_BxLxD`` is batch x length x width.

Params::

    {'embed': [V, D],
     'layers': {'attn_norm': [L, D], 'wq': [L, D, H*hd], 'wk': [L, D, KV*hd], 'wv': [L, D, KV*hd],
                'wo': [L, H*hd, D], 'mlp_norm': [L, D], 'w_gate': [L, D, F], 'w_up': [L, D, F],
                'w_down': [L, F, D]},
     'final_norm': [D],
     'head': [D, V]}            # absent when tie_embeddings

We chose plain functions over flax NNX modules: the library's transforms are functions on
pytrees, and a dict of arrays is the one layout every one of them (and Orbax) handles without an
adapter. ``jaxeff.models.llama`` is never imported by the library itself.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jaxeff._checks import check_choice
from jaxeff.kernels import packed_attention as _attention
from jaxeff.params._linear import linear
from jaxeff.params._structured import is_structured

__all__ = ["LlamaConfig", "PRESETS", "init_params", "abstract_params", "forward", "loss_fn",
           "forward_embeds", "embed", "block", "logits", "param_count", "reference_attention", "project",
           "next_token_loss"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape of the decoder.

    ``head_dim`` (optional): the width of one attention head. ``None`` (default) derives it as
    ``d_model // n_heads`` (then ``d_model`` must be divisible by ``n_heads``); an explicit value
    decouples the attention width ``n_heads * head_dim`` from ``d_model`` (``wq: [D, H*hd]``,
    ``wo: [H*hd, D]``), e.g. a sub-network with fewer heads of the same size. After construction
    ``cfg.head_dim`` is always the resolved int; :meth:`replace` re-derives a derived head_dim
    from the new ``d_model`` / ``n_heads`` (use it rather than ``dataclasses.replace``, which
    would keep the old value).

    ``vocab_size``: rows of the embedding table, at least the tokenizer's ``vocab_size``
    (``jaxeff.data.ByteTokenizer().vocab_size == 264``: bytes 0-255, PAD/BOS/EOS 256-258 and
    5 reserved ids; a 256-row model would index out of range, which JAX clamps silently).
    Check with ``jaxeff.data.validate_tokenizer(tokenizer, cfg.vocab_size)`` or
    ``make_lm_dataset(..., vocab_size=cfg.vocab_size)``.
    """

    vocab_size: int = 264
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 512
    max_seq_len: int = 256
    rope_base: float = 10_000.0
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    dtype: str = "float32"        # parameter dtype
    compute_dtype: str = "float32"
    remat: bool = False
    head_dim: Optional[int] = None
    # Kernel selection for every projection (jaxeff.params.linear) and the attention
    # (jaxeff.kernels.attention): None = by backend, 'pallas' / 'reference' force a path;
    # interpret=True runs the Pallas kernels in interpret mode (CPU tests).
    impl: Optional[str] = None
    interpret: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                     "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int; got {v!r}")
        if self.impl is not None:
            check_choice("LlamaConfig.impl", self.impl, ("pallas", "reference"))
        if not isinstance(self.interpret, bool):
            raise ValueError(f"LlamaConfig.interpret must be a bool; got {self.interpret!r}")
        derived = self.head_dim is None
        if derived and self.d_model % self.n_heads:
            raise ValueError(f"LlamaConfig.d_model={self.d_model} must be divisible by "
                             f"n_heads={self.n_heads}")
        if not derived and (isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int)
                            or self.head_dim <= 0):
            raise ValueError(f"LlamaConfig.head_dim must be a positive int or None "
                             f"(= d_model // n_heads); got {self.head_dim!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LlamaConfig.n_heads={self.n_heads} must be a multiple of "
                             f"n_kv_heads={self.n_kv_heads}")
        hd = self.d_model // self.n_heads if derived else self.head_dim
        if hd % 2:
            raise ValueError(f"head_dim={hd} must be even for RoPE")
        # Store the resolved value (every user reads an int); remember that it was derived so
        # that replace() re-derives it, exactly as when head_dim was a property.
        object.__setattr__(self, "head_dim", hd)
        object.__setattr__(self, "_head_dim_derived", derived)

    def replace(self, **kw) -> "LlamaConfig":
        if "head_dim" not in kw and getattr(self, "_head_dim_derived", False):
            kw["head_dim"] = None
        return dataclasses.replace(self, **kw)


PRESETS: dict[str, LlamaConfig] = {
    # ~1.0M parameters: trains on a 2-core CPU in minutes (byte vocabulary, 264 ids).
    "tiny": LlamaConfig(vocab_size=264, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                        d_ff=512, max_seq_len=256),
    # ~2.4M parameters, twice as deep and wider: for studies that need a bit more capacity.
    "small": LlamaConfig(vocab_size=264, d_model=192, n_layers=8, n_heads=6, n_kv_heads=2,
                         d_ff=512, max_seq_len=256),
    # Real LLaMA shapes (GaLore paper's 130M/350M/1B-style configs with a 32k vocabulary);
    # only instantiated abstractly (jax.eval_shape) on this machine.
    "125m": LlamaConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                        d_ff=2048, max_seq_len=1024),
    "350m": LlamaConfig(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16,
                        d_ff=2736, max_seq_len=1024),
    "1b": LlamaConfig(vocab_size=32000, d_model=2048, n_layers=24, n_heads=32, n_kv_heads=32,
                      d_ff=5461, max_seq_len=2048),
}


def init_params(key: jax.Array, cfg: LlamaConfig) -> dict:
    """Initialise parameters: normal(0, 0.02) matrices, output projections scaled by 1/sqrt(2L)
    (GPT-2 style), unit RMSNorm scales."""
    dt = jnp.dtype(cfg.dtype)
    L, D, F, hd = cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.head_dim
    ks = jax.random.split(key, 9)
    std = 0.02
    out_std = std / (2 * L) ** 0.5

    def nrm(k, shape, s):
        return (s * jax.random.normal(k, shape, jnp.float32)).astype(dt)

    params = {
        "embed": nrm(ks[0], (cfg.vocab_size, D), std),
        "layers": {
            "attn_norm": jnp.ones((L, D), dt),
            "wq": nrm(ks[1], (L, D, cfg.n_heads * hd), std),
            "wk": nrm(ks[2], (L, D, cfg.n_kv_heads * hd), std),
            "wv": nrm(ks[3], (L, D, cfg.n_kv_heads * hd), std),
            "wo": nrm(ks[4], (L, cfg.n_heads * hd, D), out_std),
            "mlp_norm": jnp.ones((L, D), dt),
            "w_gate": nrm(ks[5], (L, D, F), std),
            "w_up": nrm(ks[6], (L, D, F), std),
            "w_down": nrm(ks[7], (L, F, D), out_std),
        },
        "final_norm": jnp.ones((D,), dt),
    }
    if not cfg.tie_embeddings:
        params["head"] = nrm(ks[8], (D, cfg.vocab_size), std)
    return params


def abstract_params(cfg: LlamaConfig) -> dict:
    """Parameter shapes and dtypes as ``jax.ShapeDtypeStruct``s, without allocating."""
    return jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))


def param_count(params) -> int:
    """Total number of scalar parameters in a pytree (works on abstract shapes too)."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params) if hasattr(x, "shape")))


# --------------------------------------------------------------------------------------------
# Building blocks


def rms_norm(x, scale, eps):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope(x_BxLxHxK, positions_BxL, base):
    """Rotary embedding, ``rotate_half`` convention (first/second half of each head pair up)."""
    half = x_BxLxHxK.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    ang_BxLxK = positions_BxL[..., None].astype(jnp.float32) * freq
    sin = jnp.sin(ang_BxLxK)[:, :, None, :]
    cos = jnp.cos(ang_BxLxK)[:, :, None, :]
    x1, x2 = x_BxLxHxK[..., :half].astype(jnp.float32), x_BxLxHxK[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxK.dtype)


def reference_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL=None, *, causal=True):
    """Grouped-query causal attention; token i sees j iff seg_i == seg_j and j <= i.

    ``jaxeff.kernels.attention_reference`` (the one definition; f32 logits and softmax).
    Padding (segment 0) attends only to padding, so no row is fully masked (no NaN).
    """
    return _attention.attention_reference(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL,
                                          causal=causal)


def embed(params, inputs_BxL, cfg: LlamaConfig):
    """Token embedding lookup."""
    return params["embed"][inputs_BxL].astype(jnp.dtype(cfg.compute_dtype))


def project(x, w, cfg: LlamaConfig):
    """``x @ w`` through ``jaxeff.params.linear`` with the config's ``impl`` / ``interpret``.

    A dense ``w`` is cast to ``x``'s compute dtype first; a structured weight (SLTrain factors,
    quantized codes, LoRA, low rank) applies its own product in ``x.dtype`` without
    densifying.
    """
    if not is_structured(w):
        w = w.astype(x.dtype)
    return linear(x, w, impl=cfg.impl, interpret=cfg.interpret)


def block(lp, x_BxLxD, cfg: LlamaConfig, segment_ids_BxL, positions_BxL,
          capture: Optional[dict] = None, attention_fn: Optional[Callable] = None):
    """One decoder block on one layer's params ``lp`` (the stacked leaves indexed at a layer).

    When ``capture`` is a dict, the input activation of every linear layer is stored in it under
    the weight's name (``wq``/``wk``/``wv`` share the normed input): the hook that layer-wise
    algorithms such as GPTQ use, without changing this code.
    """
    B, L, D = x_BxLxD.shape
    H, G, K = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    cd = x_BxLxD.dtype
    attn = attention_fn or functools.partial(_attention.attention, impl=cfg.impl,
                                             interpret=cfg.interpret)

    def proj(x, name):
        return project(x, lp[name], cfg)

    h_BxLxD = rms_norm(x_BxLxD, lp["attn_norm"], cfg.norm_eps)
    q = proj(h_BxLxD, "wq").reshape(B, L, H, K)
    k = proj(h_BxLxD, "wk").reshape(B, L, G, K)
    v = proj(h_BxLxD, "wv").reshape(B, L, G, K)
    q, k = rope(q, positions_BxL, cfg.rope_base), rope(k, positions_BxL, cfg.rope_base)
    a_BxLxHK = attn(q, k, v, segment_ids_BxL, causal=True).reshape(B, L, H * K)
    x_BxLxD = x_BxLxD + proj(a_BxLxHK, "wo")

    m_BxLxD = rms_norm(x_BxLxD, lp["mlp_norm"], cfg.norm_eps)
    u_BxLxF = jax.nn.silu(proj(m_BxLxD, "w_gate")) * proj(m_BxLxD, "w_up")
    x_BxLxD = x_BxLxD + proj(u_BxLxF, "w_down")
    if capture is not None:
        capture.update(wq=h_BxLxD, wk=h_BxLxD, wv=h_BxLxD, wo=a_BxLxHK,
                       w_gate=m_BxLxD, w_up=m_BxLxD, w_down=u_BxLxF)
    return x_BxLxD


def logits(params, x_BxLxD, cfg: LlamaConfig):
    """Final norm and output head (the transposed embedding when tied)."""
    h = rms_norm(x_BxLxD, params["final_norm"], cfg.norm_eps)
    w_DxV = params["embed"].T if cfg.tie_embeddings else params["head"]
    if is_structured(w_DxV):
        return project(h, w_DxV, cfg).astype(jnp.float32)
    return jnp.einsum("bld,dv->blv", h, w_DxV.astype(h.dtype),
                      preferred_element_type=jnp.float32)


def _defaults(shape_BxL, segment_ids, positions):
    if segment_ids is None:
        segment_ids = jnp.ones(shape_BxL, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(shape_BxL[1], dtype=jnp.int32), shape_BxL)
    return segment_ids, positions


def forward(params, inputs_BxL, cfg: LlamaConfig, segment_ids=None, positions=None,
            attention_fn: Optional[Callable] = None, return_hidden: bool = False,
            return_layers: bool = False):
    """Logits ``[B, L, V]`` (float32) for integer ``inputs_BxL``: :func:`forward_embeds` of
    :func:`embed`.

    ``segment_ids`` (1-based, 0 = padding) default to one segment; ``positions`` default to
    ``0..L-1``. ``attention_fn(q, k, v, segment_ids, *, causal)`` (the signature of
    ``jaxeff.kernels.attention``, so the dispatcher itself can be passed) replaces the default,
    ``jaxeff.kernels.attention`` with the config's ``impl`` / ``interpret``. With ``return_hidden``
    also returns the final hidden states before the norm; with ``return_layers`` also every
    layer's states (see :func:`forward_embeds`).
    """
    if inputs_BxL.ndim != 2:
        raise ValueError(f"inputs_BxL must be [batch, length]; got shape {inputs_BxL.shape}")
    return forward_embeds(params, embed(params, inputs_BxL, cfg), cfg, segment_ids, positions,
                          attention_fn, return_hidden, return_layers)


def forward_embeds(params, x_BxLxD, cfg: LlamaConfig, segment_ids=None, positions=None,
                   attention_fn: Optional[Callable] = None, return_hidden: bool = False,
                   return_layers: bool = False):
    """Logits ``[B, L, V]`` (float32) for input embeddings ``x_BxLxD`` (:func:`embed`'s output,
    possibly edited, e.g. with soft prompts prepended by ``jaxeff.params.prepend_prompts``).

    Arguments as :func:`forward`. Returns ``logits``, then ``hidden_BxLxD`` (final states before
    the norm) when ``return_hidden``, then ``layers_NxBxLxD`` when ``return_layers``: the
    ``N = n_layers + 1`` states of the same pass (the input, then each block's output;
    ``layers[-1]`` is the final hidden state), the ``lax.scan`` outputs, so no second forward is
    run. Raises ValueError for a non-[B, L, D] ``x_BxLxD``.
    """
    x = jnp.asarray(x_BxLxD)
    if x.ndim != 3 or x.shape[-1] != cfg.d_model:
        raise ValueError(f"x_BxLxD must be [batch, length, d_model={cfg.d_model}]; got shape "
                         f"{x.shape}")
    segment_ids, positions = _defaults(x.shape[:2], segment_ids, positions)

    def body(x, lp):
        y = block(lp, x, cfg, segment_ids, positions, attention_fn=attention_fn)
        return y, (y if return_layers else None)

    if cfg.remat:
        body = jax.checkpoint(body)
    h, ys = jax.lax.scan(body, x, params["layers"])
    out = (logits(params, h, cfg),)
    if return_hidden:
        out += (h,)
    if return_layers:
        out += (jnp.concatenate([x[None], ys], axis=0),)
    return out if len(out) > 1 else out[0]


def cross_entropy(logits_BxLxV, targets_BxL, mask_BxL):
    """Mean next-token cross-entropy over the unmasked positions, and the token count."""
    logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
    mask = mask_BxL.astype(jnp.float32)
    n = jnp.sum(mask)
    return jnp.sum(nll * mask) / jnp.maximum(n, 1.0), n


def loss_fn(params, batch, cfg: LlamaConfig, attention_fn: Optional[Callable] = None):
    """Mean next-token loss on a batch dict (``inputs``, ``targets``, ``segment_ids``,
    ``positions``, ``loss_mask``); returns ``(loss, {'tokens': n})``."""
    out = forward(params, batch["inputs"], cfg, batch.get("segment_ids"), batch.get("positions"),
                  attention_fn=attention_fn)
    mask = batch.get("loss_mask")
    if mask is None:
        mask = jnp.ones(batch["targets"].shape, jnp.float32)
    loss, n = cross_entropy(out, batch["targets"], mask)
    return loss, {"tokens": n}


def next_token_loss(params, tokens, cfg: LlamaConfig, attention_fn: Optional[Callable] = None):
    """Mean next-token cross-entropy of a plain token stream ``[T]`` or ``[B, T]`` (one document
    per row, no BOS added): inputs ``tokens[..., :-1]``, targets ``tokens[..., 1:]``, so a row of
    ``T`` tokens gives ``T - 1`` predictions. Raises ValueError for fewer than 2 tokens."""
    tokens = jnp.asarray(tokens)
    tokens_BxT = tokens[None] if tokens.ndim == 1 else tokens
    if tokens_BxT.ndim != 2 or tokens_BxT.shape[1] < 2:
        raise ValueError(f"tokens must be [T] or [B, T] with T >= 2; got shape {tokens.shape}")
    out = forward(params, tokens_BxT[:, :-1], cfg, attention_fn=attention_fn)
    return cross_entropy(out, tokens_BxT[:, 1:], jnp.ones(tokens_BxT[:, 1:].shape))[0]
