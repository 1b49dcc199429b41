"""activation: a hidden layer's bias and activation in one pass, and its gradient from the
output (docs/design.rst, "activation"). The decoder's low-precision gradient path uses them,
where torch's bfloat16 tanh (float32 to one ulp, then rounded) costs as much as the layer's
matrix product."""
from __future__ import annotations

import torch
from torch import Tensor

ACTIVATIONS = ("tanh", "sigmoid", "relu")
_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def activation(a: Tensor, bias: Tensor | None = None, kind: str = "tanh") -> Tensor:
    """act(a + bias) for a [..., N] and bias [N] (or None), act one of ``ACTIVATIONS``.

    float32, float64 or bfloat16; the arithmetic in float64 and the result rounded once to a's
    dtype (bfloat16 through float32), so float32 and bfloat16 results are correctly rounded up
    to that double rounding, float64 ones within about ten ulp. Differentiable in a and bias
    (first derivatives, from the output: :func:`activation_backward`)."""
    return torch.ops.iwae_ext.activation.default(a, bias, kind)


def activation_backward(grad: Tensor, out: Tensor, kind: str = "tanh") -> Tensor:
    """grad * act'(a) from out = act(a) alone: tanh ``grad (1 - out^2)``, sigmoid
    ``grad out (1 - out)``, relu ``grad [out > 0]`` (PyTorch's formulas), in out's dtype (the
    arithmetic in float32 for bfloat16)."""
    return torch.ops.iwae_ext.activation_backward.default(grad, out, kind)


def _check_kind(kind, op):
    torch._check(kind in ACTIVATIONS, lambda: f"{op}: activation must be one of {ACTIVATIONS}, got {kind!r}")


@torch.library.register_fake("iwae_ext::activation")
def _activation_fake(a, bias, kind):
    op = "activation"
    _check_kind(kind, op)
    torch._check(a.dtype in _DTYPES, lambda: f"{op}: a must be float32, float64 or bfloat16, got {a.dtype}")
    torch._check(a.dim() >= 1, lambda: f"{op}: a must have at least one dimension, got a scalar")
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == a.shape[-1],
                     lambda: f"{op}: bias must have shape [{a.shape[-1]}] (a's last dimension), "
                     f"got {list(bias.shape)}")
        torch._check(bias.dtype == a.dtype, lambda: f"{op}: bias must have the dtype of a ({a.dtype}), "
                     f"got {bias.dtype}")
    return torch.empty_like(a, memory_format=torch.contiguous_format)


@torch.library.register_fake("iwae_ext::activation_backward")
def _activation_backward_fake(grad, out, kind):
    op = "activation_backward"
    _check_kind(kind, op)
    torch._check(out.dtype in _DTYPES, lambda: f"{op}: out must be float32, float64 or bfloat16, got {out.dtype}")
    torch._check(grad.shape == out.shape, lambda: f"{op}: grad must have shape {list(out.shape)}, "
                 f"got {list(grad.shape)}")
    torch._check(grad.dtype == out.dtype, lambda: f"{op}: grad must have the dtype of out ({out.dtype}), "
                 f"got {grad.dtype}")
    return torch.empty_like(out, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, bias, kind = inputs
    ctx.kind = kind
    ctx.has_bias = bias is not None
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    out, = ctx.saved_tensors
    if torch.is_grad_enabled():
        raise RuntimeError("activation: double backward (create_graph=True) is not implemented")
    da = activation_backward(grad.contiguous(), out, ctx.kind)
    db = None
    if ctx.has_bias and ctx.needs_input_grad[1]:
        db = da.reshape(-1, da.shape[-1]).sum(0, dtype=torch.float32 if da.dtype == torch.bfloat16
                                             else da.dtype).to(da.dtype)
    return da, db, None


torch.library.register_autograd("iwae_ext::activation", _backward, setup_context=_setup_context)
