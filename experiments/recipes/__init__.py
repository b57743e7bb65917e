"""Speedrun recipes: one module per recipe, each defining ``RECIPE = Recipe(...)``.

``available()`` lists the recipe names (module names with ``_`` read as ``-``), ``load(name)``
imports one. Recipes are discovered, so a new module here is picked up by the main job.
"""

import importlib
import pkgutil

__all__ = ["available", "load"]


def _modules() -> dict[str, str]:
    mods = {}
    for m in pkgutil.iter_modules(__path__):
        if not m.name.startswith("_"):
            mods[m.name.replace("_", "-")] = m.name
    return mods


def available() -> list[str]:
    """Recipe names, baseline first."""
    names = sorted(_modules())
    return (["baseline"] if "baseline" in names else []) + [n for n in names if n != "baseline"]


def load(name: str):
    """The ``RECIPE`` object of recipe ``name``."""
    mods = _modules()
    if name not in mods:
        raise ValueError(f"unknown recipe {name!r}; available: {available()}")
    module = importlib.import_module(f"experiments.recipes.{mods[name]}")
    recipe = getattr(module, "RECIPE", None)
    if recipe is None:
        raise ValueError(f"experiments/recipes/{mods[name]}.py defines no RECIPE")
    return recipe
