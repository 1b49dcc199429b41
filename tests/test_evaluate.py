"""Evaluation against known answers: a linear-Gaussian model whose log p(x) is exact."""
import math

import pytest
import torch

from iwae_ext import evaluate
from iwae_ext.models import VAE


class LinearGaussian(torch.nn.Module):
    """z ~ N(0, 1), x | z ~ N(a z, s2): p(x) = N(0, a^2 + s2) exactly. q(z|x) = N(c x, v).

    With c = a / (a^2 + s2) and v = s2 / (a^2 + s2), q is the exact posterior and every
    log-weight equals log p(x)."""

    def __init__(self, a=1.5, s2=0.5, c=None, v=None):
        super().__init__()
        self.a, self.s2 = a, s2
        self.c = a / (a * a + s2) if c is None else c
        self.v = s2 / (a * a + s2) if v is None else v
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def exact(self, x):
        var = self.a ** 2 + self.s2
        return (-0.5 * (math.log(2 * math.pi * var) + x[:, 0] ** 2 / var)).double()

    def log_weights(self, x, k):
        x = x[:, 0].double()
        z = self.c * x + math.sqrt(self.v) * torch.randn(k, x.shape[0], dtype=torch.float64)
        log_q = -0.5 * (math.log(2 * math.pi * self.v) + (z - self.c * x) ** 2 / self.v)
        log_p = (-0.5 * (math.log(2 * math.pi) + z ** 2)
                 - 0.5 * (math.log(2 * math.pi * self.s2) + (x - self.a * z) ** 2 / self.s2))
        return log_p - log_q


def test_exact_posterior_gives_exact_log_likelihood_in_every_chunk():
    m = LinearGaussian()
    x = torch.linspace(-3, 3, 37, dtype=torch.float64).unsqueeze(1)
    b = evaluate.bounds(m, x, k=1000, batch_size=8, max_rows=70)  # chunks of 8 samples
    torch.testing.assert_close(b.log_likelihood, m.exact(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(b.elbo, m.exact(x), rtol=0, atol=1e-10)


def test_l5000_with_an_inexact_posterior_is_within_standard_error():
    """L_k -> log p(x) from below; with k = 5000 it is within a few standard errors of the exact
    value (standard error of the importance-sampling estimate: std(w)/(sqrt(k) mean(w)))."""
    m = LinearGaussian(c=0.3, v=0.8)
    x = torch.tensor([[-2.0], [-0.5], [0.0], [1.0], [2.5]], dtype=torch.float64)
    torch.manual_seed(0)
    k = 5000
    b = evaluate.bounds(m, x, k=k, batch_size=2, max_rows=1000)
    exact = m.exact(x)
    torch.manual_seed(1)
    w = m.log_weights(x, 200000).exp()
    se = w.std(0) / (math.sqrt(k) * w.mean(0))
    assert ((b.log_likelihood - exact).abs() < 4 * se + 1e-3).all(), (b.log_likelihood - exact, se)
    assert (b.elbo < exact).all()  # the ELBO is below log p(x) by KL(q || p(z|x)) > 0


def test_chunking_does_not_change_the_estimate():
    """Chunks of the k samples are combined exactly: a model whose k log-weights are fixed
    numbers gives the same L_k whatever the chunk size."""
    table = torch.randn(64, 9, dtype=torch.float64) * 30

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
            self.used = 0

        def log_weights(self, x, k):
            out = table[self.used:self.used + k, : x.shape[0]]
            self.used += k
            return out

    want = torch.logsumexp(table, 0) - math.log(64)
    for max_rows in (9, 27, 9 * 64, 10 ** 6):
        b = evaluate.bounds(Fixed(), torch.zeros(9, 1), k=64, batch_size=9, max_rows=max_rows)
        torch.testing.assert_close(b.log_likelihood, want, rtol=0, atol=1e-10)
        torch.testing.assert_close(b.elbo, table.mean(0), rtol=0, atol=1e-10)


def test_active_units_and_reconstruction():
    torch.manual_seed(0)
    m = VAE(6, (4,), ((5,),)).double()
    x = torch.bernoulli(torch.full((300, 6), 0.4, dtype=torch.float64))
    with torch.no_grad():  # make unit 0 follow x, silence the others
        enc = m.encoders[0]
        enc.loc.weight.zero_()
        enc.loc.bias.zero_()
        enc.body[0].weight.zero_()
        enc.body[0].weight[0, 0] = 3.0
        enc.loc.weight[0, 0] = 2.0
    units = evaluate.active_units(m, x)
    assert units["active"] == [1]
    assert float(units["variances"][0][0]) > 0.01 and float(units["variances"][0][1:].max()) == 0.0
    rec = evaluate.reconstruction_error(m, x)
    z = m.posterior(x).loc.unsqueeze(0)
    torch.testing.assert_close(rec, -m.log_likelihood(x, z)[0].detach())
    two = VAE(6, (4, 2), ((5,), (3,))).double()
    assert len(evaluate.active_units(two, x)["active"]) == 2
    assert evaluate.reconstruction_error(two, x).shape == (300,)


def test_bad_arguments():
    m = LinearGaussian()
    with pytest.raises(ValueError, match="k must be a positive int"):
        evaluate.bounds(m, torch.zeros(3, 1), k=0)
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \[N, D\]"):
        evaluate.bounds(m, torch.zeros(3), k=5)


def test_data_that_a_model_cannot_score_is_refused_by_name():
    """0-255 images under a Bernoulli decoder would score +146,645 'nats'; uint8 and NaN are
    refused too, by every evaluation function; a Gaussian decoder takes any real x."""
    torch.manual_seed(0)
    model = VAE(x_dim=6, latent_dims=(2,), hidden=(5,))
    x = torch.rand(4, 6).round()
    fns = {"bounds": lambda x: evaluate.bounds(model, x, 3),
           "active_units": lambda x: evaluate.active_units(model, x),
           "reconstruction_error": lambda x: evaluate.reconstruction_error(model, x),
           "ais_log_likelihood": lambda x: evaluate.ais_log_likelihood(model, x, 2, 3, 1),
           "reconstruction_error_qiw": lambda x: evaluate.reconstruction_error_qiw(model, x, 3)}
    for name, fn in fns.items():
        fn(x)  # fine
        with pytest.raises(ValueError, match=r"x must be in \[0, 1\] for a model with a Bernoulli decoder, "
                                             r"got values in \[0, 255\] \(0-255 images\? divide by 255\)"):
            fn(x * 255)
        with pytest.raises(TypeError, match=r"x must be floating point .* got torch.uint8 \(0-255 images"):
            fn((x * 255).to(torch.uint8))
        bad = x.clone()
        bad[2, 3] = float("nan")
        with pytest.raises(ValueError, match=r"x holds NaN \(first in row 2 of 4\)"):
            fn(bad)
        with pytest.raises(ValueError, match="x must be in"):
            fn(x - 0.5)
    gaussian = VAE(x_dim=6, latent_dims=(2,), hidden=(5,), likelihood="gaussian")
    assert torch.isfinite(evaluate.bounds(gaussian, x * 255 - 3, 3).log_likelihood).all()
