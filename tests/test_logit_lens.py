"""Logit lens of codes (codebook.analysis.logit_lens), checked against by-hand weight products
on tiny random-initialised models (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from codebook.analysis.logit_lens import direction, final_norm, logit_lens, logit_lens_matrix
from codebook.config import CodebookConfig
from codebook.errors import ConfigError
from codebook.model import CodebookModel

VOCAB = 64
ALL_KINDS = ["attn_heads", "attn", "mlp_hidden", "mlp", "block"]
NEOX = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)


def _hf(model_type: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs)).eval()


@torch.no_grad()
def _wrap(hf: torch.nn.Module, norm_path: str, **cfg) -> CodebookModel:
    """Codebooks on ``hf``; the final norm's weight made non-trivial, so a missed fold shows."""
    model = CodebookModel(hf, CodebookConfig(**{"num_codes": 8, "k": 2, **cfg}))
    norm = hf.get_submodule(norm_path)
    norm.weight.copy_(torch.rand(norm.weight.shape) + 0.5)
    return model


def _hand(model: CodebookModel, norm_w: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    """Logit effects W_U @ (norm_w * resid), computed by hand."""
    w_u = model.model.get_output_embeddings().weight.detach()
    return w_u @ (norm_w.detach() * resid)


@pytest.fixture(scope="module")
def neox() -> CodebookModel:
    model = _wrap(_hf("gpt_neox", **NEOX), "gpt_neox.final_layer_norm", sites=ALL_KINDS,
                  layers=[1])
    with torch.no_grad():  # unit-norm unembedding rows: W_U[t] . W_U[s] < 1 = |W_U[t]|^2
        w_u = model.model.get_output_embeddings().weight
        w_u.copy_(torch.nn.functional.normalize(w_u, dim=-1))
    return model


def _neox_norm(model: CodebookModel) -> torch.Tensor:
    return model.model.gpt_neox.final_layer_norm.weight


def test_mlp_code_along_a_token_row_puts_that_token_on_top(neox):
    token, norm_w = 17, _neox_norm(neox)
    w_u = neox.model.get_output_embeddings().weight
    v = 5.0 * w_u[token].detach() / norm_w.detach()  # undo the final norm's weight
    with torch.no_grad():
        neox.codebooks["mlp_1"].codes[0, 3] = v
        neox.codebooks["mlp_1"].codes[0, 4] = -v
    up = logit_lens(neox, "mlp_1", 0, 3, top=5)
    down = logit_lens(neox, "mlp_1", 0, 4, top=5)
    assert up["positive"][0]["token_id"] == token
    assert down["negative"][0]["token_id"] == token
    assert up["positive"][0]["logit"] == pytest.approx(5.0, rel=1e-5)
    expected = _hand(neox, norm_w, v)
    torch.testing.assert_close(logit_lens_matrix(neox, "mlp_1", 0, [3])[0], expected)
    torch.testing.assert_close(logit_lens_matrix(neox, "mlp_1", 0, [4])[0], -expected)
    torch.testing.assert_close(direction(neox, "mlp_1", 0, 3), v)
    assert "final_layer_norm" in up["method"] and "residual-stream vector" in up["method"]


def test_head_code_goes_through_its_slice_of_the_output_projection(neox):
    group, code, hd = 2, 5, 8
    w_o = neox.model.gpt_neox.layers[1].attention.dense.weight  # (d_model, heads * head_dim)
    c = neox.codebooks["attn_heads_1"].codes[group, code].detach()
    norm_w = _neox_norm(neox)
    expected = _hand(neox, norm_w, w_o[:, group * hd:(group + 1) * hd].detach() @ c)
    got = logit_lens_matrix(neox, "attn_heads_1", group, [code])[0]
    torch.testing.assert_close(got, expected)
    result = logit_lens(neox, "attn_heads_1", group, code, top=3)
    assert [r["logit"] for r in result["positive"]] == pytest.approx(
        expected.topk(3).values.tolist(), rel=1e-5)
    assert "head 2" in result["method"] and "columns 16:24" in result["method"]
    saved = w_o.detach().clone()
    try:
        with torch.no_grad():
            w_o[:, 0:hd] += 1.0  # another head's slice: no effect on this head's codes
        torch.testing.assert_close(logit_lens_matrix(neox, "attn_heads_1", group, [code])[0],
                                   expected)
        with torch.no_grad():
            w_o[:, group * hd:(group + 1) * hd] += 1.0  # its own slice: the effect changes
        changed = logit_lens_matrix(neox, "attn_heads_1", group, [code])[0]
        assert not torch.allclose(changed, expected)
    finally:
        with torch.no_grad():
            w_o.copy_(saved)


def test_mlp_hidden_code_goes_through_the_down_projection(neox):
    w_down = neox.model.gpt_neox.layers[1].mlp.dense_4h_to_h.weight  # (d_model, intermediate)
    c = neox.codebooks["mlp_hidden_1"].codes[0, 1].detach()
    expected = _hand(neox, _neox_norm(neox), w_down.detach() @ c)
    torch.testing.assert_close(logit_lens_matrix(neox, "mlp_hidden_1", 0, [1])[0], expected)
    torch.testing.assert_close(direction(neox, "mlp_hidden_1", 0, 1), w_down.detach() @ c)


@pytest.mark.parametrize("site", ["attn_1", "block_1"])
def test_residual_sites_are_the_code_itself(neox, site):
    c = neox.codebooks[site].codes[0, 6].detach()
    torch.testing.assert_close(direction(neox, site, 0, 6), c)
    torch.testing.assert_close(logit_lens_matrix(neox, site, 0, [6])[0],
                               _hand(neox, _neox_norm(neox), c))


def test_matrix_rows_match_single_codes_and_ordering(neox):
    codes = [0, 7, 2]
    matrix = logit_lens_matrix(neox, "attn_heads_1", 1, codes)
    assert matrix.shape == (len(codes), VOCAB) and matrix.dtype == torch.float32
    for row, code in zip(matrix, codes, strict=True):
        result = logit_lens(neox, "attn_heads_1", 1, code, top=4)
        assert set(result) == {"method", "positive", "negative"}
        pos, neg = result["positive"], result["negative"]
        assert len(pos) == len(neg) == 4
        assert all(r["token"] is None and isinstance(r["token_id"], int) for r in pos + neg)
        pos_logits = [r["logit"] for r in pos]
        neg_logits = [r["logit"] for r in neg]
        assert pos_logits == sorted(pos_logits, reverse=True)
        assert neg_logits == sorted(neg_logits)  # most negative first
        assert pos[0]["token_id"] == int(row.argmax()) and neg[0]["token_id"] == int(row.argmin())
        assert pos_logits == pytest.approx(row.topk(4).values.tolist(), rel=1e-5)
        assert neg_logits == pytest.approx((-(-row).topk(4).values).tolist(), rel=1e-5)
    everything = logit_lens(neox, "mlp_1", 0, 0, top=1000)
    assert len(everything["positive"]) == len(everything["negative"]) == VOCAB
    nothing = logit_lens(neox, "mlp_1", 0, 0, top=0)
    assert nothing["positive"] == nothing["negative"] == []


def test_groups_of_a_residual_site_are_slices_of_the_width():
    model = _wrap(_hf("gpt_neox", **NEOX), "gpt_neox.final_layer_norm", sites=["mlp"],
                  layers=[0], groups=2)
    c = model.codebooks["mlp_0"].codes[1, 2].detach()
    d = direction(model, "mlp_0", 1, 2)
    torch.testing.assert_close(d[:16], torch.zeros(16))
    torch.testing.assert_close(d[16:], c)
    norm_w = model.model.gpt_neox.final_layer_norm.weight.detach()
    w_u = model.model.get_output_embeddings().weight.detach()
    torch.testing.assert_close(logit_lens_matrix(model, "mlp_0", 1, [2])[0],
                               w_u[:, 16:] @ (norm_w[16:] * c))
    assert "dims 16:32" in logit_lens(model, "mlp_0", 1, 2)["method"]


def test_llama_head_site_with_grouped_query_attention():
    hf = _hf("llama", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
             max_position_embeddings=64)
    model = _wrap(hf, "model.norm", sites=["attn_heads", "mlp"], layers=[0])
    w_o = hf.model.layers[0].self_attn.o_proj.weight.detach()
    c = model.codebooks["attn_heads_0"].codes[3, 1].detach()
    expected = _hand(model, hf.model.norm.weight, w_o[:, 24:32] @ c)
    torch.testing.assert_close(logit_lens_matrix(model, "attn_heads_0", 3, [1])[0], expected)
    method = logit_lens(model, "attn_heads_0", 3, 1)["method"]
    assert "model.norm" in method and "LlamaRMSNorm" in method
    assert final_norm(model)[0] == "model.norm"


def test_gpt2_conv1d_output_projection_is_transposed():
    hf = _hf("gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
             bos_token_id=0, eos_token_id=0)
    model = _wrap(hf, "transformer.ln_f", sites=["attn_heads"], layers=[1])
    w = hf.transformer.h[1].attn.c_proj.weight.detach()  # Conv1D: (in, out), y = x @ W + b
    c = model.codebooks["attn_heads_1"].codes[1, 0].detach()
    expected = _hand(model, hf.transformer.ln_f.weight, c @ w[8:16, :])
    torch.testing.assert_close(logit_lens_matrix(model, "attn_heads_1", 1, [0])[0], expected)
    assert "Conv1D" in logit_lens(model, "attn_heads_1", 1, 0)["method"]


def test_gemma_final_norm_scales_by_one_plus_weight():
    hf = _hf("gemma2", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
             max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
             head_dim=16)
    model = _wrap(hf, "model.norm", sites=["mlp"], layers=[1])
    c = model.codebooks["mlp_1"].codes[0, 5].detach()
    expected = _hand(model, 1.0 + hf.model.norm.weight, c)
    torch.testing.assert_close(logit_lens_matrix(model, "mlp_1", 0, [5])[0], expected)
    method = logit_lens(model, "mlp_1", 0, 5)["method"]
    assert "Gemma2RMSNorm, as 1 + weight" in method and "soft-capping" in method


@pytest.mark.parametrize(("site", "group", "code", "match"), [
    ("mlp_7", 0, 0, "unknown site"),
    ("attn_heads_1", 4, 0, "not a group of attn_heads_1"),
    ("attn_heads_1", -1, 0, "not a group"),
    ("mlp_1", 1, 0, "not a group"),
    ("mlp_1", 0, 8, "not a code of mlp_1"),
    ("mlp_1", 0, -1, "not a code"),
])
def test_bad_site_group_or_code(neox, site, group, code, match):
    for call in (lambda: logit_lens(neox, site, group, code),
                 lambda: direction(neox, site, group, code),
                 lambda: logit_lens_matrix(neox, site, group, [0, code])):
        with pytest.raises(ConfigError, match=match):
            call()


def test_bad_top(neox):
    with pytest.raises(ValueError, match="top"):
        logit_lens(neox, "mlp_1", 0, 0, top=-1)


@pytest.mark.parametrize(("pattern", "where"), [
    ({"module": "gpt_neox.layers.*.mlp.act", "hook": "post", "width": "intermediate"},
     "output of gpt_neox.layers.0.mlp.act"),
    ({"module": "gpt_neox.layers.*.mlp.dense_h_to_4h", "hook": "pre", "width": "hidden"},
     "writes 64 wide"),
])
def test_site_without_a_linear_path_is_refused(pattern, where):
    model = CodebookModel(_hf("gpt_neox", **NEOX), CodebookConfig(
        sites=["custom"], site_patterns={"custom": pattern}, num_codes=4, k=1, layers=[0]))
    with pytest.raises(ValueError, match=where) as info:
        logit_lens(model, "custom_0", 0, 0)
    assert "no linear path to the unembedding" in str(info.value)


def test_missing_final_norm_is_refused():
    model = CodebookModel(_hf("gpt_neox", **NEOX),
                          CodebookConfig(sites=["mlp"], num_codes=4, k=1, layers=[0]))
    del model.model.gpt_neox.final_layer_norm
    with pytest.raises(ValueError, match="no final norm found on GPTNeoXModel"):
        logit_lens(model, "mlp_0", 0, 0)
