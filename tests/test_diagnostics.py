"""Importance-weight diagnostics (iwae_ext.diagnostics): the effective sample size and the Pareto
k-hat, on weights whose tail is known, and as carried by L_k and AIS results."""
import math

import pytest
import torch
import torch.distributions as D

from iwae_ext import diagnostics, evaluate


def test_effective_sample_size_known_cases():
    assert torch.allclose(diagnostics.effective_sample_size(torch.zeros(50, 3)), torch.full((3,), 50.0, dtype=torch.float64))
    lw = torch.tensor([[0.0], [-800.0], [-900.0]])  # one weight dominates
    assert abs(float(diagnostics.effective_sample_size(lw)) - 1.0) < 1e-12
    g = torch.Generator().manual_seed(0)
    lw = torch.randn(40, 5, generator=g, dtype=torch.float64)
    w = lw.exp()
    assert torch.allclose(diagnostics.effective_sample_size(lw), w.sum(0) ** 2 / w.square().sum(0))
    assert torch.allclose(diagnostics.effective_sample_size(lw.t(), dim=1), w.sum(0) ** 2 / w.square().sum(0))
    # invariant to a constant shift of the log-weights, however large
    assert torch.allclose(diagnostics.effective_sample_size(lw + 1e4), diagnostics.effective_sample_size(lw))


@pytest.mark.parametrize("xi", [0.3, 0.7, 1.0])
def test_khat_recovers_the_shape_of_a_pareto_tail(xi):
    # w = exp(xi E), E ~ Exp(1), is Pareto with shape xi: P(w > t) = t^(-1/xi). The fit of the 213 largest
    # of 5000 weights, shrunk toward 0.5 with weight 10, has mean (213 xi + 5) / 223 for an unbiased fit.
    g = torch.Generator().manual_seed(1)
    cols = 300
    e = torch.empty(5000, cols, dtype=torch.float64).exponential_(generator=g)
    offsets = torch.randn(1, cols, generator=g, dtype=torch.float64) * 50  # the scale of w must not matter
    khat = diagnostics.pareto_khat(xi * e + offsets)
    n = diagnostics.tail_length(5000)
    assert n == 213
    expected = (n * xi + 5) / (n + 10)
    se = float(khat.std()) / math.sqrt(cols)
    assert abs(float(khat.mean()) - expected) < 4 * se + 0.01, (float(khat.mean()), expected, se)


def test_khat_matches_arviz_psis_where_installed():
    az = pytest.importorskip("arviz", reason="arviz (an independent PSIS implementation) is not installed")
    import numpy as np
    g = torch.Generator().manual_seed(2)
    for s in (25, 300, 5000):
        lw = torch.randn(s, 6, generator=g, dtype=torch.float64) * 2
        ours = diagnostics.pareto_khat(lw)
        theirs = torch.tensor([float(np.asarray(az.psislw(lw[:, b].numpy())[1])) for b in range(6)], dtype=torch.float64)
        assert torch.allclose(ours, theirs, atol=1e-10), (ours, theirs)


def test_khat_edge_cases_are_named_values():
    assert torch.isnan(diagnostics.pareto_khat(torch.randn(20, 3))).all()  # 20 weights: a 4-weight tail
    assert not torch.isnan(diagnostics.pareto_khat(torch.randn(21, 3))).any()
    assert (diagnostics.pareto_khat(torch.zeros(500, 2)) == -math.inf).all()  # equal weights: no tail
    lw = torch.randn(500, 3, dtype=torch.float64)
    lw[:, 1] = -math.inf  # every weight zero
    lw[7, 2] = math.nan
    k = diagnostics.pareto_khat(lw)
    assert torch.isfinite(k[0]) and torch.isnan(k[1]) and torch.isnan(k[2])
    assert diagnostics.pareto_khat(torch.randn(2, 100, 3), dim=1).shape == (2, 3)
    with pytest.raises(ValueError, match="log_w"):
        diagnostics.pareto_khat(torch.arange(30))
    assert diagnostics.khat_threshold(5000) == 0.7
    assert abs(diagnostics.khat_threshold(100) - 0.5) < 1e-12


