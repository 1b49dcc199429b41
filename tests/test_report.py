"""Figures and the evaluation report: files exist, are PNGs of plausible size, and the data
plotted is checked (not the pixels)."""
import json
import os
import re
import struct

import pytest
import torch

from iwae_ext import cli, plots
from iwae_ext.models import VAE

from conftest import grid_posterior


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])  # width, height


def test_reconstructions_and_training_curves(tmp_path):
    torch.manual_seed(0)
    model = VAE(x_dim=16, latent_dims=(3,), hidden=(8,)).double()
    x = torch.rand(5, 16, dtype=torch.float64).round()
    r = plots.reconstructions(model, x, (4, 4), str(tmp_path / "rec.png"), k=20)
    w, h = png_size(tmp_path / "rec.png")
    assert w > 100 and h > 50
    assert torch.equal(r["data"], x)
    assert r["from_q"].shape == r["from_q_iw"].shape == (5, 16)
    assert bool(((r["from_q"] > 0) & (r["from_q"] < 1)).all())  # Bernoulli means
    recs = [{"epoch": i + 1, "train_bound": -100.0 + i, "objective": "iwae k=5"} for i in range(4)]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    c = plots.training_curves(str(path), str(tmp_path / "curve.png"))
    assert c == {"epoch": [1, 2, 3, 4], "train_bound": [-100.0, -99.0, -98.0, -97.0]}
    png_size(tmp_path / "curve.png")


def test_posterior_contours_data(small_2d_model, tmp_path):
    model, x = small_2d_model
    d = plots.posterior_contours(model, x[0], str(tmp_path / "post.png"), ks=(1, 100), num_samples=20000,
                                 half_width=6.0, n=61, generator=torch.Generator().manual_seed(1))
    w, h = png_size(tmp_path / "post.png")
    assert w > 400 and h > 150
    for grid in [d["posterior"], d["q"], *d["q_iw"].values()]:
        assert grid.shape == (61, 61) and abs(float(grid.sum()) - 1) < 0.02
    # the posterior panel is the grid posterior; q_IW with k = 100 is closer to it than q (k = 1)
    zz, prob = grid_posterior(model, x[0], 6.0, 301)
    tv = lambda a: 0.5 * float((a - d["posterior"]).abs().sum())  # noqa: E731
    assert tv(d["q_iw"][100]) < tv(d["q_iw"][1])
    assert tv(d["q_iw"][1]) > 0.5 * tv(d["q"])  # k = 1 is q itself (histogram noise aside)


def test_eval_report_writes_everything(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.train_main(["--subset", "200", "--batch-size", "50", "--k", "2", "--hidden", "16",
                           "--latent-dim", "2", "--epochs", "2", "--eval-k", "5", "--train-eval-size", "20",
                           "--out", out, "--no-progress"]) == 0
    capsys.readouterr()
    rep = str(tmp_path / "report")
    assert cli.eval_main([out, "--report", rep, "--k", "20", "--limit", "30", "--ais", "--ais-temps", "10",
                          "--ais-chains", "2", "--ais-leapfrog", "2", "--no-progress"]) == 0
    m = json.loads(capsys.readouterr().out)
    for name in ("samples.png", "reconstructions.png", "manifold.png", "posterior.png", "training_curves.png"):
        png_size(os.path.join(rep, name))
        assert name in m["figures"]
    text = open(os.path.join(rep, "report.md")).read()
    for key in ("test L_k", "train L_k", "AIS NLL", "generalisation gap", "active units", "q_IW"):
        assert key in text, key
    # every table row has two cells: a '|' inside a cell (-log p(x|z)) is escaped
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) > 5 and "p(x\\|z)" in text
    for line in rows:
        assert len(re.split(r"(?<!\\)\|", line)) == 4, line
    assert m["n_test"] == 30 and m["n_train"] == 30
    assert abs(m["generalization_gap"] - (m["train_log_likelihood"] - m["test_log_likelihood"])) < 1e-9
    saved = json.load(open(os.path.join(rep, "metrics.json")))
    assert saved["ais_nll"] == m["ais_nll"]


def test_report_for_random_weight_and_two_layer_models(tmp_path, capsys):
    for extra in (["--model", "iwaer_rec"], ["--layers", "2", "--hidden", "16/8", "--latent-dim", "4,2"]):
        out = str(tmp_path / ("run" + extra[1]))
        args = ["--subset", "200", "--batch-size", "50", "--k", "2", "--epochs", "1", "--eval-k", "5",
                "--train-eval-size", "20", "--out", out, "--no-progress"]
        if "--hidden" not in extra:
            args += ["--hidden", "16", "--latent-dim", "3"]
        assert cli.train_main(args + extra) == 0
        capsys.readouterr()
        rep = str(tmp_path / ("rep" + extra[1]))
        assert cli.eval_main([out, "--report", rep, "--k", "10", "--limit", "20", "--no-progress"]) == 0
        m = json.loads(capsys.readouterr().out)
        assert os.path.isfile(os.path.join(rep, "report.md")) and "reconstructions.png" in m["figures"]


def test_autoencoder_baseline_learns_and_its_figure(tmp_path, capsys):
    """--model ae lowers the squared reconstruction error it is trained on; the AE-vs-VAE figure
    plots the given series."""
    import iwae_ext
    from iwae_ext import evaluate
    from iwae_ext.data import load_dataset
    from iwae_ext.trainer import TrainConfig, build_model

    cfg = dict(subset=300, batch_size=50, hidden=[[20]], latent_dim=[3], progress=False, seed=0)
    ds = load_dataset()
    torch.manual_seed(0)
    untrained = build_model(TrainConfig(model="ae", **cfg).resolved(ds), ds)
    with torch.no_grad():
        before = float(evaluate.squared_error(untrained, ds.split("test")[:300]).mean())
    out = str(tmp_path / "ae")
    assert cli.train_main(["--model", "ae", "--subset", "300", "--batch-size", "50", "--hidden", "20",
                           "--latent-dim", "3", "--epochs", "3", "--out", out, "--no-progress"]) == 0
    assert "test reconstruction MSE" in capsys.readouterr().out
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["test_squared_error"] < before
    assert abs(m["test_mse"] - m["test_squared_error"] / 784) < 1e-12
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert lines[-1]["train_bound"] > lines[0]["train_bound"]  # minus the error rises
    with pytest.raises(ValueError, match="model 'ae' needs layers=1"):
        iwae_ext.train(model="ae", layers=2, progress=False)
    rows = [{"latent": 5, "ae_mse": 0.05, "vae_mse": 0.04}, {"latent": 2, "ae_mse": 0.06, "vae_mse": 0.055}]
    d = plots.reconstruction_error_figure(rows, str(tmp_path / "fig.png"))
    assert d == {"latent": [2, 5], "ae_mse": [0.06, 0.05], "vae_mse": [0.055, 0.04]}
    png_size(tmp_path / "fig.png")
