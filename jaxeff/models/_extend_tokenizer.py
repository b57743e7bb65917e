"""Vocabulary extension of a pretrained byte-level BPE: domain tokens appended as new merges.

The "amplified vocabulary" of "Pre-training technique to localize medical BERT and enhance
biomedical BERT" (Wada et al., 2024) and the new domain tokens of "BIOptimus: Pre-training an
Optimal Biomedical Language Model with Curriculum Learning for Named Entity Recognition" (Pavlova
& Makhlouf, 2023): add tokens learned on the domain corpus to a general tokenizer and keep every
old id. Their embeddings are initialised by ``jaxeff.params.random_rows`` / ``mean_rows`` or
distilled by :func:`jaxeff.models.distill_new_rows`.

How the tokens are chosen (BPE training *continued* from the old tokenizer, Sennrich et al.
2016's merge rule): the domain texts are pre-tokenized by the old pre-tokenizer, each word is
encoded by the old BPE model (its old tokenization), and then, N times, the most frequent
adjacent pair ``(a, b)`` (counted over the corpus, ties broken by the smaller ids) becomes the
new token ``a + b`` with the next free id, and every occurrence is merged left to right. Pairs
whose string is already a token are skipped (no second id for one string). Each merge saves one
token per occurrence, so the ranking is exactly "tokens saved on the domain corpus".

Why merges and not HF added tokens: added tokens are matched on the raw text before
pre-tokenization (``"self"`` would also split ``"myself"``) and pass through the ByteLevel
decoder in ways that need care; new merges appended *after* the old ones (ranks M..M+N-1) act
only once no old merge applies, i.e. on the old tokenization, so

* an old id keeps its string, and a text that contains no new pair encodes exactly as before;
* the extended encoding, with each new token replaced by its old pieces
  (:meth:`VocabExtension.expand`), is exactly the old encoding (a new merge can never enable an
  old one: old merges only join old tokens);
* decoding is exact (a new token is a byte-level string like any other).

The incremental pair counts are written here because HF ``tokenizers``' ``BpeTrainer`` cannot
start from an existing merge list (it always starts from bytes).
"""
from __future__ import annotations

import collections
import heapq
import json
from typing import Iterable, NamedTuple

import numpy as np

from jaxeff._checks import check_int
from jaxeff.data._tokenizer import check_ids
from jaxeff.models._checkpoints import require
from jaxeff.models._tokenizers import HFTokenizer

__all__ = ["VocabExtension", "extend_bpe"]


class VocabExtension(NamedTuple):
    """What :func:`extend_bpe` returns.

    Attributes:
      tokenizer: the extended :class:`HFTokenizer` (old ids unchanged, new ids
        ``old_vocab_size .. old_vocab_size + N - 1``).
      old_vocab_size: the old tokenizer's ``vocab_size`` (= the first new id).
      tokens: the N new tokens' text, in id order.
      pieces: for each new token, the old ids it replaces (its old tokenization), a tuple of
        tuples; ``pieces[i][0]`` is its first old piece.
      saved: for each new token, how many tokens its merge saved on the training texts.
    """

    tokenizer: HFTokenizer
    old_vocab_size: int
    tokens: tuple
    pieces: tuple
    saved: tuple

    @property
    def n_new(self) -> int:
        return len(self.tokens)

    def expand(self, ids) -> np.ndarray:
        """Extended ids -> the old tokenizer's ids (each new token replaced by its pieces);
        int32. Raises ValueError for an id outside the extended vocabulary."""
        arr = check_ids(ids, self.tokenizer.vocab_size)
        out = []
        for i in arr.tolist():
            out.extend(self.pieces[i - self.old_vocab_size] if i >= self.old_vocab_size else (i,))
        return np.asarray(out, np.int32)

    def truncate(self, n: int) -> "VocabExtension":
        """The extension by the first ``n`` new tokens only: exactly what ``extend_bpe(...,
        n)`` returns on the same texts (merges are chosen one after another), without
        re-counting. Raises ValueError unless ``1 <= n <= n_new``."""
        n = check_int("n", n, 1, self.n_new)
        spec = json.loads(self.tokenizer.backend.to_str())
        model = spec["model"]
        model["vocab"] = {t: i for t, i in model["vocab"].items()
                          if i < self.old_vocab_size + n}
        model["merges"] = model["merges"][:len(model["merges"]) - (self.n_new - n)]
        tok = _wrap(spec, self.tokenizer)
        return VocabExtension(tok, self.old_vocab_size, self.tokens[:n], self.pieces[:n],
                              self.saved[:n])

    def first_pieces(self) -> np.ndarray:
        """``[N]`` int32: the first old piece of each new token."""
        return np.asarray([p[0] for p in self.pieces], np.int32)


def _wrap(spec, like: HFTokenizer) -> HFTokenizer:
    """An HFTokenizer of the tokenizer JSON ``spec`` with ``like``'s special ids and template."""
    backend = require("tokenizers").Tokenizer.from_str(json.dumps(spec))
    return HFTokenizer(backend, bos_id=like.bos_id, eos_id=like.eos_id, pad_id=like.pad_id,
                       chat_template=like.chat_template)


def _pieces(pieces, old_size, i):
    return pieces[i - old_size] if i >= old_size else (i,)


