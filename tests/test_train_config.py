"""Training configuration: YAML + --set overrides, validated with clear errors (no Ray)."""

from __future__ import annotations

import pytest
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
    cfg = load_config(FSM_CONFIG, ["codebook.k=2", "optim.lr=0.01", "run.name=x"],
                      **{"run.max_steps": 7})
    assert cfg.codebook_config.k == 2 and cfg.optim.lr == 0.01 and cfg.run.max_steps == 7
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
    ],
)
def test_bad_config_is_rejected_with_field_and_fix(overrides, field, words):
    with pytest.raises((ConfigError, ValueError)) as err:
        load_config(FSM_CONFIG, overrides)
    text = str(err.value)
    assert words in text
    if isinstance(err.value, ConfigError):
        assert err.value.field == field and "Fix:" in text


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
