"""The codebook layer on its own: selection, gradients, losses, grouping, memory, maintenance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codebook.config import CodebookConfig
from codebook.layer import CodebookLayer


def make(dim=16, num_codes=32, k=2, groups=1, **kw) -> CodebookLayer:
    torch.manual_seed(0)
    return CodebookLayer(dim, num_codes, k, groups, **kw)


def test_output_is_sum_of_topk_normalised_inner_product_codes():
    layer = make()
    x = torch.randn(5, 16)
    out = layer(x)
    scores = x @ F.normalize(layer.codes[0], dim=-1).T
    top = scores.topk(2, dim=-1).indices
    expected = layer.codes[0][top].sum(1)
    torch.testing.assert_close(out, expected)


def test_mean_combine_divides_by_k():
    layer = make(combine="mean")
    x = torch.randn(5, 16)
    sum_layer = make()
    torch.testing.assert_close(layer(x), sum_layer(x) / 2)


def test_euclidean_score_picks_nearest_code():
    layer = make(k=1, score="euclidean")
    target = torch.tensor([3, 17, 30])
    x = layer.codes[0, target].detach() + 0.01 * torch.randn(3, 16)
    ids = layer.select(x.view(3, 1, 16))
    assert ids.view(-1).tolist() == target.tolist()


def test_old_dot_name_reads_as_cosine_and_inner_is_a_true_inner_product():
    torch.manual_seed(0)
    cos = make(score="cosine")
    old = make(score="dot")  # the old name: it normalised the codes, so it is cosine
    assert old.score == "cosine"
    inner = make(score="inner")
    with torch.no_grad():
        for layer in (old, inner):
            layer.codes.copy_(cos.codes)
        inner.codes[0, 5] *= 50.0  # one long code: wins every inner product, not cosine
    x = torch.randn(40, 1, 16)
    assert torch.equal(cos.select(x), old.select(x))
    by_inner = inner.select(x)
    expected = (x[:, 0] @ inner.codes[0].detach().T).topk(inner.k, dim=-1).indices
    assert torch.equal(by_inner[:, 0].sort(-1).values, expected.sort(-1).values)
    assert (by_inner == 5).any(-1).float().mean() > 0.4  # the long code: on +x's side
    assert not torch.equal(by_inner, cos.select(x))
    with pytest.raises(ValueError, match="unknown score"):
        make(score="dott")


def test_config_reads_old_dot_with_a_warning():
    with pytest.warns(FutureWarning, match="'dot' is read as 'cosine'"):
        cfg = CodebookConfig(score="dot")
    assert cfg.score == "cosine"


def test_straight_through_gradient_reaches_input_and_codes():
    layer = make()
    x = torch.randn(6, 16, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    torch.testing.assert_close(x.grad, g)  # identity Jacobian to the input
    assert layer.codes.grad is not None and layer.codes.grad.abs().sum() > 0


def test_reconstruction_loss_is_mean_over_tokens_of_squared_error_and_trains_codes():
    layer = make()
    x = torch.randn(8, 16)
    out = layer(x)
    expected = (out.detach() - x).pow(2).sum(-1).mean()
    torch.testing.assert_close(layer.last_losses.recon.detach(), expected)
    layer.last_losses.recon.backward()
    assert layer.codes.grad.abs().sum() > 0
    layer.codes.grad = None
    x2 = torch.randn(8, 16, requires_grad=True)
    layer(x2)
    layer.last_losses.recon.backward()
    assert x2.grad is None or x2.grad.abs().sum() == 0  # stop-gradient on the input


def test_commitment_loss_moves_input_not_codes():
    layer = make()
    x = torch.randn(8, 16, requires_grad=True)
    layer(x)
    layer.last_losses.commit.backward()
    assert x.grad.abs().sum() > 0 and layer.codes.grad is None


def test_grouped_equals_independent_codebooks_per_chunk():
    grouped = make(dim=16, num_codes=32, k=2, groups=4)
    x = torch.randn(7, 16)
    out = grouped(x)
    for g in range(4):
        single = CodebookLayer(4, 32, 2, 1)
        with torch.no_grad():
            single.codes.copy_(grouped.codes[g : g + 1])
        torch.testing.assert_close(out[:, 4 * g : 4 * g + 4], single(x[:, 4 * g : 4 * g + 4]))


def test_chunked_scoring_matches_unchunked():
    x = torch.randn(50, 16)
    big = make(score_chunk_tokens=4096)(x)
    small = make(score_chunk_tokens=7)(x)
    torch.testing.assert_close(big, small)


def test_score_matrix_is_not_saved_for_backward():
    layer = make(dim=16, num_codes=500, k=2)
    x = torch.randn(64, 16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
        (out.sum() + layer.last_losses.recon).backward()
    assert saved, "expected some tensors saved for backward"
    assert not any(shape[-1] == 500 and 64 in shape for shape in saved)


def test_metrics_track_usage_mse_and_norms_then_reset():
    layer = make(num_codes=8, k=1).train()
    x = torch.randn(20, 16)
    out = layer(x)
    m = layer.metrics(reset=False)
    mse = (out.detach() - x).pow(2).sum(-1).mean().item()
    assert m["recon_mse"] == pytest.approx(mse, rel=1e-5)
    assert m["input_norm"] == pytest.approx(x.norm(dim=-1).mean().item(), rel=1e-5)
    used = layer.code_counts.sum().item()
    assert used == 20
    fired = len(set(layer.select(x.view(20, 1, 16)).view(-1).tolist()))
    assert m["dead_code_fraction"] == pytest.approx(1 - fired / 8)
    layer.metrics(reset=True)
    assert layer.code_counts.sum() == 0 and layer.stat_sums.sum() == 0


def test_dead_code_replacement_reseeds_only_unused_codes_near_recent_inputs():
    layer = make(num_codes=64, k=1, recent_inputs=32).train()
    x = torch.randn(200, 16) + 5.0  # inputs far from the random codes
    for _ in range(3):
        layer(x)
    used = layer.code_counts[0] > 0
    before = layer.codes.detach().clone()
    replaced = layer.replace_dead_codes(min_unused_steps=3, noise=0.01)
    assert replaced[0].sum() == (~used).sum() > 0
    assert torch.equal(layer.codes[0, used], before[0, used])
    new = layer.codes[0, replaced[0]].detach()
    assert not torch.allclose(new, before[0, replaced[0]])
    # re-seeded codes sit near real inputs (mean 5), the random ones did not
    assert (new.mean() - 5).abs() < 0.5
    # and they get used afterwards
    layer.reset_metrics()
    layer(x)
    assert (layer.code_counts[0, replaced[0]] > 0).any()


def test_kmeans_init_fits_the_data():
    layer = make(num_codes=8, k=1, score="euclidean")
    centres = torch.randn(4, 16) * 5
    data = centres.repeat(50, 1) + 0.05 * torch.randn(200, 16)
    err_before = (layer(data).detach() - data).pow(2).mean()
    layer.kmeans_init_(data, iters=10, generator=torch.Generator().manual_seed(0))
    err_after = (layer(data).detach() - data).pow(2).mean()
    assert err_after < 0.05 * err_before


def test_k_schedule_changes_k_and_the_output():
    cfg = CodebookConfig(k=8, k_min=2, k_schedule_steps=100)
    assert [cfg.k_at(s) for s in (0, 50, 100, 500)] == [8, 5, 2, 2]
    layer = make(k=8)
    x = torch.randn(4, 16)
    full = layer(x)
    layer.k = cfg.k_at(100)
    fewer = layer(x)
    assert layer.select(x.view(4, 1, 16)).shape[-1] == 2
    assert not torch.allclose(full, fewer)


@pytest.mark.parametrize("n,k", [(10000, 8), (3000, 4), (2048, 2), (1000, 8), (10007, 8)])
def test_blockwise_topk_equals_torch_topk(n, k):
    from codebook.layer import topk_indices

    scores = torch.randn(4, 300, n, generator=torch.Generator().manual_seed(n + k))
    scores[0, :, : n // 2] = float("-inf")  # masked codes (interventions) never win
    assert torch.equal(topk_indices(scores, k), scores.topk(k, dim=-1).indices)
