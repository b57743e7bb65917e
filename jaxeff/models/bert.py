"""A small BERT-style encoder (post-LayerNorm, learned positions, GELU MLP) as plain functions.

The architecture of "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding" (Devlin et al., 2019) as HF ``BertModel`` computes it, so real checkpoints such as
all-MiniLM-L6-v2 load into it (:func:`jaxeff.models.load_safetensors`)::

    x = LN(tok_embed[ids] + pos_embed[0..L-1] + type_embed[types])
    for each layer:  x = LN(x + Attn(x) Wo + bo);  x = LN(x + GELU(x W_in + b_in) W_out + b_out)

with exact (erf) GELU and padding keys masked out. :func:`forward` is :func:`embed` (the first
line) then :func:`encode` (the layers), so inputs can be edited between the two (soft prompts,
``jaxeff.params.prepend_prompts``); ``return_layers`` also returns every layer's hidden states
from the same pass (``jaxeff.params.unipt``). Every projection goes through
``jaxeff.params.linear``, so structured weights (LoRA, quantized, low rank) apply unmerged.
Sentence embeddings follow
sentence-transformers' mean pooling (sum of the unmasked token states over their count) and L2
normalisation ("Sentence-BERT", Reimers and Gurevych, 2019).

Params (stacked layer axis 0, weights ``[in, out]``: ``y = x @ W + b``)::

    {'tok_embed': [V, D], 'pos_embed': [P, D], 'type_embed': [T, D],
     'embed_norm_scale': [D], 'embed_norm_bias': [D],
     'layers': {'wq', 'wk', 'wv', 'wo': [L, D, D], 'bq', 'bk', 'bv', 'bo': [L, D],
                'attn_norm_scale', 'attn_norm_bias': [L, D],
                'w_in': [L, D, F], 'b_in': [L, F], 'w_out': [L, F, D], 'b_out': [L, D],
                'mlp_norm_scale', 'mlp_norm_bias': [L, D]},
     'pooler_w': [D, D], 'pooler_b': [D]}          # only when cfg.pooler

Shape letters: B batch, L length, D width, H heads, K head width, F MLP width, V vocabulary,
N stacked per-layer states (``n_layers + 1``: the embedding output, then each layer's output).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxeff.params._linear import linear

__all__ = ["BertConfig", "init_params", "embed", "block", "encode", "forward", "mean_pool",
           "sentence_embedding", "pool"]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Shape of the encoder (defaults: all-MiniLM-L6-v2)."""

    vocab_size: int = 30522
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 12
    d_ff: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    pooler: bool = True
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_positions",
                     "type_vocab_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"BertConfig.{name} must be a positive int; got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"BertConfig.d_model={self.d_model} must be divisible by "
                             f"n_heads={self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def init_params(key: jax.Array, cfg: BertConfig) -> dict:
    """Random parameters: normal(0, 0.02) matrices and embeddings, zero biases, unit LN scales."""
    dt = jnp.dtype(cfg.dtype)
    L, D, F = cfg.n_layers, cfg.d_model, cfg.d_ff
    ks = iter(jax.random.split(key, 12))

    def nrm(shape):
        return (0.02 * jax.random.normal(next(ks), shape, jnp.float32)).astype(dt)

    zeros, ones = (lambda *s: jnp.zeros(s, dt)), (lambda *s: jnp.ones(s, dt))
    params = {
        "tok_embed": nrm((cfg.vocab_size, D)), "pos_embed": nrm((cfg.max_positions, D)),
        "type_embed": nrm((cfg.type_vocab_size, D)),
        "embed_norm_scale": ones(D), "embed_norm_bias": zeros(D),
        "layers": {
            "wq": nrm((L, D, D)), "bq": zeros(L, D), "wk": nrm((L, D, D)), "bk": zeros(L, D),
            "wv": nrm((L, D, D)), "bv": zeros(L, D), "wo": nrm((L, D, D)), "bo": zeros(L, D),
            "attn_norm_scale": ones(L, D), "attn_norm_bias": zeros(L, D),
            "w_in": nrm((L, D, F)), "b_in": zeros(L, F), "w_out": nrm((L, F, D)),
            "b_out": zeros(L, D), "mlp_norm_scale": ones(L, D), "mlp_norm_bias": zeros(L, D),
        },
    }
    if cfg.pooler:
        params["pooler_w"], params["pooler_b"] = nrm((D, D)), zeros(D)
    return params


