"""Tests for the larger local corpora: site-packages sources with package metadata and dedup,
paragraph-chunked text files with a sha256 check, tinyshakespeare, and the BPE trainer."""
import hashlib
import os

import pytest

from jaxeff import data as jdata


def _make_site(root):
    """A tiny site-packages: two distributions with RECORDs, a near duplicate, an exact
    duplicate, an unowned file, a test directory, a cache and an over-size file."""
    body = "\n".join(f"def f{i}(x):\n    return x * {i} + {i * i}  # line {i}" for i in range(60))
    files = {
        "alpha/__init__.py": "from alpha.core import run\n",
        "alpha/core.py": body,
        "alpha/core_copy.py": body.replace("line 59", "line fifty-nine"),   # near duplicate
        "beta/mod.py": "import os\n\n\ndef g():\n    return os.getcwd()\n" * 3,
        "beta/same.py": "import os\n\n\ndef g():\n    return os.getcwd()\n" * 3,  # exact dup
        "loose.py": "print('not in any RECORD')\n",
        "beta/tests/test_mod.py": "def test(): pass\n",
        "beta/__pycache__/mod.py": "cached = 1\n",
        "beta/big.py": "x = 1\n" * 1000,
        "beta/empty.py": "   \n",
    }
    for rel, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)) or root, exist_ok=True)
        with open(os.path.join(root, rel), "w") as f:
            f.write(text)
    for name, ver, owned in (("alpha", "1.2.3", ["alpha/__init__.py", "alpha/core.py",
                                                   "alpha/core_copy.py"]),
                             ("beta", "0.1", ["beta/mod.py", "beta/same.py", "beta/big.py"])):
        info = os.path.join(root, f"{name}-{ver}.dist-info")
        os.makedirs(info)
        with open(os.path.join(info, "METADATA"), "w") as f:
            f.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n")
        with open(os.path.join(info, "RECORD"), "w") as f:
            f.write("".join(f"{p},,\n" for p in owned))


def test_site_packages_corpus_metadata_dedup_and_split(tmp_path):
    root = str(tmp_path / "site")
    _make_site(root)
    files = jdata.site_packages_files(root, max_file_bytes=4000)
    assert files == sorted(files) and "beta/big.py" not in files
    assert not any("tests/" in f or "__pycache__" in f for f in files)
    c = jdata.load_site_packages_corpus("all", root=root, max_file_bytes=4000, dedup_bytes=4096)
    paths = [d.meta["path"] for d in c]
    # exact duplicate beta/same.py and near duplicate alpha/core_copy.py dropped, first kept
    assert paths == ["alpha/__init__.py", "alpha/core.py", "beta/mod.py", "loose.py"]
    assert c.stats["exact_duplicates"] == 1 and c.stats["near_duplicates"] == 1
    meta = {d.meta["path"]: d.meta for d in c}
    assert meta["alpha/core.py"]["package"] == "alpha" and meta["alpha/core.py"]["version"] == "1.2.3"
    assert meta["alpha/core.py"]["domain"] == "alpha" and meta["alpha/__init__.py"]["module"] == "alpha"
    assert meta["loose.py"]["package"] == "unknown" and meta["loose.py"]["version"] is None
    # without the near-duplicate pass the copy stays
    c1 = jdata.load_site_packages_corpus("all", root=root, max_file_bytes=4000,
                                         dedup_threshold=1.0)
    assert "alpha/core_copy.py" in [d.meta["path"] for d in c1]
    # deterministic hash split, disjoint and complete
    tr = jdata.load_site_packages_corpus("train", root=root, max_file_bytes=4000,
                                         val_fraction=0.5, dedup_bytes=4096)
    va = jdata.load_site_packages_corpus("validation", root=root, max_file_bytes=4000,
                                         val_fraction=0.5, dedup_bytes=4096)
    assert sorted(d.meta["id"] for d in tr) + sorted(d.meta["id"] for d in va) != []
    assert sorted([d.meta["id"] for d in tr] + [d.meta["id"] for d in va]) == sorted(paths)
    with pytest.raises(FileNotFoundError, match="root"):
        jdata.load_site_packages_corpus(root=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="dedup_threshold"):
        jdata.load_site_packages_corpus(root=root, dedup_threshold=1.5)


def test_text_file_corpus_chunks_checks_sha_and_splits(tmp_path):
    paras = [f"Paragraph {i}. " + "word " * (20 + i) for i in range(40)]
    text = "\n\n".join(paras)
    p = tmp_path / "book.txt"
    p.write_text(text)
    sha = hashlib.sha256(text.encode()).hexdigest()
    c = jdata.load_text_file_corpus(str(p), chunk_chars=500, sha256=sha, domain="en")
    assert "\n\n".join(d.text for d in c) == text          # nothing lost, paragraphs whole
    assert all(len(d.text) >= 500 for d in list(c)[:-1]) and len(c) > 5
    assert [d.meta["id"] for d in c] == [f"book.txt:{i}" for i in range(len(c))]
    assert c[0].meta["domain"] == "en"
    tr = jdata.load_text_file_corpus(str(p), chunk_chars=500, split="train", val_fraction=0.3)
    va = jdata.load_text_file_corpus(str(p), chunk_chars=500, split="validation", val_fraction=0.3)
    assert len(tr) + len(va) == len(c) and len(va) > 0
    with pytest.raises(ValueError, match="sha256"):
        jdata.load_text_file_corpus(str(p), sha256="0" * 64)
    with pytest.raises(FileNotFoundError):
        jdata.load_text_file_corpus(str(tmp_path / "missing.txt"))


def test_tinyshakespeare_when_present():
    path = jdata.find_shared_data("tinyshakespeare.txt")
    if path is None:
        pytest.skip("tinyshakespeare.txt is not in ../shared/data/ or $JAXEFF_SHARED_DATA")
    c = jdata.load_tinyshakespeare(path)
    with open(path, encoding="utf-8") as f:
        assert "\n\n".join(d.text for d in c) == f.read()      # every byte, in order
    assert c[0].text.startswith("First Citizen:") and c[0].meta["domain"] == "shakespeare"
    assert len(jdata.load_tinyshakespeare(path, split="validation")) > 0


def test_tinyshakespeare_checks_its_sha256(tmp_path):
    fake = tmp_path / "tinyshakespeare.txt"
    fake.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    with pytest.raises(ValueError, match="sha256"):
        jdata.load_tinyshakespeare(str(fake))
    with pytest.raises(FileNotFoundError, match="tinyshakespeare"):
        jdata.load_tinyshakespeare(str(tmp_path / "absent.txt"))


def test_bpe_trained_on_a_corpus_is_deterministic_and_round_trips(tmp_path):
    pytest.importorskip("tokenizers")
    docs = [jdata.Document(f"def fn_{i}(value):\n    return value + {i}\n" * 5, {"id": str(i)})
            for i in range(50)]
    c = jdata.Corpus(docs, "code")
    a = jdata.train_bpe_tokenizer(c, vocab_size=300)
    b = jdata.train_bpe_tokenizer(c, vocab_size=300)
    s = "def fn_7(value):\n    return value + 7\n"
    assert a.encode(s).tolist() == b.encode(s).tolist()
    assert a.decode(a.encode(s)) == s and len(a.encode(s)) < len(s.encode())
    with pytest.raises(ValueError, match="max_chars"):
        jdata.train_bpe_tokenizer(c, max_chars=0)
