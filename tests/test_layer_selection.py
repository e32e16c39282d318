"""How the layer selects, on the PyTorch path: the two-pass top-k, chunks per device, no
selection twice under activation checkpointing, no graph for an unweighted commitment term, and
cosine ranked without normalising x. Each change is checked against the plain computation it
replaced (torch.topk / argmax over full fp32 scores, the losses as they were written before)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from codebook.layer import (
    CHUNK_BYTES,
    CodebookLayer,
    reuse_selections,
    topk_indices,
)
from codebook.selection import block_size


def make(dim=16, num_codes=300, k=4, groups=2, **kw) -> CodebookLayer:
    torch.manual_seed(0)
    return CodebookLayer(dim, num_codes, k, groups, **kw)


def full_scores(layer: CodebookLayer, x: torch.Tensor) -> torch.Tensor:
    """(n, groups, codes) fp32 scores as the layer scored before this change: x normalised for
    cosine, all codes at once."""
    x = x.float().reshape(-1, layer.groups, layer.group_dim)
    c = layer.codes.detach().float()
    if layer.score == "cosine":
        return torch.einsum("ngd,gcd->ngc", F.normalize(x, dim=-1), F.normalize(c, dim=-1))
    if layer.score == "inner":
        return torch.einsum("ngd,gcd->ngc", x, c)
    return 2 * torch.einsum("ngd,gcd->ngc", x, c) - c.pow(2).sum(-1).unsqueeze(0)


# ---------------------------------------------------------------------- two-pass top-k
@pytest.mark.parametrize("n,k", [(10000, 1), (10000, 8), (3000, 1), (3000, 8), (10007, 4),
                                 (2048, 2), (700, 8), (5000, 33)])
def test_topk_indices_equals_torch_topk_and_argmax(n, k):
    scores = torch.randn(3, 64, n, generator=torch.Generator().manual_seed(n + k))
    scores[0, :, : n // 2] = float("-inf")  # barred codes (interventions) never win
    got = topk_indices(scores, k)
    assert torch.equal(got, scores.topk(k, dim=-1).indices)
    if k == 1:
        assert torch.equal(got[..., 0], scores.argmax(-1))


def test_block_sizes_are_simd_multiples_and_skip_where_blocks_do_not_pay():
    assert block_size(10000, 1) == 128 and block_size(3000, 1) == 128
    assert block_size(10000, 8) == 64 and block_size(3000, 8) == 64  # 47 blocks >= 4k
    assert block_size(1500, 8) == 32  # 24 blocks of 64 < 4k = 32; 47 of 32
    assert block_size(700, 8) is None and block_size(10000, 40) is None


@pytest.mark.parametrize("score", ["inner", "cosine", "euclidean"])
@pytest.mark.parametrize("k", [1, 3])
def test_select_matches_full_fp32_topk_for_every_score(score, k):
    """Padded blocks (3000 codes is no multiple of 128), chunks of a few rows, barred codes."""
    layer = make(dim=32, num_codes=3000, k=k, groups=4, score=score, score_chunk_tokens=40)
    x = torch.randn(50, 4, 8)
    ref = full_scores(layer, x).topk(k, dim=-1).indices
    assert torch.equal(layer.select(x), ref)  # CPU: one group at a time, 40 rows a chunk
    batched = layer._select_torch(x, k, None, per_group=False)  # the GPU's batched variant
    assert torch.equal(batched, ref)
    barred = torch.zeros(4, 3000, dtype=torch.bool)
    barred[:, ::3] = True
    ref = full_scores(layer, x).masked_fill(barred, float("-inf")).topk(k, dim=-1).indices
    assert torch.equal(layer.select(x, disabled=barred), ref)
    assert torch.equal(layer._select_torch(x, k, barred, per_group=False), ref)


def test_fewer_usable_codes_than_k_falls_back_to_topk_over_barred_codes():
    layer = make(dim=8, num_codes=256, k=4, groups=1, score="inner")
    barred = torch.ones(1, 256, dtype=torch.bool)
    barred[0, 7] = False  # one usable code, k = 4
    ids = layer.select(torch.randn(5, 1, 8), disabled=barred)
    assert (ids[..., 0] == 7).all() and (ids < 256).all()
    assert all(len(set(row)) == 4 for row in ids.reshape(-1, 4).tolist())


# ---------------------------------------------------------------------- chunks per device
def test_chunk_size_comes_from_the_device_budget_unless_set():
    layer = make(dim=64, num_codes=10000, k=8, groups=16)
    assert layer.score_chunk_tokens is None
    assert layer.chunk_rows(torch.device("cpu")) == CHUNK_BYTES["cpu"] // (4 * 10000)
    assert layer.chunk_rows(torch.device("cuda")) == 65536
    assert layer.chunk_rows(torch.device("cpu"), width=10112) == CHUNK_BYTES["cpu"] // 40448
    layer.score_chunk_tokens = 4096
    assert layer.chunk_rows(torch.device("cpu")) == 4096
    x = torch.randn(300, 64)
    chunked, whole = make(score_chunk_tokens=2), make(score_chunk_tokens=10**6)
    assert torch.equal(chunked(x), whole(x))


def test_config_default_chunk_is_per_device_and_explicit_values_are_checked():
    from codebook.config import CodebookConfig
    from codebook.errors import ConfigError

    assert CodebookConfig().score_chunk_tokens is None
    assert CodebookConfig(score_chunk_tokens=512).score_chunk_tokens == 512
    with pytest.raises(ConfigError, match="score_chunk_tokens"):
        CodebookConfig(score_chunk_tokens=0)


# ---------------------------------------------------------------------- cosine
def test_cosine_codes_are_unchanged_without_normalising_x():
    """Rows of very different norms: ranking x.c/|c| picks what cosine similarity picks."""
    layer = make(dim=16, num_codes=500, k=3, groups=1, score="cosine")
    x = torch.randn(200, 1, 16) * torch.logspace(-3, 3, 200).view(-1, 1, 1)
    cos = F.cosine_similarity(x.unsqueeze(2), layer.codes.detach().unsqueeze(0), dim=-1)
    assert torch.equal(layer.select(x), cos.topk(3, dim=-1).indices)


# ---------------------------------------------------------------------- commitment term
def test_unweighted_commitment_term_has_the_same_value_and_no_graph():
    layer = make(dim=16, num_codes=64, k=2, groups=1)
    x = torch.randn(30, 16, requires_grad=True)
    layer(x)
    with_graph = layer.last_losses
    layer.commit_grad = False
    layer(x)
    without = layer.last_losses
    assert with_graph.commit.requires_grad and not without.commit.requires_grad
    assert without.commit.grad_fn is None
    assert torch.equal(without.commit, with_graph.commit.detach())
    assert torch.equal(without.recon, with_graph.recon)


def test_model_keeps_the_commitment_term_out_of_the_graph_only_at_weight_zero():
    from conftest import tiny_model

    from codebook import CodebookConfig, CodebookModel

    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = {}
    for weight in (0.0, 0.25):
        torch.manual_seed(0)
        model = CodebookModel(tiny_model("gpt_neox"),
                              CodebookConfig(sites=["mlp"], num_codes=32, k=2,
                                             commit_weight=weight)).train()
        out = model(input_ids=ids, labels=ids)
        losses[weight] = out
        assert out.commit_loss.requires_grad == (weight > 0)
        expected = out.lm_loss + out.recon_loss + weight * out.commit_loss
        torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(losses[0.0].commit_loss, losses[0.25].commit_loss.detach())
    torch.testing.assert_close(losses[0.0].recon_loss, losses[0.25].recon_loss)


# ---------------------------------------------------------------------- checkpointing
class Block(torch.nn.Module):
    """A linear map, then two codebook layers: one checkpointed region."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.lin = torch.nn.Linear(16, 16)
        self.first = CodebookLayer(16, 200, 3, groups=2).train()
        self.second = CodebookLayer(16, 200, 2, groups=1, score="euclidean").train()

    def forward(self, x):
        return self.second(torch.tanh(self.first(self.lin(x))))


