"""``--quick``: any LM table shrunk to a tiny GPT-NeoX pretrained from scratch on a synthetic
corpus (``codebook.data.synthetic``, with a BPE learnt on it; no download) and a few steps per
row, so the whole table runs on a CPU in minutes (the pipeline's CI run, and the GPU call's
rehearsal)."""

from __future__ import annotations

from pathlib import Path


def quick_overrides(data_dir: str | Path) -> list[str]:
    """``--quick``: a tiny GPT-NeoX pretrained from scratch on a synthetic corpus (written to
    ``data_dir`` with a BPE learnt on it, no download), and every row a few steps."""
    from codebook.data.synthetic import synthetic_documents, write_synthetic_corpus
    from codebook.data.text import load_tokenizer, save_tokenizer, train_bpe_tokenizer

    data_dir = Path(data_dir)
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