class OneD:
    """z ~ N(0, 1), x | z ~ N(z, s2): p(x) = N(0, 1 + s2) exactly. q(z|x) is the exact posterior
    with its standard deviation times c, so the weights' tail has shape 1 - c^2 (their r-th moment
    under q is finite for r < 1 / (1 - c^2)): heavy for c < 1, bounded for c > 1, none for c = 1."""

    s2 = 0.5

    def __init__(self, c):
        self.c = c

    def exact(self, x):
        return D.Normal(0.0, math.sqrt(1 + self.s2)).log_prob(x[:, 0]).double()

    def posterior(self, x):
        sd = self.c * math.sqrt(self.s2 / (1 + self.s2))
        return D.Independent(D.Normal(x / (1 + self.s2), sd * torch.ones_like(x)), 1)

    def log_joint(self, x, z):
        return D.Normal(0.0, 1.0).log_prob(z[..., 0]) + D.Normal(z[..., 0], math.sqrt(self.s2)).log_prob(x[:, 0])


def _data(n=100):
    return torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * math.sqrt(1.5)


def test_lk_carries_ess_and_khat_that_tell_a_heavy_tail_from_a_light_one():
    x = _data()
    heavy, light, exact_q = OneD(0.3), OneD(1.5), OneD(1.0)  # true shapes 0.91, -1.25, none
    bh = evaluate.bounds(heavy, x, 5000, seed=1)
    bl = evaluate.bounds(light, x, 5000, seed=1)
    be = evaluate.bounds(exact_q, x, 5000, seed=1)
    assert float(bh.khat.median()) > 0.7 and float(bl.khat.max()) < 0.5
    assert (be.khat == -math.inf).all() and torch.allclose(be.ess, torch.full_like(be.ess, 5000.0))
    assert float(bh.ess.median()) < 0.1 * 5000 < float(bl.ess.min())
    # the rule the docs give: above 0.7 the delta-method standard error runs low against the actual
    # error (the variance it estimates is dominated by weights not yet drawn); on the light tail it holds
    err_h, err_l = bh.log_likelihood - heavy.exact(x), bl.log_likelihood - light.exact(x)
    rms = lambda t: float(t.square().mean().sqrt())  # noqa: E731
    assert rms(err_h) > 1.5 * rms(bh.stderr)
    assert 0.7 < rms(err_l) / rms(bl.stderr) < 1.4
    s = bh.diagnostics()
    assert s["num_weights"] == 5000 and s["khat_threshold"] == 0.7 and s["khat_above_threshold"] > 0.5
    assert s["ess_min"] <= s["ess_median"] and 0 < s["ess_fraction_median"] < 0.1


def test_lk_diagnostics_do_not_depend_on_the_chunking_and_match_the_weights():
    x = _data(7)
    m = OneD(0.5)
    a = evaluate.bounds(m, x, 600, batch_size=3, max_rows=50, seed=3)
    b = evaluate.bounds(m, x, 600, batch_size=7, max_rows=10 ** 6, seed=3)
    assert torch.allclose(a.khat, b.khat, atol=1e-12) and torch.allclose(a.ess, b.ess, rtol=1e-12)
    from iwae_ext.keyed import KeyedNoise, keyed_draws
    with keyed_draws(KeyedNoise(3, torch.arange(7), torch.device("cpu"))):
        lw = evaluate._protocol.log_weights(m, x, 600)
    assert torch.allclose(b.khat, diagnostics.pareto_khat(lw), atol=1e-12)
    assert torch.allclose(b.ess, diagnostics.effective_sample_size(lw), rtol=1e-12)
    few = evaluate.bounds(m, x, 20, seed=3)  # too few weights for a tail: NaN, and ESS still there
    assert torch.isnan(few.khat).all() and (few.ess > 1).all()


def test_ais_results_carry_ess_and_khat():
    x = _data(4)
    est = evaluate.ais_log_likelihood(OneD(0.5), x, num_chains=32, num_temps=50, num_leapfrog=3, seed=0,
                                      return_details=True)
    assert torch.allclose(est.ess, diagnostics.effective_sample_size(est.log_weights))
    assert torch.allclose(est.khat, diagnostics.pareto_khat(est.log_weights), equal_nan=True)
    assert est.ess.shape == (4,) and ((est.ess >= 1) & (est.ess <= 32)).all()
    s = est.diagnostics()
    assert s["num_weights"] == 32 and s["khat_median"] is not None
    few = evaluate.ais_log_likelihood(OneD(0.5), x, num_chains=16, num_temps=20, num_leapfrog=2, seed=0,
                                      return_details=True)
    assert torch.isnan(few.khat).all() and few.diagnostics()["khat_median"] is None
