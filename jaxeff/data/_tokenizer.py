"""Tokenizers: a zero-dependency byte-level default and an optional local BPE.

Every tokenizer in jaxeff follows the small :class:`Tokenizer` protocol::

    encode(text: str) -> np.ndarray[int32]     # no BOS/EOS added
    decode(ids) -> str                         # special ids are dropped; ids outside
                                               # [0, vocab_size) or non-integers raise
    vocab_size: int; bos_id: int; eos_id: int; pad_id: int

so a user's own tokenizer (e.g. a thin wrapper around a SentencePiece or HF model) plugs into
:func:`jaxeff.data.make_lm_dataset` unchanged.

The model's embedding table must have at least ``tokenizer.vocab_size`` rows: the model config's
``vocab_size`` (``jaxeff.models.llama.LlamaConfig.vocab_size``) is the number of rows, the
tokenizer's is one more than its largest id. ``ByteTokenizer.vocab_size`` is **264**, not 256: a
256-row model would index its embedding out of range with PAD/BOS/EOS (ids 256-258), which JAX
clamps silently. :func:`validate_tokenizer` ``(tokenizer, vocab_size=model_vocab)`` raises for
that, and :func:`jaxeff.data.make_lm_dataset` calls it when given ``vocab_size=``.

Byte-level id layout (:class:`ByteTokenizer`, vocab 264; the 'tiny' model preset uses it)::

    0..255   the UTF-8 bytes of the text
    256      PAD   (padding in packed batches; never a target)
    257      BOS   (prepended to every document)
    258      EOS   (appended to every document)
    259..263 reserved special ids (``ByteTokenizer.reserved_ids``) for later techniques,
             e.g. UL2 mode tokens or sentinels; never produced by ``encode``.

Byte-level modelling as in "ByT5: Towards a Token-Free Future with Pre-trained Byte-to-Byte
Models" (Xue et al., 2022); BPE from "Neural Machine Translation of Rare Words with Subword
Units" (Sennrich et al., 2016).
"""
from __future__ import annotations

from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["Tokenizer", "ByteTokenizer", "BPETokenizer", "BYTE_PAD_ID", "BYTE_BOS_ID",
           "BYTE_EOS_ID", "BYTE_VOCAB_SIZE", "validate_tokenizer", "with_specials",
           "check_ids"]

BYTE_PAD_ID = 256
BYTE_BOS_ID = 257
BYTE_EOS_ID = 258
BYTE_VOCAB_SIZE = 264


@runtime_checkable
class Tokenizer(Protocol):
    """What jaxeff's data pipeline needs from a tokenizer.

    ``encode(text)`` returns the ids of ``text`` without BOS/EOS (an int array or list);
    ``decode(ids)`` inverts it (special ids dropped); ``vocab_size``, ``bos_id``, ``eos_id``
    and ``pad_id`` are ints with all ids in ``[0, vocab_size)``.
    """

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> np.ndarray | list[int]: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


def validate_tokenizer(tokenizer, vocab_size: int | None = None) -> None:
    """Check that ``tokenizer`` satisfies :class:`Tokenizer` (attributes, id ranges), and, with
    ``vocab_size`` (the model's embedding rows), that the model can embed every id.

    Raises:
      TypeError: if an attribute or method is missing or not an int / callable.
      ValueError: if a special id is outside ``[0, vocab_size)``, or the model's
        ``vocab_size`` is smaller than ``tokenizer.vocab_size``.
    """
    for name in ("encode", "decode"):
        if not callable(getattr(tokenizer, name, None)):
            raise TypeError(f"tokenizer must have a callable `{name}` (Tokenizer protocol); "
                            f"got {type(tokenizer).__name__}")
    for name in ("vocab_size", "bos_id", "eos_id", "pad_id"):
        value = getattr(tokenizer, name, None)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"tokenizer.{name} must be an int (Tokenizer protocol); got {value!r}")
    for name in ("bos_id", "eos_id", "pad_id"):
        value = getattr(tokenizer, name)
        if not 0 <= value < tokenizer.vocab_size:
            raise ValueError(f"tokenizer.{name}={value} must be in [0, vocab_size="
                             f"{tokenizer.vocab_size})")
    if vocab_size is not None:
        from jaxeff._checks import check_int  # pylint: disable=import-outside-toplevel
        vocab_size = check_int("vocab_size", vocab_size, 1)
        if vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"vocab_size={vocab_size} (the model's embedding rows) is smaller than "
                f"tokenizer.vocab_size={tokenizer.vocab_size} ({type(tokenizer).__name__}: ids "
                f"up to {tokenizer.vocab_size - 1}, e.g. bos_id={tokenizer.bos_id}); the model "
                f"would index its embedding out of range. Use vocab_size >= "
                f"{tokenizer.vocab_size}")


