"""`import jaxeff` stays cheap: structural checks (which modules load), no timings.

Measured (python -X importtime, and fresh-interpreter wall-time medians): `import jaxeff` costs
about as much as `python -c pass`; `import jaxeff; jaxeff.optim` about as much as `import optax`
(it loads jax and optax, not flax or jaxeff.params).
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _loaded(code: str) -> set:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sys.modules))"],
                         check=True, capture_output=True, text=True, env=env).stdout
    return set(out.split())


def test_import_jaxeff_loads_no_jax():
    mods = _loaded("import jaxeff")
    assert "jaxeff" in mods
    assert not {m for m in mods if m.split(".")[0] in ("jax", "optax", "flax", "numpy")}


def test_jaxeff_optim_loads_neither_flax_nor_params():
    mods = _loaded("import jaxeff; jaxeff.optim")
    assert "optax" in mods and "jaxeff.optim" in mods
    assert not {m for m in mods if m.split(".")[0] == "flax" or m.startswith("jaxeff.params")}
