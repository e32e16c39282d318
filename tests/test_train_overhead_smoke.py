"""The training-overhead benchmark runs end to end (Ray Train + DeepSpeed vs plain PyTorch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_overhead.py"
NUMERIC = ("plain_step_ms", "ray_deepspeed_step_ms", "ratio", "startup_s", "steps",
           "tokens_per_step", "threads")


@pytest.mark.slow
def test_train_overhead_benchmark_quick_prints_json_line():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, proc.stderr[-4000:]
    row = json.loads(lines[-1])
    assert row.keys() >= {*NUMERIC, "device"}, {*NUMERIC, "device"} - row.keys()
    for key in NUMERIC:
        assert isinstance(row[key], int | float) and row[key] > 0, (key, row[key])
    assert isinstance(row["device"], str) and row["device"]
