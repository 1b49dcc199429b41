"""Evaluation of a user's own model through the protocol (posterior(x), log_joint(x, z), optional
prior() and simulate()): a small convolutional VAE written here with torch alone, and a
linear-Gaussian model whose log p(x) is exact. L_k, the ELBO, AIS from q and from the prior,
BDMC, SIR, active units, reconstruction errors and the report all take them."""
import json
import math
import os

import pytest
import torch
import torch.distributions as D
from torch import nn

import iwae_ext
from iwae_ext import evaluate, samplers
from iwae_ext.report import write_report


class ConvVAE(nn.Module):
    """28 x 28 Bernoulli images, a 2-D latent, convolutional encoder and decoder."""

    likelihood = "bernoulli"

    def __init__(self, z=2):
        super().__init__()
        self.z = z
        self.enc = nn.Sequential(nn.Conv2d(1, 2, 4, 2, 1), nn.Tanh(), nn.Conv2d(2, 4, 4, 2, 1), nn.Tanh(),
                                 nn.Flatten(), nn.Linear(4 * 7 * 7, 2 * z))
        self.dec = nn.Sequential(nn.Linear(z, 4 * 7 * 7), nn.Tanh(), nn.Unflatten(1, (4, 7, 7)),
                                 nn.ConvTranspose2d(4, 2, 4, 2, 1), nn.Tanh(), nn.ConvTranspose2d(2, 1, 4, 2, 1))

    def posterior(self, x):
        loc, log_scale = self.enc(x.reshape(-1, 1, 28, 28)).chunk(2, -1)
        return D.Independent(D.Normal(loc, log_scale.clamp(-6, 3).exp()), 1)

    def prior(self):
        w = self.dec[0].weight
        return D.Independent(D.Normal(torch.zeros(self.z, dtype=w.dtype, device=w.device),
                                      torch.ones(self.z, dtype=w.dtype, device=w.device)), 1)

    def logits(self, z):
        return self.dec(z.reshape(-1, self.z)).reshape(*z.shape[:-1], 784)

    def log_joint(self, x, z):
        ll = D.Bernoulli(logits=self.logits(z)).log_prob(x.expand(*z.shape[:-1], 784)).sum(-1)
        return ll + self.prior().log_prob(z)

    def simulate(self, n, generator=None):
        z = torch.randn(n, self.z, dtype=self.dec[0].weight.dtype, generator=generator)
        return torch.bernoulli(torch.sigmoid(self.logits(z)), generator=generator), z


@pytest.fixture(scope="module")
def conv_model():
    """Trained for 30 steps of the ELBO on 500 binarized MNIST images (float64)."""
    torch.manual_seed(3)
    x = iwae_ext.data.load_dataset().split("train")[:500].double()
    model = ConvVAE().double()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(30):
        xb = x[(step % 5) * 100:(step % 5 + 1) * 100]
        q = model.posterior(xb)
        z = q.rsample((1,))
        loss = -(model.log_joint(xb, z) - q.log_prob(z)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), iwae_ext.data.load_dataset().split("test")[:3].double()


def _grid_log_likelihood(model, x, n=81, widths=8.0):
    """log p(x) = log sum over a dense grid of p(x, z) dz, the grid centred on q(z|x) and
    `widths` of its standard deviations wide each way (the posterior lies well inside)."""
    out = []
    with torch.no_grad():
        for xi in x:
            q = model.posterior(xi.unsqueeze(0))
            axes = [torch.linspace(float(m) - widths * float(s), float(m) + widths * float(s), n,
                                   dtype=torch.float64) for m, s in zip(q.mean[0], q.stddev[0])]
            zz = torch.cartesian_prod(*axes)
            dz = math.prod(float(a[1] - a[0]) for a in axes)
            out.append(torch.logsumexp(model.log_joint(xi.unsqueeze(0), zz.unsqueeze(1))[:, 0], 0) + math.log(dz))
    return torch.stack(out)


def test_a_model_of_the_users_own_is_evaluated_like_the_packages(conv_model):
    model, x = conv_model
    assert isinstance(model, iwae_ext.LatentVariableModel)
    truth = _grid_log_likelihood(model, x)
    from iwae_ext.keyed import KeyedNoise, keyed_draws
    with torch.no_grad(), keyed_draws(KeyedNoise(0, torch.arange(3))):  # the draws of bounds(seed=0)
        lw = evaluate._protocol.log_weights(model, x, 2000)
    se = evaluate.log_mean_exp_stderr(lw)
    b = evaluate.bounds(model, x, 2000, batch_size=3, seed=0)
    torch.testing.assert_close(b.log_likelihood, torch.logsumexp(lw, 0) - math.log(2000))
    assert b.log_likelihood.shape == (3,) and b.log_likelihood.dtype == torch.float64
    # L_k and AIS are stochastic lower bounds: below log p(x) up to their noise, AIS the tighter
    assert (b.elbo < b.log_likelihood).all() and (b.log_likelihood <= truth + 4 * se + 1e-3).all()
    g = torch.Generator().manual_seed(1)
    for init, temps in (("posterior", 60), ("prior", 120)):
        est = evaluate.ais_log_likelihood(model, x, num_chains=16, num_temps=temps, num_leapfrog=3, init=init,
                                          generator=g, return_details=True)
        assert (est.log_likelihood <= truth + 4 * est.stderr + 1e-3).all(), (init, est.log_likelihood - truth)
        assert (est.log_likelihood > b.elbo).all(), (init, est.log_likelihood - b.elbo)
    z = samplers.sir(model, x, 50, num_samples=3)
    assert z.shape == (3, 3, 2)
    units = evaluate.active_units(model, x)
    assert len(units["active"]) == 1 and units["variances"][0].shape == (2,)
    for err in (evaluate.reconstruction_error(model, x), evaluate.reconstruction_error_qiw(model, x, 20)):
        assert err.shape == (3,) and bool((err > 0).all())
    r = evaluate.bdmc(model, num_points=2, num_chains=8, num_temps=60, num_leapfrog=3,
                      generator=torch.Generator().manual_seed(2))
    assert (r.lower <= r.upper + 4 * (r.lower_stderr + r.upper_stderr) + 0.05).all()
    assert model.training is False


