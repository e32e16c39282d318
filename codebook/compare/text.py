"""The comparison on text: token blocks with regex-feature labels, and one row per method.

Blocks of ``block_size`` tokens are cut from each document (tails dropped); every token carries
the regex features (``codebook.analysis.features``) its characters overlap. The held-out split
is by document: all blocks of a document fall on the same side, so a feature chosen on one
passage is never scored on the next passage of the same article. Each feature's best feature of
a method (a code or SAE latent, recall >= ``min_recall``) is chosen on the selection documents
and scored on the test documents; neurons at the codebook's recall per feature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from codebook.analysis.classifiers import best_code_per_label, code_feature_stats
from codebook.analysis.features import RegexFeature, document_offsets, regex_token_labels
from codebook.analysis.heldout import code_scores_at, neuron_scores_at, split_halves
from codebook.analysis.metrics import dictionary_metrics
from codebook.analysis.neurons import best_neurons_at_recall
from codebook.interventions import recording
from codebook.model import CodebookModel


@dataclass
class TextBlocks:
    ids: np.ndarray  # (n, block_size) token ids
    labels: np.ndarray  # (n, block_size, F) bool
    names: list[str]  # the features
    docs: np.ndarray  # (n,) the document each block was cut from

    def take(self, rows: np.ndarray) -> TextBlocks:
        """These blocks only (``rows``: indices)."""
        return TextBlocks(self.ids[rows], self.labels[rows], self.names, self.docs[rows])


def split_by_document(docs: np.ndarray, seed: int, test_fraction: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (selection, test) masks over blocks: the documents are split
    (``codebook.analysis.heldout.split_halves``), each block follows its document."""
    unique = np.unique(docs)
    if unique.size < 2:
        raise ValueError(f"a held-out split by document needs blocks from at least 2 documents; "
                         f"the evaluation blocks come from {unique.size}: raise "
                         "analysis.eval_sequences or add documents")
    _, test_docs = split_halves(unique.size, seed, test_fraction)
    test = np.isin(docs, unique[test_docs])
    return ~test, test


def text_blocks(tokenizer: Any, texts: Sequence[str], block_size: int,
                features: Sequence[RegexFeature]) -> TextBlocks:
    """Every whole block of every document, with its tokens' regex labels."""
    ids, labels, docs = [], [], []
    pairs = zip(texts, document_offsets(tokenizer, list(texts)), strict=True)
    for d, (text, (tok, offsets)) in enumerate(pairs):
        n = len(tok) // block_size
        if not n:
            continue
        lab = regex_token_labels(text, offsets, list(features))
        ids.append(np.asarray(tok[: n * block_size]).reshape(n, block_size))
        labels.append(lab[: n * block_size].reshape(n, block_size, -1))
        docs.append(np.full(n, d))
    if not ids:
        raise ValueError(f"no document holds a whole block of {block_size} tokens")
    return TextBlocks(np.concatenate(ids), np.concatenate(labels), [f.name for f in features],
                      np.concatenate(docs))


