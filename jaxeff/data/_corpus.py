"""Corpora: the embedded default (the Python standard library's own source) and user data.

A :class:`Corpus` is an immutable, list-like sequence of :class:`Document` (``text`` plus a
``meta`` dict). Every document's ``meta`` has an ``'id'`` (unique within the corpus; used for
the deterministic train/validation split) and a ``'domain'`` (a coarse source label, used as
URL-like metadata by MeCo, "Metadata Conditioning Accelerates Language Model Pre-training",
Gao et al., 2025, and by domain upsampling).

Default corpus, :func:`load_stdlib_corpus`: every ``*.py`` file under
``sysconfig.get_paths()['stdlib']`` in sorted path order, excluding tests (any ``test``,
``tests``, ``idle_test`` directory), ``site-packages``, ``__pycache__``, the generated
``encodings/`` codec tables, ``lib-dynload``, the ``config-*`` build directory and the
generated ``_sysconfigdata_*`` module (it holds machine-specific build paths). No download.
Meta: ``id`` = ``module`` = dotted module path (``'email.mime.text'``; a package's
``__init__.py`` is the package itself), ``domain`` = top-level package (``'email'``),
``path`` = path relative to the stdlib root, ``python_version`` = the running
interpreter's ``platform.python_version()`` (e.g. ``'3.11.7'``).

Split rule (all corpora): ``u = int(sha1(id)[:8 bytes]) / 2**64``; a document is in
``'validation'`` iff ``u < val_fraction``. It depends only on the id, so it is stable across
machines and Python versions and adding documents never moves existing ones.

Fingerprint: ``sha256`` over, per document in order, ``json(meta) + sha256(text)``; runs record
it so results name the exact data (the stdlib corpus differs between Python versions).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import sysconfig
from typing import Any, Iterator, Mapping, Sequence

__all__ = ["Document", "Corpus", "load_stdlib_corpus", "corpus_fingerprint", "split_corpus",
           "load_text_files", "load_jsonl", "as_document", "stdlib_files", "SPLITS"]

SPLITS = ("train", "validation", "all")
_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__",
                            "lib-dynload"})


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: ``text`` and a ``meta`` dict (at least ``'id'`` and ``'domain'``)."""

    text: str
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def as_document(element, argname: str = "element", text_field: str = "text") -> Document:
    """A :class:`Document` from a Document, a ``str`` (empty meta) or a plain dict with a
    ``text_field`` key (the other keys become ``meta``, e.g. ``{"text": ..., "url": ...}``).

    Raises:
      TypeError: another type, or a non-str text.  ValueError: a dict without ``text_field``.
    """
    if isinstance(element, Document):
        return element
    if isinstance(element, str):
        return Document(element, {})
    if isinstance(element, Mapping):
        if text_field not in element:
            raise ValueError(f"{argname} is a dict without a {text_field!r} field (keys: "
                             f"{sorted(element)}); documents need their text under "
                             f"{text_field!r}")
        text = element[text_field]
        if not isinstance(text, str):
            raise TypeError(f"{argname}[{text_field!r}] must be a str; got "
                            f"{type(text).__name__}")
        return Document(text, {k: v for k, v in element.items() if k != text_field})
    raise TypeError(f"{argname} must be a Document, a str or a dict with a {text_field!r} "
                    f"field; got {type(element).__name__}")


class Corpus(Sequence[Document]):
    """An immutable sequence of :class:`Document` with a ``name``.

    Works as a Grain data source (``grain.MapDataset.source(corpus)``): ``len`` and integer
    indexing; slicing returns a ``Corpus``.

    Raises:
      TypeError: if an element is not a :class:`Document`.
    """

    def __init__(self, documents: Sequence[Document], name: str = "corpus"):
        docs = tuple(documents)
        for i, d in enumerate(docs):
            if not isinstance(d, Document):
                raise TypeError(f"documents[{i}] must be a jaxeff.data.Document; got "
                                f"{type(d).__name__}")
        self._docs = docs
        self.name = name

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Corpus(self._docs[index], self.name)
        return self._docs[index]

    def __iter__(self) -> Iterator[Document]:
        return iter(self._docs)

    @property
    def num_chars(self) -> int:
        """Total characters over all documents."""
        return sum(len(d.text) for d in self._docs)

    def __repr__(self) -> str:
        return f"Corpus(name={self.name!r}, num_documents={len(self)})"


