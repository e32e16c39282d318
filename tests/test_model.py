"""Codebooks inside Hugging Face models: every family, save/load, reading codes, interventions."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, TINY_CONFIGS, tiny_model

from codebook import (
    CodebookConfig,
    CodebookModel,
    ConfigError,
    disable_codes,
    force_codes,
    patch_codes,
    read_codes,
    recording,
)

ALL_SITES = ["attn_heads", "attn", "mlp", "mlp_hidden", "block"]


def wrap(family: str, **kw) -> CodebookModel:
    cfg = dict(sites=ALL_SITES, num_codes=16, k=2)
    cfg.update(kw)
    model = CodebookModel(tiny_model(family), CodebookConfig(**cfg))
    torch.manual_seed(3)
    for cb in model.codebooks.values():  # codes at the scale of the tiny models' activations
        cb.codes.data.normal_(0, 0.05)
    return model.eval()


def test_disabled_codebooks_give_the_original_logits(family, tokens):
    reference = tiny_model(family)(tokens).logits
    model = wrap(family)
    with model.codebooks_disabled():
        assert torch.equal(model(input_ids=tokens).logits, reference)
    assert not torch.allclose(model(input_ids=tokens).logits, reference)


def test_every_site_is_hooked_with_the_right_shape(family, tokens):
    model = wrap(family)
    record = read_codes(model, tokens, activations=True)
    assert set(record.codes) == set(model.sites)
    for name, site in model.sites.items():
        assert record.codes[name].shape == (2, 12, site.groups, 2)
        assert record.activations[name].shape == (2, 12, site.dim)
    tiny = TINY_CONFIGS[family].get("text_config", TINY_CONFIGS[family])
    heads = tiny.get("num_attention_heads") or tiny.get("n_head") or tiny["num_heads"]
    assert model.sites["attn_heads_0"].groups == heads


def test_codes_read_back_are_the_ones_the_layer_selects(tokens):
    model = wrap("gpt_neox", sites=["mlp"], k=3)
    record = read_codes(model, tokens, activations=True)
    layer = model.codebooks["mlp_1"]
    x = record.activations["mlp_1"].reshape(-1, 1, 32)
    assert torch.equal(record.codes["mlp_1"].reshape(-1, 1, 3), layer.select(x))


def test_loss_adds_weighted_reconstruction(tokens):
    model = wrap("gpt2", sites=["mlp"], recon_weight=0.5)
    out = model(input_ids=tokens, labels=tokens)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.recon_loss)
    assert out.recon_loss > 0


def test_save_and_load_round_trip(family, tokens, tmp_path):
    model = wrap(family)
    expected = model(input_ids=tokens).logits
    model.save_pretrained(tmp_path / "cb")
    assert (tmp_path / "cb" / "model.safetensors").is_file()
    assert (tmp_path / "cb" / "codebooks.safetensors").is_file()
    loaded = CodebookModel.from_pretrained(tmp_path / "cb").eval()
    assert loaded.codebook_config == model.codebook_config
    torch.testing.assert_close(loaded(input_ids=tokens).logits, expected)


def test_from_pretrained_base_model_path_attaches_new_codebooks(tmp_path, tokens):
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    cfg = CodebookConfig(sites=["attn_heads"], num_codes=8, k=1, layers=[1])
    model = CodebookModel.from_pretrained(str(tmp_path / "base"), codebook_config=cfg)
    assert list(model.sites) == ["attn_heads_1"]
    with model.codebooks_disabled():
        torch.testing.assert_close(model(input_ids=tokens).logits, base(tokens).logits)
    with pytest.raises(ConfigError, match="codebook_config"):
        CodebookModel.from_pretrained(str(tmp_path / "base"))


def test_loading_codebooks_into_a_mismatched_model_is_a_clear_error(tmp_path):
    wrap("gpt_neox", sites=["mlp"], num_codes=16).save_pretrained(tmp_path / "a")
    other = wrap("gpt_neox", sites=["mlp"], num_codes=8)
    with pytest.raises(ConfigError, match="shape"):
        other.load_codebooks(tmp_path / "a" / "codebooks.safetensors")
    heads = wrap("gpt_neox", sites=["attn_heads"], num_codes=16)
    with pytest.raises(ConfigError, match="do not match"):
        heads.load_codebooks(tmp_path / "a" / "codebooks.safetensors")


# ---------------------------------------------------------------------- interventions
def _final_hidden(model: CodebookModel, tokens: torch.Tensor) -> torch.Tensor:
    captured = {}
    norm = model.model.gpt_neox.final_layer_norm
    handle = norm.register_forward_pre_hook(lambda m, a: captured.setdefault("h", a[0].clone()))
    with torch.no_grad():
        model(input_ids=tokens)
    handle.remove()
    return captured["h"]


@pytest.mark.parametrize("mode", ["add", "replace", "overwrite"])
def test_forcing_a_code_changes_logits_exactly_as_the_arithmetic_says(tokens, mode):
    model = wrap("gpt_neox", sites=["mlp"], layers=[1], k=2)
    layer = model.codebooks["mlp_1"]
    hidden = _final_hidden(model, tokens)
    base_codes = read_codes(model, tokens).codes["mlp_1"]
    code, pos = 5, 7
    with torch.no_grad(), force_codes(model, "mlp_1", [code], positions=[pos], mode=mode):
        forced = model(input_ids=tokens).logits
    c = layer.codes[0, code].detach()
    natural = layer.codes[0, base_codes[:, pos, 0]].detach()  # (batch, k, dim), best first
    delta = {"add": c, "replace": c - natural.sum(1), "overwrite": c - natural[:, -1]}[mode]
    h = hidden[:, pos] + delta
    expected = model.model.get_output_embeddings()(model.model.gpt_neox.final_layer_norm(h))
    torch.testing.assert_close(forced[:, pos], expected, atol=1e-5, rtol=1e-5)
    plain = model(input_ids=tokens).logits
    others = [p for p in range(12) if p != pos]
    assert torch.equal(forced[:, others], plain[:, others])  # last-layer MLP: only pos moves


def test_forced_codes_are_recorded_and_replace_mode_keeps_only_them(tokens):
    model = wrap("gpt_neox", sites=["attn_heads"], k=2)
    with force_codes(model, "attn_heads_0", {1: [9, 10]}, positions=[3], mode="replace"):
        rec = read_codes(model, tokens)
    codes = rec.codes["attn_heads_0"]
    active = codes[:, 3, 1][codes[:, 3, 1] >= 0]
    assert sorted(active.tolist()) == [9, 9, 10, 10]
    assert (codes[:, 4, 1, :2] >= 0).all()  # other positions keep their top-k


def test_overwrite_mode_puts_forced_codes_in_the_lowest_ranked_slots(tokens):
    model = wrap("gpt_neox", sites=["attn_heads"], num_codes=32, k=3)
    plain = read_codes(model, tokens).codes["attn_heads_0"]
    with force_codes(model, "attn_heads_0", {1: [20, 21], 2: [30]}, positions=[3, 4],
                     mode="overwrite"):
        got = read_codes(model, tokens).codes["attn_heads_0"]
    assert got.shape == plain.shape  # still k slots: nothing added
    for p in (3, 4):
        assert torch.equal(got[:, p, 1, 0], plain[:, p, 1, 0])  # the best code stays
        assert (got[:, p, 1, 1:] == torch.tensor([20, 21])).all()
        assert torch.equal(got[:, p, 2, :2], plain[:, p, 2, :2])
        assert (got[:, p, 2, 2] == 30).all()
        assert torch.equal(got[:, p, 0], plain[:, p, 0])  # other groups untouched
    others = [q for q in range(12) if q not in (3, 4)]
    assert torch.equal(got[:, others], plain[:, others])
    with pytest.raises(ConfigError, match="at most k"), force_codes(
            model, "attn_heads_0", {0: [1, 2, 3, 4]}, mode="overwrite"):
        pass


def test_disabled_codes_are_never_selected(tokens):
    model = wrap("gpt2", sites=["mlp"], k=2)
    top = read_codes(model, tokens).codes["mlp_0"]
    banned = top.unique().tolist()[:3]
    with disable_codes(model, "mlp_0", banned):
        after = read_codes(model, tokens).codes["mlp_0"]
    assert not torch.isin(after, torch.tensor(banned)).any()


def test_patching_codes_from_another_input_copies_that_inputs_codes(tokens):
    model = wrap("gpt_neox", sites=["attn_heads", "mlp"], k=2)
    other = torch.randint(1, 64, (1, 12), generator=torch.Generator().manual_seed(9))
    source = read_codes(model, other)
    with patch_codes(model, "mlp_0", source, positions=[4, 5]):
        rec = read_codes(model, tokens[:1])
    got = rec.codes["mlp_0"][0]
    active = [sorted(v for v in got[p, 0].tolist() if v >= 0) for p in (4, 5)]
    assert active == [sorted(source.codes["mlp_0"][0, p, 0].tolist()) for p in (4, 5)]
    plain = read_codes(model, tokens[:1]).codes["mlp_0"][0]
    assert torch.equal(got[6, 0, :2], plain[6, 0])


def test_forcing_codes_works_inside_generate_and_is_deterministic(family):
    model = wrap(family, sites=["mlp"], k=1)
    prompt = torch.tensor([[5, 6, 7]])
    kw = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    base = model.generate(prompt, **kw)
    strong = model.codebooks["mlp_1"]
    with torch.no_grad():
        strong.codes[0, 3] = 5 * torch.randn(32, generator=torch.Generator().manual_seed(0))
    with force_codes(model, "mlp_1", [3]):
        steered = model.generate(prompt, **kw)
        again = model.generate(prompt, **kw)
    assert torch.equal(steered.sequences, again.sequences)
    base_scores, steered_scores = torch.stack(base.scores), torch.stack(steered.scores)
    assert not torch.allclose(steered_scores, base_scores)  # every step sees the forced code
    assert all(not torch.allclose(a, b) for a, b in zip(base.scores, steered.scores, strict=True))
    kw = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=0)
    with recording(model, ["mlp_1"]) as rec, force_codes(model, "mlp_1", [3]):
        model.generate(prompt, **kw)
    codes = rec.codes["mlp_1"]
    assert codes.shape[1] == 3 + 5  # prompt, then one step per generated token (last not run)
    assert (codes == 3).any(-1).all()  # forced at every position, generated ones included


def test_forcing_at_a_position_during_generation_uses_absolute_positions():
    model = wrap("llama", sites=["mlp"], k=1)
    prompt = torch.tensor([[5, 6, 7]])
    kw = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4, pad_token_id=0)
    with recording(model, ["mlp_1"]) as rec, force_codes(model, "mlp_1", [2], positions=[4]):
        model.generate(prompt, **kw)
    codes = rec.codes["mlp_1"][0, :, 0]  # (seq, n): position 4 is the second generated step
    active = (codes >= 0).sum(-1).tolist()
    assert active == [1, 1, 1, 1, 2, 1]
    assert 2 in codes[4].tolist()


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(k=0), "codebook.k"),
        (dict(k=20, num_codes=10), "codebook.k"),
        (dict(sites=["attention"]), "codebook.sites"),
        (dict(score="l1"), "codebook.score"),
        (dict(k_min=4, k=2), "codebook.k_min"),
    ],
)
def test_bad_codebook_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        CodebookConfig(**kwargs)
    assert err.value.field == field and "Fix:" in str(err.value)


def test_groups_that_do_not_divide_the_dimension_fail_before_the_model_is_touched():
    from transformers import AutoConfig

    from codebook.sites import resolve_sites

    cfg = AutoConfig.for_model("gpt_neox", hidden_size=32, num_attention_heads=4,
                               num_hidden_layers=2, intermediate_size=64)
    with pytest.raises(ConfigError, match="groups"):
        resolve_sites(cfg, CodebookConfig(sites=["mlp"], groups=5))
    with pytest.raises(ConfigError, match="layer 7"):
        resolve_sites(cfg, CodebookConfig(sites=["mlp"], layers=[7]))


def test_sites_come_in_forward_order_whatever_order_they_are_asked_in():
    from transformers import AutoConfig

    from codebook.sites import resolve_sites

    cfg = AutoConfig.for_model("gpt_neox", hidden_size=32, num_attention_heads=4,
                               num_hidden_layers=2, intermediate_size=64)
    sites = resolve_sites(cfg, CodebookConfig(sites=["block", "mlp", "mlp_hidden", "attn_heads"],
                                              layers=[1, 0]))
    assert [s.name for s in sites] == [
        f"{kind}_{layer}" for layer in (0, 1)
        for kind in ("attn_heads", "mlp_hidden", "mlp", "block")]


def test_unknown_model_family_is_rejected():
    from transformers import AutoConfig

    from codebook.sites import resolve_sites

    with pytest.raises(ConfigError, match="unsupported model family 'bert'"):
        resolve_sites(AutoConfig.for_model("bert"), CodebookConfig())


def test_head_count_mismatch_is_caught_at_attach_time():
    model = tiny_model("gpt_neox")
    model.config.num_attention_heads = 8
    model.config.head_dim = 8  # config now claims 8 x 8 = 64 wide, the module is 32 wide
    with pytest.raises(ConfigError, match="head count"):
        CodebookModel(model, CodebookConfig(sites=["attn_heads"], num_codes=8, k=1))


def test_intervention_inputs_are_validated(tokens):
    model = wrap("gpt2", sites=["mlp"])
    with pytest.raises(ConfigError, match="unknown site"), force_codes(model, "mlp_9", [1]):
        pass
    with pytest.raises(ConfigError, match="out of range"), force_codes(model, "mlp_0", [16]):
        pass
    bad_group = disable_codes(model, "mlp_0", [1], groups=[2])
    with pytest.raises(ConfigError, match="group 2"), bad_group:
        pass


def test_every_library_preset_has_a_tiny_model_under_test():
    from codebook import FAMILIES as EXPORTED
    from codebook.sites import PRESETS

    assert set(PRESETS) == set(FAMILIES) == {
        "gpt_neox", "gpt2", "gpt_neo", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2",
        "gemma3_text", "gemma3"}
    assert EXPORTED is PRESETS
    assert all(set(p) == set(ALL_SITES) for p in PRESETS.values())
