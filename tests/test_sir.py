"""Sampling from q_IW (Cremer et al., Algorithm 1) against the posterior of a 2-D-latent model that
a dense grid gives: the distance of SIR samples from the posterior shrinks as k grows."""
import math

import pytest
import torch

from iwae_ext import samplers
from iwae_ext.models import VAE
from iwae_ext.ops import logmeanexp

from conftest import grid_posterior

N = 2000  # independent SIR draws per data point (each from its own k proposals)


def moment_distance(z, mu, cov):
    """|whitened mean|^2 + |whitened covariance - I|_F^2 of samples z [N, 2] against (mu, cov).
    For N exact draws of a Gaussian its expectation is about (2 + 6) / N (the noise floor)."""
    li = torch.linalg.inv(torch.linalg.cholesky(cov))
    w = (z - mu) @ li.T
    return float(w.mean(0).square().sum() + (torch.cov(w.T) - torch.eye(2, dtype=w.dtype)).square().sum())


def test_sir_approaches_the_posterior_as_k_grows(small_2d_model):
    model, x = small_2d_model
    noise = 8 / N
    totals = {}
    for i in range(3):
        zz, prob = grid_posterior(model, x[i])
        mu = prob @ zz
        cov = (zz - mu).T @ ((zz - mu) * prob[:, None])
        for k in (1, 10, 100):
            torch.manual_seed(1000 * i + k)
            z = samplers.sir(model, x[i].expand(N, 784), k)[0]  # N independent q_IW draws
            d = moment_distance(z, mu, cov)
            totals[k] = totals.get(k, 0.0) + d
            if k == 100:  # close to the posterior: within a few noise floors
                assert d < 10 * noise, (i, d)
    # summed over the points, each tenfold k moves the samples closer by more than the noise
    assert totals[1] > totals[10] + 12 * noise, totals
    assert totals[10] > totals[100] + 12 * noise, totals


def test_sir_k1_is_q_and_weights_come_from_logmeanexp():
    torch.manual_seed(0)
    model = VAE(x_dim=12, latent_dims=(3,), hidden=(8,)).double()
    x = torch.rand(4, 12, dtype=torch.float64).round()
    torch.manual_seed(1)
    z, w = samplers.sir(model, x, 1, num_samples=5, return_weights=True)
    torch.manual_seed(1)
    _, z_q = model.log_weights(x, 1, return_latent=True)
    assert z.shape == (5, 4, 3) and torch.equal(z, z_q.expand(5, 4, 3))  # one proposal: it is chosen
    assert torch.equal(w, torch.ones(1, 4, dtype=torch.float64))
    torch.manual_seed(2)
    z, w = samplers.sir(model, x, 50, num_samples=7, return_weights=True)
    torch.manual_seed(2)
    log_w, proposals = model.log_weights(x, 50, return_latent=True)
    torch.testing.assert_close(w, torch.softmax(log_w, 0))
    torch.testing.assert_close(w, torch.exp(log_w - logmeanexp(log_w, 0) - math.log(50)))
    # every draw is one of its own data point's proposals
    for b in range(4):
        assert all(any(torch.equal(z[s, b], proposals[j, b]) for j in range(50)) for s in range(7))


def test_sir_resampling_follows_the_weights():
    """With fixed weights, index frequencies over many draws match w~ within 4 standard errors."""
    torch.manual_seed(3)
    model = VAE(x_dim=10, latent_dims=(2,), hidden=(6,)).double()
    x = torch.rand(1, 10, dtype=torch.float64).round()
    torch.manual_seed(4)
    z, w = samplers.sir(model, x, 4, num_samples=40000, return_weights=True,
                        generator=torch.Generator().manual_seed(5))
    torch.manual_seed(4)
    _, proposals = model.log_weights(x, 4, return_latent=True)
    counts = torch.stack([(z[:, 0] == proposals[j, 0]).all(-1).double().mean() for j in range(4)])
    se = (w[:, 0] * (1 - w[:, 0]) / 40000).sqrt()
    assert ((counts - w[:, 0]).abs() < 4 * se + 1e-12).all(), (counts, w[:, 0])


def test_sir_errors():
    model = VAE(x_dim=6, latent_dims=(2,), hidden=(3,))
    with pytest.raises(ValueError, match="k must be a positive int"):
        samplers.sir(model, torch.rand(2, 6), 0)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        samplers.sir(model, torch.rand(2, 6), 3, num_samples=0)
