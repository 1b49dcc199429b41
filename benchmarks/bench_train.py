"""Trainer step time: the trainer's eager and compiled steps, pure-PyTorch twins, and 2 ranks.

    python benchmarks/bench_train.py [--device cpu|cuda] [--k 5] [--batch-size 100] [--rounds 7]
                                     [--ranks 2] [--out FILE]

In this process, on the same data, interleaved round by round (the order rotating):
  eager      the trainer's own step (iwae_ext.trainer.loop, compile=False): keyed draws, the
             fused ops, backward, the device-side non-finite check, fused Adam with found_inf;
  compiled   the same step with compile=True (torch.compile of the forward and backward; on
             CUDA a CUDA graph, mode="reduce-overhead");
  twin       the eager step with the pure-PyTorch twin of logmeanexp (TrainConfig(fused=False));
  subnormal  (CPU) the eager step with subnormal floats computed as such (flush_denormal=False;
             the trainer treats them as zero while training);
  plain      an IWAE step as plain PyTorch code writes it (torch.distributions.Normal,
             binary_cross_entropy_with_logits, torch.logsumexp, foreach Adam): what the trainer
             was before, without its keyed draws and checks;
  bf16, compiled_bf16  the eager and compiled steps with precision="bf16" (the layers' matrix
             products under bfloat16 autocast; float32 weights, Adam, log-weights and bounds);
             --tf32 on CUDA: precision="tf32" instead. "best_bf16_speedup" is the faster float32
             step over the faster bf16 one, per round.
The trainer's steps run through its own loop (``_Run._steps``), so the timing includes
everything an epoch does per step. Reported: the median step time of each, the per-round ratios
against ``eager``, and the compilation time (the first compiled block minus the steady state).
``--ranks N`` then times the same trainer step data-parallel under torchrun (gloo on the CPU,
NCCL on GPUs; the global batch split across N ranks of torch.get_num_threads() / N threads each)
and reports it beside the 1-process figure. JSON to benchmarks/results/train-<device>.json.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, save, synchronize  # noqa: E402

import iwae_ext  # noqa: E402
from iwae_ext._distributed import Dist  # noqa: E402
from iwae_ext.data import load_dataset  # noqa: E402
from iwae_ext.trainer import TrainConfig  # noqa: E402
from iwae_ext.trainer.loop import _Run, subnormals_as_zero  # noqa: E402


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


def trainer_block(args, dataset, device, compile, fused=True, group=None, flush_denormal=True, precision="float32"):
    """A function running ``n`` steps of the trainer's loop (a fresh run with these settings)."""
    arch = {}
    if getattr(args, "hidden", None):
        arch["hidden"] = [args.hidden]
    if getattr(args, "latent_dim", None):
        arch["latent_dim"] = [args.latent_dim]
    if getattr(args, "activation", None):
        arch["activation"] = args.activation
    cfg = TrainConfig(model=getattr(args, "model", "iwae"), k=args.k, batch_size=args.batch_size,
                      estimator=args.estimator, fused=fused, progress=False, epochs=1,
                      flush_denormal=flush_denormal, precision=precision, **arch).resolved(dataset)
    cfg.compile = compile
    cfg.sync_every = args.steps
    run = _Run(cfg, dataset, device, group or Dist(device), None)
    _, st = run._start_epoch()  # epoch 0's learning rate, permutation and device state

    def block(n):
        left = [n]

        def stop():
            left[0] -= 1
            return left[0] < 0

        with subnormals_as_zero(device.type == "cpu" and flush_denormal):  # as the trainer's loop
            if run.world > 1:  # ranks stop together at a read-back: every n (= sync_every) steps
                if run.step >= run.steps_per_epoch:
                    run.step = 0
                run._steps(st, lambda: True)
                left[0] = 0
            while left[0] > 0:
                if run.step >= run.steps_per_epoch:
                    run.step = 0
                run._steps(st, stop)
            run._raise_if_bad(st)  # a read-back: every block ends with everything done

    block.run = run
    return block


