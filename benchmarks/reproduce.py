"""Reproduce a paper's table with its full protocol, resumably, in runs as short as you like.

    python benchmarks/reproduce.py iwaer-table1 --out DIR [--device cuda] [--time-limit 540] [--resume]
    python benchmarks/reproduce.py iwaer-table1 --out DIR --device cpu --epochs 2 --limit 200 --eval-k 20  # smoke
    python benchmarks/reproduce.py paper003 EXPERIMENT [--workers N] [--shard i/n]  # benchmarks/paper003.py

iwaer-table1 (Hernandez-Lobato et al., IWAE with random network parameters, Table 1): IWAE, IWAER_rec
and IWAER, 784-400-20 tanh, k = 25, batch 100, Adam (eps 1e-4) at lr 1e-3, 500 epochs on the
binarized MNIST, test log-likelihood by importance sampling with S = 2,000 samples (drawn
jointly with the random weights) on all 10,000 test images.

The models train at the same time, one `python -m iwae_ext.cli.train` process each (so they share
the GPU), into DIR/<model>/ with its train.log. Before training the script times a few steps of
each model and one evaluation batch on the device and prints the expected total time. While they
run it prints each model's epochs and an estimate of the time left from their progress.

Stopping: at --time-limit seconds, on SIGTERM or on Ctrl-C, every run writes a checkpoint at its
next step and exits; `--resume` continues all of them exactly from their checkpoints (a run with
no checkpoint yet starts afresh, a finished one is kept), so the work can be split into pieces
shorter than any time limit. When every run has its final metrics the script writes
DIR/table.md and DIR/table.json beside the paper's numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep import die_with_parent  # noqa: E402  (the same guard for both runners)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PAPERS = {
    "iwaer-table1": {
        "title": "Hernandez-Lobato, Bui, Li, Hernandez-Lobato, Turner: Importance Weighted Autoencoders "
                 "with Random Neural Network Parameters, Table 1 (MNIST, test log-likelihood)",
        "models": {"iwae": -95.18, "iwaer_rec": -94.71, "iwaer": -94.35},
        "names": {"iwae": "IWAE", "iwaer_rec": "IWAER_rec", "iwaer": "IWAER"},
        "flags": {"hidden": "400", "latent-dim": "20", "activation": "tanh", "k": "25",
                  "batch-size": "100", "lr": "1e-3", "seed": "0", "dataset": "binarized_mnist"},
        "epochs": 500,
        "eval_k": 2000,
        "protocol": "784-400-20 tanh, k = 25, batch 100, Adam (beta 0.9, 0.999, eps 1e-4), lr 1e-3, "
                    "{epochs} epochs, bundled binarized MNIST, seed 0; test L_S with S = {eval_k} samples "
                    "drawn jointly with the random weights on {n_test} test images",
    },
}


class _Stop:
    """Set by SIGINT/SIGTERM; the children are asked to stop with SIGTERM (Ctrl-C in a terminal
    also reaches them directly: they stop at their next step either way)."""

    def __init__(self):
        self.requested = False
        self.reason = ""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.request(signal.Signals(signum).name)

    def request(self, reason):
        if not self.requested:
            print(f"\nreproduce: {reason}: asking every run to checkpoint and stop", flush=True)
        self.requested = True
        self.reason = self.reason or reason


def _read_state(run_dir: str, epochs: int):
    """'done' (final metrics for `epochs` epochs), ('resume', epochs done) or 'new'."""
    metrics = os.path.join(run_dir, "metrics.json")
    if os.path.isfile(metrics):
        try:
            with open(metrics) as f:
                if json.load(f).get("epochs") == epochs:
                    return "done", epochs
        except json.JSONDecodeError:  # cut short while being written: evaluate again
            pass
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    if os.path.isfile(ckpt):
        from iwae_ext.trainer import read_checkpoint
        st = read_checkpoint(ckpt)["train_state"]
        return "resume", st["epoch"] + st["step"] / 1e9  # epochs done (the step fraction is small)
    return "new", 0


def _train_args(spec, model, args, run_dir, resume):
    flags = dict(spec["flags"], model=model, epochs=str(args.epochs), **{"eval-k": str(args.eval_k)},
                 device=args.device, out=run_dir)
    if args.limit:
        flags["subset"] = str(args.limit)
    if args.train_eval_size is not None:
        flags["train-eval-size"] = str(args.train_eval_size)
    cmd = [sys.executable, "-m", "iwae_ext.cli.train", "--no-progress"]
    for key, value in flags.items():
        cmd += [f"--{key}", value]
    return cmd + (["--resume"] if resume else [])


def _config(spec, model, args):
    from iwae_ext.trainer import TrainConfig
    f = spec["flags"]
    return TrainConfig(model=model, hidden=[[int(f["hidden"])]], latent_dim=[int(f["latent-dim"])],
                       activation=f["activation"], k=int(f["k"]), batch_size=int(f["batch-size"]),
                       lr=float(f["lr"]), seed=int(f["seed"]), dataset=f["dataset"], epochs=args.epochs,
                       eval_k=args.eval_k, subset=args.limit, device=args.device)


def estimate(spec, models, args, done_epochs, steps=10, warmup=3):
    """Seconds per training step and per evaluation batch of each model, measured here on the
    device; prints the expected total time and returns {model: (step_s, eval_batch_s)}."""
    from iwae_ext import evaluate
    from iwae_ext.data import load_dataset
    from iwae_ext.objectives import objective
    from iwae_ext.trainer import KINDS, build_model
    from iwae_ext.trainer.loop import _subset

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dataset = load_dataset(spec["flags"]["dataset"])
    if args.limit:
        dataset = _subset(dataset, args.limit, int(spec["flags"]["seed"]))
    x_train = dataset.split("train")
    n_train, n_test = x_train.shape[0], dataset.split("test").shape[0]
    out = {}
    for model_name in models:
        config = _config(spec, model_name, args).resolved(dataset)
        torch.manual_seed(0)
        model = build_model(config, dataset).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr, eps=1e-4)
        x = x_train[:config.batch_size].to(device)
        for i in range(warmup + steps):
            if i == warmup:
                sync()
                t0 = time.perf_counter()
            loss = -objective(model, x, config.k, KINDS[model_name].bound_name).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()
        step_s = (time.perf_counter() - t0) / steps
        xe = dataset.split("test")[:config.eval_batch_size].to(device)
        model.eval()
        evaluate.bounds(model, xe, min(config.eval_k, 50), xe.shape[0], progress=False)  # warm-up
        sync()
        t0 = time.perf_counter()
        evaluate.bounds(model, xe, config.eval_k, xe.shape[0], progress=False)
        sync()
        out[model_name] = (step_s, time.perf_counter() - t0)
    steps_per_epoch = math.ceil(n_train / int(spec["flags"]["batch-size"]))
    train_eval = n_train if args.train_eval_size == 0 else min(n_train, args.train_eval_size or 2000)
    eval_batches = math.ceil(n_test / 100) + math.ceil(train_eval / 100)
    totals = {}
    for m, (step_s, eval_s) in out.items():
        left = (args.epochs - done_epochs[m]) * steps_per_epoch
        totals[m] = left * step_s + eval_batches * eval_s
        print(f"  {m:10s} {step_s * 1e3:7.2f} ms/step x {left:,} steps left + {eval_s:.2f} s x "
              f"{eval_batches} evaluation batches = {_hms(totals[m])} alone", flush=True)
    if totals:
        print(f"expected total: {_hms(max(totals.values()))} if the runs overlap perfectly on the device, "
              f"{_hms(sum(totals.values()))} if they take turns (measured one at a time; the progress "
              f"lines below estimate from the runs' own pace)", flush=True)
    return out


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _epochs_done(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def write_table(spec, models, args):
    rows = []
    for m in models:
        with open(os.path.join(args.out, m, "metrics.json")) as f:
            met = json.load(f)
        paper = spec["models"][m]
        rows.append({"model": spec["names"][m], "test_log_likelihood": met["test_log_likelihood"],
                     "stderr": met["test_log_likelihood_stderr"], "test_elbo": met["test_elbo"],
                     "train_log_likelihood": met["train_log_likelihood"], "n_train_eval": met["n_train_eval"],
                     "paper": paper, "difference": met["test_log_likelihood"] - paper,
                     "active_units": met["active_units"], "epochs": met["epochs"], "eval_k": met["eval_k"],
                     "n_test": met["n_test"], "seconds_per_epoch": met["timings"]["seconds_per_epoch"],
                     "train_seconds": met["timings"]["train_seconds"],
                     "eval_seconds": met["timings"]["eval_seconds"], "device": met["device"]})
    device = args.device
    if device.startswith("cuda") and torch.cuda.is_available():
        device = torch.cuda.get_device_name(torch.device(device))
    protocol = spec["protocol"].format(epochs=args.epochs, eval_k=args.eval_k, n_test=rows[0]["n_test"])
    payload = {"paper": args.paper, "title": spec["title"], "protocol": protocol, "device": device,
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "limit": args.limit, "rows": rows}
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    lines = [f"# {args.paper}: {spec['title']}", "",
             f"Protocol: {protocol}. Device: {device}, torch {torch.__version__}, {payload['date']}.", "",
             f"| model | test L_{args.eval_k} (ours) | +- | test ELBO | train L_{args.eval_k} | paper | ours - paper "
             f"| active units | s/epoch |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['test_log_likelihood']:.2f} | {r['stderr']:.2f} | {r['test_elbo']:.2f} | "
                     f"{r['train_log_likelihood']:.2f} | {r['paper']:.2f} | {r['difference']:+.2f} | "
                     f"{', '.join(map(str, r['active_units']))} | {r['seconds_per_epoch']:.1f} |")
    lines += ["", "+- is the standard error over test images; train L on "
              f"{rows[0]['n_train_eval']} training images. Each run's metrics.json, metrics.jsonl and "
              "train.log are in its directory."]
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["paper003"]:  # the AEVB reproduction's experiments: sweeps (benchmarks/paper003.py)
        import paper003
        return paper003.main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("paper", choices=sorted(PAPERS))
    p.add_argument("--out", required=True, help="directory of the runs and the table")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", action="store_true", help="continue the runs in --out")
    p.add_argument("--epochs", type=int, help="epochs (default: the paper's)")
    p.add_argument("--limit", type=int, default=0, help="M images of each split, a seeded choice (smoke runs)")
    p.add_argument("--eval-k", type=int, dest="eval_k", help="samples of the test L_S (default: the paper's)")
    p.add_argument("--train-eval-size", type=int, dest="train_eval_size",
                   help="training images for the train L_S (default 2000; 0 = all)")
    p.add_argument("--time-limit", type=float, dest="time_limit",
                   help="seconds after which every run checkpoints and stops (resume with --resume)")
    p.add_argument("--estimate-steps", type=int, default=10, dest="estimate_steps",
                   help="training steps timed per model before the runs start (0: skip)")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between progress lines")
    args = p.parse_args(argv)
    spec = PAPERS[args.paper]
    args.epochs = spec["epochs"] if args.epochs is None else args.epochs
    args.eval_k = spec["eval_k"] if args.eval_k is None else args.eval_k
    for name in ("epochs", "eval_k"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit < 0 or (args.time_limit is not None and args.time_limit <= 0):
        p.error("--limit must be >= 0 and --time-limit > 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is visible")
    start = time.perf_counter()
    stop = _Stop()
    models = list(spec["models"])
    states = {m: _read_state(os.path.join(args.out, m), args.epochs) for m in models}
    if not args.resume and any(s != "new" for s, _ in states.values()):
        p.error(f"{args.out} already holds runs of {args.paper}: pass --resume to continue them, "
                f"or choose another --out")
    os.makedirs(args.out, exist_ok=True)
    todo = [m for m in models if states[m][0] != "done"]
    for m in models:
        state, done = states[m]
        print(f"{m:10s} {state}" + (f" (from epoch {done:.0f})" if state == "resume" else ""), flush=True)
    if todo and args.estimate_steps > 0:
        estimate(spec, todo, args, {m: states[m][1] for m in todo}, steps=args.estimate_steps)

    procs = {}
    for m in todo:
        run_dir = os.path.join(args.out, m)
        os.makedirs(run_dir, exist_ok=True)
        log = open(os.path.join(run_dir, "train.log"), "a")
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} reproduce.py {args.paper}: "
                  f"{'resume' if states[m][0] == 'resume' else 'start'}\n")
        log.flush()
        cmd = _train_args(spec, m, args, run_dir, states[m][0] == "resume")
        procs[m] = (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     preexec_fn=die_with_parent if sys.platform == "linux" else None), log)
    t_start, first = time.perf_counter(), {m: _epochs_done(os.path.join(args.out, m)) for m in todo}
    last_print = 0.0
    while any(proc.poll() is None for proc, _ in procs.values()):
        time.sleep(0.2)
        now = time.perf_counter()
        if args.time_limit is not None and now - start >= args.time_limit and not stop.requested:
            stop.request(f"time limit of {args.time_limit:g} s")
        if stop.requested:
            for proc, _ in procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            _wait_all(procs, 120)
            break
        if now - last_print >= args.poll:
            last_print = now
            parts, eta = [], 0.0
            for m in todo:
                done = _epochs_done(os.path.join(args.out, m))
                rate = (done - first[m]) / (now - t_start)
                left = args.epochs - done
                eta = max(eta, left / rate if rate > 0 else math.inf)
                parts.append(f"{m} {done}/{args.epochs}")
            print(f"[{_hms(now - start)}] epochs: " + ", ".join(parts) +
                  (f"; about {_hms(eta)} of training left" if math.isfinite(eta) else ""), flush=True)
    failed = []
    for m, (proc, log) in procs.items():
        rc = proc.wait()
        log.close()
        # 130: the trainer stopped at our request with a checkpoint; -15: SIGTERM came before the
        # trainer started (no checkpoint yet: a resume starts that run afresh)
        if rc != 0 and not (stop.requested and rc in (130, -signal.SIGTERM)):
            failed.append(f"{m} (exit status {rc}; see {os.path.join(args.out, m, 'train.log')})")
    if failed:
        print("reproduce: failed: " + "; ".join(failed), file=sys.stderr)
        return 1
    states = {m: _read_state(os.path.join(args.out, m), args.epochs) for m in models}
    if all(s == "done" for s, _ in states.values()):
        write_table(spec, models, args)
        print(f"reproduce: done in {_hms(time.perf_counter() - start)}; {os.path.join(args.out, 'table.md')}")
        return 0
    resume = [sys.executable, "benchmarks/reproduce.py", args.paper, "--out", args.out, "--resume",
              "--device", args.device, "--epochs", str(args.epochs), "--eval-k", str(args.eval_k)]
    if args.limit:
        resume += ["--limit", str(args.limit)]
    if args.train_eval_size is not None:
        resume += ["--train-eval-size", str(args.train_eval_size)]
    print(f"reproduce: stopped ({stop.reason}) after {_hms(time.perf_counter() - start)}: "
          + ", ".join(f"{m} {_epochs_done(os.path.join(args.out, m))}/{args.epochs} epochs" for m in models)
          + ". Continue with: " + " ".join(resume[1:]), flush=True)
    return 0


def _wait_all(procs, timeout):
    deadline = time.perf_counter() + timeout
    for proc, _ in procs.values():
        try:
            proc.wait(max(0.1, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