def _unit_hash(key: str) -> float:
    """``int(sha1(key)[:8]) / 2**64`` in [0, 1): the deterministic split coordinate."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_corpus(corpus: Corpus, split: str = "train", val_fraction: float = 0.05) -> Corpus:
    """Deterministic train/validation split by a hash of each document's ``meta['id']``.

    Rule: validation iff ``int(sha1(id)[:8]) / 2**64 < val_fraction``; the two splits are
    disjoint and together give the whole corpus, in the original order.

    Args:
      corpus: a :class:`Corpus` whose documents all carry ``meta['id']``.
      split: ``'train'``, ``'validation'`` or ``'all'`` (default ``'train'``).
      val_fraction: expected validation fraction in [0, 1) (default 0.05).

    Raises:
      ValueError: bad ``split`` / ``val_fraction``, or a document without ``meta['id']``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be a float in [0, 1); got {val_fraction!r}")
    if split == "all":
        return corpus
    keep = []
    for i, d in enumerate(corpus):
        if "id" not in d.meta:
            raise ValueError(f"document {i} of corpus {corpus.name!r} has no meta['id'], "
                             "which the split needs")
        if (_unit_hash(str(d.meta["id"])) < val_fraction) == (split == "validation"):
            keep.append(d)
    return Corpus(keep, f"{corpus.name}:{split}")


def corpus_fingerprint(corpus: Sequence[Document]) -> str:
    """Hex sha256 identifying the corpus content and metadata, in order.

    ``sha256(concat_i(json(meta_i, sorted keys) + '\\0' + sha256(text_i) + '\\n'))``.

    Raises:
      TypeError: if an element is not a :class:`Document` or its meta is not JSON-serializable.
    """
    h = hashlib.sha256()
    for i, d in enumerate(corpus):
        if not isinstance(d, Document):
            raise TypeError(f"corpus[{i}] must be a Document; got {type(d).__name__}")
        try:
            meta = json.dumps(dict(d.meta), sort_keys=True, default=str)
        except TypeError as e:
            raise TypeError(f"corpus[{i}].meta is not JSON-serializable: {e}") from e
        h.update(meta.encode("utf-8"))
        h.update(b"\0")
        h.update(hashlib.sha256(d.text.encode("utf-8", errors="surrogatepass")).digest())
        h.update(b"\n")
    return h.hexdigest()


def _excluded(rel_parts: tuple[str, ...]) -> bool:
    dirs = rel_parts[:-1]
    if any(p in _EXCLUDED_DIRS or p.startswith("config-") for p in dirs):
        return True
    if dirs and dirs[0] == "encodings":
        return True
    return rel_parts[-1].startswith("_sysconfigdata_")


def stdlib_files(root: str | None = None) -> list[str]:
    """Sorted relative paths ('/'-separated) of the stdlib source files in the default corpus.

    Args:
      root: stdlib directory (default ``sysconfig.get_paths()['stdlib']``).

    Raises:
      FileNotFoundError: if ``root`` is not a directory.
    """
    root = root or sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"stdlib directory not found: {root!r}")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        parts = () if rel_dir == "." else tuple(rel_dir.split(os.sep))
        # Prune excluded directories early (site-packages can be huge).
        dirnames[:] = [n for n in dirnames if not _excluded(parts + (n, "x"))]
        for f in filenames:
            if f.endswith(".py") and not _excluded(parts + (f,)):
                out.append("/".join(parts + (f,)))
    return sorted(out)


def _module_name(rel: str) -> str:
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


