"""The sign of AIS's error: a stochastic lower bound must not sit above log p(x) on average.

    python benchmarks/ais_bias.py [--images 12] [--seeds 6] [--temps 1000] [--leapfrog 10]

A 2-D-latent IWAE (784-128-128-2, tanh, k = 5) is trained for --epochs epochs on the bundled
binarized MNIST; on --images test images log p(x) is integrated on a dense grid ([-8, 8]^2, 801^2
points, checked against [-6, 6]^2 at 401^2). AIS (16 chains, sigmoid schedule, q(z|x) start,
Wu et al.'s settings but for T) runs --seeds times per image with two step-size kernels:
  pilot      the evaluation's: one pilot chain per 16 adapts the step sizes every reported chain
             of its image takes (the reported chains' kernels fixed by the pilot's numbers);
  per_chain  every chain adapting on its own history (Wu et al.'s kernel).
Per image: the mean over seeds of (AIS - exact) and its standard error over seeds; the mean
over images with its standard error. An unbiased estimator of p(x) gives log-estimates below
log p(x) on average (Jensen). JSON: benchmarks/results/ais-bias-<cpu>.json.
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import save  # noqa: E402

from iwae_ext import evaluate, samplers  # noqa: E402
from iwae_ext.data import load_dataset  # noqa: E402
from iwae_ext.keyed import KeyedNoise  # noqa: E402
from iwae_ext.models import VAE  # noqa: E402
from iwae_ext.objectives import objective  # noqa: E402

CHAINS = 16


def train(epochs, seed=0):
    torch.manual_seed(seed)
    ds = load_dataset("binarized_mnist")
    x = ds.split("train")
    model = VAE(x_dim=784, latent_dims=(2,), hidden=(128, 128), x_mean=ds.mean("train"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0]).split(100):
            xb = torch.bernoulli(x[idx])
            loss = -objective(model, xb, 5).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), ds.split("test")


def grid(model, x, half_width, n):
    t = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    zz = torch.cartesian_prod(t, t)
    log_dz = 2 * math.log(float(t[1] - t[0]))
    m = model.double()
    out = [torch.logsumexp(m.log_joint(xi.double().unsqueeze(0), zz.unsqueeze(1))[:, 0], 0) + log_dz for xi in x]
    model.float()
    return torch.stack(out)


def per_chain(model, x, seeds, temps, leapfrog, seed):
    """Every chain adapting on its own history; copy r of image i keyed (seed, r * n + i)."""
    n = x.shape[0]
    xr = x.repeat(seeds, 1)
    noise = KeyedNoise(seed, torch.arange(n * seeds))
    dens = samplers.model_ais_densities(model, xr, CHAINS, "posterior", True, noise)
    res = samplers.ais(None, None, dens.z0, samplers.sigmoid_schedule(temps), leapfrog, 0.05,
                       adapt_step_size=True, grad_fn=dens.grad_fn, generator=noise)
    return res.log_normalizer(n * seeds).view(seeds, n)


def pilot(model, x, seeds, temps, leapfrog, seed):
    n = x.shape[0]
    return evaluate.ais_log_likelihood(model, x.repeat(seeds, 1), CHAINS, temps, leapfrog, seed=seed,
                                       index=torch.arange(n * seeds), batch_size=n * seeds).view(seeds, n)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--temps", type=int, default=1000)
    p.add_argument("--leapfrog", type=int, default=10)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args()
    t0 = time.perf_counter()
    model, test = train(args.epochs)
    x = test[:args.images]
    exact = grid(model, x, 8.0, 801)
    coarse = grid(model, x, 6.0, 401)
    rows = {"grid_agreement": float((exact - coarse).abs().max())}
    for name, fn in (("pilot", pilot), ("per_chain", per_chain)):
        t1 = time.perf_counter()
        err = fn(model, x, args.seeds, args.temps, args.leapfrog, 7).double() - exact
        mean, se = err.mean(0), err.std(0) / math.sqrt(args.seeds)
        rows[name] = {"mean_error_per_image": mean.tolist(), "stderr_per_image": se.tolist(),
                      "mean_error": float(mean.mean()), "stderr": float(se.square().sum().sqrt() / mean.numel()),
                      "images_above_by_2se": int((mean > 2 * se).sum()), "seconds": time.perf_counter() - t1}
        print(name, f"mean {rows[name]['mean_error']:+.4f} (se {rows[name]['stderr']:.4f});",
              " ".join(f"{v:+.3f}" for v in mean.tolist()), flush=True)
    payload = {"benchmark": "ais_bias", "model": "784-128-128-2 tanh IWAE k=5", "epochs": args.epochs,
               "images": args.images, "seeds": args.seeds, "chains": CHAINS, "temps": args.temps,
               "leapfrog": args.leapfrog, "schedule": "sigmoid", "threads": torch.get_num_threads(),
               "results": rows, "wall_seconds": time.perf_counter() - t0}
    print("saved", save(payload, "cpu", "ais-bias", args.out))


if __name__ == "__main__":
    main()
