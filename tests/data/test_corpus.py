"""Tests for jaxeff.data.corpus: the stdlib corpus, split, fingerprint and user-data loaders."""
import gzip
import json
import platform

import pytest

from jaxeff.data import (Corpus, Document, corpus_fingerprint, load_jsonl, load_stdlib_corpus,
                         load_text_files, split_corpus, stdlib_files)

EXCLUDED = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib-dynload"}


def _write(path, text="x = 1\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_exclusions_on_a_fake_stdlib(tmp_path):
    keep = ["json/decoder.py", "json/__init__.py", "email/mime/text.py", "os.py",
            "idlelib/editor.py", "lib2to3/fixer_base.py"]
    drop = ["test/test_os.py", "test/support/__init__.py", "idlelib/idle_test/test_x.py",
            "lib2to3/tests/data/bom.py", "ctypes/test/test_a.py", "encodings/cp1252.py",
            "encodings/__init__.py", "site-packages/numpy/core.py", "__pycache__/os.py",
            "config-3.11-x86_64-linux-gnu/python-config.py", "lib-dynload/x.py",
            "_sysconfigdata__linux_x86_64-linux-gnu.py", "json/data.txt"]
    for rel in keep + drop:
        _write(tmp_path / rel, f"# {rel}\n")
    _write(tmp_path / "email/mime/__init__.py", "")  # empty file: listed but skipped
    assert stdlib_files(str(tmp_path)) == sorted(keep + ["email/mime/__init__.py"])
    corpus = load_stdlib_corpus("all", root=str(tmp_path))
    assert [d.meta["path"] for d in corpus] == sorted(keep)
    by_id = {d.meta["id"]: d for d in corpus}
    assert set(by_id) == {"json.decoder", "json", "email.mime.text", "os", "idlelib.editor",
                          "lib2to3.fixer_base"}
    assert by_id["email.mime.text"].meta["domain"] == "email"
    assert by_id["json"].meta["module"] == "json"
    assert by_id["os"].text == "# os.py\n"
    with pytest.raises(FileNotFoundError, match="stdlib directory not found"):
        load_stdlib_corpus(root=str(tmp_path / "nope"))


def test_real_stdlib_corpus():
    corpus = load_stdlib_corpus("all")
    assert len(corpus) > 300  # 607 on CPython 3.11.7
    assert corpus.num_chars > 5_000_000
    paths = [d.meta["path"] for d in corpus]
    assert paths == sorted(paths), "deterministic (sorted) order"
    for p in paths:
        parts = p.split("/")
        assert p.endswith(".py")
        assert not EXCLUDED.intersection(parts[:-1]), p
        assert parts[0] != "encodings", p
    ids = [d.meta["id"] for d in corpus]
    assert len(set(ids)) == len(ids)
    doc = next(d for d in corpus if d.meta["id"] == "json.decoder")
    assert doc.meta == {"id": "json.decoder", "module": "json.decoder", "domain": "json",
                        "path": "json/decoder.py", "python_version": platform.python_version()}
    assert "class JSONDecoder" in doc.text
    assert "email.mime.text" in ids and "json" in ids
    # Second call is served from the cache and is the same content.
    assert corpus_fingerprint(load_stdlib_corpus("all")) == corpus_fingerprint(corpus)


def test_split_deterministic_disjoint_complete():
    all_ids = [d.meta["id"] for d in load_stdlib_corpus("all")]
    train = [d.meta["id"] for d in load_stdlib_corpus("train")]
    val = [d.meta["id"] for d in load_stdlib_corpus("validation")]
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(all_ids)
    assert 0.01 < len(val) / len(all_ids) < 0.10
    assert val == [d.meta["id"] for d in load_stdlib_corpus("validation")]
    # A larger fraction keeps every earlier validation document (monotone in val_fraction).
    val20 = {d.meta["id"] for d in load_stdlib_corpus("validation", val_fraction=0.2)}
    assert set(val) <= val20 and len(val20) > 2 * len(val)
    assert len(load_stdlib_corpus("validation", val_fraction=0.0)) == 0


def test_split_bad_args():
    c = Corpus([Document("a", {"id": "a"}), Document("b", {})])
    with pytest.raises(ValueError, match="split must be one of"):
        split_corpus(c, "test")
    with pytest.raises(ValueError, match="val_fraction must be a float in \\[0, 1\\); got 1.5"):
        split_corpus(c, "train", 1.5)
    with pytest.raises(ValueError, match="document 1 .* has no meta\\['id'\\]"):
        split_corpus(c, "train")


def test_fingerprint():
    docs = [Document("alpha", {"id": "a"}), Document("beta", {"id": "b"})]
    fp = corpus_fingerprint(Corpus(docs))
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert corpus_fingerprint(docs) == fp  # plain lists work too
    assert corpus_fingerprint([docs[0], Document("betA", {"id": "b"})]) != fp
    assert corpus_fingerprint([docs[0], Document("beta", {"id": "c"})]) != fp
    assert corpus_fingerprint(docs[::-1]) != fp
    with pytest.raises(TypeError, match="corpus\\[0\\] must be a Document"):
        corpus_fingerprint(["text"])


def test_corpus_type_checks_and_slicing():
    c = Corpus([Document("a", {"id": "1"}), Document("b", {"id": "2"})], name="n")
    assert isinstance(c[:1], Corpus) and len(c[:1]) == 1 and c[1].text == "b"
    with pytest.raises(TypeError, match="documents\\[0\\] must be a jaxeff.data.Document"):
        Corpus(["raw string"])


# --------------------------------------------------------------------------- text files


def test_load_text_files(tmp_path):
    _write(tmp_path / "a" / "one.txt", "first")
    _write(tmp_path / "a" / "sub" / "two.txt", "second")
    _write(tmp_path / "a" / "skip.md", "markdown")
    _write(tmp_path / "a" / "empty.txt", "  \n")
    single = load_text_files(tmp_path / "a" / "one.txt")
    assert [d.text for d in single] == ["first"]
    assert single[0].meta["domain"] == "a"
    from_dir = load_text_files(str(tmp_path / "a"))
    assert [d.text for d in from_dir] == ["first", "second"]  # sorted, recursive, empty dropped
    from_glob = load_text_files(str(tmp_path / "a" / "*.md"))
    assert [d.text for d in from_glob] == ["markdown"]
    both = load_text_files([tmp_path / "a" / "skip.md", str(tmp_path / "a" / "**" / "two.txt")])
    assert [d.text for d in both] == ["markdown", "second"]
    assert len({d.meta["id"] for d in from_dir}) == 2


def test_load_text_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text_files(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="matched no files"):
        load_text_files(str(tmp_path / "*.txt"))
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="has no files matching"):
        load_text_files(tmp_path / "d")
    _write(tmp_path / "d" / "e.txt", "")
    with pytest.raises(ValueError, match="empty corpus"):
        load_text_files(tmp_path / "d")
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe bad")
    with pytest.raises(ValueError, match="bad.txt' is not valid utf-8 at byte 3"):
        load_text_files(tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="paths is empty"):
        load_text_files([])


