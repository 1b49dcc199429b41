"""Models: ``nn.Module`` classes only (no objectives, no training loop).

:class:`VAE` is the latent-variable model of the VAE and IWAE papers, with one or two
stochastic layers; VAE and IWAE differ only in the objective they are trained with
(:mod:`iwae_ext.objectives`). Its interface, relied on by the rest of the package:

- ``posterior(x)``: q(z|x), a ``torch.distributions.Distribution`` with batch shape [B] and event
  shape [Z]; ``rsample((S,))`` gives [S, B, Z] and ``log_prob(z)`` gives [S, B];
- ``log_joint(x, z)``: log p(x, z) for z of shape [S, B, Z], returning [S, B];
- ``log_weights(x, k)``: log p(x, z_k) - log q(z_k|x) for z_k ~ q(z|x), shape [k, B];
- ``sample(n)``: decoder means (or draws) of n samples from p(x); ``reconstruct(x)``.

Two stochastic layers (Burda et al. 2016): q(z1|x) q(z2|z1) and p(z2) p(z1|z2) p(x|z1). Their
latent tuple (z1, z2) is one tensor z = cat([z1, z2], -1) of width Z = Z1 + Z2 everywhere in
this interface; :meth:`VAE.split_latent` splits it.

Random weights (IWAER, IWAER_rec; Hernandez-Lobato et al.): ``VAE(..., random_weights="all" | "encoder")``
makes those networks' layers :class:`BayesLinear`. ``log_weights(x, k)`` then draws the weights
per data point and per importance sample, jointly with z (Hernandez-Lobato et al., eq. 3), so L_k and its
evaluation need no other code; ``posterior(x)`` draws one encoder weight sample per data point.

:class:`NetworkVAE` is the same interface around the user's own encoder and decoder networks
(convolutional or any other ``nn.Module``), which ``iwae_ext.train(encoder_net=..., decoder_net=...)`` trains.
"""
from .bayes import BayesLinear
from .networks import NetworkVAE
from .vae import (MLP, BernoulliDecoder, ConditionalGaussian, DiagonalNormal, GaussianDecoder,
                  HierarchicalPosterior, VAE)

__all__ = ["MLP", "ConditionalGaussian", "DiagonalNormal", "BernoulliDecoder", "GaussianDecoder",
           "HierarchicalPosterior", "VAE", "BayesLinear", "NetworkVAE"]
