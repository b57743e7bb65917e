"""Grain pipeline from documents to packed language-model training batches.

Stages (each a Grain operator, so the iterator state is checkpointable end to end)::

    MapDataset.source(docs)[p::P]            # shard documents by JAX process p of P
      .shuffle(seed).repeat()                # new order every epoch (optional)
      .map(encode)                           # {'tokens': BOS + tok(text) + EOS, 'loss_mask': 1s}
      .to_iter_dataset()
      -> split / truncate pieces to L + 1    # FirstFit/BestFit raise on longer inputs
      -> WindowShuffleIterDataset            # decorrelate pieces of one long document
      -> FirstFit | BestFit | ConcatThenSplit packing to L + 1
      .map(shift)  .batch(B)

Packing uses Grain's packers ("Efficient Sequence Packing without Cross-contamination",
Krell et al., 2021, for the segment-masking scheme). A packed row ``t`` of length ``L+1`` with
segment ids ``s`` (1-based, 0 = padding), positions ``q`` and per-token target mask ``m`` gives::

    inputs      = t[:-1]              (pad_id where s[:-1] == 0)
    targets     = t[1:]               (pad_id where s[1:] == 0)
    segment_ids = s[:-1]   positions = q[:-1]
    loss_mask   = float32((s[:-1] == s[1:]) & (s[:-1] != 0)) * m[1:]

so a document of n tokens (BOS and EOS included) contributes exactly n - 1 targets and no target
crosses a document boundary. ``m`` ("is this token a target") is carried through packing; it is
all ones unless the encode function supplies a per-document ``'loss_mask'`` (MeCo masks the
metadata prefix that way).

Long documents (``long_docs``): ``'split'`` cuts a document of n > L+1 tokens into pieces
``t[kL : kL + L + 1]`` (stride L, one token overlap) so every transition is still trained
exactly once, but each piece restarts at position 0 without earlier context; ``'truncate'``
keeps ``t[:L+1]``. ConcatThenSplit packing additionally splits at row boundaries (losing the
one transition across each boundary; a continued document restarts at position 0).

Batch format: dict of numpy arrays ``inputs``/``targets``/``segment_ids``/``positions`` int32
[B, L] and ``loss_mask`` float32 [B, L].
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import grain
import numpy as np

from jaxeff._checks import check_int
from jaxeff.data._corpus import as_document
from jaxeff.data._tokenizer import validate_tokenizer, with_specials

__all__ = ["EncodeDocument", "make_lm_dataset", "make_eval_batches", "pack_lm",
           "fill_rate", "PACKINGS", "LONG_DOCS", "BATCH_KEYS"]

PACKINGS = ("first_fit", "best_fit", "concat")
LONG_DOCS = ("split", "truncate")
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


class EncodeDocument:
    """Document -> ``{'tokens': int32[n], 'loss_mask': float32[n]}`` with BOS/EOS.

    ``tokens = [bos] + tokenizer.encode(doc.text) + [eos]``, ``loss_mask = ones(n)``.
    Accepts a :class:`Document`, a ``str``, a plain dict with a ``'text'`` field (e.g.
    ``{"text": ..., "url": ...}``), or a dict that already has ``'tokens'`` (passed through; an
    optional ``'loss_mask'`` of the same length is kept, else ones). A picklable callable, so
    Grain worker processes can run it.

    Raises:
      TypeError: an element of another type.  ValueError: ``loss_mask`` length mismatch, a
      dict with neither ``'tokens'`` nor ``'text'``.
    """

    def __init__(self, tokenizer, *, add_bos: bool = True, add_eos: bool = True):
        validate_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.add_bos = add_bos
        self.add_eos = add_eos

    def __call__(self, doc) -> dict[str, np.ndarray]:
        if isinstance(doc, Mapping) and "tokens" in doc:
            tokens = np.asarray(doc["tokens"], dtype=np.int32).reshape(-1)
            mask = doc.get("loss_mask")
            mask = (np.ones(tokens.shape, np.float32) if mask is None
                    else np.asarray(mask, dtype=np.float32).reshape(-1))
            if mask.shape != tokens.shape:
                raise ValueError(f"element loss_mask has length {mask.shape[0]} but tokens has "
                                 f"{tokens.shape[0]}; they must match")
            return {"tokens": tokens, "loss_mask": mask}
        if not isinstance(doc, (str, Mapping)) and not hasattr(doc, "text"):
            raise TypeError(f"pipeline element must be a Document, str, dict with 'text' or "
                            f"dict with 'tokens'; got {type(doc).__name__}")
        text = as_document(doc, "pipeline element").text
        tokens = with_specials(self.tokenizer, self.tokenizer.encode(text),
                               add_bos=self.add_bos, add_eos=self.add_eos)
        return {"tokens": tokens, "loss_mask": np.ones(tokens.shape, np.float32)}


class _SplitLong(grain.experimental.FlatMapTransform):
    """Cut ``tokens``/``loss_mask`` into pieces of ``max_len`` with stride ``max_len - 1``."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.max_fan_out = 1 << 30  # only used by MapDataset flat maps; IterDataset ignores it

    def flat_map(self, element):
        tokens, mask = element["tokens"], element["loss_mask"]
        n, size, stride = tokens.shape[0], self.max_len, self.max_len - 1
        if n <= size:
            return [element]
        starts = range(0, n - 1, stride)
        # A piece's first token is never a target (the shift masks it), so the overlap token
        # is trained once, as the last target of the previous piece.
        return [{"tokens": tokens[s:s + size], "loss_mask": mask[s:s + size]} for s in starts]


