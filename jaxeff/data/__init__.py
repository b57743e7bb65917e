"""Data: corpora, tokenizers, loaders and Grain pipeline stages, flat over private modules.

Example::

    from jaxeff import data
    ds = data.make_lm_dataset([data.Document("hello world")], data.ByteTokenizer(), seq_len=8,
                              batch_size=2, seed=0)

* documents and corpora (the Python stdlib corpus, text and JSONL loaders): ``as_document``
  (a Document from a str or a plain ``{"text": ...}`` dict), ``Corpus``,
  ``corpus_fingerprint``, ``Document``, ``load_jsonl``, ``load_stdlib_corpus``,
  ``load_text_files``, ``split_corpus``, ``SPLITS``, ``stdlib_files``.
* larger local corpora (installed packages' sources, deduplicated; English text files; the
  shared tinyshakespeare) and a locally trained BPE: ``find_shared_data``,
  ``load_site_packages_corpus``, ``load_text_file_corpus``, ``load_tinyshakespeare``,
  ``site_packages_files``, ``TINYSHAKESPEARE_SHA256``, ``train_bpe_tokenizer``.
* exact and near-duplicate removal: ``exact_duplicates``, ``kmeans``, ``lsh_params``,
  ``minhash_signatures``, ``near_duplicates``, ``semantic_duplicates``, ``shingle_hashes``.
* epoch accounting and the repetition warning: ``check_repetition``, ``CountingIterator``,
  ``EpochCounter``, ``EpochReport``, ``RepeatedDataWarning``, ``repetition_report``,
  ``unique_target_tokens``.
* MeCo metadata conditioning (Gao et al. 2025): ``conditioned_eval_batches``, ``DEFAULT_TEMPLATE``,
  ``make_meco_dataset``, ``meco_prompt``, ``meco_switch_step``, ``MetadataPrefix``, ``url_domain``.
* domain mixtures and upsampling at the end: ``check_fraction``, ``check_weights``,
  ``constant_mixture``, ``make_mixture_lm_dataset``, ``mix_map_datasets``, ``MixtureSchedule``,
  ``PhaseMap``, ``SelectIterDataset``, ``size_weights``, ``upsample_at_end``.
* multigrid batch and sequence-length schedules: ``LR_SCALINGS``, ``make_multigrid_dataset``,
  ``MultigridSchedule``, ``Stage``.
* UL2 / span corruption / prefix LM objectives: ``BYTE_UL2_MODE_IDS``, ``BYTE_UL2_SENTINELS``,
  ``decoder_only``, ``Denoiser``, ``make_ul2_dataset``, ``max_chunk_len``, ``mlm_mask``,
  ``MLMTransform``, ``prefix_lm_split``, ``random_spans_noise_mask``, ``span_corrupt``,
  ``span_reconstruct``, ``ul2_denoisers``, ``ul2_example``, ``UL2Transform``.
* the Grain pipeline from documents to packed LM batches: ``BATCH_KEYS``, ``EncodeDocument``,
  ``fill_rate``, ``LONG_DOCS``, ``make_eval_batches``, ``make_lm_dataset``, ``pack_lm``,
  ``PACKINGS``.
* prepacking prompts for one prefill pass (Zhao et al. 2024): ``pack_prompts``,
  ``PackedPrompts``, ``PROMPT_PACKINGS``.
* WRAP rephrasing (Maini et al. 2024): ``ChatRephraser``, ``load_rephrased``,
  ``make_wrap_lm_dataset``, ``rephrase_corpus``, ``WRAP_STYLES``, ``wrap_prompt``.
* curriculum by difficulty with a pacing function (BIOptimus 2023; Platanios et al. 2019):
  ``curriculum_dataset``, ``CurriculumMap``, ``linear_pacing``, ``make_curriculum_lm_dataset``,
  ``Pacing``, ``root_pacing``, ``step_pacing``.
* data selection: ``apply_selection``, ``cached_scores``, ``hashed_ngram_features``, ``LogReg``,
  ``logreg_scores``, ``loss_scores``, ``moment_matching_scores``, ``predictive_strength``,
  ``preselect_labels``, ``select_top``, ``Selection``, ``train_logreg``.
* byte and BPE tokenizers: ``BPETokenizer``, ``BYTE_BOS_ID``, ``BYTE_EOS_ID``, ``BYTE_PAD_ID``,
  ``BYTE_VOCAB_SIZE``, ``ByteTokenizer``, ``Tokenizer``, ``validate_tokenizer`` (with the
  model's ``vocab_size``: raises when the model cannot embed every id; ByteTokenizer needs 264),
  ``with_specials`` (the one BOS/EOS assembly).
"""
from jaxeff.data._corpus import (as_document, Corpus, corpus_fingerprint, Document, load_jsonl,
                                 load_stdlib_corpus, load_text_files, split_corpus, SPLITS,
                                 stdlib_files)
from jaxeff.data._corpora import (find_shared_data, load_site_packages_corpus,
                                  load_text_file_corpus, load_tinyshakespeare, site_packages_files,
                                  TINYSHAKESPEARE_SHA256, train_bpe_tokenizer)
from jaxeff.data._curriculum import (curriculum_dataset, CurriculumMap, linear_pacing,
                                     make_curriculum_lm_dataset, Pacing, root_pacing,
                                     step_pacing)