def with_specials(tokenizer, *parts, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
    """``[bos] + parts... + [eos]`` as one int32 array: the one place that assembles a
    document's token ids (each part an int sequence, e.g. ``tokenizer.encode(text)``)."""
    seq = ([np.array([tokenizer.bos_id], np.int32)] if add_bos else []) + \
        [np.asarray(p, np.int32).reshape(-1) for p in parts]
    if add_eos:
        seq.append(np.array([tokenizer.eos_id], np.int32))
    return np.concatenate(seq) if seq else np.zeros((0,), np.int32)


def check_ids(ids, vocab_size: int, argname: str = "ids") -> np.ndarray:
    """``ids`` as a flat int64 array, or a clear error (non-integers, ids out of range)."""
    arr = np.asarray(ids)
    if arr.size and not (np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{argname} must be integer token ids; got dtype {arr.dtype} (e.g. "
                        f"{arr.reshape(-1)[0]!r}); a float id would be truncated")
    arr = arr.reshape(-1).astype(np.int64)
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        raise ValueError(f"{argname} must be in [0, vocab_size={vocab_size}); got "
                         f"{arr[bad][:8].tolist()} at positions "
                         f"{np.flatnonzero(bad)[:8].tolist()}")
    return arr


class ByteTokenizer:
    """UTF-8 byte-level tokenizer: id = byte value, plus PAD/BOS/EOS and 5 reserved ids.

    ``encode(text) = list(text.encode('utf-8'))`` as int32; ``decode`` drops the special ids
    256..263 and decodes the bytes as UTF-8 (``errors='replace'`` so a truncated multi-byte
    character does not raise). Round trip ``decode(encode(s)) == s`` holds for every ``str`` without lone
    surrogates. See the module docstring for the id layout (vocab 264).

    Raises:
      ValueError: from ``encode`` if ``text`` contains lone surrogates (not valid UTF-8); from
        ``decode`` for an id outside ``[0, 264)`` (e.g. -1).
      TypeError: from ``encode`` if ``text`` is not a ``str``; from ``decode`` for non-integer
        ids (65.7 is not truncated to 65).
    """

    vocab_size = BYTE_VOCAB_SIZE
    pad_id = BYTE_PAD_ID
    bos_id = BYTE_BOS_ID
    eos_id = BYTE_EOS_ID
    reserved_ids = tuple(range(259, BYTE_VOCAB_SIZE))

    def encode(self, text: str) -> np.ndarray:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str; got {type(text).__name__}")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text is not encodable as UTF-8 ({e}); lone surrogates are not "
                             "supported by ByteTokenizer") from e
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = check_ids(ids, self.vocab_size)
        arr = arr[arr < 256].astype(np.uint8)
        return arr.tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=264, pad=256, bos=257, eos=258)"


class BPETokenizer:
    """Byte-level BPE trained locally with HF ``tokenizers`` (optional dependency).

    Special ids come first: ``pad=0, bos=1, eos=2``; merges and the 256 byte symbols follow,
    so ``vocab_size`` counts everything. ``encode`` adds no BOS/EOS. Byte-level pre-tokenization
    makes the round trip ``decode(encode(s)) == s`` exact.

    Use :meth:`train` (about 1 s for a 4096 vocab on the stdlib corpus), :meth:`from_file`,
    or wrap an existing ``tokenizers.Tokenizer`` with ``BPETokenizer(tok)``.

    Raises:
      ImportError: if the ``tokenizers`` package is not installed (``pip install tokenizers``).
      ValueError: if the wrapped tokenizer lacks the ``<pad>``, ``<bos>``, ``<eos>`` tokens.
    """

    SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")

    def __init__(self, tokenizer):
        self._tok = tokenizer
        ids = [tokenizer.token_to_id(t) for t in self.SPECIAL_TOKENS]
        if any(i is None for i in ids):
            raise ValueError(f"tokenizer must define the special tokens {self.SPECIAL_TOKENS}; "
                             f"got ids {ids}")
        self.pad_id, self.bos_id, self.eos_id = (int(i) for i in ids)
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))

    @staticmethod
    def _require():
        try:
            import tokenizers  # noqa: F401 pylint: disable=import-outside-toplevel
        except ImportError as e:
            raise ImportError("BPETokenizer needs the optional package `tokenizers` "
                              "(pip install tokenizers); ByteTokenizer needs nothing") from e
        return tokenizers

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, *,
              min_frequency: int = 2) -> "BPETokenizer":
        """Train a byte-level BPE on ``texts``.

        Args:
          texts: iterable of strings (e.g. ``(d.text for d in corpus)``).
          vocab_size: total vocabulary incl. 256 bytes and 3 specials; must be >= 260.
          min_frequency: minimum pair count for a merge (default 2).

        Raises:
          ImportError: ``tokenizers`` missing. ValueError: ``vocab_size`` < 260.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 260:
            raise ValueError(f"vocab_size must be an int >= 260 (256 bytes + 3 specials + 1); "
                             f"got {vocab_size!r}")
        tk = cls._require()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency,
            special_tokens=list(cls.SPECIAL_TOKENS),
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str) -> "BPETokenizer":
        """Load a ``tokenizer.json`` from :meth:`save` (or any HF tokenizer with the specials)."""
        tk = cls._require()
        return cls(tk.Tokenizer.from_file(str(path)))

    def save(self, path: str) -> None:
        """Write the tokenizer as HF ``tokenizer.json``."""
        self._tok.save(str(path))

    def encode(self, text: str) -> np.ndarray:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str; got {type(text).__name__}")
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        specials = {self.pad_id, self.bos_id, self.eos_id}
        return self._tok.decode([int(i) for i in check_ids(ids, self.vocab_size)
                                 if int(i) not in specials], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"