def layer_norm(x_BxLxD, scale_D, bias_D, eps):
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis, in float32."""
    x = x_BxLxD.astype(jnp.float32)
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * scale_D + bias_D


def block(lp, x_BxLxD, keep_BxL, cfg: BertConfig, capture=None):
    """One post-LN encoder layer on one layer's params ``lp`` (module docstring's formula).

    ``keep_BxL`` (bool) marks real tokens (padding keys are masked out). When ``capture`` is a
    dict, the input of every linear weight is stored in it under the weight's name
    (``wq``/``wk``/``wv`` share ``x``): the hook layer-wise algorithms such as GPTQ use.
    """
    B, L, D = x_BxLxD.shape
    H, K = cfg.n_heads, cfg.head_dim
    split = lambda y: y.reshape(B, L, H, K)  # noqa: E731
    q_BxLxHxK = split(linear(x_BxLxD, lp["wq"]) + lp["bq"])
    k_BxLxHxK = split(linear(x_BxLxD, lp["wk"]) + lp["bk"])
    v_BxLxHxK = split(linear(x_BxLxD, lp["wv"]) + lp["bv"])
    s_BxHxLxL = jnp.einsum("bqhk,bshk->bhqs", q_BxLxHxK, k_BxLxHxK) / jnp.sqrt(jnp.float32(K))
    s_BxHxLxL = jnp.where(keep_BxL[:, None, None, :], s_BxHxLxL, jnp.finfo(jnp.float32).min)
    p_BxHxLxL = jax.nn.softmax(s_BxHxLxL, axis=-1)
    a_BxLxD = jnp.einsum("bhqs,bshk->bqhk", p_BxHxLxL, v_BxLxHxK).reshape(B, L, D)
    h_BxLxD = layer_norm(x_BxLxD + linear(a_BxLxD, lp["wo"]) + lp["bo"], lp["attn_norm_scale"],
                         lp["attn_norm_bias"], cfg.norm_eps)
    u_BxLxF = jax.nn.gelu(linear(h_BxLxD, lp["w_in"]) + lp["b_in"], approximate=False)
    if capture is not None:
        capture.update(wq=x_BxLxD, wk=x_BxLxD, wv=x_BxLxD, wo=a_BxLxD, w_in=h_BxLxD,
                       w_out=u_BxLxF)
    return layer_norm(h_BxLxD + linear(u_BxLxF, lp["w_out"]) + lp["b_out"], lp["mlp_norm_scale"],
                      lp["mlp_norm_bias"], cfg.norm_eps)


def embed(params, ids_BxL, cfg: BertConfig, token_types_BxL=None):
    """The embedding layer ``LN(tok_embed[ids] + pos_embed[0..L-1] + type_embed[types])``,
    ``[B, L, D]`` float32: the input of the first layer.

    ``token_types_BxL`` default to 0. Raises ValueError for a non-[B, L] ``ids_BxL`` or a length
    over ``cfg.max_positions``.
    """
    ids_BxL = jnp.asarray(ids_BxL)
    if ids_BxL.ndim != 2:
        raise ValueError(f"ids_BxL must be [batch, length]; got shape {ids_BxL.shape}")
    B, L = ids_BxL.shape
    if L > cfg.max_positions:
        raise ValueError(f"ids_BxL has length {L} > cfg.max_positions={cfg.max_positions}")
    types_BxL = jnp.zeros((B, L), jnp.int32) if token_types_BxL is None else token_types_BxL
    x_BxLxD = (params["tok_embed"][ids_BxL] + params["pos_embed"][:L][None]
               + params["type_embed"][types_BxL]).astype(jnp.float32)
    return layer_norm(x_BxLxD, params["embed_norm_scale"], params["embed_norm_bias"],
                      cfg.norm_eps)


def encode(params, x_BxLxD, cfg: BertConfig, mask_BxL=None, return_layers: bool = False):
    """The layers on embedded inputs ``x_BxLxD`` (:func:`embed`'s output, possibly edited):
    final hidden states ``[B, L, D]`` float32.

    ``mask_BxL`` (1 = real token, 0 = padding; default all real) masks padding keys. With
    ``return_layers`` returns ``(h_BxLxD, layers_NxBxLxD)``: the ``N = n_layers + 1`` states of
    the same pass (the input ``x_BxLxD``, then each layer's output; ``layers[-1] == h``), the
    ``lax.scan`` outputs, so no second forward is run. Raises ValueError for a non-[B, L, D]
    ``x_BxLxD`` or a ``mask_BxL`` of another [B, L].
    """
    x_BxLxD = jnp.asarray(x_BxLxD, jnp.float32)
    if x_BxLxD.ndim != 3 or x_BxLxD.shape[-1] != cfg.d_model:
        raise ValueError(f"x_BxLxD must be [batch, length, d_model={cfg.d_model}]; got shape "
                         f"{x_BxLxD.shape}")
    B, L, _ = x_BxLxD.shape
    if mask_BxL is not None and jnp.shape(mask_BxL) != (B, L):
        raise ValueError(f"mask_BxL must have shape {(B, L)}; got {jnp.shape(mask_BxL)}")
    keep_BxL = jnp.ones((B, L), bool) if mask_BxL is None else jnp.asarray(mask_BxL) > 0

    def body(x, lp):
        y = block(lp, x, keep_BxL, cfg)
        return y, (y if return_layers else None)

    h_BxLxD, ys_NxBxLxD = jax.lax.scan(body, x_BxLxD, params["layers"])
    if not return_layers:
        return h_BxLxD
    return h_BxLxD, jnp.concatenate([x_BxLxD[None], ys_NxBxLxD], axis=0)


def forward(params, ids_BxL, cfg: BertConfig, mask_BxL=None, token_types_BxL=None,
            return_layers: bool = False):
    """Final hidden states ``[B, L, D]`` (float32) of the encoder: ``encode(embed(ids))``.

    ``mask_BxL`` (1 = real token, 0 = padding; default all real) masks padding keys;
    ``token_types_BxL`` default to 0; ``return_layers``: also every layer's states (see
    :func:`encode`). Raises ValueError for a non-[B, L] ``ids_BxL`` or a length over
    ``cfg.max_positions``.
    """
    x_BxLxD = embed(params, ids_BxL, cfg, token_types_BxL)
    return encode(params, x_BxLxD, cfg, mask_BxL, return_layers)


def mean_pool(h_BxLxD, mask_BxL):
    """Mean of the unmasked token states: ``sum_t m_t h_t / max(sum_t m_t, 1e-9)``."""
    m_BxLx1 = jnp.asarray(mask_BxL, jnp.float32)[..., None]
    return jnp.sum(h_BxLxD * m_BxLx1, axis=1) / jnp.maximum(jnp.sum(m_BxLx1, axis=1), 1e-9)


def sentence_embedding(params, ids_BxL, mask_BxL, cfg: BertConfig, normalize: bool = True):
    """Sentence embeddings ``[B, D]``: mean pooling of :func:`forward`, then ``x / max(|x|,
    1e-12)`` when ``normalize`` (sentence-transformers' all-MiniLM-L6-v2 pipeline)."""
    e_BxD = mean_pool(forward(params, ids_BxL, cfg, mask_BxL), mask_BxL)
    if normalize:
        e_BxD = e_BxD / jnp.maximum(jnp.linalg.norm(e_BxD, axis=-1, keepdims=True), 1e-12)
    return e_BxD


def pool(params, h_BxLxD):
    """BERT's pooler ``tanh(h[:, 0] @ pooler_w + pooler_b)``, ``[B, D]``.

    Raises ValueError when the params have no pooler (built with ``pooler=False``).
    """
    if "pooler_w" not in params:
        raise ValueError("params have no pooler ('pooler_w'); build them with pooler=True")
    return jnp.tanh(h_BxLxD[:, 0] @ params["pooler_w"] + params["pooler_b"])
