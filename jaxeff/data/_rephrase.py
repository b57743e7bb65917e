"""WRAP: rephrase documents with an instruction-tuned model, cache them with provenance, mix.

"Rephrasing the Web: A Recipe for Compute and Data-Efficient Language Modeling" (Maini et al.,
2024) prompts an off-the-shelf instruction-tuned model to paraphrase each web document in a
style -- "like Wikipedia", "question-answer", easy (a child could follow), hard (terse and
scholarly) -- and pre-trains on real and synthetic text together (1:1 in the paper), which it
reports speeds pre-training on C4 ~3x and improves Pile perplexity > 10% at equal compute.

Three pieces, each usable alone:

* a *generator*: any callable ``generator(prompts: list[str], seed: int) -> list[str]`` (one
  completion per prompt), with a JSON ``settings`` dict naming the model and its sampling
  (``generator.settings``, or passed to :func:`rephrase_corpus`). :class:`ChatRephraser` builds
  one from a token-level decoder (``functools.partial(jaxeff.models.generate, params, cfg)``)
  and a tokenizer with ``apply_chat_template`` (SmolLM2-Instruct's ChatML); tests inject a fake
  one. ``jaxeff.data`` never imports the models.
* the cache, :func:`rephrase_corpus`: work item ``(style s, document j)``; per style the
  documents are cut into fixed batches ``k = j // B`` in the given order, and batch ``k`` of
  style ``s`` is generated with ``seed_{s,k} = u32(sha256("seed:s:k"))``, so its output depends
  only on (documents, settings, seed, B). Records go to JSONL shards under ``cache_dir`` after
  each batch, each with its provenance::

      {"id": "<source id>:wrap:<style>", "text": ..., "source_id", "source_sha256",
       "style", "prompt_sha256", "model", "sampling", "seed", "batch", "batch_seed"}

  A rerun skips recorded items (resumable: an interrupted run continues where it stopped, and
  ends with the records an uninterrupted run writes); ``manifest.json`` holds the settings and a
  rerun with other settings (model, sampling, seed, batch size, a style's prompt) raises
  instead of mixing records (use another ``cache_dir``); so does a source document whose text
  changed under the same id. A half-written last line (a killed write) is dropped and redone.
* the mixture, :func:`make_wrap_lm_dataset`: real and synthetic packed rows at a given ratio,
  ``w = (1 - f, f)`` through :func:`jaxeff.data.constant_mixture` and
  :func:`jaxeff.data.make_mixture_lm_dataset` (every batch has exactly ``round(f B)`` synthetic
  rows on average over blocks, so ``f`` is the token share up to padding).

Deviations: the prompts are paraphrased from the paper's, not copied; the paper rephrases
chunks of at most ~300 tokens with a 7B model -- here the caller chunks (e.g.
``load_text_file_corpus(chunk_chars=...)``), long prompts raise in ``generate`` instead of
being cut, and nothing is filtered (an empty rephrase is kept, with its provenance).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import warnings
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from jaxeff._checks import check_callable, check_float, check_fraction, check_int
from jaxeff.data._corpus import Corpus, Document, as_document
from jaxeff.data._mixture import constant_mixture, make_mixture_lm_dataset

__all__ = ["WRAP_STYLES", "wrap_prompt", "ChatRephraser", "rephrase_corpus", "load_rephrased",
           "make_wrap_lm_dataset"]

# The paper's four styles, its prompts paraphrased (not quoted).
WRAP_STYLES = {
    "wikipedia": ("Rewrite the passage below the way a well-edited encyclopedia article such as "
                  "Wikipedia would present it: clear, complete, high-quality English sentences "
                  "that keep all of its content."),
    "qa": ("Turn the passage below into a set of questions with their answers that together "
           "cover what it says. Write each pair as 'Question:' followed by 'Answer:'."),
    "easy": ("Retell the passage below in very simple words and short sentences that a small "
             "child could follow."),
    "hard": ("Restate the passage below in dense, formal, scholarly language with a precise and "
             "advanced vocabulary."),
}
_FORMAT = "jaxeff.wrap/1"
_MANIFEST = "manifest.json"


def wrap_prompt(text: str, style: str) -> str:
    """The instruction for one document: ``WRAP_STYLES[style] + "\\n\\n" + text``.

    Raises:
      ValueError: an unknown ``style`` (the valid ones are listed).  TypeError: non-str text.
    """
    if style not in WRAP_STYLES:
        raise ValueError(f"style must be one of {sorted(WRAP_STYLES)}; got {style!r}")
    if not isinstance(text, str):
        raise TypeError(f"text must be a str; got {type(text).__name__}")
    return f"{WRAP_STYLES[style]}\n\n{text}"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def _json(value, name: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"{name} must be JSON-serializable (it is written into every record); "
                        f"got {value!r}: {e}") from e


class ChatRephraser:
    """A WRAP generator over a token-level decoder and a chat tokenizer.

    ``texts = decode(generate_ids([chat(prompt) for prompt in prompts], max_new_tokens,
    key=jax.random.key(seed), temperature, top_p, eos_id, pad_id))``, where ``chat(p)`` is
    ``tokenizer.apply_chat_template([{"role": "user", "content": p}])`` (the model's default
    system message included, the assistant turn opened) and decoding stops at
    ``tokenizer.eos_id`` (ChatML's ``<|im_end|>``). Counts ``tokens_generated`` (new tokens up
    to and including each row's eos), ``rows_truncated`` (rows that hit ``max_new_tokens``) and
    ``rows`` over its calls, for throughput.

    Args:
      generate_ids: ``(prompt_ids: list of int arrays, max_new_tokens, *, key, temperature,
        top_p, eos_id, pad_id) -> int [B, N]``, e.g.
        ``functools.partial(jaxeff.models.generate, params, cfg)``.
      tokenizer: has ``apply_chat_template``, ``decode``, ``eos_id`` and ``pad_id``.
      model: the model's name, written into every record (e.g. ``"SmolLM2-135M-Instruct"``).
      max_new_tokens: N (default 256).  temperature: 0 greedy (default 0.7).
      top_p: nucleus mass in (0, 1] (default 0.9).

    Raises:
      TypeError: ``generate_ids`` not callable, a tokenizer without those members, a non-str
        ``model``.  ValueError: bad sampling settings.
    """

    def __init__(self, generate_ids: Callable, tokenizer, *, model: str,
                 max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9):
        self.generate_ids = check_callable("generate_ids", generate_ids)
        missing = [m for m in ("apply_chat_template", "decode", "eos_id", "pad_id")
                   if not hasattr(tokenizer, m)]
        if missing:
            raise TypeError(f"tokenizer must have {missing} (a chat model's tokenizer, e.g. "
                            f"pretrained('smollm2-135m').tokenizer); got "
                            f"{type(tokenizer).__name__}")
        if not isinstance(model, str) or not model:
            raise TypeError(f"model must be a non-empty str naming the model; got {model!r}")
        self.tokenizer = tokenizer
        self.settings = {"model": model,
                         "max_new_tokens": check_int("max_new_tokens", max_new_tokens, 1),
                         "temperature": check_float("temperature", temperature, 0.0),
                         "top_p": check_float("top_p", top_p, 0.0, 1.0, min_open=True)}
        self.tokens_generated = self.rows_truncated = self.rows = 0

    def __call__(self, prompts: Sequence[str], seed: int) -> list[str]:
        import jax
        ids = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}])
               for p in prompts]
        s = self.settings
        out_BxN = np.asarray(self.generate_ids(
            ids, s["max_new_tokens"], key=jax.random.key(check_int("seed", seed, 0)),
            temperature=s["temperature"], top_p=s["top_p"], eos_id=int(self.tokenizer.eos_id),
            pad_id=int(self.tokenizer.pad_id)))
        eos_BxN = out_BxN == self.tokenizer.eos_id
        ended_B = eos_BxN.any(axis=1)
        self.tokens_generated += int(np.where(ended_B, eos_BxN.argmax(axis=1) + 1,
                                              out_BxN.shape[1]).sum())
        self.rows_truncated += int((~ended_B).sum())
        self.rows += len(prompts)
        return [self.tokenizer.decode(row).strip() for row in out_BxN]

    def __repr__(self):
        return f"ChatRephraser({self.settings})"


def _batch_seed(seed: int, style: str, batch: int) -> int:
    digest = hashlib.sha256(f"{seed}:{style}:{batch}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _source_ids(docs) -> tuple[list[Document], list[str]]:
    out, ids, seen = [], [], {}
    for j, d in enumerate(docs):
        doc = as_document(d, f"docs[{j}]")
        sid = str(doc.meta["id"]) if "id" in doc.meta else "sha256:" + _sha256(doc.text)
        if sid in seen:
            raise ValueError(f"docs[{j}] and docs[{seen[sid]}] share the id {sid!r}; source ids "
                             "must be unique (a record names its source by id)")
        seen[sid] = j
        out.append(doc)
        ids.append(sid)
    if not out:
        raise ValueError("docs is empty; nothing to rephrase")
    return out, ids


def _read_shard(path: str, repair: bool) -> list[dict]:
    """Records of one shard; a last line without its newline (a killed write) is dropped (and,
    with ``repair``, cut from the file so appends stay line-aligned)."""
    with open(path, "rb") as f:
        data = f.read()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        if repair:
            with open(path, "r+b") as f:
                f.truncate(cut)
        else:
            warnings.warn(f"{path}: the last line is incomplete (an interrupted write); it is "
                          "not loaded, and rerunning rephrase_corpus regenerates it",
                          RuntimeWarning, stacklevel=3)
    records = []
    for n, line in enumerate(data[:cut].decode("utf-8").splitlines()):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n + 1} is not a JSON record: {e}") from e
    return records


def _read_cache(cache_dir: str, repair: bool = False) -> tuple[Optional[dict], dict, list]:
    manifest = None
    mpath = os.path.join(cache_dir, _MANIFEST)
    if os.path.exists(mpath):
        with open(mpath) as f:
            manifest = json.load(f)
    shards = sorted(glob.glob(os.path.join(cache_dir, "shard-*.jsonl")))
    records = {}
    for path in shards:
        for r in _read_shard(path, repair):
            old = records.get(r["id"])
            if old is not None and old != r:
                raise ValueError(f"{cache_dir}: two different records for {r['id']!r}; the "
                                 "cache was written by two runs at once or edited")
            records.setdefault(r["id"], r)
    return manifest, records, shards


def _check_manifest(manifest: Optional[dict], want: dict, cache_dir: str) -> dict:
    if manifest is None:
        return want
    if manifest.get("format") != _FORMAT:
        raise ValueError(f"{cache_dir}/{_MANIFEST} has format {manifest.get('format')!r}, not "
                         f"{_FORMAT!r}")
    diff = [k for k in ("settings", "seed", "batch_size") if manifest.get(k) != want[k]]
    diff += [f"prompt of style {s!r}" for s, h in want["styles"].items()
             if manifest["styles"].get(s, h) != h]
    if diff:
        keys = ("settings", "seed", "batch_size")
        cached = _json({k: manifest.get(k) for k in keys}, "manifest")
        requested = _json({k: want[k] for k in keys}, "settings")
        raise ValueError(f"cache_dir {cache_dir!r} holds records made with other settings "
                         f"({', '.join(diff)}): cached {cached}, requested {requested}; records "
                         "of different settings are never mixed: use another cache_dir")
    return {**manifest, "styles": {**manifest["styles"], **want["styles"]}}


def rephrase_corpus(docs, generator: Callable, cache_dir: str, *,
                    styles: Sequence[str] = ("wikipedia", "qa"), seed: int = 0,
                    batch_size: int = 8, settings: Optional[Mapping] = None,
                    records_per_shard: int = 1000, max_batches: Optional[int] = None,
                    progress: Optional[Callable[[str], None]] = None) -> Corpus:
    """WRAP rephrases of ``docs`` in each style, generated once and cached with provenance.

    See the module docstring for the batching (``seed_{s,k}``), the record fields, resume and the
    settings check. Documents are named by ``meta['id']`` (or ``"sha256:<hash of the text>"``
    when they have none, e.g. plain strings).

    Args:
      docs: Documents, strings or ``{"text": ...}`` dicts (ids unique).
      generator: ``(prompts: list[str], seed: int) -> list[str]`` (e.g. :class:`ChatRephraser`).
      cache_dir: folder of ``manifest.json`` and ``shard-NNNNN.jsonl`` (created).
      styles: keys of :data:`WRAP_STYLES` (default ``("wikipedia", "qa")``).
      seed: run seed (default 0).  batch_size: prompts per generator call (default 8).
      settings: JSON dict with at least ``'model'``; default ``generator.settings``.
      records_per_shard: lines per shard before a new one starts (default 1000).
      max_batches: generate at most this many batches in this call, then stop (None: all);
        a later call continues.
      progress: called with a one-line message after each batch (e.g. ``print``).

    Returns a :class:`Corpus` of the rephrases of ``docs`` that exist after this call, in
    (style, document) order: ``Document(text, meta)`` with the record's provenance in ``meta``,
    ``meta['domain'] = 'wrap-<style>'``.

    Example::

        from jaxeff import data
        shout = lambda prompts, seed: [p.rsplit("\\n\\n", 1)[-1].upper() for p in prompts]
        synth = data.rephrase_corpus(["a cat sat.", "dogs bark."], shout, "wrap_cache",
                                     styles=("qa",), settings={"model": "shout"})
        assert synth[0].text == "A CAT SAT." and synth[0].meta["style"] == "qa"
        def never(prompts, seed):
            raise AssertionError("cached: not called")
        again = data.rephrase_corpus(["a cat sat.", "dogs bark."], never, "wrap_cache",
                                     styles=("qa",), settings={"model": "shout"})
        assert list(again) == list(synth)

    Raises:
      ValueError: an unknown style, empty docs, duplicate ids, settings without ``'model'``,
        settings that differ from the cache's, a source text changed under a cached id, a
        generator that returns the wrong number of texts.  TypeError: a non-callable
        generator, non-JSON settings, a non-str completion.
    """
    check_callable("generator", generator)
    styles = list(styles)
    if not styles or len(set(styles)) != len(styles):
        raise ValueError(f"styles must be a non-empty list of distinct styles; got {styles!r}")
    for s in styles:
        if s not in WRAP_STYLES:
            raise ValueError(f"styles must be keys of WRAP_STYLES {sorted(WRAP_STYLES)}; got "
                             f"{s!r}")
    seed = check_int("seed", seed, 0)
    batch_size = check_int("batch_size", batch_size, 1)
    records_per_shard = check_int("records_per_shard", records_per_shard, 1)
    if max_batches is not None:
        max_batches = check_int("max_batches", max_batches, 0)
    settings = settings if settings is not None else getattr(generator, "settings", None)
    if not isinstance(settings, Mapping) or not isinstance(settings.get("model"), str):
        raise ValueError("settings must be a dict with a str 'model' (and the sampling "
                         "settings): each record names the model and sampling that made it; pass "
                         f"settings=... or a generator with .settings; got {settings!r}")
    settings = json.loads(_json(dict(settings), "settings"))
    docs, ids = _source_ids(docs)
    hashes = [_sha256(d.text) for d in docs]

    os.makedirs(cache_dir, exist_ok=True)
    manifest, records, shards = _read_cache(cache_dir, repair=True)
    want = {"format": _FORMAT, "settings": settings, "seed": seed, "batch_size": batch_size,
            "styles": {s: _sha256(WRAP_STYLES[s]) for s in styles}}
    manifest = _check_manifest(manifest, want, cache_dir)
    by_source = {}
    for r in records.values():
        by_source.setdefault(r["source_id"], r["source_sha256"])
    changed = [i for i, h in zip(ids, hashes) if by_source.get(i, h) != h]
    if changed:
        raise ValueError(f"source documents {changed[:5]} changed since they were rephrased into "
                         f"{cache_dir!r} (same id, other text); use another cache_dir or "
                         "restore the documents")
    tmp = os.path.join(cache_dir, _MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(cache_dir, _MANIFEST))

    model = settings["model"]
    sampling = {k: v for k, v in settings.items() if k != "model"}
    shard = shards[-1] if shards else os.path.join(cache_dir, "shard-00000.jsonl")
    in_shard = 0
    if os.path.exists(shard):
        with open(shard, "rb") as f:
            in_shard = f.read().count(b"\n")
    done_batches = 0
    for style in styles:
        for k in range(0, -(-len(docs) // batch_size)):
            rows = range(k * batch_size, min((k + 1) * batch_size, len(docs)))
            todo = [j for j in rows if f"{ids[j]}:wrap:{style}" not in records]
            if not todo:
                continue
            if max_batches is not None and done_batches >= max_batches:
                break
            bseed = _batch_seed(seed, style, k)
            prompts = [wrap_prompt(docs[j].text, style) for j in rows]
            texts = generator(prompts, bseed)   # the whole fixed batch: same output on resume
            if not isinstance(texts, Sequence) or len(texts) != len(prompts):
                got = len(texts) if isinstance(texts, Sequence) else repr(texts)
                raise ValueError(f"generator returned {got} texts for {len(prompts)} prompts; it "
                                 "must return one per prompt")
            lines = []
            for j in todo:
                text = texts[j - rows.start]
                if not isinstance(text, str):
                    raise TypeError(f"generator returned a {type(text).__name__} for prompt "
                                    f"{j - rows.start}; completions must be str")
                rec = {"id": f"{ids[j]}:wrap:{style}", "text": text, "source_id": ids[j],
                       "source_sha256": hashes[j], "style": style,
                       "prompt_sha256": want["styles"][style], "model": model,
                       "sampling": sampling, "seed": seed, "batch": k, "batch_seed": bseed}
                records[rec["id"]] = rec
                lines.append(_json(rec, "record") + "\n")
            if in_shard >= records_per_shard:
                shard = os.path.join(cache_dir, f"shard-{int(shard[-11:-6]) + 1:05d}.jsonl")
                in_shard = 0
            with open(shard, "a", encoding="utf-8") as f:
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())
            in_shard += len(lines)
            done_batches += 1
            if progress is not None:
                progress(f"wrap {style} batch {k}: {len(lines)} records -> {shard}")
    out = []
    for style in styles:
        for sid in ids:
            r = records.get(f"{sid}:wrap:{style}")
            if r is not None:
                out.append(_document(r))
    return Corpus(out, f"wrap:{os.path.basename(os.path.normpath(cache_dir))}")


def _document(record: dict) -> Document:
    meta = {k: v for k, v in record.items() if k != "text"}
    meta["domain"] = f"wrap-{record['style']}"
    return Document(record["text"], meta)


def load_rephrased(cache_dir: str, *, styles: Optional[Sequence[str]] = None) -> Corpus:
    """The rephrases cached in ``cache_dir`` (file order), optionally only ``styles``; read-only
    (a half-written last line is skipped with a ``RuntimeWarning``).

    Raises:
      FileNotFoundError: no ``manifest.json`` in ``cache_dir``.  ValueError: a malformed record.
    """
    manifest, records, _ = _read_cache(cache_dir)
    if manifest is None:
        raise FileNotFoundError(f"{cache_dir!r} has no {_MANIFEST}: not a rephrase_corpus cache")
    keep = None if styles is None else set(styles)
    return Corpus([_document(r) for r in records.values()
                   if keep is None or r["style"] in keep],
                  f"wrap:{os.path.basename(os.path.normpath(cache_dir))}")


def make_wrap_lm_dataset(real, synthetic, tokenizer, seq_len: int, batch_size: int, *,
                         synthetic_fraction: float = 0.5, steps: int, seed: int,
                         num_packing_bins: int = 64, shard=None):
    """Packed LM batches mixing real and synthetic rows at ``synthetic_fraction`` (WRAP's 1:1 is
    0.5), for ``steps`` batches.

    ``w = (1 - f, f)`` over (real, synthetic) as a :func:`jaxeff.data.constant_mixture` with
    ``total = steps * batch_size`` and ``block_size = batch_size``, fed to
    :func:`jaxeff.data.make_mixture_lm_dataset` (each stream shuffled, encoded and packed
    separately, so a row is all real or all synthetic and the share is the token share up to
    padding). A stream with weight 0 is left out (``f = 0`` needs no synthetic corpus, so the
    real-only baseline runs through the same code; its real rows are the same stream).

    Raises:
      ValueError: ``synthetic_fraction`` outside [0, 1], an empty stream that has weight, bad
        sizes (as :func:`jaxeff.data.make_mixture_lm_dataset`).
    """
    f = check_fraction("synthetic_fraction", synthetic_fraction)
    steps = check_int("steps", steps, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    pairs = [(c, w) for c, w in ((real, 1.0 - f), (synthetic, f)) if w > 0]
    schedule = constant_mixture([w for _, w in pairs], total=steps * batch_size,
                                block_size=batch_size, seed=seed)
    return make_mixture_lm_dataset([c for c, _ in pairs], tokenizer, seq_len, batch_size,
                                   schedule, seed=seed, num_packing_bins=num_packing_bins,
                                   shard=shard)
