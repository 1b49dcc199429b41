"""Trainer and CLIs on tiny subsets: exact resume, non-finite loss, checkpoints, bad input."""
import json
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import iwae_ext
from iwae_ext import cli
from iwae_ext.data import Dataset
from iwae_ext.trainer import (CHECKPOINT_FORMAT, CorruptCheckpointError, NonFiniteLossError, TrainConfig,
                            burda_schedule, load_checkpoint)

TINY = dict(subset=300, batch_size=50, k=3, hidden=[[20]], latent_dim=[4], eval_k=10,
            train_eval_size=50, progress=False, compile=False)


def state(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)


def assert_same_state(a, b):
    for name in a["model_state"]:
        assert torch.equal(a["model_state"][name], b["model_state"][name]), name
    sa, sb = a["optimizer_state"]["state"], b["optimizer_state"]["state"]
    for i in sa:
        for key in sa[i]:
            assert torch.equal(sa[i][key], sb[i][key]), (i, key)
    assert a["train_state"]["kind"].keys() == b["train_state"]["kind"].keys()
    for key in a["train_state"]["kind"]:
        assert torch.equal(a["train_state"]["kind"][key], b["train_state"]["kind"][key]), key


@pytest.mark.parametrize("dataset", ["binarized_mnist", "fashion_mnist"])
def test_resume_is_exact(tmp_path, dataset):
    """Stopped mid-epoch and at an epoch end, then resumed: bit for bit the uninterrupted run
    (fashion_mnist also exercises the dynamic-binarisation generator)."""
    shared = os.environ.get("IWAE_EXT_TEST_DATA") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
    if dataset == "fashion_mnist" and not os.path.isdir(shared):
        pytest.skip("the Fashion-MNIST and Frey files are not present: set IWAE_EXT_TEST_DATA")
    cfg = dict(TINY, dataset=dataset, data_dir=shared, estimator="dreg")
    full = str(tmp_path / "full")
    m_full = iwae_ext.train(out=full, epochs=3, **cfg)

    part = str(tmp_path / "part")
    calls = {"n": 0}

    def stop_after_8_steps():
        calls["n"] += 1
        return calls["n"] > 8  # 6 steps per epoch: stops in epoch 2, step 3

    r = iwae_ext.train(out=part, epochs=3, should_stop=stop_after_8_steps, **cfg)
    assert r["stopped"] and r["epoch"] == 1 and r["step"] == 2
    assert not os.path.exists(os.path.join(part, "metrics.json"))
    r = iwae_ext.train(out=part, resume=True, epochs=2, progress=False)  # to the end of epoch 2
    m_part = iwae_ext.train(out=part, resume=True, epochs=3, progress=False)
    assert_same_state(state(full), state(part))
    assert m_full["test_log_likelihood"] == m_part["test_log_likelihood"]
    lines = [json.loads(line) for line in open(os.path.join(part, "metrics.jsonl"))]
    full_lines = [json.loads(line) for line in open(os.path.join(full, "metrics.jsonl"))]
    assert [l["epoch"] for l in lines] == [1, 2, 3]
    assert [l["train_bound"] for l in lines] == [l["train_bound"] for l in full_lines]


def test_outputs_checkpoint_and_metrics(tmp_path):
    out = str(tmp_path / "run")
    metrics = iwae_ext.train(out=out, epochs=2, **TINY)
    for key in ("test_log_likelihood", "test_elbo", "train_log_likelihood", "active_units", "config",
                "timings", "generalization_gap"):
        assert key in metrics
    assert metrics["n_test"] == 300 and metrics["n_train_eval"] == 50 and metrics["eval_k"] == 10
    assert metrics["test_log_likelihood"] >= metrics["test_elbo"]
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["test_log_likelihood"] == metrics["test_log_likelihood"]
    assert len(open(os.path.join(out, "metrics.jsonl")).read().splitlines()) == 2
    torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)  # plain tensors and containers
    model = load_checkpoint(out)
    assert not model.training and model.latent_dims == (4,)
    x = iwae_ext.data.load_dataset().split("test")[:5]
    assert model.log_weights(x, 2).shape == (2, 5)
    with pytest.raises(FileExistsError, match="already holds a run"):
        iwae_ext.train(out=out, epochs=1, **TINY)
    with pytest.raises(ValueError, match="k cannot change when resuming"):
        iwae_ext.train(out=out, resume=True, k=7)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A NaN loss at step 4 of epoch 2 is caught on the device: no update from that step on, the
    run stops at the epoch's read-back naming epoch and step, the last good checkpoint stays."""
    from iwae_ext.trainer.model_kinds import BoundKind
    out = str(tmp_path / "run")
    iwae_ext.train(out=out, epochs=1, **TINY)
    good = state(out)
    real = BoundKind.loss
    calls = {"n": 0}
    seen = []

    def poisoned(self, model, x, scale, noise):
        calls["n"] += 1
        loss, bound, aux = real(self, model, x, scale, noise)
        seen.append([p.detach().clone() for p in model.parameters()])
        return (loss * float("nan") if calls["n"] == 4 else loss), bound, aux

    monkeypatch.setattr(BoundKind, "loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 4 of 6.*last good checkpoint"):
        iwae_ext.train(out=out, resume=True, epochs=2, progress=False, sync_every=1000)
    assert calls["n"] == 6  # no read-back inside the epoch: it ran to its end, updating nothing
    for later in seen[4:]:
        for a, b in zip(seen[3], later):
            assert torch.equal(a, b)
    assert not torch.equal(seen[3][0], seen[2][0])  # the steps before were applied
    assert_same_state(good, state(out))


