"""Where a trainer step's time goes, eager and compiled (torch.profiler, CPU).

    python benchmarks/profile_train.py [--k 5] [--batch-size 100] [--steps 50]

Runs the trainer's own loop (as benchmarks/bench_train.py does) under torch.profiler and splits
each step's CPU time into the matrix products (aten::mm / addmm / bmm: no compiler removes them),
the optimizer (fused Adam), the keyed random numbers, and the rest (element-wise passes, autograd,
Python). ``floor`` is the step time if everything but the matrix products and the optimizer
took no time at all: the most any compilation of the rest could give is eager / floor. JSON to
benchmarks/results/train-profile-k<k>-b<batch>-<cpu>.json.
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
    for name in ("eager", "compiled"):
        f = res[name]["fractions"]
        print(f"{name:9s} {res[name]['profiled_step_s'] * 1e3:7.3f} ms/step (profiled): "
              + ", ".join(f"{g} {v:.0%}" for g, v in f.items()))
    print(f"floor (matrix products + optimizer of the eager step) {floor * 1e3:.3f} ms: no compilation "
          f"of the rest can exceed x{res['max_speedup_of_any_compilation']:.2f}")
    print("saved", save({"benchmark": "train_profile", "device": device_name("cpu"), "results": [res]}, "cpu",
                        f"train-profile-k{args.k}-b{args.batch_size}", args.out))


if __name__ == "__main__":
    main()
