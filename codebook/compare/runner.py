"""The comparison end to end, without Ray: checks, the models (``codebook.compare.protocol``:
the base, the plain-finetune control, the end-to-end codebook models per L0 multiple and seed),
the data fixed before any training (``codebook.compare.data``), the cache, every method at every
sparsity point and seed (``codebook.compare.rows``), steering like for like
(``codebook.compare.steer``), the aggregates with intervals (``codebook.compare.aggregate``) and
the outputs. The Ray parts (collecting the cache, training a text model under Ray Train) are
handed in by ``pipelines/compare.py``.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from codebook.errors import ConfigError
from codebook.io import atomic_write


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

        if not train.data.heldout_fraction:
            raise ConfigError("train_overrides", "the training config holds out no documents "
                              "(data.heldout_fraction 0): the evaluation would be text the "
                              "end-to-end model trained on", "add data.heldout_fraction=0.1")

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
    for mult in cfg.sparsity:
        if cb.k * mult > cb.num_codes:
            raise ConfigError("sparsity", f"an L0 of {mult} x k = {cb.k * mult} per codebook is "
                              f"larger than the dictionary ({cb.num_codes} codes per codebook)",
                              "lower codebook.k or the multiples, or raise codebook.num_codes")
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
    from codebook.compare import methods as M
    from codebook.compare import rows as R
    from codebook.compare.data import comparison_data
    from codebook.compare.load import load_base
    from codebook.resolve import load_trained_model

    t0 = time.perf_counter()
    models = _models(cfg, train, out, fit)
    base_gguf = train.model.gguf_file if models["base"] == train.model.name_or_path else None
    base = load_base(models["base"], base_gguf)
    headline = min(models["codebooks"])
    config = load_trained_model(models["codebooks"][headline].path).codebook_config
    sites = {s.name: s.dim for s in _sites(base, config)}
    data = comparison_data(cfg, train, models["base"], base_gguf)
    with atomic_write(out / "data_split.json") as fh:
        json.dump(data.split, fh, indent=2)
    cache = collect_cache(models["base"], config.to_dict(), sites, data.cache_tokens,
                          out / "cache", cfg.cache.rows_per_shard, cfg.cache.batch_rows,
                          cfg.cache.num_workers, gguf_file=base_gguf)
    references = {"base": R.reference_row("base", base, data)}
    if models.get("control"):
        references["control"] = R.reference_row("control", load_base(models["control"]), data)
    ctx = R.Context(cfg, data, cache, base, config, out,
                    {"ce_base": references["base"]["ce_loss_on"],
                     "ce_control": references.get("control", references["base"])["ce_loss_on"]},
                    log=lambda name: (lambda site, tokens, fvu: print(
                        f"{name} {site} {tokens} tokens: val FVU {fvu:.4f}", flush=True)))
    rows, reports, steer_models, target = [], {}, {}, None
    for multiple in cfg.sparsity:
        for seed in cfg.seeds if multiple == 1 else cfg.seeds[:1]:
            for method in (m for m in cfg.methods if m != "neuron"):
                if method == "codebook" and (multiple, seed) not in models["codebooks"]:
                    continue
                name = M.method_name(method, multiple)
                steers = bool(cfg.topics) and data.task == "text" and (multiple, seed) == headline
                path = R.row_path(out, name, seed)
                key = R.row_key(ctx, method, multiple, seed, model=R.model_stamp(
                    models["codebooks"][(multiple, seed)].path) if method == "codebook" else None)
                saved = None if steers else R.load_row(path, key, data.task)
                if saved is not None:  # scored by an earlier run from the same settings
                    row, extra = saved
                    print(f"{name} (seed {seed}): scored before ({path})", flush=True)
                else:
                    fitted = R.fit(ctx, method, multiple, seed, models["codebooks"])
                    row, extra = R.score(ctx, name, fitted, multiple=multiple, seed=seed)
                    R.save_row(path, key, row, extra)
                    if steers:
                        steer_models[method] = fitted.model
                rows.append(row)
                if (multiple, seed) == headline:
                    if data.task == "fsm":
                        reports[name] = extra
                    if method == "codebook":
                        target = _target_recall(data.task, extra)
    if "neuron" in cfg.methods:
        neuron = M.neuron_model(base, config)
        path, key = R.row_path(out, "neuron", 0), R.row_key(ctx, "neuron", 1, 0, target=target)
        saved = R.load_row(path, key, data.task)
        if saved is None:
            saved = R.score(ctx, "neuron", neuron, target_recall=target)
            R.save_row(path, key, *saved)
        else:
            print(f"neuron: scored before ({path})", flush=True)
        rows.append(saved[0])
        steer_models["dense"] = neuron.model
    steering = {}
    if cfg.topics and data.task == "text":
        steering = _steer(cfg, steer_models, data.tokenizer, models, references)
        for row in rows:
            if row["method"] in steering and (row["multiple"], row["seed"]) == headline:
                row.update({k: v for k, v in steering[row["method"]].items() if k != "topics"})
    summary = {"name": cfg.name, "quick": quick, "task": data.task,
               "codebook_model": models["codebooks"][headline].path,
               "base_model": str(models["base"]), "control_model": models.get("control"),
               "sites": list(sites), "cache_tokens": cache.tokens,
               "eval_units": data.eval_units, "split": data.split,
               "sparsity": cfg.sparsity, "seeds": cfg.seeds,
               "budgets": {"sae": dataclasses.asdict(cfg.sae),
                           "posthoc": dataclasses.asdict(cfg.posthoc),
                           "codebook": {f"{m}x-s{s}": {"tokens": t.tokens, "seconds": t.seconds}
                                        for (m, s), t in models["codebooks"].items()}},
               "references": list(references.values()),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "minutes": round((time.perf_counter() - t0) / 60, 2), "rows": rows}
    if steering:
        summary["steering"] = steering
    return _write(cfg, out, summary, reports)


def _target_recall(task: str, extra: Any) -> Any:
    """The neuron baseline's target: per state (FSM) or feature (text), the recall of the
    headline codebook model's chosen code."""
    import numpy as np

    if task == "fsm":
        return np.asarray([np.nan if v is None else v
                           for v in extra["per_state"]["code_recall"]], dtype=float)
    return extra