def plain_block(args, dataset, device):
    from iwae_ext.trainer import build_model
    cfg = TrainConfig(k=args.k, batch_size=args.batch_size, progress=False).resolved(dataset)
    torch.manual_seed(0)
    model = build_model(cfg, dataset).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)
    x_train = dataset.split("train").to(device)
    perm = torch.randperm(x_train.shape[0]).to(device)
    pos = [0]

    def block(n):
        for _ in range(n):
            if (pos[0] + 1) * args.batch_size > x_train.shape[0]:
                pos[0] = 0
            idx = perm[pos[0] * args.batch_size:(pos[0] + 1) * args.batch_size]
            loss = plain_iwae_loss(model, x_train[idx], args.k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pos[0] += 1
        synchronize(device.type)

    return block


def worker(args):
    """One rank of the --ranks measurement (under torchrun): times blocks of the trainer step."""
    device = torch.device(Dist.device_of(args.device))
    group = Dist(device)
    dataset = load_dataset()
    block = trainer_block(args, dataset, device, compile=False, group=group)
    block(args.steps)  # warm-up
    times = []
    for _ in range(args.rounds):
        group.barrier()
        t0 = time.perf_counter()
        block(args.steps)
        times.append((time.perf_counter() - t0) / args.steps)
    if group.rank == 0:
        with open(args.worker, "w") as f:
            json.dump({"step_s": times, "threads_per_rank": torch.get_num_threads()}, f)
    group.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--estimator", default="standard")
    p.add_argument("--model", default="iwae", help="the model kind (Hernandez-Lobato et al.'s setting: --model iwaer "
                   "--hidden 400 --latent-dim 20 --k 25)")
    p.add_argument("--hidden", type=int, nargs="+", help="hidden units of the one stochastic layer")
    p.add_argument("--latent-dim", type=int)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--steps", type=int, default=50, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=7, help="timed blocks per variant")
    p.add_argument("--ranks", type=int, default=0, help="also time N data-parallel ranks (torchrun)")
    p.add_argument("--only", nargs="+", choices=["twin", "subnormal", "plain", "bf16", "compiled_bf16"],
                   help="of the variants beyond eager and compiled, time these only")
    p.add_argument("--tf32", action="store_true", help="CUDA: the low-precision rows in tf32 instead of bf16")
    p.add_argument("--out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    device = torch.device(args.device)
    dataset = load_dataset()
    steps_per_epoch = math.ceil(dataset.split("train").shape[0] / args.batch_size)

    blocks = {"eager": trainer_block(args, dataset, device, False)}
    t0 = time.perf_counter()
    blocks["compiled"] = trainer_block(args, dataset, device, True)
    blocks["compiled"](args.steps)  # compiles
    first_block = time.perf_counter() - t0
    want = lambda name: not args.only or name in args.only  # noqa: E731
    if want("twin"):
        blocks["twin"] = trainer_block(args, dataset, device, False, fused=False)
    if device.type == "cpu" and want("subnormal"):
        blocks["subnormal"] = trainer_block(args, dataset, device, False, flush_denormal=False)
    if (args.estimator == "standard" and args.model == "iwae" and not args.hidden and not args.latent_dim
            and want("plain")):
        blocks["plain"] = plain_block(args, dataset, device)
    low = "tf32" if device.type == "cuda" and args.tf32 else "bf16"
    if want("bf16"):
        blocks["bf16"] = trainer_block(args, dataset, device, False, precision=low)
    if want("compiled_bf16"):
        blocks["compiled_bf16"] = trainer_block(args, dataset, device, True, precision=low)
        blocks["compiled_bf16"](args.steps)  # compiles
    names = list(blocks)
    for name in names:
        blocks[name](args.steps)  # warm-up
    times = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            synchronize(device.type)
            t0 = time.perf_counter()
            blocks[name](args.steps)
            times[name].append((time.perf_counter() - t0) / args.steps)
    result = {"model": args.model, "hidden": args.hidden, "latent_dim": args.latent_dim,
              "k": args.k, "estimator": args.estimator, "batch_size": args.batch_size,
              "steps_per_epoch": steps_per_epoch, "rounds": args.rounds, "steps_per_round": args.steps}
    for name in names:
        med = statistics.median(times[name])
        result[f"{name}_step_s"] = med
        result[f"{name}_steps_s"] = times[name]
        result[f"{name}_epoch_s"] = med * steps_per_epoch
    for name in names[1:]:
        ratios = [a / b for a, b in zip(times[name], times["eager"])]
        result[f"eager_speedup_vs_{name}"] = statistics.median(ratios)  # > 1: eager faster
        result[f"eager_speedup_vs_{name}_per_round"] = ratios
    # the lower precision (bf16; tf32 with --tf32 on CUDA): against float32 eager and compiled,
    # and the faster of each precision's two steps against the faster of the other's
    result["low_precision"] = low
    if "bf16" in times:
        result["bf16_speedup"] = statistics.median([a / b for a, b in zip(times["eager"], times["bf16"])])
    if "compiled_bf16" in times:
        result["compiled_bf16_speedup"] = statistics.median(
            [a / b for a, b in zip(times["compiled"], times["compiled_bf16"])])
    if "bf16" in times and "compiled_bf16" in times:
        best = [min(a, b) / min(c, d) for a, b, c, d in zip(times["eager"], times["compiled"], times["bf16"],
                                                              times["compiled_bf16"])]
        result["best_bf16_speedup"] = statistics.median(best)
        result["best_bf16_speedup_per_round"] = best
    ratios = [a / b for a, b in zip(times["eager"], times["compiled"])]
    result["compiled_speedup"] = statistics.median(ratios)
    result["compiled_speedup_per_round"] = ratios
    result["compile_seconds"] = first_block - args.steps * result["compiled_step_s"]
    saving = result["eager_step_s"] - result["compiled_step_s"]
    result["compile_break_even_steps"] = (result["compile_seconds"] / saving) if saving > 0 else None
    for name in names:
        print(f"{name:9s} {result[f'{name}_step_s'] * 1e3:7.3f} ms/step  {result[f'{name}_epoch_s']:7.2f} s/epoch")
    r = result["compiled_speedup_per_round"]
    print(f"compiled vs eager: x{result['compiled_speedup']:.3f} (median of per-round ratios, "
          f"{min(r):.3f}..{max(r):.3f}); compilation {result['compile_seconds']:.1f} s, repaid after "
          f"{result['compile_break_even_steps'] or float('inf'):.0f} steps")
    for name in names[2:]:
        print(f"eager vs {name}: x{result[f'eager_speedup_vs_{name}']:.3f}")
    if args.ranks > 1:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "ranks.json")
            threads = max(1, torch.get_num_threads() // args.ranks)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(args.ranks), os.path.abspath(__file__), "--device", args.device, "--k", str(args.k),
                   "--batch-size", str(args.batch_size), "--estimator", args.estimator, "--steps",
                   str(args.steps), "--rounds", str(args.rounds), "--worker", path]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            with open(path) as f:
                ranks = json.load(f)
        med = statistics.median(ranks["step_s"])
        result["ranks"] = {"world_size": args.ranks, "threads_per_rank": ranks["threads_per_rank"],
                           "step_s": med, "steps_s": ranks["step_s"],
                           "speedup_vs_eager_1_process": result["eager_step_s"] / med}
        print(f"{args.ranks} ranks x {ranks['threads_per_rank']} thread(s): {med * 1e3:.3f} ms/step (eager, "
              f"global batch {args.batch_size}); x{result['eager_step_s'] / med:.3f} the 1-process eager step "
              f"(measured after it, not interleaved)")
    payload = {"benchmark": "train_step", "device": device_name(device.type), "build": iwae_ext.build_info(),
               "results": [result]}
    tag = "" if args.model == "iwae" else f"{args.model}-"
    print("saved", save(payload, device.type, f"train-{tag}k{args.k}-b{args.batch_size}", args.out))


if __name__ == "__main__":
    main()
