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


def paired(ours, theirs: torch.Tensor) -> dict:
    """Our Bounds against the peer's L_k per image: the means, the paired difference with its
    standard error, and the differences' spread against what the delta-method errors predict."""
    d = ours.log_likelihood - theirs
    return {"ours": float(ours.log_likelihood.mean()), "theirs": float(theirs.mean()), "difference": float(d.mean()),
            "difference_stderr": float(d.std() / math.sqrt(d.numel())), "difference_sd": float(d.std()),
            "predicted_sd": float(math.sqrt(2) * ours.stderr.square().mean().sqrt())}


def evaluation(models: dict, x: torch.Tensor, k: int, rounds: int, pythae_batch: int, seed: int) -> dict:
    """{pair: {"ours": [s...], "theirs": [s...], "estimates": ...}} for each peer present."""
    fns, estimates = {}, {}
    if "pythae" in models:
        m = models["pythae"]
        wrapped = adapters.from_pythae(m)
        fns["pythae"] = (lambda: evaluate.bounds(wrapped, x, k, seed=seed),
                         lambda: peers.pythae_nll(m, x, k, batch_size=pythae_batch))
    if "pyro" in models:
        vae = models["pyro"]
        wrapped_pyro = adapters.from_pyro(vae.model, vae.guide, modules=[vae], decoder=vae.decoder)
        fns["pyro"] = (lambda: evaluate.bounds(wrapped_pyro, x, k, seed=seed),
                       lambda: peers.pyro_renyi(vae, x, k))
    if "pythae" in fns:  # warm up: the adapters check their models once, at first use
        evaluate.bounds(wrapped, x[:2], 10, seed=seed)
    if "pyro" in fns:
        evaluate.bounds(wrapped_pyro, x[:2], 10, seed=seed)
    floors = {name: _floor(models[name], x, k) for name in fns}
    times = {name: {"ours": [], "theirs": [], "floor": []} for name in fns}
    for r in range(rounds):
        for name, (ours, theirs) in fns.items():
            order = [("ours", ours), ("theirs", theirs), ("floor", floors[name])]
            order = order[r % 3:] + order[:r % 3]
            for who, fn in order:
                t0 = time.perf_counter()
                with torch.no_grad():
                    value = fn()
                times[name][who].append(time.perf_counter() - t0)
                if r == 0 and who != "floor":
                    estimates.setdefault(name, {})[who] = value
    out = {}
    for name in fns:
        t = times[name]
        ratios = [b / a for a, b in zip(t["ours"], t["theirs"])]
        out[name] = {"ours_seconds": t["ours"], "theirs_seconds": t["theirs"], "floor_seconds": t["floor"],
                     "ours_median": median(t["ours"]), "theirs_median": median(t["theirs"]),
                     "floor_median": median(t["floor"]),
                     "ours_over_floor": median([a / f for a, f in zip(t["ours"], t["floor"])]),
                     "peer_over_floor": median([b / f for b, f in zip(t["theirs"], t["floor"])]),
                     "speedup_rounds": ratios, "speedup": median(ratios),
                     "estimates": paired(estimates[name]["ours"], estimates[name]["theirs"]),
                     "weights": estimates[name]["ours"].diagnostics()}
    return out