def test_non_finite_loss_is_caught_at_the_next_read_back(tmp_path, monkeypatch):
    from iwae_ext.trainer.model_kinds import BoundKind
    real = BoundKind.loss
    calls = {"n": 0}

    def poisoned(self, model, x, scale, noise):
        calls["n"] += 1
        loss, bound, aux = real(self, model, x, scale, noise)
        return (loss + float("inf") if calls["n"] == 2 else loss), bound, aux

    monkeypatch.setattr(BoundKind, "loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss or gradient at epoch 1, step 2 of 6.*No checkpoint"):
        iwae_ext.train(out=str(tmp_path / "run"), epochs=1, sync_every=3, **{k: v for k, v in TINY.items()})
    assert calls["n"] == 3  # stopped at the read-back after step 3
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")


def test_two_layers_vae_and_gaussian(tmp_path):
    m = iwae_ext.train(epochs=1, layers=2, hidden=[[20], [10]], latent_dim=[6, 3], model="iwae",
                       **{k: v for k, v in TINY.items() if k not in ("hidden", "latent_dim")})
    assert len(m["active_units"]) == 2
    v = iwae_ext.train(epochs=1, model="vae", **TINY)
    assert v["config"]["kl"] == "analytic"
    toy = Dataset.from_arrays("toy", np.random.default_rng(0).random((120, 6, 5)),
                              np.random.default_rng(1).random((40, 6, 5)), likelihood="gaussian")
    g = iwae_ext.train(data=toy, epochs=1, batch_size=20, k=2, hidden=[[8]], latent_dim=[2],
                       eval_k=4, progress=False)
    assert g["config"]["decoder"] == "gaussian" and g["config"]["dataset"] == "toy"


def test_bad_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown data set 'nope'"):
        iwae_ext.train(dataset="nope", progress=False)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        iwae_ext.train(k=0, progress=False)
    with pytest.raises(ValueError, match="estimator 'dreg' is for the IWAE bound"):
        iwae_ext.train(model="vae", estimator="dreg", progress=False)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        iwae_ext.train(lr=float("nan"), progress=False)
    with pytest.raises(ValueError, match="hidden gives one layer's widths but layers=2"):
        iwae_ext.train(layers=2, hidden=[[200, 200]], progress=False)
    toy = Dataset.from_arrays("toy", np.random.default_rng(0).random((20, 6)),
                              np.random.default_rng(1).random((5, 6)), likelihood="gaussian")
    with pytest.raises(ValueError, match="decoder 'bernoulli' needs binary data"):
        iwae_ext.train(data=toy, decoder="bernoulli", progress=False)


def test_burda_schedule():
    assert burda_schedule(0) == 1e-3
    assert burda_schedule(1) == pytest.approx(1e-3 * 10 ** (-1 / 7))
    assert burda_schedule(3) == pytest.approx(1e-3 * 10 ** (-1 / 7))
    assert burda_schedule(4) == pytest.approx(1e-3 * 10 ** (-2 / 7))
    assert burda_schedule(3279) == pytest.approx(1e-4)
    cfg = TrainConfig(schedule="burda").resolved(iwae_ext.data.load_dataset())
    assert cfg.epochs == 3280


