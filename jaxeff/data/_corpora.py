"""Larger local corpora for studies: the installed Python packages' sources and English text.

Neither downloads anything. Both are deterministic (sorted file order; the hash split of
:func:`jaxeff.data.split_corpus`) and carry a ``meta['id']``, a ``'domain'`` and provenance.

* :func:`load_site_packages_corpus`: every ``*.py`` file under the running interpreter's
  ``site-packages`` (``sysconfig.get_paths()['purelib']``; about 7,400 files / 117 MB in this
  project's environment), in sorted path order, without ``__pycache__`` and test directories
  (``test``, ``tests``, ``testing``), files over ``max_file_bytes`` (generated tables) and empty
  files. Meta: ``id`` = ``path`` (relative to the root), ``package`` and ``version`` of the
  distribution whose ``RECORD`` lists the file (``importlib.metadata``; ``'unknown'`` / ``None``
  for files no distribution claims), ``module`` (dotted path, as the stdlib corpus), ``domain`` =
  ``package``. Duplicates are removed before the
  split: exact ones (:func:`jaxeff.data.exact_duplicates`, whitespace-normalised), then near
  ones (:func:`jaxeff.data.near_duplicates`, MinHash-LSH over the leading ``dedup_bytes`` of
  each file, estimated Jaccard >= ``dedup_threshold``); the first file (in path order) of each
  duplicate group stays.
* :func:`load_text_file_corpus`: one plain-text file cut into documents at blank-line
  paragraph boundaries (chunks of about ``chunk_chars``), ids ``'<name>:<chunk index>'``, with
  an optional sha256 check. :func:`load_tinyshakespeare` is that for the shared
  ``tinyshakespeare.txt`` (sha256 :data:`TINYSHAKESPEARE_SHA256`), found by
  :func:`find_shared_data`.
* :func:`train_bpe_tokenizer`: a byte-level BPE (:class:`jaxeff.data.BPETokenizer`, HF
  ``tokenizers``) trained on a corpus' training split, deterministic for a given corpus.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from typing import Optional

from jaxeff._checks import check_fraction, check_int
from jaxeff.data._corpus import Corpus, Document, split_corpus

__all__ = ["load_site_packages_corpus", "site_packages_files", "load_text_file_corpus",
           "load_tinyshakespeare", "find_shared_data", "train_bpe_tokenizer",
           "TINYSHAKESPEARE_SHA256"]

TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
_SKIP_DIRS = frozenset({"__pycache__", "test", "tests", "testing"})


def site_packages_files(root: Optional[str] = None, *,
                        max_file_bytes: int = 1_000_000) -> list[str]:
    """Sorted '/'-separated paths (relative to ``root``) of the ``*.py`` files the site-packages
    corpus reads (module docstring for the exclusions).

    Raises:
      FileNotFoundError: ``root`` is not a directory.
    """
    root = root or sysconfig.get_paths()["purelib"]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"site-packages directory not found: root={root!r}")
    max_file_bytes = check_int("max_file_bytes", max_file_bytes, 1)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        rel_dir = os.path.relpath(dirpath, root)
        parts = () if rel_dir == "." else tuple(rel_dir.split(os.sep))
        for f in filenames:
            if f.endswith(".py") and os.path.getsize(os.path.join(dirpath, f)) <= max_file_bytes:
                out.append("/".join(parts + (f,)))
    return sorted(out)


def _owners(root: str) -> dict:
    """``{relative path: (package, version)}`` from the RECORD of every distribution in root."""
    from importlib import metadata  # pylint: disable=import-outside-toplevel
    owners = {}
    dists = sorted(metadata.distributions(path=[root]),
                   key=lambda d: ((d.metadata["Name"] or "").lower(), d.version or ""))
    for dist in dists:
        name = dist.metadata["Name"] or "unknown"
        for f in dist.files or ():
            rel = str(f).replace(os.sep, "/")
            owners.setdefault(rel, (name, dist.version))
    return owners


@functools.lru_cache(maxsize=4)
def _read_site_packages(root: str, max_file_bytes: int, dedup_threshold: float,
                        dedup_bytes: int) -> tuple[tuple, dict]:
    from jaxeff.data._dedup import exact_duplicates, near_duplicates
    owners = _owners(root)
    docs = []
    for rel in site_packages_files(root, max_file_bytes=max_file_bytes):
        with open(os.path.join(root, rel), "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        if not text.strip():
            continue
        package, version = owners.get(rel, ("unknown", None))
        parts = rel[:-3].split("/")
        module = ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)
        docs.append(Document(text, {"id": rel, "path": rel, "module": module,
                                    "package": package, "version": version,
                                    "domain": package}))
    stats = {"files": len(docs), "bytes": sum(len(d.text.encode("utf-8")) for d in docs)}
    if not docs:
        return (), stats
    exact = exact_duplicates(docs)
    docs = [docs[i] for i in exact.kept]
    stats["exact_duplicates"] = int(len(exact.dropped))
    if dedup_threshold < 1.0 and len(docs) > 1:
        near, _ = near_duplicates(docs, threshold=dedup_threshold, num_perm=64,
                                  max_bytes=dedup_bytes)
        docs = [docs[i] for i in near.kept]
        stats["near_duplicates"] = int(len(near.dropped))
    else:
        stats["near_duplicates"] = 0
    stats["kept"] = len(docs)
    stats["kept_bytes"] = sum(len(d.text.encode("utf-8")) for d in docs)
    return tuple(docs), stats


def load_site_packages_corpus(split: str = "train", val_fraction: float = 0.05, *,
                              root: Optional[str] = None, max_file_bytes: int = 1_000_000,
                              dedup_threshold: float = 0.8, dedup_bytes: int = 8192) -> Corpus:
    """The installed packages' Python sources as a corpus, deduplicated (module docstring).

    The read and dedup (20 s of CPU here: 6,312 files, 98.6 MB read; 138 exact and 362 near
    duplicates dropped, 5,812 files, 94.5 MB kept) are cached per process. The
    corpus name records the document count (``site-packages-<n>``); ``corpus.stats`` holds
    the file, byte and duplicate counts.

    Args:
      split: ``'train'`` (default), ``'validation'`` or ``'all'``.
      val_fraction: validation fraction in [0, 1) (default 0.05).
      root: the site-packages directory (default the running interpreter's purelib).
      max_file_bytes: skip larger files (default 1,000,000).
      dedup_threshold: near-duplicate estimated-Jaccard threshold in [0, 1]; 1.0 turns the
        near-duplicate pass off (default 0.8, that of :func:`jaxeff.data.near_duplicates`).
      dedup_bytes: leading bytes of each file that the MinHash sees (default 8192).

    Raises:
      FileNotFoundError: ``root`` does not exist.
      ValueError: no ``.py`` file under ``root``; bad split, fraction or sizes.
    """
    root = os.path.abspath(root or sysconfig.get_paths()["purelib"])
    dedup_threshold = check_fraction("dedup_threshold", dedup_threshold)
    dedup_bytes = check_int("dedup_bytes", dedup_bytes, 1)
    docs, stats = _read_site_packages(root, check_int("max_file_bytes", max_file_bytes, 1),
                                      dedup_threshold, dedup_bytes)
    if not docs:
        raise ValueError(f"no non-empty .py files under root={root!r}")
    corpus = split_corpus(Corpus(docs, f"site-packages-{len(docs)}"), split, val_fraction)
    corpus.stats = dict(stats, root=root)
    return corpus


def load_text_file_corpus(path, *, chunk_chars: int = 4096, sha256: Optional[str] = None,
                          name: Optional[str] = None, domain: str = "text",
                          split: str = "all", val_fraction: float = 0.05) -> Corpus:
    """One text file as a corpus of paragraph-aligned chunks.

    The text is cut at blank lines (``'\\n\\n'``) into chunks of at least ``chunk_chars``
    characters (a paragraph is never split; the last chunk may be shorter), so the hash split
    takes whole passages. Meta: ``id`` = ``'<name>:<index>'``, ``path``, ``domain``, ``chunk``.

    Args:
      path: the file (UTF-8).
      chunk_chars: target chunk size in characters (default 4096).
      sha256: expected hex sha256 of the file's bytes (default None: not checked).
      name: corpus name and id prefix (default the file's base name).
      domain: ``meta['domain']`` (default ``'text'``).
      split, val_fraction: as :func:`jaxeff.data.split_corpus` (default ``'all'``).

    Raises:
      FileNotFoundError: no such file.  ValueError: sha256 mismatch (both digests named), an
      undecodable or empty file, bad sizes.
    """
    path = os.fspath(path)
    chunk_chars = check_int("chunk_chars", chunk_chars, 1)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file not found: path={path!r}")
    with open(path, "rb") as f:
        raw = f.read()
    if sha256 is not None:
        got = hashlib.sha256(raw).hexdigest()
        if got != sha256.lower():
            raise ValueError(f"{path!r} has sha256 {got}, expected {sha256}: a different or "
                             "damaged file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"file {path!r} is not valid UTF-8 at byte {e.start}: {e.reason}") from e
    if not text.strip():
        raise ValueError(f"file {path!r} is empty")
    name = name or os.path.basename(path)
    chunks, cur = [], []
    size = 0
    for para in text.split("\n\n"):
        cur.append(para)
        size += len(para) + 2
        if size >= chunk_chars:
            chunks.append("\n\n".join(cur))
            cur, size = [], 0
    if cur and "".join(cur).strip():
        chunks.append("\n\n".join(cur))
    docs = [Document(c, {"id": f"{name}:{i}", "path": path, "domain": domain, "chunk": i})
            for i, c in enumerate(chunks)]
    return split_corpus(Corpus(docs, name), split, val_fraction)


def find_shared_data(filename: str, start: Optional[str] = None) -> Optional[str]:
    """Path of ``shared/data/<filename>`` in ``$JAXEFF_SHARED_DATA`` or next to the repository
    root or one of its ancestors (``../shared/data/``), or None when absent.

    Args: ``filename``; ``start`` (default: the directory above the ``jaxeff`` package)."""
    env = os.environ.get("JAXEFF_SHARED_DATA")
    if env and os.path.isfile(os.path.join(env, filename)):
        return os.path.join(env, filename)
    d = os.path.abspath(start or os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    for _ in range(4):
        cand = os.path.join(os.path.dirname(d), "shared", "data", filename)
        if os.path.isfile(cand):
            return cand
        d = os.path.dirname(d)
    return None


def load_tinyshakespeare(path: Optional[str] = None, *, split: str = "all",
                         val_fraction: float = 0.05, chunk_chars: int = 4096) -> Corpus:
    """``tinyshakespeare.txt`` (1,115,394 bytes of English plays) as paragraph-aligned chunks,
    its sha256 checked (:data:`TINYSHAKESPEARE_SHA256`).

    Args:
      path: the file (default :func:`find_shared_data`'s ``tinyshakespeare.txt``).
      split, val_fraction, chunk_chars: as :func:`load_text_file_corpus`.

    Raises:
      FileNotFoundError: the file is absent (the message says where it was looked for).
      ValueError: its sha256 differs.
    """
    if path is None:
        path = find_shared_data("tinyshakespeare.txt")
        if path is None:
            raise FileNotFoundError("tinyshakespeare.txt not found in $JAXEFF_SHARED_DATA or "
                                    "../shared/data/ above the repository root")
    return load_text_file_corpus(path, chunk_chars=chunk_chars, sha256=TINYSHAKESPEARE_SHA256,
                                 name="tinyshakespeare", domain="shakespeare", split=split,
                                 val_fraction=val_fraction)


def train_bpe_tokenizer(corpus, vocab_size: int = 4096, *, min_frequency: int = 2,
                        max_chars: Optional[int] = None):
    """A byte-level :class:`jaxeff.data.BPETokenizer` trained on ``corpus``'s documents in order
    (pass the training split), optionally on the first ``max_chars`` characters only.

    Raises: as :meth:`jaxeff.data.BPETokenizer.train`; ValueError for a bad ``max_chars``.
    """
    from jaxeff.data._tokenizer import BPETokenizer
    if max_chars is not None:
        max_chars = check_int("max_chars", max_chars, 1)

    def texts():
        left = max_chars
        for d in corpus:
            if left is not None:
                if left <= 0:
                    return
                yield d.text[:left]
                left -= len(d.text)
            else:
                yield d.text

    return BPETokenizer.train(texts(), vocab_size, min_frequency=min_frequency)
