"""Real checkpoints in and out, safetensors side: HF tensor names and ``config.json``.

:func:`load_safetensors` / :func:`save_safetensors` map HF ``LlamaForCausalLM`` and ``BertModel``
tensor names to and from the layouts of ``jaxeff.models.llama`` and ``jaxeff.models.bert``;
:func:`config_from_hf` / :func:`hf_config` convert ``config.json``. GGUF files: ``_gguf.py``.

Layouts. HF and GGUF store linear weights ``[out, in]``; jaxeff stores ``[in, out]``
(``y = x @ W``), so every matrix is transposed; embeddings are ``[V, D]`` in all three. Layers are stacked on axis 0.

Optional dependencies: ``safetensors`` (and ``gguf`` / ``tokenizers`` elsewhere in this package;
``pip install 'jaxeff[models]'``); a missing one raises ImportError with the install line
(:func:`require`).
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.models import bert, llama

__all__ = ["load_safetensors", "save_safetensors", "config_from_hf", "hf_config", "require"]

Config = Union[llama.LlamaConfig, bert.BertConfig]


def require(module: str, pip_name: Optional[str] = None):
    """Import an optional dependency, or raise ImportError naming the exact ``pip install``."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed here and is not installed; install it with "
                          f"`pip install {pip_name or module}` (or `pip install 'jaxeff[models]'`)"
                          ) from e


# --------------------------------------------------------------------------------------------
# Name tables: (file name, jaxeff key, transpose). ``{i}`` is the layer index.

_LLAMA_LAYER = [
    ("model.layers.{i}.input_layernorm.weight", "attn_norm", False),
    ("model.layers.{i}.self_attn.q_proj.weight", "wq", True),
    ("model.layers.{i}.self_attn.k_proj.weight", "wk", True),
    ("model.layers.{i}.self_attn.v_proj.weight", "wv", True),
    ("model.layers.{i}.self_attn.o_proj.weight", "wo", True),
    ("model.layers.{i}.post_attention_layernorm.weight", "mlp_norm", False),
    ("model.layers.{i}.mlp.gate_proj.weight", "w_gate", True),
    ("model.layers.{i}.mlp.up_proj.weight", "w_up", True),
    ("model.layers.{i}.mlp.down_proj.weight", "w_down", True),
]
_LLAMA_TOP = [("model.embed_tokens.weight", "embed", False),
              ("model.norm.weight", "final_norm", False)]
_LLAMA_HEAD = ("lm_head.weight", "head", True)

_BERT_LAYER = [
    ("encoder.layer.{i}.attention.self.query.weight", "wq", True),
    ("encoder.layer.{i}.attention.self.query.bias", "bq", False),
    ("encoder.layer.{i}.attention.self.key.weight", "wk", True),
    ("encoder.layer.{i}.attention.self.key.bias", "bk", False),
    ("encoder.layer.{i}.attention.self.value.weight", "wv", True),
    ("encoder.layer.{i}.attention.self.value.bias", "bv", False),
    ("encoder.layer.{i}.attention.output.dense.weight", "wo", True),
    ("encoder.layer.{i}.attention.output.dense.bias", "bo", False),
    ("encoder.layer.{i}.attention.output.LayerNorm.weight", "attn_norm_scale", False),
    ("encoder.layer.{i}.attention.output.LayerNorm.bias", "attn_norm_bias", False),
    ("encoder.layer.{i}.intermediate.dense.weight", "w_in", True),
    ("encoder.layer.{i}.intermediate.dense.bias", "b_in", False),
    ("encoder.layer.{i}.output.dense.weight", "w_out", True),
    ("encoder.layer.{i}.output.dense.bias", "b_out", False),
    ("encoder.layer.{i}.output.LayerNorm.weight", "mlp_norm_scale", False),
    ("encoder.layer.{i}.output.LayerNorm.bias", "mlp_norm_bias", False),
]
_BERT_TOP = [("embeddings.word_embeddings.weight", "tok_embed", False),
             ("embeddings.position_embeddings.weight", "pos_embed", False),
             ("embeddings.token_type_embeddings.weight", "type_embed", False),
             ("embeddings.LayerNorm.weight", "embed_norm_scale", False),
             ("embeddings.LayerNorm.bias", "embed_norm_bias", False)]
_BERT_POOLER = [("pooler.dense.weight", "pooler_w", True), ("pooler.dense.bias", "pooler_b", False)]
# Buffers HF writes that are not parameters.
_IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")


