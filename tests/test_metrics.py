"""Dictionary metrics (codebook.analysis.metrics): the formulas against hand computations on
tiny random models, the training loop's eval logging, and pipelines/metrics.py end to end with
its bad-input errors. No downloads; seconds on 2 CPU cores."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_model
from corpus_helpers import make_corpus, save_bpe_tokenizer, save_tiny_codebook_model
from train_helpers import FSM_CONFIG, tiny_overrides

from codebook import CodebookConfig, CodebookModel, read_codes
from codebook.analysis.metrics import MetricsAccumulator, dictionary_metrics
from codebook.training import metric_names as names
from codebook.training.loop import Workers, evaluate
from pipelines import metrics as metrics_cli


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one torch thread is faster (and steadier on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cb_model(sites=("attn_heads", "mlp"), layers="all", num_codes=16, k=2, **kw):
    torch.manual_seed(0)
    cfg = CodebookConfig(sites=list(sites), layers=layers, num_codes=num_codes, k=k, **kw)
    return CodebookModel(tiny_model("gpt_neox"), cfg).eval()


def batches(n=2, b=3, t=10):
    out = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (b, t), generator=torch.Generator().manual_seed(10 + i))
        ids[:, 0] = torch.arange(b) + 1 + i * b  # distinct first tokens: distinct activations
        out.append(ids)
    return out


@torch.no_grad()
def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).lm_loss.item()


@torch.no_grad()
def only(model, site, ids, zero=False):
    """LM loss and log-probs with only ``site``'s codebook on (or ``site`` zeroed, all off)."""
    before = {n: layer.enabled for n, layer in model.codebooks.items()}
    for n, layer in model.codebooks.items():
        layer.enabled = n == site and not zero
    hook = model.codebooks[site].register_forward_hook(
        lambda m, a, o: torch.zeros_like(o)) if zero else None
    try:
        out = model(input_ids=ids, labels=ids)
    finally:
        if hook:
            hook.remove()
        for n, layer in model.codebooks.items():
            layer.enabled = before[n]
    return out.lm_loss.item(), F.log_softmax(out.logits[:, :-1], -1)


