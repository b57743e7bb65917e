"""Tokenizers of real checkpoints on HF ``tokenizers``: GGUF-embedded BPE, tokenizer.json, ChatML.

:class:`HFTokenizer` wraps a ``tokenizers.Tokenizer`` in jaxeff's tokenizer protocol
(``jaxeff.data.Tokenizer``: ``encode`` without special tokens, ``decode`` dropping them,
``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id``), plus ``encode_batch`` (padded ids and mask,
with the model's special tokens, for encoders) and ``apply_chat_template`` for chat models.

:func:`gguf_tokenizer` rebuilds a GPT-2-style byte-level BPE from a GGUF file's metadata
(``tokenizer.ggml.tokens`` / ``merges`` / ``token_type``), as llama.cpp's ``gpt2`` tokenizer
model with the ``smollm`` pre-tokenizer does: ``BPE(vocab, merges)``, pre-tokenizers
``Digits(individual_digits=True)`` then ``ByteLevel(add_prefix_space=False)``, a ByteLevel
decoder; control tokens (type 3) become special added tokens, so ``<|im_start|>`` in a chat
string encodes to its one id. :func:`json_tokenizer` loads a ``tokenizer.json``.

Chat template: :class:`ChatML` renders ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message,
a default system message first when the conversation has none, and ``<|im_start|>assistant\\n``
with ``add_generation_prompt`` -- the template SmolLM2-Instruct's GGUF stores (a Jinja string;
rendered here in Python so no Jinja dependency is needed; the default system text is read from it).
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np

from jaxeff.models._checkpoints import require

__all__ = ["HFTokenizer", "ChatML", "gguf_tokenizer", "json_tokenizer"]


class ChatML:
    """The ChatML chat format: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message.

    Args:
      default_system: the system message inserted when the first message is not a system one
        (None: insert nothing).
    """

    def __init__(self, default_system: Optional[str] = None):
        self.default_system = default_system

    @classmethod
    def from_template(cls, template: str) -> Optional["ChatML"]:
        """The ChatML format a Jinja chat template describes, or None if it is not ChatML."""
        if "<|im_start|>" not in template or "<|im_end|>" not in template:
            return None
        m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, re.S)
        return cls(m.group(1) if m else None)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts; got "
                            f"{type(messages).__name__}")
        parts = []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) \
                    or not isinstance(msg.get("content"), str):
                raise TypeError(f"messages[{i}] must be a dict with str 'role' and 'content'; "
                                f"got {msg!r}")
            if i == 0 and msg["role"] != "system" and self.default_system is not None:
                parts.append(f"<|im_start|>system\n{self.default_system}<|im_end|>\n")
            parts.append(f"<|im_start|>{msg['role']}\n{msg['content']}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)

    def __repr__(self):
        return f"ChatML(default_system={self.default_system!r})"


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` behind jaxeff's tokenizer protocol.

    Args:
      tokenizer: a ``tokenizers.Tokenizer`` (its own padding / truncation settings are turned off
        on a copy: ``encode`` never pads, ``encode_batch`` pads explicitly).
      bos_id, eos_id, pad_id: the special ids (for BERT-style models, ``bos_id`` = ``[CLS]`` and
        ``eos_id`` = ``[SEP]``).
      chat_template: a :class:`ChatML` (or anything with ``render(messages,
        add_generation_prompt)``), or None for models without one.

    Raises ValueError for a special id outside the vocabulary.
    """

    def __init__(self, tokenizer, *, bos_id: int, eos_id: int, pad_id: int,
                 chat_template: Optional[ChatML] = None):
        tokenizers = require("tokenizers")
        self._tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._tok.no_padding()
        self._tok.no_truncation()
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        for name, v in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) \
                    or not 0 <= v < self.vocab_size:
                raise ValueError(f"{name} must be an id in [0, {self.vocab_size}); got {v!r}")
        self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)
        self.chat_template = chat_template

    @property
    def backend(self):
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = False) -> np.ndarray:
        """Ids of ``text`` (int32); special tokens written in the text are matched, none added
        unless ``add_special_tokens`` (the post-processor's, e.g. BERT's ``[CLS] ... [SEP]``)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str; got {type(text).__name__}")
        return np.asarray(self._tok.encode(text, add_special_tokens=add_special_tokens).ids,
                          np.int32)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (special tokens dropped unless ``skip_special_tokens=False``)."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True,
                     max_length: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """``(ids_BxL, mask_BxL)`` int32: each text encoded (with the model's special tokens),
        cut to ``max_length`` (None: no cut) and right-padded with ``pad_id`` to the longest."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or not texts:
            raise TypeError("texts must be a non-empty list of str")
        if max_length is not None:
            self._tok.enable_truncation(int(max_length))
        try:
            enc = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        finally:
            self._tok.no_truncation()
        L = max(len(e.ids) for e in enc)
        ids = np.full((len(enc), L), self.pad_id, np.int32)
        mask = np.zeros((len(enc), L), np.int32)
        for b, e in enumerate(enc):
            ids[b, :len(e.ids)], mask[b, :len(e.ids)] = e.ids, 1
        return ids, mask

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tokenize: bool = True):
        """The chat prompt for ``messages`` (``[{'role': ..., 'content': ...}, ...]``): its ids
        (int32), or the string when ``tokenize=False``. Raises ValueError if the model has no
        chat template."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        text = self.chat_template.render(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text

    def __repr__(self):
        return (f"HFTokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id}, chat={self.chat_template!r})")


def _gguf_value(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_tokenizer(path_or_reader) -> HFTokenizer:
    """The byte-level BPE tokenizer stored in a GGUF file's metadata (``tokenizer.ggml.model``
    ``gpt2``), with its bos / eos / pad ids and its chat template when it is ChatML.

    Raises:
      ImportError: ``gguf`` or ``tokenizers`` is not installed.
      ValueError: the file has no tokenizer, or another tokenizer model (e.g. ``llama``
        SentencePiece), or a pre-tokenizer other than the ones rebuilt here.
    """
    gguf = require("gguf")
    tk = require("tokenizers")
    reader = (path_or_reader if isinstance(path_or_reader, gguf.GGUFReader)
              else gguf.GGUFReader(str(path_or_reader)))
    model = _gguf_value(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model={model!r}; gguf_tokenizer rebuilds 'gpt2' "
                         "(byte-level BPE) tokenizers")
    pre = _gguf_value(reader, "tokenizer.ggml.pre", "default")
    if pre not in ("smollm", "default", "gpt2"):
        raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r}; rebuilt here: 'smollm' (digits split "
                         "one by one, then GPT-2 byte level), 'gpt2' / 'default'")
    tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
    merges = _gguf_value(reader, "tokenizer.ggml.merges")
    types = _gguf_value(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep or not a or not b:
            raise ValueError(f"GGUF merge {m!r} is not two space-separated tokens")
        pairs.append((a, b))
    bpe = tk.Tokenizer(tk.models.BPE({t: i for i, t in enumerate(tokens)}, pairs))
    steps = [tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if pre == "smollm":
        steps.insert(0, tk.pre_tokenizers.Digits(individual_digits=True))
    bpe.pre_tokenizer = tk.pre_tokenizers.Sequence(steps)
    bpe.decoder = tk.decoders.ByteLevel()
    specials = [tokens[i] for i, t in enumerate(types) if int(t) == 3]   # CONTROL
    bpe.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t in specials])
    bos = _gguf_value(reader, "tokenizer.ggml.bos_token_id")
    eos = _gguf_value(reader, "tokenizer.ggml.eos_token_id")
    pad = _gguf_value(reader, "tokenizer.ggml.padding_token_id", eos)
    template = _gguf_value(reader, "tokenizer.chat_template")
    chat = ChatML.from_template(template) if template else None
    return HFTokenizer(bpe, bos_id=int(bos), eos_id=int(eos), pad_id=int(pad), chat_template=chat)


def json_tokenizer(path: str, *, bos_token: str, eos_token: str, pad_token: str,
                   chat_template: Optional[ChatML] = None) -> HFTokenizer:
    """An :class:`HFTokenizer` from a ``tokenizer.json``; the special ids are looked up by their
    token strings (for BERT: ``[CLS]``, ``[SEP]``, ``[PAD]``). Raises ValueError for a token the
    vocabulary lacks."""
    tk = require("tokenizers")
    tok = tk.Tokenizer.from_file(str(path))
    ids = {}
    for name, t in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
        i = tok.token_to_id(t)
        if i is None:
            raise ValueError(f"{name}={t!r} is not in the vocabulary of {path}")
        ids[name] = i
    return HFTokenizer(tok, bos_id=ids["bos_token"], eos_id=ids["eos_token"],
                       pad_id=ids["pad_token"], chat_template=chat_template)