@functools.lru_cache(maxsize=4)
def _read_stdlib(root: str) -> tuple[Document, ...]:
    version = platform.python_version()
    docs = []
    for rel in stdlib_files(root):
        with open(os.path.join(root, rel), "rb") as f:
            raw = f.read()
        # All non-test stdlib files are UTF-8 (PEP 3120); 'replace' guards odd installs.
        text = raw.decode("utf-8", errors="replace")
        if not text.strip():
            continue  # empty __init__.py files carry no text
        module = _module_name(rel)
        docs.append(Document(text, {"id": module, "module": module,
                                    "domain": module.split(".")[0], "path": rel,
                                    "python_version": version}))
    return tuple(docs)


def load_stdlib_corpus(split: str = "train", val_fraction: float = 0.05, *,
                       root: str | None = None) -> Corpus:
    """The default corpus: the Python standard library's own source files (no download).

    See the module docstring for what is excluded, the metadata and the split rule. The read
    (~730 files, ~11 MB on CPython 3.11) is cached per process, so repeated calls are free.

    Args:
      split: ``'train'`` (default), ``'validation'`` or ``'all'``.
      val_fraction: validation fraction in [0, 1) (default 0.05).
      root: stdlib directory (default ``sysconfig.get_paths()['stdlib']``).

    Raises:
      ValueError: bad ``split`` / ``val_fraction``, or no files found under ``root``.
      FileNotFoundError: ``root`` does not exist.
    """
    root = os.path.abspath(root or sysconfig.get_paths()["stdlib"])
    docs = _read_stdlib(root)
    if not docs:
        raise ValueError(f"no stdlib source files found under root={root!r}")
    corpus = Corpus(docs, f"stdlib-{platform.python_version()}")
    return split_corpus(corpus, split, val_fraction)


# ------------------------------------------------------------------------------------------
# User data: text files and JSONL.
# ------------------------------------------------------------------------------------------

_GLOB_CHARS = frozenset("*?[")


def _expand_paths(paths, pattern: str) -> list[str]:
    import glob  # pylint: disable=import-outside-toplevel

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not isinstance(paths, Sequence) or isinstance(paths, bytes):
        raise TypeError(f"paths must be a path, a glob string or a list of them; got "
                        f"{type(paths).__name__}")
    if len(paths) == 0:
        raise ValueError("paths is empty; give at least one file, directory or glob")
    files = []
    for p in paths:
        p = os.fspath(p)
        if any(c in _GLOB_CHARS for c in p):
            matches = sorted(m for m in glob.glob(p, recursive=True) if os.path.isfile(m))
            if not matches:
                raise FileNotFoundError(f"glob {p!r} matched no files")
            files.extend(matches)
        elif os.path.isdir(p):
            matches = sorted(m for m in glob.glob(os.path.join(p, pattern), recursive=True)
                             if os.path.isfile(m))
            if not matches:
                raise FileNotFoundError(f"directory {p!r} has no files matching pattern "
                                        f"{pattern!r}")
            files.extend(matches)
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"path {p!r} does not exist")
    return files


def load_text_files(paths, *, pattern: str = "**/*.txt", encoding: str = "utf-8",
                    name: str = "text-files", skip_empty: bool = True) -> Corpus:
    """Load plain-text files as a corpus, one document per file, in sorted order per entry.

    Meta: ``id`` = ``path`` = the file path as found, ``domain`` = its parent directory name.

    Args:
      paths: a file, a directory (files matching ``pattern`` below it), a glob string
        (``'data/**/*.md'``; ``**`` recurses), or a list of these.
      pattern: glob used inside directories (default ``'**/*.txt'``).
      encoding: text encoding (default ``'utf-8'``).
      name: corpus name (default ``'text-files'``).
      skip_empty: drop files that are empty or whitespace only (default True).

    Raises:
      FileNotFoundError: a path does not exist or a glob/directory matches no file (names it).
      ValueError: a file cannot be decoded (names the file and byte offset), or the corpus is
        empty after dropping empty files.
      TypeError: ``paths`` of the wrong type.
    """
    docs = []
    for f in _expand_paths(paths, pattern):
        try:
            with open(f, encoding=encoding) as fh:
                text = fh.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"file {f!r} is not valid {encoding} at byte {e.start}: {e.reason}"
                             ) from e
        if skip_empty and not text.strip():
            continue
        docs.append(Document(text, {"id": f, "path": f,
                                    "domain": os.path.basename(os.path.dirname(
                                        os.path.abspath(f)))}))
    if not docs:
        raise ValueError(f"empty corpus: the files under paths={paths!r} are all empty")
    return Corpus(docs, name)