def _sites(base: Any, config: Any) -> list[Any]:
    from codebook.sites import resolve_sites

    return resolve_sites(base.config, config)


def _models(cfg: Any, train: Any, out: Path, fit: Callable[[Any], dict[str, Any]]
            ) -> dict[str, Any]:
    """The base, the control and the end-to-end codebook models {(multiple, seed): model}:
    given, or trained here by the one loop (``codebook.compare.protocol``)."""
    from codebook.compare.protocol import TrainedModel, phase_config, train_model

    runs = out / "runs"
    if train.data.source == "fsm":  # the one training loop, in this process
        from codebook.training.local import train_local

        def fit_run(tc: Any, resume: bool) -> dict[str, Any]:
            return train_local(tc, device="cpu", resume=resume)
    else:  # the same loop under Ray Train
        def fit_run(tc: Any, resume: bool) -> dict[str, Any]:
            return fit(tc, resume=resume)

    base = cfg.base_model or train.model.name_or_path
    if base is None:
        if cfg.codebook_model:
            raise ConfigError("base_model", "no frozen base model is known for a given "
                              "codebook_model trained from scratch", "set base_model")
        base = train_model(phase_config(train, "base", runs, None, codebooks=False),
                           fit_run).path
    models: dict[str, Any] = {"base": str(base), "control": cfg.control_model}
    if cfg.control_model is None:
        models["control"] = train_model(phase_config(train, "control", runs, base,
                                                     codebooks=False), fit_run).path
    if cfg.codebook_model:
        models["codebooks"] = {(1, cfg.seeds[0]): TrainedModel(cfg.codebook_model)}
        return models
    models["codebooks"] = {
        (m, s): train_model(phase_config(train, f"codebook-{m}x-s{s}", runs, base,
                                         codebooks=True, k_multiple=m, seed=s), fit_run)
        for m in cfg.sparsity for s in (cfg.seeds if m == 1 else cfg.seeds[:1])}
    return models


