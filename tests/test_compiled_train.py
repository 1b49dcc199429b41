"""The compiled training step: one graph per run (no recompilation across
steps and epochs), the same losses as the eager step to float tolerance, resume exact within the
compiled mode, and (on CUDA) an epoch with no host synchronisation."""
import json
import os

import pytest
import torch

import iwae_ext

TINY = dict(subset=300, batch_size=50, k=3, hidden=[[20]], latent_dim=[4], eval_k=10,
            train_eval_size=50, progress=False)


def _lines(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.parametrize("kw", [dict(model="iwae", estimator="dreg"), dict(model="iwaer"),
                                dict(model="vae"), dict(model="iwae", layers=2, hidden=[[20], [10]],
                                                       latent_dim=[4, 3])])
def test_compiled_and_eager_runs_agree(tmp_path, kw):
    import torch._dynamo
    from iwae_ext.trainer.loop import _TORCH_VERSION
    cfg = {**TINY, **kw}
    if kw.get("estimator") == "dreg" and _TORCH_VERSION < (2, 13):
        # torch 2.11's inductor cannot compile DReG's gradient hook: refused by name, and the
        # default leaves such a run eager
        with pytest.raises(ValueError, match="estimator 'dreg' compiles with torch >= 2.13"):
            iwae_ext.train(out=str(tmp_path / "compiled"), epochs=1, compile=True, **cfg)
        assert iwae_ext.train(out=str(tmp_path / "default"), epochs=1, **cfg)["config"]["compile"] is False
        return
    eager = iwae_ext.train(out=str(tmp_path / "eager"), epochs=2, compile=False, **cfg)
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = iwae_ext.train(out=str(tmp_path / "compiled"), epochs=2, compile=True, **cfg)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1  # 12 steps, 2 epochs, 1 graph
    assert compiled["config"]["compile"] is True and eager["config"]["compile"] is False
    for a, b in zip(_lines(str(tmp_path / "eager")), _lines(str(tmp_path / "compiled"))):
        assert b["train_bound"] == pytest.approx(a["train_bound"], rel=1e-5, abs=1e-4)
    assert compiled["test_log_likelihood"] == pytest.approx(eager["test_log_likelihood"], abs=0.05)


def test_compiled_resume_is_exact(tmp_path):
    cfg = dict(TINY, compile=True)
    full = str(tmp_path / "full")
    iwae_ext.train(out=full, epochs=2, **cfg)
    part = str(tmp_path / "part")
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 8

    assert iwae_ext.train(out=part, epochs=2, should_stop=stop, **cfg)["stopped"]
    iwae_ext.train(out=part, resume=True, epochs=2, progress=False)  # keeps the saved compile=True
    a = torch.load(os.path.join(full, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=True)
    assert b["config"]["compile"] is True
    for name in a["model_state"]:
        assert torch.equal(a["model_state"][name], b["model_state"][name]), name
    assert [l["train_bound"] for l in _lines(full)] == [l["train_bound"] for l in _lines(part)]


def test_compile_refused_for_a_kind_that_does_not_trace():
    with pytest.raises(ValueError, match="compile: model 'aiwae' does not compile"):
        iwae_ext.train(model="aiwae", compile=True, **TINY)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile", [False, True])
def test_an_epoch_on_cuda_reads_nothing_back(tmp_path, monkeypatch, compile):
    """The steps of an epoch run under torch.cuda.set_sync_debug_mode("error"): any synchronising
    call among them raises (the read-backs come after them: sync_every > steps per epoch)."""
    from iwae_ext.trainer import loop
    real = loop._Run._steps

    def guarded(self, *args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(loop._Run, "_steps", guarded)
    m = iwae_ext.train(device="cuda", epochs=2, compile=compile, sync_every=10_000, **TINY)
    assert m["device"].startswith("cuda") and m["config"]["compile"] is compile
    for model in ("iwaer", "aiwae"):
        iwae_ext.train(device="cuda", epochs=1, compile=False, sync_every=10_000, model=model,
                       **{**TINY, "eval_k": 4})


def test_a_learning_rate_schedule_recompiles_nothing(tmp_path):
    """Burda's schedule changes the learning rate after epoch 1: the compiled optimizer reads it
    from a tensor, so the run compiles what a constant-lr run compiles, and the update is the
    eager one's to float tolerance."""
    import torch._dynamo
    counts = {}
    for schedule in (None, "burda"):
        torch._dynamo.reset()
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        calls = {"n": 0}

        def stop():
            calls["n"] += 1
            return calls["n"] > 12  # 2 epochs of 6 steps: lr 1e-3, then 1e-3 * 10^(-1/7)

        r = iwae_ext.train(out=str(tmp_path / f"{schedule}"), schedule=schedule, epochs=2, compile=True,
                           should_stop=stop, **TINY)
        counts[schedule] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
        if schedule == "burda":
            assert r["stopped"] and r["epoch"] == 2
            lines = _lines(str(tmp_path / "burda"))
            assert lines[1]["lr"] == pytest.approx(1e-3 * 10 ** (-1 / 7))
    assert counts["burda"] == counts[None] >= 1
