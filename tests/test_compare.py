"""The comparison (issue #18): sparsify SAEs in a codebook layer's place, the activation cache,
and `python pipelines/compare.py --quick` end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from train_helpers import REPO

from codebook import CodebookConfig, CodebookModel, patch_codes, recording, swap_codes
from codebook.compare.cache import ActivationCache, collect_activations, write_meta, write_shard
from codebook.compare.sparse_coder import SparseCoderLayer, new_sparse_coder, train_sparse_coder
from codebook.errors import ConfigError

METHODS = ("codebook", "posthoc_codebook", "sae", "neuron")
ROW_KEYS = ("l0", "fve", "dead_fraction", "ce_loss_recovered", "kl", "ce_loss_recovered_all",
            "kl_all", "state_precision_test", "state_precision_selection",
            "state_precision_null", "swap_success", "swap_jsd", "swap_jsd_shift",
            "features_changed", "features_active", "random_success", "full_swap_success",
            "full_swap_jsd_shift", "ce_gap_control")


def _cache(root, data, shards=8, site="s"):
    """An activation cache of ``data`` (n, dim) in ``shards`` shards."""
    for i, part in enumerate(data.chunk(shards)):
        write_shard(root, i, {site: part.contiguous()}, torch.zeros(1, 2))
    write_meta(root, {site: data.shape[1]}, shards, data.shape[0])
    return ActivationCache.open(root)


def _opts(**kw):
    from codebook.compare.fitting import FitOptions

    base = dict(token_budget=8192, batch_tokens=512, micro_batch_tokens=256,
                eval_every_tokens=2048, val_tokens=512, plateau=False, val_fraction=0.125)
    return FitOptions(**{**base, **kw})


def _coder(tmp_path, dim=16, latents=64, k=4):
    coder = new_sparse_coder(dim, latents, k, seed=0)
    torch.manual_seed(1)
    data = torch.randn(4096, dim)
    cache = _cache(tmp_path / "cache", data)
    train, val = cache.split(0.125)
    train_sparse_coder(coder, cache, "s", _opts(token_budget=4096), train, val)
    return coder, data


def test_sparse_coder_layer_is_the_library_sae(tmp_path):
    coder, data = _coder(tmp_path)
    layer = SparseCoderLayer(coder).eval()
    with torch.no_grad():
        expected = coder(data).sae_out
    out = layer(data)
    assert torch.allclose(out, expected, atol=1e-5)
    ids, acts = layer.encode(data)
    assert ids.shape == (4096, 4) and ((ids >= 0) == (acts > 0)).all()
    assert (acts[:, :-1] >= acts[:, 1:]).all()  # sorted: a forced latent takes the weakest


def test_sae_swap_sets_the_new_latent_at_its_mean_value_and_counts_changes():
    torch.manual_seed(0)
    config = CodebookConfig(sites=["mlp"], layers=[0], num_codes=8, k=1)
    model = CodebookModel(tiny_model("gpt_neox"), config)
    sae = model.codebooks["mlp_0"] = SparseCoderLayer(new_sparse_coder(32, 64, 4)).eval()
    sae.mean_act.copy_(torch.linspace(1.0, 2.0, 64))
    ids = torch.randint(1, 64, (2, 6))
    with recording(model, ["mlp_0"]) as rec:
        model(input_ids=ids)
    codes = rec.codes["mlp_0"]  # (2, 6, 1, 4)
    assert (codes[:, 3, 0, 0] >= 0).all()
    old = codes[:, 3, 0, 0]  # the top latent of each row at position 3
    new = torch.tensor([next(c for c in range(64) if c not in codes[r, 3, 0].tolist())
                        for r in range(2)])
    seen = {}
    hook = sae.register_forward_hook(lambda m, a, out: seen.update(x=a[0], out=out))
    with swap_codes(model, "mlp_0", old.view(2, 1), new.view(2, 1), positions=[3]) as changed, \
            recording(model, ["mlp_0"]) as rec2:
        model(input_ids=ids)
    hook.remove()
    after = rec2.codes["mlp_0"]
    assert int(sum(c.sum() for c in changed)) == 2  # one slot per row, only at position 3
    for r in range(2):
        assert int(new[r]) in after[r, 3, 0].tolist() and int(old[r]) not in after[r, 3, 0]
        assert torch.equal(after[r, :3], codes[r, :3]) and torch.equal(after[r, 4:], codes[r, 4:])
    # by hand: a's latent gone, b's latent in its slot at b's mean active value
    x = seen["x"].reshape(-1, 32)
    lat, val = sae.encode(x)
    for r in range(2):
        row = r * 6 + 3
        slot = int((lat[row] == old[r]).nonzero())
        lat[row, slot], val[row, slot] = new[r], sae.mean_act[new[r]]
    assert torch.allclose(seen["out"].reshape(-1, 32), sae.decode(lat, val), atol=1e-5)


def test_sae_patch_writes_b_recorded_values():
    """A full swap into an SAE writes b's latents at b's recorded values (not their means):
    the site's output at the patched positions is the SAE's reconstruction of b's input."""
    torch.manual_seed(0)
    config = CodebookConfig(sites=["mlp"], layers=[0], num_codes=8, k=1)
    model = CodebookModel(tiny_model("gpt_neox"), config)
    sae = model.codebooks["mlp_0"] = SparseCoderLayer(new_sparse_coder(32, 64, 4)).eval()
    sae.mean_act.copy_(torch.linspace(1.0, 2.0, 64))
    a, b = torch.randint(1, 64, (1, 6)), torch.randint(1, 64, (1, 6))
    b[0, :2] = a[0, :2]  # the same prefix: position 2 on differs
    outs = {}
    hook = sae.register_forward_hook(lambda m, args, out: outs.setdefault(len(outs), out))
    with recording(model, ["mlp_0"], scores=True) as rec:
        model(input_ids=b)
    with patch_codes(model, "mlp_0", rec, positions=[2, 3, 4]):
        model(input_ids=a)
    model(input_ids=a)
    hook.remove()
    own_b, patched, own_a = outs[0][0], outs[1][0], outs[2][0]
    # position 2 onwards sees a's earlier tokens: only the site itself is patched, so the
    # reconstruction there is exactly b's where b's recorded latents and values are written
    assert torch.allclose(patched[2:5], own_b[2:5], atol=1e-5)
    assert torch.allclose(patched[:2], own_a[:2], atol=1e-6)
    assert not torch.allclose(patched[2:5], own_a[2:5], atol=1e-3)