def count_scorings(layers) -> list[int]:
    counts = [0]
    for layer in layers:
        plain = layer.select

        def counted(*args, _plain=plain, **kwargs):
            counts[0] += 1
            return _plain(*args, **kwargs)

        layer.select = counted
    return counts


def run_block(mode: str):
    """Forward + backward of a block: plain, checkpointed, or checkpointed with selection reuse.
    Returns the codes each lookup got (forward and recompute), gradients and scoring count."""
    block = Block()
    lookups = []
    for layer in (block.first, block.second):
        plain = layer.lookup

        def logged(idx, weight=None, _plain=plain):
            lookups.append(idx.clone())
            return _plain(idx, weight)

        layer.lookup = logged
    counts = count_scorings([block.first, block.second])
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    if mode == "plain":
        out = block(x)
    else:
        context = reuse_selections if mode == "reuse" else None
        kwargs = {"context_fn": context} if context else {}
        out = checkpoint(block, x, use_reentrant=False, **kwargs)
    loss = out.pow(2).sum() + block.first.last_losses.recon + block.second.last_losses.recon
    forward_scorings = counts[0]
    loss.backward()
    grads = [x.grad, block.lin.weight.grad, block.first.codes.grad, block.second.codes.grad]
    return lookups, grads, forward_scorings, counts[0]


