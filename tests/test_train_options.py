"""Trainer options for the AEVB reproduction's experiments: a decoder narrower than the encoder
(decoder_hidden), an l2 weight penalty (weight_decay) and held-out learning curves (test_every)."""
import json
import os

import pytest
import torch

import iwae_ext
from iwae_ext import evaluate
from iwae_ext.cli import train as train_cli
from iwae_ext.data import load_dataset
from iwae_ext.trainer import TrainConfig, load_checkpoint
from iwae_ext.trainer.loop import _subset, key

TINY = dict(subset=200, batch_size=50, k=3, hidden=[[24, 20]], latent_dim=[4], eval_k=10,
            train_eval_size=50, progress=False, compile=False)


def test_decoder_hidden_builds_saves_and_resumes(tmp_path):
    out = str(tmp_path / "run")
    m = iwae_ext.train(out=out, epochs=1, decoder_hidden=[12], **TINY)
    assert m["config"]["decoder_hidden"] == [12]
    model = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    widths = [layer.out_features for layer in model.decoder.body if isinstance(layer, torch.nn.Linear)]
    assert widths == [12] and model.decoder.logits.in_features == 12
    enc = [layer.out_features for layer in model.encoders[0].body if isinstance(layer, torch.nn.Linear)]
    assert enc == [24, 20]  # the encoder keeps its own depth
    m2 = iwae_ext.train(out=out, resume=True, epochs=2, progress=False)
    assert m2["epochs"] == 2 and m2["config"]["decoder_hidden"] == [12]
    # the default mirrors the encoder, as before
    d = iwae_ext.models.VAE(784, [4], [[24, 20]])
    assert [l.out_features for l in d.decoder.body if isinstance(l, torch.nn.Linear)] == [20, 24]
    assert d.config["decoder_hidden"] is None


def test_weight_decay_is_adams_l2_penalty(tmp_path):
    runs = {}
    for wd in (0.0, 0.05):
        out = str(tmp_path / f"wd{wd}")
        iwae_ext.train(out=out, epochs=3, weight_decay=wd, **TINY)
        ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
        assert ck["optimizer_state"]["param_groups"][0]["weight_decay"] == wd
        runs[wd] = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    norm = {wd: sum(float(p.detach().pow(2).sum()) for p in m.parameters()) for wd, m in runs.items()}
    assert norm[0.05] < norm[0.0]  # the same seed and data: the penalty shrinks the weights


def test_test_every_records_the_test_bounds_of_that_epoch(tmp_path):
    out = str(tmp_path / "run")
    cfg = dict(TINY, seed=3)
    iwae_ext.train(out=out, epochs=4, test_every=2, **cfg)
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert ["test_elbo" in r for r in lines] == [False, True, False, True]
    last = lines[-1]
    assert last["test_bound"] >= last["test_elbo"]  # L_k >= ELBO on the same draws
    # the last record is the trained model's test bounds with the curve's keyed draws
    model = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    x = _subset(load_dataset(), 200, 3).split("test")
    b = evaluate.bounds(model, x, 3, 100, seed=key(3, "test_curve"))
    assert last["test_elbo"] == pytest.approx(float(b.elbo.double().mean()), rel=1e-6)
    assert last["test_bound"] == pytest.approx(float(b.log_likelihood.double().mean()), rel=1e-6)


def test_bad_values_name_the_field():
    ds = load_dataset()
    for kw, field in ((dict(decoder_hidden=[0]), "decoder_hidden"), (dict(decoder_hidden="500"), "decoder_hidden"),
                      (dict(weight_decay=-1.0), "weight_decay"), (dict(weight_decay=float("nan")), "weight_decay"),
                      (dict(test_every=-1), "test_every"), (dict(test_every=1, model="ae", k=1), "test_every")):
        with pytest.raises(ValueError, match=field):
            TrainConfig(**kw).resolved(ds)


def test_cli_flags():
    a = vars(train_cli.parser().parse_args(["--decoder-hidden", "500", "--weight-decay", "1e-4",
                                             "--test-every", "5"]))
    assert a["decoder_hidden"] == [500] and a["weight_decay"] == 1e-4 and a["test_every"] == 5
