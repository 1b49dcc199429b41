"""Models: the documented interface, shapes, densities against torch.distributions, errors."""
import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal

from iwae_ext.models import VAE, DiagonalNormal

torch.set_default_dtype(torch.float32)


def make(layers=1, likelihood="bernoulli", x_dim=12, seed=0):
    torch.manual_seed(seed)
    if layers == 1:
        return VAE(x_dim, (3,), ((8,),), "tanh", likelihood).double()
    return VAE(x_dim, (4, 2), ((8, 6), (5,)), "tanh", likelihood).double()


def data(b=5, x_dim=12, binary=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, x_dim, generator=g, dtype=torch.float64)
    return torch.bernoulli(x, generator=g) if binary else x


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_interface_shapes(layers, likelihood):
    m = make(layers, likelihood)
    x = data(binary=likelihood == "bernoulli")
    q = m.posterior(x)
    Z = m.latent_dim
    assert q.batch_shape == (5,) and q.event_shape == (Z,)
    z = q.rsample((7,))
    assert z.shape == (7, 5, Z) and q.log_prob(z).shape == (7, 5)
    assert m.log_joint(x, z).shape == (7, 5)
    log_w, z2 = m.log_weights(x, 6, return_latent=True)
    assert log_w.shape == (6, 5) and z2.shape == (6, 5, Z)
    assert m.sample(4).shape == (4, 12) and m.reconstruct(x).shape == (5, 12)
    assert [t.shape for t in m.posterior_means(x)] == [(5, d) for d in m.latent_dims]
    assert torch.isfinite(log_w).all()


def test_one_layer_densities_match_torch_distributions():
    m = make(1)
    x = data()
    q = m.posterior(x)
    z = q.rsample((3,))
    loc, logvar = m.encoders[0](x)
    ref_q = Normal(loc, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    torch.testing.assert_close(q.log_prob(z), ref_q, rtol=1e-12, atol=1e-12)
    ref_prior = Normal(0.0, 1.0).log_prob(z).sum(-1)
    ref_lik = Bernoulli(logits=m.decoder(z)).log_prob(x).sum(-1)
    torch.testing.assert_close(m.log_joint(x, z), ref_prior + ref_lik, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.log_weights(x, 1).shape, torch.Size([1, 5]))
    # closed-form KL against torch's
    ref_kl = torch.distributions.kl_divergence(Normal(loc, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(m.kl_divergence(x), ref_kl, rtol=1e-12, atol=1e-12)


def test_two_layer_densities_match_torch_distributions():
    m = make(2)
    x = data()
    q = m.posterior(x)
    z = q.rsample((3,))
    z1, z2 = m.split_latent(z)
    l1, v1 = m.encoders[0](x)
    l2, v2 = m.encoders[1](z1)
    ref_q = (Normal(l1, torch.exp(0.5 * v1)).log_prob(z1).sum(-1)
             + Normal(l2, torch.exp(0.5 * v2)).log_prob(z2).sum(-1))
    torch.testing.assert_close(q.log_prob(z), ref_q, rtol=1e-12, atol=1e-12)
    pl, pv = m.priors[0](z2)
    ref_p = (Normal(0.0, 1.0).log_prob(z2).sum(-1) + Normal(pl, torch.exp(0.5 * pv)).log_prob(z1).sum(-1)
             + Bernoulli(logits=m.decoder(z1)).log_prob(x).sum(-1))
    torch.testing.assert_close(m.log_joint(x, z), ref_p, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="analytic KL exists for one stochastic layer"):
        m.kl_divergence(x)


def test_gaussian_decoder_density():
    m = make(1, "gaussian")
    x = data(binary=False)
    z = m.posterior(x).rsample((2,))
    mean, logvar = m.decode(z)
    assert float(mean.detach().min()) > 0 and float(mean.detach().max()) < 1
    ref = Normal(mean, torch.exp(0.5 * logvar)).log_prob(x).sum(-1)
    torch.testing.assert_close(m.log_likelihood(x, z), ref, rtol=1e-12, atol=1e-12)


def test_detached_posterior_keeps_path_through_z_only():
    for layers in (1, 2):
        m = make(layers)
        x = data()
        q = m.posterior(x)
        z = q.rsample((2,))
        lp = q.detached().log_prob(z).sum()
        enc = [p for p in m.encoders.parameters()]
        grads = torch.autograd.grad(lp, enc, allow_unused=True, retain_graph=True)
        # gradients reach the encoder only through z: equal to d/dphi of log q(z(phi)) with
        # q's own parameters frozen, which is what a manual chain rule gives
        z_leaf = z.detach().requires_grad_()
        (gz,) = torch.autograd.grad(q.detached().log_prob(z_leaf).sum(), z_leaf)
        want = torch.autograd.grad((z * gz).sum(), enc, allow_unused=True)
        for g, w in zip(grads, want):
            if w is None:
                assert g is None or torch.all(g == 0)
            else:
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_decoder_bias_is_logit_of_mean():
    mean = torch.linspace(0.0, 1.0, 12)
    m = VAE(12, (3,), ((8,),), x_mean=mean)
    want = torch.logit(mean.clamp(1e-3, 1 - 1e-3))
    torch.testing.assert_close(m.decoder.logits.bias.data, want)


def test_bad_input_errors_name_the_argument():
    m = make(1)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 12\], got \(5, 11\)"):
        m.posterior(torch.zeros(5, 11, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be floating point"):
        m.posterior(torch.zeros(5, 12, dtype=torch.uint8))
    with pytest.raises(ValueError, match="k must be a positive int"):
        m.log_weights(data(), 0)
    with pytest.raises(ValueError, match="z must have last dimension 3"):
        m.log_joint(data(), torch.zeros(2, 5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="activation must be one of"):
        VAE(12, (3,), activation="gelu")
    with pytest.raises(ValueError, match="likelihood must be one of"):
        VAE(12, (3,), likelihood="poisson")
    with pytest.raises(ValueError, match="one tuple of widths per stochastic layer"):
        VAE(12, (3, 2), hidden=((8,), (8,), (8,)))


def test_sample_is_seeded_and_burda_defaults():
    m = VAE()
    n_params = sum(p.numel() for p in m.parameters())
    # 784-200-200-50 encoder (mean and log-variance heads) and 50-200-200-784 decoder
    assert n_params == (784 * 200 + 200 + 200 * 200 + 200 + 2 * (200 * 50 + 50)
                        + 50 * 200 + 200 + 200 * 200 + 200 + 200 * 784 + 784)
    two = VAE(latent_dims=(100, 50))
    assert two.config["hidden"] == [[200, 200], [100, 100]]
    a = m.sample(3, generator=torch.Generator().manual_seed(0))
    b = m.sample(3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_diagonal_normal_entropy_and_moments():
    loc, logvar = torch.tensor([[0.5, -1.0]], dtype=torch.float64), torch.tensor([[0.2, -0.4]], dtype=torch.float64)
    d = DiagonalNormal(loc, logvar)
    ref = Normal(loc, torch.exp(0.5 * logvar))
    torch.testing.assert_close(d.entropy(), ref.entropy().sum(-1))
    torch.manual_seed(0)
    s = d.rsample((200000,))
    torch.testing.assert_close(s.mean(0), loc, atol=4 * math.exp(0.1) / math.sqrt(200000) * 1.5, rtol=0)
