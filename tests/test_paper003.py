"""benchmarks/reproduce.py paper003 (the AEVB reproduction's experiments) as CPU smoke runs:
every experiment trains its reduced grid at tiny budgets side by side, leaves one result file per
run, and writes its table and figure; finished runs are skipped on a second call."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "reproduce.py")
SHARED = os.environ.get("IWAE_EXT_TEST_DATA") or os.path.join(ROOT, "..", "shared", "data")
EXPERIMENTS = {"samples-vs-batch": ["L1-M20", "L2-M20", "L1-M100", "L2-M100"],
               "encoder-depth": ["depth1", "depth2"], "estimators": ["mc-z3", "analytic-z3"],
               "activations": ["tanh", "relu"], "ae-vs-vae": ["ae-z2", "vae-z2"], "full-vb": ["vae", "full-vb", "full-vb-from-vae"]}


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, SCRIPT, "paper003", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_list_and_bad_arguments():
    r = _run("list")
    assert r.returncode == 0 and all(name in r.stdout for name in EXPERIMENTS)
    assert "32 runs" in r.stdout  # samples-vs-batch: L = 1..8 x four batch sizes
    r = _run("nope")
    assert r.returncode == 2 and "experiment must be one of" in r.stderr
    r = _run("activations", "--shard", "2/2")
    assert r.returncode == 2 and "shard" in r.stderr


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED, "frey_faces.npz")),
                    reason="frey_faces.npz is not present: set IWAE_EXT_TEST_DATA")
@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_smoke_run_writes_results_table_and_figure(tmp_path, experiment):
    work = str(tmp_path)
    r = _run(experiment, "--smoke", "--workers", "2", "--work-dir", work, "--data-dir", SHARED)
    assert r.returncode == 0, r.stdout + r.stderr
    res = os.path.join(work, "results", experiment)
    assert sorted(os.listdir(res)) == sorted(f"{n}.json" for n in EXPERIMENTS[experiment])
    summary = json.load(open(os.path.join(work, "results", f"{experiment}.json")))
    assert list(summary["runs"]) == EXPERIMENTS[experiment] and summary["finding"]
    table = open(os.path.join(work, "results", f"{experiment}.md")).read()
    assert all(f"| {n} |" in table for n in EXPERIMENTS[experiment]) and "The report's finding" in table
    assert os.path.getsize(os.path.join(work, "figures", f"paper003-smoke-{experiment}.png")) > 10_000
    one = json.load(open(os.path.join(res, f"{EXPERIMENTS[experiment][0]}.json")))
    assert one["metrics"]["epochs"] == 2 and one["metrics"]["threads"] == 1
    if experiment == "ae-vs-vae":
        assert 0 < one["extras"]["test_mse"] < 1 and one["extras"]["reconstruction_shape"] == [8, 28, 28]
        r = _run(experiment, "--smoke", "--report", "--redo-extras", "--work-dir", work, "--data-dir", SHARED)
        assert r.returncode == 0, r.stdout + r.stderr  # recomputed from the checkpoints: the same
        assert json.load(open(os.path.join(res, f"{EXPERIMENTS[experiment][0]}.json")))["extras"] == one["extras"]
    elif experiment != "samples-vs-batch":
        assert all(v is not None for v in one["history"]["test_elbo"])  # the learning curve on test data
    if experiment == "activations":  # the steps timed against each other in one process
        steps = json.load(open(os.path.join(work, "results", "activations-steps.json")))
        assert sorted(steps["step_ms"]) == ["relu", "tanh"] and steps["ratio_to_tanh"]["tanh"] == 1.0
        assert "ms per step" in table
    if experiment == "full-vb":  # started from the trained VAE's weights, after it finished
        last = json.load(open(os.path.join(res, "full-vb-from-vae.json")))
        assert last["init_from_run"] == "vae" and 0 < last["extras"]["test_mse"] < 1
        assert "test MSE per pixel" in table
    r = _run(experiment, "--smoke", "--workers", "2", "--work-dir", work, "--data-dir", SHARED)
    assert r.returncode == 0 and "0 to train" in r.stdout  # finished runs are skipped
