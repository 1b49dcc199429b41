"""Objectives: pure functions of log-weights, and the encoder-gradient estimators.

With log w_k = log p(x, z_k) - log q(z_k|x), z_k ~ q(z|x), k = 1..K (shape [K, B]):

- ``iwae_bound``: L_K = log (1/K) sum_k w_k (Burda et al. 2016, eq. 8), through the fused
  :func:`iwae_ext.ops.logmeanexp`; L_1 is the ELBO;
- ``elbo``: L^A = (1/K) sum_k log w_k, the ELBO with a Monte Carlo KL (Kingma & Welling eq. 6);
- ``elbo_analytic``: L^B = (1/K) sum_k log p(x|z_k) - KL(q(z|x) || p(z)) (their eq. 7).

:func:`objective` evaluates one of them for a model and a minibatch with an encoder-gradient
estimator: "standard" (the reparameterisation gradient of the bound), "stl" (sticking the
landing, Roeder et al. 2017: log q with its parameters stopped) or "dreg" (doubly reparameterised,
Tucker et al. 2019, eq. 5: encoder gradient sum_k w~_k^2 d log w_k / dz_k dz_k/dphi). The decoder's
gradient is the standard one in all three. The returned tensor's value is always the bound;
only its gradient with respect to the encoder differs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_choice
from .ops import logmeanexp, reference

OBJECTIVES = ("iwae", "elbo")
ESTIMATORS = ("standard", "stl", "dreg")
KL_ESTIMATORS = ("mc", "analytic")

__all__ = ["iwae_bound", "elbo", "elbo_analytic", "normalized_weights", "objective", "aiwae_step",
           "AIWAEStep", "OBJECTIVES", "ESTIMATORS", "KL_ESTIMATORS"]


def iwae_bound(log_w: Tensor, dim: int = 0, fused: bool = True) -> Tensor:
    """L_K = log mean_k exp(log w_k) along ``dim``: [K, B] -> [B].

    ``fused=False`` uses the pure-PyTorch twin (for comparisons)."""
    return logmeanexp(log_w, dim) if fused else reference.logmeanexp(log_w, dim)


def elbo(log_w: Tensor, dim: int = 0) -> Tensor:
    """L^A = mean_k log w_k along ``dim`` (Monte Carlo KL): [K, B] -> [B]."""
    return log_w.mean(dim)


def elbo_analytic(log_likelihood: Tensor, kl: Tensor, dim: int = 0) -> Tensor:
    """L^B = mean_k log p(x|z_k) - KL(q || p): log_likelihood [K, B], kl [B] -> [B]."""
    return log_likelihood.mean(dim) - kl


def normalized_weights(log_w: Tensor, dim: int = 0) -> Tensor:
    """w~_k = w_k / sum_j w_j along ``dim``, cut from the graph: [K, B]."""
    return torch.softmax(log_w.detach(), dim)


def _check(objective_name: str, estimator: str, kl: str):
    check_choice("objective", objective_name, OBJECTIVES)
    check_choice("estimator", estimator, ESTIMATORS)
    check_choice("kl", kl, KL_ESTIMATORS)
    if kl == "analytic" and (objective_name != "elbo" or estimator != "standard"):
        raise ValueError("kl='analytic' applies to objective='elbo' with estimator='standard' "
                         f"(got objective={objective_name!r}, estimator={estimator!r})")
    if estimator == "dreg" and objective_name != "iwae":
        raise ValueError("estimator='dreg' is the IWAE bound's estimator (objective='iwae'); "
                         "for the ELBO use 'stl', which DReG reduces to at K = 1")


def objective(model, x: Tensor, k: int, objective: str = "iwae", estimator: str = "standard",
              kl: str = "mc", fused: bool = True) -> Tensor:
    """The bound per data point, [B], whose gradient is the chosen estimator.

    ``model`` follows the :mod:`iwae_ext.models` interface (``log_weights``, and
    ``log_likelihood``/``posterior``/``kl_divergence`` for ``kl='analytic'``). ``fused=False``
    reduces with the pure-PyTorch twin of logmeanexp instead of the fused op.
    """
    _check(objective, estimator, kl)
    if kl == "analytic":
        q = model.posterior(x)
        if not hasattr(q, "kl_standard_normal"):
            model.kl_divergence(x)  # raises the model's own error (two stochastic layers)
        z = q.rsample((k,))
        return elbo_analytic(model.log_likelihood(x, z), q.kl_standard_normal())
    stop = estimator in ("stl", "dreg")
    log_w, z = model.log_weights(x, k, stop_gradient_q=stop, return_latent=True)
    if estimator == "dreg" and z.requires_grad:
        # The gradient reaching z_k is w~_k d log w_k / dz_k; scaling it by w~_k gives DReG's
        # w~_k^2 for the encoder, while the decoder's gradient (not through z) stays w~_k.
        w = normalized_weights(log_w).unsqueeze(-1)
        z.register_hook(lambda grad: grad * w)
    return iwae_bound(log_w, fused=fused) if objective == "iwae" else elbo(log_w)


class AIWAEStep:
    """The two losses of one AIWAE step (Ding and Freedman, Algorithm 1) for a minibatch.

    ``decoder_loss``: -(1/B) sum_b sum_k w~_bk log p(x_b, z_bk) with z_bk the final states of K
    AIS chains from q(z|x) to p(x, z) and w~ their normalised annealed weights, both held fixed:
    its gradient in theta is the AIS estimate of -grad log p(x). No graph through the HMC
    transitions, so memory does not grow with T or L.
    ``encoder_loss``: -ELBO (one reparameterised sample), for the encoder's parameters only.
    ``bound``: [B] the AIS estimate log (1/K) sum_k w_k (a stochastic lower bound of log p(x)).
    ``acceptance``: [T-1] mean acceptance per temperature.
    """

    def __init__(self, decoder_loss: Tensor, encoder_loss: Tensor, bound: Tensor, acceptance: Tensor):
        self.decoder_loss, self.encoder_loss = decoder_loss, encoder_loss
        self.bound, self.acceptance = bound, acceptance


def aiwae_step(model, x: Tensor, k: int, betas: Tensor, num_leapfrog: int, step_sizes: Tensor,
               generator=None, encoder_only_elbo: bool = False) -> AIWAEStep:
    """AIWAE's losses for ``model`` (one stochastic layer, deterministic weights) on x [B, D]:
    K = ``k`` chains per point, inverse temperatures ``betas`` (beta_t = t / (T - 1) in the
    paper), ``num_leapfrog`` leapfrog steps per HMC transition with the per-temperature
    ``step_sizes`` [T-1] (the caller adapts them between steps toward an acceptance of 0.6).
    ``generator``: a torch.Generator, or a :class:`iwae_ext.keyed.KeyedNoise` for x's images
    (keyed AIS draws; the ELBO's sample is keyed when a ``keyed_draws`` is active).
    ``encoder_only_elbo``: the encoder loss's graph reaches the encoder's parameters only (the
    decoder's are used detached), so ``(decoder_loss + encoder_loss).backward()`` gives each
    part its own gradient in one backward pass (what data-parallel training needs)."""
    from .samplers import ais, model_ais_densities
    if len(model.latent_dims) != 1 or model.random_weights != "none":
        raise ValueError("AIWAE: needs one stochastic layer and deterministic weights")
    b = x.shape[0]
    with torch.no_grad():
        dens = model_ais_densities(model, x, k, "posterior", True, generator)
        # a few temperatures per step: capturing a CUDA graph each step would cost more than it saves
        res = ais(None, None, dens.z0, betas, num_leapfrog, grad_fn=dens.grad_fn, generator=generator,
                  temperature_step_sizes=step_sizes, cuda_graph=False)
        log_w = res.log_weights.view(k, b)
        w = torch.softmax(log_w, 0).to(x.dtype)
        bound = logmeanexp(log_w, 0)
    z = res.z.view(k, b, -1)
    log_p = model.log_joint(x, z)  # [K, B]; z is data here (no gradient)
    decoder_loss = -(w * log_p).sum(0).mean()
    if encoder_only_elbo:
        q = model.posterior(x)
        z1 = q.rsample((1,))
        log_lik = model.decoder.log_likelihood(model._check_x(x), z1, detach_params=True)
        encoder_loss = -(model.prior_log_prob(z1) + log_lik - q.log_prob(z1)).mean()
    else:
        encoder_loss = -objective(model, x, 1, "elbo").mean()
    return AIWAEStep(decoder_loss, encoder_loss, bound, res.acceptance_per_temperature)