class _Truncate:
    def __init__(self, max_len: int):
        self.max_len = max_len

    def __call__(self, element):
        return {k: v[:self.max_len] for k, v in element.items()}


class _Shift:
    """Packed row of length L+1 -> the LM batch row of length L (see module docstring)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, row):
        t, s, q = row["tokens"], row["tokens_segment_ids"], row["tokens_positions"]
        valid = (s[:-1] == s[1:]) & (s[:-1] != 0)
        return {
            "inputs": np.where(s[:-1] == 0, self.pad_id, t[:-1]).astype(np.int32),
            "targets": np.where(s[1:] == 0, self.pad_id, t[1:]).astype(np.int32),
            "segment_ids": s[:-1].astype(np.int32),
            "positions": q[:-1].astype(np.int32),
            "loss_mask": (valid * row["loss_mask"][1:]).astype(np.float32),
        }




def pack_lm(pieces: grain.IterDataset, seq_len: int, *, pad_id: int,
            packing: str = "first_fit", num_packing_bins: int = 64, seed: int = 0,
            shuffle_bins: bool = True, long_docs: str = "split",
            shuffle_window: int = 0) -> grain.IterDataset:
    """Pack ``{'tokens', 'loss_mask'}`` elements into unbatched LM rows of length ``seq_len``.

    The lower-level half of :func:`make_lm_dataset`, for pipelines that build their own
    token elements (e.g. MeCo's metadata prefix): handles long inputs (``long_docs``),
    optional window shuffle of the pieces, Grain packing to ``seq_len + 1`` and the shift
    (formulas in the module docstring). Rows are dicts of ``BATCH_KEYS`` arrays of shape [L].

    Args:
      pieces: IterDataset of dicts with ``'tokens'`` int[n] and ``'loss_mask'`` float[n].
      seq_len: L, the model context length (>= 1).
      pad_id: id written to ``inputs``/``targets`` at padding positions.
      packing: ``'first_fit'`` (default), ``'best_fit'`` or ``'concat'`` (see module docstring).
      num_packing_bins: bins for first/best fit (default 64; more bins: less padding, more
        cross-epoch mixing).
      seed: seed for bin and window shuffling (default 0).
      shuffle_bins: shuffle the emitted bins (default True).
      long_docs: ``'split'`` (default) or ``'truncate'``.
      shuffle_window: window (in pieces) of a ``WindowShuffleIterDataset`` after splitting;
        0 disables it (default 0).

    Raises:
      ValueError: on an invalid argument (named with the value received).
    """
    check_int("seq_len", seq_len, 1)
    check_int("pad_id", pad_id, 0)
    check_int("num_packing_bins", num_packing_bins, 1)
    check_int("shuffle_window", shuffle_window, 0)
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}; got {packing!r}")
    if long_docs not in LONG_DOCS:
        raise ValueError(f"long_docs must be one of {LONG_DOCS}; got {long_docs!r}")
    row = seq_len + 1
    if long_docs == "split":
        pieces = grain.experimental.FlatMapIterDataset(pieces, _SplitLong(row))
    else:
        pieces = pieces.map(_Truncate(row))
    if shuffle_window > 1:
        pieces = grain.experimental.WindowShuffleIterDataset(
            pieces, window_size=shuffle_window, seed=seed)
    lengths = {"tokens": row, "loss_mask": row}
    if packing == "concat":
        # ConcatThenSplit's meta_features are never split, so the per-token mask must be an
        # ordinary feature here (it is split at the same points as the tokens).
        packed = grain.experimental.ConcatThenSplitIterDataset(pieces, length_struct=lengths)
    else:
        cls = (grain.experimental.FirstFitPackIterDataset if packing == "first_fit"
               else grain.experimental.BestFitPackIterDataset)
        packed = cls(pieces, length_struct=lengths, num_packing_bins=num_packing_bins,
                     seed=seed, shuffle_bins=shuffle_bins, meta_features=("loss_mask",))
    return packed.map(_Shift(pad_id))


class _NonEmptyIterator(grain.DatasetIterator):
    """Raise instead of ending silently when a finite pipeline yields no batch at all."""

    def __init__(self, parent, message: str):
        super().__init__(parent)
        self._message = message
        self._count = 0

    def __next__(self):
        try:
            elem = next(self._parent)
        except StopIteration:
            if self._count == 0:
                raise ValueError(self._message) from None
            raise
        self._count += 1
        return elem

    def get_state(self):
        return {"count": self._count, "parent": self._parent.get_state()}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._count = int(state["count"])


class _NonEmpty(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, message: str):
        super().__init__(parent)
        self._message = message

    def __iter__(self):
        return _NonEmptyIterator(self._parent.__iter__(), self._message)

    def __str__(self):
        return "NonEmpty"


def _resolve_shard(shard) -> tuple[int, int]:
    if shard is None:
        import jax  # pylint: disable=import-outside-toplevel
        return jax.process_index(), jax.process_count()
    if (not isinstance(shard, (tuple, list)) or len(shard) != 2
            or not all(isinstance(v, (int, np.integer)) for v in shard)
            or not 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard must be (index, count) with 0 <= index < count; got {shard!r}")
    return int(shard[0]), int(shard[1])


def _source(corpus, shard) -> grain.MapDataset:
    if isinstance(corpus, grain.MapDataset):
        ds = corpus
    elif isinstance(corpus, Sequence) and not isinstance(corpus, str):
        ds = grain.MapDataset.source(corpus)
    else:
        raise TypeError(f"corpus must be a Corpus / sequence of Documents or a grain.MapDataset; "
                        f"got {type(corpus).__name__}")
    index, count = _resolve_shard(shard)
    if len(ds) < count:
        raise ValueError(f"corpus has {len(ds)} documents, fewer than the {count} shards "
                         f"(shard={shard!r}); every process needs at least one")
    return ds[index::count] if count > 1 else ds


def make_lm_dataset(corpus, tokenizer, seq_len: int, batch_size: int, *, seed: int,
                    packing: str = "first_fit", num_packing_bins: int = 64,
                    long_docs: str = "split", shuffle: bool = True, repeat: bool | int = True,
                    shuffle_window: int = 1024, shard: tuple[int, int] | None = None,
                    encode: Callable[[Any], Mapping[str, np.ndarray]] | None = None,
                    drop_remainder: bool = True,
                    read_options: grain.ReadOptions | None = None,
                    vocab_size: int | None = None) -> grain.IterDataset:
    """Grain IterDataset of packed LM training batches (format in the module docstring).

    Documents are sharded by process (``ds[p::P]``), shuffled per epoch, encoded
    (``BOS + tokens + EOS``), split/truncated to ``seq_len + 1``, window-shuffled, packed,
    shifted and batched. ``iter(ds)`` is a ``grain.DatasetIterator``: ``get_state()`` /
    ``set_state()`` and ``grain.checkpoint.CheckpointSave/CheckpointRestore`` resume exactly.
    Single-process (no worker processes); add ``.mp_prefetch`` yourself if needed (outside
    ``absl.app.run`` call ``absl.flags.FLAGS.mark_as_parsed()`` first).

    Throughput (``experiments/bench_pipeline.py``, one core): ~0.5-0.7 M tokens/s at L=256,
    B=32. Pitfall (observed, grain 0.2.18): Grain's ``index_shuffle``, used by both shuffles,
    costs ~25 ms per element for n=4, ~9 ms for n=12, ~0.35 ms for n=256 and ~25 us for
    n>=1024; keep ``shuffle_window`` >= 1024 (or 0) and expect slow shuffles of tiny corpora.

    Args:
      corpus: :class:`Corpus` / sequence of Documents (or strings, or token dicts), or a
        ``grain.MapDataset`` of them.
      tokenizer: a :class:`jaxeff.data.Tokenizer` (e.g. ``ByteTokenizer()``).
      seq_len: L (>= 1).  batch_size: B (>= 1).
      seed: seed of the document shuffle, window shuffle and bin shuffle (required).
      packing: ``'first_fit'`` (default), ``'best_fit'`` or ``'concat'``.
      num_packing_bins: first/best-fit bins (default 64).
      long_docs: ``'split'`` (default) or ``'truncate'``.
      shuffle: shuffle documents (reshuffled each epoch), pieces and bins (default True).
      repeat: True = infinite epochs (default), False = one epoch, int k = k epochs.
      shuffle_window: piece-level window shuffle size (default 1024; ignored if not shuffle).
      shard: ``(process_index, process_count)``; default from ``jax.process_index/count()``.
      encode: element -> ``{'tokens', optional 'loss_mask'}`` (default
        ``EncodeDocument(tokenizer)``); a MeCo-style prefix plugs in here.
      drop_remainder: drop a final partial batch of a finite dataset (default True). A finite
        dataset (``repeat`` False or k) whose rows do not fill one batch would then yield
        nothing: its first ``next()`` raises ``ValueError`` instead (use a smaller
        ``batch_size``, more epochs, or ``drop_remainder=False`` for the partial batch).
      read_options: ``grain.ReadOptions`` for the map stage (default 1 thread, buffer 64).
      vocab_size: the model's vocabulary (embedding rows); when given, raises if it is
        smaller than ``tokenizer.vocab_size`` (:func:`jaxeff.data.validate_tokenizer`; e.g.
        ``ByteTokenizer`` needs 264, not 256). Default None: not checked.

    Raises:
      ValueError / TypeError: on an invalid argument (named with the value received), or a
      model ``vocab_size`` smaller than the tokenizer's.
    """
    check_int("batch_size", batch_size, 1)
    check_int("seed", seed, 0)
    if seed >= 2**32:
        raise ValueError(f"seed must be < 2**32 (Grain's shuffle); got {seed!r}")
    validate_tokenizer(tokenizer, vocab_size)
    if not isinstance(repeat, (bool, int)) or (not isinstance(repeat, bool) and repeat < 1):
        raise ValueError(f"repeat must be True, False or an int >= 1; got {repeat!r}")
    ds = ds_source = _source(corpus, shard)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat is not False:
        ds = ds.repeat(None if repeat is True else int(repeat))
    ds = ds.map(encode or EncodeDocument(tokenizer))
    if encode is not None:  # normalise user output (adds a ones loss_mask when absent)
        ds = ds.map(EncodeDocument(tokenizer))
    it = ds.to_iter_dataset(read_options or grain.ReadOptions(num_threads=1,
                                                                prefetch_buffer_size=64))
    rows = pack_lm(it, seq_len, pad_id=int(tokenizer.pad_id), packing=packing,
                   num_packing_bins=num_packing_bins, seed=seed, shuffle_bins=shuffle,
                   long_docs=long_docs, shuffle_window=shuffle_window if shuffle else 0)
    batches = rows.batch(batch_size, drop_remainder=drop_remainder)
    if repeat is not True and drop_remainder:
        epochs = "one pass" if repeat is False else f"{int(repeat)} passes"
        batches = _NonEmpty(batches, (
            f"make_lm_dataset yields no batch: {epochs} over the corpus ({len(ds_source)} "
            f"documents) packs into fewer than batch_size={batch_size} rows of seq_len="
            f"{seq_len}, and drop_remainder=True drops the partial batch; use a smaller "
            f"batch_size, more epochs (repeat=k or True), or drop_remainder=False"))
    return batches


def make_eval_batches(corpus, tokenizer, seq_len: int, batch_size: int, *,
                      packing: str = "first_fit", num_packing_bins: int = 64,
                      max_batches: int | None = None, shard: tuple[int, int] = (0, 1),
                      encode: Callable[[Any], Mapping[str, np.ndarray]] | None = None,
                      vocab_size: int | None = None) -> list[dict[str, np.ndarray]]:
    """A fixed, deterministic, finite list of evaluation batches (same format as training).

    One pass over ``corpus`` in order, no shuffling, long documents split (every target token
    of the corpus is scored once, except the one transition at each piece boundary when
    ``packing='concat'``). The last batch is padded to ``batch_size`` with empty rows
    (``segment_ids == 0``, ``loss_mask == 0``), so every batch has shape [B, L].

    Args:
      corpus, tokenizer, seq_len, batch_size, packing, num_packing_bins, encode, vocab_size: as
        in :func:`make_lm_dataset`.
      max_batches: keep only the first ``max_batches`` batches (default None = all).
      shard: ``(index, count)`` (default ``(0, 1)``: every process gets the full list, right
        for replicated evaluation; pass ``(jax.process_index(), jax.process_count())`` to split).

    Raises:
      ValueError: on an invalid argument, or if the corpus yields no batch.
    """
    if max_batches is not None:
        check_int("max_batches", max_batches, 1)
    ds = make_lm_dataset(corpus, tokenizer, seq_len, batch_size, seed=0, packing=packing,
                         num_packing_bins=num_packing_bins, shuffle=False, repeat=False,
                         shard=shard, encode=encode, drop_remainder=False,
                         vocab_size=vocab_size)
    batches = []
    for b in ds:
        if max_batches is not None and len(batches) >= max_batches:
            break
        batches.append(b)
    if not batches:
        raise ValueError("make_eval_batches: the corpus produced no batches")
    last = batches[-1]
    short = batch_size - last["inputs"].shape[0]
    if short > 0:
        pad = {k: np.zeros((short,) + v.shape[1:], v.dtype) for k, v in last.items()}
        pad["inputs"][:] = tokenizer.pad_id
        pad["targets"][:] = tokenizer.pad_id
        batches[-1] = {k: np.concatenate([last[k], pad[k]]) for k in last}
    return batches


def fill_rate(batches: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]]) -> float:
    """Fraction of non-padding tokens: ``sum(segment_ids != 0) / size`` over batch(es).

    Args:
      batches: one batch dict or an iterable of them (a finite one).

    Raises:
      ValueError: no batches / no ``'segment_ids'`` key.
    """
    if isinstance(batches, Mapping):
        batches = [batches]
    used = total = 0
    for b in batches:
        if "segment_ids" not in b:
            raise ValueError(f"batch has no 'segment_ids' (keys: {sorted(b)})")
        seg = np.asarray(b["segment_ids"])
        used += int((seg != 0).sum())
        total += seg.size
    if total == 0:
        raise ValueError("fill_rate: no batches given")
    return used / total
