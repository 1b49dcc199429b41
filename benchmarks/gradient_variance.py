"""Variance of the encoder gradient under the standard, STL and DReG estimators of the IWAE bound.

    python benchmarks/gradient_variance.py RUN_DIR [--k 50] [--reps 200] [--batch 20]

For a trained model (a run directory or checkpoint) and a fixed minibatch of training images,
draws ``--reps`` independent gradients of the IWAE bound with respect to every encoder
parameter under each estimator, and reports the total variance (sum over parameters of the
per-coordinate variance), the ratio to the standard estimator, the mean |E g| / std(g) (signal
to noise), and the largest z-score between each estimator's mean and the standard one's
(they estimate the same gradient). JSON to benchmarks/results/gradient-variance-k<k>.json.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS  # noqa: E402

from iwae_ext import load_checkpoint  # noqa: E402
from iwae_ext.data import load_dataset  # noqa: E402
from iwae_ext.objectives import objective  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    args = p.parse_args()
    model, ckpt = load_checkpoint(args.run, with_state=True)
    model.train()
    data = load_dataset(ckpt["config"]["dataset"], ckpt["config"].get("data_dir"))
    gen = torch.Generator().manual_seed(args.seed)
    x_all = data.split("train")
    x = data.batch("train", torch.randperm(x_all.shape[0], generator=gen)[: args.batch], gen)
    params = list(model.encoders.parameters())
    grads = {}
    for est in ("standard", "stl", "dreg"):
        torch.manual_seed(args.seed + 1)
        rows = []
        for _ in range(args.reps):
            value = objective(model, x, args.k, "iwae", est).mean()
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]).double())
        grads[est] = torch.stack(rows)
    std = grads["standard"]
    result = {"run": args.run, "k": args.k, "reps": args.reps, "batch": args.batch,
              "encoder_parameters": int(std.shape[1]), "estimators": {}}
    for est, g in grads.items():
        var = g.var(0)
        se = (var / args.reps + std.var(0) / args.reps).sqrt().clamp_min(1e-30)
        result["estimators"][est] = {
            "total_variance": float(var.sum()),
            "variance_ratio_to_standard": float(var.sum() / std.var(0).sum()),
            "mean_snr": float((g.mean(0).abs() / var.sqrt().clamp_min(1e-30)).mean()),
            "max_abs_z_vs_standard_mean": float(((g.mean(0) - std.mean(0)).abs() / se).max()),
        }
        r = result["estimators"][est]
        print(f"{est:8s} total variance {r['total_variance']:.4g}  ratio {r['variance_ratio_to_standard']:.3f}  "
              f"mean SNR {r['mean_snr']:.3f}  max |z| vs standard {r['max_abs_z_vs_standard_mean']:.2f}")
    path = args.out or os.path.join(RESULTS, f"gradient-variance-k{args.k}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print("saved", path)


if __name__ == "__main__":
    main()
