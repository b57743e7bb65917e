"""Tests for jaxeff.data.meco: prefix format, loss mask, cooldown switch, resume, prompts."""
import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxeff.data import ByteTokenizer, Corpus, Document, make_eval_batches, make_lm_dataset
from jaxeff.data import (MetadataPrefix, conditioned_eval_batches, make_meco_dataset, meco_prompt,
                         meco_switch_step, url_domain)

TOK = ByteTokenizer()
BOS, EOS = TOK.bos_id, TOK.eos_id


def _b(s):
    return list(s.encode())


@pytest.fixture(scope="module")
def corpus():
    docs = [Document(f"def f{i}(): return {i * 7}\n",
                     {"id": f"pkg{i % 4}.mod{i}", "module": f"pkg{i % 4}.mod{i}",
                      "domain": f"pkg{i % 4}"}) for i in range(24)]
    return Corpus(docs, "tiny")


def test_prefix_and_mask_exact():
    doc = Document("ab", {"id": "x", "module": "email.mime"})
    out = MetadataPrefix(TOK, field="module")(doc)
    prefix = _b("URL: email.mime\n\n")
    assert out["tokens"].tolist() == [BOS] + prefix + _b("ab") + [EOS]
    expect = [0.0] * (1 + len(prefix)) + [1.0, 1.0, 1.0]   # 'a' (first doc token) is a target
    assert out["loss_mask"].tolist() == expect
    assert out["tokens"].dtype == np.int32 and out["loss_mask"].dtype == np.float32


def test_fully_masked_unmasks_last_ten():
    doc = Document("", {"id": "x", "module": "email.mime.text"})
    out = MetadataPrefix(TOK, field="module", add_eos=False)(doc)
    n = out["tokens"].shape[0]
    assert n == 1 + len(_b("URL: email.mime.text\n\n"))
    assert out["loss_mask"].tolist() == [0.0] * (n - 10) + [1.0] * 10
    short = MetadataPrefix(TOK, field="module", add_eos=False)(Document("", {"id": "y", "module": "m"}))
    assert short["loss_mask"].tolist() == [1.0] * short["tokens"].shape[0]  # n < 10


def test_field_value_fn_and_override():
    doc = Document("z", {"id": "1", "url": "https://en.wikipedia.org/wiki/X"})
    out = MetadataPrefix(TOK, field="url", value_fn=url_domain)(doc)
    assert TOK.decode(out["tokens"]) == "URL: en.wikipedia.org\n\nz"
    out = MetadataPrefix(TOK, field="url", override="fake.org")(doc)
    assert TOK.decode(out["tokens"]) == "URL: fake.org\n\nz"


def test_mask_stays_aligned_after_packing():
    doc = Document("hello", {"id": "a", "module": "abc"})
    ds = make_lm_dataset([doc], TOK, 32, 1, seed=0, shuffle=False, repeat=False, shard=(0, 1),
                         encode=MetadataPrefix(TOK, field="module"))
    b = next(iter(ds))
    p = len(_b("URL: abc\n\n"))
    lm = b["loss_mask"][0]
    # targets = tokens[1:]; the target at j is a doc token (or EOS) iff j >= p
    n = 1 + p + 5 + 1
    assert lm[:n - 1].tolist() == [0.0] * p + [1.0] * 6
    assert lm[n - 1:].sum() == 0
    assert b["targets"][0, p] == ord("h")          # first doc token is the first target
    assert b["inputs"][0, p] == ord("\n")


def test_cooldown_switch_at_right_step_and_after_resume(corpus, tmp_path):
    ds = make_meco_dataset(corpus, TOK, 64, 2, total_steps=10, cooldown_fraction=0.3, seed=0,
                           field="module", shard=(0, 1), num_packing_bins=2, shuffle_window=8)
    assert meco_switch_step(10, 0.3) == 7
    it = iter(ds)
    batches = [next(it) for _ in range(10)]

    def has_meta(b):
        return "URL: pkg" in TOK.decode(b["inputs"].reshape(-1))

    assert [has_meta(b) for b in batches] == [True] * 7 + [False] * 3
    for at in (5, 8):
        it = iter(ds)
        for _ in range(at):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        it2 = iter(ds)
        it2.set_state(state)
        for b in batches[at:]:
            got = next(it2)
            for k in b:
                np.testing.assert_array_equal(got[k], b[k])
    it = iter(ds)
    for _ in range(6):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ck") as m:
        m.save(6, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
        m.wait_until_finished()
        it3 = iter(ds)
        m.restore(6, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(it3)))
    for b in batches[6:]:
        np.testing.assert_array_equal(next(it3)["inputs"], b["inputs"])


