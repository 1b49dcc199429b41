"""Pure-PyTorch twins of the compiled operators: the definitions the kernels are tested
against (in float64) and benchmarked against (eager and torch.compile)."""
import math

import torch
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
