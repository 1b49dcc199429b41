"""Sampling-importance-resampling from q_IW (Cremer et al., Algorithm 1)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import protocol as _protocol
from ..ops import logmeanexp


def sir(model, x: Tensor, k: int, num_samples: int = 1, generator: torch.Generator | None = None,
        return_weights: bool = False):
    """Draws from q_IW(z|x) (Cremer et al., Algorithm 1), vectorised over the batch.

    For each data point: k proposals z_i ~ q(z|x), weights w_i = p(x, z_i) / q(z_i|x) normalised
    through the fused log-mean-exp (w~_i = exp(log w_i - logmeanexp(log w) - log k)), then
    ``num_samples`` indices j ~ Cat(w~) (with replacement, from the same k proposals). Returns
    z [num_samples, B, Z]; with ``return_weights`` also the normalised weights [k, B]. k = 1 is
    q itself; as k grows q_IW approaches the posterior p(z|x). For random-weight models the
    proposals are drawn jointly with the weights, as in their ``log_weights``.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"sir: k must be a positive int, got {k!r}")
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"sir: num_samples must be a positive int, got {num_samples!r}")
    with torch.no_grad():
        log_w, z = _protocol.log_weights(model, x, k, return_latent=True)  # [k, B], [k, B, Z]
        log_norm = log_w - logmeanexp(log_w, 0).unsqueeze(0) - math.log(k)
        w = torch.exp(log_norm)  # [k, B], each column sums to 1
        if not bool(torch.isfinite(w).all()):
            raise ValueError("sir: non-finite importance weights (a data point where every log-weight "
                             "is -inf or NaN)")
        idx = torch.multinomial(w.t(), num_samples, replacement=True, generator=generator)  # [B, S]
        b = torch.arange(z.shape[1], device=z.device)
        out = z[idx.t(), b.unsqueeze(0)]  # [S, B, Z]
    return (out, w) if return_weights else out
