"""Codebook models by Hub name, from a Hugging Face cache laid out as huggingface_hub lays it out
(no network: offline), and the folder with its model card that push_to_hub uploads."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from huggingface_hub import ModelCard

from codebook import CodebookConfig, CodebookModel, ConfigError
from codebook.hub import model_card, prepare_upload

ROOT = Path(__file__).resolve().parents[1]
CB = dict(sites=["attn_heads", "mlp"], num_codes=16, k=2)


def codebook_model(seed: int) -> CodebookModel:
    model = CodebookModel(tiny_model("llama", seed=seed), CodebookConfig(**CB))
    torch.manual_seed(seed + 10)
    for cb in model.codebooks.values():
        cb.codes.data.normal_(0, 0.05)
    return model.eval()


def fill_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str,
                   main: bool = True) -> Path:
    """Put ``folder``'s files into ``cache`` as huggingface_hub stores a download of ``repo_id``
    at ``commit``: ``blobs/<etag>`` (sha256 for LFS files, git's blob sha1 for the others),
    ``snapshots/<commit>/<file>`` as relative links to them, ``refs/main`` naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        if file.suffix == ".safetensors":
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / etag).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", etag))
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return snapshot


COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> dict:
    """A cache holding owner/cb-model (commit A, then B on main) and owner/base (a base model)."""
    tmp = tmp_path_factory.mktemp("hub")
    cache = tmp / "hub"
    tokens = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    out = {"cache": cache, "tokens": tokens, "logits": {}}
    for commit, seed in ((COMMIT_A, 1), (COMMIT_B, 2)):
        model = codebook_model(seed)
        folder = prepare_upload(model, tmp / f"model-{seed}", repo_id="owner/cb-model",
                                base_model="owner/base")
        fill_hub_cache(cache, "owner/cb-model", folder, commit, main=commit == COMMIT_B)
        with torch.no_grad():
            out["logits"][commit] = model(input_ids=tokens).logits
    base = tiny_model("llama", seed=3)
    base.save_pretrained(tmp / "base")
    fill_hub_cache(cache, "owner/base", tmp / "base", "c" * 40)
    with torch.no_grad():
        out["base_logits"] = base(tokens).logits
    return out


def test_a_codebook_model_loads_by_name_from_the_cache_at_main_or_a_revision(hub_cache):
    kw = dict(cache_dir=hub_cache["cache"], local_files_only=True)
    tokens = hub_cache["tokens"]
    model = CodebookModel.from_pretrained("owner/cb-model", **kw).eval()
    assert model.codebook_config == CodebookConfig(**CB)
    with torch.no_grad():  # codebooks and base weights both from main's snapshot (B)
        torch.testing.assert_close(model(input_ids=tokens).logits, hub_cache["logits"][COMMIT_B])
    assert model.base_model_name == "owner/base"  # from the card, for the next push's card
    assert "base_model: owner/base" in model_card(model, repo_id="owner/cb-model-2")
    old = CodebookModel.from_pretrained("owner/cb-model", revision=COMMIT_A, **kw).eval()
    with torch.no_grad():  # both from commit A
        torch.testing.assert_close(old(input_ids=tokens).logits, hub_cache["logits"][COMMIT_A])


def test_a_base_model_by_name_gets_new_codebooks(hub_cache):
    kw = dict(cache_dir=hub_cache["cache"], local_files_only=True)
    model = CodebookModel.from_pretrained("owner/base", CodebookConfig(**CB), **kw).eval()
    assert list(model.sites) == ["attn_heads_0", "mlp_0", "attn_heads_1", "mlp_1"]
    assert model.base_model_name == "owner/base"
    with torch.no_grad(), model.codebooks_disabled():
        logits = model(input_ids=hub_cache["tokens"]).logits
    torch.testing.assert_close(logits, hub_cache["base_logits"])
    with pytest.raises(ConfigError) as err:  # no codebooks there and none given
        CodebookModel.from_pretrained("owner/base", **kw)
    assert err.value.field == "name_or_path" and "codebook_config=" in err.value.fix


