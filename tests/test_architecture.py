"""Layout rules: core imports torch only; data and models import neither each other nor engine."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import sys
import {module}
bad = sorted(m for m in sys.modules if m.split(".")[0] in {forbidden!r} or m in {forbidden!r})
assert not bad, bad
"""


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        (
            "sobre.core, sobre.core.taps, sobre.core.masks, sobre.core.dist, sobre.core.measure, "
            "sobre.core.serialization, sobre.core.edits, sobre.core.labels, sobre.core.members, "
            "sobre.core.weights, sobre.core.fx, sobre.core.compact",
            (
                "lightning",
                "torch_pruning",
                "pytorch_lightning",
                "sobre.engine",
                "sobre.data",
                "sobre.models",
                "rich",
                "matplotlib",
            ),
        ),
        ("sobre.models", ("lightning", "sobre.engine", "sobre.data")),
        ("sobre.data", ("sobre.engine", "sobre.models")),
        ("sobre", ("torch", "lightning")),
        (
            "sobre.prune",
            (
                "lightning",
                "sobre.engine",
                "sobre.data",
                "sobre.uncertainty",
                "torch_pruning",
                "matplotlib",
            ),
        ),
        ("sobre.uncertainty", ("lightning", "sobre.engine", "sobre.data", "sobre.prune")),
        (
            "sobre.efficient",
            (
                "lightning",
                "sobre.engine",
                "sobre.data",
                "sobre.prune",
                "sobre.uncertainty",
                "sobre.fairness",
                "matplotlib",
            ),
        ),
        (
            "sobre.fairness",
            (
                "lightning",
                "sobre.engine",
                "sobre.data",
                "sobre.prune",
                "sobre.uncertainty",
                "sobre.efficient",
            ),
        ),
    ],
)
def test_import_boundaries(module, forbidden):
    code = CHECK.format(module=module, forbidden=forbidden)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