def _steer(cfg: Any, models: dict[str, Any], tokenizer: Any, trained: dict[str, Any],
           references: dict[str, Any]) -> dict[str, Any]:
    """Steering like for like (``codebook.compare.steer``) for every method with features and
    the dense baseline, judged by the control model (the base where there is none)."""
    from codebook.compare.load import load_base
    from codebook.compare.steer import dense_vector, sample, steer_method
    from codebook.steering import perplexity, topic_token_ids
    from codebook.topics import load_topics

    spec = load_topics(cfg.topics, None)
    for topic in spec["topics"]:
        topic["token_ids"] = topic_token_ids(tokenizer, topic["regex"])
    judge = load_base(trained.get("control") or trained["base"])
    neuron = models["dense"]
    sites = list(neuron.codebooks)
    norms = _site_norms(neuron, tokenizer, spec["background"], sites)
    # One ceiling for every method: the unsteered base's samples (the neuron model splices
    # nothing in), not each method's own, whose splice changes its unsteered perplexity.
    plain = sample(neuron, tokenizer, spec["prompts"], cfg.steering, cfg.analysis.seed)
    ceiling = cfg.steering.ppl_ceiling * perplexity(judge, tokenizer, plain)
    out = {}
    for method in ("codebook", "posthoc_codebook", "sae"):
        if method in models:
            print(f"steering with {method}", flush=True)
            out[method] = steer_method(models[method], tokenizer, spec, judge, norms,
                                       cfg.steering, cfg.analysis.seed, ceiling=ceiling)
    dense = {t["name"]: {s: dense_vector(neuron, tokenizer, t["topic_texts"],
                                         spec["background"], s) for s in sites}
             for t in spec["topics"]}
    print("steering with the dense baseline", flush=True)
    out["neuron"] = steer_method(neuron, tokenizer, spec, judge, norms, cfg.steering,
                                 cfg.analysis.seed, dense=dense, ceiling=ceiling)
    return out


def _site_norms(model: Any, tokenizer: Any, texts: list[str], sites: list[str]
                ) -> dict[str, float]:
    """Each site's mean activation norm on ``texts`` (the base model): the unit of ``add``."""
    import numpy as np

    from codebook.extraction import extract_windows, tokenise_documents

    windows = tokenise_documents(list(texts), 0, tokenizer, 256)
    res = extract_windows(model, windows, sites, sites)
    return {s: float(np.linalg.norm(np.asarray(res["acts"][s], dtype=np.float32), axis=1)
                     .mean()) for s in sites}


def _write(cfg, out: Path, summary: dict, reports: dict) -> dict:
    """table.md, table.json, reports.json, curves.png; the MLflow parent run and a child per
    row (method, L0 multiple, seed); the tables printed. Returns the JSON summary, which the
    entry point prints as its last line once Ray is shut down (Ray's log monitor prints
    worker lines until then)."""
    from codebook.compare.report import render
    from codebook.compare.rows import json_default
    from codebook.tracking import MLflowLogger, default_tracking_uri, finish_run, start_run

    table = render(summary, out / "curves.png")
    with atomic_write(out / "table.md") as fh:
        fh.write(table + "\n")
    if reports:
        with atomic_write(out / "reports.json") as fh:
            json.dump(reports, fh)
    uri = cfg.tracking_uri or default_tracking_uri(None, out)
    parent = start_run(uri, cfg.experiment, f"compare-{cfg.name}",
                       {"sites": ",".join(summary["sites"]), "task": summary["task"]}, {})
    for row in summary["rows"]:
        child = start_run(uri, cfg.experiment, f"{row['method']}-s{row['seed']}",
                          {"method": row["method"], "seed": str(row["seed"]),
                           "l0_multiple": str(row["multiple"])},
                          {"mlflow.parentRunId": parent})
        MLflowLogger(uri, child).log(0, {k: float(v) for k, v in row.items()
                                         if isinstance(v, int | float) and v is not None})
        finish_run(uri, child)
    summary["mlflow_run_id"] = parent
    with atomic_write(out / "table.json") as fh:
        json.dump(summary, fh, indent=2, default=json_default)
    finish_run(uri, parent, artifacts={"compare": out / "table.md",
                                       "compare_json": out / "table.json",
                                       "compare_curves": out / "curves.png"})
    print(table, flush=True)
    return summary