OFFLINE_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from codebook import CodebookConfig, CodebookModel, ConfigError

    out, tokens = {}, torch.load(sys.argv[1])
    model = CodebookModel.from_pretrained("owner/cb-model").eval()
    with torch.no_grad():
        torch.save(model(input_ids=tokens).logits, sys.argv[2])
    out["config"] = model.codebook_config.to_dict()
    base = CodebookModel.from_pretrained("owner/base", CodebookConfig(sites=["mlp"], k=1))
    out["base_sites"] = list(base.sites)
    for name, call in [("absent", lambda: CodebookModel.from_pretrained("owner/absent")),
                       ("push", lambda: model.push_to_hub("owner/pushed"))]:
        try:
            call()
            out[name] = None
        except ConfigError as err:
            out[name] = [err.field, str(err)]
    print(json.dumps(out))
""")


def test_by_name_with_hf_hub_offline_and_the_cache_from_the_environment(hub_cache, tmp_path):
    torch.save(hub_cache["tokens"], tmp_path / "tokens.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home"),
           "HF_HUB_CACHE": str(hub_cache["cache"])}
    env.pop("HF_TOKEN", None)
    run = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, str(tmp_path / "tokens.pt"),
         str(tmp_path / "logits.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["config"] == CodebookConfig(**CB).to_dict()
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), hub_cache["logits"][COMMIT_B])
    assert out["base_sites"] == ["mlp_0", "mlp_1"]
    assert out["absent"][0] == "name_or_path" and "HF_HUB_OFFLINE is set" in out["absent"][1]
    assert out["push"][0] == "HF_HUB_OFFLINE"  # refused before anything is written or sent


def test_a_name_that_is_no_folder_and_not_in_the_cache_is_a_clear_error(hub_cache):
    with pytest.raises(ConfigError) as err:
        CodebookModel.from_pretrained("owner/absent", cache_dir=hub_cache["cache"],
                                      local_files_only=True)
    assert err.value.field == "name_or_path" and "owner/absent" in str(err.value)


# ---------------------------------------------------------------------- model card
def test_the_upload_folder_has_a_model_card_and_loads_as_a_codebook_model(tmp_path):
    model = codebook_model(1)
    folder = prepare_upload(model, tmp_path / "up", repo_id="owner/cb-model",
                            base_model="meta-llama/Llama-3.2-1B")
    card = ModelCard.load(folder / "README.md")  # huggingface_hub's own parser
    assert card.data.base_model == "meta-llama/Llama-3.2-1B"
    assert card.data.library_name == "codebook"
    assert {"codebook-features", "llama"} <= set(card.data.tags)
    text = card.text
    assert "| k (codes per token and codebook) | 2 (in force when saved: 2) |" in text
    assert "| codebook size | 16 codes |" in text
    assert "| `attn_heads` | `model.layers.*.self_attn.o_proj` | input | 0-1 | 4 (one per head) |" \
        in text
    assert "| `mlp` | `model.layers.*.mlp` | output | 0-1 | 1 | 32 |" in text
    assert 'CodebookModel.from_pretrained("owner/cb-model")' in text
    loaded = CodebookModel.from_pretrained(folder)  # the card does not upset loading
    assert loaded.codebook_config == model.codebook_config
    assert loaded.base_model_name == "meta-llama/Llama-3.2-1B"  # read back from the card


def test_the_base_model_comes_from_the_name_it_was_loaded_by_when_that_is_a_hub_id(tmp_path):
    model = codebook_model(1)
    model.model.config._name_or_path = "EleutherAI/pythia-70m"  # as from_pretrained(<id>) sets
    assert "base_model: EleutherAI/pythia-70m" in model_card(model)
    model.model.config._name_or_path = str(tmp_path)  # a local folder is no base model id
    card = model_card(model)
    assert "base_model" not in card.split("---")[1] and "| base model | not recorded |" in card
    model.model.config._name_or_path = "owner/cb-model"  # loaded with codebooks, card lacks base
    model.base_model_name = ""
    assert "| base model | not recorded |" in model_card(model)
