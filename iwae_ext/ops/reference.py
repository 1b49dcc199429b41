"""Pure-PyTorch twins of the compiled operators: the definitions the kernels are tested
against (in float64) and benchmarked against (eager and torch.compile)."""
import math

import torch
import torch.nn.functional as F
from torch import Tensor


def logmeanexp(logw: Tensor, dim: int = -1) -> Tensor:
    """log((1/K) sum_k exp(logw_k)) along dim; logw [..., K, ...] -> [..., ...]."""
    return torch.logsumexp(logw, dim) - math.log(logw.shape[dim])


def logmeanexp_backward(grad_out: Tensor, logw: Tensor, out: Tensor, dim: int = -1) -> Tensor:
    """grad_out * softmax(logw, dim); zero for rows whose out is -inf. Shape of logw."""
    lse = (out + math.log(logw.shape[dim])).unsqueeze(dim)
    p = torch.exp(logw - lse)
    p = torch.where(torch.isneginf(lse), torch.zeros_like(p), p)
    return grad_out.unsqueeze(dim) * p


def bayes_linear(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Tensor,
                 bias_rho: Tensor, eps: Tensor) -> Tensor:
    """Local reparameterization: x [..., in], weights [out, in], biases [out], eps [..., out]."""
    mean = F.linear(x, weight_mu, bias_mu)
    var = F.linear(x * x, F.softplus(weight_rho).square(), F.softplus(bias_rho).square())
    return mean + var.sqrt() * eps


def bayes_linear_per_row_weights(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Tensor,
                                 bias_rho: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The exact (naive) Bayesian layer: one weight matrix and bias drawn per row of x.

    x [..., in] -> [..., out]; materialises [rows, out, in] weights (memory grows with rows)."""
    rows = x.reshape(-1, x.shape[-1])
    m = rows.shape[0]
    w = weight_mu + F.softplus(weight_rho) * torch.randn(
        m, *weight_mu.shape, dtype=x.dtype, device=x.device, generator=generator)
    b = bias_mu + F.softplus(bias_rho) * torch.randn(
        m, *bias_mu.shape, dtype=x.dtype, device=x.device, generator=generator)
    y = torch.bmm(w, rows.unsqueeze(-1)).squeeze(-1) + b
    return y.reshape(*x.shape[:-1], weight_mu.shape[0])
