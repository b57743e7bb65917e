"""Tests for jaxeff.data.tokenizer."""
import importlib.util

import numpy as np
import pytest

from jaxeff.data import BPETokenizer, ByteTokenizer, Tokenizer, validate_tokenizer

SAMPLES = ["", "hello world", "def f(x):\n    return x  # ok\n", "héllo wörld ñ",
           "日本語のテキスト",
           "emoji 🤖🚀 and combining e\u0301", "tab\tnul\x00end", "\u00ff\u0100\U0010ffff"]


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert len(ids) == len(text.encode("utf-8"))
    assert ids.min(initial=0) >= 0 and ids.max(initial=0) < 256
    assert tok.decode(ids) == text


def test_byte_ids_and_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 264
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (256, 257, 258)
    assert tok.reserved_ids == (259, 260, 261, 262, 263)
    assert list(tok.encode("Aé")) == [65, 0xC3, 0xA9]
    # Special ids are dropped by decode; lists work as input.
    assert tok.decode([tok.bos_id, 104, 105, tok.eos_id, tok.pad_id, 261]) == "hi"
    assert isinstance(tok, Tokenizer)
    validate_tokenizer(tok)


def test_byte_bad_input():
    tok = ByteTokenizer()
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode("lone \ud800 surrogate")
    # A truncated multi-byte character decodes with a replacement char, not an exception.
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"


class _UserTok:
    vocab_size = 10
    bos_id, eos_id, pad_id = 7, 8, 9

    def encode(self, text):
        return [ord(c) % 7 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i) for i in ids if i < 7)


def test_user_tokenizer_protocol_and_validation():
    validate_tokenizer(_UserTok())
    assert isinstance(_UserTok(), Tokenizer)

    class NoDecode:
        vocab_size, bos_id, eos_id, pad_id = 10, 1, 2, 3

        def encode(self, text):
            return []

    with pytest.raises(TypeError, match="decode"):
        validate_tokenizer(NoDecode())

    class BadId(_UserTok):
        pad_id = 10

    with pytest.raises(ValueError, match=r"pad_id=10 must be in \[0, vocab_size=10\)"):
        validate_tokenizer(BadId())

    class FloatVocab(_UserTok):
        vocab_size = 10.0

    with pytest.raises(TypeError, match="vocab_size must be an int"):
        validate_tokenizer(FloatVocab())


def test_bpe_vocab_size_validated_before_import():
    with pytest.raises(ValueError, match="vocab_size must be an int >= 260"):
        BPETokenizer.train(["abc"], vocab_size=100)


HAVE_TOKENIZERS = importlib.util.find_spec("tokenizers") is not None


@pytest.mark.skipif(HAVE_TOKENIZERS, reason="checks the message when `tokenizers` is absent")
def test_bpe_without_tokenizers_raises_clear_import_error():
    with pytest.raises(ImportError, match="pip install tokenizers"):
        BPETokenizer.train(["abc def"], vocab_size=300)


@pytest.mark.skipif(not HAVE_TOKENIZERS, reason="optional dependency `tokenizers` not installed")
def test_bpe_train_round_trip(tmp_path):
    from jaxeff.data import load_stdlib_corpus

    texts = [d.text for d in load_stdlib_corpus("train")[:20]]
    tok = BPETokenizer.train(texts, vocab_size=512)
    validate_tokenizer(tok)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 259 < tok.vocab_size <= 512
    for text in SAMPLES + texts[:3]:
        ids = tok.encode(text)
        assert ids.dtype == np.int32
        assert tok.decode(ids) == text
    # BPE compresses Python source relative to bytes.
    assert len(tok.encode(texts[0])) < 0.8 * len(texts[0].encode())
    # Specials are dropped by decode; save/load keeps the ids.
    ids = tok.encode("import os")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == "import os"
    tok.save(tmp_path / "tok.json")
    tok2 = BPETokenizer.from_file(tmp_path / "tok.json")
    np.testing.assert_array_equal(tok2.encode(texts[1]), tok.encode(texts[1]))


def test_decode_rejects_out_of_range_and_non_integer_ids():
    tok = ByteTokenizer()
    assert tok.decode([72, 105, 257, 258, 256]) == "Hi"          # specials are dropped
    with pytest.raises(ValueError, match=r"ids must be in \[0, vocab_size=264\); got \[-1\] "
                                         r"at positions \[1\]"):
        tok.decode([65, -1, 66])
    with pytest.raises(ValueError, match=r"got \[264, 1000\]"):
        tok.decode(np.array([264, 1000]))
    with pytest.raises(TypeError, match="integer token ids; got dtype float64.*65.7"):
        tok.decode([65.7])
    with pytest.raises(TypeError, match="integer token ids"):
        tok.decode(np.array([65.0, 66.0], np.float32))
    assert tok.decode(np.array([], np.float32)) == ""              # empty is fine


def test_model_vocab_smaller_than_tokenizer_raises():
    tok = ByteTokenizer()
    validate_tokenizer(tok, 264)
    validate_tokenizer(tok, 512)
    with pytest.raises(ValueError, match=r"vocab_size=256 .*smaller than tokenizer.vocab_size="
                                         r"264.*bos_id=257.*>= 264"):
        validate_tokenizer(tok, 256)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        validate_tokenizer(tok, 264.0)
