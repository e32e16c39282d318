"""Runs the fused score + top-k kernel under Triton's interpreter, in a process of its own;
or compiles it for an H100/H200 (sm_90) without a GPU.

``TRITON_INTERPRET=1`` must be set before Triton is first imported (Triton reads it at import
and when a kernel is defined), so the tests (tests/test_fused_topk.py) hand their inputs to this
script in a fresh process rather than switching the interpreter on in the pytest process::

    python tests/kernel_helpers.py IN.pt OUT.pt

``IN.pt`` (``torch.save``, plain tensors and numbers only) maps case names to a case: ``kind``
``"topk"`` runs ``fused_topk`` on ``x``, ``codes``, ``k``, ``score`` (optional ``disabled``);
``"layer"`` builds a ``CodebookLayer`` from ``dim``, ``num_codes``, ``k``, ``groups``, ``score``,
loads ``codes``, and runs forward + backward of ``(out * grad).sum() + recon`` on ``x`` once
with ``select_backend="torch"`` and once with ``"triton"``; ``"error"`` calls ``fused_topk``
with ``k`` and records the error message. ``OUT.pt`` maps each case to what it produced; the
tests compare that against ``torch.topk`` themselves.

    python tests/kernel_helpers.py --compile OUT.json

compiles the kernel (not interpreted) for sm_90 in the configurations listed in ``COMPILE`` and
writes, per configuration, whether a cubin came out and ptxas's register and spill counts
(``ptxas -v`` from Triton's own toolchain, when it ships one that reads Triton's PTX).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if "--compile" not in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_topk(case: dict) -> dict:
    from codebook.kernels.fused_topk import fused_topk

    ids, vals = fused_topk(case["x"], case["codes"], int(case["k"]), case["score"],
                           case.get("disabled"))
    return {"ids": ids, "vals": vals}


def run_layer(case: dict) -> dict:
    from codebook.layer import CodebookLayer

    result = {}
    for backend in ("torch", "triton"):
        layer = CodebookLayer(int(case["dim"]), int(case["num_codes"]), int(case["k"]),
                              int(case["groups"]), case["score"], select_backend=backend)
        with torch.no_grad():
            layer.codes.copy_(case["codes"])
        layer = layer.to(case["x"].dtype).train()
        x = case["x"].clone().requires_grad_(True)
        layer.recording = True
        out = layer(x)
        ((out.float() * case["grad"]).sum() + layer.last_losses.recon).backward()
        result[backend] = {"out": out.detach(), "ids": layer.recorded_codes[0],
                           "x_grad": x.grad, "codes_grad": layer.codes.grad}
    return result


# (name, dtype, k, d, score id, barred codes, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
COMPILE = [
    ("bf16_cosine_k8_d64", "bf16", 8, 64, 1, False, 64, 64, 64, 4, 3),  # one K step
    ("fp32_euclidean_k64_d40_barred", "fp32", 64, 40, 2, True, 64, 64, 32, 8, 2),  # K loop
]


def compile_for_sm90(out_path: str) -> None:
    import glob
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from codebook.kernels.fused_topk import _fused_topk_kernel as kernel

    pointers = ["x_ptr", "c_ptr", "aux_ptr", "mask_ptr", "idx_ptr", "val_ptr"]
    ints = ["N", "C", "D", "sxn", "sxg", "sxd", "scg", "scc", "scd"]
    ptxas = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends",
                                          "nvidia", "bin", "ptxas*")), reverse=True)
    results = {}
    for name, dtype, k, d, score, barred, bm, bn, bk, warps, stages in COMPILE:
        types = [f"*{dtype}", f"*{dtype}", "*fp32", "*u8" if barred else "*fp32", "*i64",
                 "*fp32"]
        signature = {**dict(zip(pointers, types, strict=True)), **dict.fromkeys(ints, "i32")}
        constants = {"K": k, "KP": max(2, triton.next_power_of_2(k)), "SCORE": score,
                     "HAS_MASK": barred, "UPCAST": False,
                     "PRECISION": None if dtype == "bf16" else "tf32x3", "SINGLE_K": bk >= d,
                     "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
        signature.update(dict.fromkeys(constants, "constexpr"))
        source = ASTSource(fn=kernel, signature=signature, constexprs={
            (kernel.arg_names.index(key),): value for key, value in constants.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": warps, "num_stages": stages})
        row = {"cubin_bytes": len(compiled.asm.get("cubin", b"")), "registers": None,
               "spill_bytes": None}
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
            fh.write(compiled.asm["ptx"])
        for tool in ptxas:  # the newest that reads this PTX version
            proc = subprocess.run([tool, "-v", "--gpu-name", "sm_90a", fh.name, "-o",
                                   fh.name + ".cubin"], capture_output=True, text=True)
            if proc.returncode == 0:
                regs = re.findall(r"Used (\d+) registers", proc.stderr)
                spills = re.findall(r"(\d+) bytes spill stores", proc.stderr)
                row.update(registers=int(regs[0]) if regs else None,
                           spill_bytes=int(spills[0]) if spills else None)
                break
        results[name] = row
    import json

    Path(out_path).write_text(json.dumps(results))


def main(argv: list[str]) -> None:
    if argv[0] == "--compile":
        compile_for_sm90(argv[1])
        return
    from codebook.kernels.fused_topk import interpreted

    cases = torch.load(argv[0], weights_only=True)
    if not interpreted():
        sys.exit("kernel_helpers: Triton did not start in interpreter mode")
    out: dict = {}
    for name, case in cases.items():
        if case["kind"] == "topk":
            out[name] = run_topk(case)
        elif case["kind"] == "layer":
            out[name] = run_layer(case)
        elif case["kind"] == "error":
            from codebook.kernels.fused_topk import fused_topk

            try:
                fused_topk(case["x"], case["codes"], int(case["k"]), case["score"])
                out[name] = {"error": ""}
            except ValueError as err:
                out[name] = {"error": str(err)}
    torch.save(out, argv[1])


if __name__ == "__main__":
    main(sys.argv[1:])
