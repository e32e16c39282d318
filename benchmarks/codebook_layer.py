"""Benchmark one ``CodebookLayer`` training step against its floors, measured in the same run.

For each configuration this prints one JSON line with

* ``fwd_bwd_ms``: the layer's forward in train mode plus the backward of
  ``(out * g).sum() + layer.last_losses.recon`` (median of ``--repeats`` after warm-up);
* ``matmul_ms``: the score matmul alone, ``x @ C.T`` batched over groups, the fastest way this
  device runs it: on CUDA one ``bmm`` (TF32 for fp32, or bf16: ``--dtype``); on CPU the faster of
  one ``bmm`` and the same ``bmm`` in chunks of rows into one reused buffer (a fresh
  score-sized output pays page faults on every call); ``matmul_full_ms`` is the one-go ``bmm``;
* ``matmul_topk_ms``: one ``bmm`` over all rows followed by ``torch.topk(k)`` (the floor the
  CPU target is set against, and the old benchmark's only floor);
* ``ratio_to_matmul`` = ``fwd_bwd_ms / matmul_ms`` and ``ratio_to_floor`` =
  ``fwd_bwd_ms / matmul_topk_ms``; all timings are interleaved, so drift in machine load hits
  each alike; on CPU the same from this process's CPU time (``*_cpu_ms``, ``cpu_ratio_*``):
  with ``--threads 1`` what each costs, whatever other jobs take of a shared machine;
* ``select``: ``fused`` (the Triton kernel, CUDA) or ``torch`` (``--backend`` picks; ``both``
  runs each), ``score``, ``dtype``, ``score_chunk_tokens`` (None: the layer's per-device
  choice) and ``chunk_rows`` (the rows it scores at once), ``peak_mem_mb`` /
  ``floor_peak_mem_mb`` (peak memory above what was live before: CUDA
  ``max_memory_allocated``; CPU the allocator's records from ``torch.profiler``), ``device``,
  ``threads`` and the shapes.

With ``--profile`` it also prints, per configuration, a ``torch.profiler`` table of one forward
and backward by kernel (CUDA kernels by device time; CPU operators by self time), and one JSON
line ``{"profile": ..., "top": [[name, ms, calls], ...]}``.

``--chunk-bytes 2M,8M,32M`` (CPU) runs each configuration once per score-chunk budget (rows =
bytes / (4 x num_codes)) instead of the layer's default: how ``codebook.layer.CHUNK_BYTES`` was
chosen.

Usage::

    python benchmarks/codebook_layer.py [--device cpu|cuda] [--dtype fp32|bf16] [--repeats N]
        [--backend auto|torch|both] [--profile] [--quick] [--only NAME,...]

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

FULL = [  # name: the Pythia-410M per-head site, a one-codebook site, the FSM default's sites
    dict(name="one_k8", tokens=4096, dim=64, num_codes=10000, k=8, groups=1, score="cosine"),
    dict(name="one_k1", tokens=4096, dim=64, num_codes=10000, k=1, groups=1, score="cosine"),
    dict(name="heads16_k8", tokens=4096, dim=1024, num_codes=10000, k=8, groups=16,
         score="cosine"),
    dict(name="fsm_heads", tokens=4096, dim=128, num_codes=3000, k=1, groups=4,
         score="euclidean"),
    dict(name="fsm_mlp", tokens=4096, dim=128, num_codes=3000, k=1, groups=1,
         score="euclidean"),
]
QUICK = [
    dict(name="quick_one", tokens=256, dim=32, num_codes=512, k=4, groups=1, score="cosine"),
    dict(name="quick_heads", tokens=128, dim=64, num_codes=256, k=4, groups=4,
         score="euclidean"),
]
CPU_GROUPED_TOKENS = 1024
OLD_LAYER = not hasattr(CodebookLayer, "chunk_rows")  # run against an older checkout
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], object], device: torch.device,
             cpu_times: list[float] | None = None) -> float:
    """Wall ms of ``fn``; this process's CPU ms appended to ``cpu_times`` if given."""
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    if cpu_times is not None:
        cpu_times.append((time.process_time() - cpu_start) * 1e3)
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