# --------------------------------------------------------------------------- JSONL


def _jsonl(path, records, raw_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")


def test_load_jsonl(tmp_path):
    p = tmp_path / "web.jsonl"
    _jsonl(p, [{"text": "one", "url": "a.com/x", "score": 3},
               {"text": "two", "url": "b.org/y", "score": 1, "domain": "b.org"}], ["", "  "])
    c = load_jsonl(p)
    assert [d.text for d in c] == ["one", "two"]
    assert c[0].meta == {"url": "a.com/x", "score": 3, "id": "web.jsonl:1", "domain": "web"}
    assert c[1].meta["domain"] == "b.org"
    c2 = load_jsonl(p, meta_fields=["url"], id_field="url")
    assert c2[1].meta == {"url": "b.org/y", "id": "b.org/y", "domain": "web"}
    # Custom text field and gzip.
    gz = tmp_path / "x.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"content": "zipped é"}) + "\n")
    assert load_jsonl(gz, text_field="content")[0].text == "zipped é"


def test_load_jsonl_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_jsonl(tmp_path / "missing.jsonl")
    p = tmp_path / "d.jsonl"
    _jsonl(p, [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(ValueError, match=r"d.jsonl:2: record has no text field 'text' "
                                         r"\(fields: \['body'\]\)"):
        load_jsonl(p)
    _jsonl(p, [{"text": "ok"}], ["{not json"])
    with pytest.raises(ValueError, match="d.jsonl:2: invalid JSON"):
        load_jsonl(p)
    _jsonl(p, [{"text": 5}])
    with pytest.raises(TypeError, match="d.jsonl:1: field 'text' must be a string, got int"):
        load_jsonl(p)
    _jsonl(p, [["a", "list"]])
    with pytest.raises(ValueError, match="d.jsonl:1: expected a JSON object, got list"):
        load_jsonl(p)
    _jsonl(p, [{"text": "a", "url": "u"}, {"text": "b"}])
    with pytest.raises(ValueError, match=r"d.jsonl:2: record lacks meta field\(s\) \['url'\]"):
        load_jsonl(p, meta_fields=["url"])
    with pytest.raises(ValueError, match="d.jsonl:1: record has no id field 'uid'"):
        load_jsonl(p, id_field="uid")
    with pytest.raises(TypeError, match="meta_fields must be a list"):
        load_jsonl(p, meta_fields="url")
    _jsonl(p, [], ["", ""])
    with pytest.raises(ValueError, match="empty corpus: .*d.jsonl"):
        load_jsonl(p)


def test_load_jsonl_bad_bytes_name_path_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid UTF-8 at byte 13"):
        load_jsonl(p)
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_bytes(b'{"text": "not compressed"}\n')
    with pytest.raises(ValueError, match=r"fake\.jsonl\.gz:1: cannot decompress.*not .*gzip"):
        load_jsonl(fake)
    trunc = tmp_path / "trunc.jsonl.gz"
    body = "".join(json.dumps({"text": f"line {i} {i * 7919 % 10007}"}) + "\n"
                   for i in range(400)).encode()
    blob = gzip.compress(body)
    trunc.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(ValueError, match=r"trunc\.jsonl\.gz:\d+: cannot decompress"):
        load_jsonl(trunc)
    good = tmp_path / "good.jsonl.gz"
    good.write_bytes(gzip.compress('{"text": "café"}\n'.encode()))
    assert load_jsonl(good)[0].text == "café"
