"""The layer benchmark runs end to end on tiny shapes and prints well-formed JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "codebook_layer.py"
REQUIRED = {
    "tokens", "dim", "num_codes", "k", "groups", "fwd_bwd_ms", "matmul_topk_ms",
    "ratio_to_floor", "peak_mem_mb", "floor_peak_mem_mb", "device", "threads",
}


def test_codebook_layer_benchmark_quick_prints_json_lines():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--repeats", "2"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) >= 2
    rows = [json.loads(line) for line in lines]
    for row in rows:
        assert row.keys() >= REQUIRED, REQUIRED - row.keys()
        assert row["device"] == "cpu"
        for key in ("fwd_bwd_ms", "matmul_topk_ms", "ratio_to_floor", "peak_mem_mb"):
            assert isinstance(row[key], int | float)
    assert any(row["groups"] == 1 for row in rows)
    assert any(row["groups"] > 1 for row in rows)
