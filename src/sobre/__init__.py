"""sobre: frugal and trustworthy deep learning on PyTorch, one recipe at a time.

``sobre.fit(recipe)`` trains and evaluates a recipe (a YAML path or a dict) and writes a run folder;
``sobre.load(path)`` reads a checkpoint back without unpickling anything; ``sobre.retest(path)``
tests it again with its recipe's data. Heavy imports are lazy.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "fit", "load", "measure", "report", "retest"]


def __getattr__(name: str) -> Any:
    if name in {"fit", "load", "report", "retest"}:
        from sobre import engine

        return getattr(engine, name)
    if name == "measure":
        from sobre.core.measure import measure

        return measure
    raise AttributeError(f"module 'sobre' has no attribute {name!r}")
