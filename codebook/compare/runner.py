"""The comparison end to end, without Ray: checks, the codebook model and the frozen base, the
cache, the fitted methods, the scoring and the outputs. The Ray parts (collecting the cache,
training a text model under Ray Train) are handed in by ``pipelines/compare.py``.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from codebook.errors import ConfigError


def prepare(config: str | Path, overrides: list[str], train_overrides: list[str],
            out: Path | None, quick: bool):
    """Every check before any work: the files, the training config, the sites, the L0s,
    sparsify. Returns (compare config, training config, output folder)."""
    from codebook.checkpoint import verify_model_dir
    from codebook.compare.config import load_compare_config
    from codebook.compare.sparse_coder import require_sparsify
    from codebook.training.config import load_config

    cfg = load_compare_config(config, overrides)
    train = load_config(cfg.train_config, train_overrides + cfg.train_overrides)
    if train.data.source not in ("fsm", "text"):
        raise ConfigError("train_config", f"data.source is {train.data.source!r}",
                          "the comparison reads the FSM task (fsm) or text files (text)")
    if train.data.source == "text":
        from codebook.analysis.features import load_features

        load_features(cfg.features)  # every regex compiled here
        if cfg.topics:
            from codebook.topics import load_topics

            load_topics(cfg.topics, None)
    if cfg.codebook_model:
        cfg.codebook_model = str(verify_model_dir(cfg.codebook_model, "codebook_model"))
    if cfg.base_model:
        cfg.base_model = str(verify_model_dir(cfg.base_model, "base_model", codebooks=False))
    pretrained = train.model.name_or_path is not None
    if not cfg.base_model and not pretrained and not train.codebook.start_step:
        raise ConfigError("train_config", "a model trained from scratch with codebook.start_step"
                          " 0 has no plain checkpoint to serve as the frozen base",
                          "set base_model, or codebook.start_step > 0")
    cb = train.codebook
    if not cfg.codebook_model and not pretrained:  # the base: the checkpoint at start_step
        train.run.checkpoint_every = cb.start_step
    for mult in (1, 4):
        if cb.k * mult > cb.num_codes:
            raise ConfigError("sae", f"an L0 of {mult} x k = {cb.k * mult} per codebook is larger "
                              f"than the dictionary ({cb.num_codes} codes per codebook)",
                              "lower codebook.k or raise codebook.num_codes")
    check_model_sites(cfg, train)
    if any(m.startswith("sae") for m in cfg.methods):
        require_sparsify()
    out = out or Path(cfg.out).expanduser() / (cfg.name + ("-quick" if quick else ""))
    return cfg, train, Path(out).resolve()


def check_model_sites(cfg, train) -> dict[str, int]:
    """The sites (codebook config of the given codebook model, else of the training config)
    resolved on the base model's config: a site the model lacks fails here, before any work."""
    from transformers import AutoConfig

    from codebook.checkpoint import CODEBOOK_CONFIG_FILE
    from codebook.compare.load import check_sites
    from codebook.config import CodebookConfig

    m = train.model
    if cfg.base_model:
        model_config = AutoConfig.from_pretrained(cfg.base_model)
    elif m.from_config is not None:
        spec = dict(m.from_config)
        model_config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    else:
        model_config = AutoConfig.from_pretrained(
            m.name_or_path, **({"gguf_file": m.gguf_file} if m.gguf_file else {}))
    codebook = (CodebookConfig.load(Path(cfg.codebook_model) / CODEBOOK_CONFIG_FILE)
                if cfg.codebook_model else train.codebook)
    return check_sites(model_config, codebook, "sites (codebook.sites / codebook.layers)")


