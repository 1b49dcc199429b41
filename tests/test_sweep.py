"""The sweep runner (benchmarks/sweep.py): side by side, sharded, skipped when finished, and a
sweep stopped mid-way and resumed to the same numbers as one that ran through."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from sweep import Run, compact_history, history_records, load_results, parse_shard, run_sweep  # noqa: E402

TINY = {"hidden": [[16]], "latent_dim": [2], "subset": 64, "batch_size": 16, "eval_k": 5,
        "train_eval_size": 32, "compile": False}


def _tiny(name, epochs=2, seed=0, **kw):
    return Run(name, dict(TINY, epochs=epochs, seed=seed, **kw))


def _numbers(result):
    """What a run computed (not how long it took)."""
    m = result["metrics"]
    keep = ("test_log_likelihood", "test_elbo", "train_log_likelihood", "train_elbo", "final_train_bound")
    return ({k: m[k] for k in keep}, result["history"]["train_bound"])


def test_parse_shard_and_names():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "1", "a/b", "0/0", "-1/2"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
    with pytest.raises(ValueError, match="Run name"):
        Run("a/b", {})
    with pytest.raises(ValueError, match="must not set 'out'"):
        Run("a", {"out": "x"})
    with pytest.raises(ValueError, match="unique"):
        run_sweep([_tiny("a"), _tiny("a")], "w", "r")


def test_workers_shards_and_skip(tmp_path):
    runs = [_tiny(f"r{i}", seed=i) for i in range(3)]
    work, res = str(tmp_path / "work"), str(tmp_path / "res")
    st = run_sweep(runs, work, res, workers=2, shard=(0, 2), log=lambda *a: None)
    assert sorted(st["done"]) == ["r0", "r2"] and not st["failed"]  # every other run
    assert sorted(load_results(res, runs)) == ["r0", "r2"]
    st = run_sweep(runs, work, res, workers=2, log=lambda *a: None)
    assert st["done"] == ["r1"] and sorted(st["skipped"]) == ["r0", "r2"]
    r1 = json.load(open(os.path.join(res, "r1.json")))
    assert r1["config"]["seed"] == 1 and r1["history"]["epoch"] == [1, 2]
    assert r1["metrics"]["threads"] == 1  # one thread per worker
    assert not any(name.endswith(".pt") for name in os.listdir(res))  # results hold no checkpoint


def test_stopped_sweep_resumes_to_the_same_numbers(tmp_path):
    runs = [_tiny("long", epochs=6), _tiny("queued", epochs=2, seed=3)]
    ref = str(tmp_path / "ref")
    assert sorted(run_sweep(runs, ref + "/w", ref + "/r", log=lambda *a: None)["done"]) == ["long", "queued"]

    work, res = str(tmp_path / "work"), str(tmp_path / "res")
    jsonl = os.path.join(work, "long", "metrics.jsonl")

    def after_two_epochs():
        return os.path.isfile(jsonl) and sum(1 for _ in open(jsonl)) >= 2

    st = run_sweep(runs, work, res, workers=1, should_stop=after_two_epochs, log=lambda *a: None)
    assert sorted(st["stopped"]) == ["long", "queued"]
    assert not st["done"] and os.path.isfile(os.path.join(work, "long", "checkpoint.pt"))
    st = run_sweep(runs, work, res, workers=2, log=lambda *a: None)
    assert sorted(st["done"]) == ["long", "queued"]
    for name in ("long", "queued"):
        a = json.load(open(os.path.join(ref, "r", f"{name}.json")))
        b = json.load(open(os.path.join(res, f"{name}.json")))
        assert _numbers(a) == _numbers(b)


def test_compact_history_keeps_log_spaced_epochs_and_round_trips():
    recs = [{"epoch": e, "train_bound": -100.0 + e / 1000, "objective": "elbo k=1"} for e in range(1, 2001)]
    for e in (1000, 2000):
        recs[e - 1]["test_elbo"] = -99.0
    h = compact_history(recs)
    assert len(h["epoch"]) <= 202 and h["epoch"][0] == 1 and h["epoch"][-1] == 2000
    assert 1000 in h["epoch"]  # an epoch with test bounds is always kept
    assert h["epoch"] == sorted(set(h["epoch"])) and h["labels"] == ["elbo k=1"]
    back = history_records(h)
    assert back[-1] == {"epoch": 2000, "train_bound": -98.0, "test_elbo": -99.0}
    assert all(r == {k: v for k, v in recs[r["epoch"] - 1].items() if k != "objective"} for r in back)
    short = compact_history(recs[:5])
    assert short["epoch"] == [1, 2, 3, 4, 5] and "test_elbo" not in short
    assert len(json.dumps(h)) < 12_000


def test_a_run_starts_from_another_runs_weights_once_it_finished(tmp_path):
    import torch

    from iwae_ext.trainer import load_checkpoint
    # listed first, with two workers: it still waits for its source to finish
    runs = [Run("child", dict(TINY, epochs=1, lr=1e-12, seed=5), init_from_run="src"),
            _tiny("other", epochs=1, seed=1), _tiny("src", epochs=2)]
    work, res = str(tmp_path / "work"), str(tmp_path / "res")
    said = []
    # the shard 1/2 of [other, child, src] holds child only: its source is in shard 0/2
    st = run_sweep([runs[1], runs[0], runs[2]], work, res, shard=(1, 2), log=said.append)
    assert st["waiting"] == ["child"] and not st["done"]
    assert any("child waits" in s and "another shard" in s for s in said)
    st = run_sweep(runs, work, res, workers=2, log=said.append)
    assert sorted(st["done"]) == ["child", "other", "src"] and not st["waiting"]
    assert said.index("sweep: finished src") < said.index("sweep: started child")
    a = load_checkpoint(os.path.join(work, "src", "checkpoint.pt")).state_dict()
    b = load_checkpoint(os.path.join(work, "child", "checkpoint.pt")).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # lr 1e-12: the source's weights
    assert json.load(open(os.path.join(res, "child.json")))["init_from_run"] == "src"
    # the source finished elsewhere (its result file only): the run waits and says why
    os.remove(os.path.join(res, "child.json"))
    import shutil
    shutil.rmtree(os.path.join(work, "src"))
    shutil.rmtree(os.path.join(work, "child"))
    said.clear()
    st = run_sweep(runs, work, res, log=said.append)
    assert st["waiting"] == ["child"] and any("no checkpoint in" in s for s in said)
    with pytest.raises(ValueError, match="not a run of this sweep"):
        run_sweep([Run("a", {}, init_from_run="b")], work, res)
    with pytest.raises(ValueError, match="not both"):
        Run("a", {"init_from": "x"}, init_from_run="b")