# ---------------------------------------------------------------------- formulas
def test_every_metric_matches_a_hand_computation():
    model = cb_model(layers=[1], init_std=0.3)
    data = batches()
    res = dictionary_metrics(model, data)
    xs = {s: [] for s in model.codebooks}
    qs = {s: [] for s in model.codebooks}

    def catch(site):
        def hook(module, args, out):
            xs[site].append(args[0].reshape(-1, args[0].shape[-1]))
            qs[site].append(out.reshape(-1, out.shape[-1]))
        return hook

    hooks = [layer.register_forward_hook(catch(s)) for s, layer in model.codebooks.items()]
    codes = {s: [] for s in model.codebooks}
    for ids in data:
        rec = read_codes(model, ids)
        for s in codes:
            codes[s].append(rec.codes[s].reshape(ids.numel(), -1))
    for h in hooks:
        h.remove()
    on = np.mean([lm_loss(model, ids) for ids in data])  # equal batches: mean of means
    with model.codebooks_disabled():
        clean = np.mean([lm_loss(model, ids) for ids in data])
        clean_logp = [F.log_softmax(model(input_ids=ids).logits[:, :-1], -1) for ids in data]
    assert res.ce_loss_on == pytest.approx(on, rel=1e-5)
    assert res.ce_loss_off == pytest.approx(clean, rel=1e-5)
    assert res.ce_loss_base is None and res.ablation == "zero"
    assert res.tokens == 60 and res.predicted_tokens == 54
    for s, m in res.sites.items():
        x, q = torch.cat(xs[s]).double(), torch.cat(qs[s]).double()
        fve = 1 - ((x - q) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        assert m.fve == pytest.approx(fve.item(), rel=1e-6)
        c = torch.cat(codes[s])
        layer = model.codebooks[s]
        assert m.l0 == (c >= 0).sum(-1).double().mean().item() == layer.groups * layer.k
        used = {(g, int(i)) for g in range(layer.groups) for i in c.view(-1, layer.groups,
                                                                         layer.k)[:, g].flatten()}
        assert m.dead_fraction == pytest.approx(1 - len(used) / (layer.groups * 16))
        assert m.frequencies.sum() == pytest.approx(m.l0)  # fires per token add up to L0
        site = [only(model, s, ids) for ids in data]
        zero = np.mean([only(model, s, ids, zero=True)[0] for ids in data])
        ce = np.mean([loss for loss, _ in site])
        kl = np.mean([(p.exp() * (p - lp)).sum(-1).mean().item()
                      for p, (_, lp) in zip(clean_logp, site, strict=True)])
        assert m.ce_loss == pytest.approx(ce, rel=1e-5)
        assert m.ce_loss_zero_ablation == pytest.approx(zero, rel=1e-5)
        # (the random model's zero - clean is tiny: the formula on the checked parts)
        assert m.ce_loss_recovered == pytest.approx(
            (m.ce_loss_zero_ablation - m.ce_loss) / (m.ce_loss_zero_ablation - res.ce_loss_off))
        assert (zero - ce) / (zero - clean) == pytest.approx(m.ce_loss_recovered, rel=1e-2)
        assert m.kl == pytest.approx(kl, rel=1e-4, abs=1e-7)
    for key in ("l0", "fve", "ce_loss_recovered", "kl"):
        assert res.mean(key) == pytest.approx(
            np.mean([getattr(m, key) for m in res.sites.values()]))
    flat = res.flat()
    assert flat["metrics/l0"] == (8 + 2) / 2 and flat["metrics/mlp_1/fve"] == res.sites[
        "mlp_1"].fve
    assert res.to_dict()["sites"]["attn_heads_1"]["l0"] == 8


def test_codes_equal_to_the_inputs_give_fve_1_recovered_1_and_count_dead_codes():
    data = batches()
    model = cb_model(["mlp"], layers=[0], num_codes=100, k=1, score="euclidean")
    with model.codebooks_disabled():
        x = torch.cat([read_codes(model, ids, activations=True).activations["mlp_0"]
                       .reshape(-1, 32) for ids in data])
    rows, counts = np.unique(x.numpy(), axis=0, return_counts=True)
    gaps = torch.cdist(torch.from_numpy(rows), torch.from_numpy(rows))
    assert gaps[~torch.eye(len(rows), dtype=torch.bool)].min() > 1e-3  # no near-duplicates
    codes = 1e3 + torch.randn(100, 32)  # far away: never chosen
    codes[: len(rows)] = torch.from_numpy(rows)
    model.codebooks["mlp_0"].codes.data.copy_(codes.unsqueeze(0))
    m = dictionary_metrics(model, data).sites["mlp_0"]
    assert m.fve == pytest.approx(1.0, abs=1e-9) and m.mse == pytest.approx(0.0, abs=1e-9)
    assert m.ce_loss_recovered == pytest.approx(1.0, abs=1e-6)
    assert m.kl == pytest.approx(0.0, abs=1e-6)
    assert m.l0 == 1
    assert m.dead_fraction == (100 - len(rows)) / 100
    assert sorted(m.frequencies[m.frequencies > 0] * 60) == pytest.approx(sorted(counts))


def test_a_codebook_that_outputs_zeros_recovers_nothing():
    model = cb_model(["mlp"], num_codes=8, k=2)
    model.codebooks["mlp_1"].codes.data.zero_()
    res = dictionary_metrics(model, batches())
    assert res.sites["mlp_1"].ce_loss_recovered == 0.0
    assert res.sites["mlp_1"].ce_loss == res.sites["mlp_1"].ce_loss_zero_ablation
    assert res.sites["mlp_1"].fve < 0 and res.sites["mlp_0"].ce_loss_recovered != 0
    hist = res.histograms(bins=5)["mlp_1"]
    assert hist["dead"] + sum(hist["counts"]) == hist["codes"] == 8


def test_padding_and_ignored_labels_are_left_out_and_max_tokens_stops():
    model = cb_model(["mlp"], layers=[1], num_codes=8, k=1)
    ids = batches(1)[0]
    short = {"input_ids": ids, "attention_mask": torch.arange(10).expand(3, 10) < 6}
    res = dictionary_metrics(model, [short])
    same = dictionary_metrics(model, [ids[:, :6]])  # right padding changes nothing
    assert res.tokens == 18 and res.predicted_tokens == 15
    for key in ("ce_loss_on", "ce_loss_off"):
        assert getattr(res, key) == pytest.approx(getattr(same, key), rel=1e-6)
    assert res.sites["mlp_1"].fve == pytest.approx(same.sites["mlp_1"].fve, rel=1e-6)
    labels = ids.clone()
    labels[:, 5:] = -100
    assert dictionary_metrics(model, [{"input_ids": ids, "labels": labels}]).predicted_tokens == 12
    assert dictionary_metrics(model, batches(4), max_tokens=31).tokens == 60


def test_ranks_merge_by_adding_their_sums():
    """What all_reduce does across ranks: two halves added up equal the whole."""
    model, data = cb_model(["attn_heads"], layers=[1], num_codes=8), batches(4)
    whole, a, b = (MetricsAccumulator(model) for _ in range(3))
    for i, ids in enumerate(data):
        whole.update(ids)
        (a if i % 2 else b).update(ids)
    for ta, tb in zip(a.tensors(), b.tensors(), strict=True):
        ta += tb
    assert a.result().flat() == pytest.approx(whole.result().flat())
    merged, full = a.result().sites["attn_heads_1"], whole.result().sites["attn_heads_1"]
    assert merged.fve == pytest.approx(full.fve) and merged.dead_fraction == full.dead_fraction


# ---------------------------------------------------------------------- the training loop
def test_evaluate_logs_the_metrics_without_changing_its_other_numbers():
    model, data = cb_model(layers=[1], num_codes=8), batches()
    ev = evaluate(model, [{"input_ids": ids} for ids in data], Workers())
    lite = evaluate(model, [{"input_ids": ids} for ids in data], Workers(), site_metrics=False)
    assert ev[names.EVAL_LOSS] == pytest.approx(np.mean([lm_loss(model, i) for i in data]))
    assert ev[names.EVAL_CE_LOSS_ON] == pytest.approx(ev[names.EVAL_LOSS])
    assert ev[names.EVAL_L0] == 5 and "eval/metrics/mlp_1/ce_loss_recovered" in ev
    assert names.EVAL_KL in ev and names.EVAL_CE_LOSS_RECOVERED in ev
    assert names.EVAL_FVE in lite and "eval/metrics/mlp_1/ce_loss_recovered" not in lite
    assert ev["eval/mlp_1/recon_mse"] == lite["eval/mlp_1/recon_mse"]  # no extra passes counted
    with model.codebooks_disabled():
        off = evaluate(model, [{"input_ids": ids} for ids in data], Workers())
    assert not [k for k in off if k.startswith(names.EVAL_METRICS)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from codebook.training.config import load_config
    from codebook.training.local import train_local

    storage = tmp_path_factory.mktemp("train")
    cfg = load_config(FSM_CONFIG, tiny_overrides(storage, "m", **{
        "codebook.start_step": 0, "codebook.kmeans_init_batches": 1, "run.max_steps": 2,
        "run.eval_every": 2, "run.checkpoint_every": 2, "deepspeed.enabled": False,
        "data.eval_blocks": 16}))
    summary = train_local(cfg, device="cpu")
    return cfg, summary


def test_the_loop_logs_eval_metrics(trained):
    from codebook.training.config import load_config

    cfg, summary = trained
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if names.EVAL_L0 in r]
    assert [r["step"] for r in ev] == [2]
    # fsm.yaml: attn_heads (4 heads) and mlp, k=1, 2 layers
    assert ev[0][names.EVAL_L0] == (4 + 1) / 2
    for site in ("attn_heads_0", "mlp_1"):
        for key in ("fve", "dead_fraction", "ce_loss_recovered", "kl"):
            assert math.isfinite(ev[0][f"eval/metrics/{site}/{key}"])
    assert ev[0][names.EVAL_CE_LOSS_ON] == pytest.approx(ev[0][names.EVAL_LOSS])
    assert summary["metrics"][names.EVAL_FVE] == ev[0][names.EVAL_FVE]
    off = load_config(FSM_CONFIG, tiny_overrides(cfg.storage_path, "x", **{
        "run.eval_site_metrics": False}))
    assert off.run.eval_site_metrics is False and cfg.run.eval_site_metrics is True


# ---------------------------------------------------------------------- pipelines/metrics.py
@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One MLflow store for the module (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    texts = make_corpus(root / "corpus", n_docs=6)
    tok = save_bpe_tokenizer(texts, root / "tok")
    model = save_tiny_codebook_model(root / "model", len(tok), num_codes=64, k=2)
    tok.save_pretrained(str(root / "model"))
    model.model.save_pretrained(root / "base")  # the same weights, no codebooks
    tok.save_pretrained(str(root / "base"))
    other = tiny_model("gpt_neox")  # another vocabulary (64 tokens)
    other.save_pretrained(root / "other")
    (root / "empty").mkdir()
    (root / "empty" / "a.txt").write_text("")
    return root


def run_cli(argv, capsys):
    summary = metrics_cli.main(argv)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(summary))
    return json.loads(last)


def test_command_end_to_end_on_a_text_corpus(text_setup, uri, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's artifact folder
    root, out = text_setup, tmp_path / "out"
    got = run_cli(["--model", str(root / "model"), "--base", str(root / "base"), "--source",
                   "text", "--paths", str(root / "corpus"), "--sites", "attn_heads_0,mlp_1",
                   "--max-tokens", "200", "--block-size", "32", "--batch-size", "4",
                   "--out", str(out), "--tracking-uri", uri, "--device", "cpu"], capsys)
    for key in ("l0", "fve", "ce_loss_on", "ce_loss_off", "ce_loss_base", "ce_loss_recovered",
                "kl", "ablation", "tokens", "sites"):
        assert key in got
    assert got["ablation"] == "zero" and 200 <= got["tokens"] < 200 + 4 * 32
    assert got["ce_loss_base"] == pytest.approx(got["ce_loss_off"], rel=1e-5)  # same weights
    assert set(got["sites"]) == {"attn_heads_0", "mlp_1"}
    assert got["sites"]["attn_heads_0"]["l0"] == 8 and got["sites"]["mlp_1"]["l0"] == 2
    assert set(got["sites"]["mlp_1"]) == {"l0", "fve", "ce_loss", "ce_loss_recovered", "kl",
                                          "dead_fraction"}
    table = pq.read_table(out / "sites.parquet").to_pylist()
    assert [r["site"] for r in table] == ["attn_heads_0", "mlp_1"]
    assert table[1]["fve"] == pytest.approx(got["sites"]["mlp_1"]["fve"])
    assert (out / "sites.csv").read_text().startswith("\"site\"")
    assert (out / "code_frequency.png").stat().st_size > 1000
    hist = json.loads((out / "code_frequency.json").read_text())
    assert hist["mlp_1"]["codes"] == 64
    assert json.loads((out / "summary.json").read_text()) == got
    run = MlflowClient(uri).get_run(got["mlflow_run_id"])
    assert run.data.metrics["metrics/l0"] == got["l0"] == 5
    assert run.data.metrics["metrics/mlp_1/kl"] == pytest.approx(got["sites"]["mlp_1"]["kl"])
    arts = {a.path for a in MlflowClient(uri).list_artifacts(got["mlflow_run_id"], "metrics")}
    assert {"metrics/sites.parquet", "metrics/code_frequency.png"} <= arts


def test_command_on_an_fsm_checkpoint(trained, uri, tmp_path, capsys, monkeypatch):
    from codebook.data.fsm import TokFSM

    cfg, summary = trained
    monkeypatch.chdir(tmp_path)
    TokFSM(cfg.data.fsm).save(tmp_path / "fsm.json")
    got = run_cli(["--model", summary["checkpoint"], "--source", "fsm", "--fsm-file",
                   str(tmp_path / "fsm.json"), "--fsm-sequences", "8", "--no-site-metrics",
                   "--tracking-uri", uri], capsys)
    assert got["l0"] == 2.5 and got["ce_loss_base"] is None and got["kl"] is None
    assert got["sites"]["mlp_0"]["ce_loss_recovered"] is None
    assert got["tokens"] == 8 * TokFSM(cfg.data.fsm).seq_len
    assert (tmp_path / "metrics" / "checkpoint_00000002" / "summary.json").is_file()


@pytest.mark.parametrize("case", ["missing model", "unknown site", "other vocab", "empty"])
def test_bad_input_is_refused_before_any_work(case, text_setup, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = text_setup
    args = {"--model": str(root / "model"), "--source": "text", "--paths": str(root / "corpus"),
            "--out": str(tmp_path / "out")}
    expect = {"missing model": ("--model", str(tmp_path / "nope"), "does not exist"),
              "unknown site": ("--sites", "mlp_7", "attn_heads_0", "mlp_1"),
              "other vocab": ("--base", "64 tokens", "finetuned from"),
              "empty": ("--paths", "holds no tokens", "1 document(s)")}[case]
    if case == "missing model":
        args["--model"] = str(tmp_path / "nope")
    elif case == "unknown site":
        args["--sites"] = "mlp_0,mlp_7"
    elif case == "other vocab":
        args["--base"] = str(root / "other")
    else:
        args["--paths"] = str(root / "empty")
    with pytest.raises(SystemExit) as err:
        metrics_cli.main([x for kv in args.items() for x in kv])
    message = str(err.value.code)
    assert message.startswith("config error:") and "Fix:" in message
    for part in expect:
        assert part in message, message
    assert not (tmp_path / "out" / "summary.json").exists()
