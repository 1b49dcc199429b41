"""Trainer step time: iwae_ext against pure-PyTorch twins of the same training step.

    python benchmarks/bench_train.py [--device cpu|cuda] [--k 5] [--estimator standard] [--rounds 7]

Three variants of one Adam step of IWAE (784-200-200-50, tanh, batch 100, bundled binarized
MNIST), all in this process, on the same minibatches:
  iwae_ext   the trainer's step: iwae_ext.objectives.objective with the fused logmeanexp;
  twin       the same step with the pure-PyTorch twin of logmeanexp (TrainConfig(fused=False));
  plain      an IWAE step as plain PyTorch code writes it (torch.distributions.Normal,
             binary_cross_entropy_with_logits, torch.logsumexp), same architecture and init.
Checks the three give the same loss and gradients first, then times rounds of ``--steps``
steps of each, interleaved; reports the median step time, the time per epoch (500 steps)
and the ratios (on CUDA each block ends with a synchronisation). JSON to
benchmarks/results/train-<device>.json.
"""
import argparse
import copy
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, save, synchronize  # noqa: E402

import iwae_ext  # noqa: E402
from iwae_ext.data import load_dataset  # noqa: E402
from iwae_ext.models import VAE  # noqa: E402
from iwae_ext.objectives import objective  # noqa: E402


def plain_iwae_loss(model, x, k):
    """IWAE loss the way a plain PyTorch implementation writes it."""
    enc = model.encoders[0]
    loc, logvar = enc(x)
    q = torch.distributions.Normal(loc, torch.exp(0.5 * logvar))
    z = q.rsample((k,))
    log_q = q.log_prob(z).sum(-1)
    log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    logits = model.decoder(z)
    log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand(k, *x.shape), reduction="none").sum(-1)
    log_w = log_prior + log_lik - log_q
    return -(torch.logsumexp(log_w, 0) - math.log(k)).mean()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--estimator", default="standard")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--steps", type=int, default=50, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=7, help="timed blocks per variant")
    p.add_argument("--out")
    args = p.parse_args()
    device = args.device
    torch.manual_seed(0)
    data = load_dataset()
    x_train = data.split("train").to(device)
    base = VAE(x_mean=data.mean()).to(device)
    steps_per_epoch = math.ceil(x_train.shape[0] / args.batch_size)

    def loss_fn(name):
        if name == "plain":
            return lambda m, x: plain_iwae_loss(m, x, args.k)
        fused = name == "iwae_ext"
        return lambda m, x: -objective(m, x, args.k, "iwae", args.estimator, fused=fused).mean()

    variants = ["iwae_ext", "twin"] + (["plain"] if args.estimator == "standard" else [])
    # Agreement: same noise, same loss and gradients.
    xb = x_train[: args.batch_size]
    ref_grads = None
    for name in variants:
        m = copy.deepcopy(base)
        torch.manual_seed(1)
        loss = loss_fn(name)(m, xb)
        grads = torch.autograd.grad(loss, list(m.parameters()))
        if ref_grads is None:
            ref_loss, ref_grads = loss, grads
        else:
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
            for g, r in zip(grads, ref_grads):
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)

    state = {}
    for name in variants:
        m = copy.deepcopy(base)
        state[name] = (m, torch.optim.Adam(m.parameters(), lr=1e-3, eps=1e-4), loss_fn(name))
    perm = torch.randperm(x_train.shape[0]).to(device)
    times = {name: [] for name in variants}
    cursor = 0
    for r in range(args.rounds + 1):  # round 0 is warm-up
        for name in variants:
            m, opt, fn = state[name]
            synchronize(device)
            t0 = time.perf_counter()
            for s in range(args.steps):
                idx = perm[((cursor + s) * args.batch_size) % x_train.shape[0]:][: args.batch_size]
                loss = fn(m, x_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            synchronize(device)
            if r:
                times[name].append((time.perf_counter() - t0) / args.steps)
        cursor += args.steps
    result = {"k": args.k, "estimator": args.estimator, "batch_size": args.batch_size,
              "steps_per_epoch": steps_per_epoch, "rounds": args.rounds, "steps_per_round": args.steps}
    for name in variants:
        med = statistics.median(times[name])
        q = statistics.quantiles(times[name], n=4)
        result[f"{name}_step_s"] = med
        result[f"{name}_step_iqr_s"] = [q[0], q[2]]
        result[f"{name}_epoch_s"] = med * steps_per_epoch
    for name in variants[1:]:
        result[f"speedup_vs_{name}"] = result[f"{name}_step_s"] / result["iwae_ext_step_s"]
        # per-round ratios (the rounds interleave the variants, so each pairs like with like)
        ratios = [a / b for a, b in zip(times[name], times["iwae_ext"])]
        result[f"speedup_vs_{name}_per_round"] = ratios
    for name in variants:
        print(f"{name:9s} {result[f'{name}_step_s'] * 1e3:7.2f} ms/step  {result[f'{name}_epoch_s']:6.2f} s/epoch")
    for name in variants[1:]:
        r = result[f"speedup_vs_{name}_per_round"]
        print(f"iwae_ext vs {name}: x{result[f'speedup_vs_{name}']:.3f} (per-round ratios "
              f"{min(r):.3f}..{max(r):.3f}, median {statistics.median(r):.3f})")
    payload = {"benchmark": "train_step", "device": device_name(device), "build": iwae_ext.build_info(),
               "results": [result]}
    print("saved", save(payload, device, "train", args.out))


if __name__ == "__main__":
    main()
