"""Objectives and estimators: identities, importance-weighted gradients, DReG/STL statistics.

Statistical tests use fixed seeds and tolerances of a few standard errors.
"""
import math

import pytest
import torch

from iwae_ext.models import VAE
from iwae_ext.objectives import elbo, iwae_bound, normalized_weights, objective
from iwae_ext.ops import reference


def make(layers=1, seed=0):
    torch.manual_seed(seed)
    if layers == 1:
        return VAE(10, (3,), ((8,),)).double()
    return VAE(10, (4, 2), ((8,), (6,))).double()


def data(b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.rand(b, 10, generator=g, dtype=torch.float64), generator=g)


def encoder_params(m):
    return list(m.encoders.parameters())


def decoder_params(m):
    return list(m.decoder.parameters()) + list(m.priors.parameters())


def flat_grad(value, params):
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def test_pure_functions():
    log_w = torch.randn(7, 3, dtype=torch.float64) * 5
    torch.testing.assert_close(iwae_bound(log_w), reference.logmeanexp(log_w, 0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(iwae_bound(log_w, fused=False), reference.logmeanexp(log_w, 0))
    torch.testing.assert_close(elbo(log_w), log_w.mean(0))
    torch.testing.assert_close(normalized_weights(log_w).sum(0), torch.ones(3, dtype=torch.float64))
    assert (iwae_bound(log_w) >= elbo(log_w)).all()  # Jensen


@pytest.mark.parametrize("layers", [1, 2])
def test_iwae_at_k1_is_the_mc_elbo(layers):
    m, x = make(layers), data()
    torch.manual_seed(5)
    a = objective(m, x, 1, "iwae")
    torch.manual_seed(5)
    b = objective(m, x, 1, "elbo")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flat_grad(a.sum(), list(m.parameters())),
                               flat_grad(b.sum(), list(m.parameters())), rtol=1e-10, atol=1e-12)


def test_analytic_and_monte_carlo_kl_agree():
    """L^A and L^B estimate the same ELBO: per data point, within 4 standard errors."""
    m, x = make(1), data(6)
    torch.manual_seed(0)
    S = 20000
    q = m.posterior(x)
    z = q.rsample((S,))
    mc_kl = q.log_prob(z) - m.prior_log_prob(z)  # [S, B]
    se = mc_kl.std(0) / math.sqrt(S)
    diff = (mc_kl.mean(0) - m.kl_divergence(x)).abs()
    assert (diff < 4 * se).all(), (diff, se)
    # and as objectives (same data, many samples)
    with torch.no_grad():
        la = objective(m, x, S, "elbo", kl="mc")
        lb = objective(m, x, S, "elbo", kl="analytic")
        log_w = m.log_weights(x, S)
    se = log_w.std(0) / math.sqrt(S)
    assert ((la - lb).abs() < 4 * se * math.sqrt(2)).all()


@pytest.mark.parametrize("layers", [1, 2])
def test_iwae_gradient_is_the_importance_weighted_gradient(layers):
    """d L_k = sum_k w~_k d log w_k (Burda et al. eq. 11), for every parameter, same noise."""
    m, x = make(layers), data()
    torch.manual_seed(3)
    log_w = m.log_weights(x, 6)
    params = list(m.parameters())
    g_bound = flat_grad(iwae_bound(log_w).sum(), params)
    w = normalized_weights(log_w)
    torch.manual_seed(3)
    log_w2 = m.log_weights(x, 6)
    g_weighted = flat_grad((w * log_w2).sum(), params)
    torch.testing.assert_close(g_bound, g_weighted, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("estimator", ["stl", "dreg"])
def test_estimators_keep_the_value_and_the_decoder_gradient(layers, estimator):
    m, x = make(layers), data()
    torch.manual_seed(9)
    std = objective(m, x, 5, "iwae", "standard")
    g_std = flat_grad(std.sum(), decoder_params(m))
    torch.manual_seed(9)
    other = objective(m, x, 5, "iwae", estimator)
    torch.testing.assert_close(other, std, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flat_grad(other.sum(), decoder_params(m)), g_std, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layers", [1, 2])
def test_dreg_encoder_gradient_is_its_defining_formula(layers):
    """DReG (Tucker et al. eq. 5): sum_k w~_k^2 d log w_k/dz_k dz_k/dphi, log q's parameters stopped."""
    m, x = make(layers), data()
    torch.manual_seed(4)
    got = flat_grad(objective(m, x, 5, "iwae", "dreg").sum(), encoder_params(m))
    torch.manual_seed(4)
    log_w, z = m.log_weights(x, 5, stop_gradient_q=True, return_latent=True)
    w = normalized_weights(log_w)
    z_leaf = z.detach().requires_grad_()
    q = m.posterior(x).detached()
    lw_leaf = m.log_joint(x, z_leaf) - q.log_prob(z_leaf)
    (dz,) = torch.autograd.grad((w.square() * lw_leaf).sum(), z_leaf)
    want = flat_grad((z * dz).sum(), encoder_params(m))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _posterior_param_gradients(m, x, k, objective_name, estimator, reps, seed):
    """Gradients of the bound with respect to q(z1|x)'s mean and log-variance, one row per
    independent replicate: x is repeated ``reps`` times in one batch, and since data points do
    not interact, each row's gradient is an independent draw of the estimator. (The gradient
    with respect to the encoder's weights is a fixed linear map of these.)"""
    captured = {}
    hook = m.encoders[0].register_forward_hook(lambda mod, inp, out: captured.__setitem__("out", out))
    try:
        torch.manual_seed(seed)
        value = objective(m, x.repeat(reps, 1), k, objective_name, estimator).sum()
    finally:
        hook.remove()
    grads = torch.autograd.grad(value, list(captured["out"]))
    return torch.cat(grads, -1).reshape(reps, -1)


def _same_mean(a, b, limit=5.0):
    """Every coordinate's difference of means within ``limit`` standard errors (a Bonferroni-safe
    bound for the few dozen coordinates here)."""
    se = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt().clamp_min(1e-12)
    z = float(((a.mean(0) - b.mean(0)).abs() / se).max())
    assert z < limit, z


@pytest.mark.parametrize("layers", [1, 2])
def test_dreg_is_unbiased_and_has_lower_variance_at_k50(layers):
    """E[DReG encoder gradient] = E[standard one], and at k = 50 DReG's total variance is lower."""
    m, x = make(layers), data(3)
    std = _posterior_param_gradients(m, x, 50, "iwae", "standard", 4000, 0)
    dreg = _posterior_param_gradients(m, x, 50, "iwae", "dreg", 4000, 1)
    _same_mean(std, dreg)
    assert float(dreg.var(0).sum()) < float(std.var(0).sum())


def test_stl_elbo_gradient_unbiased():
    m, x = make(1), data(3)
    std = _posterior_param_gradients(m, x, 1, "elbo", "standard", 20000, 0)
    stl = _posterior_param_gradients(m, x, 1, "elbo", "stl", 20000, 1)
    _same_mean(std, stl)


def test_bad_combinations_raise():
    m, x = make(1), data()
    with pytest.raises(ValueError, match="objective must be one of"):
        objective(m, x, 5, "rws")
    with pytest.raises(ValueError, match="estimator must be one of"):
        objective(m, x, 5, "iwae", "reinforce")
    with pytest.raises(ValueError, match="estimator='dreg' is the IWAE bound's estimator"):
        objective(m, x, 5, "elbo", "dreg")
    with pytest.raises(ValueError, match="kl='analytic' applies to objective='elbo'"):
        objective(m, x, 5, "iwae", kl="analytic")
    with pytest.raises(ValueError, match="analytic KL exists for one stochastic layer"):
        objective(make(2), x, 5, "elbo", kl="analytic")