def _lines(fh, path):
    """``(line number, bytes)`` of a (possibly gzip) binary file; a damaged or fake ``.gz``
    raises ``ValueError`` naming the path and the line reached."""
    import gzip  # pylint: disable=import-outside-toplevel
    import zlib  # pylint: disable=import-outside-toplevel
    lineno = 0
    it = iter(fh)
    while True:
        try:
            raw = next(it)
        except StopIteration:
            return
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise ValueError(f"{path}:{lineno + 1}: cannot decompress ({type(e).__name__}: {e}); "
                             f"the file ends in .gz but is not (or no longer) a valid gzip "
                             f"file") from None
        lineno += 1
        yield lineno, raw


def load_jsonl(path, text_field: str = "text", meta_fields: Sequence[str] | None = None, *,
               id_field: str | None = None, name: str | None = None) -> Corpus:
    """Load a JSON-lines file (``.jsonl`` or ``.jsonl.gz``): one JSON object per document.

    Meta: the chosen ``meta_fields`` (all non-text fields when ``None``), plus
    ``id`` (``record[id_field]`` if given, else a kept ``'id'`` field, else
    ``'<file name>:<line>'``) and ``domain``
    (kept if a field of that name is included, else the file's stem). Blank lines are skipped.

    Args:
      path: the file.
      text_field: field holding the text (default ``'text'``); must be a string.
      meta_fields: fields copied into ``meta`` (default ``None`` = every field except the
        text); when given, each listed field must be present in every record.
      id_field: field giving a stable document id for the split (default ``None``).
      name: corpus name (default: the file name).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: invalid JSON or UTF-8, a damaged or fake ``.gz``, a record that is not an
        object, or a missing text / meta / id field (each names the path and line); the file
        has no records.
      TypeError: the text field is not a string (names path, line and field).
    """
    import gzip  # pylint: disable=import-outside-toplevel

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"JSONL path {path!r} does not exist or is not a file")
    if meta_fields is not None and (isinstance(meta_fields, str)
                                    or not all(isinstance(m, str) for m in meta_fields)):
        raise TypeError(f"meta_fields must be a list of field names or None; got {meta_fields!r}")
    stem = os.path.basename(path).split(".")[0]
    opener = gzip.open if path.endswith(".gz") else open
    docs = []
    with opener(path, "rb") as fh:
        for lineno, raw in _lines(fh, path):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: invalid UTF-8 at byte {e.start} of the line "
                                 f"({raw[max(0, e.start - 8):e.start + 8]!r}); JSONL must be "
                                 f"UTF-8 encoded") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            if text_field not in rec:
                raise ValueError(f"{where}: record has no text field {text_field!r} "
                                 f"(fields: {sorted(rec)}); set text_field=")
            text = rec[text_field]
            if not isinstance(text, str):
                raise TypeError(f"{where}: field {text_field!r} must be a string, got "
                                f"{type(text).__name__}")
            if meta_fields is None:
                meta = {k: v for k, v in rec.items() if k != text_field}
            else:
                missing = [k for k in meta_fields if k not in rec]
                if missing:
                    raise ValueError(f"{where}: record lacks meta field(s) {missing} "
                                     f"(fields: {sorted(rec)})")
                meta = {k: rec[k] for k in meta_fields}
            if id_field is not None:
                if id_field not in rec:
                    raise ValueError(f"{where}: record has no id field {id_field!r}")
                meta["id"] = str(rec[id_field])
            elif "id" in meta:
                meta["id"] = str(meta["id"])  # a record's own 'id' field (kept via meta_fields)
            else:
                meta["id"] = f"{os.path.basename(path)}:{lineno}"
            meta.setdefault("domain", stem)
            docs.append(Document(text, meta))
    if not docs:
        raise ValueError(f"empty corpus: {path!r} has no records")
    return Corpus(docs, name or os.path.basename(path))
