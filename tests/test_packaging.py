"""Packaging: every package folder is installed, `jaxeff.kernels` comes from kernels/, import is
cheap and side-effect free."""
import os
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_package_folder_is_listed():
    cfg = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {"jaxeff.kernels"}
    for dirpath, _, files in os.walk(os.path.join(ROOT, "jaxeff")):
        if "__init__.py" in files and "__pycache__" not in dirpath:
            found.add(os.path.relpath(dirpath, ROOT).replace(os.sep, "."))
    assert found == listed
    assert cfg["package-dir"]["jaxeff.kernels"] == "kernels"


def test_import_is_side_effect_free():
    code = ("import sys, jaxeff, jaxeff.kernels; "
            "import jax._src.xla_bridge as xb; "
            "print(bool(xb._backends))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"   # no device/backend initialised by importing


@pytest.mark.slow
def test_built_wheel_contains_kernels(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), ROOT], check=True)
    (whl,) = tmp_path.glob("jaxeff-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "jaxeff/kernels/__init__.py" in names
    assert "jaxeff/models/llama.py" in names
    assert not any(n.startswith("kernels/") for n in names)
