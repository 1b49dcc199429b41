"""iwae_ext against its peers on the peers' own models: evaluation (L_k) and training steps.

    python benchmarks/bench_peers.py [--images 200] [--k 5000] [--rounds 3] [--threads 1,2]
                                     [--train-images 10000] [--epochs 1] [--out FILE]

The same 784-200-200-50 tanh network three ways, on the bundled binarized MNIST
(benchmarks/peers.py): a pythae IWAE with the user's encoder and decoder, a Pyro VAE (model /
guide), and this package's own model. The pythae and Pyro models are first trained with their
own library (``--epochs`` over ``--train-images``, IWAE bound with k = 5), then:

evaluation   L_k of ``--images`` test images (a seeded random choice), per thread count, in
             ``--rounds`` interleaved rounds: ``iwae_ext.evaluate.bounds`` on
             ``adapters.from_pythae(model)`` against pythae's ``get_nll`` (image by image,
             ``--pythae-batch`` samples per call), and on ``adapters.from_pyro(model, guide)``
             against Pyro's ``RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True)``
             called image by image (its bound is of a whole batch's likelihood; validation off,
             its fastest setting). Reported: median seconds, the per-round ratios, and the
             paired per-image difference of the estimates with its standard error;
training     the median step time (ms) of an IWAE step at k = 5, batch 100 and k = 50, batch 20:
             this package's trainer step, the plain PyTorch step of bench_train.py, pythae's
             (forward loss, backward, Adam) and Pyro's (SVI with RenyiELBO(alpha=0, k)),
             interleaved (common.measure_interleaved).

A peer that is not installed is skipped and said so; nothing is installed here. JSON to
benchmarks/results/peers-<device>.json, and the tables on stdout.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402
from common import measure_interleaved, median, save  # noqa: E402

import iwae_ext  # noqa: E402
from iwae_ext import adapters, evaluate  # noqa: E402


def available(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def paired(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    d = ours - theirs
    return {"ours": float(ours.mean()), "theirs": float(theirs.mean()), "difference": float(d.mean()),
            "difference_stderr": float(d.std() / math.sqrt(d.numel()))}


def evaluation(models: dict, x: torch.Tensor, k: int, rounds: int, pythae_batch: int, seed: int) -> dict:
    """{pair: {"ours": [s...], "theirs": [s...], "estimates": ...}} for each peer present."""
    fns, estimates = {}, {}
    if "pythae" in models:
        m = models["pythae"]
        wrapped = adapters.from_pythae(m)
        fns["pythae"] = (lambda: evaluate.bounds(wrapped, x, k, seed=seed).log_likelihood,
                         lambda: torch.tensor([m.get_nll(x[i:i + 1].reshape(1, 1, 28, 28), n_samples=k,
                                                         batch_size=pythae_batch) for i in range(x.shape[0])],
                                              dtype=torch.float64))
    if "pyro" in models:
        vae = models["pyro"]
        wrapped_pyro = adapters.from_pyro(vae.model, vae.guide, modules=[vae])
        fns["pyro"] = (lambda: evaluate.bounds(wrapped_pyro, x, k, seed=seed).log_likelihood,
                       lambda: peers.pyro_renyi(vae, x, k))
    times = {name: {"ours": [], "theirs": []} for name in fns}
    for r in range(rounds):
        for name, (ours, theirs) in fns.items():
            order = [("ours", ours), ("theirs", theirs)] if r % 2 == 0 else [("theirs", theirs), ("ours", ours)]
            for who, fn in order:
                t0 = time.perf_counter()
                with torch.no_grad():
                    value = fn()
                times[name][who].append(time.perf_counter() - t0)
                if r == 0:
                    estimates.setdefault(name, {})[who] = value
    out = {}
    for name in fns:
        t = times[name]
        ratios = [b / a for a, b in zip(t["ours"], t["theirs"])]
        out[name] = {"ours_seconds": t["ours"], "theirs_seconds": t["theirs"],
                     "ours_median": median(t["ours"]), "theirs_median": median(t["theirs"]),
                     "speedup_rounds": ratios, "speedup": median(ratios),
                     "estimates": paired(estimates[name]["ours"], estimates[name]["theirs"])}
    return out


def training(dataset, steps: int, rounds: int, settings) -> dict:
    """{f"k{k}-b{b}": {variant: median ms}} for the trainer, plain PyTorch, pythae and Pyro."""
    from bench_train import plain_block, trainer_block
    x_train = dataset.split("train")
    out = {}
    for k, b in settings:
        args = argparse.Namespace(k=k, batch_size=b, estimator="standard", steps=steps, model="iwae")
        device = torch.device("cpu")
        ours, plain = trainer_block(args, dataset, device, compile=False), plain_block(args, dataset, device)
        fns = {"iwae_ext": lambda o=ours: o(steps), "plain PyTorch": lambda p=plain: p(steps)}
        if available("pythae"):
            m = peers.pythae_iwae(k=k)
            opt = torch.optim.Adam(m.parameters(), 1e-3)
            m.train()

            def pythae_steps(m=m, opt=opt):
                for i in range(steps):
                    batch = x_train[(i * b) % 50000:(i * b) % 50000 + b].reshape(-1, 1, 28, 28)
                    loss = m({"data": batch}).loss
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            fns["pythae"] = pythae_steps
        if available("pyro"):
            import pyro
            from pyro.infer import SVI, RenyiELBO
            vae = peers.PyroVAE()
            svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}),
                      RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1))

            def pyro_steps(svi=svi):
                with pyro.validation_enabled(False):
                    for i in range(steps):
                        svi.step(x_train[(i * b) % 50000:(i * b) % 50000 + b])
            fns["Pyro"] = pyro_steps
        times = measure_interleaved(fns, "cpu", rounds=rounds, block_seconds=0, warmup=1)
        out[f"k{k}-b{b}"] = {name: 1000 * median(v) / steps for name, v in times.items()}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--k", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--train-images", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--pythae-batch", type=int, default=1000,
                   help="samples per get_nll call (pythae's default is 100; 1000 was faster here)")
    p.add_argument("--train-steps", type=int, default=20, help="steps per timed block of the training table")
    p.add_argument("--train-rounds", type=int, default=7)
    p.add_argument("--no-training", dest="training", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dataset = iwae_ext.data.load_dataset()
    x_train = dataset.split("train")[:args.train_images]
    test = dataset.split("test")
    x = test[torch.randperm(test.shape[0], generator=torch.Generator().manual_seed(args.seed))[:args.images]]
    skipped = [name for name in ("pythae", "pyro") if not available(name)]
    for name in skipped:
        print(f"bench_peers: {name} is not installed: its rows are skipped", file=sys.stderr)
    models, train_seconds = {}, {}
    torch.manual_seed(args.seed)
    if "pythae" not in skipped:
        t0 = time.perf_counter()
        models["pythae"] = peers.train_pythae(peers.pythae_iwae(k=5), x_train, args.epochs, seed=args.seed)
        train_seconds["pythae"] = time.perf_counter() - t0
    if "pyro" not in skipped:
        t0 = time.perf_counter()
        models["pyro"] = peers.train_pyro(peers.PyroVAE(), x_train, args.epochs, seed=args.seed, k=5)
        train_seconds["pyro"] = time.perf_counter() - t0
    result = {"images": args.images, "k": args.k, "rounds": args.rounds, "epochs": args.epochs,
              "train_images": args.train_images, "pythae_batch": args.pythae_batch, "skipped": skipped,
              "peer_training_seconds": train_seconds, "evaluation": {}, "training": {}}
    threads = [int(t) for t in args.threads.split(",")]
    for t in threads:
        torch.set_num_threads(t)
        result["evaluation"][str(t)] = evaluation(models, x, args.k, args.rounds, args.pythae_batch, args.seed)
        if args.training:
            result["training"][str(t)] = training(dataset, args.train_steps, args.train_rounds, [(5, 100), (50, 20)])
    print(table(result))
    path = save(result, "cpu", "peers", args.out)
    print(f"bench_peers: {path}", file=sys.stderr)
    return result


def table(r: dict) -> str:
    lines = [f"L_{r['k']} of {r['images']} test images (median s of {r['rounds']} interleaved rounds)", "",
             "| threads | model | iwae_ext | peer | speedup (rounds) | estimates: ours - peer |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    peer = {"pythae": "pythae get_nll", "pyro": "Pyro RenyiELBO(0)"}
    for t, ev in r["evaluation"].items():
        for name, e in ev.items():
            rounds = ", ".join(f"{v:.2f}" for v in e["speedup_rounds"])
            est = e["estimates"]
            lines.append(f"| {t} | {peer[name]} | {e['ours_median']:.2f} | {e['theirs_median']:.2f} | "
                         f"**{e['speedup']:.2f}x** ({rounds}) | {est['difference']:+.3f} +- {est['difference_stderr']:.3f} |")
    if r["training"]:
        lines += ["", "Training step, median ms (IWAE bound, 784-200-200-50)", "",
                  "| threads | setting | " + " | ".join(next(iter(next(iter(r["training"].values())).values()))) + " |",
                  "| ---: | --- |" + " ---: |" * len(next(iter(next(iter(r["training"].values())).values())))]
        for t, tr in r["training"].items():
            for setting, row in tr.items():
                lines.append(f"| {t} | {setting} | " + " | ".join(f"{v:.1f}" for v in row.values()) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
