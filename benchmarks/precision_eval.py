"""What lower precision does to the estimates of a trained model, image by image.

    python benchmarks/precision_eval.py CHECKPOINT [--images 200] [--ais-temps 1000] [--lk-images 1000]

1. AIS with bfloat16 interior gradients against AIS in float32 (``gradient_precision`` "bf16" and
   "full"), on the same test images with the same keyed random numbers: the paired difference
   with its standard error over images, each run's acceptance rate and its time. Both are the
   same estimator (energies, weights and the trajectories' ends stay float32), so the difference
   should be zero within its standard error.
2. L_5000 if the evaluation itself ran in bfloat16, which the package does not do: (a) the
   weights rounded to bfloat16 and everything else in float32 (another model), (b) the whole
   computation under bfloat16 autocast (the weights and every matrix product's inputs rounded).
   Paired against float32 L_5000 on the same images and draws.

Writes benchmarks/results/precision-eval-<device>.json.
"""
import argparse
import copy
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import save  # noqa: E402

from iwae_ext import evaluate  # noqa: E402
from iwae_ext.data import load_dataset  # noqa: E402
from iwae_ext.trainer.checkpoint import load_checkpoint  # noqa: E402


def paired(a, b):
    """mean of b - a and its standard error over images."""
    d = (b - a).double()
    return {"mean": float(d.mean()), "stderr": float(d.std() / math.sqrt(d.numel())),
            "max_abs": float(d.abs().max())}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--images", type=int, default=200, help="test images for the AIS comparison (default 200)")
    p.add_argument("--ais-temps", type=int, default=1000)
    p.add_argument("--ais-chains", type=int, default=16)
    p.add_argument("--lk-images", type=int, default=1000, help="test images for the L_5000 comparison")
    p.add_argument("--k", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = load_checkpoint(a.checkpoint)
    model = (model[0] if isinstance(model, tuple) else model).eval()
    test = load_dataset("binarized_mnist").split("test")
    g = torch.Generator().manual_seed(a.seed)
    index = torch.randperm(test.shape[0], generator=g)
    out = {"benchmark": "precision_eval", "checkpoint": os.path.basename(os.path.dirname(os.path.abspath(a.checkpoint))),
           "threads": a.threads}

    # 1. AIS, bf16 interior gradients against float32
    idx = index[:a.images]
    x = test[idx]
    runs = {}
    for prec in ("full", "bf16"):
        t0 = time.perf_counter()
        r = evaluate.ais_log_likelihood(model, x, num_chains=a.ais_chains, num_temps=a.ais_temps, num_leapfrog=10,
                                        seed=a.seed, index=idx, return_details=True, gradient_precision=prec)
        runs[prec] = (r, time.perf_counter() - t0)
        print(prec, r.gradient_precision, f"{runs[prec][1]:.1f} s", float(r.log_likelihood.mean()),
              float(r.acceptance_rate.mean()), flush=True)
    full, bf16 = runs["full"][0], runs["bf16"][0]
    out["ais"] = {"images": a.images, "chains": a.ais_chains, "temps": a.ais_temps, "leapfrog": 10,
                  "float32": float(full.log_likelihood.mean()), "bf16": float(bf16.log_likelihood.mean()),
                  "bf16_minus_float32": paired(full.log_likelihood, bf16.log_likelihood),
                  "per_image_stderr_mean": float(full.stderr.mean()),
                  "acceptance_float32": float(full.acceptance_rate.mean()),
                  "acceptance_bf16": float(bf16.acceptance_rate.mean()),
                  "seconds_float32": runs["full"][1], "seconds_bf16": runs["bf16"][1],
                  "speedup": runs["full"][1] / runs["bf16"][1]}

    # 2. L_5000 evaluated in bfloat16 (what the package does not do)
    idx = index[:a.lk_images]
    x = test[idx]
    kw = dict(k=a.k, seed=a.seed + 1, index=idx)
    ref = evaluate.bounds(model, x, **kw).log_likelihood
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for prm in rounded.parameters():
            prm.copy_(prm.to(torch.bfloat16).float())
    lk_rounded = evaluate.bounds(rounded, x, **kw).log_likelihood
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lk_autocast = evaluate.bounds(model, x, **kw).log_likelihood
    out["l5000"] = {"images": a.lk_images, "k": a.k, "float32": float(ref.mean()),
                    "weights_rounded_to_bf16": paired(ref, lk_rounded),
                    "bf16_autocast": paired(ref, lk_autocast)}
    print(out, flush=True)
    print("saved", save(out, "cpu", "precision-eval", a.out))


if __name__ == "__main__":
    main()
