"""Site presets and module-name patterns: what each preset hooks on a tiny model of its family,
and a decoder without a preset (OLMo 2) given entirely by patterns."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import TINY_CONFIGS, VOCAB, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from codebook import CodebookConfig, CodebookModel, ConfigError, SitePattern, read_codes
from codebook.schema import build
from codebook.sites import PRESETS, module_names, resolve_sites

ALL_SITES = ["attn_heads", "attn", "mlp", "mlp_hidden", "block"]
# Written from each family's transformers source, apart from the presets: the attention output
# projection inside a layer (its input is the heads' merged outputs).
OUT_PROJ = {"gpt_neox": "attention.dense", "gpt2": "attn.c_proj",
            "gpt_neo": "attn.attention.out_proj", **dict.fromkeys(
                ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gemma3"],
                "self_attn.o_proj")}


def wrap(model: torch.nn.Module, **kw) -> CodebookModel:
    cfg = dict(sites=ALL_SITES, num_codes=16, k=2)
    cfg.update(kw)
    cb = CodebookModel(model, CodebookConfig(**cfg))
    torch.manual_seed(3)
    for layer in cb.codebooks.values():  # codes at the scale of the tiny models' activations
        layer.codes.data.normal_(0, 0.05)
    return cb.eval()


def head_width(family: str) -> int:
    """num_heads x head_dim as the tiny config states it (head_dim defaults to hidden / heads)."""
    c = TINY_CONFIGS[family].get("text_config", TINY_CONFIGS[family])  # gemma3: text model
    heads = c.get("num_attention_heads") or c.get("n_head") or c["num_heads"]
    return heads * c.get("head_dim", 32 // heads)


def keep(store: dict, key: str, where: str = "input"):
    """A plain torch hook that keeps a copy of a module's first input or its output."""
    def pre(module, args, kwargs) -> None:
        store[key] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def post(module, args, output) -> None:
        store[key] = output.detach().clone()

    return pre if where == "input" else post


