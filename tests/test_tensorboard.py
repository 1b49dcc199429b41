"""TensorBoard logging of training (``--tensorboard DIR``): the event files read back hold each
epoch's bound, learning rate and step time, the test curve and the final metrics, once each,
across a stop and a resume; without the tensorboard package the option is refused by name.
(Under torchrun only rank 0 writes: tests/test_distributed_train.py.)"""
import json
import os
import sys

import pytest

pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (pip install tensorboard)")

import iwae_ext  # noqa: E402
from iwae_ext.trainer import TrainConfig  # noqa: E402

SMALL = dict(subset=200, batch_size=50, k=2, hidden=[[16]], latent_dim=[3], eval_k=8, train_eval_size=40,
             progress=False, compile=False, dtype="float64")


def read_events(log_dir):
    """{tag: [(step, value), ...]} and {tag: [text, ...]} of every event file in log_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = {tag: [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}
    return scalars, texts


def test_events_hold_every_epoch_and_the_final_metrics(tmp_path):
    out, tb = str(tmp_path / "run"), str(tmp_path / "tb")
    metrics = iwae_ext.train(**SMALL, epochs=3, test_every=2, out=out, tensorboard=tb)
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    scalars, texts = read_events(tb)
    assert [s for s, _ in scalars["train/bound"]] == [1, 2, 3]
    for (step, value), line in zip(scalars["train/bound"], lines):
        assert value == pytest.approx(line["train_bound"], rel=1e-6)  # events store float32
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([1e-3] * 3)
    assert [v for _, v in scalars["train/seconds_per_epoch"]] == pytest.approx([line["seconds"] for line in lines], rel=1e-6)
    assert [v for _, v in scalars["train/step_ms"]] == pytest.approx([250 * line["seconds"] for line in lines], rel=1e-6)
    assert scalars["test/bound"] == [(2, pytest.approx(lines[1]["test_bound"], rel=1e-6))]
    assert scalars["test/elbo"] == [(2, pytest.approx(lines[1]["test_elbo"], rel=1e-6))]
    assert scalars["final/test_log_likelihood"] == [(3, pytest.approx(metrics["test_log_likelihood"], rel=1e-6))]
    assert scalars["final/timings/seconds_per_epoch"][0][1] == pytest.approx(metrics["timings"]["seconds_per_epoch"], rel=1e-6)
    assert '"tensorboard"' in texts["config/text_summary"][0] and '"k": 2' in texts["config/text_summary"][0]


def test_a_stopped_and_resumed_run_logs_each_epoch_once(tmp_path):
    out, tb = str(tmp_path / "run"), str(tmp_path / "tb")
    calls = {"n": 0}

    def stop_in_epoch_3():  # asked before every step: 4 steps an epoch, so this stops inside epoch 3
        calls["n"] += 1
        return calls["n"] > 9

    from iwae_ext.trainer.loop import train as loop_train
    first = loop_train(TrainConfig(**SMALL, epochs=4, out=out, tensorboard=tb), should_stop=stop_in_epoch_3)
    assert first["stopped"] and first["epoch"] == 2
    done = iwae_ext.train(out=out, resume=True, epochs=5, progress=False)
    scalars, _ = read_events(tb)
    assert [s for s, _ in scalars["train/bound"]] == [1, 2, 3, 4, 5]
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [v for _, v in scalars["train/bound"]] == pytest.approx([line["train_bound"] for line in lines], rel=1e-6)
    assert scalars["final/test_log_likelihood"] == [(5, pytest.approx(done["test_log_likelihood"], rel=1e-6))]


def test_without_the_package_the_option_is_refused_by_name(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ValueError, match="tensorboard: logging to TensorBoard needs the tensorboard package"):
        iwae_ext.train(**SMALL, epochs=1, out=str(tmp_path / "run"), tensorboard=str(tmp_path / "tb"))
    with pytest.raises(ValueError, match="tensorboard must be a directory"):
        iwae_ext.train(**SMALL, epochs=1, out=str(tmp_path / "run2"), tensorboard=3)
