"""BayesLinear: a linear layer with factorized-Gaussian random weights (Hernandez-Lobato et al., docs/design.rst, "bayes_linear").

Every row of the input gets its own weight draw (local reparameterization through the fused
:func:`iwae_ext.ops.bayes_linear`, exact in distribution), which is what IWAER needs: one
weight sample per data point and per importance sample.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..keyed import standard_normal
from ..ops import bayes_linear

__all__ = ["BayesLinear", "gaussian_kl"]


def gaussian_kl(mu: Tensor, sigma: Tensor, prior_std: float) -> Tensor:
    """sum KL(N(mu, sigma^2) || N(0, prior_std^2)) over all elements."""
    ratio = sigma / prior_std
    return (0.5 * (ratio.square() + (mu / prior_std).square() - 1) - torch.log(ratio)).sum()


class BayesLinear(nn.Module):
    """y = x W^T + b with W ~ N(weight_mu, softplus(weight_rho)^2), b likewise, drawn per row.

    ``weight_mu``/``bias_mu`` start like ``nn.Linear``'s (or copy a trained layer with
    :meth:`from_linear`); ``weight_rho``/``bias_rho`` start at ``rho_init`` (sigma =
    softplus(rho_init), 0.0067 for the default -5).
    """

    def __init__(self, in_features: int, out_features: int, rho_init: float = -5.0):
        super().__init__()
        if not math.isfinite(rho_init):
            raise ValueError(f"BayesLinear: rho_init must be finite, got {rho_init}")
        self.in_features, self.out_features = in_features, out_features
        ref = nn.Linear(in_features, out_features)
        self.weight_mu = nn.Parameter(ref.weight.detach().clone())
        self.bias_mu = nn.Parameter(ref.bias.detach().clone())
        self.weight_rho = nn.Parameter(torch.full((out_features, in_features), float(rho_init)))
        self.bias_rho = nn.Parameter(torch.full((out_features,), float(rho_init)))

    @classmethod
    def from_linear(cls, linear: nn.Linear, rho_init: float = -5.0) -> "BayesLinear":
        """Means from a (trained) deterministic layer."""
        layer = cls(linear.in_features, linear.out_features, rho_init)
        with torch.no_grad():
            layer.weight_mu.copy_(linear.weight)
            layer.bias_mu.copy_(linear.bias)
        return layer.to(linear.weight.dtype)

    def forward(self, x: Tensor, eps: Tensor | None = None) -> Tensor:
        """x [..., in] -> [..., out]; ``eps`` [..., out] standard normal (drawn when None)."""
        params = (self.weight_mu, self.weight_rho, self.bias_mu, self.bias_rho)
        dev = x.device.type
        if (x.dtype == torch.float32 and torch.is_autocast_enabled(dev)
                and torch.get_autocast_dtype(dev) == torch.bfloat16):
            x = x.to(torch.bfloat16)  # lowered as autocast lowers nn.Linear's input
        if x.dtype == torch.bfloat16 and self.weight_mu.dtype != torch.bfloat16:
            # bfloat16 autocast (training with precision="bf16"): the layer in bfloat16 (its
            # products accumulate in float32), the parameters cast from their float32 masters
            params = tuple(p.to(torch.bfloat16) for p in params)
        elif x.dtype != self.weight_mu.dtype and x.dtype == torch.float16:
            x = x.to(self.weight_mu.dtype)
        if eps is None:  # keyed normals come in float32 or float64
            draw = torch.float32 if x.dtype == torch.bfloat16 else x.dtype
            eps = standard_normal((*x.shape[:-1], self.out_features), draw, x.device).to(x.dtype)
        return bayes_linear(x, *params, eps)

    def kl(self, prior_std: float) -> Tensor:
        """KL(q(W, b) || N(0, prior_std^2 I)), summed."""
        return (gaussian_kl(self.weight_mu, F.softplus(self.weight_rho), prior_std)
                + gaussian_kl(self.bias_mu, F.softplus(self.bias_rho), prior_std))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