def test_there_is_a_preset_for_every_requested_family():
    assert {"qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "phi3", "mistral"} <= set(PRESETS)
    assert set(OUT_PROJ) == set(PRESETS) == set(TINY_CONFIGS)


def test_attn_heads_is_the_merged_heads_before_the_output_projection(family, tokens):
    plain = tiny_model(family)
    layer_path = PRESETS[family]["block"].module.replace("*", "1")
    proj = plain.get_submodule(f"{layer_path}.{OUT_PROJ[family]}")
    seen = {}
    proj.register_forward_pre_hook(keep(seen, "x"), with_kwargs=True)
    with torch.no_grad():
        plain(tokens)
    model = wrap(tiny_model(family), sites=["attn_heads"])
    site = model.sites["attn_heads_1"]
    assert (site.hook, site.dim, site.groups) == ("pre", head_width(family), 4)
    with model.codebooks_disabled():
        rec = read_codes(model, tokens, activations=True)
    torch.testing.assert_close(rec.activations["attn_heads_1"], seen["x"], rtol=0, atol=0)


def test_head_width_can_differ_from_hidden_size_and_comes_from_head_dim():
    for family in ("qwen3", "gemma2", "gemma3_text", "gemma3"):
        model = wrap(tiny_model(family), sites=["attn_heads"])
        hidden = model.model.config.get_text_config().hidden_size
        assert model.sites["attn_heads_0"].dim == 64 != hidden == 32
        assert model.codebooks["attn_heads_0"].dim == 64


def test_attn_and_mlp_are_what_each_sublayer_adds_to_the_residual_stream(family, tokens):
    """block output = block input + attn + mlp, for every preset (Gemma: the post norms)."""
    model = wrap(tiny_model(family), sites=["attn", "mlp", "block"], layers=[1])
    block = model.model.get_submodule(model.sites["block_1"].module_path)
    seen = {}
    block.register_forward_pre_hook(keep(seen, "x"), with_kwargs=True)
    with model.codebooks_disabled():
        acts = read_codes(model, tokens, activations=True).activations
    torch.testing.assert_close(acts["block_1"], seen["x"] + acts["attn_1"] + acts["mlp_1"],
                               rtol=1e-5, atol=1e-5)


def test_gemma_mlp_site_is_the_post_feedforward_norm_not_the_mlp_itself(tokens):
    model = wrap(tiny_model("gemma2"), sites=["mlp", "attn"], layers=[0])
    assert model.sites["mlp_0"].module_path == "model.layers.0.post_feedforward_layernorm"
    assert model.sites["attn_0"].module_path == "model.layers.0.post_attention_layernorm"
    raw = {}
    model.model.model.layers[0].mlp.register_forward_hook(keep(raw, "mlp", "output"))
    with model.codebooks_disabled():
        acts = read_codes(model, tokens, activations=True).activations
    assert not torch.allclose(acts["mlp_0"], raw["mlp"])  # one norm later than the MLP output


def test_codebooks_on_every_site_of_every_preset_change_the_output_and_off_restore_it(
        family, tokens):
    reference = tiny_model(family)(tokens).logits
    model = wrap(tiny_model(family))
    assert {s.kind for s in model.sites.values()} == set(ALL_SITES)
    with model.codebooks_disabled():
        assert torch.equal(model(input_ids=tokens).logits, reference)
    for name in model.sites:  # each site alone moves the logits
        for n, cb in model.codebooks.items():
            cb.enabled = n == name
        assert not torch.allclose(model(input_ids=tokens).logits, reference), name


def test_a_wrong_head_dim_in_the_config_is_caught_for_every_preset(family):
    model = tiny_model(family)
    model.config.get_text_config().head_dim = head_width(family) // 4 // 2  # module: twice
    with pytest.raises(ConfigError, match="head count"):
        CodebookModel(model, CodebookConfig(sites=["attn_heads"], num_codes=8, k=1))


def test_a_wrong_width_on_a_norm_site_is_caught():
    cfg = CodebookConfig(sites=["attn"], num_codes=8, k=1, site_patterns={
        "attn": {"module": "model.layers.*.post_attention_layernorm", "width": 16}})
    with pytest.raises(ConfigError, match="has width 32 but the model config implies 16"):
        CodebookModel(tiny_model("gemma2"), cfg)


def test_attention_sites_come_in_forward_order_whatever_order_they_are_asked_in():
    cfg = AutoConfig.for_model(**TINY_CONFIGS["llama"])
    sites = resolve_sites(cfg, CodebookConfig(sites=["attn", "attn_heads"], layers=[0]))
    assert [s.name for s in sites] == ["attn_heads_0", "attn_0"]  # pre-hook, then post-hook


# ---------------------------------------------------------------------- any decoder by pattern
OLMO2 = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=0, eos_token_id=0)
# OLMo 2 (no preset): norms after attention and MLP, before the residual add.
OLMO2_PATTERNS = {
    "attn_heads": {"module": "model.layers.*.self_attn.o_proj", "hook": "pre", "width": "heads",
                   "per_head": True},
    "attn": {"module": "model.layers.*.post_attention_layernorm", "hook": "post"},
    "mlp_hidden": {"module": "model.layers.*.mlp.down_proj", "hook": "pre",
                   "width": "intermediate"},
    "mlp": {"module": "model.layers.*.post_feedforward_layernorm", "hook": "post"},
    "block": {"module": "model.layers.*", "hook": "post"},
    # a kind of its own: the MLP's gate activation, reached between attention and down_proj
    "mlp_gate": {"module": "model.layers.*.mlp.act_fn", "hook": "post",
                 "width": "intermediate", "order": 0.9},
}


def olmo2() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("olmo2", **OLMO2)).eval()


def test_a_model_without_a_preset_names_the_presets_and_the_pattern_way():
    with pytest.raises(ConfigError) as err:
        resolve_sites(AutoConfig.for_model("olmo2", **OLMO2), CodebookConfig())
    message = str(err.value)
    assert err.value.field == "model.model_type" and "unsupported model family 'olmo2'" in message
    assert all(name in message for name in PRESETS)
    assert "site_patterns" in message and "model.layers.*.self_attn.o_proj" in message


