"""Code extraction into a Parquet store and codes-vs-neurons evaluation, on a real local Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from corpus_helpers import (
    in_memory_classifier,
    make_corpus,
    save_bpe_tokenizer,
    save_tiny_codebook_model,
)
from train_helpers import REPO

from codebook import read_codes
from codebook.analysis.features import RegexFeature, shard_regex_labels
from codebook.corpus import read_documents
from codebook.errors import ConfigError
from codebook.model import CodebookModel
from codebook.store import CodeStore, list_to_numpy
from pipelines import evaluate as evaluate_cli
from pipelines import extract as extract_cli

pytestmark = pytest.mark.slow
BLOCK = 64


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("extract")
    texts = make_corpus(root / "corpus")
    tok = save_bpe_tokenizer(texts, root / "tok")
    save_tiny_codebook_model(root / "model", len(tok))
    tok.save_pretrained(str(root / "model"))
    return root


@pytest.fixture(scope="module")
def ray_session():
    from codebook.ray_glue.session import ray_session

    with ray_session():
        yield


def extract_args(workdir: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(workdir / "model"), "--source", "text", "--paths",
            str(workdir / "corpus"), "--out", str(out), "--block-size", str(BLOCK),
            "--docs-per-shard", "5", "--activations", "mlp_1", "--scores", *extra]


@pytest.fixture(scope="module")
def store(workdir, ray_session) -> CodeStore:
    summary = extract_cli.main(extract_args(workdir, workdir / "store"))
    assert summary["complete"] and summary["shards_done_now"] == summary["shards"] == 5
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{workdir / 'store' / 'mlflow.db'}").get_run(
        summary["mlflow_run_id"])
    assert run.data.metrics["tokens_extracted_now"] == summary["tokens_extracted_now"] > 0
    assert run.data.params["source"] == "text"
    return CodeStore(workdir / "store")


def all_rows(store: CodeStore) -> pa.Table:
    return pa.concat_tables(list(store.iter_shards())).sort_by(
        [("doc_id", "ascending"), ("position", "ascending")])


# ---------------------------------------------------------------------- extraction
def test_store_round_trips_the_codes_the_model_produced(store, workdir):
    model = CodebookModel.from_pretrained(workdir / "model").eval()
    rows = all_rows(store)
    docs = rows.column("doc_id").to_numpy()
    checked = 0
    for doc in (0, 7, 23):
        sel = np.flatnonzero(docs == doc)
        ids = rows.column("token_id").to_numpy()[sel]
        assert np.array_equal(rows.column("position").to_numpy()[sel], np.arange(len(sel)))
        for start in range(0, len(ids), BLOCK):  # the windows extraction used
            window = torch.as_tensor(ids[start : start + BLOCK], dtype=torch.long)[None]
            rec = read_codes(model, window, activations=True, scores=True)
            for site, info in store.meta.sites.items():
                stored = list_to_numpy(rows.column(f"codes.{site}"))[sel][start : start + BLOCK]
                expect = rec.codes[site][0].reshape(len(window[0]), info.width).numpy()
                assert np.array_equal(stored.astype(np.int64), expect), (doc, site)
                scores = list_to_numpy(rows.column(f"scores.{site}"))[sel][start : start + BLOCK]
                np.testing.assert_allclose(  # each firing's similarity, float16
                    scores.astype(np.float32), rec.scores[site][0].reshape(scores.shape),
                    atol=2e-3)
            acts = list_to_numpy(rows.column("acts.mlp_1"))[sel][start : start + BLOCK]
            np.testing.assert_allclose(acts.astype(np.float32), rec.activations["mlp_1"][0],
                                       rtol=1e-2, atol=1e-3)
            checked += 1
    assert checked >= 3
    # the smallest integer type: 300 codes -> uint16, i.e. 2*k bytes per token per codebook
    col = rows.column("codes.mlp_0")
    assert col.type.value_type == pa.uint16()
    info = store.meta.sites["mlp_0"]
    assert col.nbytes / rows.num_rows == 2 * info.k
    # per-code statistics add up to tokens x k per codebook
    stats = store.code_stats()
    mlp0 = stats.filter(pa.compute.equal(stats["site"], "mlp_0"))
    assert pa.compute.sum(mlp0["count"]).as_py() == rows.num_rows * info.k
    assert pa.compute.max(mlp0["documents"]).as_py() <= 24
    meta = json.loads((store.root / "store.json").read_text())
    assert meta["tokenizer"] and meta["model"] and meta["source"]["kind"] == "text"
    assert pq.read_schema(store.shard_files()[0]).metadata[b"codebook.store"]


def test_rerun_skips_finished_shards_and_mismatched_options_are_refused(store, workdir):
    again = extract_cli.main(extract_args(workdir, workdir / "store"))
    assert again["shards_skipped"] == 5 and again["shards_done_now"] == 0
    with pytest.raises(SystemExit, match="different"):
        extract_cli.main(extract_args(workdir, workdir / "store", "--sites", "mlp_0"))
    with pytest.raises(SystemExit, match="--activations.*unknown sites"):
        extract_cli.main(extract_args(workdir, workdir / "other", "--activations", "mlp_9"))


def test_interrupted_extraction_resumes_with_identical_output(store, workdir, tmp_path):
    out = tmp_path / "store"
    cmd = [sys.executable, "pipelines/extract.py",
           *extract_args(workdir, out, "--docs-per-shard", "1")]
    env = {**os.environ, "RAY_ADDRESS": ""}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline and not list((out / "tokens").glob("shard-*.parquet")):
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
        first.wait()
    done_before = len(list((out / "tokens").glob("shard-*.parquet")))
    assert 1 <= done_before < 24, (tmp_path / "first.log").read_text()[-2000:]
    (out / "tokens" / ".shard-00023.parquet.abc.tmp").write_bytes(b"half a shard")  # a torn write
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["complete"] and summary["shards_skipped"] >= done_before
    resumed = all_rows(CodeStore(out))
    keys = resumed.column("doc_id").to_numpy() * 10_000 + resumed.column("position").to_numpy()
    assert len(np.unique(keys)) == resumed.num_rows  # no duplicates
    assert resumed.equals(all_rows(store))  # the same rows as one uninterrupted run


# ---------------------------------------------------------------------- evaluation
def test_evaluate_matches_the_in_process_classifier_and_reports_unmatched(
        store, workdir, tmp_path, capsys):
    """Held out: chosen on the selection documents, scored on the test documents (both checked
    against the single-process classifier on those rows); every feature accounted for."""
    from codebook.analysis.features import DEFAULT_FEATURES
    from codebook.analysis.heldout import code_scores_at, neuron_scores_at
    from codebook.analysis.neurons import best_neurons_at_recall
    from codebook.store.heldout import DocumentSplit

    features = tmp_path / "features.yaml"
    features.write_text("- {name: never, regex: 'zzzqqq(x)'}\n"
                        "- {name: dragons, regex: '\\b(dragon)\\b', ignore_case: true}\n")
    summary = evaluate_cli.main(["--store", str(store.root), "--features", str(features),
                                 "--min-recall", "0.1", "--out", str(tmp_path / "eval"),
                                 "--seed", "3"])
    err = capsys.readouterr().err
    assert "feature 'never' matched no token" in err
    assert summary["skipped_features"] == ["never"]  # every default feature occurs
    names = [f.name for f in DEFAULT_FEATURES] + ["never", "dragons"]
    # every feature requested is reported, "never" with the reason it has no code
    assert summary["features"] == len(names)
    assert [f["feature"] for f in summary["per_feature"]] == names
    never = summary["per_feature"][names.index("never")]
    assert never["status"] == "no positives" and never["code"] is None
    covered = [f for f in summary["per_feature"] if f["status"] == "ok"]
    assert summary["features_with_code"] == len(covered) <= len(names) - 1
    assert summary["coverage"] == pytest.approx(len(covered) / len(names))
    assert summary["features_with_neuron"] <= summary["features_with_code"]
    assert summary["neuron_coverage"] == pytest.approx(summary["features_with_neuron"]
                                                       / len(names))
    rows = all_rows(store)
    assert summary["tokens"] == rows.num_rows
    split = DocumentSplit(24, seed=3)
    assert summary["split"] | {"tokens_selection": 0, "tokens_test": 0} == {
        "unit": "document", "num_documents": 24, "seed": 3, "test_fraction": 0.5,
        "documents_selection": 12, "documents_test": 12, "tokens_selection": 0,
        "tokens_test": 0, "null": True}
    docs = rows.column("doc_id").to_numpy()
    test = split.test_tokens(docs)
    assert summary["split"]["tokens_test"] == test.sum() > 0
    assert summary["split"]["tokens_selection"] == (~test).sum() > 0
    for key in ("code_precision_mean", "code_precision_test_mean", "neuron_precision_mean",
                "neuron_precision_test_mean", "code_precision_null", "base_rate_mean"):
        assert 0 <= summary[key] <= 1, key
    info = store.meta.sites["mlp_1"]  # the only site with activations: codes compared there
    assert summary["candidates"]["codes"] == info.groups * info.num_codes
    assert summary["candidates"]["neurons"] == 2 * info.dim
    assert (tmp_path / "eval" / "results.csv").is_file()
    assert (tmp_path / "eval" / "code_vs_neuron_precision.png").stat().st_size > 1000
    results = pq.read_table(tmp_path / "eval" / "results.parquet").to_pylist()
    assert len(results) == len(names) * len(store.meta.sites)  # a row per feature and site
    assert {r["status"] for r in results if r["feature"] == "never"} == {"no positives"}
    # the same job in this process (eval_job.local_map, no Ray) gives the same rows
    from codebook.analysis.features import load_features
    from codebook.store.eval_job import local_map, prepare_evaluation, run_evaluation

    job = prepare_evaluation(store, load_features(features), seed=3, min_recall=0.1)
    local = run_evaluation(job, local_map(job))
    assert local["tokens"] == summary["tokens"] and local["skipped"] == ["never"]
    assert len(local["rows"]) == len(results)
    for mine, theirs in zip(local["rows"], results, strict=True):
        assert mine.keys() <= theirs.keys()
        assert mine == {k: pytest.approx(theirs[k]) if isinstance(theirs[k], float)
                        else theirs[k] for k in mine}
    # Ground truth: the single-process classifier on the selection rows, then the chosen code
    # and neuron scored on the test rows, for one site.
    row = next(r for r in results if r["feature"] == "months" and r["site"] == "mlp_1")
    from codebook.data.text import load_tokenizer

    texts = read_documents(store.meta.source, 0, int(docs.max()) + 1)
    labels = shard_regex_labels(load_tokenizer(store.meta.tokenizer), texts, 0, docs,
                                rows.column("position").to_numpy(),
                                rows.column("token_id").to_numpy(),
                                [RegexFeature("months", evaluate_cli_months())])[:, 0]
    assert labels.sum() == row["positives"] > 0
    assert labels[test].sum() == row["positives_test"] > 0
    codes = list_to_numpy(rows.column("codes.mlp_1")).astype(np.int64)
    acts = list_to_numpy(rows.column("acts.mlp_1")).astype(np.float32)
    ids = np.where(labels, 0, -1)
    sel = ~test
    truth = in_memory_classifier(codes[sel], acts[sel], ids[sel], 300, 1, min_recall=0.1)
    assert row["code"] == f"0:{truth['code'][0]}"
    assert row["code_precision"] == pytest.approx(truth["code_precision"][0])
    assert row["neuron_precision"] == pytest.approx(truth["neuron_precision"][0])
    p_test, r_test = code_scores_at(codes[test], ids[test], truth["code"], 300, 1)
    assert row["code_precision_test"] == pytest.approx(p_test[0])
    assert row["code_recall_test"] == pytest.approx(r_test[0])
    neuron = best_neurons_at_recall(acts[sel], ids[sel], truth["code_recall"])
    assert row["neuron"] == neuron["neuron"][0]
    np_test, _ = neuron_scores_at(acts[test], ids[test], neuron["neuron"], neuron["sign"],
                                  neuron["threshold"])
    assert row["neuron_precision_test"] == pytest.approx(np_test[0])
    assert row["base_rate"] == pytest.approx(labels[test].mean())


def evaluate_cli_months() -> str:
    from codebook.analysis.features import DEFAULT_FEATURES

    return next(f.regex for f in DEFAULT_FEATURES if f.name == "months")


def test_an_actors_config_error_reaches_the_command_as_itself():
    """Ray hands an actor's ConfigError over wrapped (a RayTaskError, or one made an instance
    of the ConfigError's class, whose message is Ray's traceback): the original is found."""
    from ray.exceptions import RayTaskError

    from codebook.ray_glue.evaluate import config_error_in

    inner = ConfigError("shard-00002.parquet", "is corrupt", "delete it and re-run")
    wrapped = RayTaskError("_StageActor.__call__", "Traceback ...", inner)
    assert config_error_in(wrapped) is inner
    assert config_error_in(wrapped.as_instanceof_cause()) is inner
    outer = RuntimeError("the dataset failed")
    outer.__cause__ = wrapped.as_instanceof_cause()
    assert config_error_in(outer) is inner and config_error_in(inner) is inner
    assert config_error_in(RuntimeError("no config error")) is None


def test_corrupt_or_foreign_shard_is_named_before_any_work(store, tmp_path):
    bad = tmp_path / "store"
    shutil.copytree(store.root, bad)
    victim = bad / "tokens" / "shard-00002.parquet"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    with pytest.raises(SystemExit, match="shard-00002.parquet.*cannot read it as Parquet"):
        evaluate_cli.main(["--store", str(bad)])
    pq.write_table(pa.table({"text": ["not ours"]}), victim)  # foreign
    with pytest.raises(SystemExit, match="shard-00002.parquet: is not a shard of this code store"):
        evaluate_cli.main(["--store", str(bad)])
    with pytest.raises(ConfigError, match="not a code store"):
        CodeStore(tmp_path)
