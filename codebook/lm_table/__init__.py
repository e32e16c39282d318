"""The LM table: what codebooks cost a language model (the paper's "codebook models are capable
language models" table). From one pretrained checkpoint, every row is finetuned with the same
data, steps and schedule (``finetuned`` without codebooks, the others with the codebooks the
config lists) by the one training loop, then scored on the same held-out documents.

Floor: training and analysis. May import the core (``codebook.model``, ``codebook.data``, ...),
``codebook.training`` and ``codebook.analysis``; never Ray (the pipeline hands in the trainer).
"""
