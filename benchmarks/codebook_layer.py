"""Benchmark one ``CodebookLayer`` training step against its floor: bare matmul + top-k.

For each configuration this prints one JSON line with

* ``fwd_bwd_ms``: the layer's forward in train mode plus the backward of
  ``(out * g).sum() + layer.last_losses.recon`` (median of ``--repeats`` after warm-up);
* ``matmul_topk_ms``: the bare scoring ``x @ C.T`` (a batched matmul over groups) followed by
  ``topk(k)`` for the same shapes, measured in the same run, interleaved with the layer step;
* ``ratio_to_floor`` = ``fwd_bwd_ms / matmul_topk_ms``;
* ``peak_mem_mb`` / ``floor_peak_mem_mb``: peak memory allocated above what was live before the
  step (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the allocator's records from
  ``torch.profiler`` with ``profile_memory=True``, summed in time order);
* ``device``, ``threads`` (``torch.get_num_threads()``) and the shapes.

Usage::

    python benchmarks/codebook_layer.py [--device cpu|cuda] [--repeats N] [--quick]

On CPU the grouped 16-head configuration runs 1024 tokens rather than 4096 (a 4096-token step
scores 16 x 4096 x 10000 and takes seconds on two cores); its line then carries
``"tokens_reduced_from": 4096``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codebook.layer import CodebookLayer  # noqa: E402

FULL = [
    dict(tokens=4096, dim=64, num_codes=10000, k=8, groups=1),
    dict(tokens=4096, dim=1024, num_codes=10000, k=8, groups=16),
]
QUICK = [
    dict(tokens=256, dim=32, num_codes=512, k=4, groups=1),
    dict(tokens=128, dim=64, num_codes=256, k=4, groups=4),
]
CPU_GROUPED_TOKENS = 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _peak_mem_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak bytes allocated by ``fn`` above what was live when it started, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def bench(cfg: dict, device: torch.device, repeats: int, warmup: int) -> dict:
    tokens, dim, num_codes, k, groups = (
        cfg["tokens"], cfg["dim"], cfg["num_codes"], cfg["k"], cfg["groups"]
    )
    torch.manual_seed(0)
    layer = CodebookLayer(dim, num_codes, k, groups).to(device).train()
    x = torch.randn(tokens, dim, device=device, requires_grad=True)
    g = torch.randn(tokens, dim, device=device)

    def step() -> None:
        layer.codes.grad = None
        x.grad = None
        out = layer(x)
        ((out * g).sum() + layer.last_losses.recon).backward()

    codes = layer.codes.detach().clone()
    if groups == 1:
        xf, cf = x.detach().clone(), codes[0].contiguous()

        def floor() -> None:
            (xf @ cf.T).topk(k, dim=-1)
    else:
        xg = x.detach().reshape(tokens, groups, dim // groups).transpose(0, 1).contiguous()
        ct = codes.transpose(1, 2).contiguous()

        def floor() -> None:
            torch.bmm(xg, ct).topk(k, dim=-1)

    with torch.no_grad():
        for _ in range(warmup):
            floor()
    for _ in range(warmup):
        step()
    fwd_bwd, base = [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits both
        with torch.no_grad():
            base.append(_time_ms(floor, device))
        fwd_bwd.append(_time_ms(step, device))
    with torch.no_grad():
        floor_mem = _peak_mem_mb(floor, device)
    layer.codes.grad = x.grad = layer.last_losses = None  # free last step's tensors first
    step_mem = _peak_mem_mb(step, device)
    fwd_bwd_ms, floor_ms = statistics.median(fwd_bwd), statistics.median(base)
    result = dict(cfg)
    result.update(
        score_chunk_tokens=layer.score_chunk_tokens,
        fwd_bwd_ms=round(fwd_bwd_ms, 3),
        matmul_topk_ms=round(floor_ms, 3),
        ratio_to_floor=round(fwd_bwd_ms / floor_ms, 3),
        # minima are less sensitive to other jobs on a shared machine than medians
        fwd_bwd_min_ms=round(min(fwd_bwd), 3),
        matmul_topk_min_ms=round(min(base), 3),
        peak_mem_mb=round(step_mem, 2),
        floor_peak_mem_mb=round(floor_mem, 2),
        device=str(device),
        threads=torch.get_num_threads(),
        repeats=repeats,
    )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per configuration (default 5; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke test")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.quick else 5)
    for cfg in QUICK if args.quick else FULL:
        cfg = dict(cfg)
        reduced = None
        if device.type == "cpu" and cfg["groups"] > 1 and cfg["tokens"] > CPU_GROUPED_TOKENS:
            reduced, cfg["tokens"] = cfg["tokens"], CPU_GROUPED_TOKENS
        result = bench(cfg, device, repeats, args.warmup)
        if reduced is not None:
            result["tokens_reduced_from"] = reduced
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