def profile_step(step: Callable[[], None], device: torch.device, name: str,
                 rows: int = 15) -> dict:
    """One forward + backward under ``torch.profiler``: the table printed, the top entries
    returned (CUDA: kernels by device time; CPU: operators by self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    step()  # warm
    _sync(device)
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    events = prof.key_averages()
    if device.type == "cuda":
        sort_key = "self_cuda_time_total" if hasattr(events[0], "self_cuda_time_total") \
            else "self_device_time_total"
        kernels = [e for e in events if getattr(e, "device_type", None) is not None
                   and str(e.device_type).endswith("CUDA")] or events

        def self_us(e):
            return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
    else:
        sort_key, kernels = "self_cpu_time_total", events

        def self_us(e):
            return e.self_cpu_time_total
    print(f"# profile {name}: one forward + backward, by {sort_key}", file=sys.stderr)
    print(events.table(sort_by=sort_key, row_limit=rows), file=sys.stderr)
    top = sorted(kernels, key=self_us, reverse=True)[:rows]
    return {"profile": name, "device": device.type, "sort": sort_key,
            "total_ms": round(sum(self_us(e) for e in kernels) / 1e3, 3),
            "top": [[e.key[:80], round(self_us(e) / 1e3, 3), e.count] for e in top]}


def bench(cfg: dict, device: torch.device, dtype: torch.dtype, backend: str, repeats: int,
          warmup: int, chunk_rows: int | None = None, profile: bool = False) -> dict:
    tokens, dim, num_codes, k, groups = (
        cfg["tokens"], cfg["dim"], cfg["num_codes"], cfg["k"], cfg["groups"]
    )
    torch.manual_seed(0)
    options = {"score_chunk_tokens": chunk_rows, "select_backend": backend}
    if OLD_LAYER:  # the layer before issue 27 (measuring the code it replaced)
        options = {"score_chunk_tokens": chunk_rows or 4096}
    layer = CodebookLayer(dim, num_codes, k, groups, cfg["score"], **options)
    layer = layer.to(device=device, dtype=dtype).train()
    x = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, dim, device=device, dtype=dtype)
    fused = not OLD_LAYER and layer._fused_applies(x.detach().reshape(tokens, groups, -1), k)

    def step() -> None:
        layer.codes.grad = None
        x.grad = None
        out = layer(x)
        ((out * g).sum() + layer.last_losses.recon).backward()

    codes = layer.codes.detach().clone()
    xg = x.detach().reshape(tokens, groups, dim // groups).transpose(0, 1).contiguous()
    ct = codes.transpose(1, 2).contiguous()
    rows = (chunk_rows or 8 * 2**20 // (4 * num_codes)) if OLD_LAYER else layer.chunk_rows(device)
    buf = torch.empty(min(rows, tokens) * num_codes, device=device, dtype=dtype)

    def matmul_full() -> None:
        torch.bmm(xg, ct)

    def matmul_chunked() -> None:  # as the CPU path scores: a group at a time, in-cache chunks
        for j in range(groups):
            for xc in xg[j].split(rows):
                torch.mm(xc, ct[j], out=buf[: xc.shape[0] * num_codes].view(-1, num_codes))

    def matmul_topk() -> None:
        torch.bmm(xg, ct).topk(k, dim=-1)

    timers: dict[str, list[float]] = {"step": [], "full": [], "chunked": [], "topk": []}
    cpu: dict[str, list[float]] = {name: [] for name in timers}
    floors = {"full": matmul_full, "topk": matmul_topk}
    if device.type == "cpu":
        floors["chunked"] = matmul_chunked
    with torch.no_grad():
        for _ in range(warmup):
            for fn in floors.values():
                fn()
    for _ in range(warmup):
        step()
    for _ in range(repeats):  # interleaved, so drift in machine load hits all alike
        with torch.no_grad():
            for name, fn in floors.items():
                timers[name].append(_time_ms(fn, device, cpu[name]))
        timers["step"].append(_time_ms(step, device, cpu["step"]))
    with torch.no_grad():
        floor_mem = _peak_mem_mb(matmul_topk, device)
    layer.codes.grad = x.grad = layer.last_losses = None  # free last step's tensors first
    step_mem = _peak_mem_mb(step, device)
    med = {name: statistics.median(v) for name, v in timers.items() if v}
    matmul_ms = min(med["full"], med.get("chunked", float("inf")))
    result = {key: cfg[key] for key in ("name", "tokens", "dim", "num_codes", "k", "groups",
                                        "score")}
    result.update(
        dtype=str(dtype).removeprefix("torch."),
        select="fused" if fused else ("torch_before_27" if OLD_LAYER else "torch"),
        score_chunk_tokens=chunk_rows,
        chunk_rows=rows,
        fwd_bwd_ms=round(med["step"], 3),
        matmul_ms=round(matmul_ms, 3),
        matmul_full_ms=round(med["full"], 3),
        matmul_topk_ms=round(med["topk"], 3),
        ratio_to_matmul=round(med["step"] / matmul_ms, 3),
        ratio_to_floor=round(med["step"] / med["topk"], 3),
        # minima are less sensitive to other jobs on a shared machine than medians
        fwd_bwd_min_ms=round(min(timers["step"]), 3),
        matmul_min_ms=round(min(min(timers["full"]), min(timers["chunked"] or [1e30])), 3),
        matmul_topk_min_ms=round(min(timers["topk"]), 3),
        peak_mem_mb=round(step_mem, 2),
        floor_peak_mem_mb=round(floor_mem, 2),
        device=str(device),
        threads=torch.get_num_threads(),
        repeats=repeats,
    )
    if "chunked" in med:
        result["matmul_chunked_ms"] = round(med["chunked"], 3)
    if device.type == "cpu":  # CPU time: with one thread, robust to other jobs on the machine
        cmed = {name: statistics.median(v) for name, v in cpu.items() if v}
        cpu_matmul = min(cmed["full"], cmed.get("chunked", float("inf")))
        result.update(fwd_bwd_cpu_ms=round(cmed["step"], 3), matmul_cpu_ms=round(cpu_matmul, 3),
                      matmul_topk_cpu_ms=round(cmed["topk"], 3),
                      cpu_ratio_to_matmul=round(cmed["step"] / cpu_matmul, 3),
                      cpu_ratio_to_floor=round(cmed["step"] / cmed["topk"], 3))
    if profile:
        result["_profile"] = profile_step(step, device, f"{cfg['name']} {result['select']} "
                                                        f"{result['dtype']}")
    return result


def _bytes(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="activations and codes (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--backend", choices=["auto", "torch", "both"], default="auto",
                        help="selection: auto (fused kernel on CUDA), torch, or both in turn")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per configuration (default 5; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke test")
    parser.add_argument("--only", default=None, help="comma-separated configuration names")
    parser.add_argument("--profile", action="store_true",
                        help="print a torch.profiler breakdown of one forward + backward")
    parser.add_argument("--chunk-bytes", default=None,
                        help="comma-separated score-chunk budgets to sweep (e.g. 2M,8M,32M)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":  # the fp32 floor in TF32, as a tuned run would have it
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    repeats = args.repeats or (3 if args.quick else 5)
    backends = ["auto", "torch"] if args.backend == "both" else [args.backend]
    configs = QUICK if args.quick else FULL
    if args.only:
        wanted = set(args.only.split(","))
        configs = [c for c in configs if c["name"] in wanted]
    budgets = [None] if not args.chunk_bytes else [_bytes(b) for b in args.chunk_bytes.split(",")]
    for cfg in configs:
        cfg = dict(cfg)
        reduced = None
        if device.type == "cpu" and cfg["groups"] > 1 and cfg["tokens"] > CPU_GROUPED_TOKENS \
                and cfg["num_codes"] >= 10000:
            reduced, cfg["tokens"] = cfg["tokens"], CPU_GROUPED_TOKENS
        for backend in backends:
            for budget in budgets:
                rows = None if budget is None else max(1, budget // (4 * cfg["num_codes"]))
                result = bench(cfg, device, dtype, backend, repeats, args.warmup, rows,
                               args.profile and budget == budgets[0])
                if budget is not None:
                    result["chunk_bytes"] = budget
                if reduced is not None:
                    result["tokens_reduced_from"] = reduced
                prof = result.pop("_profile", None)
                print(json.dumps(result), flush=True)
                if prof is not None:
                    print(json.dumps(prof), flush=True)


if __name__ == "__main__":
    main()
