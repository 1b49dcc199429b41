"""bernoulli_log_prob: the decoder's output layer and its Bernoulli log-likelihood in one pass
(docs/design.rst, "bernoulli_log_prob")."""

import torch
from torch import Tensor

_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def bernoulli_log_prob(h: Tensor, weight: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    """sum_d x_d l_d - softplus(l_d) with l = h W^T + bias: log p(x | logits l) of independent
    Bernoulli pixels, without forming the logits in full.

    h [..., B, H] (any leading sample dims), weight [D, H], bias [D], x [B, D] (values in [0, 1];
    broadcast over the sample dims, never expanded) -> [..., B]. float32 or float64; or
    bfloat16 h and weight (bias and x bfloat16 or float32): the matrix product in bfloat16 with
    float32 accumulation, the logits stored in bfloat16, every other step in float32, and a
    float32 result (its gradients come in the inputs' dtypes). Stable for
    any ``|l|`` (the terms are formed as ``(x - [l > 0]) l - log1p(exp(-|l|))``). Differentiable in h,
    weight, bias and x (first derivatives); the backward recomputes the logits block by block.
    """
    return torch.ops.iwae_ext.bernoulli_log_prob.default(h, weight, bias, x)


def bernoulli_log_prob_grad_h(h: Tensor, weight: Tensor, bias: Tensor, x: Tensor,
                              value: bool = True, low_weight: Tensor | None = None
                              ) -> tuple[Tensor | None, Tensor]:
    """(bernoulli_log_prob(h, weight, bias, x), its gradient in h) in one pass, without autograd:
    d/dh = (x - sigmoid(l)) W, [..., B, H]. ``value=False``: the gradient only (value None).

    ``low_weight`` (weight in bfloat16, for float32 or float64 h): the value as without it, and
    d/dh taken as the product of x - sigmoid(l) rounded to bfloat16 with ``low_weight`` (float32
    accumulation), returned in bfloat16: the exact energy and a cheaper gradient at once, as an
    HMC trajectory's end needs (docs/sampling.rst, "Gradient precision")."""
    out, grad_h = torch.ops.iwae_ext.bernoulli_log_prob_grad_h.default(h, weight, bias, x, bool(value),
                                                                       low_weight)
    return (out if value else None), grad_h


def _math_dtype(h):
    """The value's dtype: h's, or float32 for bfloat16 h (the epilogue's arithmetic)."""
    return torch.float32 if h.dtype == torch.bfloat16 else h.dtype


def _check(h, weight, bias, x, op):
    torch._check(h.dim() >= 2, lambda: f"{op}: h must have shape [..., B, H] (at least two dimensions), "
                 f"got {list(h.shape)}")
    torch._check(h.dtype in _DTYPES, lambda: f"{op}: h must be float32, float64 or bfloat16, got {h.dtype}")
    torch._check(weight.dim() == 2, lambda: f"{op}: weight must have shape [D, H], got {list(weight.shape)}")
    torch._check(weight.shape[1] == h.shape[-1],
                 lambda: f"{op}: h's last dimension ({h.shape[-1]}) must equal weight's H ({weight.shape[1]})")
    d = weight.shape[0]
    torch._check(list(bias.shape) == [d], lambda: f"{op}: bias must have shape [{d}] (weight's D), "
                 f"got {list(bias.shape)}")
    torch._check(list(x.shape) == [h.shape[-2], d],
                 lambda: f"{op}: x must have shape [B, D] = [{h.shape[-2]}, {d}], got {list(x.shape)}")
    torch._check(weight.dtype == h.dtype,
                 lambda: f"{op}: weight must have the dtype of h ({h.dtype}), got {weight.dtype}")
    low = h.dtype == torch.bfloat16
    for name, t in (("bias", bias), ("x", x)):
        torch._check(t.dtype == h.dtype or (low and t.dtype == torch.float32),
                     lambda: f"{op}: {name} must have the dtype of h ({h.dtype})"
                     f"{' or float32' if low else ''}, got {t.dtype}")
    return list(h.shape[:-1])


@torch.library.register_fake("iwae_ext::bernoulli_log_prob")
def _bernoulli_log_prob_fake(h, weight, bias, x):
    return h.new_empty(_check(h, weight, bias, x, "bernoulli_log_prob"), dtype=_math_dtype(h))


@torch.library.register_fake("iwae_ext::bernoulli_log_prob_backward")
def _bernoulli_log_prob_backward_fake(grad_out, h, weight, bias, x, output_mask):
    shape = _check(h, weight, bias, x, "bernoulli_log_prob_backward")
    torch._check(list(grad_out.shape) == shape,
                 lambda: f"bernoulli_log_prob_backward: grad_out must have shape {shape}, got {list(grad_out.shape)}")
    like = (h, weight, bias)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if m else None
                 for t, m in zip(like, output_mask))


@torch.library.register_fake("iwae_ext::bernoulli_log_prob_grad_h")
def _bernoulli_log_prob_grad_h_fake(h, weight, bias, x, value, low_weight=None):
    op = "bernoulli_log_prob_grad_h"
    shape = _check(h, weight, bias, x, op)
    dh_dtype = h.dtype
    if low_weight is not None:
        torch._check(h.dtype != torch.bfloat16,
                     lambda: f"{op}: low_weight is for float32 or float64 h (h is already bfloat16)")
        torch._check(low_weight.dtype == torch.bfloat16,
                     lambda: f"{op}: low_weight must be bfloat16, got {low_weight.dtype}")
        torch._check(low_weight.shape == weight.shape,
                     lambda: f"{op}: low_weight must have weight's shape {list(weight.shape)}, "
                     f"got {list(low_weight.shape)}")
        dh_dtype = low_weight.dtype
    return (h.new_empty(shape if value else [0], dtype=_math_dtype(h)),
            torch.empty_like(h, dtype=dh_dtype, memory_format=torch.contiguous_format))


@torch.library.register_fake("iwae_ext::bernoulli_log_prob_dlogit")
def _bernoulli_log_prob_dlogit_fake(h, weight, bias, x):
    shape = _check(h, weight, bias, x, "bernoulli_log_prob_dlogit")
    return h.new_empty(shape, dtype=_math_dtype(h)), h.new_empty(shape + [weight.shape[0]])


# Autograd is registered in C++ (csrc/autograd.cpp); double backward raises a clear error.