def _tables(cfg: Config):
    """(top-level entries, per-layer entries) for a config's model."""
    if isinstance(cfg, llama.LlamaConfig):
        top = list(_LLAMA_TOP) + ([] if cfg.tie_embeddings else [_LLAMA_HEAD])
        return top, _LLAMA_LAYER
    if isinstance(cfg, bert.BertConfig):
        return list(_BERT_TOP) + (list(_BERT_POOLER) if cfg.pooler else []), _BERT_LAYER
    raise TypeError(f"config must be a jaxeff.models.llama.LlamaConfig or "
                    f"jaxeff.models.bert.BertConfig; got {type(cfg).__name__}")


def _abstract(cfg: Config):
    init = llama.init_params if isinstance(cfg, llama.LlamaConfig) else bert.init_params
    return jax.eval_shape(lambda: init(jax.random.key(0), cfg))


def _check_shape(name, value, want):
    if tuple(value.shape) != tuple(want.shape):
        raise ValueError(f"tensor {name!r} has shape {tuple(value.shape)}; the config needs "
                         f"{tuple(want.shape)}")


# --------------------------------------------------------------------------------------------
# safetensors


def load_safetensors(path: str, config: Config) -> dict:
    """Parameters of ``config``'s model from an HF-named safetensors file, in jaxeff's layout.

    ``config`` is a ``LlamaConfig`` (HF ``LlamaForCausalLM`` names: ``model.layers.{i}.self_attn
    .q_proj.weight``, ...) or a ``BertConfig`` (HF ``BertModel`` names, with or without a
    ``bert.`` prefix); build it from the checkpoint's ``config.json`` with
    :func:`config_from_hf`. Matrices are transposed to ``[in, out]``, layers stacked, every leaf
    cast to ``config.dtype`` (bfloat16 files load exactly into float32). With tied embeddings a
    stored ``lm_head.weight`` must equal the embedding.

    Raises:
      ImportError: ``safetensors`` is not installed (the message gives the pip line).
      ValueError: a tensor the model needs is missing, has the wrong shape, or the file holds
        tensors the model has no place for (named in the message).
    """
    require("safetensors")
    from safetensors import safe_open

    top, per_layer = _tables(config)
    want = _abstract(config)
    with safe_open(os.fspath(path), framework="flax") as f:
        names = set(f.keys())
        prefix = "bert." if (isinstance(config, bert.BertConfig)
                             and not any(n.startswith("embeddings.") for n in names)
                             and any(n.startswith("bert.") for n in names)) else ""
        used = set()

        def get(name, transpose, shape_of):
            full = prefix + name
            if full not in names:
                raise ValueError(f"{os.fspath(path)} has no tensor {full!r} (needed by "
                                 f"{type(config).__name__}); it holds {len(names)} tensors")
            used.add(full)
            x = f.get_tensor(full)
            x = x.T if transpose else x
            _check_shape(full, x, shape_of)
            return x.astype(jnp.dtype(config.dtype))

        params = {key: get(name, tr, want[key]) for name, key, tr in top}
        layers = {}
        for tmpl, key, tr in per_layer:
            one = jax.ShapeDtypeStruct(want["layers"][key].shape[1:], want["layers"][key].dtype)
            layers[key] = jnp.stack([get(tmpl.format(i=i), tr, one)
                                     for i in range(config.n_layers)])
        params["layers"] = layers
        if isinstance(config, llama.LlamaConfig) and config.tie_embeddings \
                and _LLAMA_HEAD[0] in names:
            used.add(_LLAMA_HEAD[0])
            if not np.array_equal(np.asarray(f.get_tensor(_LLAMA_HEAD[0]), np.float32),
                                  np.asarray(params["embed"], np.float32)):
                raise ValueError(f"{os.fspath(path)} stores an lm_head.weight that differs from "
                                 "the embedding, but config.tie_embeddings=True; load it with "
                                 "tie_embeddings=False")
        if isinstance(config, bert.BertConfig) and not config.pooler:
            used |= {prefix + n for n, _, _ in _BERT_POOLER if prefix + n in names}
    extra = sorted(n for n in names - used if not n.endswith(_IGNORED_SUFFIXES))
    if extra:
        raise ValueError(f"{os.fspath(path)} holds tensors {type(config).__name__} has no place "
                         f"for: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    return params


def save_safetensors(path: str, params, config: Config) -> None:
    """Write ``params`` (``config``'s model, jaxeff layout) as an HF-named safetensors file.

    The inverse of :func:`load_safetensors`: matrices transposed back to ``[out, in]``, one tensor
    per layer, dtypes kept, metadata ``{"format": "pt"}`` (what HF transformers expects).
    Structured weights (quantized, LoRA, low rank, ...) are densified with
    ``jaxeff.params.materialize`` first, so a pruned, fine-tuned or quantized model exports as
    plain weights; pair the file with ``json.dump(hf_config(cfg), ...)`` as ``config.json``.

    Raises:
      ImportError: ``safetensors`` is not installed.
      ValueError: a leaf's shape does not match ``config``, or ``params`` lacks one.
    """
    require("safetensors")
    from safetensors.flax import save_file

    from jaxeff.params import materialize

    params = materialize(params)
    top, per_layer = _tables(config)
    want = _abstract(config)
    out = {}
    try:
        for name, key, tr in top:
            _check_shape(key, params[key], want[key])
            out[name] = params[key].T if tr else params[key]
        for tmpl, key, tr in per_layer:
            stacked = params["layers"][key]
            _check_shape(f"layers/{key}", stacked, want["layers"][key])
            for i in range(config.n_layers):
                out[tmpl.format(i=i)] = stacked[i].T if tr else stacked[i]
    except KeyError as e:
        raise ValueError(f"params lack the leaf {e} that {type(config).__name__} needs") from None
    save_file({k: jnp.asarray(v) for k, v in out.items()}, os.fspath(path),
              metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------
# config.json


def config_from_hf(config: Union[str, os.PathLike, dict], **overrides) -> Config:
    """A ``LlamaConfig`` / ``BertConfig`` from an HF ``config.json`` (a path or the parsed dict).

    ``model_type`` ``"llama"`` maps ``hidden_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, intermediate_size, max_position_embeddings, rope_theta, rms_norm_eps,
    tie_word_embeddings, head_dim``; ``"bert"`` maps ``hidden_size, num_hidden_layers,
    num_attention_heads, intermediate_size, max_position_embeddings, type_vocab_size,
    layer_norm_eps``. ``overrides`` replace fields (e.g. ``dtype="bfloat16"``).

    Raises ValueError for another model type or a feature these models do not implement
    (RoPE scaling, activations other than SiLU / GELU, relative positions, attention biases).
    """
    if not isinstance(config, dict):
        with open(config) as fh:
            config = json.load(fh)
    kind = config.get("model_type")
    if kind == "llama":
        act = config.get("hidden_act", "silu")
        if act != "silu" or config.get("rope_scaling") or config.get("attention_bias") \
                or config.get("mlp_bias"):
            raise ValueError(f"config.json: this llama has hidden_act={act!r}, rope_scaling="
                             f"{config.get('rope_scaling')!r}, attention_bias="
                             f"{config.get('attention_bias')!r}; jaxeff.models.llama implements "
                             "SiLU, plain RoPE and no biases")
        heads = config["num_attention_heads"]
        fields = dict(vocab_size=config["vocab_size"], d_model=config["hidden_size"],
                      n_layers=config["num_hidden_layers"], n_heads=heads,
                      n_kv_heads=config.get("num_key_value_heads") or heads,
                      d_ff=config["intermediate_size"],
                      max_seq_len=config.get("max_position_embeddings", 2048),
                      rope_base=float(config.get("rope_theta", 10_000.0)),
                      norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                      tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                      head_dim=config.get("head_dim"))
        fields.update(overrides)
        return llama.LlamaConfig(**fields)
    if kind == "bert":
        act = config.get("hidden_act", "gelu")
        pos = config.get("position_embedding_type", "absolute")
        if act != "gelu" or pos != "absolute":
            raise ValueError(f"config.json: this bert has hidden_act={act!r}, "
                             f"position_embedding_type={pos!r}; jaxeff.models.bert implements "
                             "exact GELU and absolute positions")
        fields = dict(vocab_size=config["vocab_size"], d_model=config["hidden_size"],
                      n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
                      d_ff=config["intermediate_size"],
                      max_positions=config.get("max_position_embeddings", 512),
                      type_vocab_size=config.get("type_vocab_size", 2),
                      norm_eps=float(config.get("layer_norm_eps", 1e-12)))
        fields.update(overrides)
        return bert.BertConfig(**fields)
    raise ValueError(f"config.json has model_type={kind!r}; supported: 'llama', 'bert'")


def hf_config(cfg: Config) -> dict:
    """The HF ``config.json`` dict for ``cfg`` (the inverse of :func:`config_from_hf`)."""
    if isinstance(cfg, llama.LlamaConfig):
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
                "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
                "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.d_ff,
                "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_base,
                "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
                "head_dim": cfg.head_dim, "hidden_act": "silu", "torch_dtype": cfg.dtype}
    if isinstance(cfg, bert.BertConfig):
        return {"architectures": ["BertModel"], "model_type": "bert",
                "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
                "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
                "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_positions,
                "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.norm_eps,
                "hidden_act": "gelu", "position_embedding_type": "absolute",
                "torch_dtype": cfg.dtype}
    _tables(cfg)   # raises the TypeError
