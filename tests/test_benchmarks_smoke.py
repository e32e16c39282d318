"""The layer benchmark runs end to end on tiny shapes and prints well-formed JSON lines."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "codebook_layer.py"
REQUIRED = {
    "tokens", "dim", "num_codes", "k", "groups", "fwd_bwd_ms", "matmul_topk_ms",
    "ratio_to_floor", "peak_mem_mb", "floor_peak_mem_mb", "device", "threads",
    "matmul_ms", "ratio_to_matmul", "select", "score", "dtype", "chunk_rows",
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
        assert row["device"] == "cpu" and row["select"] == "torch"
        for key in ("fwd_bwd_ms", "matmul_topk_ms", "ratio_to_floor", "peak_mem_mb",
                    "matmul_ms", "ratio_to_matmul"):
            assert isinstance(row[key], int | float)
        assert row["ratio_to_matmul"] == pytest.approx(row["fwd_bwd_ms"] / row["matmul_ms"],
                                                       rel=1e-2)
    assert any(row["groups"] == 1 for row in rows)
    assert any(row["groups"] > 1 for row in rows)


def test_gpu_suite_quick_runs_every_stage_on_cpu(tmp_path):
    """benchmarks/gpu_suite.sh --quick: the GPU suite's four stages on tiny shapes (the kernel
    under Triton's interpreter), so it cannot rot between the rare sessions with a GPU."""
    suite = SCRIPT.parent / "gpu_suite.sh"
    proc = subprocess.run(["bash", str(suite), str(tmp_path), "--quick"], capture_output=True,
                          text=True, timeout=1000, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    status = {r["stage"]: r["status"] for r in rows if "status" in r}
    kernel = "ok" if importlib.util.find_spec("triton") else "skipped (no triton)"
    assert status == {"kernel": kernel, "layer": "ok", "train_step": "ok", "fsm": "ok"}, status
    checks = [r for r in rows if r["stage"] == "kernel" and "check" in r]
    assert kernel != "ok" or (len(checks) >= 6 and all(r["ok"] for r in checks)), checks
    profiles = [r for r in rows if r["stage"] == "layer" and "profile" in r]
    assert profiles and all(p["top"] for p in profiles)  # the per-operator breakdown
    steps = {r["variant"]: r for r in rows if r["stage"] == "train_step" and "step_ms" in r}
    assert set(steps) == {"plain", "codebook", "codebook_ckpt"}
    assert steps["plain"]["num_codes"] == 0 and steps["codebook"]["ratio_to_plain"] > 0
    assert steps["codebook_ckpt"]["checkpointing"] is True
    fsm = [r for r in rows if r["stage"] == "fsm" and "first_transition_accuracy" in r]
    assert fsm and 0 <= fsm[0]["first_transition_accuracy"] <= 1
    summary = (tmp_path / "summary.md").read_text()
    assert "## Training step" in summary and "| fsm | ok |" in summary
    assert "### Profile:" in summary
    assert kernel != "ok" or "Fused score + top-k: correctness" in summary


def test_store_query_benchmark_agrees_with_the_per_shard_code_it_replaced(tmp_path):
    """DuckDB's answers equal those of search.py before it (read from git) on a small store,
    and the code page answers over HTTP."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "store_query.py"
    proc = subprocess.run([sys.executable, str(script), "--tokens", "40000", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["tokens"] >= 39_000
    for case in ("codes_for_token", "contexts_frequent", "contexts_rare"):
        assert summary[case]["same_result"] is True, case
    assert summary["page_http"]["max_s"] > 0


def test_recon_drift_benchmark_quick_prints_each_setting_from_the_same_start():
    """benchmarks/recon_drift.py --quick: a JSON line per setting, each with the first and last
    reconstruction loss of the same start (one seed, so step 1 is the same for every setting).
    Four steps of a tiny model are too few to show the drift itself (both settings fall about
    7% there); the 30-step figures are in benchmarks/results/recon_drift_cpu.jsonl."""
    script = SCRIPT.with_name("recon_drift.py")
    proc = subprocess.run([sys.executable, str(script), "--quick", "--settings",
                           "benchmark,frozen_model"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [r["setting"] for r in rows] == ["benchmark", "frozen_model"]
    assert rows[0]["recon_first"] == rows[1]["recon_first"] > 0
    assert rows[1]["optim.model_lr_factor"] == 0.0 and rows[0]["steps"] == 4
    for r in rows:
        assert r["ratio"] == pytest.approx(r["recon_last"] / r["recon_first"], abs=2e-3)


def test_fused_topk_tile_search_runs_under_the_interpreter():
    """benchmarks/fused_topk_tune.py on CPU: the kernel at two tile configurations (launch options
    included) under Triton's interpreter, each checked against the tuned default's codes."""
    pytest.importorskip("triton")
    script = SCRIPT.with_name("fused_topk_tune.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "--k", "3"],
                          capture_output=True, text=True, timeout=300, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    tried = [r for r in rows if r.get("tune")]
    assert len(tried) == 2 and all(r["same_ids"] == 1.0 and r["ms"] > 0 for r in tried)
    assert {r["num_warps"] for r in tried} == {4, 8}  # the launch options reached the kernel
    summary = rows[-1]
    assert summary["tune_summary"] == "fused_topk" and summary["k"] == 3
    assert summary["best"] in [{key: r[key] for key in summary["best"]} for r in tried]
