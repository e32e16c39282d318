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

from codebook import CodebookConfig, CodebookModel, recording, swap_codes
from codebook.compare.cache import ActivationCache, collect_activations, write_meta, write_shard
from codebook.compare.sparse_coder import SparseCoderLayer, new_sparse_coder, train_sparse_coder
from codebook.errors import ConfigError

METHODS = ("codebook", "posthoc_codebook", "sae", "sae_4x", "neuron")
ROW_KEYS = ("l0", "fve", "dead_fraction", "ce_loss_recovered", "kl", "ce_loss_recovered_all",
            "kl_all", "state_precision_test", "state_precision_selection",
            "state_precision_null", "swap_success", "swap_jsd", "features_changed",
            "features_active", "random_success", "full_swap_success")


def _coder(dim=16, latents=64, k=4):
    coder = new_sparse_coder(dim, latents, k, seed=0)
    torch.manual_seed(1)
    data = torch.randn(512, dim)
    train_sparse_coder(coder, lambda: data.split(128), steps=20)
    return coder, data


def test_sparse_coder_layer_is_the_library_sae():
    coder, data = _coder()
    layer = SparseCoderLayer(coder).eval()
    with torch.no_grad():
        expected = coder(data).sae_out
    out = layer(data)
    assert torch.allclose(out, expected, atol=1e-5)
    ids, acts = layer.encode(data)
    assert ids.shape == (512, 4) and ((ids >= 0) == (acts > 0)).all()


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


def test_bad_input_fails_before_work(tmp_path):
    done = _compare(tmp_path, "--set", "train_overrides=['codebook.k=64']")
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
    done = _compare(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    rows = {r["method"]: r for r in summary["rows"]}
    assert tuple(rows) == METHODS
    for method, row in rows.items():
        for key in ROW_KEYS:
            assert key in row, (method, key)
            if method != "neuron":
                assert row[key] is not None, (method, key)
    for key in ("l0", "fve", "state_precision_test", "first_transition_accuracy"):
        assert rows["neuron"][key] is not None
    # the same sparsity: the SAE's L0 is the codebook's (up to latents that end at zero), 4x
    assert rows["sae"]["l0"] <= rows["codebook"]["l0"] + 1e-6
    assert rows["sae"]["l0"] > 0.8 * rows["codebook"]["l0"]
    assert rows["sae_4x"]["l0"] > 3 * rows["sae"]["l0"]
    assert rows["sae"]["dictionary_size"] == rows["codebook"]["dictionary_size"]
    for row in rows.values():
        assert 0 <= row["state_precision_test"] <= 1
        if row["method"] != "neuron":
            assert row["fve"] > 0.5  # every dictionary reconstructs its site
            assert row["state_precision_null"] < row["state_precision_test"]
            assert row["features_changed"] <= row["features_active"]
    assert summary["peak_rss_mb"] > 0 and summary["cache_tokens"] > 0
    out = tmp_path / "out"
    assert (out / "table.md").read_text().count("\n") == len(METHODS) + 2
    # the SAEs are saved in sparsify's own format and load with its loader
    from sparsify import SparseCoder

    for site in summary["sites"]:  # quick model: 4 heads, 128 codes, k=1
        latents, k = (4 * 128, 4) if site.startswith("attn_heads") else (128, 1)
        for name, mult in (("sae", 1), ("sae_4x", 4)):
            sae = SparseCoder.load_from_disk(out / "saes" / name / site)
            assert (sae.num_latents, sae.cfg.k) == (latents, mult * k)
    # MLflow: a parent run with a child per method
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("codebook-compare")
    children = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == sorted(METHODS)


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
    import yaml
    from text_helpers import lines
    from train_helpers import tiny_overrides

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):  # digits, years, punctuation and brackets for the default features
        extra = [f"In {1990 + j} they sold {j * 7} books (and {i} maps)." for j in range(30)]
        (corpus / f"doc{i}.txt").write_text("\n".join(lines(40) + extra))
    overrides = tiny_overrides(tmp_path / "runs", "t", **{
        "model.tokenizer": tok_dir, "model.from_config.vocab_size": len(tokenizer),
        "model.from_config.bos_token_id": tokenizer.eos_token_id,
        "model.from_config.eos_token_id": tokenizer.eos_token_id,
        "data.source": "text", "data.paths": f"[{corpus}]", "data.block_size": 32,
        "data.eval_blocks": 4, "codebook.start_step": 6, "run.max_steps": 12,
        "deepspeed.enabled": False})
    spec = {"name": "text", "train_config": str(REPO / "configs" / "fsm.yaml"),
            "train_overrides": overrides, "block_size": 32,
            "sae": {"steps": 30, "batch_tokens": 128}, "posthoc": {"steps": 30,
                                                                   "batch_tokens": 128},
            "cache": {"sequences": 64, "rows_per_shard": 32},
            "analysis": {"eval_sequences": 48},
            "topics": str(tmp_path / "topics.yaml"),
            "steering": {"codes": 2, "samples": 2, "max_new_tokens": 8}}
    topics = {"prompts": ["In", "The"], "background_texts": lines(30),
              "topics": [{"name": "years", "regex": r"\b19\d\d\b",
                          "topic_texts": [f"In {1990 + j} and {1991 + j}." for j in range(9)]}]}
    (tmp_path / "topics.yaml").write_text(yaml.safe_dump(topics))
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "pipelines/compare.py", "--config", str(tmp_path / "compare.yaml"),
           "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["task"] == "text"
    rows = {r["method"]: r for r in summary["rows"]}
    assert tuple(rows) == METHODS
    for method, row in rows.items():
        assert 0 < row["regex_coverage"] <= 1, method
        assert 0 <= row["regex_precision_test"] <= 1, method
        assert set(row["regex_per_feature"]) >= {"digits", "years_1900s", "brackets"}
        for key in ("fve", "ce_loss_recovered", "kl", "ce_loss_recovered_all", "kl_all"):
            assert row[key] is not None, (method, key)
    assert rows["neuron"]["l0"] > rows["sae_4x"]["l0"] > rows["sae"]["l0"] > 0
    for method in METHODS[:-1]:  # topic steering with each method's own features
        row = rows[method]
        assert row["steering_topics"] == 1 and 0 <= row["steering_baseline_rate"] <= 1
        assert row["steering"]["years"] is None or 0 <= row["steering"]["years"] <= 1
    assert "steering_rate" not in rows["neuron"]
    assert (tmp_path / "out" / "table.md").read_text().count("regex prec. (test)") == 1