def test_checkpoint_recompute_reuses_the_forward_codes_and_scores_once():
    plain_lookups, plain_grads, _, plain_count = run_block("plain")
    lookups, grads, forward_count, total = run_block("reuse")
    assert plain_count == 2 and forward_count == 2 and total == 2  # one scoring per layer
    assert len(lookups) == 4  # forward (2 layers) + recompute (2 layers)
    for i in range(2):
        assert torch.equal(lookups[i], plain_lookups[i])
        assert torch.equal(lookups[i + 2], lookups[i])  # the recompute got the forward's codes
    for g_plain, g in zip(plain_grads, grads, strict=True):
        assert g is not None
        torch.testing.assert_close(g, g_plain)


def test_checkpoint_without_reuse_scores_again():
    """The control: the same checkpoint without reuse_selections scores twice per layer."""
    _, _, forward_count, total = run_block("rescore")
    assert forward_count == 2 and total == 4


def test_training_loop_checkpointing_scores_each_layer_once_per_step(tmp_path):
    """build_model's gradient checkpointing (HF, non-reentrant) passes reuse_selections."""
    from train_helpers import FSM_CONFIG, tiny_overrides

    from codebook.training.config import load_config
    from codebook.training.loop import build_model

    results = {}
    for on in (False, True):
        cfg = load_config(FSM_CONFIG, tiny_overrides(
            tmp_path, "ckpt", **{"codebook.start_step": 0, "model.gradient_checkpointing": on}))
        model = build_model(cfg).train()
        assert model.model.is_gradient_checkpointing == on
        counts = count_scorings(model.codebooks.values())
        ids = torch.randint(0, 11, (4, 24), generator=torch.Generator().manual_seed(0))
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        assert counts[0] == len(model.codebooks)  # once per layer, recompute included
        results[on] = [p.grad.clone() for p in model.codebook_parameters()]
    for plain, ckpt in zip(results[False], results[True], strict=True):
        torch.testing.assert_close(ckpt, plain)
    # the control: HF's checkpointing without reuse_selections does recompute and score again
    model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False})
    counts[0] = 0
    model(input_ids=ids, labels=ids).loss.backward()
    assert counts[0] == 2 * len(model.codebooks)


def test_a_region_recomputed_twice_replays_the_same_codes_both_times():
    """retain_graph: two backward passes recompute the region twice (the checkpoint enters its
    recompute context again); both replay the forward's codes, none scores."""
    grads = {}
    for mode in ("plain", "reuse"):
        block = Block()
        counts = count_scorings([block.first, block.second])
        x = torch.randn(40, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
        if mode == "plain":
            out = block(x)
        else:
            out = checkpoint(block, x, use_reentrant=False, context_fn=reuse_selections)
        recon = block.first.last_losses.recon + block.second.last_losses.recon
        first = torch.autograd.grad(recon, [block.first.codes], retain_graph=True)[0]
        (out.pow(2).sum() + recon).backward()
        assert counts[0] == 2
        grads[mode] = (first, block.first.codes.grad, block.second.codes.grad, x.grad)
    for plain, reused in zip(grads["plain"], grads["reuse"], strict=True):
        torch.testing.assert_close(reused, plain)


def test_cpu_scoring_reuses_one_buffer_across_calls_and_layers():
    """The CPU path scores into per-thread scratch memory that outlives the call (a fresh
    buffer over glibc's mmap limit page-faults on every call); layers of other sizes share it
    and still select exactly."""
    from codebook.selection import scratch

    small = make(dim=16, num_codes=300, k=2, groups=2, score="cosine")
    big = make(dim=32, num_codes=2000, k=3, groups=1, score="euclidean")
    x_small, x_big = torch.randn(64, 2, 8), torch.randn(64, 1, 32)
    for layer, x in ((small, x_small), (big, x_big), (small, x_small)):
        ref = full_scores(layer, x).topk(layer.k, dim=-1).indices
        assert torch.equal(layer.select(x), ref)
    first = scratch("scores", 10, torch.device("cpu")).data_ptr()
    big.select(x_big)
    assert scratch("scores", 10, torch.device("cpu")).data_ptr() == first