def _merge_word(ids, a, b, new):
    """Left-to-right, non-overlapping merge of the pair (a, b) (as HF BPE applies one rank)."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def extend_bpe(tokenizer: HFTokenizer, texts: Iterable[str], n_new: int, *,
               min_frequency: int = 2) -> VocabExtension:
    """Add ``n_new`` domain tokens to a byte-level BPE tokenizer by continuing its BPE training
    on ``texts`` (the module docstring gives the rule); old ids and their strings are unchanged.

    Merge ``k`` (k = 0..N-1) joins ``argmax_{(a,b)} count_k(a, b)`` over adjacent pairs of the
    corpus's current tokenization (old tokenization for k = 0), skipping pairs whose string is
    already a token; the new token gets id ``V + k`` (``V = tokenizer.vocab_size``) and the merge
    rank ``M + k`` after the ``M`` old merges.

    Papers: "Neural Machine Translation of Rare Words with Subword Units" (Sennrich et al., 2016);
    the amplified vocabulary of Wada et al. (2024); BIOptimus (Pavlova & Makhlouf, 2023).

    Args:
      tokenizer: an :class:`HFTokenizer` whose backend model is a BPE without a continuing-subword
        prefix or end-of-word suffix (GPT-2-style byte level, as SmolLM2's or
        ``jaxeff.data.BPETokenizer``'s).
      texts: an iterable of domain strings (e.g. ``(d.text for d in corpus)``).
      n_new: how many tokens to add, >= 1.
      min_frequency: a pair must occur at least this often to be merged (default 2).

    Raises:
      TypeError: ``tokenizer`` is not an :class:`HFTokenizer`, ``texts`` is a str or holds a
        non-str, a bad ``n_new`` / ``min_frequency`` type.
      ValueError: the backend is not a supported BPE; ``n_new`` / ``min_frequency`` < 1; fewer
        than ``n_new`` pairs reach ``min_frequency`` (the message gives how many did).
    """
    if not isinstance(tokenizer, HFTokenizer):
        raise TypeError(f"tokenizer must be a jaxeff.models.HFTokenizer; got "
                        f"{type(tokenizer).__name__}")
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be an iterable of str (documents), not one str")
    n_new = check_int("n_new", n_new, 1)
    min_frequency = check_int("min_frequency", min_frequency, 1)
    backend = tokenizer.backend
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer's model is {model.get('type')!r}; extend_bpe extends BPE")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError("extend_bpe supports BPE without continuing_subword_prefix / "
                         f"end_of_word_suffix; got {model.get('continuing_subword_prefix')!r} / "
                         f"{model.get('end_of_word_suffix')!r}")
    vocab = dict(model["vocab"])
    old_size = tokenizer.vocab_size
    id2tok = {i: t for t, i in vocab.items()}

    # The corpus as unique words (old pre-tokenization) with counts, in their old tokenization.
    counts = collections.Counter()
    pre = backend.pre_tokenizer
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a str; got {type(text).__name__}")
        counts.update(w for w, _ in (pre.pre_tokenize_str(text) if pre else [(text, None)]))
    bpe = backend.model
    words = [[t.id for t in bpe.tokenize(w)] for w in counts]
    freq = list(counts.values())

    pair_count = collections.defaultdict(int)
    where = collections.defaultdict(set)
    for wi, ids in enumerate(words):
        for p in zip(ids, ids[1:]):
            pair_count[p] += freq[wi]
            where[p].add(wi)
    heap = [(-c, a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)
    new_tokens, pieces, saved, merges = [], [], [], []
    while len(new_tokens) < n_new and heap:
        c, a, b = heapq.heappop(heap)
        c = -c
        if pair_count.get((a, b), 0) != c:       # stale entry: the count changed since
            continue
        if c < min_frequency:
            break
        text = id2tok[a] + id2tok[b]
        if text in vocab:                        # already a token: never a second id
            continue
        new = old_size + len(new_tokens)
        vocab[text], id2tok[new] = new, text
        merges.append([id2tok[a], id2tok[b]])
        pieces.append(_pieces(pieces, old_size, a) + _pieces(pieces, old_size, b))
        new_tokens.append(text)
        saved.append(c)
        changed = set()
        for wi in where.pop((a, b)):
            ids, f = words[wi], freq[wi]
            for p in zip(ids, ids[1:]):
                pair_count[p] -= f
                changed.add(p)
            ids = words[wi] = _merge_word(ids, a, b, new)
            for p in zip(ids, ids[1:]):
                pair_count[p] += f
                where[p].add(wi)
                changed.add(p)
        for p in changed:
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], *p))
            else:
                pair_count.pop(p, None)
    if len(new_tokens) < n_new:
        raise ValueError(f"n_new={n_new} but only {len(new_tokens)} new pairs occur at least "
                         f"min_frequency={min_frequency} times in texts; give more text or lower "
                         "min_frequency / n_new")
    model["vocab"] = vocab
    as_str = bool(model["merges"]) and isinstance(model["merges"][0], str)   # "a b" format
    model["merges"] = list(model["merges"]) + [" ".join(m) if as_str else m for m in merges]
    tok = _wrap(spec, tokenizer)
    decoded = tuple(tok.decode([old_size + k], skip_special_tokens=False)
                    for k in range(len(new_tokens)))
    return VocabExtension(tok, old_size, decoded, tuple(pieces), tuple(saved))
