"""DDP on two CPU processes (gloo, Lightning's launcher): identical weights and masks on both
ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_script.py")


@pytest.mark.distributed
def test_ddp_ranks_end_with_identical_weights_and_masks(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parent), "OMP_NUM_THREADS": "1"}
    env.pop("SOBRE_RUN_DIR", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)],
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world_size"] == 2
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["masks"] == ranks[1]["masks"] and len(ranks[0]["masks"]) == 1
    assert 0 < ranks[0]["masked_channels"] < 4  # the median rule masked some, not all
    runs = list((tmp_path / "runs" / "ddp").iterdir())
    assert len(runs) == 1 and (runs[0] / "metrics.json").is_file()  # one folder, rank 0 wrote it
