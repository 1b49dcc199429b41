"""Sweeps of independent training runs: side by side, sharded for cluster arrays, resumable.

    from sweep import Run, run_sweep
    runs = [Run("L1-M20", {"dataset": "frey", "k": 1, "batch_size": 20, ...}), ...]
    run_sweep(runs, work_dir="runs/paper003/samples-vs-batch",
              results_dir="benchmarks/results/paper003/samples-vs-batch", workers=2, shard=(0, 1))

Each :class:`Run` is a name and :class:`iwae_ext.trainer.TrainConfig` fields. It trains in a
process of its own with ``threads`` threads (default 1), so ``workers`` processes use that many
cores; ``shard=(i, n)`` takes the runs whose position in the sweep is i modulo n, for cluster
arrays (``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``): every shard sees the same
list and writes only its own runs' files.

A finished run leaves ``results_dir/<name>.json`` (a few kilobytes: the run's config, its final
metrics and its per-epoch history as columns, at most 200 log-spaced epochs of a longer run; no
checkpoint), meant to be committed: a run whose file
exists is skipped, so a sweep split over days, machines or shards continues where it stopped.
A run in progress continues from ``work_dir/<name>/checkpoint.pt`` (the trainer's exact resume).
SIGINT / SIGTERM (or ``time_limit`` seconds) ask every running training to checkpoint at its
next step and stop; running the same command again continues.

A run may start from another run's trained weights (``Run(name, config, init_from_run=other)``:
the trainer's ``init_from`` with ``work_dir/<other>/checkpoint.pt``). It starts once ``other``
has finished, and needs that run's checkpoint in ``work_dir``: a run finished elsewhere (its
result file only) or in another shard that has not finished yet leaves it waiting, said so by
name, until the command runs again where the checkpoint is.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

__all__ = ["Run", "run_sweep", "parse_shard", "load_results", "result_path", "write_json", "compact_history",
           "history_records"]


@dataclasses.dataclass(frozen=True)
class Run:
    """One training of a sweep: ``name`` (a file name: letters, digits, ``-_.=``) and the
    :class:`~iwae_ext.trainer.TrainConfig` fields that define it; ``init_from_run``: the name
    of a run of the same sweep whose trained weights this one starts from (after it finished)."""

    name: str
    config: dict
    init_from_run: str | None = None

    def __post_init__(self):
        ok = self.name and all(c.isalnum() or c in "-_.=" for c in self.name)
        if not ok or self.name.startswith("."):
            raise ValueError(f"Run name must be letters, digits and -_.= only, got {self.name!r}")
        for key in ("out", "resume", "progress"):
            if key in self.config:
                raise ValueError(f"Run {self.name!r}: config must not set {key!r} (the sweep does)")
        if self.init_from_run is not None:
            if "init_from" in self.config:
                raise ValueError(f"Run {self.name!r}: give init_from or init_from_run, not both")
            if self.init_from_run == self.name:
                raise ValueError(f"Run {self.name!r}: init_from_run names the run itself")


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; a clear error otherwise."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"shard must be i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {text!r}")
    return i, n


def result_path(results_dir: str, run: Run) -> str:
    return os.path.join(results_dir, f"{run.name}.json")


def load_results(results_dir: str, runs: list[Run]) -> dict[str, dict]:
    """{name: result} of the runs finished so far."""
    out = {}
    for run in runs:
        path = result_path(results_dir, run)
        if os.path.isfile(path):
            with open(path) as f:
                out[run.name] = json.load(f)
    return out


def die_with_parent():
    """In a child process (``preexec_fn``): SIGTERM (a checkpoint, then exit) when its parent
    dies (Linux), so no run trains on unsupervised."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child(config_json: str, run_dir: str, threads: int) -> int:
    """One run, in its own process: trains (or resumes) into run_dir; 0 when finished, 130
    when stopped with a checkpoint."""
    import torch
    torch.set_num_threads(threads)
    import iwae_ext
    config = json.loads(config_json)
    resume = os.path.isfile(os.path.join(run_dir, "checkpoint.pt"))
    metrics = iwae_ext.train(**config, out=run_dir, resume=resume, progress=False)
    return 130 if metrics.get("stopped") else 0


