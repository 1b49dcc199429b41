"""benchmarks/reproduce.py iwaer-table1 as a CPU smoke run: the three runs train side by side, a run
stopped by SIGTERM (forwarded to every run) resumes to exactly the numbers of an uninterrupted
one, and the table carries the paper's numbers."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "reproduce.py")
MODELS = ("iwae", "iwaer_rec", "iwaer")
SMOKE = ["--device", "cpu", "--epochs", "8", "--limit", "100", "--eval-k", "8", "--train-eval-size", "50",
         "--estimate-steps", "2", "--poll", "1"]


def _cmd(out, *extra):
    return [sys.executable, SCRIPT, "iwaer-table1", "--out", str(out), *SMOKE, *extra]


def _rows(out):
    with open(os.path.join(out, "table.json")) as f:
        return json.load(f)["rows"]


@pytest.mark.skipif(sys.platform != "linux", reason="signals and process groups as on Linux")
def test_iwaer_table1_smoke_run_stops_on_sigterm_and_resumes_exactly(tmp_path):
    straight = tmp_path / "straight"
    r = subprocess.run(_cmd(straight), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "expected total:" in r.stdout
    want = _rows(straight)
    assert [row["model"] for row in want] == ["IWAE", "IWAER_rec", "IWAER"]
    assert [row["paper"] for row in want] == [-95.18, -94.71, -94.35]
    assert all(row["epochs"] == 8 and row["eval_k"] == 8 and row["n_test"] == 100 for row in want)
    table = (straight / "table.md").read_text()
    assert "-95.18" in table and "S = 8 samples" in table

    # the same runs, stopped by SIGTERM once every run has written a checkpoint, then resumed
    split = tmp_path / "split"
    proc = subprocess.Popen(_cmd(split), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not all((split / m / "checkpoint.pt").exists() for m in MODELS):
        assert proc.poll() is None and time.time() < deadline, "the runs did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    if (split / "table.json").exists():
        pytest.skip("every run finished before the signal arrived (a fast machine): nothing to resume")
    assert "stopped (SIGTERM)" in out and "--resume" in out, out
    r = subprocess.run(_cmd(split, "--resume"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    got = _rows(split)
    for a, b in zip(got, want):
        for key in ("test_log_likelihood", "test_elbo", "train_log_likelihood", "stderr"):
            assert a[key] == b[key], (a["model"], key, a[key], b[key])
    # a finished set is kept as it is; starting over in the same directory needs --resume
    r = subprocess.run(_cmd(split, "--resume"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "iwae       done" in r.stdout, r.stdout + r.stderr
    r = subprocess.run(_cmd(split), capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "--resume" in r.stderr
