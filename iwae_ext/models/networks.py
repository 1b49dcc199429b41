"""A VAE / IWAE around the user's own encoder and decoder networks (convolutional, residual, ...).

:class:`NetworkVAE` makes a :class:`~iwae_ext.protocol.LatentVariableModel` of any pair of
``nn.Module``s, so that the trainer (``iwae_ext.train(encoder_net=..., decoder_net=...)``) trains it
with every bound and estimator of the package's own MLPs, and every evaluation tool takes it:

- ``encoder(x)`` takes a batch of data points in ``input_shape`` (e.g. [B, 1, 28, 28]) and returns
  q(z|x)'s parameters: a tuple ``(loc, log_variance)``, each [B, Z], or one tensor [B, 2 Z] whose
  halves they are;
- ``decoder(z)`` takes z [N, Z] and returns, for a Bernoulli likelihood, the logits of the pixels
  ([N, ...] with D values per row); for a Gaussian one, ``(mean, log_variance)`` or the mean alone
  (unit variance).

p(z) is N(0, I). Draws come from the package's keyed streams (per image, as for its own models),
and where the decoder's output is its final ``nn.Linear`` (checked on probe latents) the
Bernoulli log-likelihood is the fused output layer.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._output_layer import find_output_layer, input_of
from .vae import LOG_2PI, DiagonalNormal, _full, standard_normal_log_prob

__all__ = ["NetworkVAE"]


def _describe(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _split(out, latent_dim: int | None = None) -> tuple[Tensor, Tensor]:
    """(loc, log_variance) from an encoder's output: a pair, or one tensor of both halves
    (``latent_dim`` None: any even width)."""
    if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, Tensor) for t in out):
        return out[0], out[1]
    if isinstance(out, Tensor) and (out.shape[-1] == 2 * latent_dim if latent_dim else out.shape[-1] % 2 == 0):
        return out.chunk(2, -1)
    got = [tuple(getattr(t, "shape", ())) for t in out] if isinstance(out, (tuple, list)) else \
        (tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__)
    z = latent_dim or "Z"
    raise ValueError(f"NetworkVAE: the encoder must return (loc, log_variance), each [B, {z}], or one tensor "
                     f"[B, 2 x {z}]; it returned {got}")


class NetworkVAE(nn.Module):
    """q(z|x) = N(loc, diag(exp(log_variance))) from ``encoder``; p(x|z) from ``decoder``
    (``likelihood`` "bernoulli": logits; "gaussian": mean and log-variance, or mean); p(z) = N(0, I).
    ``input_shape``: the shape of one data point as the encoder takes it (default [D]); data
    passed to the protocol's methods are rows [B, D]."""

    random_weights = "none"

    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent_dim: int, likelihood: str = "bernoulli",
                 input_shape: tuple | None = None, x_dim: int | None = None, fused: bool = True):
        super().__init__()
        for name, net in (("encoder", encoder), ("decoder", decoder)):
            if not isinstance(net, nn.Module):
                raise TypeError(f"NetworkVAE: {name} must be an nn.Module, got {type(net).__name__}")
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"NetworkVAE: likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"NetworkVAE: latent_dim must be a positive int, got {latent_dim!r}")
        self.encoder, self.decoder = encoder, decoder
        self.input_shape = tuple(input_shape) if input_shape else None
        self.x_dim = math.prod(self.input_shape) if self.input_shape else x_dim
        if not self.x_dim:
            raise ValueError("NetworkVAE: give input_shape (one data point's shape) or x_dim")
        self.latent_dims = [latent_dim]
        self.likelihood = likelihood
        self.use_fused = fused
        self._final = None  # the decoder's output layer once checked
        self._checked = False

    @classmethod
    def probing(cls, encoder: nn.Module, decoder: nn.Module, x: Tensor, likelihood: str = "bernoulli",
                input_shape: tuple | None = None, fused: bool = True) -> "NetworkVAE":
        """The model with Z read from the encoder's output on the data rows x [N, D]."""
        p = next(encoder.parameters(), None)
        if p is not None:
            x = x.to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            loc, _ = _split(encoder(x.reshape(x.shape[0], *input_shape) if input_shape else x))
        return cls(encoder, decoder, int(loc.shape[-1]), likelihood, input_shape, x.shape[-1], fused)

    @property
    def latent_dim(self) -> int:
        return self.latent_dims[0]

    @property
    def config(self) -> dict:
        """What rebuilds the model besides the networks themselves (classes named, not pickled)."""
        return {"class": "NetworkVAE", "encoder": _describe(self.encoder), "decoder": _describe(self.decoder),
                "latent_dim": self.latent_dim, "likelihood": self.likelihood, "input_shape": self.input_shape,
                "x_dim": self.x_dim}

    @property
    def fused(self) -> bool:
        """Whether the Bernoulli log-likelihood runs through the fused output layer."""
        self._check()
        return self._final is not None

    @fused.setter
    def fused(self, value: bool):  # the trainer's reference-ops switch
        self.use_fused = bool(value)
        self._checked = False
        self._final = None

    # -- the networks ---------------------------------------------------------------------------

    def _shaped(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.input_shape) if self.input_shape else x

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        loc, logvar = _split(self.encoder(self._shaped(x)), self.latent_dim)
        if loc.shape != (x.shape[0], self.latent_dim) or logvar.shape != loc.shape:
            raise ValueError(f"NetworkVAE: the encoder's loc and log_variance must be [B, Z] = "
                             f"[{x.shape[0]}, {self.latent_dim}], got {tuple(loc.shape)} and {tuple(logvar.shape)}")
        # under bfloat16 autocast the networks' products are bfloat16; densities and draws are float32
        return _full(loc), _full(logvar)

    def _decode(self, z: Tensor):
        """The decoder's output for z [..., Z], rows flattened: logits [..., D], or (mean, logvar)."""
        lead = z.shape[:-1]
        out = self.decoder(z.reshape(-1, self.latent_dim))
        if isinstance(out, (tuple, list)):
            return tuple(_full(t).reshape(*lead, self.x_dim) for t in out)
        return _full(out).reshape(*lead, self.x_dim)

    def _check(self):
        if self._checked:
            return
        self._checked = True
        if self.use_fused and self.likelihood == "bernoulli":
            self._final = self._find_output_layer()

    def _hidden(self, z: Tensor) -> Tensor:
        return input_of(self._final, self.decoder, z)

    def _find_output_layer(self):
        """The decoder's last nn.Linear when the decoder's output is exactly it (probe latents)."""
        return find_output_layer(self.decoder, lambda z: self.decoder(z), self.latent_dim, self.x_dim)

    # -- the protocol ---------------------------------------------------------------------------

    def posterior(self, x: Tensor) -> DiagonalNormal:
        return DiagonalNormal(*self._encode(x))

    def prior(self):
        p = next(self.parameters())
        zero = torch.zeros(self.latent_dim, dtype=p.dtype, device=p.device)
        return torch.distributions.Independent(torch.distributions.Normal(zero, torch.ones_like(zero)), 1)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        return standard_normal_log_prob(z)

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x|z) for x [B, D], z [S, B, Z]: [S, B]."""
        self._check()
        if self._final is not None:
            from ..ops import bernoulli_log_prob
            lead = z.shape[:-1]
            h = self._hidden(z.reshape(-1, self.latent_dim))
            w = self._final.weight
            if h.dtype != w.dtype:  # under bfloat16 autocast: the output layer in the weights' dtype
                h = h.to(w.dtype)
            return bernoulli_log_prob(h.reshape(*lead, h.shape[-1]), w, self._final.bias, x.to(w.dtype))
        out = self._decode(z)
        if self.likelihood == "bernoulli":
            logits = out if isinstance(out, Tensor) else out[0]
            return (x * logits - nn.functional.softplus(logits)).sum(-1)
        mean, logvar = (out, None) if isinstance(out, Tensor) else out
        if logvar is None:
            return -0.5 * ((x - mean).square().sum(-1) + self.x_dim * LOG_2PI)
        return -0.5 * ((x - mean).square() * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        return self.log_likelihood(x, z) + standard_normal_log_prob(z)

    def log_weights(self, x: Tensor, k: int, stop_gradient_q: bool = False, return_latent: bool = False):
        """log p(x, z) - log q(z|x), z ~ q: [k, B] (and z [k, B, Z]); ``stop_gradient_q``: q's
        density with its parameters cut from the graph (STL, DReG)."""
        q = self.posterior(x)
        z = q.rsample((k,))
        lw = self.log_joint(x, z) - (q.detached() if stop_gradient_q else q).log_prob(z)
        return (lw, z) if return_latent else lw

    def kl_divergence(self, x: Tensor) -> Tensor:
        return self.posterior(x).kl_standard_normal()

    def posterior_means(self, x: Tensor, num_samples: int = 100) -> list[Tensor]:
        return [self._encode(x)[0]]

    def sample(self, n: int, mean: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Decoder means [n, D] at n draws of p(z)."""
        p = next(self.parameters())
        z = torch.randn(n, self.latent_dim, dtype=p.dtype, device=p.device, generator=generator)
        return self._mean(self._decode(z))

    def reconstruct(self, x: Tensor) -> Tensor:
        return self._mean(self._decode(self._encode(x)[0]))

    def _mean(self, out) -> Tensor:
        if self.likelihood == "bernoulli":
            return torch.sigmoid(out if isinstance(out, Tensor) else out[0])
        return out if isinstance(out, Tensor) else out[0]
