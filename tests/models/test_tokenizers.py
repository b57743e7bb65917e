"""Tokenizers of real checkpoints: a BPE trained here, stored in a GGUF the way llama.cpp stores
it, rebuilt and compared; WordPiece from tokenizer.json; ChatML; the protocol's round trips."""
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
tk = pytest.importorskip("tokenizers")

from jaxeff.data import validate_tokenizer  # noqa: E402
from jaxeff.models import ChatML, HFTokenizer, gguf_tokenizer, json_tokenizer  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak 1234 times.\n"
        "All: Speak, speak. Résumé naïve café 2024-12-02 \t tabs  and   spaces\n") * 20
TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are a test bot<|im_end|>\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SAMPLES = ["Hello world", "hear me speak 1234 times.", "  leading spaces", "naïve café ☃ 🙂",
           "tabs\tand\nnewlines\n\n", "<|im_start|>user\nhi<|im_end|>", "99 bottles", ""]


def trained_bpe():
    """A SmolLM2-style tokenizer trained on TEXT: digits split, GPT-2 byte level."""
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Digits(individual_digits=True),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return tok


def write_tokenizer_gguf(path, tok):
    import json
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(TEMPLATE)
    w.add_tensor("dummy", np.zeros(4, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tok = trained_bpe()
    path = tmp_path_factory.mktemp("tok") / "t.gguf"
    write_tokenizer_gguf(path, tok)
    return tok, gguf_tokenizer(path)


def test_gguf_bpe_equals_the_trained_tokenizer_and_round_trips(pair):
    original, rebuilt = pair
    validate_tokenizer(rebuilt)
    assert (rebuilt.bos_id, rebuilt.eos_id, rebuilt.pad_id) == (1, 2, 2)
    assert rebuilt.vocab_size == original.get_vocab_size()
    for s in SAMPLES + [TEXT[:300]]:
        ids = rebuilt.encode(s)
        assert ids.dtype == np.int32
        assert ids.tolist() == original.encode(s).ids, s
        assert rebuilt.decode(ids) == s.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert len(rebuilt.encode("hear")) < len("hear")        # the merges are used
    assert rebuilt.encode("1234").tolist() == [rebuilt.encode(c)[0] for c in "1234"]
    assert rebuilt.encode("<|im_start|>").tolist() == [1]  # control tokens stay whole
    assert rebuilt.decode([1, *rebuilt.encode("x"), 2], skip_special_tokens=False) \
        == "<|im_start|>x<|im_end|>"


def test_chat_template_from_gguf(pair):
    _, tok = pair
    assert tok.chat_template.default_system == "You are a test bot"
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a test bot<|im_end|>\n<|im_start|>user\n"
                    "What is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template(msgs)
    assert ids[0] == 1 and ids.tolist().count(1) == 3 and tok.decode(ids).startswith("system")
    with_system = [{"role": "system", "content": "S"}, *msgs]
    assert tok.apply_chat_template(with_system, add_generation_prompt=False, tokenize=False) \
        == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    with pytest.raises(TypeError, match=r"messages\[0\]"):
        tok.apply_chat_template([{"role": "user"}])
    with pytest.raises(TypeError, match="list"):
        tok.apply_chat_template("hi")


def test_chatml_is_only_read_from_chatml_templates():
    assert ChatML.from_template("{{ bos_token }}{{ message }}") is None
    assert ChatML.from_template("<|im_start|>x<|im_end|>").default_system is None


def test_wordpiece_tokenizer_json(tmp_path):
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello",
                                         "world", "wor", "##ld", "!", "a"])}
    tok = tk.Tokenizer(tk.models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = tk.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    tok.post_processor = tk.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = tk.decoders.WordPiece()
    tok.enable_padding(length=16)        # as in MiniLM's file: the wrapper must ignore it
    tok.save(str(tmp_path / "tokenizer.json"))
    wp = json_tokenizer(tmp_path / "tokenizer.json", bos_token="[CLS]", eos_token="[SEP]",
                        pad_token="[PAD]")
    validate_tokenizer(wp)
    assert wp.encode("Hello WORLD!").tolist() == [5, 6, 9]
    assert wp.decode(wp.encode("hello world !")) == "hello world!"
    ids, mask = wp.encode_batch(["hello", "hello world a"])
    assert ids.tolist() == [[2, 5, 3, 0, 0], [2, 5, 6, 10, 3]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    ids, _ = wp.encode_batch(["hello world a"], max_length=3)
    assert ids.tolist() == [[2, 5, 3]]
    assert wp.encode("hello world a").size == 3           # truncation did not stick
    with pytest.raises(ValueError, match="no chat template"):
        wp.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="pad_token='<pad>'"):
        json_tokenizer(tmp_path / "tokenizer.json", bos_token="[CLS]", eos_token="[SEP]",
                       pad_token="<pad>")


def test_bad_special_ids_and_inputs(pair):
    original, tok = pair
    with pytest.raises(ValueError, match="eos_id"):
        HFTokenizer(original, bos_id=1, eos_id=10_000, pad_id=0)
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match="texts"):
        tok.encode_batch("one string")
