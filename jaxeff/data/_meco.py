"""MeCo: metadata conditioning, then a plain-text cooldown.

"Metadata Conditioning Accelerates Language Model Pre-training" (Gao et al., 2025): for the
first ``1 - c`` of training every document is prefixed with its source URL's domain, and the
loss is not taken on the prefix; the final cooldown fraction ``c`` (paper: 10%) trains on plain
documents so the model works without metadata. At inference a prefix with real or made-up
metadata steers the model.

Format (reference princeton-pli/MeCo, ``--add_metadata_prefix --add_metadata_mask``)::

    tokens    = [BOS] + tok(template.format(meta)) + tok(text) + [EOS]      template "URL: {}\\n\\n"
    loss_mask = 0 on the first 1 + len(tok(prefix)) positions, 1 elsewhere
                (the first document token IS a target; if everything would be masked, the
                last min(10, n) positions are unmasked)

``loss_mask[j]`` means "token j is a target" (see :mod:`jaxeff.data.pipeline`), which is the
reference's ``labels[j] = -100`` for the masked positions.

Which metadata (``field``; no corpus-specific default): ``field=None`` (default) takes the
document's ``url`` and reduces it to its domain (:func:`url_domain`), the paper's metadata; a
document without a ``url`` then raises, asking for ``field``. Name any other meta key
(``field='module'`` for the embedded stdlib corpus, whose dotted module path, e.g.
``email.mime.text``, is its URL-like metadata) or pass a callable. Documents may be
:class:`Document` s or plain dicts with a ``text`` field (``{"text": ..., "url": ...}``: the
other keys are the meta).

Cooldown switch (:func:`make_meco_dataset`): two packed pipelines -- with and without metadata --
behind a :class:`jaxeff.data.SelectIterDataset` routed by
``PhaseMap([switch_step])`` over *batches*, with ``switch_step = round((1 - c) * total_steps)``.
The consumed batch count is part of the iterator state, so a resumed run lands in the right
phase; as in the paper the cooldown starts its own data loader (fresh shuffle, seed + 1).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import grain
import numpy as np

from jaxeff.data._corpus import Document, as_document
from jaxeff._checks import check_fraction, check_int
from jaxeff.data._mixture import PhaseMap, SelectIterDataset
from jaxeff.data._pipeline import make_eval_batches, make_lm_dataset
from jaxeff.data._tokenizer import validate_tokenizer, with_specials

__all__ = ["DEFAULT_TEMPLATE", "MetadataPrefix", "url_domain", "meco_switch_step",
           "make_meco_dataset", "meco_prompt", "conditioned_eval_batches"]

DEFAULT_TEMPLATE = "URL: {}\n\n"
MIN_UNMASKED = 10


def url_domain(url: str) -> str:
    """MeCo's metadata from a URL: drop the scheme, keep up to the first ``/``.

    ``'https://en.wikipedia.org/wiki/X' -> 'en.wikipedia.org'``.
    """
    s = str(url)
    if "://" in s:
        s = s.split("://", 1)[1]
    return s.split("/", 1)[0]


class MetadataPrefix:
    """Encode hook: document ``-> {'tokens', 'loss_mask'}`` with the MeCo metadata prefix.

    ``tokens = [bos] + tok(template.format(m)) + tok(text) + [eos]`` with ``m`` the metadata;
    ``loss_mask[:1 + len(tok(prefix))] = 0`` (if all positions would be masked, the last
    ``min(10, n)`` are unmasked, as in the reference). Picklable; plugs into
    ``make_lm_dataset(..., encode=MetadataPrefix(tok))``.

    Args:
      tokenizer: a :class:`jaxeff.data.Tokenizer`.
      field: ``meta`` key holding the metadata, a callable ``Document -> str``, or None
        (default): the document's ``url`` reduced to its domain (:func:`url_domain`, unless
        ``value_fn`` is given); see the module docstring.
      template: prefix format with one ``{}`` (default ``"URL: {}\\n\\n"``, the paper's).
      value_fn: optional ``str -> str`` applied to the field (e.g. :func:`url_domain`).
      override: a fixed metadata string or callable ``Document -> str`` used instead of the
        document's own (default None); for steering / counterfactual evaluation.
      mask_metadata: mask the prefix in the loss (default True, the paper's setting).
      add_eos: append EOS (default True).

    Raises:
      ValueError: a ``template`` without exactly one ``{}``; at call time a document whose
        ``meta`` lacks ``field`` (or ``url`` with ``field=None``; names the field, the document
        id and the keys present), or a dict without ``text``.
      TypeError: an element that is not a :class:`Document`, a dict or a str.
    """

    def __init__(self, tokenizer, *, field: str | Callable[[Document], str] | None = None,
                 template: str = DEFAULT_TEMPLATE, value_fn: Callable[[str], str] | None = None,
                 override: str | Callable[[Document], str] | None = None,
                 mask_metadata: bool = True, add_eos: bool = True):
        validate_tokenizer(tokenizer)
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"template must be a str with exactly one '{{}}'; got {template!r}")
        if not (field is None or isinstance(field, str) or callable(field)):
            raise TypeError(f"field must be None (the document's url), a meta key (str) or a "
                            f"callable; got {field!r}")
        if override is not None and not (isinstance(override, str) or callable(override)):
            raise TypeError(f"override must be None, a str or a callable; got {override!r}")
        self.tokenizer = tokenizer
        self.field, self.template, self.value_fn = field, template, value_fn
        self.override, self.mask_metadata, self.add_eos = override, mask_metadata, add_eos

    def metadata(self, doc) -> str:
        """The metadata string of ``doc`` (after ``override`` / ``value_fn``)."""
        doc = as_document(doc, "document")
        if self.override is not None:
            return self.override if isinstance(self.override, str) else str(self.override(doc))
        value_fn = self.value_fn
        if callable(self.field):
            value = self.field(doc)
        elif self.field is None:
            if "url" not in doc.meta:
                raise ValueError(
                    f"document {doc.meta.get('id', '?')!r} has no 'url' in its meta (fields: "
                    f"{sorted(doc.meta)}); with field=None MeCo uses the url's domain: name "
                    f"the metadata field, e.g. field='module' for the stdlib corpus")
            value = doc.meta["url"]
            value_fn = url_domain if value_fn is None else value_fn
        else:
            if self.field not in doc.meta:
                raise ValueError(f"metadata field {self.field!r} not in meta of document "
                                 f"{doc.meta.get('id', '?')!r}; available fields: "
                                 f"{sorted(doc.meta)}")
            value = doc.meta[self.field]
        value = str(value)
        return value_fn(value) if value_fn is not None else value

    def prefix_tokens(self, metadata: str) -> np.ndarray:
        """``tok(template.format(metadata))`` (no BOS)."""
        return np.asarray(self.tokenizer.encode(self.template.format(metadata)),
                          np.int32).reshape(-1)

    def __call__(self, doc) -> dict[str, np.ndarray]:
        doc = as_document(doc, "MetadataPrefix element")
        tok = self.tokenizer
        prefix = self.prefix_tokens(self.metadata(doc))
        tokens = with_specials(tok, prefix, tok.encode(doc.text), add_eos=self.add_eos)
        mask = np.ones(tokens.shape, np.float32)
        if self.mask_metadata:
            mask[:1 + prefix.shape[0]] = 0.0
            if not mask.any():
                mask[-min(MIN_UNMASKED, tokens.shape[0]):] = 1.0
        return {"tokens": tokens, "loss_mask": mask}


def meco_switch_step(total_steps: int, cooldown_fraction: float = 0.1) -> int:
    """First step of the plain cooldown: ``round((1 - cooldown_fraction) * total_steps)``.

    Raises:
      ValueError: ``total_steps`` < 1 or ``cooldown_fraction`` outside [0, 1].
    """
    total_steps = check_int("total_steps", total_steps, 1)
    c = check_fraction("cooldown_fraction", cooldown_fraction)
    return int(round((1.0 - c) * int(total_steps)))


def _check_field(corpus, field) -> None:
    if callable(field) or not hasattr(corpus, "__getitem__") or len(corpus) == 0:
        return
    first = corpus[0]
    if not isinstance(first, (Document, Mapping)):
        return
    meta = as_document(first, "corpus[0]").meta
    key = "url" if field is None else field
    if key not in meta:
        hint = (" (field=None means the document's url; name the metadata field, e.g. "
                "field='module' for the stdlib corpus)" if field is None else "")
        raise ValueError(f"metadata field {key!r} is not in the corpus' meta (first document "
                         f"has {sorted(meta)}){hint}")


def make_meco_dataset(corpus, tokenizer, seq_len: int, batch_size: int, *, total_steps: int,
                      seed: int, cooldown_fraction: float = 0.1,
                      field: str | Callable[[Document], str] | None = None,
                      template: str = DEFAULT_TEMPLATE,
                      value_fn: Callable[[str], str] | None = None,
                      cooldown_seed: int | None = None, **lm_kwargs: Any) -> grain.IterDataset:
    """Packed LM batches: metadata-prefixed for ``step < switch``, plain documents after.

    ``switch = meco_switch_step(total_steps, cooldown_fraction)``; batch ``i`` comes from the
    metadata pipeline if ``i < switch`` else from the plain one (a fresh loader seeded
    ``cooldown_seed``, default ``seed + 1``). Both are :func:`make_lm_dataset` pipelines (same
    ``lm_kwargs``: packing, long_docs, shard, ...). The iterator state holds the consumed batch
    count and both pipelines' states, so restoring at any step continues in the right phase.

    Args:
      corpus: a :class:`Corpus`, a sequence of Documents or of plain dicts with a ``text``
        field (``{"text": ..., "url": ...}``).  tokenizer: a Tokenizer.
      seq_len, batch_size: L and B.  total_steps: planned training steps.  seed: data seed.
      cooldown_fraction: final fraction trained without metadata, in [0, 1] (default 0.1, the
        paper's; 0 = metadata throughout, 1 = plain throughout).
      field, template, value_fn: see :class:`MetadataPrefix` (``field=None``, the default, uses
        each document's ``url`` domain).
      cooldown_seed: seed of the plain pipeline (default ``seed + 1``).
      **lm_kwargs: passed to :func:`make_lm_dataset` (not ``encode``).

    Raises:
      ValueError: ``cooldown_fraction`` outside [0, 1], ``total_steps`` < 1, a ``field``
        missing from the first document's meta, or an invalid pipeline argument.
    """
    if "encode" in lm_kwargs:
        raise ValueError("make_meco_dataset sets encode itself; pass field/template/value_fn")
    switch = meco_switch_step(total_steps, cooldown_fraction)
    _check_field(corpus, field)
    encode = MetadataPrefix(tokenizer, field=field, template=template, value_fn=value_fn)
    meta = make_lm_dataset(corpus, tokenizer, seq_len, batch_size, seed=seed, encode=encode,
                           **lm_kwargs)
    plain = make_lm_dataset(corpus, tokenizer, seq_len, batch_size,
                            seed=seed + 1 if cooldown_seed is None else cooldown_seed,
                            **lm_kwargs)
    if switch == 0:
        return SelectIterDataset([plain], PhaseMap([]))
    if cooldown_fraction == 0:  # metadata throughout, also past total_steps
        return SelectIterDataset([meta], PhaseMap([]))
    return SelectIterDataset([meta, plain], PhaseMap([switch]))


def meco_prompt(tokenizer, text: str = "", metadata: str | None = None, *,
                template: str = DEFAULT_TEMPLATE, add_bos: bool = True) -> np.ndarray:
    """Token ids of a generation prompt conditioned on (real or made-up) metadata.

    ``[BOS] + tok(template.format(metadata)) + tok(text)``; with ``metadata=None`` the plain
    prompt ``[BOS] + tok(text)`` (what the model sees after the cooldown).

    Raises:
      ValueError: a ``template`` without exactly one ``{}``.  TypeError: non-str text/metadata.
    """
    validate_tokenizer(tokenizer)
    if not isinstance(text, str) or (metadata is not None and not isinstance(metadata, str)):
        raise TypeError(f"text and metadata must be str (metadata may be None); got "
                        f"{type(text).__name__}, {type(metadata).__name__}")
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"template must be a str with exactly one '{{}}'; got {template!r}")
    prefix = [] if metadata is None else [tokenizer.encode(template.format(metadata))]
    return with_specials(tokenizer, *prefix, tokenizer.encode(text), add_bos=add_bos,
                         add_eos=False)


def conditioned_eval_batches(corpus, tokenizer, seq_len: int, batch_size: int, *,
                             metadata: str | Callable[[Document], str] | None = None,
                             field: str | Callable[[Document], str] | None = None,
                             template: str = DEFAULT_TEMPLATE, **kwargs: Any
                             ) -> list[Mapping[str, np.ndarray]]:
    """Evaluation batches with a metadata prefix (masked): the loss is on document tokens only.

    ``metadata=None`` uses each document's own ``field`` (true metadata); a string or callable
    overrides it (e.g. a wrong module path to measure steering). The targets are the same
    document tokens + EOS as in plain :func:`make_eval_batches`, so losses are comparable.

    Raises:
      ValueError: as :func:`make_eval_batches` and :class:`MetadataPrefix`.
    """
    if metadata is None:
        _check_field(corpus, field)
    enc = MetadataPrefix(tokenizer, field=field, template=template, override=metadata)
    return make_eval_batches(corpus, tokenizer, seq_len, batch_size, encode=enc, **kwargs)
