"""Extraction throughput: the Ray Data pipeline (1 and 2 model actors) vs a plain loop.

Same model, same documents, same work per shard in both: read the documents, tokenise them into
windows, run the codebook model, build the token table and write the shard (Parquet, atomic).
The plain loop does it shard after shard in this process (``torch.set_num_threads(threads)``);
the pipeline is ``codebook.ray_glue.extract.run_extraction`` (what ``pipelines/extract.py``
runs) on a fresh local Ray cluster, its model actors splitting the same threads (1 actor: all of
them, 2 actors: half each).

Throughput is the steady state: tokens of the shards after the first, over the time between the
first and the last finished shard (start-up, actor creation and model loading excluded; they are
reported as ``*_first_shard_s``). Prints one JSON line:

* ``plain_tokens_per_s``, ``ray_1_worker_tokens_per_s``, ``ray_2_workers_tokens_per_s``;
* ``ratio_1_worker`` / ``ratio_2_workers``: Ray throughput / plain throughput (target on CPU:
  ``ratio_1_worker >= 0.85``);
* ``bytes_per_token_per_site`` (Arrow bytes before compression, per site column: groups x k
  ids), ``bytes_per_token_per_codebook`` (per group: ``2 * k`` for up to 65,536 codes),
  ``parquet_bytes_per_token`` (on disk, zstd, all columns).

Usage::

    python benchmarks/extract_throughput.py [--docs 160] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from codebook.ray_glue.extract import (  # noqa: E402
    ExtractOptions,
    prepare,
    run_extraction,
    steady_rate,
)
from codebook.ray_glue.session import ray_session  # noqa: E402


def make_setup(root: Path, docs: int, quick: bool) -> Path:
    """A synthetic corpus, a BPE tokenizer trained on it and a codebook model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from codebook import CodebookConfig, CodebookModel

    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    corpus = root / "corpus"
    corpus.mkdir()
    texts = []
    for i in range(docs):
        texts.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(300, 700))))
        (corpus / f"{i:05d}.txt").write_text(texts[-1])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=2000 if quick else 4000, special_tokens=["<unk>", "<eos>"],
        show_progress=False))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    width, layers = (64, 2) if quick else (256, 4)
    cfg = AutoConfig.for_model("gpt_neox", vocab_size=len(hf_tok), hidden_size=width,
                               num_hidden_layers=layers, num_attention_heads=8,
                               intermediate_size=4 * width, max_position_embeddings=1024)
    model = CodebookModel(AutoModelForCausalLM.from_config(cfg), CodebookConfig(
        sites=["attn_heads"], num_codes=256 if quick else 1024, k=8))
    model.save_pretrained(root / "model")
    hf_tok.save_pretrained(str(root / "model"))
    return corpus


def plain_loop(opts: ExtractOptions, threads: int) -> dict:
    """The same shards in one process, one after another."""
    from codebook.data.text import load_tokenizer
    from codebook.resolve import load_trained_model
    from codebook.store.extract import extract_shards

    torch.set_num_threads(threads)
    store, model_path, pending = prepare(opts)
    meta = store.meta
    model = load_trained_model(model_path)
    tokenizer = load_tokenizer(meta.tokenizer)
    t0 = time.perf_counter()
    finished = []
    for _, tokens in extract_shards(model, store, pending, tokenizer, opts.batch_size,
                                    progress=False):
        finished.append((time.perf_counter() - t0, tokens))
    return {"tokens_per_s": steady_rate(finished), "first_shard_s": round(finished[0][0], 2),
            "store": store}


def ray_run(opts: ExtractOptions, workers: int, threads: int) -> dict:
    opts.num_workers, opts.threads = workers, max(1, threads // workers)
    store, model_path, pending = prepare(opts)
    with ray_session(address="local", num_cpus=threads, include_dashboard=False):
        summary = run_extraction(store, model_path, pending, opts)
    return {"tokens_per_s": summary["steady_tokens_per_s"],
            "first_shard_s": summary["shard_finish"][0][0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=160)
    p.add_argument("--docs-per-shard", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quick", action="store_true", help="tiny model and corpus: a smoke test")
    opts = p.parse_args()
    if opts.quick:
        opts.docs, opts.docs_per_shard = 12, 3
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = make_setup(root, opts.docs, opts.quick)

        def cli(out: str) -> ExtractOptions:
            return ExtractOptions(model=str(root / "model"), out=str(root / out),
                                  source="text", paths=[str(corpus)], block_size=512,
                                  docs_per_shard=opts.docs_per_shard, batch_size=4)

        plain = plain_loop(cli("plain"), opts.threads)
        one = ray_run(cli("ray1"), 1, opts.threads)
        two = ray_run(cli("ray2"), 2, opts.threads)
        store = plain["store"]
        table = store.read_shard(store.shard_files()[0])
        site, info = next(iter(store.meta.sites.items()))
        site_bytes = table.column(f"codes.{site}").nbytes / table.num_rows
        disk = sum(f.stat().st_size for f in store.shard_files())
        tokens = sum(store.read_shard(f, ["doc_id"]).num_rows for f in store.shard_files())

    def ratio(x):
        return round(x["tokens_per_s"] / plain["tokens_per_s"], 3) if x["tokens_per_s"] else None

    print(json.dumps({
        "plain_tokens_per_s": plain["tokens_per_s"],
        "ray_1_worker_tokens_per_s": one["tokens_per_s"],
        "ray_2_workers_tokens_per_s": two["tokens_per_s"],
        "ratio_1_worker": ratio(one), "ratio_2_workers": ratio(two),
        "plain_first_shard_s": plain["first_shard_s"],
        "ray_1_worker_first_shard_s": one["first_shard_s"],
        "ray_2_workers_first_shard_s": two["first_shard_s"],
        "bytes_per_token_per_site": site_bytes,
        "bytes_per_token_per_codebook": site_bytes / info.groups,
        "k": info.k, "groups": info.groups, "num_codes": info.num_codes,
        "parquet_bytes_per_token": round(disk / tokens, 2), "tokens": tokens,
        "threads": opts.threads, "quick": opts.quick,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }), flush=True)


if __name__ == "__main__":
    main()
