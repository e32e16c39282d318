"""The fused score + top-k kernel on a device: exact against torch.topk, and its speed.

Correctness (one JSON line per case, ``"check": ...``): ``codebook.kernels.fused_topk`` against
``torch.topk`` over the fp32 scores of the same values (bf16 inputs upcast exactly), computed
here in float64 where the device allows. Per case: ``exact_rows`` (fraction of rows with the
same ids in the same order), ``equivalent_rows`` (rows whose chosen codes have the reference's
top-k scores, rank by rank, within ``tol``: ties and fp32 rounding may swap equal codes),
``barred_chosen`` and ``ok`` (``equivalent_rows == 1`` and ``exact_rows >= 0.999``). Cases: the
Pythia-410M per-head shape, sizes off the tiles, k = 1 and 64, each score, bf16 and fp32, barred
codes, ties; and the layer's fused and PyTorch paths (same codes, same gradients).

Speed (``--speed``, CUDA; one JSON line per shape and dtype, ``"speed": ...``): the fused
kernel (tuned tiles), the score matmul alone (``bmm``: bf16, or TF32 for fp32) as the floor, the
layer's PyTorch path and ``bmm`` + ``torch.topk``; ``ratio_to_matmul`` = fused / matmul.

On CPU (``--device cpu``) it runs under Triton's interpreter (set here before Triton is
imported), tiny shapes only, no speed: the GPU suite's ``--quick`` smoke test.

Usage::

    python benchmarks/fused_topk_check.py [--device cuda|cpu] [--speed] [--quick]

The exit status is 1 if any correctness case fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--speed", action="store_true", help="time the kernel (CUDA)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (the interpreter)")
    p.add_argument("--repeats", type=int, default=20)
    return p.parse_args(argv)


ARGS = parse_args()

import torch  # noqa: E402  (torch does not import Triton)
import torch.nn.functional as F  # noqa: E402

DEVICE = torch.device(ARGS.device or ("cuda" if torch.cuda.is_available() else "cpu"))
if DEVICE.type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

from codebook.kernels.fused_topk import fused_topk, interpreted  # noqa: E402
from codebook.layer import CodebookLayer  # noqa: E402

if DEVICE.type == "cpu" and not interpreted():
    sys.exit("fused_topk_check: Triton did not start in interpreter mode")
REF_DTYPE = torch.float64 if DEVICE.type == "cuda" or ARGS.quick else torch.float32


def reference(x, codes, k, score, disabled=None):
    """torch.topk over the exact scores (float64) of the same values, and those scores."""
    x, c = x.to(REF_DTYPE), codes.to(REF_DTYPE)
    if score == "cosine":
        s = torch.einsum("ngd,gcd->ngc", x, F.normalize(c, dim=-1))
    elif score == "inner":
        s = torch.einsum("ngd,gcd->ngc", x, c)
    else:
        s = 2 * torch.einsum("ngd,gcd->ngc", x, c) - c.pow(2).sum(-1).unsqueeze(0)
    if disabled is not None:
        s = s.masked_fill(disabled.unsqueeze(0), float("-inf"))
    return s, s.topk(k, dim=-1)


def check(name, x, codes, k, score, disabled=None, tol=1e-5, ties=False):
    """One case; ``ties``: equal scores by construction, so only equivalence is required."""
    ids, vals = fused_topk(x, codes, k, score, disabled)
    s, ref = reference(x, codes, k, score, disabled)
    chosen = s.gather(-1, ids)
    scale = (x.to(REF_DTYPE).norm(dim=-1, keepdim=True)
             * codes.to(REF_DTYPE).norm(dim=-1).amax(-1).view(1, -1, 1))
    if score == "euclidean":
        scale = scale * 2 + codes.to(REF_DTYPE).pow(2).sum(-1).amax(-1).view(1, -1, 1)
    close = (chosen - ref.values).abs() <= tol * scale + 1e-30
    close |= torch.isinf(chosen) & (chosen == ref.values)
    exact = (ids == ref.indices).all(-1).float().mean().item()
    equivalent = close.all(-1).float().mean().item()
    barred = 0 if disabled is None else int(disabled.unsqueeze(0).expand(
        ids.shape[0], -1, -1).gather(-1, ids).sum())
    row = {"check": name, "shape": list(x.shape), "num_codes": codes.shape[1], "k": k,
           "score": score, "dtype": str(x.dtype).removeprefix("torch."),
           "exact_rows": round(exact, 6), "equivalent_rows": round(equivalent, 6),
           "barred_chosen": barred, "device": DEVICE.type, "interpreted": interpreted()}
    row["ok"] = equivalent == 1.0 and (ties or exact >= 0.999) and barred == 0
    print(json.dumps(row), flush=True)
    return row["ok"]


def check_layer(name, score, dtype, n, dim, groups, num_codes, k):
    """The layer's fused and PyTorch paths: the same codes, outputs and gradients."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(n, dim, generator=gen).to(DEVICE, dtype)
    g = torch.randn(n, dim, generator=gen).to(DEVICE, dtype)
    codes = torch.randn(groups, num_codes, dim // groups, generator=gen)
    got = {}
    for backend in ("torch", "triton"):
        layer = CodebookLayer(dim, num_codes, k, groups, score, select_backend=backend)
        with torch.no_grad():
            layer.codes.copy_(codes)
        layer = layer.to(DEVICE, dtype).train()
        layer.recording = True
        x = x0.clone().requires_grad_(True)
        out = layer(x)
        ((out.float() * g.float()).sum() + layer.last_losses.recon).backward()
        got[backend] = (layer.recorded_codes[0], out.detach(), x.grad, layer.codes.grad)
    same_ids = (got["torch"][0] == got["triton"][0]).all(-1).float().mean().item()
    same_grads = all(torch.equal(a, b) for a, b in zip(got["torch"][1:], got["triton"][1:],
                                                       strict=True))
    row = {"check": name, "layer": True, "score": score, "dtype": str(dtype)[6:],
           "same_ids_rows": round(same_ids, 6), "same_out_and_grads": same_grads,
           "device": DEVICE.type, "ok": same_ids >= 0.999 and (same_grads or same_ids < 1)}
    print(json.dumps(row), flush=True)
    return row["ok"]


def correctness() -> bool:
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    ok = True
    if ARGS.quick:  # the script's plumbing on tiny shapes (tests/test_fused_topk.py: the rest)
        shapes = {"head": (40, 2, 16, 150, 4), "edge": (19, 3, 20, 75, 5),
                  "k1": (20, 1, 40, 70, 1), "k64": (16, 1, 16, 96, 64)}
        grid = [(torch.bfloat16, "head", "cosine"), (torch.float32, "k1", "euclidean"),
                (torch.float32, "k64", "inner")]
        layers = [("euclidean", torch.bfloat16)]
    else:
        shapes = {"head": (4096, 16, 64, 10000, 8), "edge": (1000, 3, 40, 3001, 5),
                  "k1": (4096, 4, 32, 3000, 1), "k64": (2048, 2, 64, 10000, 64)}
        grid = [(dtype, "head", score) for dtype in (torch.bfloat16, torch.float32)
                for score in ("inner", "cosine", "euclidean")]
        grid += [(dtype, name, score) for dtype in (torch.bfloat16, torch.float32)
                 for name, score in (("edge", "cosine"), ("k1", "euclidean"), ("k64", "inner"))]
        layers = [(score, dtype) for score in ("cosine", "euclidean")
                  for dtype in (torch.bfloat16, torch.float32)]
    for dtype, name, score in grid:
        n, g, d, c, k = shapes[name]
        label = f"{name}_{score}" if name == "head" else name
        ok &= check(label, rand(n, g, d, dtype=dtype), rand(g, c, d, dtype=dtype), k, score)
    n, g, d, c, k = shapes["edge"]
    barred = torch.rand(g, c, generator=gen).to(DEVICE) < 0.5
    ok &= check("barred", rand(n, g, d), rand(g, c, d), k, "euclidean", barred)
    half = rand(g, c // 2, d)
    ok &= check("ties", rand(n, g, d), torch.cat([half, half], dim=1), 6, "inner",
                ties=True)
    size = (40, 32, 2, 100, 3) if ARGS.quick else (2048, 1024, 16, 10000, 8)
    for score, dtype in layers:
        ok &= check_layer(f"layer_{score}", score, dtype, *size)
    return ok


def _time(fn, repeats):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def speed() -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    for n, g, d, c, k, score in [(8192, 16, 64, 10000, 8, "cosine"),
                                 (8192, 16, 64, 10000, 1, "cosine"),
                                 (8192, 1, 1024, 10000, 8, "cosine"),
                                 (8192, 16, 64, 10000, 64, "cosine")]:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(n, g, d, device=DEVICE, dtype=dtype)
            codes = torch.randn(g, c, d, device=DEVICE, dtype=dtype)
            xg, ct = x.transpose(0, 1).contiguous(), codes.transpose(1, 2).contiguous()
            layer = CodebookLayer(g * d, c, k, g, score, select_backend="torch").to(DEVICE, dtype)
            with torch.no_grad():
                layer.codes.copy_(codes)
            started = time.perf_counter()
            fused_topk(x, codes, k, score)  # tunes once per shape
            torch.cuda.synchronize()
            tune_s = time.perf_counter() - started
            fused = _time(lambda x=x, codes=codes, k=k, s=score: fused_topk(x, codes, k, s),
                          ARGS.repeats)
            matmul = _time(lambda xg=xg, ct=ct: torch.bmm(xg, ct), ARGS.repeats)
            torch_path = _time(lambda x=x, layer=layer: layer.select(x), ARGS.repeats)
            topk = _time(lambda xg=xg, ct=ct, k=k: torch.bmm(xg, ct).topk(k, dim=-1),
                         ARGS.repeats)
            flops = 2 * n * g * d * c
            print(json.dumps({
                "speed": "fused_topk", "tokens": n, "groups": g, "group_dim": d,
                "num_codes": c, "k": k, "score": score, "dtype": str(dtype)[6:],
                "fused_ms": round(fused, 3), "matmul_ms": round(matmul, 3),
                "torch_path_ms": round(torch_path, 3), "matmul_topk_ms": round(topk, 3),
                "ratio_to_matmul": round(fused / matmul, 3),
                "speedup_vs_torch_path": round(torch_path / fused, 3),
                "fused_tflops": round(flops / fused / 1e9, 1), "tune_s": round(tune_s, 1),
                "device": torch.cuda.get_device_name(DEVICE)}), flush=True)


def main() -> None:
    ok = correctness()
    if ARGS.speed and DEVICE.type == "cuda":
        speed()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
