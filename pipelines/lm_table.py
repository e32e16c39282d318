"""The LM table: what codebooks cost a language model, from one pretrained checkpoint.

    python pipelines/lm_table.py --config configs/lm_table/text4.yaml    # the CPU headline
    python pipelines/lm_table.py --quick                                 # a few minutes, CI

Every row (``finetuned`` without codebooks, then the config's codebook rows) is finetuned from
the same checkpoint with the same data, steps and schedule by the one training loop under Ray
Train, and scored on the same held-out documents (``codebook.lm_table``); ``pretrained`` is
the checkpoint as it is. A config whose model is built ``from_config`` is pretrained here first.
Writes ``table.md``, ``table.json`` (also the last line printed) and ``loss_vs_k.png`` to the
output folder and an MLflow parent run with a child per row. A rerun skips finished rows and
resumes an interrupted one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or a Ray job

from codebook.errors import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def quick_overrides(data_dir: Path) -> list[str]:
    """``--quick``: a tiny GPT-NeoX pretrained from scratch on a synthetic corpus (written to
    ``data_dir`` with a BPE learnt on it, no download), and every row a few steps."""
    from codebook.data.synthetic import synthetic_documents, write_synthetic_corpus
    from codebook.data.text import load_tokenizer, save_tokenizer, train_bpe_tokenizer

    corpus, tok_dir = data_dir / "corpus", data_dir / "tokenizer"
    write_synthetic_corpus(corpus, n_docs=40)
    if not (tok_dir / "tokenizer.json").is_file():
        save_tokenizer(train_bpe_tokenizer(synthetic_documents(40), 384), tok_dir,
                       lambda tok: None)
    vocab = len(load_tokenizer(str(tok_dir)))
    tiny = ("{model_type: gpt_neox, hidden_size: 32, num_hidden_layers: 2, "
            "num_attention_heads: 4, intermediate_size: 64, max_position_embeddings: 64, "
            f"rotary_pct: 0.25, bos_token_id: 0, eos_token_id: 0, vocab_size: {vocab}}}")
    return ["model.name_or_path=null", "model.gguf_file=null", f"model.from_config={tiny}",
            f"model.tokenizer={tok_dir}", "data.source=text", f"data.paths=[{corpus}]",
            "data.hf_dataset=null", "data.hf_config=null", "data.block_size=32",
            "data.eval_blocks=8", "data.heldout_fraction=0.2", "run.max_steps=12",
            "run.log_every=4", "run.eval_every=12", "run.checkpoint_every=6",
            "run.cpus_per_worker=1", "optim.batch_size=4", "optim.warmup_steps=0",
            "codebook.num_codes=128", "codebook.kmeans_init_batches=2",
            "deepspeed.enabled=false"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "lm_table" / "text4.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a table setting, e.g. --set eval.blocks=128")
    p.add_argument("--quick", action="store_true",
                   help="a tiny model on a synthetic corpus, every row a few steps")
    p.add_argument("--out", type=Path, help="output folder (default: <out>/<name>[-quick])")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from codebook.lm_table.config import load_lm_table_config
    from codebook.lm_table.runner import prepare, run

    try:
        cfg = load_lm_table_config(args.config, args.set)
        out = (args.out or Path(cfg.out).expanduser()
               / (cfg.name + ("-quick" if args.quick else ""))).resolve()
        extra = quick_overrides(out / "quick-data") if args.quick else []
        plan = prepare(args.config, args.set, extra, out)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    from codebook.ray_glue.session import ray_session
    from codebook.ray_glue.train import fit

    def ray_fit(tc, resume: bool, parent: str | None) -> dict:
        return fit(tc, resume=resume, mlflow_parent_run_id=parent)

    try:
        with ray_session():
            return run(plan, ray_fit)
    except ConfigError as err:
        sys.exit(f"config error: {err}")


if __name__ == "__main__":
    main()
