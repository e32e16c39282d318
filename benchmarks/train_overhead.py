"""What Ray Train + DeepSpeed add to a training step, against the same loop run plainly.

Both sides run the one training loop, ``codebook.training.loop.train``, on the same model,
optimizer and parameter groups, the same TokFSM batches and the same gradient clipping:

* plain: ``codebook.training.local.train_local`` in this process: no Ray, no DeepSpeed (the
  plain PyTorch engine), metrics to ``metrics.jsonl``;
* Ray: the real pipeline, ``codebook.ray_glue.train.fit`` (one Ray Train worker, DeepSpeed
  ZeRO-0, fp32, on CPU) on a fresh local Ray cluster, metrics to MLflow.

Prints ONE JSON line on stdout:

* ``plain_step_ms`` / ``ray_deepspeed_step_ms``: steady-state step time, the median over log
  windows after warm-up of the window's mean step time. The loop logs ``tokens_per_s`` every
  ``run.log_every`` (= ``--window``) steps, with eval and checkpoints kept out; a window's step
  time is ``tokens_per_step / tokens_per_s``. Windows that start before ``--warmup`` steps
  (default: one window) are dropped;
* ``ratio`` = ``ray_deepspeed_step_ms / plain_step_ms``;
* ``startup_s`` = wall time of ``fit()`` minus ``steps * ray_deepspeed_step_ms``: Ray Train
  controller and worker start-up, process group, DeepSpeed initialisation, the first steps'
  warm-up beyond the steady state, plus the final eval, checkpoint and tear-down (eval and
  checkpoint run only at the last step, after the last timed window);
* ``steps``, ``tokens_per_step`` (``batch_size * seq_len * grad_accum * world``), ``device``,
  ``threads`` (torch threads of the plain run) and ``worker_threads`` (``torch.get_num_threads()``
  in the Ray Train worker's training thread, which the worker logs to MLflow as
  ``system/torch_threads``), and some extras: ``timed_steps``, ``window``, ``ray_init_s``,
  ``fit_wall_s``, ``plain_wall_s``, ``plain_startup_s`` (as ``startup_s``, for the plain run)
  and the per-window step times of both (``*_windows_ms``), to judge the noise.

Both sides use the same number of threads: the worker gets ``run.cpus_per_worker = threads`` and
``OMP_NUM_THREADS = threads`` (job runtime env), the plain run ``torch.set_num_threads(threads)``.
The local Ray cluster starts without the dashboard; its start-up time is reported apart
(``ray_init_s``) and not part of ``startup_s``. ``load_avg_1m`` gives the 1-minute load average
before and after: with more busy threads than cores, a multi-threaded step waits on the scheduler
at every OpenMP parallel region (on a 2-core box at load ~7.5 a plain quick-mode step took
25-40 ms with 1 thread and 770-960 ms with 2), so measure on a quiet machine or pass
``--threads 1`` on a shared one.

Usage::

    python benchmarks/train_overhead.py [--steps 60] [--window 10] [--threads N]
        [--config configs/fsm.yaml] [--set key=value ...] [--quick] [--verbose]

``--quick`` shrinks the model and data (2-layer d32 model, small FSM, batch 8) and runs 16
steps in windows of 4 with 1 thread (unless ``--threads``): a smoke test, not a
measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from codebook.training.config import TrainConfig, load_config  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "fsm.yaml"
RUN_NAME = "train-overhead"
PLAIN_RUN_NAME = "train-overhead-plain"

QUICK_OVERRIDES = {
    "model.from_config.hidden_size": 32,
    "model.from_config.num_hidden_layers": 2,
    "model.from_config.intermediate_size": 64,
    "model.from_config.max_position_embeddings": 64,
    "data.fsm": "{num_states: 20, num_edges: 3, base: 10, seed: 1, trajectory_states: 12}",
    "data.eval_blocks": 32,
    "codebook.num_codes": 64,
    "optim.batch_size": 8,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML file (configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable); applied after the benchmark's "
                        "own settings, so it can change e.g. deepspeed.zero_stage")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 60)")
    p.add_argument("--window", type=int, default=None,
                   help="steps per timing window = run.log_every (default 10)")
    p.add_argument("--warmup", type=int, default=None,
                   help="steps dropped as warm-up (default: one window)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads on both sides (default: the CPUs available to this "
                        "process; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="small model, few steps (smoke test)")
    p.add_argument("--verbose", action="store_true", help="forward Ray worker output")
    args = p.parse_args(argv)
    args.steps = args.steps or (16 if args.quick else 60)
    args.window = args.window or (4 if args.quick else 10)
    args.warmup = args.window if args.warmup is None else args.warmup
    args.threads = args.threads or (1 if args.quick else len(os.sched_getaffinity(0)))
    if args.steps <= args.warmup + 1:
        p.error(f"--steps {args.steps} leaves no timed window after --warmup {args.warmup}")
    return args


def make_config(args: argparse.Namespace, storage: Path, plain: bool = False) -> TrainConfig:
    """The measured setting; ``plain``: the same without DeepSpeed, in its own run folder."""
    bench = {  # one worker, ZeRO-0, fp32, CPU, no eval/checkpoint inside the timed windows
        "run.num_workers": 1,
        "run.use_gpu": False,
        "run.cpus_per_worker": float(args.threads),
        "run.log_every": args.window,
        "run.eval_every": args.steps,
        "run.checkpoint_every": args.steps,
        "run.max_failures": 0,
        "deepspeed.enabled": True,
        "deepspeed.zero_stage": 0,
        "deepspeed.bf16": False,
        "mlflow.log_model": False,
        "codebook.start_step": 0,  # codebooks on for every timed step
    }
    forced = {
        "run.name": PLAIN_RUN_NAME if plain else RUN_NAME,
        "run.storage_path": str(storage),
        "run.max_steps": args.steps,
        "mlflow.tracking_uri": f"sqlite:///{storage / 'mlflow.db'}",
        **({"deepspeed.enabled": False} if plain else {}),
    }
    sets = [f"{k}={v}" for k, v in {**(QUICK_OVERRIDES if args.quick else {}), **bench}.items()]
    sets += list(args.set) + [f"{k}={v}" for k, v in forced.items()]
    cfg = load_config(args.config, sets)
    if cfg.data.source != "fsm":
        sys.exit("train_overhead: only data.source=fsm is supported (the plain run needs no Ray)")
    for key in ("eval_every", "checkpoint_every"):
        if not plain and getattr(cfg.run, key) < cfg.run.max_steps:
            print(f"warning: run.{key}={getattr(cfg.run, key)} < max_steps: its time falls "
                  "into the timed windows", file=sys.stderr)
    return cfg


def windows(rates: list[tuple[int, float]]) -> list[tuple[int, int, float]]:
    """``(last_step, steps_in_window, tokens_per_s)`` per log window, from the logged rates."""
    out, prev = [], 0
    for step, tokens_per_s in sorted(rates):
        out.append((step, step - prev, tokens_per_s))
        prev = step
    return out


# ---------------------------------------------------------------------- the two runs
def plain_run(cfg: TrainConfig, threads: int) -> dict[str, Any]:
    """The loop in this process (``train_local``): no Ray, no DeepSpeed."""
    from codebook.training.local import FolderReporter, fsm_loop_data, train_local
    from codebook.training.loop import Workers

    torch.set_num_threads(threads)
    reporter = FolderReporter(cfg.run_dir)
    with contextlib.redirect_stdout(sys.stderr):  # the loop's progress lines; stdout: the JSON
        summary = train_local(cfg, fsm_loop_data(cfg, Workers()), "cpu", reporter)
    rates = [(row["step"], row["tokens_per_s"]) for row in reporter.history
             if "tokens_per_s" in row]
    return {"windows": windows(rates), "wall_s": summary["wall_s"], "steps": summary["steps"],
            "tokens_per_step": summary["tokens"] // summary["steps"],
            "threads": torch.get_num_threads()}


def ray_run(cfg: TrainConfig) -> dict[str, Any]:
    """``fit(cfg)`` on the running Ray cluster; windows from the MLflow ``tokens_per_s``."""
    from mlflow.tracking import MlflowClient

    from codebook.ray_glue.train import TORCH_THREADS_METRIC, fit

    t0 = time.perf_counter()
    summary = fit(cfg)
    wall = time.perf_counter() - t0
    client = MlflowClient(cfg.tracking_uri())
    run_id = summary["mlflow_run_id"]
    rates = [(m.step, m.value) for m in client.get_metric_history(run_id, "tokens_per_s")]
    threads = client.get_metric_history(run_id, TORCH_THREADS_METRIC)
    return {"windows": windows(rates), "fit_wall_s": wall, "steps": summary["steps"],
            "worker_threads": int(threads[-1].value) if threads else -1}


def _median_ms(values_ms: list[float]) -> float:
    return statistics.median(values_ms) if values_ms else float("nan")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from codebook.ray_glue.session import ray_session

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="train-overhead-") as tmp:
        plain = plain_run(make_config(args, Path(tmp), plain=True), args.threads)
        cfg = make_config(args, Path(tmp))
        tokens_per_step = plain["tokens_per_step"] * cfg.run.num_workers
        t0 = time.perf_counter()
        with ray_session(address="local", num_cpus=max(args.threads, os.cpu_count() or 1),
                         include_dashboard=False, log_to_driver=args.verbose,
                         runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}}):
            ray_init_s = time.perf_counter() - t0
            rayrun = ray_run(cfg)
    plain_ms = [plain["tokens_per_step"] / tps * 1e3 for step, n, tps in plain["windows"]
                if step - n >= args.warmup]
    ray_ms = [tokens_per_step / tps * 1e3 for step, n, tps in rayrun["windows"]
              if step - n >= args.warmup]
    plain_step, ray_step = _median_ms(plain_ms), _median_ms(ray_ms)
    result = {
        "plain_step_ms": round(plain_step, 3),
        "ray_deepspeed_step_ms": round(ray_step, 3),
        "ratio": round(ray_step / plain_step, 4),
        "startup_s": round(rayrun["fit_wall_s"] - rayrun["steps"] * ray_step / 1e3, 2),
        "steps": rayrun["steps"],
        "tokens_per_step": tokens_per_step,
        "device": "cpu",
        "threads": plain["threads"],
        "worker_threads": rayrun["worker_threads"],
        "timed_steps": sum(n for step, n, _ in rayrun["windows"] if step - n >= args.warmup),
        "window": args.window,
        "ray_init_s": round(ray_init_s, 2),
        "fit_wall_s": round(rayrun["fit_wall_s"], 2),
        "plain_wall_s": round(plain["wall_s"], 2),
        "plain_startup_s": round(plain["wall_s"] - plain["steps"] * plain_step / 1e3, 2),
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "plain_windows_ms": [round(v, 2) for v in plain_ms],
        "ray_deepspeed_windows_ms": [round(v, 2) for v in ray_ms],
    }
    if result["worker_threads"] != result["threads"]:
        print(f"warning: {result['worker_threads']} torch threads in the Ray worker, "
              f"{result['threads']} in the plain run", file=sys.stderr)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
