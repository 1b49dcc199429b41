"""The model protocol of the evaluation tools: what a latent-variable model must offer for
L_k, the ELBO, AIS, SIR / q_IW, active units, reconstruction error and the report, and the
optional hooks through which a model offers faster or more exact paths.

Any object with these two methods qualifies; nothing needs to subclass anything of this package
(``isinstance(model, LatentVariableModel)`` checks the two methods)::

    posterior(x)      x [B, D] -> q(z|x), a torch.distributions.Distribution with batch shape [B]
                      and event shape [Z]: rsample((S,)) or sample((S,)) [S, B, Z], log_prob [S, B]
    log_joint(x, z)   log p(x, z) for x [B, D], z [S, B, Z] -> [S, B]

Optional, used where present (the package's :class:`iwae_ext.models.VAE` has all of them)::

    prior()                       p(z), a Distribution with event shape [Z]: AIS from the prior,
                                  and log p(x|z) = log_joint - prior().log_prob when the model has
                                  no log_likelihood
    log_likelihood(x, z)          log p(x|z), [S, B] (reconstruction errors)
    log_weights(x, k, return_latent=False)
                                  log p(x, z_k) - log q(z_k|x) with z_k ~ q: [k, B] (and z
                                  [k, B, Z]); the only correct path for models whose weights are
                                  random too (IWAER), and a fused one for the package's models
    log_joint_and_grad(x, z, value=True) with has_fast_log_joint_grad = True
                                  log p(x, z) and its gradient in z for x [C, D], z [C, Z]
                                  without autograd (AIS)
    posterior_means(x, num_samples)
                                  [E_q[z_l]] per stochastic layer (active units); default
                                  [posterior(x).mean]
    simulate(n, generator=None)   (x [n, D], z [n, Z]) drawn from p(x, z) (BDMC)
    sample(n), reconstruct(x)     decoder means [n, D], [B, D] (the report's figures)
    likelihood                    "bernoulli" or "gaussian": Bernoulli data must lie in [0, 1]

A model that is an ``nn.Module`` is put in eval mode during evaluation and back afterwards; its
first parameter (or buffer) gives the device and dtype the data are moved to.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.distributions import Distribution

__all__ = ["LatentVariableModel", "check_model", "device_dtype", "log_weights", "posterior_means",
           "log_likelihood", "latent_dim", "prior"]


@runtime_checkable
class LatentVariableModel(Protocol):
    """A latent-variable model p(x, z) with an amortised posterior q(z|x) (see the module doc)."""

    def posterior(self, x: Tensor) -> Distribution:
        """q(z|x) for x [B, D]: batch shape [B], event shape [Z]."""
        ...

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x, z) for x [B, D], z [S, B, Z]: [S, B]."""
        ...


def check_model(model, fn: str):
    """TypeError naming what is missing when ``model`` does not have the protocol's methods."""
    missing = [m for m in ("posterior", "log_joint") if not callable(getattr(model, m, None))]
    if missing and not callable(getattr(model, "log_weights", None)):  # log_weights alone gives L_k
        raise TypeError(f"{fn}: model must have posterior(x) and log_joint(x, z) "
                        f"(iwae_ext.LatentVariableModel); {type(model).__name__} has no "
                        f"{' and no '.join(missing)}")


def device_dtype(model, x: Tensor | None = None) -> tuple[torch.device, torch.dtype]:
    """Where and in what dtype the model computes: its first parameter or buffer, else x's
    (floating) or the default."""
    for attr in ("parameters", "buffers"):
        it = getattr(model, attr, None)
        if callable(it):
            t = next(iter(it()), None)
            if t is not None:
                return t.device, t.dtype
    if x is not None:
        return x.device, x.dtype if x.is_floating_point() else torch.get_default_dtype()
    return torch.device("cpu"), torch.get_default_dtype()


_UNKEYED_WARNED: set = set()


