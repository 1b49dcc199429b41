"""Where a trainer step's time goes, eager and compiled (torch.profiler, CPU).

    python benchmarks/profile_train.py [--k 5] [--batch-size 100] [--steps 50]

Runs the trainer's own loop (as benchmarks/bench_train.py does) under torch.profiler and splits
each step's CPU time into the matrix products (aten::mm / addmm / bmm: no compiler removes them),
the optimizer (fused Adam), the keyed random numbers, and the rest (element-wise passes, autograd,
Python); the compiled step's matrix products run inside its C++ wrapper, so they are timed alone
too: the matrix products of one step (forward and backward, the default architecture's shapes)
and the Bernoulli likelihood's forward and backward over the step's logits, eager and compiled
(one fused kernel each way). JSON to benchmarks/results/train-profile-k<k>-b<batch>-<cpu>.json.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import trainer_block  # noqa: E402
from common import device_name, save  # noqa: E402

from iwae_ext.data import load_dataset  # noqa: E402

GROUPS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm"), "optimizer": ("aten::_fused_adam_",),
          "keyed_random": ("iwae_ext::keyed_random",)}


def profile(block, steps):
    block(steps)  # warm-up (and compilation)
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        block(steps)
    wall = (time.perf_counter() - t0) / steps
    self_us = {}
    for e in prof.key_averages():
        self_us[e.key] = self_us.get(e.key, 0.0) + e.self_cpu_time_total
    total = sum(self_us.values())
    out = {g: sum(self_us.get(k, 0.0) for k in keys) / total for g, keys in GROUPS.items()}
    out["rest"] = 1 - sum(out.values())
    return {"profiled_step_s": wall, "fractions": out}


def parts(k: int, b: int, reps: int = 30) -> dict:
    """Seconds of the step's matrix products alone and of the likelihood's passes (medians of 5)."""
    import statistics

    import torch.nn.functional as F
    rows = k * b
    shapes = [(b, 784, 200), (b, 200, 200), (b, 200, 50), (b, 200, 50),  # encoder (loc, logvar)
              (rows, 50, 200), (rows, 200, 200), (rows, 200, 784)]  # decoder
    mats = [(torch.randn(m, i), torch.randn(o, i), torch.randn(m, o), i != 784) for m, i, o in shapes]

    def matmuls():
        for a, w, g, grad_input in mats:
            a @ w.t()  # forward
            g.t() @ a  # weight gradient
            if grad_input:
                g @ w

    logits = torch.randn(k, b, 784, requires_grad=True)
    x = (torch.rand(b, 784) < 0.3).float()

    def ll(l):
        return ((x * l).sum(-1) - F.softplus(l).sum(-1)).sum()

    compiled = torch.compile(ll)

    def timed(fn):
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    out = {"matmuls": [], "likelihood_eager": [], "likelihood_compiled": []}
    from iwae_ext.trainer.loop import subnormals_as_zero
    with subnormals_as_zero():
        for _ in range(5):
            out["matmuls"].append(timed(matmuls))
            out["likelihood_eager"].append(timed(lambda: ll(logits).backward()))
            out["likelihood_compiled"].append(timed(lambda: compiled(logits).backward()))
    return {name: statistics.median(v) for name, v in out.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--estimator", default="standard")
    p.add_argument("--out")
    args = p.parse_args()
    dataset = load_dataset()
    device = torch.device("cpu")
    res = {"k": args.k, "batch_size": args.batch_size}
    for name, compiled in (("eager", False), ("compiled", True)):
        res[name] = profile(trainer_block(args, dataset, device, compiled), args.steps)
    e = res["eager"]
    floor = e["profiled_step_s"] * (e["fractions"]["matmul"] + e["fractions"]["optimizer"])
    res["floor_step_s"] = floor
    res["max_speedup_of_any_compilation"] = e["profiled_step_s"] / floor
    res["alone_s"] = parts(args.k, args.batch_size)
    for name in ("eager", "compiled"):
        f = res[name]["fractions"]
        print(f"{name:9s} {res[name]['profiled_step_s'] * 1e3:7.3f} ms/step (profiled): "
              + ", ".join(f"{g} {v:.0%}" for g, v in f.items()))
    print(f"floor (matrix products + optimizer of the eager step) {floor * 1e3:.3f} ms: no compilation "
          f"of the rest can exceed x{res['max_speedup_of_any_compilation']:.2f}")
    print("timed alone: " + ", ".join(f"{n} {v * 1e3:.3f} ms" for n, v in res["alone_s"].items()))
    print("saved", save({"benchmark": "train_profile", "device": device_name("cpu"), "results": [res]}, "cpu",
                        f"train-profile-k{args.k}-b{args.batch_size}", args.out))


if __name__ == "__main__":
    main()
