"""Command lines (argument parsing only): ``iwae-train`` and ``iwae-eval``."""
from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["train_main", "eval_main", "train_parser"]


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive widths, got {text!r}")
    return values


def _hidden(text: str) -> list[list[int]]:
    """'200,200' (one stochastic layer) or '200,200/100,100' (two)."""
    return [_ints(part) for part in text.split("/")]


def train_parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .train import KINDS, TrainConfig

    d = TrainConfig()
    S = argparse.SUPPRESS  # only flags given on the command line override the defaults
    p = argparse.ArgumentParser(
        prog="iwae-train",
        description="Train a VAE or IWAE and evaluate it (test L_k, ELBO, active units). "
                    "With no flags: IWAE k=5, 784-200-200-50 tanh, 30 epochs on the bundled "
                    "binarized MNIST, test L_5000.")
    a = p.add_argument
    a("--model", choices=list(KINDS), default=S,
      help=f"VAE (ELBO), IWAE (IWAE bound), IWAER / IWAER_rec (random decoder and encoder weights / "
           f"random encoder weights, paper 000), AIWAE (annealed importance weights, paper 004), "
           f"AE (vanilla autoencoder on squared error, paper 003) (default {d.model})")
    a("--k", type=int, default=S, help=f"importance samples per data point (default {d.k})")
    a("--layers", type=int, choices=[1, 2], default=S, help="stochastic layers (default 1)")
    a("--hidden", type=_hidden, default=S,
      help="hidden widths per stochastic layer, e.g. 200,200 or 200,200/100,100 (default: Burda's)")
    a("--latent-dim", type=_ints, default=S, dest="latent_dim",
      help="latent width(s), e.g. 50 or 100,50 (default: 50, or 100,50 for two layers)")
    a("--activation", choices=["tanh", "relu", "sigmoid"], default=S, help="(default tanh)")
    a("--decoder", choices=["bernoulli", "gaussian"], default=S,
      help="likelihood (default: bernoulli for binary data, gaussian for frey)")
    a("--dataset", choices=sorted(DATASETS), default=S, help=f"(default {d.dataset})")
    a("--data-dir", dest="data_dir", default=S,
      help="data root (default: $IWAE_EXT_DATA or ~/.cache/iwae_ext)")
    a("--download", action="store_true", default=S, help="fetch missing files from their original URLs")
    a("--batch-size", type=int, dest="batch_size", default=S, help=f"(default {d.batch_size})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=int, default=S, help=f"passes over the training set (default {d.epochs})")
    g.add_argument("--schedule", choices=["burda"], default=S,
                   help="burda: stages i=0..7 of 3^i passes at lr 1e-3*10^(-i/7) (3,280 passes)")
    a("--lr", type=float, default=S, help=f"Adam learning rate (default {d.lr})")
    a("--estimator", choices=["standard", "stl", "dreg"], default=S,
      help="encoder gradient estimator (default standard)")
    a("--kl", choices=["mc", "analytic"], default=S,
      help="VAE KL term: Monte Carlo (L^A) or analytic (L^B; the default for a one-layer VAE)")
    a("--prior-std", type=float, dest="prior_std", default=S,
      help="random weights: N(0, s^2) prior with KL/N per minibatch (default: none, as paper 000)")
    a("--rho-init", type=float, dest="rho_init", default=S,
      help=f"random weights: initial rho, sigma = softplus(rho) (default {d.rho_init})")
    a("--temps", type=int, default=S,
      help=f"aiwae: inverse temperatures T, beta_t = t/(T-1) (default {d.temps})")
    a("--leapfrog", type=int, default=S, help=f"aiwae: leapfrog steps per HMC transition (default {d.leapfrog})")
    a("--target-accept", type=float, dest="target_accept", default=S,
      help=f"aiwae: acceptance the per-temperature step sizes adapt toward (default {d.target_accept})")
    a("--hmc-step-size", type=float, dest="hmc_step_size", default=S,
      help=f"aiwae: initial leapfrog step size (default {d.hmc_step_size})")
    a("--init-from", dest="init_from", default=S,
      help="start from a trained run of the same architecture (for iwaer/iwaer_rec: a deterministic "
           "run's weights become the means of the random weights)")
    a("--eval-k", type=int, dest="eval_k", default=S,
      help="samples for the test L_k (default 5000; 2000 for iwaer, iwaer_rec)")
    a("--eval-batch-size", type=int, dest="eval_batch_size", default=S, help=argparse.SUPPRESS)
    a("--train-eval-size", type=int, dest="train_eval_size", default=S,
      help=f"training images for train_log_likelihood, 0 = all (default {d.train_eval_size})")
    a("--subset", type=int, default=S,
      help="train and evaluate on this many images of each split (a seeded random choice; smoke tests)")
    a("--seed", type=int, default=S, help=f"(default {d.seed})")
    a("--device", default=S, help="cpu, cuda, cuda:1 or auto (default auto)")
    a("--out", default=S, help="run directory (default: runs/<model>-k<k>-<dataset>-<time>)")
    a("--resume", action="store_true", default=S, help="continue the run in --out exactly")
    a("--no-progress", dest="progress", action="store_false", default=S, help="no progress bars")
    a("--reference-ops", dest="fused", action="store_false", default=S,
      help="the pure-PyTorch twins instead of the fused logmeanexp and decoder output layer (for comparisons)")
    a("--compile", action=argparse.BooleanOptionalAction, default=S,
      help="the training step under torch.compile (a CUDA graph on one GPU); default: compiled for "
           "runs of >= 10,000 steps on a CPU, >= 5,000 on a GPU, where compiling pays")
    a("--dtype", choices=["float32", "float64"], default=S, help=f"(default {d.dtype})")
    a("--flush-denormal", dest="flush_denormal", action=argparse.BooleanOptionalAction, default=S,
      help="on a CPU, subnormal floats are zero while training (default; up to 4x faster steps)")
    a("--sync-every", type=int, dest="sync_every", default=S,
      help=f"steps between read-backs to the host (non-finite check; stop requests under torchrun) "
           f"(default {d.sync_every})")
    return p


def train_main(argv=None) -> int:
    import time

    from .data import DataError
    from .train import NonFiniteLossError, TrainConfig, train

    args = vars(train_parser().parse_args(argv))
    lead = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 speaks
    group = None
    if "out" not in args:
        if args.get("resume"):
            print("iwae-train: --resume needs --out (the run directory)", file=sys.stderr)
            return 2
        d = TrainConfig()
        args["out"] = "runs/{}-k{}-{}-{}".format(args.get("model", d.model), args.get("k", d.k),
                                                 args.get("dataset", d.dataset),
                                                 time.strftime("%Y%m%d-%H%M%S"))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank must name the same directory
            args["out"], group = _rank0_value(args["out"], args.get("device", "auto"))
    if lead:
        print(f"iwae-train: run directory {args['out']}", flush=True)
    try:
        metrics = train(**args)
    except NonFiniteLossError as e:
        if lead:
            print(f"iwae-train: {e}", file=sys.stderr)
        return 1
    except (DataError, ValueError, FileExistsError, FileNotFoundError) as e:
        if lead:
            print(f"iwae-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if group is not None:
            group.close()
    if metrics.get("stopped"):
        return 130
    if not lead:
        return 0
    t = metrics["timings"]
    if "test_mse" in metrics:  # an autoencoder: no likelihood
        print(f"test reconstruction MSE {metrics['test_mse']:.5f} per pixel (squared error "
              f"{metrics['test_squared_error']:.2f} per image, {metrics['n_test']} test images); train MSE "
              f"{metrics['train_mse']:.5f}; {t['seconds_per_epoch']:.1f} s/epoch; run in {args['out']}")
        return 0
    print(f"test log-likelihood L_{metrics['eval_k']}: {metrics['test_log_likelihood']:.2f} nats "
          f"(+- {metrics['test_log_likelihood_stderr']:.2f}, {metrics['n_test']} test images); "
          f"test ELBO {metrics['test_elbo']:.2f}; train L_{metrics['eval_k']} "
          f"{metrics['train_log_likelihood']:.2f}; active units {metrics['active_units']}; "
          f"{t['seconds_per_epoch']:.1f} s/epoch; run in {args['out']}")
    return 0


def _rank0_value(value, device: str):
    """(rank 0's ``value`` on every rank of the torchrun job, the process group started for it:
    the trainer uses it, the caller ends it)."""
    import torch.distributed as dist

    from ._eval_run import Dist
    from .train.loop import _device
    group = Dist(_device(device))
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0], group


def eval_main(argv=None) -> int:
    import math

    import torch

    from . import evaluate
    from .data import DataError, load_dataset
    from .train import load_checkpoint

    p = argparse.ArgumentParser(
        prog="iwae-eval", description="Evaluate a training run's checkpoint. Under torchrun the images are "
        "split across the processes (gloo on CPUs, NCCL on GPUs) and rank 0 reports.")
    p.add_argument("checkpoint", help="checkpoint.pt or a run directory")
    p.add_argument("--k", type=int, default=5000, help="importance samples for L_k (default 5000)")
    p.add_argument("--split", default="test", help="data split (default test)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate N images, a seeded random choice (default: all)")
    p.add_argument("--dataset", default=None, help="default: the run's data set")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-point", metavar="PATH", help="also save per-data-point L_k and ELBO (.pt)")
    p.add_argument("--out", metavar="DIR",
                   help="write per-image results into DIR as they finish (<split>-<estimator>.rank<r>.jsonl, "
                        "one JSON line per image) and results.json at the end")
    p.add_argument("--resume", action="store_true",
                   help="continue the evaluation in --out: images already there are not computed again")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--report", metavar="DIR",
                   help="write the evaluation report into DIR: metrics.json, report.md and the figures "
                        "(test and train L_k on --limit images each, default 1000)")
    g = p.add_argument_group("AIS (Wu et al. 2017; paper 004's evaluation)")
    g.add_argument("--ais", action="store_true",
                   help="also estimate log p(x) by AIS and report the AIS NLL and the variational gap "
                        "(AIS log-likelihood - L_k)")
    g.add_argument("--ais-chains", type=int, default=16, help="chains per data point (default 16)")
    g.add_argument("--ais-temps", type=int, default=10000, help="inverse temperatures (default 10000)")
    g.add_argument("--ais-leapfrog", type=int, default=10, help="leapfrog steps per transition (default 10)")
    g.add_argument("--ais-schedule", choices=["sigmoid", "linear"], default="sigmoid",
                   help="sigmoid (Wu et al.) or linear (paper 004) (default sigmoid)")
    g.add_argument("--ais-init", choices=["posterior", "prior"], default="posterior",
                   help="start the chains from q(z|x) or p(z) (default posterior)")
    g.add_argument("--bdmc", type=int, default=0, metavar="N",
                   help="also run BDMC on N points simulated from the model with the AIS settings: "
                        "forward (lower) and reverse (upper) bounds of their log p(x)")
    args = p.parse_args(argv)
    for name in ("k", "batch_size", "ais_chains", "ais_temps", "ais_leapfrog"):
        value = getattr(args, name)
        if value < (2 if name == "ais_temps" else 1):
            p.error(f"--{name.replace('_', '-')} must be >= {2 if name == 'ais_temps' else 1}, got {value}")
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be >= 1 (leave it out to evaluate every image), got {args.limit}")
    if args.bdmc < 0:
        p.error(f"--bdmc must be >= 0, got {args.bdmc}")
    if args.resume and not args.out:
        p.error("--resume needs --out (the directory of the evaluation to continue)")
    from . import _eval_run
    device = _eval_run.Dist.device_of(args.device)
    try:
        d = _eval_run.Dist(torch.device(device))
    except (RuntimeError, ValueError) as e:
        print(f"iwae-eval: error: could not join the torch.distributed job: {e}", file=sys.stderr)
        return 2
    try:
        model, ckpt = load_checkpoint(args.checkpoint, map_location=device, with_state=True)
        dataset = load_dataset(args.dataset or ckpt["config"]["dataset"], args.data_dir)
        gen = torch.Generator().manual_seed(args.seed)
        x = dataset.batch(args.split, slice(None), gen)
    except (DataError, ValueError, FileNotFoundError, KeyError) as e:
        print(f"iwae-eval: error: {e}", file=sys.stderr)
        d.close()
        return 2
    if args.limit is not None and args.limit > x.shape[0]:
        print(f"iwae-eval: error: --limit {args.limit} is larger than the {args.split} split "
              f"({x.shape[0]} images)", file=sys.stderr)
        d.close()
        return 2
    if args.report and d.world > 1:
        print("iwae-eval: error: --report runs in one process (launch it without torchrun)", file=sys.stderr)
        d.close()
        return 2
    ais_settings = (dict(num_chains=args.ais_chains, num_temps=args.ais_temps, num_leapfrog=args.ais_leapfrog,
                         schedule=args.ais_schedule, init=args.ais_init) if args.ais else None)
    if args.report:
        import os

        from .report import write_report
        run_dir = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(args.checkpoint)
        try:
            m = write_report(model, dataset, args.report, run_dir, args.k, args.limit or 1000, args.batch_size,
                             args.seed, ais_settings, progress=args.progress)
        except (ValueError, ImportError) as e:
            print(f"iwae-eval: error: {e}", file=sys.stderr)
            return 2
        print(json.dumps({k: v for k, v in m.items() if k != "model"}, indent=1))
        print(f"iwae-eval: report written to {os.path.join(args.report, 'report.md')}", file=sys.stderr)
        return 0
    index = torch.arange(x.shape[0])
    if args.limit:  # a random choice, never a prefix (the test split is sorted by digit)
        index = torch.randperm(x.shape[0], generator=gen)[:args.limit]
        x = x[index]
    settings = {"checkpoint_digest": ckpt.get("digest"), "dataset": args.dataset or ckpt["config"]["dataset"],
                "split": args.split, "limit": args.limit, "seed": args.seed, "k": args.k, "ais": ais_settings,
                "bdmc": args.bdmc, "batch_size": args.batch_size}  # the batches fix each image's rounding
    try:
        if args.out:
            _eval_run.check_settings(args.out, settings, args.resume, d.rank, d)
        rows = _eval_run.run(f"{args.split}-L{args.k}", lambda pos: _lk_rows(model, x, index, pos, args),
                             index, args.batch_size, d, args.out, args.resume, args.progress,
                             f"{args.split} L_{args.k}")
        ais_rows = bdmc_rows = None
        if args.ais:
            ais_rows = _eval_run.run(f"{args.split}-ais", lambda pos: _ais_rows(model, x, index, pos, args),
                                     index, args.batch_size, d, args.out, args.resume, args.progress,
                                     f"{args.split} AIS T={args.ais_temps}")
        if args.bdmc:
            points = torch.arange(args.bdmc)
            bdmc_rows = _eval_run.run("bdmc", lambda pos: _bdmc_rows(model, pos, args), points,
                                      args.batch_size, d, args.out, args.resume, args.progress,
                                      f"BDMC T={args.ais_temps}")
    except (ValueError, TypeError, FileExistsError) as e:
        print(f"iwae-eval: error: {e}", file=sys.stderr)
        d.close()
        return 2
    if d.rank != 0:  # rank 0 reports what one process would
        d.close()
        return 0
    col = lambda rs, key: torch.tensor([r[key] for r in rs], dtype=torch.float64)  # noqa: E731
    ll, elbo_ = col(rows, "log_likelihood"), col(rows, "elbo")
    n = x.shape[0]
    sem = lambda t: float(t.std() / math.sqrt(n)) if n > 1 else None  # noqa: E731
    units = evaluate.active_units(model, x)
    result = {
        "checkpoint": args.checkpoint, "split": args.split, "n": n, "k": args.k,
        "log_likelihood": float(ll.mean()),
        "log_likelihood_stderr": sem(ll),
        "elbo": float(elbo_.mean()),
        "active_units": units["active"],
        "reconstruction_error": float(evaluate.reconstruction_error(model, x).mean()),
    }
    per_point = {"index": index, "log_likelihood": ll, "elbo": elbo_, "log_likelihood_stderr": col(rows, "stderr")}
    if ais_rows is not None:
        a = col(ais_rows, "log_likelihood")
        gap = a - ll
        result.update({
            "ais_log_likelihood": float(a.mean()),
            "ais_nll": -float(a.mean()),
            "ais_log_likelihood_stderr": sem(a),
            "nvlb": -result["log_likelihood"],
            "variational_gap": float(gap.mean()),
            "variational_gap_stderr": sem(gap),
            "ais": {"chains": args.ais_chains, "temps": args.ais_temps, "leapfrog": args.ais_leapfrog,
                    "schedule": args.ais_schedule, "init": args.ais_init,
                    "acceptance_rate": float(col(ais_rows, "acceptance_rate").mean()),
                    "step_size": float(col(ais_rows, "step_size").mean())},
        })
        per_point["ais_log_likelihood"] = a
        per_point["ais_log_weights"] = torch.tensor([r["log_weights"] for r in ais_rows], dtype=torch.float64).t()
    if bdmc_rows is not None:
        lower, upper = col(bdmc_rows, "lower"), col(bdmc_rows, "upper")
        result["bdmc"] = {"n": args.bdmc, "lower": float(lower.mean()), "upper": float(upper.mean()),
                          "gap": float((upper - lower).mean()), "chains": args.ais_chains,
                          "temps": args.ais_temps, "schedule": args.ais_schedule}
    if args.per_point:
        torch.save(per_point, args.per_point)
    text = json.dumps(result, indent=1)
    if args.out:
        import os
        with open(os.path.join(args.out, "results.json.tmp"), "w") as f:
            f.write(text + "\n")
        os.replace(os.path.join(args.out, "results.json.tmp"), os.path.join(args.out, "results.json"))
    print(text)
    d.close()
    return 0


