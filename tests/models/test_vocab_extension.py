"""Vocabulary extension: appended BPE merges (``extend_bpe``), embedding rows
(``jaxeff.params.extend_embedding`` / ``mean_rows`` / ``random_rows``) and contextualized weight
distillation (``distill_new_rows``), on a tiny BPE and a tiny random tied llama."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.data import BPETokenizer
from jaxeff.models import (HFTokenizer, VocabExtension, distill_new_rows, distillation_objective,
                           distillation_samples, extend_bpe, llama)
from jaxeff.params import extend_embedding, mean_rows, random_rows

CODE = ["def add(self, value):\n    return self.value + value\n",
        "def sub(self, value):\n    return self.value - value\n",
        "class Counter(object):\n    def __init__(self):\n        self.value = 0\n",
        "for item in items:\n    if item is None:\n        continue\n    self.value += item\n"]
TEXTS = CODE * 6


@pytest.fixture(scope="module")
def tok():
    bpe = BPETokenizer.train(["the quick brown fox jumps over the lazy dog " * 3, "hello world"],
                             vocab_size=280)
    return HFTokenizer(bpe._tok, bos_id=bpe.bos_id,
                       eos_id=bpe.eos_id, pad_id=bpe.pad_id)


@pytest.fixture(scope="module")
def ext(tok):
    return extend_bpe(tok, TEXTS, 12)


def test_old_ids_unchanged_and_new_ids_appended(tok, ext):
    V = tok.vocab_size
    assert ext.old_vocab_size == V and ext.tokenizer.vocab_size == V + 12 and ext.n_new == 12
    for i in range(V):
        assert ext.tokenizer.backend.id_to_token(i) == tok.backend.id_to_token(i)
    new = ext.tokenizer.encode("".join(CODE))
    assert (new >= V).any() and new.size < tok.encode("".join(CODE)).size
    # a text without any new pair encodes exactly as before
    assert np.array_equal(ext.tokenizer.encode("zq xv"), tok.encode("zq xv"))
    # merge counts are the tokens each merge saved; the first is the most frequent pair
    assert list(ext.saved) == sorted(ext.saved, reverse=True)[:1] + list(ext.saved[1:])
    assert ext.saved[0] == max(ext.saved)


def test_decode_round_trip_and_expand_is_old_encoding(tok, ext):
    for text in CODE + ["unseen: def self.value  += 3\n\tcontinue", "é ü 東京"]:
        ids = ext.tokenizer.encode(text)
        assert ext.tokenizer.decode(ids) == text
        assert np.array_equal(ext.expand(ids), tok.encode(text))
    for k, t in enumerate(ext.tokens):
        assert ext.tokenizer.decode([ext.old_vocab_size + k]) == t
        assert tok.decode(list(ext.pieces[k])) == t
        assert np.array_equal(ext.tokenizer.encode(t), [ext.old_vocab_size + k]) or \
            len(ext.tokenizer.encode(t)) < len(tok.encode(t))


def test_extend_bpe_bad_inputs(tok):
    with pytest.raises(TypeError, match="tokenizer"):
        extend_bpe("gpt2", TEXTS, 4)
    with pytest.raises(TypeError, match="texts"):
        extend_bpe(tok, "one string", 4)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        extend_bpe(tok, ["a b", 3], 4)
    with pytest.raises(ValueError, match="n_new"):
        extend_bpe(tok, TEXTS, 0)
    with pytest.raises(ValueError, match="only"):
        extend_bpe(tok, ["ab"], 5)


@pytest.fixture(scope="module")
def model(tok):
    cfg = llama.LlamaConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2,
                            n_kv_heads=1, d_ff=64, max_seq_len=64, tie_embeddings=True)
    params = llama.init_params(jax.random.key(0), cfg)
    params["embed"] = params["embed"] * 20.0       # a non-trivial teacher
    return cfg, params


def test_samples_align_teacher_and_student(ext):
    s = distillation_samples(ext, TEXTS, seq_len=10, n_samples=6, seed=0)
    V = ext.old_vocab_size
    for b in range(6):
        st, n = s.student_ids[b], s.teacher_segments[b].sum()
        t = ext.expand(st)
        np.testing.assert_array_equal(s.teacher_ids[b, :n], t)
        # student token j's text ends where teacher token align[j] ends
        for j in range(st.size):
            assert ext.tokenizer.decode(st[:j + 1]) == ext.tokenizer.decode(t[:s.align[b, j] + 1])
        first = int(np.argmax(st >= V))
        assert s.mask[b, :first].sum() == 0 and s.mask[b, first:].all()


def test_distillation_reduces_objective_and_only_new_rows_move(tok, ext, model):
    cfg, params = model
    samples = distillation_samples(ext, TEXTS, seq_len=12, n_samples=4, seed=1)
    start = mean_rows(params["embed"], ext.pieces)
    j0, h0, k0 = distillation_objective(params, cfg, ext, start, samples)
    res = distill_new_rows(params, cfg, ext, start, samples, steps=12, batch_size=4,
                           learning_rate=3e-2)
    j1, h1, k1 = distillation_objective(params, cfg, ext, res.rows, samples)
    assert j0 > 0 and j1 < 0.7 * j0, (j0, j1)
    assert res.objective[0] == pytest.approx(j0, rel=1e-4)
    assert res.rows.shape == start.shape
    # only rows of new tokens that occur in the contexts moved
    present = np.unique(samples.student_ids[samples.student_ids >= ext.old_vocab_size])
    moved = np.flatnonzero(np.abs(np.asarray(res.rows - start)).max(1) > 0) + ext.old_vocab_size
    assert set(moved) <= set(present) and len(moved) > 0
    # the extended model on old ids is the old model
    ext_params = extend_embedding(params, res.rows)
    ids = jnp.asarray(tok.encode("the lazy dog"))[None]
    np.testing.assert_allclose(
        llama.forward(ext_params, ids, cfg.replace(vocab_size=ext.tokenizer.vocab_size))[..., :cfg.vocab_size],
        llama.forward(params, ids, cfg), atol=1e-5)


def test_distill_bad_inputs(ext, model):
    cfg, params = model
    samples = distillation_samples(ext, TEXTS, seq_len=8, n_samples=2)
    rows = mean_rows(params["embed"], ext.pieces)
    with pytest.raises(ValueError, match="rows_NxD"):
        distill_new_rows(params, cfg, ext, rows[:3], samples, steps=1)
    with pytest.raises(ValueError, match="tie_embeddings"):
        distill_new_rows(params, cfg.replace(tie_embeddings=False), ext, rows, samples, steps=1)
    with pytest.raises(ValueError, match="batch_size"):
        distill_new_rows(params, cfg, ext, rows, samples, steps=1, batch_size=3)
    with pytest.raises(ValueError, match="both 0"):
        distill_new_rows(params, cfg, ext, rows, samples, steps=1, batch_size=2, hidden_weight=0,
                         kl_weight=0)
    with pytest.raises(ValueError, match="old_vocab_size"):
        distill_new_rows(extend_embedding(params, rows), cfg, ext, rows, samples, steps=1)
    with pytest.raises(TypeError, match="samples"):
        distill_new_rows(params, cfg, ext, rows, samples._asdict(), steps=1)
    with pytest.raises(TypeError, match="extension"):
        distillation_samples("ext", TEXTS, seq_len=8, n_samples=2)
    with pytest.raises(ValueError, match="no text"):
        distillation_samples(ext, ["zq"], seq_len=8, n_samples=2)


def test_truncate_equals_a_shorter_extension(tok, ext):
    short, direct = ext.truncate(5), extend_bpe(tok, TEXTS, 5)
    assert short.tokens == direct.tokens and short.pieces == direct.pieces
    assert short.tokenizer.vocab_size == tok.vocab_size + 5
    text = "".join(CODE)
    np.testing.assert_array_equal(short.tokenizer.encode(text), direct.tokenizer.encode(text))
    with pytest.raises(ValueError, match="n must be"):
        ext.truncate(13)