def test_cooldown_extremes(corpus):
    plain = make_meco_dataset(corpus, TOK, 64, 2, total_steps=4, cooldown_fraction=1.0,
                              seed=0, field="module", shard=(0, 1), shuffle_window=0)
    assert "URL:" not in TOK.decode(next(iter(plain))["inputs"].reshape(-1))
    meta = make_meco_dataset(corpus, TOK, 64, 2, total_steps=4, cooldown_fraction=0.0,
                             seed=0, field="module", shard=(0, 1), shuffle_window=0)
    it = iter(meta)
    assert all("URL:" in TOK.decode(next(it)["inputs"].reshape(-1)) for _ in range(6))


def test_prompt_and_conditioned_eval(corpus):
    p = meco_prompt(TOK, "x = 1", "json.decoder")
    assert p.tolist() == [BOS] + _b("URL: json.decoder\n\n") + _b("x = 1")
    assert meco_prompt(TOK, "x", None).tolist() == [BOS] + _b("x")
    plain = make_eval_batches(corpus, TOK, 128, 4)
    true = conditioned_eval_batches(corpus, TOK, 128, 4, field="module")
    wrong = conditioned_eval_batches(corpus, TOK, 128, 4, metadata="zzz.wrong", field="module")
    tgt = sum(b["loss_mask"].sum() for b in plain)
    assert sum(b["loss_mask"].sum() for b in true) == tgt   # same targets: doc tokens + EOS
    assert sum(b["loss_mask"].sum() for b in wrong) == tgt
    assert "URL: zzz.wrong" in TOK.decode(wrong[0]["inputs"].reshape(-1))


def test_bad_inputs(corpus):
    with pytest.raises(ValueError, match="'url'.*available"):
        MetadataPrefix(TOK, field="url")(corpus[0])
    with pytest.raises(ValueError, match="metadata field 'nope'"):
        make_meco_dataset(corpus, TOK, 32, 2, total_steps=10, seed=0, field="nope")
    with pytest.raises(ValueError, match="cooldown_fraction"):
        make_meco_dataset(corpus, TOK, 32, 2, total_steps=10, seed=0, cooldown_fraction=1.2)
    with pytest.raises(ValueError, match="cooldown_fraction"):
        meco_switch_step(10, -0.5)
    with pytest.raises(ValueError, match="total_steps"):
        meco_switch_step(0)
    with pytest.raises(ValueError, match="template"):
        MetadataPrefix(TOK, template="URL: \n\n")
    with pytest.raises(TypeError, match="Document, a str or a dict"):
        MetadataPrefix(TOK, field="module")(3.5)
    with pytest.raises(ValueError, match="has no 'url'.*field='module'"):
        MetadataPrefix(TOK)("plain string")                 # no url, no field: say so
    with pytest.raises(ValueError, match=r"metadata field 'url' .*field=None means"):
        make_meco_dataset(corpus, TOK, 32, 2, total_steps=10, seed=0)   # no default field
    with pytest.raises(ValueError, match="without a 'text' field"):
        MetadataPrefix(TOK)({"body": "x", "url": "a.org"})
    with pytest.raises(ValueError, match="encode"):
        make_meco_dataset(corpus, TOK, 32, 2, total_steps=10, seed=0, encode=lambda d: d)


def test_plain_dicts_with_text_and_url():
    """A list of {"text", "url"} dicts works end to end; field=None takes the url's domain."""
    docs = [{"text": f"doc {i} " * 5, "url": f"https://site{i % 2}.org/p/{i}"} for i in range(8)]
    out = MetadataPrefix(TOK)(docs[1])
    assert TOK.decode(out["tokens"]).startswith("URL: site1.org\n\ndoc 1")
    it = iter(make_meco_dataset(docs, TOK, 32, 2, total_steps=4, cooldown_fraction=0.5,
                                seed=0, shard=(0, 1), shuffle_window=0))
    first = TOK.decode(next(it)["inputs"].reshape(-1))
    assert "URL: site" in first and "https" not in first
    ev = conditioned_eval_batches(docs, TOK, 64, 2, shard=(0, 1))
    assert "URL: site0.org" in TOK.decode(ev[0]["inputs"].reshape(-1))
    # the same dicts through the plain pipeline: text only
    b = next(iter(make_lm_dataset(docs, TOK, 32, 2, seed=0, shard=(0, 1), shuffle_window=0)))
    assert "doc" in TOK.decode(b["inputs"].reshape(-1))
    # another field of the dict, e.g. a source name
    named = MetadataPrefix(TOK, field="source")({"text": "t", "source": "wiki"})
    assert TOK.decode(named["tokens"]) == "URL: wiki\n\nt"
