"""Diagnostics of importance weights: the effective sample size and the Pareto k-hat.

An importance-sampled estimate such as L_k = log (1/k) sum_i w_i, or AIS's log-mean-exp over its
chains, is only as good as its weights. Two numbers per data point say how good:

- the **effective sample size** (Kong 1992), ESS = (sum_i w_i)^2 / sum_i w_i^2, between 1 (one
  weight dominates) and k (all weights equal, as when q(z|x) is the exact posterior);
- the **Pareto k-hat** of Vehtari, Simpson, Gelman, Yao and Gabry ("Pareto Smoothed Importance
  Sampling"): the shape of a generalised Pareto distribution fitted to the largest weights. The
  weights have finite variance when the true k < 1/2 and a finite mean when k < 1. When k-hat
  is above 0.7 (above ``min(1 - 1/log10(S), 0.7)`` for S weights, the sample-size-dependent
  threshold of the same paper), the estimate converges too slowly to be trusted and its
  standard error (the delta method's sqrt(var(w) / k) / mean(w)) is not to be trusted either:
  it runs low, because the variance it estimates is dominated by weights not yet drawn.

Both work on log-weights, in float64, along any dimension, for many data points at once.
:func:`iwae_ext.evaluate.bounds` and :func:`iwae_ext.evaluate.ais_log_likelihood` return them per
data point; :func:`summarize` gives the figures the report and ``iwae-eval`` print.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["effective_sample_size", "pareto_khat", "khat_threshold", "tail_length", "summarize",
           "KHAT_THRESHOLD", "MIN_TAIL"]

KHAT_THRESHOLD = 0.7  # above it an importance-sampling estimate and its standard error are unreliable
MIN_TAIL = 5  # the fewest tail weights a generalised Pareto fit is made from (as Vehtari et al.'s loo)


def _columns(log_w: Tensor, dim: int, fn: str) -> tuple[Tensor, tuple]:
    if not isinstance(log_w, Tensor) or not log_w.is_floating_point() or log_w.dim() == 0:
        raise ValueError(f"{fn}: log_w must be a floating-point tensor with at least one dimension, got "
                         f"{type(log_w).__name__ if not isinstance(log_w, Tensor) else log_w.dtype}")
    lw = log_w.movedim(dim, 0).double()
    return lw.reshape(lw.shape[0], -1), tuple(lw.shape[1:])


def effective_sample_size(log_w: Tensor, dim: int = 0) -> Tensor:
    """Kong's effective sample size (sum w)^2 / sum w^2 of the weights exp(log_w) along ``dim``
    (float64; the other dimensions index data points). 1 <= ESS <= S for S weights."""
    lw = log_w.double()
    return torch.exp(2 * torch.logsumexp(lw, dim) - torch.logsumexp(2 * lw, dim))


def tail_length(num_weights: int) -> int:
    """M, how many of the largest of S weights the Pareto fit uses: ceil(min(S / 5, 3 sqrt(S)))
    (Vehtari et al., for independent draws)."""
    return int(math.ceil(min(0.2 * num_weights, 3 * math.sqrt(num_weights))))


def khat_threshold(num_weights: int) -> float:
    """The k-hat above which an estimate from S weights is unreliable: min(1 - 1/log10(S), 0.7)
    (Vehtari et al.; 0.7 for S >= 2154, lower for fewer weights)."""
    if num_weights < 2:
        return -math.inf
    return min(1 - 1 / math.log10(num_weights), KHAT_THRESHOLD)


def pareto_khat(log_w: Tensor, dim: int = 0) -> Tensor:
    """The Pareto k-hat of the weights exp(log_w) along ``dim``, per data point (float64).

    The M = :func:`tail_length` (S) largest weights, less the (M+1)-th largest, are fitted with a
    generalised Pareto distribution by the method of Zhang and Stephens ("A New and Efficient
    Estimation Method for the Generalized Pareto Distribution", 2009: the posterior mean of
    theta = -k / sigma over a grid of 30 + sqrt(M) points); the shape is then shrunk toward 0.5
    with the weak prior of Vehtari et al. (weight 10 against M), as in PSIS. Values: NaN when
    fewer than 21 weights give fewer than ``MIN_TAIL`` (5) tail weights, or when every weight is
    zero or a log-weight is NaN; -inf when the largest weights are all equal to within the
    rounding of log_w's dtype (no tail at all, e.g. q(z|x) equal to the posterior).
    """
    flat, rest = _columns(log_w, dim, "pareto_khat")
    s, cols = flat.shape
    m_tail = tail_length(s)
    out = torch.full((cols,), math.nan, dtype=torch.float64, device=flat.device)
    if m_tail < MIN_TAIL or cols == 0 or s <= m_tail:
        return out.reshape(rest)
    top = torch.topk(flat, m_tail + 1, dim=0).values  # descending, [M + 1, B]
    return _khat_from_top(top, log_w.dtype).reshape(rest)


def _khat_from_top(top: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """k-hat from the M + 1 largest log-weights per column, descending ([M + 1, B], float64);
    ``dtype``: what the log-weights were computed in (a tail within its rounding is flat)."""
    n = top.shape[0] - 1
    peak = top[0]
    ok = torch.isfinite(peak) & ~torch.isnan(top).any(0)
    shift = torch.where(ok, peak, torch.zeros_like(peak))
    # exceedances over the cutoff, ascending [n, B]; the largest is 1 - exp(cutoff - peak)
    x = (torch.exp(top[:n] - shift) - torch.exp(top[n] - shift)).flip(0)
    xmax = x[-1]
    # weights equal to within the rounding of their log-weights have no tail to fit (a fit of the
    # rounding noise would say anything)
    flat_tail = (peak - top[n]) <= 64 * torch.finfo(dtype).eps * shift.abs().clamp_min(1)
    safe_max = torch.where(flat_tail | ~ok, torch.ones_like(xmax), xmax)
    x = torch.where((flat_tail | ~ok).unsqueeze(0), torch.ones_like(x), x)
    quart = x[int(n / 4 + 0.5) - 1].clamp_min(safe_max * 1e-12)
    grid = 30 + int(math.sqrt(n))
    j = torch.arange(1, grid + 1, dtype=torch.float64, device=top.device).unsqueeze(1)
    theta = 1 / safe_max + (1 - torch.sqrt(grid / (j - 0.5))) / (3 * quart)  # [grid, B], all < 1/xmax
    xi = torch.log1p(-theta.unsqueeze(1) * x.unsqueeze(0)).mean(1)  # [grid, B]: shape for each theta
    profile = n * (torch.log(-theta / xi) - xi - 1)  # profile log-likelihood of theta
    theta_hat = (torch.softmax(profile, 0) * theta).sum(0)
    xi_hat = torch.log1p(-theta_hat * x).mean(0)
    khat = (n * xi_hat + 10 * 0.5) / (n + 10)
    khat = torch.where(flat_tail, torch.full_like(khat, -math.inf), khat)
    return torch.where(ok, khat, torch.full_like(khat, math.nan))


def summarize(khat: Tensor, ess: Tensor, num_weights: int) -> dict:
    """The figures of a set of data points' diagnostics: median and largest k-hat, the fraction of
    points whose k-hat is above :func:`khat_threshold` (num_weights), the median and smallest ESS
    and the median ESS as a fraction of num_weights. NaN k-hats (too few weights) are left out
    of the k-hat figures (None when all are NaN), NaN ESS (missing) from the ESS figures."""
    khat, ess = khat.double().flatten(), ess.double().flatten()
    threshold = khat_threshold(num_weights)
    fitted = khat[~torch.isnan(khat)]
    out = {"num_weights": int(num_weights), "khat_threshold": threshold if fitted.numel() else None}
    if fitted.numel():
        out.update(khat_median=float(fitted.median()), khat_max=float(fitted.max()),
                   khat_above_threshold=float((fitted > threshold).double().mean()))
    else:
        out.update(khat_median=None, khat_max=None, khat_above_threshold=None)
    ess = ess[~torch.isnan(ess)]
    if ess.numel():
        out.update(ess_median=float(ess.median()), ess_min=float(ess.min()),
                   ess_fraction_median=float(ess.median()) / num_weights)
    return out