HISTORY_POINTS = 200  # epochs kept of a longer run's history (log-spaced, the last one included)


def _kept_epochs(n: int) -> list[int]:
    """The 0-based indices of the epochs a result keeps: all of up to HISTORY_POINTS, else
    HISTORY_POINTS log-spaced ones (learning curves are drawn against log samples seen)."""
    if n <= HISTORY_POINTS:
        return list(range(n))
    import math
    keep = {min(n - 1, round(math.exp(math.log(n) * i / (HISTORY_POINTS - 1))) - 1) for i in range(HISTORY_POINTS)}
    return sorted(keep | {n - 1})


def compact_history(records: list[dict]) -> dict:
    """metrics.jsonl's records as columns of their numbers (None where an epoch lacks one, e.g.
    the test bounds of --test-every), at the epochs _kept_epochs chooses and every epoch with test
    bounds: a few kilobytes for a run of thousands of epochs."""
    kept = set(_kept_epochs(len(records))) | {i for i, r in enumerate(records) if "test_elbo" in r}
    rows = [records[i] for i in sorted(kept)]
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    out = {k: [r.get(k) for r in rows] for k in keys}
    text = sorted({str(r[k]) for r in rows for k, v in r.items() if isinstance(v, str)} if rows else [])
    if text:
        out["labels"] = text  # e.g. the objective's description
    return out


def history_records(history: dict) -> list[dict]:
    """compact_history's columns back as one record per kept epoch (None fields left out)."""
    cols = {k: v for k, v in history.items() if k != "labels"}
    n = len(next(iter(cols.values()))) if cols else 0
    return [{k: v[i] for k, v in cols.items() if v[i] is not None} for i in range(n)]


def _write_result(results_dir: str, run: Run, run_dir: str, post=None):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    payload = {"name": run.name, "config": run.config, "metrics": metrics, "history": compact_history(records)}
    if run.init_from_run is not None:
        payload["init_from_run"] = run.init_from_run
    if post is not None:  # what else the experiment keeps of the trained model (small)
        payload["extras"] = post(run, run_dir)
    os.makedirs(results_dir, exist_ok=True)
    write_json(result_path(results_dir, run), payload)


