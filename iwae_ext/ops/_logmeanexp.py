"""logmeanexp: the fused importance-weight reduction (DESIGN.md section 3.1)."""

import torch
from torch import Tensor

_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def logmeanexp(logw: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    """log((1/K) sum_k exp(logw_k)) along ``dim`` (K = logw.shape[dim]); drops ``dim`` unless keepdim."""
    if not isinstance(logw, Tensor):
        raise TypeError(f"logmeanexp: logw must be a torch.Tensor, got {type(logw).__name__}")
    out = torch.ops.iwae_ext.logmeanexp.default(logw, dim)
    return out.unsqueeze(dim) if keepdim else out


def logmeanexp_backward(grad_out: Tensor, logw: Tensor, out: Tensor, dim: int = -1) -> Tensor:
    """grad_out * softmax(logw, dim), from logw and out = logmeanexp(logw, dim); logw's shape."""
    return torch.ops.iwae_ext.logmeanexp_backward.default(grad_out, logw, out, dim)


def _wrap_dim(logw: Tensor, dim: int, op: str) -> int:
    ndim = logw.dim()
    torch._check(ndim >= 1, lambda: f"{op}: logw must have at least one dimension, got a scalar")
    torch._check(
        -ndim <= dim < ndim,
        lambda: f"{op}: dim must be in [{-ndim}, {ndim - 1}] for logw of shape "
        f"{tuple(logw.shape)}, got {dim}",
    )
    return dim % ndim


def _check_logw(logw: Tensor, dim: int, op: str) -> int:
    dim = _wrap_dim(logw, dim, op)
    allowed = _CPU_DTYPES if logw.device.type == "cpu" else _CUDA_DTYPES
    torch._check(
        logw.dtype in allowed,
        lambda: f"{op}: logw must be one of {[str(d) for d in allowed]} on "
        f"{logw.device.type}, got {logw.dtype}",
    )
    torch._check(
        logw.shape[dim] != 0,
        lambda: f"{op}: logw has no samples to average along dim {dim} (size 0)",
    )
    return dim


@torch.library.register_fake("iwae_ext::logmeanexp")
def _logmeanexp_fake(logw, dim):
    dim = _check_logw(logw, dim, "logmeanexp")
    shape = list(logw.shape)
    del shape[dim]
    return logw.new_empty(shape)


@torch.library.register_fake("iwae_ext::logmeanexp_backward")
def _logmeanexp_backward_fake(grad_out, logw, out, dim):
    dim = _check_logw(logw, dim, "logmeanexp_backward")
    shape = list(logw.shape)
    del shape[dim]
    for name, t in (("grad_out", grad_out), ("out", out)):
        torch._check(
            list(t.shape) == shape,
            lambda: f"logmeanexp_backward: {name} must have shape {shape}, got {list(t.shape)}",
        )
        torch._check(
            t.dtype == logw.dtype,
            lambda: f"logmeanexp_backward: {name} must have the dtype of logw ({logw.dtype}), "
            f"got {t.dtype}",
        )
    return torch.empty_like(logw)


# Autograd (backward and double backward) is registered in C++: csrc/autograd.cpp.
