"""bayes_linear: the reparameterized (local reparameterization) Bayesian matmul, docs/design.rst, "bayes_linear"."""

import torch
from torch import Tensor


def bayes_linear(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Tensor,
                 bias_rho: Tensor, eps: Tensor) -> Tensor:
    """x W_mu^T + b_mu + sqrt((x*x) softplus(W_rho)^2^T + softplus(b_rho)^2) * eps.

    x [..., in], weights [out, in], biases [out], eps [..., out] -> [..., out]. Each row is the
    output of a linear layer whose weights are drawn independently for that row from
    N(W_mu, softplus(W_rho)^2), N(b_mu, softplus(b_rho)^2) (exact in distribution).

    float32, float64 or bfloat16 (all six in one dtype; bfloat16: the two products in bfloat16
    with float32 accumulation, the elementwise passes in float32, the result bfloat16). Under
    ``torch.autocast`` the layer runs in its inputs' dtype: autocast is switched off around it,
    so the matrix products inside its kernels are not lowered behind its back.
    """
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        with torch.autocast(dev, enabled=False):
            return torch.ops.iwae_ext.bayes_linear.default(x, weight_mu, weight_rho, bias_mu, bias_rho, eps)[0]
    return torch.ops.iwae_ext.bayes_linear.default(x, weight_mu, weight_rho, bias_mu, bias_rho, eps)[0]


def _check(x, weight_mu, weight_rho, bias_rho, eps, op):
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have at least one dimension [..., in], got a scalar")
    torch._check(x.dtype in (torch.float32, torch.float64, torch.bfloat16),
                 lambda: f"{op}: x must be float32, float64 or bfloat16, got {x.dtype}")
    torch._check(weight_mu.dim() == 2, lambda: f"{op}: weight_mu must have shape [out, in], got {list(weight_mu.shape)}")
    torch._check(weight_mu.shape[1] == x.shape[-1],
                 lambda: f"{op}: x's last dimension ({x.shape[-1]}) must equal weight_mu's in ({weight_mu.shape[1]})")
    out_shape = list(x.shape[:-1]) + [weight_mu.shape[0]]
    for name, t, shape in (("weight_rho", weight_rho, list(weight_mu.shape)),
                           ("bias_rho", bias_rho, [weight_mu.shape[0]]), ("eps", eps, out_shape)):
        torch._check(list(t.shape) == shape, lambda: f"{op}: {name} must have shape {shape}, got {list(t.shape)}")
        torch._check(t.dtype == x.dtype, lambda: f"{op}: {name} must have the dtype of x ({x.dtype}), got {t.dtype}")
    return out_shape


@torch.library.register_fake("iwae_ext::bayes_linear")
def _bayes_linear_fake(x, weight_mu, weight_rho, bias_mu, bias_rho, eps):
    shape = _check(x, weight_mu, weight_rho, bias_rho, eps, "bayes_linear")
    torch._check(list(bias_mu.shape) == [weight_mu.shape[0]],
                 lambda: f"bayes_linear: bias_mu must have shape [{weight_mu.shape[0]}], got {list(bias_mu.shape)}")
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.register_fake("iwae_ext::bayes_linear_backward")
def _bayes_linear_backward_fake(grad_out, x, weight_mu, weight_rho, bias_rho, eps, std, output_mask):
    shape = _check(x, weight_mu, weight_rho, bias_rho, eps, "bayes_linear_backward")
    for name, t in (("grad_out", grad_out), ("std", std)):
        torch._check(list(t.shape) == shape, lambda: f"bayes_linear_backward: {name} must have shape {shape}")
    like = (x, weight_mu, weight_rho, weight_mu.new_empty(weight_mu.shape[0]), bias_rho, eps)
    # contiguous, as the kernels return them (empty_like would copy a transposed x's strides)
    return tuple(t.new_empty(t.shape) if m else None for t, m in zip(like, output_mask))


# Autograd is registered in C++ (csrc/autograd.cpp); double backward raises a clear error.