from jaxeff.data._dedup import (exact_duplicates, kmeans, lsh_params, minhash_signatures,
                                near_duplicates, semantic_duplicates, shingle_hashes)
from jaxeff.data._epochs import (check_repetition, CountingIterator, EpochCounter, EpochReport,
                                 RepeatedDataWarning, repetition_report, unique_target_tokens)
from jaxeff.data._meco import (conditioned_eval_batches, DEFAULT_TEMPLATE, make_meco_dataset,
                               meco_prompt, meco_switch_step, MetadataPrefix, url_domain)
from jaxeff._checks import check_fraction
from jaxeff.data._mixture import (check_weights, constant_mixture,
                                  make_mixture_lm_dataset, mix_map_datasets, MixtureSchedule,
                                  PhaseMap, SelectIterDataset, size_weights, upsample_at_end)
from jaxeff.data._multigrid import LR_SCALINGS, make_multigrid_dataset, MultigridSchedule, Stage
from jaxeff.data._objectives import (BYTE_UL2_MODE_IDS, BYTE_UL2_SENTINELS, decoder_only, Denoiser,
                                     make_ul2_dataset, max_chunk_len, mlm_mask, MLMTransform,
                                     prefix_lm_split, random_spans_noise_mask, span_corrupt,
                                     span_reconstruct, ul2_denoisers, ul2_example, UL2Transform)
from jaxeff.data._pipeline import (BATCH_KEYS, EncodeDocument, fill_rate, LONG_DOCS,
                                   make_eval_batches, make_lm_dataset, pack_lm, PACKINGS)
from jaxeff.data._prepack import pack_prompts, PackedPrompts, PROMPT_PACKINGS
from jaxeff.data._rephrase import (ChatRephraser, load_rephrased, make_wrap_lm_dataset,
                                   rephrase_corpus, WRAP_STYLES, wrap_prompt)
from jaxeff.data._selection import (apply_selection, cached_scores, hashed_ngram_features, LogReg,
                                    logreg_scores, loss_scores, moment_matching_scores,
                                    predictive_strength, preselect_labels, select_top, Selection,
                                    train_logreg)
from jaxeff.data._tokenizer import (BPETokenizer, BYTE_BOS_ID, BYTE_EOS_ID, BYTE_PAD_ID,
                                    BYTE_VOCAB_SIZE, ByteTokenizer, Tokenizer, validate_tokenizer,
                                    with_specials)

__all__ = [
    "as_document", "Corpus", "corpus_fingerprint", "Document", "load_jsonl", "load_stdlib_corpus",
    "load_text_files", "split_corpus", "SPLITS", "stdlib_files", "find_shared_data",
    "load_site_packages_corpus", "load_text_file_corpus", "load_tinyshakespeare",
    "site_packages_files", "TINYSHAKESPEARE_SHA256", "train_bpe_tokenizer", "exact_duplicates",
    "kmeans",
    "lsh_params", "minhash_signatures", "near_duplicates", "semantic_duplicates",
    "shingle_hashes", "check_repetition", "CountingIterator", "EpochCounter", "EpochReport",
    "RepeatedDataWarning", "repetition_report", "unique_target_tokens",
    "conditioned_eval_batches", "DEFAULT_TEMPLATE", "make_meco_dataset", "meco_prompt",
    "meco_switch_step", "MetadataPrefix", "url_domain", "check_fraction", "check_weights",
    "constant_mixture", "make_mixture_lm_dataset", "mix_map_datasets", "MixtureSchedule",
    "PhaseMap", "SelectIterDataset", "size_weights", "upsample_at_end", "LR_SCALINGS",
    "make_multigrid_dataset", "MultigridSchedule", "Stage", "BYTE_UL2_MODE_IDS",
    "BYTE_UL2_SENTINELS", "decoder_only", "Denoiser", "make_ul2_dataset", "max_chunk_len",
    "mlm_mask", "MLMTransform", "prefix_lm_split", "random_spans_noise_mask", "span_corrupt",
    "span_reconstruct", "ul2_denoisers", "ul2_example", "UL2Transform", "BATCH_KEYS",
    "EncodeDocument", "fill_rate", "LONG_DOCS", "make_eval_batches", "make_lm_dataset",
    "pack_lm", "PACKINGS", "pack_prompts", "PackedPrompts", "PROMPT_PACKINGS",
    "pack_lm", "PACKINGS", "ChatRephraser", "load_rephrased", "make_wrap_lm_dataset",
    "rephrase_corpus", "WRAP_STYLES", "wrap_prompt", "curriculum_dataset", "CurriculumMap",
    "linear_pacing", "make_curriculum_lm_dataset", "Pacing", "root_pacing", "step_pacing",
    "apply_selection", "cached_scores", "hashed_ngram_features",
    "LogReg", "logreg_scores", "loss_scores", "moment_matching_scores", "predictive_strength",
    "preselect_labels", "select_top", "Selection", "train_logreg", "BPETokenizer",
    "BYTE_BOS_ID", "BYTE_EOS_ID", "BYTE_PAD_ID", "BYTE_VOCAB_SIZE", "ByteTokenizer",
    "Tokenizer", "validate_tokenizer", "with_specials",
]
