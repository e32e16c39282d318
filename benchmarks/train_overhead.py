"""What Ray Train + DeepSpeed add to a training step, against a plain PyTorch loop.

Runs the real pipeline, ``pipelines.launch.fit`` (one Ray Train worker, DeepSpeed ZeRO-0, fp32,
on CPU) on a fresh local Ray cluster, and in the same process a plain single-process PyTorch loop
on the same model (``build_model``), optimizer and parameter groups (``make_optimizer``), the
same TokFSM batches and the same gradient clipping: forward, backward, clip, AdamW step. No Ray,
no DeepSpeed. Prints ONE JSON line on stdout:

* ``plain_step_ms`` / ``ray_deepspeed_step_ms``: steady-state step time, the median over log
  windows after warm-up of the window's mean step time. The loop logs ``tokens_per_s`` to MLflow
  every ``run.log_every`` (= ``--window``) steps; a window's step time is
  ``tokens_per_step / tokens_per_s``. The plain loop is timed over the same windows, and like the
  loop it keeps the per-window host-side bookkeeping (metrics read-out) out of the timing.
  Windows that start before ``--warmup`` steps (default: one window) are dropped;
* ``ratio`` = ``ray_deepspeed_step_ms / plain_step_ms``;
* ``startup_s`` = wall time of ``fit()`` minus ``steps * ray_deepspeed_step_ms``: Ray Train
  controller and worker start-up, process group, DeepSpeed initialisation, the first steps'
  warm-up beyond the steady state, plus the final eval, checkpoint and tear-down (eval and
  checkpoint run only at the last step, after the last timed window);
* ``steps``, ``tokens_per_step`` (``batch_size * seq_len * grad_accum * world``), ``device``,
  ``threads`` (torch threads of the plain loop) and ``worker_threads`` (``torch.get_num_threads()``
  inside the Ray Train worker's training thread, read back through MLflow), and some extras:
  ``timed_steps``, ``window``, ``ray_init_s``, ``fit_wall_s``, ``plain_setup_s`` and the per-window
  step times of both loops (``*_windows_ms``), to judge the noise.

Both loops use the same number of threads: the worker gets ``run.cpus_per_worker = threads`` and
``OMP_NUM_THREADS = threads`` (job runtime env), the plain loop ``torch.set_num_threads(threads)``.
The local Ray cluster starts without the dashboard; ``ray.init`` time is reported apart
(``ray_init_s``) and not part of ``startup_s``. ``load_avg_1m`` gives the 1-minute load average
before and after: with more busy threads than cores, a multi-threaded step waits on the scheduler
at every OpenMP parallel region (on a 2-core box at load ~7.5 the plain quick-mode step took
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
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from codebook.training.config import TrainConfig, load_config  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "fsm.yaml"
RUN_NAME = "train-overhead"
WORKER_THREADS_KEY = "bench/worker_threads"

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
                   help="torch threads in both loops (default: the CPUs available to this "
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


def make_config(args: argparse.Namespace, storage: Path) -> TrainConfig:
    bench = {  # the measured setting: one worker, ZeRO-0, fp32, CPU, no eval/checkpoint inside
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
        "run.name": RUN_NAME,
        "run.storage_path": str(storage),
        "run.max_steps": args.steps,
        "mlflow.tracking_uri": f"sqlite:///{storage / 'mlflow.db'}",
    }
    sets = [f"{k}={v}" for k, v in {**(QUICK_OVERRIDES if args.quick else {}), **bench}.items()]
    sets += list(args.set) + [f"{k}={v}" for k, v in forced.items()]
    cfg = load_config(args.config, sets)
    if cfg.data.source != "fsm":
        sys.exit("train_overhead: only data.source=fsm is supported (the plain loop needs no Ray)")
    for key in ("eval_every", "checkpoint_every"):
        if getattr(cfg.run, key) < cfg.run.max_steps:
            print(f"warning: run.{key}={getattr(cfg.run, key)} < max_steps: its time falls "
                  "into the timed windows of the Ray loop", file=sys.stderr)
    return cfg


# ---------------------------------------------------------------------- plain PyTorch loop
class _NoShardEngine:
    """The two engine methods ``kmeans_init`` / ``replace_dead_codes`` use, for plain params."""

    @contextmanager
    def full_params(self, params, modifier_rank=None):
        yield

    def set_param(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        with torch.no_grad():
            param.copy_(value)


def plain_loop(cfg: TrainConfig, threads: int) -> dict[str, Any]:
    """The same steps as ``codebook.training.loop.train`` does them, with no Ray or DeepSpeed.

    Returns the windows ``(last_step, steps_in_window, seconds)`` and the tokens per step.
    """
    from codebook.data.fsm import TokFSM
    from codebook.data.sources import fsm_train_batches
    from codebook.training.engine import make_optimizer
    from codebook.training.loop import Workers, build_model, kmeans_init, replace_dead_codes

    torch.set_num_threads(threads)
    t_setup = time.perf_counter()
    model = build_model(cfg)
    optimizer, scheduler = make_optimizer(model, cfg)
    model.train()
    model.set_step(0)
    cb, accum, clip = cfg.codebook, cfg.optim.grad_accum, cfg.optim.grad_clip
    params = list(model.parameters())
    engine, workers = _NoShardEngine(), Workers()
    batches = fsm_train_batches(TokFSM(cfg.data.fsm), cfg.optim.batch_size, cfg.run.seed, 0,
                                0, 1, cfg.data.eval_blocks)
    setup_s = time.perf_counter() - t_setup
    loss_sum = torch.zeros(3)
    windows: list[tuple[int, int, float]] = []
    tokens_per_step = 0
    step, window_steps, t0 = 0, 0, time.perf_counter()
    while step < cfg.run.max_steps:
        if step == cb.start_step and cb.kmeans_init_batches:
            kmeans_init(model, [next(batches) for _ in range(cb.kmeans_init_batches)], engine,
                        cfg, workers)
        for layer in model.codebooks.values():
            layer.enabled = step >= cb.start_step
        step_tokens = 0
        for _ in range(accum):
            ids = next(batches)["input_ids"]
            out = model(input_ids=ids, labels=ids)
            (out.loss / accum).backward()
            loss_sum += torch.stack([out.loss, out.lm_loss, out.recon_loss]).detach().float()
            step_tokens += ids.numel()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_per_step = step_tokens
        step += 1
        window_steps += 1
        model.set_step(step)
        if cb.dead_code_steps and step % cb.dead_code_steps == 0:
            replace_dead_codes(model, engine, cfg, workers)
        if step % cfg.run.log_every == 0 or step == cfg.run.max_steps or step == 1:
            windows.append((step, window_steps, time.perf_counter() - t0))
            loss_sum.tolist()  # the loop's per-window read-outs, outside the timing as there
            model.metrics(reset=True)
            loss_sum.zero_()
            window_steps, t0 = 0, time.perf_counter()
    return {"windows": windows, "tokens_per_step": tokens_per_step, "setup_s": setup_s,
            "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------- Ray Train + DeepSpeed
def _probe_worker_loop(config: dict[str, Any]) -> None:
    """``worker_loop`` plus one MLflow metric: torch threads in the worker's training thread.

    Defined in the script (pickled by value) and calling the real ``worker_loop``, which the
    worker imports unpatched.
    """
    import ray.train
    import torch

    from codebook.tracking import MLflowLogger
    from pipelines import launch

    if ray.train.get_context().get_world_rank() == 0 and config.get("mlflow_run_id"):
        MLflowLogger(config["tracking_uri"], config["mlflow_run_id"]).log(
            0, {WORKER_THREADS_KEY: float(torch.get_num_threads())})
    launch.worker_loop(config)


def ray_loop(cfg: TrainConfig) -> dict[str, Any]:
    """``fit(cfg)`` on the running Ray cluster; windows from the MLflow ``tokens_per_s``."""
    from mlflow.tracking import MlflowClient

    from pipelines import launch

    original = launch.worker_loop
    launch.worker_loop = _probe_worker_loop
    try:
        t0 = time.perf_counter()
        summary = launch.fit(cfg)
        wall = time.perf_counter() - t0
    finally:
        launch.worker_loop = original
    client = MlflowClient(cfg.tracking_uri())
    run_id = summary["mlflow_run_id"]
    rates = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "tokens_per_s"))
    threads = client.get_metric_history(run_id, WORKER_THREADS_KEY)
    windows, prev = [], 0
    for step, tokens_per_s in rates:
        windows.append((step, step - prev, tokens_per_s))
        prev = step
    return {"windows": windows, "fit_wall_s": wall, "steps": summary["steps"],
            "worker_threads": int(threads[-1].value) if threads else -1}


def _median_ms(values_ms: list[float]) -> float:
    return statistics.median(values_ms) if values_ms else float("nan")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="train-overhead-") as tmp:
        cfg = make_config(args, Path(tmp))
        plain = plain_loop(cfg, args.threads)
        seq_tokens = plain["tokens_per_step"]  # batch_size * seq_len * grad_accum, one process
        tokens_per_step = seq_tokens * cfg.run.num_workers
        plain_ms = [s / n * 1e3 for step, n, s in plain["windows"] if step - n >= args.warmup]
        try:
            t0 = time.perf_counter()
            ray.init(address="local", num_cpus=max(args.threads, os.cpu_count() or 1),
                     include_dashboard=False, log_to_driver=args.verbose,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}})
            ray_init_s = time.perf_counter() - t0
            rayrun = ray_loop(cfg)
        finally:
            ray.shutdown()
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
        "plain_setup_s": round(plain["setup_s"], 2),
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "plain_windows_ms": [round(v, 2) for v in plain_ms],
        "ray_deepspeed_windows_ms": [round(v, 2) for v in ray_ms],
    }
    if result["worker_threads"] != result["threads"]:
        print(f"warning: {result['worker_threads']} torch threads in the Ray worker, "
              f"{result['threads']} in the plain loop", file=sys.stderr)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
