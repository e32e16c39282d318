"""The fused score + top-k kernel (codebook.kernels.fused_topk) against torch.topk, without a GPU.

The kernel runs under Triton's interpreter on CPU tensors, in one subprocess for the whole module
(tests/kernel_helpers.py: the interpreter must be on before Triton is imported); the references
are computed here, in float64. Shapes are small but cross several tiles (the interpreter's tiles
are 16 rows x 32 codes x 16 dims): sizes that are not multiples of a tile, k = 1 and k = 64,
each score, several groups, bf16, ties, barred codes, and the layer's two paths. What the
interpreter does not run, Triton's compiler does: the kernel is compiled for sm_90 (H100/H200)
here, without a GPU, to a cubin with no register spills. What needs the GPU itself (the bf16
tensor-core product as it executes, the tuned tile sizes, the speed) is checked by
benchmarks/fused_topk_check.py in benchmarks/gpu_suite.sh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from codebook.layer import CodebookLayer

pytest.importorskip("triton")  # the optional 'kernels' extra (installed with 'dev')
pytestmark = pytest.mark.xdist_group("fused_topk")  # one worker: one interpreter subprocess

RUNNER = Path(__file__).with_name("kernel_helpers.py")
SCORES = ("inner", "cosine", "euclidean")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def topk_case(n, g, d, c, k, score, dtype=torch.float32, seed=0, disabled=None, codes=None):
    gen = _gen(seed)
    x = torch.randn(n, g, d, generator=gen).to(dtype)
    if codes is None:
        codes = torch.randn(g, c, d, generator=gen)
    case = {"kind": "topk", "x": x, "codes": codes.to(dtype), "k": k, "score": score}
    if disabled is not None:
        case["disabled"] = disabled
    return case


def layer_case(score, dtype=torch.float32, seed=0):
    gen = _gen(seed)
    n, dim, groups, num_codes, k = 20, 32, 2, 100, 3
    return {"kind": "layer", "dim": dim, "num_codes": num_codes, "k": k, "groups": groups,
            "score": score, "x": torch.randn(n, dim, generator=gen).to(dtype),
            "codes": torch.randn(groups, num_codes, dim // groups, generator=gen),
            "grad": torch.randn(n, dim, generator=gen)}


def tied_codes(g=2, half=32, d=16, seed=5):
    """Each code twice: code j and code j + half are equal, so scores come in tied pairs."""
    base = torch.randn(g, half, d, generator=_gen(seed))
    return torch.cat([base, base], dim=1)


MASK = torch.rand(2, 90, generator=_gen(9)) < 0.4

CASES = {
    **{f"edge_{s}": topk_case(19, 2, 20, 75, 5, s, seed=1) for s in SCORES},
    **{f"k1_{s}": topk_case(20, 1, 40, 70, 1, s, seed=2) for s in SCORES},
    "k64": topk_case(16, 1, 16, 96, 64, "inner", seed=3),
    **{f"bf16_{s}": topk_case(12, 4, 32, 70, 8, s, torch.bfloat16, seed=4) for s in SCORES},
    "ties": topk_case(20, 2, 16, 64, 5, "inner", seed=6, codes=tied_codes()),
    "masked": topk_case(30, 2, 16, 90, 4, "euclidean", seed=7, disabled=MASK),
    **{f"layer_{s}": layer_case(s, seed=8) for s in SCORES},
    "layer_bf16": layer_case("euclidean", torch.bfloat16, seed=10),
    "error_k": {"kind": "error", "x": torch.zeros(4, 1, 16), "codes": torch.zeros(1, 100, 16),
                "k": 65, "score": "inner"},
}


@pytest.fixture(scope="module")
def kernel_out(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("fused_topk")
    torch.save(CASES, folder / "in.pt")
    proc = subprocess.run([sys.executable, str(RUNNER), str(folder / "in.pt"),
                           str(folder / "out.pt")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(folder / "out.pt", weights_only=True)


def true_scores(case: dict) -> torch.Tensor:
    """(n, groups, codes) float64 scores in the score's own terms: cosine similarity, inner
    product, negative euclidean distance; barred codes -inf."""
    x, c = case["x"].double(), case["codes"].double()
    if case["score"] == "cosine":
        s = torch.einsum("ngd,gcd->ngc", F.normalize(x, dim=-1), F.normalize(c, dim=-1))
    elif case["score"] == "inner":
        s = torch.einsum("ngd,gcd->ngc", x, c)
    else:
        s = -(x.unsqueeze(2) - c.unsqueeze(0)).pow(2).sum(-1).sqrt()
    if "disabled" in case:
        s = s.masked_fill(case["disabled"].unsqueeze(0), float("-inf"))
    return s


def kernel_units(case: dict) -> torch.Tensor:
    """The kernel's reported scores, recomputed in float64: x.c, x.c/|c|, 2x.c - |c|^2."""
    x, c = case["x"].double(), case["codes"].double()
    dot = torch.einsum("ngd,gcd->ngc", x, c)
    if case["score"] == "cosine":
        return dot / c.norm(dim=-1).unsqueeze(0)
    if case["score"] == "euclidean":
        return 2 * dot - c.pow(2).sum(-1).unsqueeze(0)
    return dot