def write_json(path: str, payload) -> None:
    """payload as indented JSON at path, through a temporary file: never a half-written result."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def run_sweep(runs: list[Run], work_dir: str, results_dir: str, workers: int = 1,
              shard: tuple[int, int] = (0, 1), threads: int = 1, time_limit: float | None = None,
              should_stop=None, post=None, poll: float = 0.2, log=print) -> dict:
    """Trains this shard's unfinished runs, ``workers`` at a time. ``should_stop()`` (optional)
    is polled like the time limit; ``post(run, run_dir)`` (optional) returns a small dict kept
    in the run's result file as "extras" (e.g. numbers computed from its checkpoint). Returns
    {"done": [...], "stopped": [...], "failed": [...], "skipped": [...], "waiting": [...]} (names;
    "stopped": checkpointed or not started; "waiting": the run it starts from is not finished here,
    see :class:`Run`). Raises on a repeated name or an unknown ``init_from_run``."""
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError("run names must be unique within a sweep")
    for r in runs:
        if r.init_from_run is not None and r.init_from_run not in names:
            raise ValueError(f"Run {r.name!r}: init_from_run {r.init_from_run!r} is not a run of this sweep")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    i, n = shard
    mine = [r for pos, r in enumerate(runs) if pos % n == i]
    todo = [r for r in mine if not os.path.isfile(result_path(results_dir, r))]
    status = {"done": [], "stopped": [], "failed": [], "skipped": [r.name for r in mine if r not in todo],
              "waiting": []}
    log(f"sweep: {len(runs)} runs, shard {i}/{n}: {len(mine)}; {len(status['skipped'])} finished before, "
        f"{len(todo)} to train, {workers} at a time")
    stop = {"reason": None}

    def request(reason):
        if stop["reason"] is None:
            log(f"sweep: {reason}: the running trainings checkpoint and stop")
            stop["reason"] = reason

    old = {}
    if sys.platform != "win32" and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, lambda s, f: request(signal.Signals(s).name))
    start = time.perf_counter()
    running = {}
    queue = list(todo)
    by_name = {r.name: r for r in runs}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))

    def source(run):  # the checkpoint a run starts from, or None
        return os.path.join(work_dir, run.init_from_run, "checkpoint.pt") if run.init_from_run else None

    def ready(run):  # its source run finished here (result file and checkpoint), or it resumes
        if run.init_from_run is None or os.path.isfile(os.path.join(work_dir, run.name, "checkpoint.pt")):
            return True
        return (os.path.isfile(result_path(results_dir, by_name[run.init_from_run]))
                and os.path.isfile(source(run)))

    def hopeless(run):  # its source cannot finish here in this call
        dep = run.init_from_run
        if dep is None or dep in running or any(r.name == dep for r in queue):
            return False
        return not ready(run)

    try:
        while queue or running:
            if time_limit is not None and time.perf_counter() - start >= time_limit:
                request(f"time limit of {time_limit:g} s")
            if should_stop is not None and should_stop():
                request("stop requested")
            for run in [r for r in queue if hopeless(r)]:
                queue.remove(run)
                status["waiting"].append(run.name)
                dep = run.init_from_run
                if dep in status["failed"] or dep in status["waiting"]:
                    where = "did not finish in this call"
                elif os.path.isfile(result_path(results_dir, by_name[dep])):
                    where = f"finished elsewhere: no checkpoint in {os.path.join(work_dir, dep)}"
                else:
                    where = "is in another shard and not finished"
                log(f"sweep: {run.name} waits: it starts from {dep}, which {where}; run the sweep "
                    f"again where {dep}'s checkpoint is")
            while len(running) < workers and stop["reason"] is None:
                run = next((r for r in queue if ready(r)), None)
                if run is None:
                    break
                queue.remove(run)
                run_dir = os.path.join(work_dir, run.name)
                os.makedirs(run_dir, exist_ok=True)
                logf = open(os.path.join(run_dir, "train.log"), "a")
                resumed = os.path.isfile(os.path.join(run_dir, "checkpoint.pt"))
                logf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} sweep: "
                           f"{'resume' if resumed else 'start'} {run.name}\n")
                logf.flush()
                config = dict(run.config, init_from=source(run)) if run.init_from_run else run.config
                cmd = [sys.executable, os.path.abspath(__file__), "--_run", json.dumps(config),
                       run_dir, str(threads)]
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                        start_new_session=True,  # our signals reach it through us
                                        preexec_fn=die_with_parent if sys.platform == "linux" else None)
                running[run.name] = (run, proc, logf, run_dir)
                log(f"sweep: {'resumed' if resumed else 'started'} {run.name}")
            if stop["reason"] is not None:
                status["stopped"] += [r.name for r in queue]
                queue.clear()
                for _, proc, _, _ in running.values():
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
            for name in list(running):
                run, proc, logf, run_dir = running[name]
                rc = proc.poll()
                if rc is None:
                    continue
                logf.close()
                del running[name]
                if rc == 0:
                    _write_result(results_dir, run, run_dir, post)
                    status["done"].append(name)
                    log(f"sweep: finished {name}")
                elif rc in (130, -signal.SIGTERM) and stop["reason"] is not None:
                    status["stopped"].append(name)
                else:
                    status["failed"].append(name)
                    log(f"sweep: {name} failed (exit status {rc}); see {os.path.join(run_dir, 'train.log')}")
            time.sleep(poll)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for _, proc, logf, _ in running.values():  # an exception here: leave no training behind
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
            logf.close()
    return status


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--_run":
    sys.exit(_child(sys.argv[2], sys.argv[3], int(sys.argv[4])))
