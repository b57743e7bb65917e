"""The docs run: every Python code block of README.md and every docstring example.

* README.md: every ```` ```python ```` block runs; the blocks of one ``## `` section run in order
  in one namespace (a block may use what an earlier block of its section defined). Shell commands
  go in ```` ```bash ```` blocks, which are not Python and not run.
* Docstrings: every literal block introduced by a line ``Example::``, ``Examples::`` or
  ``Usage::`` in the docstring of a public name of the packages below, of the package itself or
  of a module that defines one of its public names, runs in a fresh namespace.
* Opting out: a Python block whose first line is ``# doctest: +SKIP`` is not run. The test
  counts them (``SKIP_ALLOWED``) so that the number stays deliberate.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("jaxeff", "jaxeff.optim", "jaxeff.params", "jaxeff.data", "jaxeff.losses",
            "jaxeff.schedules", "jaxeff.select", "jaxeff.train", "jaxeff.checkpoint",
            "jaxeff.models", "jaxeff.models.llama", "jaxeff.kernels")
SKIP = "# doctest: +SKIP"
SKIP_ALLOWED = 0          # README + docstring blocks marked SKIP; raise only with a reason
EXAMPLE_HEADERS = ("Example::", "Examples::", "Usage::")


def readme_sections(path=os.path.join(ROOT, "README.md")):
    """``{section title: [python block, ...]}`` in file order (fenced ```python blocks)."""
    sections, title, block = {}, "(top)", None
    for line in open(path, encoding="utf-8").read().splitlines():
        if block is not None:
            if line.strip() == "```":
                sections.setdefault(title, []).append("\n".join(block))
                block = None
            else:
                block.append(line)
        elif line.startswith("## "):
            title = line[3:].strip()
        elif re.fullmatch(r"```\s*(python|py)\s*", line.strip()):
            block = []
    assert block is None, f"unterminated ```python block in section {title!r}"
    return sections


def literal_blocks(doc: str):
    """The literal blocks of a (cleaned) docstring introduced by one of EXAMPLE_HEADERS."""
    lines, out = doc.splitlines(), []
    for i, line in enumerate(lines):
        if line.strip() not in EXAMPLE_HEADERS:
            continue
        indent = len(line) - len(line.lstrip())
        j, body = i + 1, []
        while j < len(lines) and (not lines[j].strip()
                                  or len(lines[j]) - len(lines[j].lstrip()) > indent):
            body.append(lines[j])
            j += 1
        code = textwrap.dedent("\n".join(body)).strip("\n")
        if code:
            out.append(code)
    return out


def _public_objects(pkg):
    names = getattr(pkg, "__all__", None) or [n for n in vars(pkg) if not n.startswith("_")]
    for name in names:
        obj = getattr(pkg, name)
        if inspect.ismodule(obj):
            continue
        yield f"{pkg.__name__}.{name}", obj
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and callable(member) or isinstance(
                        member, (staticmethod, classmethod, property)):
                    yield f"{pkg.__name__}.{name}.{attr}", member


def docstring_examples():
    """``[(id, code)]`` for every example block reachable from PACKAGES (deduplicated)."""
    seen, out = set(), []

    def add(where, doc):
        if not doc:
            return
        for k, code in enumerate(literal_blocks(inspect.cleandoc(doc))):
            if code not in seen:
                seen.add(code)
                out.append((f"{where}#{k}", code))

    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        add(pkg_name, pkg.__doc__)
        for where, obj in _public_objects(pkg):
            target = getattr(obj, "__func__", obj)
            if isinstance(obj, property):
                target = obj.fget
            add(where, getattr(target, "__doc__", None))
            mod = sys.modules.get(getattr(target, "__module__", "") or "")
            if mod is not None and mod.__name__.startswith("jaxeff"):
                add(mod.__name__, mod.__doc__)
    return out


README = readme_sections()
EXAMPLES = docstring_examples()


def _run(code: str, namespace: dict, where: str):
    if code.lstrip().startswith(SKIP):
        pytest.skip(f"{where} is marked {SKIP!r}")
    try:
        compiled = compile(code, where, "exec")
    except SyntaxError as e:
        raise AssertionError(f"{where} is not valid Python: {e}\n{code}") from None
    exec(compiled, namespace)


def test_there_are_docs_to_run():
    assert sum(len(b) for b in README.values()) >= 1
    assert len(EXAMPLES) >= 3
    skipped = [b for blocks in README.values() for b in blocks if b.lstrip().startswith(SKIP)]
    skipped += [c for _, c in EXAMPLES if c.lstrip().startswith(SKIP)]
    assert len(skipped) == SKIP_ALLOWED, (
        f"{len(skipped)} doc blocks are marked {SKIP!r} (allowed: {SKIP_ALLOWED}); make them run")


def test_literal_blocks_parser():
    doc = "Summary.\n\nExample::\n\n    x = 1\n\n    y = x + 1\n\nMore text.\n\nUsage::\n\n    z = 3\n"
    assert literal_blocks(doc) == ["x = 1\n\ny = x + 1", "z = 3"]


@pytest.mark.parametrize("title", sorted(README), ids=lambda t: re.sub(r"\W+", "_", t)[:40])
def test_readme_section_runs(title, monkeypatch):
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": "__readme__"}
    for k, code in enumerate(README[title]):
        _run(code, namespace, f"README.md [{title}] block {k}")


@pytest.mark.parametrize("where,code", EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_docstring_example_runs(where, code, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _run(code, {"__name__": "__docs__"}, f"docstring example {where}")


def test_readme_blocks_are_python():
    # every block we run parses (also catches a ```python fence around shell commands)
    for title, blocks in README.items():
        for k, code in enumerate(blocks):
            ast.parse(code, f"README.md [{title}] block {k}")


def test_readme_names_exist():
    # the one-line uses in the README's tables are not code blocks: check that every dotted
    # `jaxeff.x.y` name they mention resolves (a renamed or missing function fails here)
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    missing = []
    for name in sorted(set(re.findall(r"\bjaxeff(?:\.[A-Za-z_]\w*)+", text))):
        parts = name.split(".")
        obj = importlib.import_module("jaxeff")
        for i, part in enumerate(parts[1:], start=1):
            if hasattr(obj, part):
                obj = getattr(obj, part)
                continue
            try:
                obj = importlib.import_module(".".join(parts[:i + 1]))
            except ImportError:
                missing.append(name)
                break
    assert not missing, f"README names that do not exist: {missing}"