def test_cli_train_and_eval_on_a_tiny_subset(tmp_path, capsys):
    out = str(tmp_path / "cli")
    rc = cli.train_main(["--subset", "200", "--batch-size", "50", "--k", "2", "--hidden", "16",
                         "--latent-dim", "3", "--epochs", "1", "--eval-k", "5", "--train-eval-size",
                         "20", "--estimator", "stl", "--out", out, "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"iwae-train: run directory {out}\n")  # said first, before training
    assert "test log-likelihood L_5" in printed and out in printed
    assert cli.eval_main([out, "--k", "7", "--limit", "30", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["k"] == 7 and result["n"] == 30 and result["log_likelihood"] < 0
    assert cli.train_main(["--dataset", "omniglot", "--data-dir", str(tmp_path / "none"),
                           "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "chardata.mat not found" in err
    with pytest.raises(SystemExit):
        cli.train_main(["--model", "rbm"])
    with pytest.raises(SystemExit):
        cli.train_main(["--hidden", "200,x"])


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "iwae_ext.cli.train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--estimator" in r.stdout and "--schedule" in r.stdout
    assert "RuntimeWarning" not in r.stderr


def _weight_data_offset(path):
    """The byte offset, in a torch.save zip, of the largest tensor's raw data (stored
    uncompressed, as <archive>/data/<n>), and its length."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if re.search(r"/data/\d+$", i.filename)),
                   key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_a_checkpoint_with_bytes_changed_inside_a_tensor_is_refused(tmp_path):
    out = str(tmp_path / "run")
    iwae_ext.train(out=out, epochs=1, **TINY)
    path = os.path.join(out, "checkpoint.pt")
    load_checkpoint(out)  # verified
    offset, size = _weight_data_offset(path)
    with open(path, "r+b") as f:
        f.seek(offset + size // 2)
        f.write(b"\x12\x34\x56\x78")
    torch.load(path, weights_only=True)  # torch itself does not notice
    with pytest.raises(CorruptCheckpointError, match=f"{re.escape(path)} is corrupt"):
        load_checkpoint(out)
    with pytest.raises(CorruptCheckpointError):
        iwae_ext.train(out=out, resume=True, epochs=2)
    assert cli.eval_main([out, "--k", "2", "--no-progress"]) == 2


def test_a_file_that_is_not_a_checkpoint_gets_no_unsafe_advice(tmp_path, capsys):
    os.makedirs(tmp_path / "junk")
    path = str(tmp_path / "junk" / "checkpoint.pt")
    cases = {
        "text": lambda: open(path, "w").write("not a checkpoint\n"),
        "truncated": lambda: open(path, "wb").write(b"PK\x03\x04" + b"\x00" * 40),
        "a pickled object": lambda: torch.save({"format": CHECKPOINT_FORMAT, "x": TrainConfig()}, path),
        "another dict": lambda: torch.save({"weights": torch.zeros(3)}, path),
    }
    for what, write in cases.items():
        write()
        with pytest.raises(CorruptCheckpointError) as e:
            load_checkpoint(path)
        assert path in str(e.value), what
        assert "weights_only=False" not in str(e.value) and e.value.__cause__ is None, what
        assert cli.eval_main([path, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "weights_only=False" not in err and "Traceback" not in err, (what, err)


def _eval_status(argv):
    try:
        return cli.eval_main(argv)
    except SystemExit as e:  # argparse's errors
        return e.code


def test_iwae_eval_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    out = str(tmp_path / "run")
    iwae_ext.train(out=out, epochs=1, **TINY)
    capsys.readouterr()
    for argv, message in ((["--k", "0"], "--k must be >= 1"), (["--limit", "0"], "--limit must be >= 1"),
                          (["--limit", "-3"], "--limit must be >= 1"),
                          (["--limit", "10001"], "--limit 10001 is larger than the test split (10000 images)"),
                          (["--ais-temps", "1"], "--ais-temps must be >= 2")):
        assert _eval_status([out, "--no-progress", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


def test_a_non_finite_gradient_with_a_finite_loss_is_caught(tmp_path, monkeypatch):
    """The device check reads the gradients too (one fused pass): a NaN gradient behind a finite
    loss skips the update like a NaN loss."""
    from iwae_ext.trainer.model_kinds import BoundKind
    real = BoundKind.loss
    calls = {"n": 0}

    class NaNGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, p):
            return p.sum() * 0

        @staticmethod
        def backward(ctx, grad):
            return torch.full((20, 784), float("nan"))

    def poisoned(self, model, x, scale, noise):
        calls["n"] += 1
        loss, bound, aux = real(self, model, x, scale, noise)
        if calls["n"] == 5:
            first = model.encoders[0].body[0].weight
            loss = loss + NaNGradient.apply(first)
            assert torch.isfinite(loss)
        return loss, bound, aux

    monkeypatch.setattr(BoundKind, "loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 5 of 6"):
        iwae_ext.train(epochs=1, **TINY)


def test_a_format_1_checkpoint_loads_but_does_not_resume(tmp_path):
    """A checkpoint of the trainer before keyed draws (format 1) still loads for evaluation; a
    resume is refused with the reason (its random streams cannot be continued)."""
    from iwae_ext.trainer.checkpoint import save_checkpoint
    out = str(tmp_path / "run")
    iwae_ext.train(out=out, epochs=1, **TINY)
    ckpt = state(out)
    ckpt["format"] = "iwae_ext.checkpoint/1"
    save_checkpoint(ckpt, os.path.join(out, "checkpoint.pt"))
    assert load_checkpoint(out).config["latent_dims"] == [4]
    with pytest.raises(ValueError, match="older iwae_ext.*cannot be continued exactly"):
        iwae_ext.train(out=out, resume=True, epochs=2, progress=False)