def test_the_report_takes_a_users_model(conv_model, tmp_path):
    model, _ = conv_model
    data = iwae_ext.data.load_dataset()
    m = write_report(model, data, str(tmp_path), k=20, limit=12, batch_size=6, qiw_k=5,
                     ais=dict(num_chains=2, num_temps=5, num_leapfrog=2), posterior_samples=300)
    assert m["model"] == {"class": "ConvVAE"} and "posterior.png" in m["figures"]
    assert "samples.png" not in m["figures"] and m["notes"]
    saved = json.load(open(os.path.join(tmp_path, "metrics.json")))
    assert saved["n_test"] == 12 and math.isfinite(saved["ais_nll"])
    assert "need the package's models" in open(os.path.join(tmp_path, "report.md")).read()


class LinearGaussian:
    """Not a Module: z ~ N(0, I_2), x | z ~ N(W z + b, s2 I_3); p(x) = N(b, W W^T + s2 I) exactly.
    q(z|x) is a deliberately imperfect Gaussian (its mean shrunk), so the bounds are not exact."""

    W = torch.tensor([[1.0, 0.5], [-0.3, 0.8], [0.2, -1.1]], dtype=torch.float64)
    b = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    s2 = 0.4

    def exact(self, x):
        cov = self.W @ self.W.T + self.s2 * torch.eye(3, dtype=torch.float64)
        return D.MultivariateNormal(self.b, cov).log_prob(x)

    def posterior(self, x):
        prec = torch.eye(2, dtype=torch.float64) + self.W.T @ self.W / self.s2
        cov = torch.linalg.inv(prec)
        loc = 0.8 * ((x - self.b) @ self.W / self.s2) @ cov
        return D.Independent(D.Normal(loc, cov.diagonal().sqrt().expand_as(loc) * 1.2), 1)

    def prior(self):
        return D.Independent(D.Normal(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)), 1)

    def log_joint(self, x, z):
        mean = z @ self.W.T + self.b
        return D.Independent(D.Normal(mean, math.sqrt(self.s2)), 1).log_prob(x) + self.prior().log_prob(z)


def test_a_linear_gaussian_model_with_an_exact_answer():
    m = LinearGaussian()
    g = torch.Generator().manual_seed(4)
    x = m.b + torch.randn(5, 3, generator=g, dtype=torch.float64) * 1.5
    exact = m.exact(x)
    torch.manual_seed(5)
    lw = evaluate._protocol.log_weights(m, x, 5000)
    se = evaluate.log_mean_exp_stderr(lw)
    torch.manual_seed(5)
    b = evaluate.bounds(m, x, 5000, batch_size=2)
    assert ((b.log_likelihood - exact).abs() < 4 * se + 1e-3).all(), (b.log_likelihood - exact, se)
    assert (b.elbo < exact).all()
    est = evaluate.ais_log_likelihood(m, x, num_chains=32, num_temps=300, num_leapfrog=5, generator=g,
                                      return_details=True)
    assert ((est.log_likelihood - exact).abs() < 4 * est.stderr + 0.02).all(), (est.log_likelihood - exact)
    with pytest.raises(ValueError, match="x must be in"):  # Gaussian data: no range check without likelihood
        evaluate.bounds(type("Bern", (LinearGaussian,), {"likelihood": "bernoulli"})(), x + 5, 3)


def test_a_model_without_the_protocol_is_refused_by_name():
    class NoJoint:
        def posterior(self, x):
            return D.Independent(D.Normal(x, 1.0), 1)

    with pytest.raises(TypeError, match="NoJoint has no log_joint"):
        evaluate.bounds(NoJoint(), torch.rand(3, 2), 5)
    with pytest.raises(ValueError, match="no prior"):
        evaluate.ais_log_likelihood(type("NoPrior", (), {
            "posterior": LinearGaussian.posterior, "log_joint": lambda self, x, z: z.sum(-1),
            "W": LinearGaussian.W, "b": LinearGaussian.b, "s2": LinearGaussian.s2})(),
            torch.zeros(2, 3, dtype=torch.float64), 2, 3, 1, init="prior")
