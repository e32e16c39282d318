"""The LM table (pipelines/lm_table.py, codebook.lm_table): held-out documents never trained on,
the plain (no-codebook) control trained by the one loop, bad input refused before any work, and
the quick table end to end under Ray Train: every row trained, scored and logged; a rerun skips
finished rows and an interrupted row resumes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from codebook.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pipelines"))
TWO_ROWS = ("rows={attn_k2: ['codebook.sites=[attn_heads]', codebook.k=2], "
            "mlp_4x_k2: ['codebook.sites=[mlp]', codebook.groups=4, codebook.k=2]}")


def _marked_corpus(folder: Path, n: int = 30) -> list[str]:
    """Documents each made of one marker word of their own, repeated."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(n):
        texts.append(" ".join([f"w{i:02d}"] * 60))
        (folder / f"d{i:02d}.txt").write_text(texts[-1])
    return texts


def _words(tokenizer, blocks) -> set[str]:
    """The marker words whole in the decoded blocks (a block may start inside one)."""
    import re

    return {m for b in blocks for m in re.findall(r"w\d\d", tokenizer.decode(b))}


def _text_cfg(tmp_path: Path, corpus: Path, tok_dir: str, **extra: str):
    from text_helpers import text_config

    from codebook.data.text import load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    data = {"data.source": "text", "data.paths": f"[{corpus}]", "data.heldout_fraction": 0.3,
            **extra}
    return text_config(tmp_path / "runs", tok_dir, tokenizer, "t", **data), tokenizer


def test_heldout_documents_are_never_training_blocks(tmp_path, tok_dir):
    """The in-process split keeps every block of a held-out document out of training, and a
    block of each side holds only its own documents' text."""
    from codebook.data.blocks import split_blocks
    from codebook.data.heldout import is_heldout, split_documents

    texts = _marked_corpus(tmp_path / "c")
    cfg, tokenizer = _text_cfg(tmp_path, tmp_path / "c", tok_dir)
    kept, held = split_documents(texts, 0.3, 0)
    assert held and kept and sorted(kept + held) == list(range(len(texts)))
    assert [is_heldout(texts[i], 0.3, 0) for i in held] == [True] * len(held)
    assert split_documents(texts, 0.3, 1) != (kept, held)  # the seed matters
    train, heldout = split_blocks(cfg.data, tokenizer)
    held_words = {f"w{i:02d}" for i in held}
    assert _words(tokenizer, heldout) <= held_words
    assert _words(tokenizer, train) and not _words(tokenizer, train) & held_words


def test_ray_training_data_excludes_heldout_documents(tmp_path, tok_dir):
    """The Ray Data corpus (what Ray Train workers read) splits by the same documents."""
    import ray

    from codebook.data.heldout import split_documents
    from codebook.ray_glue.data import text_datasets

    texts = _marked_corpus(tmp_path / "c")
    cfg, tokenizer = _text_cfg(tmp_path, tmp_path / "c", tok_dir)
    _, held = split_documents(texts, 0.3, 0)
    from codebook.ray_glue.session import init_local

    init_local(num_cpus=2, include_dashboard=False)
    try:
        ds = text_datasets(cfg)
        blocks = {k: np.stack([r["input_ids"] for r in d.take_all()]) for k, d in ds.items()}
    finally:
        ray.shutdown()
    held_words = {f"w{i:02d}" for i in held}
    assert not _words(tokenizer, blocks["train"]) & held_words
    assert _words(tokenizer, blocks["eval"]) <= held_words
    assert len(blocks["eval"]) == min(cfg.data.eval_blocks, len(blocks["eval"]))


def test_plain_control_trains_without_codebooks(tmp_path):
    """codebook.sites: [] trains the plain model by the same loop; it saves and loads as such."""
    from train_helpers import FSM_CONFIG, tiny_overrides

    from codebook.resolve import load_trained_model
    from codebook.training.config import load_config
    from codebook.training.local import train_local

    cfg = load_config(FSM_CONFIG, tiny_overrides(tmp_path, "plain", **{
        "codebook.sites": "[]", "run.max_steps": 4, "deepspeed.enabled": "false"}))
    summary = train_local(cfg, device="cpu")
    assert summary["steps"] == 4 and np.isfinite(summary["final_train_loss"])
    model = load_trained_model(summary["model"])
    assert len(model.codebooks) == 0 and model.codebook_config.sites == []


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "table.yaml"
    path.write_text(text)
    return path


