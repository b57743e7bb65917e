"""Data: the default corpus (Python stdlib source), tokenizers, user-data loaders and the
Grain pipeline from documents to packed LM batches.

Quick start::

    from jaxeff import data
    corpus = data.load_stdlib_corpus("train")
    tok = data.ByteTokenizer()
    ds = data.make_lm_dataset(corpus, tok, seq_len=256, batch_size=32, seed=0)
    it = iter(ds); batch = next(it)   # dict of [32, 256] numpy arrays
    evals = data.make_eval_batches(data.load_stdlib_corpus("validation"), tok, 256, 32)
"""
from jaxeff.data.corpus import (Corpus, Document, corpus_fingerprint, load_jsonl,
                                load_stdlib_corpus, load_text_files, split_corpus,
                                stdlib_files)
from jaxeff.data.pipeline import (BATCH_KEYS, EncodeDocument, fill_rate, make_eval_batches,
                                  make_lm_dataset, pack_lm)
from jaxeff.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, validate_tokenizer

__all__ = [
    "Corpus", "Document", "corpus_fingerprint", "load_jsonl", "load_stdlib_corpus",
    "load_text_files", "split_corpus", "stdlib_files",
    "BATCH_KEYS", "EncodeDocument", "fill_rate", "make_eval_batches", "make_lm_dataset",
    "pack_lm",
    "BPETokenizer", "ByteTokenizer", "Tokenizer", "validate_tokenizer",
]

# Technique modules, as submodules: ``data.meco``, ``data.mixture``, ``data.selection``,
# ``data.dedup``, ``data.objectives``, ``data.multigrid``, ``data.epochs``.
from jaxeff.data import dedup, meco, mixture, multigrid, objectives, selection  # noqa: E402

__all__ += ["dedup", "meco", "mixture", "multigrid", "objectives", "selection"]
