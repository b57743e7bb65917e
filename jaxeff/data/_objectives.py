"""Training objectives as pure maps over token sequences: MLM, UL2 mixture of denoisers, prefix LM.

Every function is pure in ``(tokens, rng)`` where ``rng`` is a ``np.random.Generator`` or an int
seed; the Grain transforms (``grain.transforms.RandomMap``) get a per-element generator from
Grain (seeded by the pipeline seed and the element index), so pipelines are deterministic and
resume exactly. Causal LM is the default pipeline (:func:`jaxeff.data.make_lm_dataset`).

* **MLM** ("BERT", Devlin et al., 2019; "MosaicBERT: A Bidirectional Encoder Optimized for Fast
  Pretraining", Portes et al., 2023 -- rate 0.30): each eligible token is selected with
  probability ``rate``; a selected token becomes ``mask_id`` w.p. 0.8, a random id w.p. 0.1,
  stays w.p. 0.1; ``loss_mask`` = selected. Works on unpacked ``{'tokens'}`` and on packed rows
  (``segment_ids == 0`` is never selected).
* **Span corruption** (T5 / "UL2: Unifying Language Learning Paradigms", Tay et al., 2022):
  ``n_noise = round(r n)``, ``n_spans = max(1, round(n_noise / mu))``; noise and non-noise
  tokens are each cut into ``n_spans`` random non-empty runs and interleaved (non-noise first).
  ``inputs`` replace span ``k`` by sentinel ``s_k``; ``targets = s_0 span_0 s_1 span_1 ...``.
  ``s_k = sentinel_ids[k]``; :func:`span_reconstruct` inverts. A small vocabulary (the byte
  tokenizer has 2 sentinel ids) may reuse them, ``s_k = sentinel_ids[k mod len(sentinel_ids)]``,
  because spans are in order: only when asked (``reuse_sentinels=True``); otherwise
  :func:`span_corrupt` raises when a sequence gets more spans than there are sentinels. The UL2
  stage (:func:`ul2_example`, :class:`UL2Transform`, :func:`make_ul2_dataset`) asks for it by
  default (``reuse_sentinels=True``), since its byte sentinels are two.
* **Prefix LM** (S-denoiser): ``inputs = t[:s]``, ``targets = t[s:]`` with ``s`` uniform in
  ``[1, n-1]`` or ``n - round(f n)`` for a fixed target fraction ``f`` (UL2's S: f = 0.25).
* **UL2**: a denoiser drawn per example (uniform by default) from R (mu, r) = (3, .15), (8, .15);
  X (3, .5), (8, .5), (64, .15), (64, .5); S (prefix LM, 0.25); the example starts with the
  denoiser's mode token (``[NLU]``, ``[NLG]``, ``[S2S]``).

Decoder-only form (:func:`decoder_only`): ``tokens = inputs + targets``, ``loss_mask`` 1 on the
targets only, ready for :func:`jaxeff.data.pack_lm`. The reference model is causal, so
the prefix is read causally (a true prefix LM would attend bidirectionally within it).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import numpy as np

from jaxeff.data._corpus import as_document
from jaxeff._checks import check_fraction
from jaxeff.data._mixture import check_weights
from jaxeff.data._pipeline import _source, pack_lm
from jaxeff.data._tokenizer import validate_tokenizer

__all__ = ["random_spans_noise_mask", "span_corrupt", "span_reconstruct", "prefix_lm_split",
           "mlm_mask", "Denoiser", "ul2_denoisers", "ul2_example", "decoder_only",
           "BYTE_UL2_MODE_IDS", "BYTE_UL2_SENTINELS", "MLMTransform", "UL2Transform",
           "max_chunk_len", "make_ul2_dataset"]

BYTE_UL2_MODE_IDS = {"R": 259, "X": 260, "S": 261}   # ByteTokenizer reserved ids
BYTE_UL2_SENTINELS = (262, 263)


def _rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool) and rng >= 0:
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a np.random.Generator or an int seed >= 0; got {rng!r}")


def _tokens(tokens, name="tokens") -> np.ndarray:
    t = np.asarray(tokens)
    if t.ndim != 1 or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array; got shape {t.shape}, {t.dtype}")
    return t.astype(np.int32)


def _segmentation(n_items: int, n_segments: int, rng) -> np.ndarray:
    """Lengths of ``n_segments`` random non-empty runs summing to ``n_items``."""
    cuts = np.sort(rng.choice(np.arange(1, n_items), n_segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [n_items]]))


def _span_counts(n: int, rate: float, mean_span: float) -> tuple[int, int]:
    n_noise = min(max(int(round(n * rate)), 1), n - 1)
    n_spans = max(1, int(round(n_noise / mean_span)))
    return n_noise, min(n_spans, n_noise, n - n_noise)


def random_spans_noise_mask(length: int, rate: float, mean_span: float, rng) -> np.ndarray:
    """Boolean noise mask of T5 span corruption (see the module docstring).

    Args:
      length: n >= 2.  rate: corruption rate r in (0, 1).  mean_span: mu >= 1.
      rng: Generator or int seed.

    Raises:
      ValueError: ``length`` < 2, ``rate`` outside (0, 1), ``mean_span`` < 1.
    """
    if length < 2:
        raise ValueError(f"length must be >= 2 for span corruption; got {length}")
    if not 0.0 < check_fraction("rate", rate) < 1.0:
        raise ValueError(f"rate must be in (0, 1); got {rate!r}")
    if not mean_span >= 1:
        raise ValueError(f"mean_span must be >= 1; got {mean_span!r}")
    rng = _rng(rng)
    n_noise, n_spans = _span_counts(length, rate, mean_span)
    noise = _segmentation(n_noise, n_spans, rng)
    keep = _segmentation(length - n_noise, n_spans, rng)
    runs = np.stack([keep, noise], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], n_spans), runs)


def _check_sentinels(tokens, sentinel_ids) -> np.ndarray:
    s = np.asarray(sentinel_ids, np.int32).reshape(-1)
    if s.size == 0:
        raise ValueError("sentinel_ids must hold at least one id")
    if np.isin(tokens, s).any():
        raise ValueError(f"tokens contain sentinel ids {sorted(set(s.tolist()))}; sentinels "
                         "must never occur in the text")
    return s


def span_corrupt(tokens, rng, *, rate: float, mean_span: float, sentinel_ids: Sequence[int],
                 reuse_sentinels: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """T5/UL2 span corruption: ``(inputs, targets)``; see the module docstring.

    Args:
      tokens: 1-D int ids (no sentinel among them).  rng: Generator or int seed.
      rate, mean_span: corruption rate r in (0, 1) and mean span length mu >= 1.
      sentinel_ids: the sentinel ids, one per span.
      reuse_sentinels: cycle through ``sentinel_ids`` when a sequence has more spans than
        sentinels (default False: raise instead).

    Raises:
      ValueError: bad tokens / rate / mean_span, tokens that contain a sentinel id, or more
        spans than sentinels without ``reuse_sentinels``.
    """
    t = _tokens(tokens)
    s = _check_sentinels(t, sentinel_ids)
    if not reuse_sentinels and t.shape[0] >= 2 and 0.0 < rate < 1.0 and mean_span >= 1:
        n_spans = _span_counts(t.shape[0], float(rate), float(mean_span))[1]
        if n_spans > s.size:
            raise ValueError(
                f"span corruption of {t.shape[0]} tokens at rate={rate!r}, mean_span="
                f"{mean_span!r} makes {n_spans} spans but sentinel_ids has {s.size} id(s): "
                f"give at least {n_spans} sentinel ids, or reuse_sentinels=True to cycle "
                f"through them (decodable because spans are in order)")
    mask = random_spans_noise_mask(t.shape[0], rate, mean_span, rng)
    is_start = mask & ~np.concatenate([[False], mask[:-1]])
    sent = s[(np.cumsum(is_start) - 1) % s.size]            # sentinel of each token's span
    inputs = np.where(is_start, sent, t)[~mask | is_start]
    noise_start = is_start[mask]
    pos = np.arange(noise_start.shape[0]) + np.cumsum(noise_start)  # slot of each noise token
    targets = np.empty(noise_start.shape[0] + int(noise_start.sum()), np.int32)
    targets[pos] = t[mask]
    targets[pos[noise_start] - 1] = sent[mask][noise_start]
    return inputs.astype(np.int32), targets


def span_reconstruct(inputs, targets, sentinel_ids: Sequence[int]) -> np.ndarray:
    """Invert :func:`span_corrupt`: put each target span back in place of its sentinel.

    Raises:
      ValueError: the number of sentinels in ``inputs`` and ``targets`` differ.
    """
    inputs, targets = _tokens(inputs, "inputs"), _tokens(targets, "targets")
    s = np.asarray(sentinel_ids, np.int32).reshape(-1)
    t_pos = np.flatnonzero(np.isin(targets, s))
    spans = np.split(targets, t_pos)[1:]  # each starts with its sentinel
    if int(np.isin(inputs, s).sum()) != len(spans):
        raise ValueError(f"inputs hold {int(np.isin(inputs, s).sum())} sentinels but targets "
                         f"hold {len(spans)}")
    out, k = [], 0
    for tok in inputs:
        if tok in s:
            out.extend(spans[k][1:].tolist())
            k += 1
        else:
            out.append(int(tok))
    return np.asarray(out, np.int32)


def prefix_lm_split(tokens, rng, target_fraction: float | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Prefix LM: ``(t[:s], t[s:])``; ``s ~ U[1, n-1]`` or ``n - round(f n)`` (clipped to [1, n-1]).

    Raises:
      ValueError: fewer than 2 tokens or ``target_fraction`` outside [0, 1].
    """
    t = _tokens(tokens)
    n = t.shape[0]
    if n < 2:
        raise ValueError(f"prefix LM needs >= 2 tokens; got {n}")
    if target_fraction is None:
        s = int(_rng(rng).integers(1, n))
    else:
        f = check_fraction("target_fraction", target_fraction)
        s = min(max(n - int(round(f * n)), 1), n - 1)
    return t[:s], t[s:]


