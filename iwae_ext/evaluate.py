"""Evaluation the way the papers do it: L_k (k = 5000), the ELBO, active units, gaps.

All functions take a model with the :mod:`iwae_ext.models` interface and data x [N, D]
(values in [0, 1]; binarise greyscale data first), run without gradients, in batches of
``batch_size`` data points and, over k, in chunks of at most ``max_rows`` (samples x data
points) so that memory stays bounded whatever k is. Values are per data point, in nats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .ops import logmeanexp

__all__ = ["Bounds", "iwae_log_likelihood", "bounds", "elbo", "active_units",
           "reconstruction_error", "ACTIVE_UNIT_THRESHOLD"]

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016: unit u is active if Cov_x(E_q[u]) > 0.01


@dataclass
class Bounds:
    """Per-data-point L_k (log-likelihood estimate) and ELBO (mean of the same k log-weights)."""

    log_likelihood: Tensor  # [N]
    elbo: Tensor  # [N]


def _param(model) -> Tensor:
    return next(model.parameters())


def _check(x: Tensor, k: int, batch_size: int):
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a tensor of shape [N, D], got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")


@torch.no_grad()
def bounds(model, x: Tensor, k: int = 5000, batch_size: int = 100, max_rows: int = 50_000,
           progress: bool = False) -> Bounds:
    """L_k and the ELBO per data point, from the same k importance samples per point.

    L_k = log (1/k) sum_i w_i (Burda et al. 2016, eq. 8), combined across chunks of samples
    exactly (a log-sum-exp of the chunks' log-mean-exps weighted by their sizes);
    ELBO = (1/k) sum_i log w_i.
    """
    _check(x, k, batch_size)
    p = _param(model)
    lls, elbos = [], []
    n_batches = math.ceil(x.shape[0] / batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_batches, desc=f"L_{k}", unit="batch", leave=False)
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device=p.device, dtype=p.dtype)
        chunk = max(1, min(k, max_rows // xb.shape[0]))
        parts, total = [], torch.zeros(xb.shape[0], dtype=torch.float64, device=p.device)
        for done in range(0, k, chunk):
            kc = min(chunk, k - done)
            log_w = model.log_weights(xb, kc)
            parts.append(logmeanexp(log_w, 0).double() + math.log(kc))
            total += log_w.double().sum(0)
        lls.append(torch.logsumexp(torch.stack(parts), 0) - math.log(k))
        elbos.append(total / k)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return Bounds(torch.cat(lls).cpu(), torch.cat(elbos).cpu())


def iwae_log_likelihood(model, x: Tensor, k: int = 5000, batch_size: int = 100,
                        max_rows: int = 50_000, progress: bool = False) -> Tensor:
    """L_k per data point [N] (float64): the importance-sampled log-likelihood estimate."""
    return bounds(model, x, k, batch_size, max_rows, progress).log_likelihood


def elbo(model, x: Tensor, k: int = 1000, batch_size: int = 100, max_rows: int = 50_000) -> Tensor:
    """The ELBO per data point [N], averaged over k samples of q(z|x)."""
    return bounds(model, x, k, batch_size, max_rows).elbo


@torch.no_grad()
def active_units(model, x: Tensor, batch_size: int = 1000, threshold: float = ACTIVE_UNIT_THRESHOLD,
                 num_samples: int = 100) -> dict:
    """Active units per stochastic layer: unit u is active when Cov_x(E_q[u]) > threshold.

    Returns {"active": [count per layer], "variances": [tensor [Z_i] per layer]}. The top layer of
    a two-layer model takes E_q[z2] = E_{q(z1|x)}[mean of q(z2|z1)] by ``num_samples`` draws.
    """
    _check(x, 1, batch_size)
    p = _param(model)
    means = None
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device=p.device, dtype=p.dtype)
        m = model.posterior_means(xb, num_samples)
        means = [[t] for t in m] if means is None else [acc + [t] for acc, t in zip(means, m)]
    variances = [torch.cat(m).double().var(0, unbiased=False).cpu() for m in means]
    return {"active": [int((v > threshold).sum()) for v in variances], "variances": variances}


@torch.no_grad()
def reconstruction_error(model, x: Tensor, batch_size: int = 1000) -> Tensor:
    """-log p(x | z1 = E_q[z1]) per data point [N]: the negative log-likelihood of x under the
    decoder at the posterior mean (binary cross-entropy summed over pixels for Bernoulli data)."""
    _check(x, 1, batch_size)
    p = _param(model)
    out = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device=p.device, dtype=p.dtype)
        q = model.posterior(xb)
        z = q.mean if hasattr(q, "loc") else None
        if z is None:  # two layers: z1 at its mean, z2 at the mean of q(z2|z1 = E[z1])
            z1 = q.q1.loc
            z = torch.cat([z1, q.layer2(z1)[0]], -1)
        out.append(-model.log_likelihood(xb, z.unsqueeze(0))[0].double().cpu())
    return torch.cat(out)