def _floor(model, x: torch.Tensor, k: int, batch_size: int = 100, max_rows: int = evaluate.DEFAULT_MAX_ROWS["cpu"]):
    """The bare float32 products of the same evaluation: the decoder's forward up to its logits
    (its output layer included; no sigmoid, no likelihood) on k draws for every image, in L_k's
    chunks, and the encoder once per chunk: what no evaluator of this model avoids."""
    if hasattr(model, "decoder") and hasattr(model, "body"):  # the Pyro VAE
        encode, decode, latent = (lambda xb: model.loc(model.body(xb))), model.decoder, model.latent
    else:  # the pythae IWAE (benchmarks/peers.py): its user networks, the decoder up to its logits
        encode = lambda xb: model.encoder(xb).embedding  # noqa: E731
        net = model.decoder.net
        decode = net[:-1] if isinstance(net[-1], torch.nn.Sigmoid) else net
        latent = model.latent_dim

    def run():
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                xb = x[start:start + batch_size]
                chunk = max(1, min(k, max_rows // xb.shape[0]))
                for done in range(0, k, chunk):
                    kc = min(chunk, k - done)
                    encode(xb)
                    decode(torch.randn(kc * xb.shape[0], latent))
    return run


CATEGORIES = (  # (category, substrings of the profiler's op names), first match wins
    ("keyed draws", ("keyed_random",)),
    ("likelihood (output layer and Bernoulli)", ("bernoulli_log_prob", "log_sigmoid", "binary_cross_entropy",
                                                 "softplus", "sigmoid")),
    ("matrix products and activations (networks, output layer)", ("addmm", "mm", "tanh", "relu", "linear")),
    ("logmeanexp, k-hat and chunk combination", ("logmeanexp", "logsumexp", "topk", "exp", "log")),
    ("copies", ("copy_", "cat", "clone", "contiguous", "expand", "repeat")),
)


def profile(models: dict, x: torch.Tensor, k: int, seed: int) -> dict:
    """Where L_k's time goes on each adapter: the profiler's self CPU time of the ops by category,
    and the rest of the wall time (Python: the user's model code, Pyro's tracing, ours)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    wrapped = {}
    if "pythae" in models:
        wrapped["pythae"] = adapters.from_pythae(models["pythae"])
    if "pyro" in models:
        vae = models["pyro"]
        wrapped["pyro"] = adapters.from_pyro(vae.model, vae.guide, modules=[vae], decoder=vae.decoder)
    out = {}
    for name, model in wrapped.items():
        evaluate.bounds(model, x[:10], 100, seed=seed)  # warm up
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            evaluate.bounds(model, x, k, seed=seed)
            wall = time.perf_counter() - t0
        cats = {c: 0.0 for c, _ in CATEGORIES}
        cats["other ops"] = 0.0
        for e in prof.key_averages():
            op = e.key.split("::")[-1]
            seconds = e.self_cpu_time_total / 1e6
            for c, keys in CATEGORIES:
                if any(key in op for key in keys):
                    cats[c] += seconds
                    break
            else:
                cats["other ops"] += seconds
        cats["Python and dispatch (the rest of the wall time)"] = max(0.0, wall - sum(cats.values()))
        out[name] = {"wall_seconds": wall, "seconds": cats, "fused": model.fused}
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
    p.add_argument("--profile", action="store_true", help="also break L_k's time down by category "
                   "(torch.profiler; one thread)")
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
    if args.profile:
        torch.set_num_threads(1)
        result["profile"] = profile(models, x, args.k, args.seed)
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
    lines = [f"L_{r['k']} of {r['images']} test images (median s of {r['rounds']} interleaved rounds; floor: "
             f"the bare float32 products of the same evaluation)", "",
             "| threads | model | iwae_ext | peer | speedup (rounds) | floor | iwae_ext / floor | peer / floor "
             "| estimates: ours - peer |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    peer = {"pythae": "pythae get_nll", "pyro": "Pyro RenyiELBO(0)"}
    notes = []
    for t, ev in r["evaluation"].items():
        for name, e in ev.items():
            rounds = ", ".join(f"{v:.2f}" for v in e["speedup_rounds"])
            est = e["estimates"]
            w = e["weights"]
            notes.append(f"{peer[name]} ({t} thread(s)): ours {est['ours']:.2f}, peer {est['theirs']:.2f} nats; "
                         f"per-image differences spread {est['difference_sd']:.2f} where the delta-method "
                         f"errors predict {est['predicted_sd']:.2f}; k-hat median {w['khat_median']:.2f}, "
                         f"{100 * w['khat_above_threshold']:.0f}% of images above {w['khat_threshold']:.2f}")
            lines.append(f"| {t} | {peer[name]} | {e['ours_median']:.2f} | {e['theirs_median']:.2f} | "
                         f"**{e['speedup']:.2f}x** ({rounds}) | {e['floor_median']:.2f} | {e['ours_over_floor']:.2f} | "
                         f"{e['peer_over_floor']:.2f} | {est['difference']:+.3f} +- {est['difference_stderr']:.3f} |")
    lines += [""] + [f"- {n}" for n in notes]
    if r.get("profile"):
        prof = r["profile"]
        names = list(prof)
        lines += ["", f"Where L_{r['k']}'s time goes (one thread, torch.profiler; seconds)", "",
                  "| | " + " | ".join(f"{n} (fused: {prof[n]['fused']})" for n in names) + " |",
                  "| --- |" + " ---: |" * len(names)]
        for cat in prof[names[0]]["seconds"]:
            lines.append(f"| {cat} | " + " | ".join(f"{prof[n]['seconds'][cat]:.2f}" for n in names) + " |")
        lines.append("| wall | " + " | ".join(f"{prof[n]['wall_seconds']:.2f}" for n in names) + " |")
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