def assert_same_as_topk(case: dict, got: dict) -> None:
    k = int(case["k"])
    truth = true_scores(case)
    ref = truth.topk(k, dim=-1)
    assert got["ids"].shape == ref.indices.shape and got["ids"].dtype == torch.long
    assert torch.equal(got["ids"], ref.indices)
    fp32 = truth.float().topk(k, dim=-1)  # torch.topk on fp32 scores: the same codes
    assert torch.equal(got["ids"], fp32.indices)
    expected_vals = kernel_units(case).gather(-1, ref.indices).float()
    torch.testing.assert_close(got["vals"], expected_vals, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("score", SCORES)
def test_sizes_off_the_tiles_give_torch_topk(kernel_out, score):
    """19 rows, 75 codes, 20 dims, k=5: no size is a multiple of the kernel's tiles."""
    assert_same_as_topk(CASES[f"edge_{score}"], kernel_out[f"edge_{score}"])


@pytest.mark.parametrize("score", SCORES)
def test_k1_gives_the_argmax(kernel_out, score):
    assert_same_as_topk(CASES[f"k1_{score}"], kernel_out[f"k1_{score}"])


def test_k64_keeps_all_64_in_order(kernel_out):
    assert_same_as_topk(CASES["k64"], kernel_out["k64"])
    assert (kernel_out["k64"]["vals"].diff(dim=-1) <= 0).all()  # best first


@pytest.mark.parametrize("score", SCORES)
def test_bf16_inputs_over_four_groups(kernel_out, score):
    """bf16 activations and codes, 4 groups (per-head codebooks): the codes of torch.topk over
    the fp32 scores of the same bf16 values."""
    case = CASES[f"bf16_{score}"]
    assert case["x"].dtype == torch.bfloat16
    assert_same_as_topk(case, kernel_out[f"bf16_{score}"])


def test_ties_keep_equal_codes_lower_id_first(kernel_out):
    """Codes j and j+32 are equal: the top-5 holds two whole tied pairs plus the lower id of
    the third, and each pair comes lower id first."""
    case, got = CASES["ties"], kernel_out["ties"]
    truth = true_scores(case)
    ids, vals = got["ids"], got["vals"]
    ref_vals = truth.topk(5, dim=-1).values
    torch.testing.assert_close(truth.gather(-1, ids), ref_vals)  # the same scores, rank by rank
    for row_ids in ids.reshape(-1, 5).tolist():
        a, b, c = row_ids[0], row_ids[2], row_ids[4]
        assert row_ids[:4] == [a, a + 32, b, b + 32] and a < 32 and b < 32 and c < 32
        assert c not in (a, b)
    assert torch.equal(vals[..., 0], vals[..., 1]) and torch.equal(vals[..., 2], vals[..., 3])


def test_barred_codes_never_win(kernel_out):
    case, got = CASES["masked"], kernel_out["masked"]
    assert_same_as_topk(case, got)
    barred = case["disabled"].unsqueeze(0).expand(got["ids"].shape[0], -1, -1)
    assert not barred.gather(-1, got["ids"]).any()


@pytest.mark.parametrize("name", ["layer_inner", "layer_cosine", "layer_euclidean",
                                  "layer_bf16"])
def test_layer_fused_and_torch_paths_give_the_same_codes_and_gradients(kernel_out, name):
    torch_path, fused = kernel_out[name]["torch"], kernel_out[name]["triton"]
    assert torch.equal(fused["ids"], torch_path["ids"])
    assert torch.equal(fused["out"], torch_path["out"])
    torch.testing.assert_close(fused["x_grad"], torch_path["x_grad"], rtol=0, atol=0)
    torch.testing.assert_close(fused["codes_grad"], torch_path["codes_grad"], rtol=0, atol=0)
    assert fused["codes_grad"].abs().sum() > 0
    assert fused["ids"].shape == (20, 2, 3)


def test_k_beyond_the_limit_is_refused_and_the_layer_falls_back(kernel_out):
    assert "k=65" in kernel_out["error_k"]["error"] and "64" in kernel_out["error_k"]["error"]
    layer = CodebookLayer(16, 100, 65, select_backend="triton")
    assert not layer._fused_applies(torch.zeros(2, 1, 16), 65)  # beyond 64: PyTorch
    assert layer._fused_applies(torch.zeros(2, 1, 16), 64)


def test_auto_backend_scores_cpu_tensors_with_pytorch():
    layer = CodebookLayer(16, 100, 4)
    assert layer.select_backend == "auto"
    assert not layer._fused_applies(torch.zeros(2, 1, 16), 4)
    with pytest.raises(ValueError, match="select_backend"):
        CodebookLayer(16, 100, 4, select_backend="cuda")


def test_kernel_compiles_for_sm90_without_register_spills(tmp_path):
    """Triton's compiler, not its interpreter: the loop-carried types, the while loop and the
    tensor-core product must pass the real compiler. One configuration per path (bf16 with one K
    step; fp32 tf32x3 with a K loop, k=64 and barred codes), compiled for sm_90."""
    out = tmp_path / "compiled.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(RUNNER), "--compile", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == {"bf16_cosine_k8_d64", "fp32_euclidean_k64_d40_barred"}
    for name, row in results.items():
        assert row["cubin_bytes"] > 0, name
        if row["spill_bytes"] is not None:  # ptxas -v ran
            assert row["spill_bytes"] == 0, (name, row)
            assert row["registers"] <= 255, (name, row)