@torch.no_grad()
def _record(model: CodebookModel, ids: np.ndarray, batch: int
            ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Codes {site: (T, groups, k)} and site inputs side by side (T, sum of dims)."""
    names = list(model.codebooks)
    codes: dict[str, list[np.ndarray]] = {n: [] for n in names}
    acts = []
    for start in range(0, ids.shape[0], batch):
        x = torch.as_tensor(ids[start : start + batch]).long()
        with recording(model, names, activations=True) as rec:
            model.model(input_ids=x)
        for n in names:
            c = rec.codes[n]
            codes[n].append(c.reshape(-1, *c.shape[2:]).numpy())
        acts.append(np.concatenate([rec.activations[n].reshape(-1, rec.activations[n].shape[-1])
                                    .float().numpy() for n in names], axis=1))
    width = {n: max(c.shape[-1] for c in v) for n, v in codes.items()}
    out = {}
    for n, parts in codes.items():
        out[n] = np.concatenate([np.pad(p, ((0, 0), (0, 0), (0, width[n] - p.shape[-1])),
                                        constant_values=-1) for p in parts])
    return out, np.concatenate(acts)


def regex_scores(model: CodebookModel, blocks: TextBlocks, seed: int, test_fraction: float,
                 min_recall: float, batch: int = 8, target_recall: np.ndarray | None = None
                 ) -> dict[str, Any]:
    """Per feature: the best code (or latent) chosen on the selection documents and its test
    precision and recall; with ``target_recall`` the best neuron (site inputs) at that recall
    instead."""
    sel_blocks, _ = split_by_document(blocks.docs, seed, test_fraction)
    sel = np.repeat(sel_blocks, blocks.ids.shape[1])  # per token
    test = ~sel
    labels = blocks.labels.reshape(-1, blocks.labels.shape[-1])
    nf = labels.shape[1]
    codes, acts = _record(model, blocks.ids, batch)
    units = float((acts != 0).sum(1).mean()) / len(codes)  # non-zero units per token and site
    if target_recall is not None:
        p_sel, p_test = np.full(nf, np.nan), np.full(nf, np.nan)
        for f in range(nf):
            ids = np.where(labels[:, f], 0, -1)
            res = best_neurons_at_recall(acts[sel], ids[sel], target_recall[f : f + 1])
            p_sel[f] = res["precision"][0]
            p, _ = neuron_scores_at(acts[test], ids[test], res["neuron"], res["sign"],
                                    res["threshold"])
            p_test[f] = p[0]
        return {"precision_selection": p_sel, "precision_test": p_test, "recall_test": None,
                "units_nonzero": units}
    best, best_f1 = np.full(nf, -np.inf), np.full(nf, -np.inf)
    p_test, r_test = np.full(nf, np.nan), np.full(nf, np.nan)
    p_sel, r_sel = np.full(nf, np.nan), np.full(nf, np.nan)
    f1_test = np.full(nf, np.nan)
    for name, arr in codes.items():
        size = model.codebooks[name].num_codes
        for g in range(arr.shape[1]):
            stats = code_feature_stats(arr[sel, g], labels[sel], size, nf)
            code, p, r = best_code_per_label(stats, min_recall=min_recall)
            better = np.isfinite(p) & (p > best)
            if better.any():
                pt, rt = code_scores_at(arr[test, g], labels[test],
                                        np.where(better, code, -1), size, nf)
                best[better] = p[better]
                p_sel[better], r_sel[better] = p[better], r[better]
                p_test[better], r_test[better] = pt[better], rt[better]
            # the best code by F1 (same recall floor), chosen and scored apart
            code, p, r = best_code_per_label(stats, min_recall=min_recall, by="f1")
            f1 = _f1(p, r)
            better = np.isfinite(f1) & (f1 > best_f1)
            if better.any():
                pt, rt = code_scores_at(arr[test, g], labels[test],
                                        np.where(better, code, -1), size, nf)
                best_f1[better] = f1[better]
                f1_test[better] = np.nan_to_num(_f1(pt, rt))[better]
    return {"precision_selection": p_sel, "recall_selection": r_sel,
            "precision_test": p_test, "recall_test": r_test, "f1_test": f1_test,
            "units_nonzero": units}


def _f1(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p + r > 0, 2 * p * r / (p + r), 0.0) * np.where(np.isfinite(p), 1, np.nan)


def _per_feature(names: list[str], values: np.ndarray | None) -> dict[str, float | None]:
    if values is None:
        return {}
    return {n: None if not np.isfinite(v) else float(v)
            for n, v in zip(names, values, strict=True)}


def text_row(method: str, model: CodebookModel, blocks: TextBlocks, seed: int,
             test_fraction: float, min_recall: float, batch: int = 8,
             target_recall: np.ndarray | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """One method's row on text: the dictionary metrics on the blocks and the regex
    features' held-out precision (``coverage``: features with a qualifying feature); and the
    chosen features' selection recall (the neurons' target)."""
    dm = dictionary_metrics(model, (torch.as_tensor(blocks.ids[i : i + batch]).long()
                                    for i in range(0, blocks.ids.shape[0], batch)))
    d = dm.to_dict()
    reg = regex_scores(model, blocks, seed, test_fraction, min_recall, batch, target_recall)
    has = np.isfinite(reg["precision_test"])
    row = {"method": method, "l0": d["l0"], "fve": d["fve"],
           "dictionary_size": float(np.mean([model.codebooks[s].groups
                                             * model.codebooks[s].num_codes for s in dm.sites])),
           "dead_fraction": float(np.mean([s.dead_fraction for s in dm.sites.values()])),
           "ce_loss_on": d["ce_loss_on"], "ce_loss_off": d["ce_loss_off"],
           "ce_loss_recovered": d["ce_loss_recovered"], "kl": d["kl"],
           "ce_loss_recovered_all": d["ce_loss_recovered_all"], "kl_all": d["kl_all"],
           "regex_precision_test": float(np.mean(reg["precision_test"][has])) if has.any()
           else None,
           "regex_precision_selection": float(np.nanmean(reg["precision_selection"]))
           if np.isfinite(reg["precision_selection"]).any() else None,
           "regex_coverage": float(has.mean()), "units_nonzero": reg["units_nonzero"],
           "regex_per_feature": _per_feature(blocks.names, reg["precision_test"]),
           "regex_f1_per_feature": _per_feature(blocks.names, reg.get("f1_test")),
           "regex_f1_test": float(np.nanmean(reg["f1_test"]))
           if "f1_test" in reg and np.isfinite(reg["f1_test"]).any() else None}
    return row, reg.get("recall_selection", np.full(len(blocks.names), np.nan))
