"""GGUF (llama.cpp) checkpoints of LLaMA-family models, read into ``jaxeff.models.llama``'s layout.

:func:`load_gguf` reads any ggml type ``gguf.quants`` dequantizes (F32, F16, BF16, Q4_0/Q4_1/Q8_0,
k-quants, ...) and builds the :class:`~jaxeff.models.llama.LlamaConfig` from the file's metadata
(:func:`gguf_config`). GGUF stores linear weights ``[out, in]``; jaxeff ``[in, out]``.

RoPE rows. llama.cpp's converter (``convert_hf_to_gguf.py``, ``LlamaModel.permute``) reorders the
rows of ``q_proj`` / ``k_proj`` of each head from HF's rotate-half order (first half, second half)
to the interleaved order its RoPE uses (pairs ``2i, 2i+1``)::

    W_gguf = W_hf.reshape(heads, 2, hd/2, in).swapaxes(1, 2).reshape(heads*hd, in)

(``heads`` = KV heads for ``k``). :func:`unpermute_qk` inverts it, so the GGUF weights run under
``llama.rope`` (rotate-half) and equal the HF weights exactly; :func:`permute_qk` is the forward
map. Getting this wrong still runs, with a much worse loss (5.71 instead of 3.59 on SmolLM2).

Optional dependency ``gguf`` (``pip install 'jaxeff[models]'``).
"""
from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxeff.models import llama
from jaxeff.models._checkpoints import _abstract, _check_shape, require

__all__ = ["load_gguf", "gguf_config", "permute_qk", "unpermute_qk"]


# --------------------------------------------------------------------------------------------
# llama.cpp's q/k row order


def _check_rows(w_OxI, n_heads):
    w_OxI = np.asarray(w_OxI)
    if w_OxI.ndim != 2 or n_heads <= 0 or w_OxI.shape[0] % (2 * n_heads):
        raise ValueError(f"w_OxI must be [heads * head_dim, in] with an even head_dim for "
                         f"n_heads={n_heads}; got shape {w_OxI.shape}")
    return w_OxI