def test_bad_tables_fail_before_any_work(tmp_path, tok_dir):
    from codebook.lm_table.runner import prepare

    _marked_corpus(tmp_path / "c")
    (tmp_path / "base.yaml").write_text((REPO / "configs/lm_table/text_base.yaml").read_text())
    base = ["model.from_config.vocab_size=320", f"model.tokenizer={tok_dir}",
            f"data.paths=[{tmp_path / 'c'}]"]
    head = f"name: t\ntrain_config: {REPO}/configs/lm_table/text_base.yaml\n"
    good = "rows: {a: ['codebook.sites=[attn_heads]']}\n"
    ok = prepare(_config(tmp_path, head + good), extra=base, out=tmp_path / "o")
    assert list(ok.rows) == ["finetuned", "a"] and ok.pretrain is not None
    assert ok.rows["finetuned"].codebook.sites == [] and ok.pretrain.codebook.sites == []
    cases = {  # table text, extra overrides -> what the error names
        "finetuned": (head + "rows: {finetuned: [codebook.k=2]}\n", base),
        "heldout_fraction": (head + good, [*base, "data.heldout_fraction=0"]),
        "rows.a": (head + "rows: {a: ['codebook.sites=[nope]']}\n", base),
        "no codebook sites": (head + "rows: {a: []}\n", base),
        "rows.b": (head + "rows: {b: ['codebook.layers=[7]', 'codebook.sites=[mlp]']}\n",
                   base),
    }
    for needle, (text, extra) in cases.items():
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            prepare(_config(tmp_path, text), extra=extra, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing was started


@pytest.mark.slow
def test_quick_table_trains_scores_logs_and_reruns(tmp_path):
    """pipelines/lm_table.py --quick under Ray Train: every row trained from the pretrained
    checkpoint, scored on the held-out blocks and logged to MLflow; a rerun trains nothing,
    and a row whose last checkpoint and result are gone resumes from its earlier checkpoint."""
    import lm_table
    from mlflow.tracking import MlflowClient

    out = tmp_path / "quick"
    summary = lm_table.main(["--quick", "--out", str(out), "--set", TWO_ROWS])
    rows = {r["row"]: r for r in summary["rows"]}
    assert list(rows) == ["pretrained", "finetuned", "attn_k2", "mlp_4x_k2"]
    for name, r in rows.items():
        assert np.isfinite(r["loss"]) and 0 < r["accuracy"] < 1, name
        assert r["eval_tokens"] == rows["pretrained"]["eval_tokens"] > 0  # the same blocks
    for name in ("finetuned", "attn_k2", "mlp_4x_k2"):
        assert rows[name]["tokens"] == 12 * 4 * 32 and rows[name]["train_seconds"] > 0
        assert rows[name]["loss"] < rows["pretrained"]["loss"], name  # the finetune trained
        assert abs(rows[name]["loss_gap"] - (rows[name]["loss"] - rows["finetuned"]["loss"])) \
            < 1e-9
    assert rows["finetuned"]["l0"] is None and rows["finetuned"]["per_site"] == {}
    assert rows["attn_k2"]["l0"] == pytest.approx(2 * 4)  # 4 heads x k=2, per site
    assert set(rows["attn_k2"]["per_site"]) == {"attn_heads_0", "attn_heads_1"}
    assert rows["mlp_4x_k2"]["groups"] == 4 and 0 < rows["mlp_4x_k2"]["fve"] <= 1
    assert (out / "loss_vs_k.png").stat().st_size > 1000
    assert (out / "table.md").read_text().count("\n") == 2 + 4
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    children = client.search_runs(
        [client.get_experiment_by_name("codebook-lm-table").experiment_id],
        f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")
    names = sorted(r.data.tags["mlflow.runName"] for r in children)
    assert names == ["attn_k2", "finetuned", "mlp_4x_k2", "pretrain", "pretrained"]
    logged = {r.data.tags["mlflow.runName"]: r.data.metrics for r in children}
    assert logged["attn_k2"]["lm_table/loss"] == pytest.approx(rows["attn_k2"]["loss"])

    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "rows").glob("*.json")}
    again = lm_table.main(["--quick", "--out", str(out), "--set", TWO_ROWS])
    assert [r["loss"] for r in again["rows"]] == [r["loss"] for r in summary["rows"]]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "rows").glob("*.json")} == stamps
    assert len(client.search_runs(
        [client.get_experiment_by_name("codebook-lm-table").experiment_id])) == 6

    run_dir = out / "runs" / "mlp_4x_k2"
    (out / "rows" / "mlp_4x_k2.json").unlink()
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    shutil.rmtree(checkpoints[-1])  # the step-12 one: 6 is left
    resumed = lm_table.main(["--quick", "--out", str(out), "--set", TWO_ROWS])
    row = next(r for r in resumed["rows"] if r["row"] == "mlp_4x_k2")
    assert row["resumed"] is True and np.isfinite(row["loss"])
    assert json.loads((run_dir / "training.json").read_text())["resumed"] is True


@pytest.mark.slow
def test_gpu_call_rehearsal_on_cpu(tmp_path, capsys):
    """benchmarks/lm_table_gpu.py, the SmolLM2 GPU call, on tiny shapes: the same runner with
    the loop in this process (no Ray, no MLflow), a tokens/s line per trained run."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import lm_table_gpu

    summary = lm_table_gpu.main(["--config", str(REPO / "configs/lm_table/smollm2_gpu.yaml"),
                                 "--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert [r["row"] for r in summary["rows"]] == ["pretrained", "finetuned", "attn_heads_k8"]
    assert summary["mlflow_run_id"] is None and not (tmp_path / "mlflow.db").exists()
    runs = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith('{"run"')]
    assert [r["run"] for r in runs] == ["pretrain", "finetuned", "attn_heads_k8"]
    assert all(r["tokens_per_s"] > 0 for r in runs)
    assert summary["rows"][2]["l0"] == pytest.approx(4 * 8)  # 4 heads x k=8 per site
