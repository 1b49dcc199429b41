"""Evaluation on real protocols: the cost of per-image random streams, and AIS throughput.

1. Keyed streams: L_k (k samples of 100 test images, the evaluation's batch) and an
   AIS run (16 chains per image, the evaluation's layout) with the per-image keyed normals of
   iwae_ext.keyed against the same code drawing from torch's generator, interleaved in one
   process; the median of the per-round ratios is the cost.
2. AIS throughput with Wu et al. (2017)'s settings (16 chains per image from q(z|x), 10
   leapfrog steps, sigmoid schedule, batches of 100 images = 1,600 chains) on the default
   784-200-200-50 model: seconds per temperature measured over --temps temperatures, turned into
   images per minute at 10,000 and 1,000 temperatures and the wall time of the 10,000-image
   test set with 1 process (all threads), 2 processes (one thread each, run at the same time)
   and N processes (a projection: N times the one-thread rate, for N cores or GPUs that each run
   one process as fast as one core here).

    python benchmarks/bench_eval.py [--device cpu] [--rounds 7] [--temps 10]
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, measure_interleaved, median, save, synchronize  # noqa: E402

import iwae_ext  # noqa: E402
from iwae_ext import evaluate, samplers  # noqa: E402
from iwae_ext.data import load_dataset  # noqa: E402
from iwae_ext.keyed import KeyedNoise  # noqa: E402
from iwae_ext.models import VAE  # noqa: E402
import iwae_ext.models.bayes as _bayes  # noqa: E402
import iwae_ext.models.vae as _vae  # noqa: E402

CHAINS = 16
IMAGES = 100
PILOT = evaluate.default_pilot_chains(CHAINS)  # the evaluation's pilot chains per image


def model_and_data(device, images=IMAGES):
    torch.manual_seed(0)
    ds = load_dataset("binarized_mnist")
    model = VAE(x_mean=ds.mean("train")).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, ds.split("test")[:images].to(device)


class _Unkeyed:
    """The package's samplers drawing from torch's generator (what they did before the keyed
    streams): the baseline of the cost."""

    def __enter__(self):
        self.saved = _vae.standard_normal, _bayes.standard_normal
        plain = lambda shape, dtype, device: torch.randn(shape, dtype=dtype, device=device)  # noqa: E731
        _vae.standard_normal = _bayes.standard_normal = plain

    def __exit__(self, *exc):
        _vae.standard_normal, _bayes.standard_normal = self.saved


def keyed_cost(args, device):
    model, x = model_and_data(device)
    betas = samplers.sigmoid_schedule(args.temps)

    def lk_keyed():
        evaluate.bounds(model, x, args.k, IMAGES, seed=1)

    def lk_plain():
        with _Unkeyed():
            evaluate.bounds(model, x, args.k, IMAGES, seed=1)

    noise = KeyedNoise(1, torch.arange(IMAGES), device)
    gen = torch.Generator(device=device).manual_seed(1)

    def ais_with(g):
        def run():
            dens = samplers.model_ais_densities(model, x, CHAINS, "posterior", True, g, PILOT)
            samplers.ais(None, None, dens.z0, betas, 10, 0.05, grad_fn=dens.grad_fn, generator=g,
                         pilot_chains=PILOT, num_groups=IMAGES)
        return run

    out = {}
    for name, fns in (("L_k", {"keyed": lk_keyed, "torch": lk_plain}),
                      ("ais", {"keyed": ais_with(noise), "torch": ais_with(gen)})):
        times = measure_interleaved(fns, device, rounds=args.rounds, block_seconds=0.0)
        ratios = [k / t for k, t in zip(times["keyed"], times["torch"])]
        out[name] = {"keyed_s": median(times["keyed"]), "torch_s": median(times["torch"]),
                     "keyed_over_torch": median(ratios), "range": [min(ratios), max(ratios)]}
        print(json.dumps({name: out[name]}), flush=True)
    out["settings"] = {"images": IMAGES, "k": args.k, "ais_chains_per_image": CHAINS, "ais_temps": args.temps,
                       "leapfrog": 10}
    return out


def seconds_per_temperature(device, temps, rounds):
    """Median seconds per temperature of AIS on 100 images x 16 chains, Wu et al.'s settings."""
    model, x = model_and_data(device)
    noise = KeyedNoise(0, torch.arange(IMAGES), device)
    per = []
    for _ in range(rounds):
        dens = samplers.model_ais_densities(model, x, CHAINS, "posterior", True, noise, PILOT)
        synchronize(device)
        t0 = time.perf_counter()
        samplers.ais(None, None, dens.z0, samplers.sigmoid_schedule(temps + 1), 10, 0.05, grad_fn=dens.grad_fn,
                     generator=noise, pilot_chains=PILOT)
        synchronize(device)
        per.append((time.perf_counter() - t0) / temps)
    return median(per)


def throughput(args, device):
    rate = {}
    one = seconds_per_temperature(device, args.temps, args.rounds)
    rate["1 process"] = {"threads": torch.get_num_threads(), "s_per_temperature": one}
    if device == "cpu" and not args.no_processes:
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", str(args.temps), str(args.rounds)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
        each = [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        rate["2 processes"] = {"threads": 1, "s_per_temperature_each": each,
                               "s_per_temperature": 1 / sum(1 / s for s in each)}
    rows = {}
    for temps in (10000, 1000):
        row = {}
        for name, r in rate.items():
            per_image_s = r["s_per_temperature"] * (temps - 1) / IMAGES
            row[name] = {"images_per_minute": 60 / per_image_s, "test_set_hours": 10000 * per_image_s / 3600}
        if "2 processes" in rate:
            per_core = rate["2 processes"]["s_per_temperature_each"][0] * (temps - 1) / IMAGES
            row["N processes (projection)"] = {"test_set_hours_times_N": 10000 * per_core / 3600}
        rows[str(temps)] = row
        print(json.dumps({f"T={temps}": row}), flush=True)
    return {"rates": rate, "by_temperatures": rows,
            "settings": {"images_per_batch": IMAGES, "chains_per_image": CHAINS, "leapfrog": 10,
                         "schedule": "sigmoid", "measured_temps": args.temps, "model": "784-200-200-50 tanh"}}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--temps", type=int, default=10, help="temperatures per measured AIS run")
    p.add_argument("--k", type=int, default=1000, help="samples per image in the L_k cost rounds")
    p.add_argument("--no-processes", action="store_true", help="skip the 2-process measurement")
    p.add_argument("--out")
    p.add_argument("--_child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(seconds_per_temperature("cpu", args._child[0], args._child[1]))
        return
    payload = {"keyed_cost": keyed_cost(args, args.device), "ais_throughput": throughput(args, args.device),
               "build": {k: v for k, v in iwae_ext.build_info().items() if k != "ops"}}
    path = save(payload, args.device, "eval", args.out)
    print(f"device: {device_name(args.device)}; written {path}")


if __name__ == "__main__":
    main()