def permute_qk(w_OxI, n_heads: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved order, per head (``[out, in]``)."""
    w_OxI = _check_rows(w_OxI, n_heads)
    O, I = w_OxI.shape
    return w_OxI.reshape(n_heads, 2, O // n_heads // 2, I).swapaxes(1, 2).reshape(O, I)


def unpermute_qk(w_OxI, n_heads: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`: llama.cpp's interleaved rows -> HF rotate-half rows."""
    w_OxI = _check_rows(w_OxI, n_heads)
    O, I = w_OxI.shape
    return w_OxI.reshape(n_heads, O // n_heads // 2, 2, I).swapaxes(1, 2).reshape(O, I)



_GGUF_LAYER = {"attn_norm": "blk.{i}.attn_norm.weight", "wq": "blk.{i}.attn_q.weight",
               "wk": "blk.{i}.attn_k.weight", "wv": "blk.{i}.attn_v.weight",
               "wo": "blk.{i}.attn_output.weight", "mlp_norm": "blk.{i}.ffn_norm.weight",
               "w_gate": "blk.{i}.ffn_gate.weight", "w_up": "blk.{i}.ffn_up.weight",
               "w_down": "blk.{i}.ffn_down.weight"}


def _field(reader, key, default: Any = KeyError):
    f = reader.fields.get(key)
    if f is None:
        if default is KeyError:
            raise ValueError(f"GGUF file has no metadata key {key!r}")
        return default
    return f.contents()


def _f32_decimal(v) -> float:
    """GGUF stores floats as float32: 9.99999974e-06 -> 1e-05, the value the model was made with."""
    return float(str(np.float32(v)))


def gguf_config(reader, **overrides) -> llama.LlamaConfig:
    """The ``LlamaConfig`` described by an open ``gguf.GGUFReader``'s metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF general.architecture={arch!r}; load_gguf reads 'llama' files")
    g = lambda k, d=KeyError: _field(reader, f"llama.{k}", d)  # noqa: E731
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names or g("rope.scaling.type", None) not in (None, "none"):
        raise ValueError("this GGUF uses RoPE scaling, which jaxeff.models.llama does not "
                         "implement")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab = g("vocab_size", None) or (len(tokens.data) if tokens is not None
                                      else int(emb.shape[1]))
    heads = int(g("attention.head_count"))
    d_model = int(g("embedding_length"))
    head_dim = int(g("attention.key_length", None) or g("rope.dimension_count", None)
                   or d_model // heads)
    rot = g("rope.dimension_count", None)
    if rot is not None and int(rot) != head_dim:
        raise ValueError(f"GGUF rope.dimension_count={rot} != head_dim={head_dim}: partial "
                         "rotary embeddings are not implemented")
    fields = dict(vocab_size=int(vocab), d_model=d_model, n_layers=int(g("block_count")),
                  n_heads=heads, n_kv_heads=int(g("attention.head_count_kv", heads)),
                  d_ff=int(g("feed_forward_length")), max_seq_len=int(g("context_length", 2048)),
                  rope_base=_f32_decimal(g("rope.freq_base", 10_000.0)),
                  norm_eps=_f32_decimal(g("attention.layer_norm_rms_epsilon", 1e-5)),
                  tie_embeddings="output.weight" not in names, head_dim=head_dim)
    fields.update(overrides)
    return llama.LlamaConfig(**fields)


def load_gguf(path, **config_overrides) -> tuple[llama.LlamaConfig, dict]:
    """``(config, params)`` of a LLaMA-family GGUF checkpoint, in ``jaxeff.models.llama``'s layout.

    Every tensor is dequantized to float32 with ``gguf.quants.dequantize`` (so a Q4_1 file gives
    the exact float32 values llama.cpp computes with), transposed to ``[in, out]``, the q/k rows
    un-permuted per head (:func:`unpermute_qk`) and the layers stacked; then cast to
    ``config.dtype``. The config comes from the ``llama.*`` metadata (width, depth, heads, KV
    heads, FFN width, context length, RoPE base, RMSNorm eps; tied embeddings when the file has no
    ``output.weight``); ``config_overrides`` replace fields (e.g. ``max_seq_len=2048``,
    ``dtype="bfloat16"``). The tokenizer stored in the file: :func:`jaxeff.models.gguf_tokenizer`.
    ``path`` may also be an open ``gguf.GGUFReader`` (parsing the metadata of a 49K-token
    vocabulary takes seconds, so :func:`pretrained` opens the file once for both).

    Raises:
      ImportError: ``gguf`` is not installed (the message gives the pip line).
      ValueError: not a ``llama`` file, RoPE scaling, partial rotary, a missing tensor or one whose
        shape disagrees with the metadata.
    """
    gguf = require("gguf")
    reader = path if isinstance(path, gguf.GGUFReader) else gguf.GGUFReader(os.fspath(path))
    path = reader.data.filename if hasattr(reader.data, "filename") else "the GGUF file"
    cfg = gguf_config(reader, **config_overrides)
    tensors = {t.name: t for t in reader.tensors}
    want = _abstract(cfg)
    dt = jnp.dtype(cfg.dtype)

    def read(name):
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"{os.fspath(path)} has no tensor {name!r}")
        x = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(x, np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))

    def matrix(name, key):
        w_OxI = read(name)
        if key == "wq":
            w_OxI = unpermute_qk(w_OxI, cfg.n_heads)
        elif key == "wk":
            w_OxI = unpermute_qk(w_OxI, cfg.n_kv_heads)
        return w_OxI if w_OxI.ndim == 1 else w_OxI.T

    layers = {}
    for key, tmpl in _GGUF_LAYER.items():
        x = np.stack([matrix(tmpl.format(i=i), key) for i in range(cfg.n_layers)])
        _check_shape(f"{tmpl} (stacked)", x, want["layers"][key])
        layers[key] = jnp.asarray(x, dt)
    params = {"embed": read("token_embd.weight"), "final_norm": read("output_norm.weight")}
    if not cfg.tie_embeddings:
        params["head"] = read("output.weight").T
    for key in list(params):
        _check_shape(key, params[key], want[key])
        params[key] = jnp.asarray(params[key], dt)
    params["layers"] = layers
    return cfg, params