def _lk_rows(model, x, index, pos, args) -> list[dict]:
    from . import evaluate
    b = evaluate.bounds(model, x[pos], args.k, pos.shape[0], seed=args.seed, index=index[pos])
    return [{"log_likelihood": float(v), "elbo": float(e), "stderr": float(s)}
            for v, e, s in zip(b.log_likelihood, b.elbo, b.stderr)]


def _ais_rows(model, x, index, pos, args) -> list[dict]:
    from . import evaluate
    a = evaluate.ais_log_likelihood(model, x[pos], args.ais_chains, args.ais_temps, args.ais_leapfrog,
                                    args.ais_schedule, args.ais_init, batch_size=pos.shape[0],
                                    seed=args.seed, index=index[pos], return_details=True)
    return [{"log_likelihood": float(v), "stderr": float(s), "acceptance_rate": float(r),
             "step_size": float(st), "log_weights": w.tolist()}
            for v, s, r, st, w in zip(a.log_likelihood, a.stderr, a.acceptance_rate, a.step_size, a.log_weights.t())]


def _bdmc_rows(model, pos, args) -> list[dict]:
    import torch

    from . import evaluate
    device = next(model.parameters()).device
    r = evaluate.bdmc(model, args.bdmc, args.ais_chains, args.ais_temps, args.ais_leapfrog, args.ais_schedule,
                      batch_size=pos.shape[0], generator=torch.Generator(device=device).manual_seed(args.seed + 1),
                      seed=args.seed + 1, points=pos)
    return [{"lower": float(lo), "upper": float(up), "lower_stderr": float(ls), "upper_stderr": float(us)}
            for lo, up, ls, us in zip(r.lower, r.upper, r.lower_stderr, r.upper_stderr)]


if __name__ == "__main__":
    raise SystemExit(train_main())