def run(cfg: Any, train: Any, out: Path, quick: bool, collect_cache: Callable[..., Any],
        fit: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """The whole comparison (``prepare``'s outputs); ``collect_cache`` and ``fit`` are
    ``codebook.ray_glue.activations.collect_cache`` and ``codebook.ray_glue.train.fit`` (or
    stand-ins with their signatures)."""
    import numpy as np
    import torch

    from codebook.compare import methods as M
    from codebook.compare.load import load_base
    from codebook.resolve import load_trained_model

    t0 = time.perf_counter()
    cb_path, base_path, train_s = _codebook_and_base(cfg, train, out, fit)
    base_gguf = train.model.gguf_file if base_path == train.model.name_or_path else None
    codebook = load_trained_model(str(cb_path))
    base = load_base(base_path, base_gguf)
    config = codebook.codebook_config
    sites = {n: layer.dim for n, layer in codebook.codebooks.items()}
    rng = np.random.default_rng([cfg.analysis.seed, 7])
    if train.data.source == "fsm":
        from codebook.data.fsm import TokFSM

        fsm = TokFSM(train.data.fsm)
        cache_tokens = fsm.sample_tokens(cfg.cache.sequences, rng)
        data = torch.from_numpy(fsm.eval_set(cfg.analysis.eval_sequences))
    else:
        fsm = None
        blocks, tokenizer = _text_blocks(cfg, train, base_path, base_gguf)
        order = rng.permutation(blocks.ids.shape[0])
        n_cache = min(cfg.cache.sequences, len(order) // 2)
        cache_tokens = blocks.ids[order[:n_cache]]
        keep = order[n_cache : n_cache + cfg.analysis.eval_sequences]
        data = blocks.take(keep)
    cache = collect_cache(base_path, config.to_dict(), sites, cache_tokens, out / "cache",
                          cfg.cache.rows_per_shard, cfg.cache.batch_rows, cfg.cache.num_workers,
                          gguf_file=base_gguf)

    def log(method: str):
        return lambda site, step, loss: print(f"{method} {site} step {step}: {loss:.4f}",
                                              flush=True)

    fitted = {"codebook": M.Fitted(codebook, train_s)}
    if "posthoc_codebook" in cfg.methods:
        fitted["posthoc_codebook"] = M.posthoc_codebook(base, config, cache, cfg.posthoc,
                                                        log=log("posthoc"))
    for name, mult in (("sae", 1), ("sae_4x", 4)):
        if name in cfg.methods:
            fitted[name] = M.sae_model(base, config, cache, cfg.sae, mult, out / "saes" / name,
                                       log=log(name))
    if "neuron" in cfg.methods:
        fitted["neuron"] = M.neuron_model(base, config)
    if fsm is not None:
        rows, reports = _score_fsm(cfg, fitted, fsm, data)
    else:
        rows, reports = _score_text(cfg, fitted, data, tokenizer)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = {"name": cfg.name, "quick": quick, "task": train.data.source,
               "codebook_model": str(cb_path), "base_model": str(base_path),
               "sites": list(sites), "cache_tokens": cache.tokens,
               "eval_units": int(len(data.ids) if fsm is None else data.shape[0]),
               "peak_rss_mb": round(peak_rss_mb),
               "minutes": round((time.perf_counter() - t0) / 60, 2), "rows": rows}
    return _write(cfg, out, summary, reports)


def _codebook_and_base(cfg: Any, train: Any, out: Path, fit: Callable[[Any], dict[str, Any]]
                       ) -> tuple[str, str, float | None]:
    """The end-to-end codebook model (given, or trained now by the one loop) and the frozen
    base: given, else the pretrained model the run starts from, else the run's checkpoint at
    codebook.start_step (before the codebooks came on)."""
    cb_path, base_path, train_s = cfg.codebook_model, cfg.base_model, None
    if not cb_path:
        train.run.name, train.run.storage_path = "codebook", str(out / "runs")
        started = time.perf_counter()
        if train.data.source == "fsm":  # the one training loop, in this process
            from codebook.training.local import train_local

            summary = train_local(train, device="cpu")
        else:  # the same loop under Ray Train
            summary = fit(train)
        cb_path, train_s = summary["model"], time.perf_counter() - started
        if not base_path and train.model.name_or_path is None:
            base_path = _checkpoint_at(Path(cb_path).parents[1], train.codebook.start_step)
    base_path = base_path or train.model.name_or_path
    if not base_path:
        raise ConfigError("base_model", "no frozen base model is known for a given "
                          "codebook_model trained from scratch", "set base_model")
    return str(cb_path), str(base_path), train_s


def _checkpoint_at(run_dir: Path, step: int) -> str:
    """The HF folder of the run's checkpoint at ``step``."""
    from codebook.checkpoint import HF_DIR, checkpoint_dirs, checkpoint_step

    for d in checkpoint_dirs(run_dir):
        if checkpoint_step(d) == step:
            return str(d / HF_DIR)
    raise ConfigError("base_model", f"the run in {run_dir} kept no checkpoint at step {step} "
                      "(codebook.start_step)", "set base_model, or keep more checkpoints")


def _text_blocks(cfg, train, base_path: str, base_gguf: str | None):
    from codebook.analysis.features import load_features
    from codebook.compare.text import text_blocks
    from codebook.corpus import Corpus, describe_corpus, read_documents
    from codebook.data.text import load_tokenizer

    source = describe_corpus(Corpus(source="text", paths=train.data.paths))
    if not source["num_documents"]:
        raise ConfigError("data.paths", f"no .txt/.md files under {train.data.paths}",
                          "point data.paths at text files")
    tokenizer = load_tokenizer(train.model.tokenizer or base_path, base_gguf)
    return text_blocks(tokenizer, read_documents(source, 0, source["num_documents"]),
                       cfg.block_size, load_features(cfg.features)), tokenizer


def _score_fsm(cfg, fitted, fsm, tokens):
    import numpy as np

    from codebook.analysis.fsm.report import Settings
    from codebook.compare.score import fsm_row, neuron_row

    a = cfg.analysis
    settings = Settings(max_pairs=a.max_pairs, seed=a.seed, min_recall=a.min_recall,
                        test_fraction=a.test_fraction)
    rows, reports = [], {}
    for name, fit in fitted.items():
        t = time.perf_counter()
        if name == "neuron":
            recall = np.asarray([np.nan if v is None else v for v in
                                 reports["codebook"]["per_state"]["code_recall"]], dtype=float)
            row = neuron_row(fit.model, fsm, tokens, settings, recall)
        else:
            row, rep = fsm_row(name, fit.model, fsm, tokens, settings)
            reports[name] = rep.to_dict()
        rows.append(_timed(row, fit, t))
    return rows, reports


def _score_text(cfg, fitted, blocks, tokenizer):
    from codebook.compare.text import text_row

    a = cfg.analysis
    rows, recall = [], None
    for name, fit in fitted.items():
        t = time.perf_counter()
        row, chosen = text_row(name, fit.model, blocks, a.seed, a.test_fraction, a.min_recall,
                               target_recall=recall if name == "neuron" else None)
        if name == "codebook":
            recall = chosen
        if name == "neuron":
            widths = [layer.dim for layer in fit.model.codebooks.values()]
            row.update(l0=row.pop("units_nonzero"), fve=1.0, dead_fraction=None,
                       dictionary_size=sum(widths) / len(widths),
                       note="the site's own units; nothing spliced")
        row.pop("units_nonzero", None)
        if cfg.topics and name != "neuron":
            row.update(_steering(cfg, fit.model, tokenizer))
        rows.append(_timed(row, fit, t))
    return rows, {}


def _steering(cfg, model, tokenizer) -> dict:
    """Topic steering with this method's features (``codebook.steering.steering_table``)."""
    from codebook.steering import steering_table, topic_token_ids
    from codebook.topics import load_topics

    spec = load_topics(cfg.topics, None)
    for topic in spec["topics"]:
        topic["token_ids"] = topic_token_ids(tokenizer, topic["regex"])
    o = cfg.steering
    res = steering_table(model, tokenizer, spec, codes=o.codes, select=o.select, mode=o.mode,
                         samples=o.samples, max_new_tokens=o.max_new_tokens,
                         seed=cfg.analysis.seed)
    rates = [r["steered_rate"] for r in res["rows"] if r["steered_rate"] is not None]
    return {"steering_baseline_rate": sum(r["baseline_rate"] for r in res["rows"])
            / len(res["rows"]),
            "steering_rate": sum(rates) / len(rates) if rates else None,
            "steering_topics_ge_060": sum(r >= 0.6 for r in rates),
            "steering_topics": len(res["rows"]),
            "steering": {r["topic"]: r["steered_rate"] for r in res["rows"]}}


def _timed(row: dict, fit, started: float) -> dict:
    row.update(train_seconds=fit.train_seconds or None,
               train_tokens_per_s=(fit.train_tokens / fit.train_seconds
                                   if fit.train_tokens and fit.train_seconds else None),
               score_seconds=round(time.perf_counter() - started, 1))
    print(f"scored {row['method']} in {row['score_seconds']}s", flush=True)
    return row


def _write(cfg, out: Path, summary: dict, reports: dict) -> dict:
    """table.md, table.json, reports.json; the MLflow parent run and a child per method; the
    table and the JSON summary printed (the JSON last)."""
    from codebook.compare.score import markdown_table
    from codebook.io import atomic_write
    from codebook.tracking import MLflowLogger, default_tracking_uri, finish_run, start_run

    rows = summary["rows"]
    table = markdown_table(rows, summary["task"])
    with atomic_write(out / "table.md") as fh:
        fh.write(table + "\n")
    if reports:
        with atomic_write(out / "reports.json") as fh:
            json.dump(reports, fh)
    uri = cfg.tracking_uri or default_tracking_uri(None, out)
    parent = start_run(uri, cfg.experiment, f"compare-{cfg.name}",
                       {"sites": ",".join(summary["sites"]), "task": summary["task"]}, {})
    for row in rows:
        child = start_run(uri, cfg.experiment, row["method"], {"method": row["method"]},
                          {"mlflow.parentRunId": parent})
        MLflowLogger(uri, child).log(0, {k: float(v) for k, v in row.items()
                                         if isinstance(v, int | float) and v is not None})
        finish_run(uri, child)
    summary["mlflow_run_id"] = parent
    with atomic_write(out / "table.json") as fh:
        json.dump(summary, fh, indent=2)
    finish_run(uri, parent, artifacts={"compare": out / "table.md",
                                       "compare_json": out / "table.json"})
    print(table, flush=True)
    print(json.dumps(summary), flush=True)
    return summary
