"""The final evaluation of a run: test L_{eval_k} (whole test split), ELBO, train log-likelihood,
active units, reconstruction error and timings; for an autoencoder the squared errors only.

Under torch.distributed the L_k evaluations are split across the ranks in whole batches of
``eval_batch_size`` (contiguous blocks of batches, one block per rank) and gathered: every
image's samples are keyed by (seed, image) and its batch mates are those of one process, so the
gathered values equal one process's.
"""
from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from ..data import Dataset
from .config import TrainConfig

__all__ = ["final_metrics"]


def _eval_data(dataset: Dataset, split: str, gen: torch.Generator) -> Tensor:
    """A split as evaluated: dynamic data binarised once with a seeded draw."""
    return dataset.batch(split, slice(None), gen)


def _split_bounds(model, x: Tensor, config: TrainConfig, seed: int, group, desc: str):
    """(L_k [N], ELBO [N]) of x, this rank's block of whole batches evaluated and all gathered."""
    from .. import evaluate
    n, bs = x.shape[0], config.eval_batch_size
    batches = math.ceil(n / bs)
    lo = (batches * group.rank // group.world) * bs
    hi = min(n, (batches * (group.rank + 1) // group.world) * bs)
    part = {}
    if hi > lo:
        b = evaluate.bounds(model, x[lo:hi], config.eval_k, bs, progress=config.progress and group.rank == 0,
                            desc=desc, seed=seed, index=torch.arange(lo, hi))
        part = {lo: (b.log_likelihood.cpu(), b.elbo.cpu())}
    parts = group.gather(part)  # {first row: (L_k, ELBO)} of every rank
    blocks = [parts[lo] for lo in sorted(parts)]
    return torch.cat([ll for ll, _ in blocks]), torch.cat([elbo for _, elbo in blocks])


def final_metrics(model, dataset: Dataset, config: TrainConfig, history: list, train_seconds: float,
                  group=None) -> dict:
    """The run's final metrics (every rank takes part; rank 0's dict is the one written)."""
    from .. import evaluate
    from .._distributed import Dist
    from .loop import key
    group = group or Dist(torch.device("cpu"))
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed + 2)
    device = next(model.parameters()).device
    common = {"config": config.to_dict(), "device": str(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "world_size": group.world}
    if config.model == "ae":
        with torch.no_grad():
            x_test, x_train = _eval_data(dataset, "test", gen), _eval_data(dataset, "train", gen)
            test_se = evaluate.squared_error(model, x_test.to(device))
            train_se = evaluate.squared_error(model, x_train.to(device))
        return {"test_squared_error": float(test_se.mean()), "train_squared_error": float(train_se.mean()),
                "test_mse": float(test_se.mean()) / dataset.x_dim, "train_mse": float(train_se.mean()) / dataset.x_dim,
                "n_test": x_test.shape[0], "epochs": len(history),
                "final_train_bound": history[-1]["train_bound"] if history else None,
                "timings": {"train_seconds": train_seconds, "seconds_per_epoch": train_seconds / max(len(history), 1),
                            "eval_seconds": time.perf_counter() - t0}, **common}
    x_test = _eval_data(dataset, "test", gen)
    test_ll, test_elbo = _split_bounds(model, x_test, config, key(config.seed, "eval", "test"), group, "test")
    x_train = _eval_data(dataset, "train", gen)
    if config.train_eval_size and config.train_eval_size < x_train.shape[0]:
        pick = torch.randperm(x_train.shape[0], generator=gen)[:config.train_eval_size]
        x_train = x_train[pick]
    train_ll, train_elbo = _split_bounds(model, x_train, config, key(config.seed, "eval", "train"), group, "train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 3)
        units = evaluate.active_units(model, x_test)
        recon = evaluate.reconstruction_error(model, x_test)
    eval_seconds = time.perf_counter() - t0
    n_test = test_ll.numel()
    test_mean, train_mean = float(test_ll.mean()), float(train_ll.mean())
    return {
        "test_log_likelihood": test_mean,
        "test_log_likelihood_stderr": float(test_ll.std() / math.sqrt(n_test)),
        "test_elbo": float(test_elbo.mean()),
        "train_log_likelihood": train_mean,
        "train_elbo": float(train_elbo.mean()),
        "generalization_gap": train_mean - test_mean,
        "variational_gap_test": test_mean - float(test_elbo.mean()),
        "active_units": units["active"],
        "reconstruction_error": float(recon.mean()),
        "eval_k": config.eval_k,
        "n_test": n_test,
        "n_train_eval": train_ll.numel(),
        "final_train_bound": history[-1]["train_bound"] if history else None,
        "epochs": len(history),
        "timings": {"train_seconds": train_seconds,
                    "seconds_per_epoch": train_seconds / max(len(history), 1),
                    "eval_seconds": eval_seconds},
        **common,
    }