def mlm_mask(tokens, rng, *, rate: float = 0.3, mask_id: int, vocab_size: int,
             special_ids: Sequence[int] = (), eligible=None, mask_prob: float = 0.8,
             random_prob: float = 0.1) -> dict[str, np.ndarray]:
    """BERT masking at ``rate`` (MosaicBERT: 0.3): ``{'inputs', 'targets', 'loss_mask'}``.

    Selected: eligible tokens (not in ``special_ids``, and ``eligible`` if given) with
    probability ``rate``. Of those, ``mask_prob`` become ``mask_id``, ``random_prob`` a uniform
    random id in ``[0, vocab_size)`` (not a special id), the rest stay. ``targets = tokens``,
    ``loss_mask = float32(selected)``.

    Raises:
      ValueError: ``rate`` / probabilities outside [0, 1] or summing above 1, bad tokens.
    """
    t = _tokens(tokens)
    rate = check_fraction("rate", rate)
    check_fraction("mask_prob", mask_prob)
    check_fraction("random_prob", random_prob)
    if mask_prob + random_prob > 1.0 + 1e-9:
        raise ValueError(f"mask_prob + random_prob must be <= 1; got {mask_prob} + {random_prob}")
    rng = _rng(rng)
    ok = ~np.isin(t, np.asarray(special_ids, np.int32))
    if eligible is not None:
        ok &= np.asarray(eligible, bool)
    selected = ok & (rng.random(t.shape) < rate)
    u = rng.random(t.shape)
    to_mask = selected & (u < mask_prob)
    to_rand = selected & (u >= mask_prob) & (u < mask_prob + random_prob)
    rand = rng.integers(0, vocab_size, t.shape).astype(np.int32)
    special = np.asarray(special_ids, np.int32)
    rand = np.where(np.isin(rand, special), t, rand)  # never inject a special id
    inputs = np.where(to_mask, np.int32(mask_id), np.where(to_rand, rand, t)).astype(np.int32)
    return {"inputs": inputs, "targets": t, "loss_mask": selected.astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser: ``kind`` 'span' (mean_span mu, rate r) or 'prefix' (target fraction r)."""

    name: str
    mode_id: int
    rate: float
    mean_span: float = 3.0
    kind: str = "span"

    def __post_init__(self):
        if self.kind not in ("span", "prefix"):
            raise ValueError(f"Denoiser.kind must be 'span' or 'prefix'; got {self.kind!r}")
        if not 0.0 < check_fraction("Denoiser.rate", self.rate) < 1.0:
            raise ValueError(f"Denoiser.rate must be in (0, 1); got {self.rate!r}")
        if self.mean_span < 1:
            raise ValueError(f"Denoiser.mean_span must be >= 1; got {self.mean_span!r}")


def ul2_denoisers(mode_ids=None) -> tuple[Denoiser, ...]:
    """UL2's seven denoisers (R x2, X x4, S); ``mode_ids`` maps 'R'/'X'/'S' to token ids
    (default :data:`BYTE_UL2_MODE_IDS`)."""
    m = dict(BYTE_UL2_MODE_IDS if mode_ids is None else mode_ids)
    return (Denoiser("R3", m["R"], 0.15, 3), Denoiser("R8", m["R"], 0.15, 8),
            Denoiser("X3", m["X"], 0.5, 3), Denoiser("X8", m["X"], 0.5, 8),
            Denoiser("X64a", m["X"], 0.15, 64), Denoiser("X64b", m["X"], 0.5, 64),
            Denoiser("S", m["S"], 0.25, kind="prefix"))


def ul2_example(tokens, rng, denoisers: Sequence[Denoiser] | None = None, *, weights=None,
                sentinel_ids: Sequence[int] = BYTE_UL2_SENTINELS,
                reuse_sentinels: bool = True) -> dict:
    """One UL2 example: ``{'inputs': [mode] + corrupted, 'targets', 'mode', 'denoiser'}``.

    The denoiser index is drawn from ``weights`` (default uniform over ``denoisers``).
    ``reuse_sentinels`` (default True: the two byte sentinels are cycled, module docstring) is
    passed to :func:`span_corrupt`.

    Raises:
      ValueError: bad weights (negative, wrong length, non-positive sum) or tokens.
    """
    den = tuple(ul2_denoisers() if denoisers is None else denoisers)
    if not den:
        raise ValueError("denoisers is empty")
    w = check_weights("weights", np.ones(len(den)) if weights is None else weights, len(den))
    rng = _rng(rng)
    j = int(rng.choice(len(den), p=w))
    d = den[j]
    if d.kind == "prefix":
        inp, tgt = prefix_lm_split(tokens, rng, d.rate)
    else:
        inp, tgt = span_corrupt(tokens, rng, rate=d.rate, mean_span=d.mean_span,
                                sentinel_ids=sentinel_ids, reuse_sentinels=reuse_sentinels)
    inp = np.concatenate([[d.mode_id], inp]).astype(np.int32)
    return {"inputs": inp, "targets": tgt, "mode": np.int32(d.mode_id), "denoiser": np.int32(j)}


def decoder_only(inputs, targets) -> dict[str, np.ndarray]:
    """``{'tokens': inputs + targets, 'loss_mask': 0 on inputs, 1 on targets}`` for packing."""
    inputs, targets = _tokens(inputs, "inputs"), _tokens(targets, "targets")
    return {"tokens": np.concatenate([inputs, targets]).astype(np.int32),
            "loss_mask": np.concatenate([np.zeros(inputs.shape, np.float32),
                                         np.ones(targets.shape, np.float32)])}


def max_chunk_len(row_len: int, denoisers: Sequence[Denoiser]) -> int:
    """Largest raw chunk n whose decoder-only UL2 example fits ``row_len`` for every denoiser:
    span: ``1 + n + 2 n_spans(n) <= row_len``; prefix: ``1 + n <= row_len``.

    Raises:
      ValueError: if no n >= 2 fits.
    """
    for n in range(row_len - 1, 1, -1):
        if all(1 + n + (0 if d.kind == "prefix" else 2 * _span_counts(n, d.rate,
                                                                      d.mean_span)[1])
               <= row_len for d in denoisers):
            return n
    raise ValueError(f"row length {row_len} is too short for these denoisers")


class MLMTransform(grain.transforms.RandomMap):
    """Grain random map: MLM masking of ``{'tokens'}`` elements or packed rows.

    A packed row (has ``'inputs'`` and ``'segment_ids'``) is masked in place of its inputs
    (``targets`` = original inputs, ``loss_mask`` = selected & ``segment_ids != 0``); other keys
    are kept. An unpacked ``{'tokens'}`` element returns :func:`mlm_mask`'s dict.
    Args as :func:`mlm_mask`.

    Raises:
      ValueError: (at construction) a rate / probability outside [0, 1] or
        ``mask_prob + random_prob > 1``.
    """

    def __init__(self, *, rate: float = 0.3, mask_id: int, vocab_size: int,
                 special_ids: Sequence[int] = (), mask_prob: float = 0.8,
                 random_prob: float = 0.1):
        for name, v in (("rate", rate), ("mask_prob", mask_prob), ("random_prob", random_prob)):
            check_fraction(name, v)
        if mask_prob + random_prob > 1.0 + 1e-9:
            raise ValueError(f"mask_prob + random_prob must be <= 1; got {mask_prob} + "
                             f"{random_prob}")
        self.kw = dict(rate=rate, mask_id=mask_id, vocab_size=vocab_size,
                       special_ids=tuple(special_ids), mask_prob=mask_prob,
                       random_prob=random_prob)

    def random_map(self, element, rng):
        if "segment_ids" in element and "inputs" in element:
            x, seg = np.asarray(element["inputs"]), np.asarray(element["segment_ids"])
            flat = mlm_mask(x.reshape(-1), rng, eligible=(seg.reshape(-1) != 0), **self.kw)
            out = dict(element)
            out.update({k: v.reshape(x.shape) for k, v in flat.items()})
            return out
        return mlm_mask(element["tokens"], rng, **self.kw)


class UL2Transform(grain.transforms.RandomMap):
    """Grain random map: ``{'tokens'}`` -> decoder-only UL2 example ``{'tokens', 'loss_mask'}``
    (or the ``{'inputs', 'targets', ...}`` dict with ``decoder_only=False``).

    A single ``Denoiser(..., kind='prefix')`` makes it a prefix-LM transform.

    Raises:
      ValueError: (at construction) bad ``weights`` for the denoisers.
    """

    def __init__(self, denoisers: Sequence[Denoiser] | None = None, *, weights=None,
                 sentinel_ids: Sequence[int] = BYTE_UL2_SENTINELS, decoder_only: bool = True,
                 reuse_sentinels: bool = True):
        self.reuse_sentinels = bool(reuse_sentinels)
        self.denoisers = tuple(ul2_denoisers() if denoisers is None else denoisers)
        self.weights = check_weights("weights", np.ones(len(self.denoisers))
                                     if weights is None else weights, len(self.denoisers))
        self.sentinel_ids = tuple(int(s) for s in sentinel_ids)
        self.decoder_only = decoder_only

    def random_map(self, element, rng):
        ex = ul2_example(element["tokens"], rng, self.denoisers, weights=self.weights,
                         sentinel_ids=self.sentinel_ids, reuse_sentinels=self.reuse_sentinels)
        return decoder_only(ex["inputs"], ex["targets"]) if self.decoder_only else ex


class _Chunk:
    """Document -> list of token chunks of length <= n (a chunk of < 2 tokens is dropped)."""

    def __init__(self, tokenizer, n):
        self.tokenizer, self.n = tokenizer, n

    def __call__(self, doc):
        text = as_document(doc, "document").text
        t = np.asarray(self.tokenizer.encode(text), np.int32)
        return [{"tokens": t[i:i + self.n]} for i in range(0, t.shape[0], self.n)
                if t[i:i + self.n].shape[0] >= 2]


class _Flatten(grain.experimental.FlatMapTransform):
    max_fan_out = 1 << 30

    def flat_map(self, element):
        return element


def make_ul2_dataset(corpus, tokenizer, seq_len: int, batch_size: int, *, seed: int,
                     denoisers: Sequence[Denoiser] | None = None, weights=None,
                     sentinel_ids: Sequence[int] = BYTE_UL2_SENTINELS,
                     num_packing_bins: int = 64, shard=None,
                     reuse_sentinels: bool = True) -> grain.IterDataset:
    """Packed decoder-only UL2 batches (same batch format as :func:`make_lm_dataset`).

    ``source.shuffle(seed).repeat() -> chunk documents to max_chunk_len(L + 1) -> random_map(UL2)
    -> flatten -> pack_lm(first_fit) -> batch``. The random map is seeded per document index,
    so the stream is deterministic and its iterator state resumes exactly.

    Raises:
      ValueError: ``seq_len`` too short for the denoisers, bad weights or pipeline arguments.
    """
    validate_tokenizer(tokenizer)
    t = UL2Transform(denoisers, weights=weights, sentinel_ids=sentinel_ids,
                     reuse_sentinels=reuse_sentinels)
    n = max_chunk_len(seq_len + 1, t.denoisers)
    ds = _source(corpus, shard).shuffle(seed=seed).repeat()
    ds = ds.map(_Chunk(tokenizer, n))
    ds = ds.random_map(_ListMap(t), seed=seed)
    it = grain.experimental.FlatMapIterDataset(
        ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=64)),
        _Flatten())
    rows = pack_lm(it, seq_len, pad_id=int(tokenizer.pad_id), num_packing_bins=num_packing_bins,
                   seed=seed, long_docs="truncate")
    return rows.batch(batch_size, drop_remainder=True)


class _ListMap(grain.transforms.RandomMap):
    def __init__(self, inner):
        self.inner = inner

    def random_map(self, element, rng):
        return [self.inner.random_map(e, rng) for e in element]