def _keyed_draw(q: Distribution, shape: tuple) -> Tensor | None:
    """A draw of q with the keyed normals of the active :func:`iwae_ext.keyed.keyed_draws`, for
    the torch.distributions whose reparameterisation is known (Normal, Independent(Normal),
    MultivariateNormal); None for others."""
    from torch.distributions import Independent, MultivariateNormal, Normal
    from .keyed import standard_normal
    base = q.base_dist if isinstance(q, Independent) else q
    ext = q._extended_shape(torch.Size(shape))
    if isinstance(base, Normal):
        return base.loc + base.scale * standard_normal(ext, base.loc.dtype, base.loc.device)
    if isinstance(q, MultivariateNormal):
        eps = standard_normal(ext, q.loc.dtype, q.loc.device)
        return q.loc + (q._unbroadcasted_scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
    return None


def _draw(q: Distribution, shape: tuple) -> Tensor:
    from .keyed import active
    if active() and type(q).__module__.startswith(("torch.distributions", "pyro.distributions")):
        z = _keyed_draw(q, shape)
        if z is not None:
            return z
        name = type(q).__name__
        if name not in _UNKEYED_WARNED:
            import warnings
            _UNKEYED_WARNED.add(name)
            warnings.warn(f"posterior(x) is a {name}, whose draws cannot be keyed per image: its samples "
                          f"come from torch's global generator, so an image's estimate depends on its batch "
                          f"(return a Normal, Independent(Normal) or MultivariateNormal for per-image streams)")
    return q.rsample(shape) if q.has_rsample else q.sample(shape)


def log_weights(model, x: Tensor, k: int, return_latent: bool = False):
    """log w = log p(x, z) - log q(z|x), z ~ q(z|x): [k, B] (and z [k, B, Z])."""
    own = getattr(model, "log_weights", None)
    if callable(own):
        return own(x, k, return_latent=True) if return_latent else own(x, k)
    q = model.posterior(x)
    z = _draw(q, (k,))
    lw = model.log_joint(x, z) - q.log_prob(z)
    if lw.shape != (k, x.shape[0]):
        raise ValueError(f"log_joint(x, z) - posterior(x).log_prob(z) must have shape [k, B] = "
                         f"[{k}, {x.shape[0]}] for z [k, B, Z], got {tuple(lw.shape)}: check that "
                         f"posterior(x) has batch shape [B] and event shape [Z]")
    return (lw, z) if return_latent else lw


def posterior_means(model, x: Tensor, num_samples: int = 100) -> list[Tensor]:
    """[E_q[z_l] for each stochastic layer l], each [B, Z_l]."""
    own = getattr(model, "posterior_means", None)
    if callable(own):
        return own(x, num_samples)
    return [model.posterior(x).mean]


def prior(model, fn: str) -> Distribution:
    own = getattr(model, "prior", None)
    if not callable(own):
        raise ValueError(f"{fn}: the model has no prior() (a Distribution over z), which this needs")
    return own()


def log_likelihood(model, x: Tensor, z: Tensor) -> Tensor:
    """log p(x|z) for x [B, D], z [S, B, Z]: [S, B]."""
    own = getattr(model, "log_likelihood", None)
    if callable(own):
        return own(x, z)
    return model.log_joint(x, z) - prior(model, "log p(x|z)").log_prob(z)


def latent_dim(model, x: Tensor) -> int:
    """Z, the size of the latent vector z the model's log_joint takes."""
    own = getattr(model, "latent_dim", None)
    if isinstance(own, int):
        return own
    return int(model.posterior(x[:1]).event_shape[-1])


class evaluation_mode:
    """Context: an nn.Module model in eval mode, restored afterwards."""

    def __init__(self, model):
        self.model = model
        self.was_training = getattr(model, "training", None)

    def __enter__(self):
        if self.was_training is not None and callable(getattr(self.model, "eval", None)):
            self.model.eval()
        return self.model

    def __exit__(self, *exc):
        if self.was_training is not None and callable(getattr(self.model, "train", None)):
            self.model.train(self.was_training)
        return False