def test_any_decoder_works_with_sites_given_by_pattern(tokens, tmp_path):
    model = wrap(olmo2(), sites=[*ALL_SITES, "mlp_gate"], site_patterns=OLMO2_PATTERNS)
    assert list(model.sites)[:6] == ["attn_heads_0", "attn_0", "mlp_gate_0", "mlp_hidden_0",
                                     "mlp_0", "block_0"]
    dims = {s.kind: (s.dim, s.groups) for s in model.sites.values()}
    assert dims == {"attn_heads": (32, 4), "attn": (32, 1), "mlp_gate": (64, 1),
                    "mlp_hidden": (64, 1), "mlp": (32, 1), "block": (32, 1)}
    reference = olmo2()(tokens).logits
    with model.codebooks_disabled():
        assert torch.equal(model(input_ids=tokens).logits, reference)
        acts = read_codes(model, tokens, activations=True).activations
    on = model(input_ids=tokens).logits
    assert not torch.allclose(on, reference)
    assert acts["mlp_gate_1"].shape == (2, 12, 64)
    block_in = acts["block_0"]  # layer 1's input, so: out = in + attn + mlp with these patterns
    torch.testing.assert_close(acts["block_1"], block_in + acts["attn_1"] + acts["mlp_1"],
                               rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "olmo")  # the patterns travel with the codebooks
    loaded = CodebookModel.from_pretrained(tmp_path / "olmo").eval()
    assert loaded.codebook_config.site_patterns["mlp_gate"] == SitePattern(
        "model.layers.*.mlp.act_fn", "post", "intermediate", order=0.9)
    torch.testing.assert_close(loaded(input_ids=tokens).logits, on)


def test_a_pattern_overrides_a_preset_site():
    cfg = CodebookConfig(sites=["mlp"], layers=[0], site_patterns={
        "mlp": SitePattern("model.layers.*.mlp.act_fn", "post", "intermediate")})
    (site,) = CodebookModel(tiny_model("llama"), cfg).sites.values()
    assert (site.name, site.module_path, site.dim) == ("mlp_0", "model.layers.0.mlp.act_fn", 64)


def test_a_width_can_name_a_model_config_attribute():
    cfg = CodebookConfig(sites=["gate"], layers=[0], site_patterns={
        "gate": {"module": "model.layers.*.mlp.gate_proj", "width": "intermediate_size"}})
    (site,) = resolve_sites(AutoConfig.for_model(**TINY_CONFIGS["llama"]), cfg)
    assert site.dim == 64
    bad = CodebookConfig(sites=["gate"], site_patterns={
        "gate": {"module": "model.layers.*.mlp.gate_proj", "width": "no_such_size"}})
    with pytest.raises(ConfigError) as err:
        resolve_sites(AutoConfig.for_model(**TINY_CONFIGS["llama"]), bad)
    assert err.value.field == "codebook.site_patterns.gate.width"


def test_a_pattern_that_names_no_module_lists_this_models_module_names():
    cfg = CodebookConfig(sites=["mlp"], num_codes=8, k=1, site_patterns={
        "mlp": {"module": "model.layers.*.feed_forward"}})
    with pytest.raises(ConfigError, match="has no module 'model.layers.0.feed_forward'") as err:
        CodebookModel(tiny_model("llama"), cfg)
    assert "model.layers.0.mlp" in err.value.fix
    assert "model.layers.0.self_attn.o_proj" in module_names(tiny_model("llama"), "*.0.*")


def test_site_patterns_from_yaml_are_checked_with_the_field_path():
    text = """
    sites: [attn_heads, resid_mid]
    site_patterns:
      resid_mid: {module: "model.layers.*.post_attention_layernorm", hook: pre}
    """
    cfg = build(CodebookConfig, yaml.safe_load(text), "codebook")
    assert cfg.site_patterns == {"resid_mid": SitePattern(
        "model.layers.*.post_attention_layernorm", "pre")}
    assert CodebookConfig.from_dict(cfg.to_dict()) == cfg  # JSON round trip
    bad = [({"module": "model.layers.*.mlp", "hook": "around"}, "codebook.site_patterns.x.hook"),
           ({"module": "model.layers.mlp"}, "codebook.site_patterns.x.module"),
           ({"module": "model.*.layers.*.mlp"}, "codebook.site_patterns.x.module"),
           ({"module": "model.layers.*.mlp", "width": 0}, "codebook.site_patterns.x.width"),
           ({"module": "model.layers.*.mlp", "stride": 2}, "codebook.site_patterns.x.stride")]
    for pattern, field in bad:
        with pytest.raises(ConfigError) as err:
            build(CodebookConfig, {"sites": ["x"], "site_patterns": {"x": pattern}}, "codebook")
        assert err.value.field == field, pattern
        with pytest.raises(ConfigError) as err:  # the same checks from Python
            CodebookConfig(sites=["x"], site_patterns={"x": pattern})
        assert err.value.field == field, pattern
    with pytest.raises(ConfigError, match="define 'x' in codebook.site_patterns") as err:
        CodebookConfig(sites=["x"])
    assert err.value.field == "codebook.sites"