def _planted_dead(tmp_path, dim=16, latents=64, k=4):
    """An SAE whose second half of latents never fires at the start (encoder rows shrunk),
    its data cache, and those latents' ids."""
    coder = new_sparse_coder(dim, latents, k, seed=0)
    torch.manual_seed(2)
    data = torch.randn(8192, dim)
    with torch.no_grad():
        coder.encoder.weight[latents // 2:] *= 0.02
    cache = _cache(tmp_path / "cache", data)
    return coder, data, cache, torch.arange(latents // 2, latents)


def _firing(coder, data, ids):
    with torch.no_grad():
        fired = coder.encode(data).top_indices.unique()
    return int(torch.isin(ids, fired).sum())


def test_dead_latents_revive_on_a_planted_case(tmp_path, monkeypatch):
    """AuxK revives planted dead latents once its gradient reaches the encoder; through
    sparsify 1.3.3's fused encoder (which drops that gradient) none comes back."""
    from codebook.compare.sparse_coder import require_sparsify

    sparsify = require_sparsify()

    opts = _opts(token_budget=32768, dead_tokens=1024, auxk_alpha=1 / 8)
    coder, data, cache, dead = _planted_dead(tmp_path)
    assert _firing(coder, data, dead) == 0  # dead at the start
    train, val = cache.split(0.125)
    record = train_sparse_coder(coder, cache, "s", opts, train, val)
    revived = _firing(coder, data, dead)
    assert revived >= len(dead) // 2, revived
    assert record.dead_window_tokens == min(record.tokens, 1_000_000)

    fused, data, cache, dead = _planted_dead(tmp_path / "fused")
    monkeypatch.setattr(type(fused), "encode", sparsify.SparseCoder.encode)  # sparsify's own
    train_sparse_coder(fused, cache, "s", opts, train, val)
    assert _firing(fused, data, dead) == 0


def test_fit_stops_at_the_budget_or_a_plateau_and_says_so(tmp_path):
    from codebook.compare.fitting import FiringClock, fit_to_budget

    cache = _cache(tmp_path / "c", torch.randn(4096, 4))
    train, val = cache.split(0.25)
    assert len(val) == 2 and not set(train) & set(val)
    steps = []
    batches = lambda epoch: cache.batches("s", 512, epoch, train)  # noqa: E731
    full = fit_to_budget(lambda x: steps.append(x.shape[0]), lambda: 1.0, batches,
                         _opts(token_budget=5000, plateau=False), FiringClock(4))
    assert full.tokens == 5120 and not full.stopped_early and set(steps) == {512}
    assert [t for t, _ in full.curve] == [2048, 4096, 5120]  # and epochs cycle past 3072
    flat = fit_to_budget(lambda x: None, lambda: 1.0, batches,
                         _opts(token_budget=1 << 20, plateau=True, patience=2,
                               eval_every_tokens=1024), FiringClock(4))
    assert flat.stopped_early and flat.tokens == 3 * 1024 and len(flat.curve) == 3


def test_cache_batches_span_shards_from_the_chosen_ones(tmp_path):
    data = torch.arange(40, dtype=torch.float32).view(40, 1)
    cache = _cache(tmp_path / "c", data, shards=8)  # 5 tokens a shard
    got = torch.cat(list(cache.batches("s", 8, seed=3, shards=[0, 2, 4, 6])))
    allowed = torch.cat([data[i * 5:(i + 1) * 5] for i in (0, 2, 4, 6)])
    assert got.shape[0] == 16 and set(got.flatten().tolist()) <= set(allowed.flatten().tolist())
    assert len(set(got.flatten().tolist())) == 16  # no token twice in a pass


def _steer_models(vocab: int = 64):
    """A per-head codebook model (4 heads, k=2) and the same base with an SAE (one group)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from codebook.compare.methods import neuron_model

    def lm():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(
            "gpt_neox", vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)).eval()

    base = lm()
    config = CodebookConfig(sites=["attn_heads"], layers=[1], num_codes=32, k=2,
                            score="cosine")
    codebook = CodebookModel(lm(), config).eval()
    sae_model = neuron_model(base, config).model
    sae = SparseCoderLayer(new_sparse_coder(32, 128, 8)).eval()
    sae.mean_act.fill_(1.0)
    sae.max_act.fill_(3.0)
    sae_model.codebooks["attn_heads_1"] = sae
    return {"codebook": codebook, "sae": sae_model}


def test_steering_gives_every_method_the_same_number_from_the_same_pool(tok_dir, tokenizer):
    """Per topic, every method steers with ``features`` features taken from a pool of the
    ``pool`` most enriched ones, whatever its number of codebook groups (4 heads vs 1 SAE)."""
    from text_helpers import lines

    from codebook.compare.config import SteeringOptions
    from codebook.compare.steer import choose_features
    from codebook.steering import count_codes, find_topic_codes

    opts = SteeringOptions(features=3, pool=6)
    topic = {"topic_texts": [t.upper() + " storm storm" for t in lines(12)],
             "token_ids": list(range(5, 40))}
    probe = torch.randint(1, 60, (1, 24))
    for name, model in _steer_models(len(tokenizer)).items():
        sites = list(model.codebooks)
        background = count_codes(model, tokenizer, lines(20), sites)
        pool = find_topic_codes(model, tokenizer, topic["topic_texts"], background, sites,
                                top=opts.pool)
        chosen = choose_features(model, tokenizer, topic, background, sites, probe, opts)
        assert len(pool) == opts.pool, name
        assert len(chosen) == opts.features, name
        assert {c["name"] for c in chosen} <= {c["name"] for c in pool}, name
        per_group = {}
        for c in chosen:
            per_group[c["group"]] = per_group.get(c["group"], 0) + 1
        assert max(per_group.values()) <= model.codebooks[sites[0]].k, name


def test_set_and_add_interventions_reach_their_strengths():
    """``set`` forces a feature at a multiple of its reference value (an SAE latent: its mean
    or largest active value; a code: its weight 1), ``add`` adds its unit vector at a norm."""
    from codebook.compare.steer import Intervention, intervene

    models = _steer_models()
    ids = torch.randint(1, 60, (1, 5))
    for name, model in models.items():
        layer = model.codebooks["attn_heads_1"]
        outs = []
        feature = {"site": "attn_heads_1", "group": 0, "code": 7, "name": "f"}

        def run(model=model, layer=layer, outs=outs):  # after the intervention's own hooks
            hook = layer.register_forward_hook(lambda m, a, out: outs.append((a[0], out)))
            model(input_ids=ids)
            hook.remove()

        run()
        for iv in (Intervention("set", 2.0), Intervention("set", 1.0, "max"),
                   Intervention("add", 0.5)):
            with intervene(model, [feature], iv, {"attn_heads_1": 4.0}):
                run()
        (x, plain), (_, set2), (_, set_max), (_, add) = outs
        vec = (layer.codes[0, 7] if name == "sae" else
               torch.cat([layer.codes[0, 7], torch.zeros(24)]))
        assert torch.allclose(add - plain, 2.0 * vec / vec.norm(), atol=1e-5)
        if name == "sae":  # the weakest latent swapped for latent 7 at 2 x mean / the max
            lat, val = layer.encode(x.reshape(-1, 32))
            lat[:, -1], val[:, -1] = 7, 2.0
            assert torch.allclose(set2.reshape(-1, 32), layer.decode(lat, val), atol=1e-5)
            val[:, -1] = 3.0
            assert torch.allclose(set_max.reshape(-1, 32), layer.decode(lat, val), atol=1e-5)
        else:  # the head's weaker code replaced by code 7, counted twice
            idx = layer.select(x.reshape(-1, 4, 8))
            idx[:, 0, -1] = 7
            expected = layer.lookup(idx).reshape(-1, 32)
            expected[:, :8] += layer.codes[0, 7]
            assert torch.allclose(set2.reshape(-1, 32), expected, atol=1e-5)


def test_steering_against_cost_reads_each_ceiling_from_the_grid(tmp_path):
    """The steering curve against cost: at each ceiling (a multiple of the unsteered base's
    perplexity) a topic counts its best grid rate under it, or its unsteered rate if none is;
    the report tabulates it and the per-intervention means beside the held-out headline."""
    from codebook.compare.report import CEILING_MULTIPLES, render
    from codebook.compare.steer import best_under_ceiling

    def topic(rate0, grid):
        return {"topic": "t", "baseline_rate": rate0, "features": ["f"], "chosen": None,
                "test": None, "grid": [{"intervention": iv, "rate": r, "perplexity": ppl}
                                       for iv, r, ppl in grid]}

    topics = [topic(0.1, [("set 1x mean", 0.5, 30.0), ("add 1x norm", 0.9, 70.0)]),
              topic(0.2, [("set 1x mean", 0.7, 45.0), ("add 1x norm", 0.8, None)])]
    assert best_under_ceiling(topics, 25.0) == (pytest.approx(0.15), 0)  # both unsteered
    assert best_under_ceiling(topics, 40.0) == (pytest.approx(0.35), 0)
    assert best_under_ceiling(topics, 50.0) == (pytest.approx(0.6), 1)
    assert best_under_ceiling(topics, 80.0) == (pytest.approx(0.8), 2)
    res = {"topics": topics, "unsteered_perplexity": 20.0, "ppl_ceiling": 40.0,
           "steering_rate": 0.3, "steering_topics_ge_060": 0, "steering_topics": 2,
           "steering_baseline_rate": 0.15}
    steering = {"sae": res, "neuron": {**res, "unsteered_perplexity": 25.0}}
    text = render({"rows": [], "task": "text", "seeds": [0], "sparsity": [1], "name": "t",
                   "references": [], "steering": steering}, tmp_path / "c.png")
    table = text.split("## Steering against cost")[1]
    assert f"<= {CEILING_MULTIPLES[1]:g} x 25.0" in table  # the base's (dense model's) unit
    cells = " | ".join("{:.2f} ({})".format(*best_under_ceiling(topics, m * 25.0))
                       for m in CEILING_MULTIPLES)
    assert f"| sae (unsteered 20.0) | {cells} |" in table
    assert "| set 1x mean | 0.60 (38) | 0.60 (38) |" in table
    assert "| add 1x norm | 0.90 (70) | 0.90 (70) |" in table  # a missing perplexity skipped


def test_collect_activations_stops_after_the_deepest_site():
    model = tiny_model("gpt_neox")
    config = CodebookConfig(sites=["mlp"], layers=[0], num_codes=8, k=1)
    sites = CodebookModel(tiny_model("gpt_neox"), config).sites
    calls = []
    model.gpt_neox.layers[1].register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(1, 64, (2, 7))
    acts = collect_activations(model, sites, ids)
    assert calls == []  # layer 1 never ran
    seen = {}
    h = model.gpt_neox.layers[0].mlp.register_forward_hook(
        lambda m, a, out: seen.setdefault("x", out))
    model(input_ids=ids)
    h.remove()
    assert torch.allclose(acts["mlp_0"], seen["x"].reshape(-1, 32))


def test_activation_cache_streams_shards_and_reports_missing(tmp_path):
    with pytest.raises(ConfigError, match="no finished activation cache"):
        ActivationCache.open(tmp_path)
    for i in range(3):
        write_shard(tmp_path, i, {"s": torch.full((10, 4), float(i))}, torch.zeros(2, 5))
    write_meta(tmp_path, {"s": 4}, 3, 30)
    cache = ActivationCache.open(tmp_path)
    seen = torch.cat(list(cache.batches("s", 5)))
    assert seen.shape == (30, 4) and sorted(seen[:, 0].unique().tolist()) == [0.0, 1.0, 2.0]
    with pytest.raises(ConfigError, match="cached sites"):
        cache.site("nope")
    (tmp_path / "shard-00001.safetensors").unlink()
    with pytest.raises(ConfigError, match="missing"):
        ActivationCache.open(tmp_path)


def _compare(tmp_path, *extra):
    cmd = [sys.executable, "pipelines/compare.py", "--quick", "--out", str(tmp_path / "out"),
           *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_euclidean_finetunes_above_the_headline_average_their_codes(tmp_path):
    """The FSM's codebooks score by euclidean distance at k=1; the sparsity points at 2 and 4
    x k average their k codes (a sum of the k nearest codes is refused by the config)."""
    from train_helpers import FSM_CONFIG, tiny_overrides

    from codebook.compare.protocol import phase_config
    from codebook.training.config import load_config

    train = load_config(FSM_CONFIG, tiny_overrides(tmp_path, **{"codebook.start_step": 4,
                                                                "run.max_steps": 8}))
    assert train.codebook.score == "euclidean" and train.codebook.k == 1
    made = {m: phase_config(train, f"cb{m}", tmp_path, "base", codebooks=True, k_multiple=m)
            for m in (1, 2, 4)}
    assert [(c.codebook.k, c.codebook.combine) for c in made.values()] == [
        (1, "sum"), (2, "mean"), (4, "mean")]
    for c in made.values():
        c.codebook.validate()  # each one a config the loop accepts
    # the post-hoc codebooks take the same rule; a cosine codebook keeps summing its codes
    assert train.codebook.at_k(2).combine == "mean"
    assert CodebookConfig(score="cosine").at_k(4).combine == "sum"


def test_bad_input_fails_before_work(tmp_path):
    done = _compare(tmp_path, "--set",
                    "train_overrides=['codebook.k=100', 'codebook.combine=mean']")
    assert done.returncode != 0 and "larger than the dictionary" in done.stderr
    done = _compare(tmp_path, "--set", f"base_model={tmp_path / 'nothing'}")
    assert done.returncode != 0 and "base_model" in done.stderr and "does not exist" in done.stderr
    done = _compare(tmp_path, "--set", "train_overrides=['codebook.layers=[7]']")
    assert done.returncode != 0 and "layer 7 does not exist" in done.stderr
    done = _compare(tmp_path, "--set", "methods=[sae]")
    assert done.returncode != 0 and "must include 'codebook'" in done.stderr
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "sparsify.py").write_text("raise ImportError('blocked for the test')\n")
    env = {"PYTHONPATH": str(blocked), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "pipelines/compare.py", "--quick", "--out", str(tmp_path / "o")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0 and "eai-sparsify" in done.stderr and ".[sae]" in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_quick_comparison_has_every_method_and_metric(tmp_path):
    """The quick FSM comparison: the base, its plain-finetune control and the end-to-end
    codebook models trained by the one loop; every method at each L0 multiple (1 and 2) and
    the headline at two seeds; the same token budget for every cache-fitted method."""
    done = _compare(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    rows = summary["rows"]
    keys = [(r["method"], r["multiple"], r["seed"]) for r in rows]
    expected = [(m, 1, s) for s in (0, 1) for m in METHODS[:3]]
    expected += [(f"{m}_2x", 2, 0) for m in METHODS[:3]] + [("neuron", 1, 0)]
    assert keys == expected
    by = {(r["method"], r["seed"]): r for r in rows}
    for (method, _), row in by.items():
        for key in ROW_KEYS:
            assert key in row, (method, key)
            if method != "neuron":
                assert row[key] is not None, (method, key)
    # the same sparsity: the SAE's L0 is the codebook's (up to latents that end at zero), 2x
    cb, sae = by[("codebook", 0)], by[("sae", 0)]
    assert cb["l0"] * 0.8 < sae["l0"] <= cb["l0"] + 1e-6
    assert by[("sae_2x", 0)]["l0"] > 1.6 * sae["l0"]
    assert by[("codebook_2x", 0)]["l0"] == pytest.approx(2 * cb["l0"])
    assert sae["dictionary_size"] == cb["dictionary_size"]
    # equal budgets: every cache-fitted method trains the same tokens per site
    budget = 24576 * len(summary["sites"])
    for m in ("posthoc_codebook", "sae", "posthoc_codebook_2x", "sae_2x"):
        assert by[(m, 0)]["train_tokens"] == budget, m
        assert by[(m, 0)]["train_seconds"] > 0 and by[(m, 0)]["dead_fraction_train"] >= 0
        curve = next(iter(by[(m, 0)]["fits"].values()))["curve"]
        assert [t for t, _ in curve] == [8192, 16384, 24576]
    assert cb["train_tokens"] == 100 * 32 * 49  # the codebook phase: 100 steps of 32 x 49
    # one reference for every method: the plain-finetune control on the same data
    refs = {r["method"]: r for r in summary["references"]}
    assert set(refs) == {"base", "control"}
    for row in rows:
        if row["method"] != "neuron":
            assert row["ce_gap_control"] == pytest.approx(
                row["ce_loss_on"] - refs["control"]["ce_loss_on"])
        assert 0 <= row["state_precision_test"] <= 1
    assert cb["ce_loss_off"] != refs["control"]["ce_loss_on"]  # own weights != the control
    for row in (r for r in rows if r["method"] != "neuron"):
        assert row["fve"] > 0.5  # every dictionary reconstructs its site
        assert row["state_precision_null"] < row["state_precision_test"]
        assert row["features_changed"] <= row["features_active"]
        dose = row["dose"]
        assert list(dose)[:2] == ["dedicated", "linked"] and f"sites:{len(summary['sites'])}" \
            in dose
        assert dose[f"sites:{len(summary['sites'])}"]["success"] == pytest.approx(
            row["full_swap_success"])
    assert summary["peak_rss_mb"] > 0 and summary["cache_tokens"] > 0
    out = tmp_path / "out"
    table = (out / "table.md").read_text()
    assert "± " in table and "## Sparsity points" in table and "## References" in table
    assert (out / "curves.png").stat().st_size > 1000
    # the SAEs are saved in sparsify's own format and load with its loader
    from sparsify import SparseCoder

    for site in summary["sites"]:  # quick model: 4 heads, 128 codes, k=1
        latents, k = (4 * 128, 4) if site.startswith("attn_heads") else (128, 1)
        for name, mult, seed in (("sae", 1, 0), ("sae", 1, 1), ("sae_2x", 2, 0)):
            sae = SparseCoder.load_from_disk(out / "saes" / f"{name}-s{seed}" / site)
            assert (sae.num_latents, sae.cfg.k) == (latents, mult * k)
    # MLflow: a parent run with a child per row
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("codebook-compare")
    children = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == sorted(
        f"{m}-s{s}" for m, _, s in keys)
    # a rerun resumes: every row kept under rows/ is reused, a missing one is scored again
    saved = sorted(p.name for p in (out / "rows").iterdir())
    assert saved == sorted(f"{m}-s{s}.json" for m, _, s in keys)
    (out / "rows" / "sae-s1.json").unlink()
    again = _compare(tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    scored = [line for line in again.stdout.splitlines() if line.startswith("scored ")]
    assert [line.split(" in ")[0] for line in scored] == ["scored sae (seed 1)"]
    assert again.stdout.count("scored before") == len(keys) - 1
    rerun = json.loads(again.stdout.strip().splitlines()[-1])["rows"]
    assert [(r["method"], r["multiple"], r["seed"]) for r in rerun] == keys
    for old, new in zip(rows, rerun, strict=True):
        if (old["method"], old["seed"]) != ("sae", 1):
            assert new == old


@pytest.mark.slow
def test_text_split_keeps_each_document_on_one_side(tokenizer):
    import numpy as np

    from codebook.analysis.features import RegexFeature
    from codebook.compare.text import split_by_document, text_blocks

    texts = [" ".join(f"w{d} {i}" for i in range(40 * (d + 1))) for d in range(6)]
    blocks = text_blocks(tokenizer, texts, 16, [RegexFeature("digits", r"\d+")])
    assert blocks.docs.shape == (blocks.ids.shape[0],)
    assert sorted(set(blocks.docs.tolist())) == list(range(6))
    assert (np.bincount(blocks.docs) > 1).any()  # documents with several blocks
    sel, test = split_by_document(blocks.docs, seed=0, test_fraction=0.5)
    assert sel.any() and test.any() and not (sel & test).any() and (sel | test).all()
    assert not set(blocks.docs[sel]) & set(blocks.docs[test])  # no document on both sides
    again = split_by_document(blocks.take(np.arange(len(blocks.docs))).docs, 0, 0.5)
    assert (again[0] == sel).all()
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_by_document(np.zeros(5, dtype=int), 0, 0.5)


def test_text_comparison_scores_regex_features(tmp_path, tok_dir, tokenizer):
    """The text comparison: evaluation documents held out of every method's training data
    (the end-to-end model's corpus and the cache), regex features per method, and steering
    like for like (the same number of features from the same pool, every intervention, a
    dense baseline, intervals)."""
    import yaml
    from text_helpers import lines
    from train_helpers import tiny_overrides

    from codebook.data.heldout import is_heldout

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = {}
    for i in range(12):  # digits, years, punctuation and brackets for the default features
        extra = [f"In {1990 + j} they sold {j * 7} books (and {i} maps)." for j in range(30)]
        texts[f"doc{i:02d}.txt"] = "\n".join(lines(40) + extra)
        (corpus / f"doc{i:02d}.txt").write_text(texts[f"doc{i:02d}.txt"])
    overrides = tiny_overrides(tmp_path / "runs", "t", **{
        "model.tokenizer": tok_dir, "model.from_config.vocab_size": len(tokenizer),
        "model.from_config.bos_token_id": tokenizer.eos_token_id,
        "model.from_config.eos_token_id": tokenizer.eos_token_id,
        "data.source": "text", "data.paths": f"[{corpus}]", "data.block_size": 32,
        "data.eval_blocks": 4, "data.heldout_fraction": 0.3, "codebook.start_step": 6,
        "run.max_steps": 12, "deepspeed.enabled": False})
    fit = {"token_budget": 4096, "batch_tokens": 512, "micro_batch_tokens": 256,
           "eval_every_tokens": 2048, "val_tokens": 512}
    spec = {"name": "text", "train_config": str(REPO / "configs" / "fsm.yaml"),
            "train_overrides": overrides, "block_size": 32, "sae": fit, "posthoc": fit,
            "sparsity": [1], "seeds": [0],
            "cache": {"sequences": 64, "rows_per_shard": 8},
            "analysis": {"eval_sequences": 48},
            "topics": str(tmp_path / "topics.yaml"),
            "steering": {"features": 2, "pool": 6, "samples": 2, "max_new_tokens": 8,
                         "set_multiples": [1.0, 2.0], "add_norms": [1.0], "bootstrap": 200}}
    topics = {"prompts": ["In", "The"], "background_texts": lines(30),
              "topics": [{"name": "years", "regex": r"\b19\d\d\b",
                          "topic_texts": [f"In {1990 + j} and {1991 + j}." for j in range(9)]}]}
    (tmp_path / "topics.yaml").write_text(yaml.safe_dump(topics))
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "pipelines/compare.py", "--config", str(tmp_path / "compare.yaml"),
           "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["task"] == "text"
    split = summary["split"]
    assert split["eval_documents"] and split["cache_documents"]
    assert not set(split["eval_documents"]) & set(split["cache_documents"])
    # held out by the training config's own rule: the end-to-end model never trains on them
    held = {n for n, t in texts.items() if is_heldout(t, 0.3, 0)}
    assert set(split["eval_documents"]) <= held and not set(split["cache_documents"]) & held
    rows = {r["method"]: r for r in summary["rows"]}
    assert tuple(rows) == METHODS
    for method, row in rows.items():
        assert 0 < row["regex_coverage"] <= 1, method
        assert 0 <= row["regex_precision_test"] <= 1, method
        assert set(row["regex_per_feature"]) >= {"digits", "years_1900s", "brackets"}
        for key in ("fve", "ce_loss_recovered", "kl", "ce_loss_recovered_all", "kl_all"):
            assert row[key] is not None, (method, key)
        assert row["regex_precision_common"] is None or 0 <= row["regex_precision_common"] <= 1
    assert rows["neuron"]["l0"] > rows["sae"]["l0"] > 0
    steering = summary["steering"]
    assert set(steering) == {"codebook", "posthoc_codebook", "sae", "neuron"}
    for method, res in steering.items():
        (topic,) = res["topics"]
        if method == "neuron":  # the dense baseline: one mean-difference vector per site
            assert topic["features"] == [f"dense:{s}" for s in summary["sites"]]
            assert [g["intervention"] for g in topic["grid"]] == ["add 1x norm"]
        else:  # the same number of features for every method, from a pool of 6
            assert len(topic["features"]) == 2, method
            assert [g["intervention"] for g in topic["grid"]] == [
                "set 1x mean", "set 2x mean", "set 1x max", "add 1x norm"]
        for g in topic["grid"]:
            assert g["rate_lo"] <= g["rate"] <= g["rate_hi"] and g["n"] == 4
            assert g["perplexity"] > 0
        assert res["steering_rate_lo"] <= res["steering_rate"] <= res["steering_rate_hi"]
    # one perplexity ceiling for every method: 2 x the unsteered base's samples (the neuron
    # model splices nothing in), not each method's own unsteered samples
    ceilings = [res["ppl_ceiling"] for res in steering.values()]
    assert ceilings == pytest.approx([2 * steering["neuron"]["unsteered_perplexity"]] * 4)
    assert len({res["unsteered_perplexity"] for res in steering.values()}) > 1  # splices differ
    report = (tmp_path / "out" / "table.md").read_text()
    assert "## Steering at matched cost" in report and "## Steering against cost" in report


def test_sparsity_curves_join_each_methods_points(tmp_path):
    """The curves figure draws one line per method through its L0 multiples (sae, sae_2x,
    sae_4x are one line, ordered by L0), the headline's interval as its error bar."""
    from codebook.compare.aggregate import curve_series, plot_curves

    points = [{"method": "sae_4x", "l0": 10.0, "fve": 0.97},
              {"method": "sae", "l0": 2.5, "fve": 0.93, "fve_ci": 0.01},
              {"method": "codebook", "l0": 2.5, "fve": 0.99},
              {"method": "sae_2x", "l0": 5.0, "fve": 0.95},
              {"method": "neuron", "l0": 128.0, "fve": None}]
    assert curve_series(points, "fve") == {
        "codebook": [(2.5, 0.99, 0.0)],
        "sae": [(2.5, 0.93, 0.01), (5.0, 0.95, 0.0), (10.0, 0.97, 0.0)]}
    path = plot_curves(points, tmp_path / "curves.png", "t")
    assert path.stat().st_size > 1000


def test_a_retrained_model_changes_its_rows_key(tmp_path):
    """A saved end-to-end row is keyed by its model's path and write time: a model retrained
    into the same folder is scored again, an untouched one is reused."""
    import os

    from codebook.compare.rows import model_stamp

    (tmp_path / "model.safetensors").write_bytes(b"a")
    first = model_stamp(str(tmp_path))
    assert model_stamp(str(tmp_path)) == first
    os.utime(tmp_path / "model.safetensors", ns=(1, 10**18))  # rewritten later
    assert model_stamp(str(tmp_path)) != first and model_stamp(str(tmp_path)).startswith(
        str(tmp_path))
