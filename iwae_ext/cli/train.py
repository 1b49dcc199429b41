"""``iwae-train`` (also ``python -m iwae_ext.cli.train``, and under ``torchrun -m iwae_ext.cli.train``):
train a model and evaluate it. The work is :func:`iwae_ext.train`; this module parses arguments."""
from __future__ import annotations

import argparse
import os
import sys

from .._checks import device_problem
from ._common import (add_threads_flag, apply_threads, at_least, hidden_widths, int_list,
                      non_negative_int, positive_float, positive_int)

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    from ..data import DATASETS
    from ..trainer import KINDS, TrainConfig

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
           f"random encoder weights, Hernandez-Lobato et al.), AIWAE (annealed importance weights, "
           f"Ding and Freedman), AE (vanilla autoencoder on squared error, Kingma and Welling) (default {d.model})")
    a("--k", type=positive_int, default=S, help=f"importance samples per data point (default {d.k})")
    a("--layers", type=int, choices=[1, 2], default=S, help="stochastic layers (default 1)")
    a("--hidden", type=hidden_widths, default=S,
      help="hidden widths per stochastic layer, e.g. 200,200 or 200,200/100,100 (default: Burda's)")
    a("--latent-dim", type=int_list, default=S, dest="latent_dim",
      help="latent width(s), e.g. 50 or 100,50 (default: 50, or 100,50 for two layers)")
    a("--activation", choices=["tanh", "relu", "sigmoid"], default=S, help="(default tanh)")
    a("--decoder-hidden", type=int_list, default=S, dest="decoder_hidden",
      help="hidden widths of p(x|z1), from z1 toward x, e.g. 500 (default: the encoder's reversed)")
    a("--decoder", choices=["bernoulli", "gaussian"], default=S,
      help="likelihood (default: bernoulli for binary data, gaussian for frey)")
    a("--dataset", choices=sorted(DATASETS), default=S, help=f"(default {d.dataset})")
    a("--data-dir", dest="data_dir", default=S,
      help="data root (default: $IWAE_EXT_DATA or ~/.cache/iwae_ext)")
    a("--download", action="store_true", default=S, help="fetch missing files from their original URLs")
    a("--batch-size", type=positive_int, dest="batch_size", default=S, help=f"(default {d.batch_size})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=non_negative_int, default=S, help=f"passes over the training set (default {d.epochs})")
    g.add_argument("--schedule", choices=["burda"], default=S,
                   help="burda: stages i=0..7 of 3^i passes at lr 1e-3*10^(-i/7) (3,280 passes)")
    a("--lr", type=positive_float, default=S, help=f"Adam learning rate (default {d.lr})")
    a("--weight-decay", type=float, dest="weight_decay", default=S,
      help="l2 penalty (weight_decay/2)||theta||^2 on every parameter, through Adam (default 0)")
    a("--estimator", choices=["standard", "stl", "dreg"], default=S,
      help="encoder gradient estimator (default standard)")
    a("--kl", choices=["mc", "analytic"], default=S,
      help="VAE KL term: Monte Carlo (L^A) or analytic (L^B; the default for a one-layer VAE)")
    a("--prior-std", type=positive_float, dest="prior_std", default=S,
      help="random weights: N(0, s^2) prior with KL/N per minibatch (default: none, as Hernandez-Lobato et al.)")
    a("--rho-init", type=float, dest="rho_init", default=S,
      help=f"random weights: initial rho, sigma = softplus(rho) (default {d.rho_init})")
    a("--temps", type=at_least(2), default=S,
      help=f"aiwae: inverse temperatures T, beta_t = t/(T-1) (default {d.temps})")
    a("--leapfrog", type=positive_int, default=S, help=f"aiwae: leapfrog steps per HMC transition (default {d.leapfrog})")
    a("--target-accept", type=float, dest="target_accept", default=S,
      help=f"aiwae: acceptance the per-temperature step sizes adapt toward (default {d.target_accept})")
    a("--hmc-step-size", type=float, dest="hmc_step_size", default=S,
      help=f"aiwae: initial leapfrog step size (default {d.hmc_step_size})")
    a("--init-from", dest="init_from", default=S,
      help="start from a trained run of the same architecture (for iwaer/iwaer_rec: a deterministic "
           "run's weights become the means of the random weights)")
    a("--eval-k", type=positive_int, dest="eval_k", default=S,
      help="samples for the test L_k (default 5000; 2000 for iwaer, iwaer_rec)")
    a("--eval-batch-size", type=positive_int, dest="eval_batch_size", default=S, help=argparse.SUPPRESS)
    a("--train-eval-size", type=non_negative_int, dest="train_eval_size", default=S,
      help=f"training images for train_log_likelihood, 0 = all (default {d.train_eval_size})")
    a("--test-every", type=non_negative_int, dest="test_every", default=S,
      help="every N epochs, the test ELBO and L_k (the training k) in metrics.jsonl (default 0: never)")
    a("--subset", type=non_negative_int, default=S,
      help="train and evaluate on this many images of each split (a seeded random choice; smoke tests)")
    a("--seed", type=int, default=S, help=f"(default {d.seed})")
    a("--device", default=S, help="cpu, cuda, cuda:1 or auto (default auto)")
    a("--out", default=S, help="run directory (default: runs/<model>-k<k>-<dataset>-<time>)")
    a("--resume", action="store_true", default=S, help="continue the run in --out exactly")
    a("--no-progress", dest="progress", action="store_false", default=S, help="no progress bars")
    a("--tensorboard", metavar="DIR", default=S,
      help="also log to TensorBoard in DIR (rank 0): the training bound, learning rate and step time "
           "per epoch, the --test-every curve and the final metrics (needs the tensorboard package)")
    a("--reference-ops", dest="fused", action="store_false", default=S,
      help="the pure-PyTorch twins instead of the fused logmeanexp and decoder output layer (for comparisons)")
    a("--compile", action=argparse.BooleanOptionalAction, default=S,
      help="the training step under torch.compile (a CUDA graph on one GPU); default: compiled for "
           "runs of >= 10,000 steps on a CPU, >= 5,000 on a GPU, where compiling pays")
    a("--dtype", choices=["float32", "float64"], default=S, help=f"(default {d.dtype})")
    a("--precision", choices=["float32", "bf16", "tf32"], default=S,
      help="the training step's matrix products: float32, bf16 (bfloat16 autocast; float32 weights, "
           "Adam, log-weights and bounds; evaluation in float32) or tf32 (CUDA) (default float32)")
    a("--flush-denormal", dest="flush_denormal", action=argparse.BooleanOptionalAction, default=S,
      help="on a CPU, subnormal floats are zero while training (default; up to 4x faster steps)")
    a("--sync-every", type=positive_int, dest="sync_every", default=S,
      help=f"steps between read-backs to the host (non-finite check; stop requests under torchrun) "
           f"(default {d.sync_every})")
    add_threads_flag(p)
    return p


def main(argv=None) -> int:
    import time

    from ..data import DataError
    from ..trainer import NonFiniteLossError, TrainConfig, train

    args = vars(parser().parse_args(argv))
    lead = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 speaks
    threads = args.pop("threads", None)
    device = args.get("device", "auto")
    if device != "auto":
        problem = device_problem(device)
        if problem:
            print(f"iwae-train: error: --device {problem}", file=sys.stderr)
            return 2
    apply_threads("iwae-train", threads, lead)
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

    from .._distributed import Dist
    from ..trainer.loop import _device
    group = Dist(_device(device))
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0], group


if __name__ == "__main__":
    raise SystemExit(main())
