"""logmeanexp: the fused importance-weight reduction (docs/design.rst, "logmeanexp")."""

import torch
from torch import Tensor

_CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # the low ones through float32
_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def logmeanexp(logw: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    """log((1/K) sum_k exp(logw_k)) along ``dim`` (K = logw.shape[dim]); drops ``dim`` unless keepdim."""
    if not isinstance(logw, Tensor):
        raise TypeError(f"logmeanexp: logw must be a torch.Tensor, got {type(logw).__name__}")
    out = torch.ops.iwae_ext.logmeanexp.default(logw, dim)
    return out.unsqueeze(dim) if keepdim else out


def logmeanexp_stats(logw: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """(out, stats): out = logmeanexp(logw, dim) and stats ``[2, *out.shape]``, the row maximum and
    the log of the normalised sum sum_k exp(logw_k - max) (float32 for float16, bfloat16 and
    float32 logw; float64 for float64): what the backward needs for an accurate gradient."""
    if not isinstance(logw, Tensor):
        raise TypeError(f"logmeanexp_stats: logw must be a torch.Tensor, got {type(logw).__name__}")
    return torch.ops.iwae_ext.logmeanexp_stats.default(logw, dim)


def logmeanexp_backward(grad_out: Tensor, logw: Tensor, out: Tensor, dim: int = -1,
                        stats: Tensor | None = None) -> Tensor:
    """grad_out * softmax(logw, dim), from logw and out = logmeanexp(logw, dim); logw's shape.
    With ``stats`` from :func:`logmeanexp_stats` the softmax is exp((logw - max) - log sum),
    accurate at every value scale; from ``out`` alone it is exp((logw - out) - log K), which
    carries out's rounding (in float32 an ulp of out: 0.004 relative at values of 1e4)."""
    return torch.ops.iwae_ext.logmeanexp_backward.default(grad_out, logw, out, dim, stats)


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


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("iwae_ext::logmeanexp_stats")
def _logmeanexp_stats_fake(logw, dim):
    out = _logmeanexp_fake(logw, dim)
    return out, logw.new_empty([2, *out.shape], dtype=_acc_dtype(logw.dtype))


@torch.library.register_fake("iwae_ext::logmeanexp_backward")
def _logmeanexp_backward_fake(grad_out, logw, out, dim, stats=None):
    dim = _check_logw(logw, dim, "logmeanexp_backward")
    shape = list(logw.shape)
    del shape[dim]
    if stats is not None:
        torch._check(list(stats.shape) == [2, *shape],
                     lambda: f"logmeanexp_backward: stats must have shape {[2, *shape]}, got {list(stats.shape)}")
        torch._check(stats.dtype == _acc_dtype(logw.dtype),
                     lambda: f"logmeanexp_backward: stats must be {_acc_dtype(logw.dtype)} for logw of dtype "
                     f"{logw.dtype} (what logmeanexp_stats returns), got {stats.dtype}")
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
