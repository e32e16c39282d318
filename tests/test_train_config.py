"""Training configuration: YAML + --set overrides, validated with clear errors (no Ray)."""

from __future__ import annotations

import pytest
import torch
from train_helpers import FSM_CONFIG, REPO

from codebook.errors import ConfigError
from codebook.training.config import load_config


def test_shipped_configs_load_and_validate():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name in {"text_small.yaml", "smollm2_attn.yaml", "text_steer.yaml"}:
            continue  # need the corpus fetched by scripts/fetch_text.sh (tested there)
        cfg = load_config(path)
        assert cfg.run.max_steps > 0, path


def test_overrides_are_typed_and_dotted():
    cfg = load_config(FSM_CONFIG, ["codebook.k=2", "codebook.combine=mean", "optim.lr=0.01",
                                   "run.name=x"],
                      **{"run.max_steps": 7})
    assert cfg.codebook.k == 2 and cfg.optim.lr == 0.01 and cfg.run.max_steps == 7
    assert cfg.flat_params()["codebook.k"] == "2"


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        (["optim.learning_rate=1"], "optim.learning_rate", "unknown key"),
        (["optim.batch_size=big"], "optim.batch_size", "expected int"),
        (["run.max_steps=true"], "run.max_steps", "expected int"),
        (["codebook.k=5000"], "codebook.k", "larger than num_codes"),
        (["codebook.sites=[attn_heads, attention]"], "codebook.sites", "unknown site"),
        (["data.source=text", "data.paths=[/no/such/file.txt]"], "data.paths", "does not exist"),
        (["deepspeed.zero_stage=4"], "deepspeed.zero_stage", "got 4"),
        (["data.fsm={num_states: 5, num_edges: 9}"], "data.fsm", "num_edges"),
        (["codebook.k=2"], "codebook.combine", "score euclidean with combine sum and k=2"),
    ],
)
def test_bad_config_is_rejected_with_field_and_fix(overrides, field, words):
    with pytest.raises((ConfigError, ValueError)) as err:
        load_config(FSM_CONFIG, overrides)
    text = str(err.value)
    assert words in text
    if isinstance(err.value, ConfigError):
        assert err.value.field == field and "Fix:" in text


def test_euclidean_codebooks_above_k1_average_their_codes():
    """configs/fsm.yaml scores by euclidean distance: at k=2 it loads with combine mean (the
    sum of the two nearest codes is refused above), and k-means then leaves the centroids as
    they are instead of dividing them by k."""
    from codebook.layer import CodebookLayer

    cfg = load_config(FSM_CONFIG, ["codebook.k=2", "codebook.combine=mean"])
    assert cfg.codebook.score == "euclidean" and cfg.codebook.combine == "mean"
    layer = CodebookLayer(4, 2, 2, score="euclidean", combine="mean")
    samples = torch.tensor([[1.0, 0, 0, 0]] * 5 + [[0, 3.0, 0, 0]] * 5)
    layer.kmeans_init_(samples, generator=torch.Generator().manual_seed(0))
    assert sorted(layer.codes[0].norm(dim=-1).tolist()) == pytest.approx([1.0, 3.0])
    out = layer(torch.tensor([[0.0, 3.0, 0, 0]]))
    torch.testing.assert_close(out, torch.tensor([[0.5, 1.5, 0, 0]]))  # the mean of both


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_relative_paths_are_resolved_once_against_the_working_directory(tmp_path, monkeypatch,
                                                                       tok_dir):
    import shutil

    shutil.copytree(tok_dir, tmp_path / "data" / "tokenizers" / "bpe")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("some text")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(FSM_CONFIG, ["data.source=text", "data.paths=[corpus]",
                                   "model.tokenizer=data/tokenizers/bpe",
                                   "run.storage_path=runs"])
    assert cfg.model.tokenizer == str(tmp_path / "data" / "tokenizers" / "bpe")
    assert cfg.data.paths == [str(tmp_path / "corpus")]
    assert cfg.run.storage_path == str(tmp_path / "runs")
    # what the Ray workers get back (from another working directory) is the same
    from codebook.training.config import TrainConfig, build

    monkeypatch.chdir("/")
    again = build(TrainConfig, cfg.to_dict(), "")
    assert again.model.tokenizer == cfg.model.tokenizer and again.storage_path == tmp_path / "runs"


def test_a_missing_local_tokenizer_is_a_config_error_not_a_hub_lookup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="model.tokenizer: data/tokenizers/x does not exist"):
        load_config(FSM_CONFIG, ["model.tokenizer=data/tokenizers/x"])
    # an owner/name that is not a local folder stays a Hub id
    cfg = load_config(FSM_CONFIG, ["model.tokenizer=EleutherAI/pythia-70m"])
    assert cfg.model.tokenizer == "EleutherAI/pythia-70m"
