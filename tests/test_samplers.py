"""HMC and AIS against known answers (tolerances from standard errors): leapfrog reversibility
and its O(step^2) energy error, HMC's invariance for a correlated Gaussian, AIS's log Z for a
linear-Gaussian model, the hand-written decoder gradient against autograd, and a 2-D-latent
model whose log p(x) a dense grid gives (AIS agrees, L_5000 stays below, BDMC sandwiches)."""
import copy
import math
import warnings

import pytest
import torch

from iwae_ext import evaluate, samplers
from iwae_ext.models import VAE
from iwae_ext.ops import hmc_leapfrog

from conftest import DEVICES, grid_log_likelihood

# A correlated 2-D Gaussian N(mu, S) as the target
MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
S = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64)
P = torch.linalg.inv(S)


def gauss_log_density(z):
    d = z - MU.to(z)
    return -0.5 * ((d @ P.to(z)) * d).sum(-1)


def gauss_grad(z):
    return gauss_log_density(z), -(z - MU.to(z)) @ P.to(z)


def trajectory(z, p, step, num_leapfrog):
    """L leapfrog steps with the fused op on U = -log N(mu, S)."""
    gu = -gauss_grad(z)[1]
    z, p = hmc_leapfrog(z, p, gu, step, 0.5, True)
    for i in range(num_leapfrog):
        gu = -gauss_grad(z)[1]
        last = i + 1 == num_leapfrog
        z, p = hmc_leapfrog(z, p, gu, step, 0.5 if last else 1.0, not last)
    return z, p


def hamiltonian(z, p):
    return -gauss_log_density(z) + 0.5 * p.square().sum(-1)


def test_leapfrog_is_reversible():
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(100, 2, generator=g, dtype=torch.float64)
    p0 = torch.randn(100, 2, generator=g, dtype=torch.float64)
    step = torch.full((100,), 0.1, dtype=torch.float64)
    z1, p1 = trajectory(z0, p0, step, 20)
    z2, p2 = trajectory(z1, -p1, step, 20)
    torch.testing.assert_close(z2, z0, rtol=0, atol=1e-12)
    torch.testing.assert_close(-p2, p0, rtol=0, atol=1e-12)


def test_energy_error_shrinks_as_step_squared():
    """Fixed integration time 1: the mean |dH| against the step size has slope 2 on a log-log
    scale (leapfrog is second order; steps well inside the stability limit 2/omega_max = 0.62)."""
    g = torch.Generator().manual_seed(1)
    z0 = MU + torch.randn(500, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(S).T
    p0 = torch.randn(500, 2, generator=g, dtype=torch.float64)
    steps = (0.04, 0.02, 0.01, 0.005)
    errors = []
    for step in steps:
        z, p = trajectory(z0, p0, torch.full((500,), step, dtype=torch.float64), round(1 / step))
        errors.append(float((hamiltonian(z, p) - hamiltonian(z0, p0)).abs().mean()))
    logs, loge = torch.tensor(steps).log(), torch.tensor(errors).log()
    slope = float(((logs - logs.mean()) * (loge - loge.mean())).sum() / (logs - logs.mean()).square().sum())
    assert 1.95 < slope < 2.05, (slope, errors)


@pytest.mark.parametrize("device", DEVICES)
def test_hmc_leaves_a_correlated_gaussian_invariant(device):
    """Chains started at exact draws stay exactly distributed: mean and covariance of the final
    states within 4 standard errors (mean: sqrt(S_ii / C); covariance entries: sqrt((S_ii S_jj +
    S_ij^2) / C))."""
    c = 8000
    g = torch.Generator(device=device).manual_seed(2)
    L = torch.linalg.cholesky(S).to(device)
    z0 = MU.to(device) + torch.randn(c, 2, generator=g, dtype=torch.float64, device=device) @ L.T
    res = samplers.hmc(gauss_log_density, z0, num_samples=10, num_leapfrog=5, step_size=0.15,
                       num_warmup=0, generator=g)
    z = res.samples[-1].cpu()
    se_mean = (S.diagonal() / c).sqrt()
    assert ((z.mean(0) - MU).abs() < 4 * se_mean).all(), (z.mean(0), se_mean)
    cov = torch.cov(z.T)
    se_cov = ((S.diagonal()[:, None] * S.diagonal()[None, :] + S * S) / c).sqrt()
    assert ((cov - S).abs() < 4 * se_cov).all(), (cov, se_cov)
    assert 0.5 < float(res.acceptance_rate.mean()) < 1.0


def test_hmc_converges_from_a_point_and_adapts_toward_the_target_acceptance():
    c = 4000
    g = torch.Generator().manual_seed(3)
    z0 = torch.full((c, 2), 4.0, dtype=torch.float64)
    res = samplers.hmc(None, z0, num_samples=30, num_leapfrog=5, step_size=1.0, num_warmup=200,
                       target_accept=0.65, grad_fn=gauss_grad, generator=g)
    z = res.samples[-1]
    se_mean = (S.diagonal() / c).sqrt()
    assert ((z.mean(0) - MU).abs() < 4 * se_mean).all()
    cov = torch.cov(z.T)
    se_cov = ((S.diagonal()[:, None] * S.diagonal()[None, :] + S * S) / c).sqrt()
    assert ((cov - S).abs() < 4 * se_cov).all(), (cov, se_cov)
    # step sizes were adapted (from 1.0) and the acceptance sits near the target
    assert float(res.step_size.max()) < 1.0
    assert abs(float(res.acceptance_rate.mean()) - 0.65) < 0.1


class LinearGaussianModel:
    """z ~ N(0, I_d), x | z ~ N(W z + b, s2 I): p(x) = N(b, W W^T + s2 I) exactly."""

    def __init__(self, d=3, n=5, s2=0.3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(n, d, generator=g, dtype=torch.float64)
        self.b = torch.randn(n, generator=g, dtype=torch.float64)
        self.s2 = s2

    def log_joint(self, x, z):  # x [C, n], z [C, d]
        r = x - z @ self.W.T - self.b
        return (-0.5 * (z.square().sum(-1) + z.shape[-1] * math.log(2 * math.pi))
                - 0.5 * (r.square().sum(-1) / self.s2 + x.shape[-1] * math.log(2 * math.pi * self.s2)))

    def exact(self, x):
        cov = self.W @ self.W.T + self.s2 * torch.eye(self.W.shape[0], dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)


def assert_lower_bound(est, exact, what):
    """est [seeds, N] stochastic lower bounds of exact [N]: averaged over the seeds, no point sits
    above its exact value by more than 3 standard errors (over seeds), and the mean over points
    is at most 2 standard errors above; returns the per-point mean errors."""
    err = est.double() - exact.double()
    n = err.shape[0]
    assert n >= 6, "a bound's sign needs several seeds"
    mean, se = err.mean(0), err.std(0) / math.sqrt(n)
    assert (mean <= 3 * se).all(), f"{what}: above the exact value: {mean} (se {se})"
    se_all = se.square().sum().sqrt() / err.shape[1]
    assert float(mean.mean()) <= 2 * float(se_all), f"{what}: mean error {float(mean.mean())} > 2 se {float(se_all)}"
    return mean, se


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("schedule", ["sigmoid", "linear"])
def test_ais_recovers_the_exact_log_likelihood_of_a_linear_gaussian_model(device, schedule):
    """AIS from the prior to p(x, z) with a pilot (2 pilot chains per point adapt the step sizes
    that the 64 reported chains take), 4 data points, 12 seeds: the estimates are within 4
    standard errors of the exact log p(x) and, averaged over seeds, not above it (a lower bound)."""
    m = LinearGaussianModel()
    g = torch.Generator().manual_seed(4)
    x = m.b + torch.randn(4, 5, generator=g, dtype=torch.float64) * 2
    chains, pilot = 64, 2
    xr = x.repeat(chains + pilot, 1).to(device)
    W, b = m.W.to(device), m.b.to(device)
    m.W, m.b = W, b
    betas = (samplers.sigmoid_schedule(300) if schedule == "sigmoid" else samplers.linear_schedule(300))
    est, rates = [], []
    for seed in range(12):
        gd = torch.Generator(device=device).manual_seed(100 + seed)
        z0 = torch.randn(xr.shape[0], 3, generator=gd, dtype=torch.float64, device=device)
        res = samplers.ais(lambda z: -0.5 * (z.square().sum(-1) + 3 * math.log(2 * math.pi)),
                           lambda z: m.log_joint(xr, z), z0, betas, num_leapfrog=5, step_size=0.2,
                           generator=gd, pilot_chains=pilot, num_groups=4)
        assert res.log_weights.shape == (chains * 4,) and res.pilot_acceptance_rate.shape == (pilot * 4,)
        est.append(res.log_normalizer(4).cpu())
        rates.append(float(res.acceptance_rate.mean()))
    m.W, m.b = W.cpu(), b.cpu()
    exact = m.exact(x)
    mean, se = assert_lower_bound(torch.stack(est), exact, f"linear-Gaussian AIS ({schedule})")
    assert (mean.abs() < 4 * se + 1e-3).all(), (mean, se)
    assert all(0.4 < r < 0.95 for r in rates), rates


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_ais_with_a_grad_fn_and_cuda_graph(device, cuda_graph):
    """The same known answer through an analytic grad_fn; on CUDA also with the temperature loop
    captured in a CUDA graph and replayed."""
    if cuda_graph and device == "cpu":
        pytest.skip("CUDA graphs are for CUDA tensors")
    m = LinearGaussianModel()
    g = torch.Generator().manual_seed(14)
    x = m.b + torch.randn(3, 5, generator=g, dtype=torch.float64)
    chains = 256
    xr = x.repeat(chains, 1).to(device)
    W, b = m.W.to(device), m.b.to(device)

    def grad_fn(z):
        r = xr[:z.shape[0]] - z @ W.T - b  # the first rows: a run without the pilot
        li = -0.5 * (z.square().sum(-1) + 3 * math.log(2 * math.pi))
        lt = li - 0.5 * (r.square().sum(-1) / m.s2 + 5 * math.log(2 * math.pi * m.s2))
        return li, lt, -z, -z + (r @ W) / m.s2

    gd = torch.Generator(device=device).manual_seed(15)
    z0 = torch.randn(xr.shape[0], 3, generator=gd, dtype=torch.float64, device=device)
    pilot = 4  # of the 256 rows per point: 252 reported chains
    res = samplers.ais(None, None, z0, samplers.sigmoid_schedule(200), num_leapfrog=5, step_size=0.2,
                       grad_fn=grad_fn, generator=gd, cuda_graph=cuda_graph, pilot_chains=pilot,
                       num_groups=3, record_step_sizes=True)
    reported = chains - pilot
    se = evaluate.log_mean_exp_stderr(res.log_weights.view(reported, 3).cpu())
    est = res.log_normalizer(3).cpu()
    assert ((est - m.exact(x)).abs() < 4 * se + 1e-3).all(), (est - m.exact(x), se)
    assert 0.4 < float(res.acceptance_rate.mean()) < 0.95
    # the reported chains' step sizes: their point's pilot mean, recorded per transition
    sched = res.step_schedule
    assert sched.shape == (199, 3) and bool((sched[0] == 0.2).all()) and bool((sched[1:] != 0.2).any())
    torch.testing.assert_close(res.step_size.view(reported, 3), sched[-1].expand(reported, 3), rtol=0.05, atol=0)
    # the same kernels again, fixed: the mirrored schedule mirrored back is the schedule but its last step
    fixed = samplers.ais(None, None, z0[:reported * 3], samplers.sigmoid_schedule(200), num_leapfrog=5,
                         grad_fn=grad_fn, generator=torch.Generator(device=device).manual_seed(15),
                         cuda_graph=cuda_graph, temperature_step_sizes=sched, num_groups=3,
                         record_step_sizes=True)
    torch.testing.assert_close(fixed.step_schedule, sched, rtol=0, atol=0)
    assert fixed.acceptance_per_temperature.shape == (199,)
    mirrored = samplers.mirrored_schedule(sched)
    torch.testing.assert_close(mirrored[-1], sched[0], rtol=0, atol=0)
    torch.testing.assert_close(samplers.mirrored_schedule(mirrored)[:-1], sched[:-1], rtol=0, atol=0)


def _small_cuda_model_chains(seed):
    """AIS densities of a small package model (hand-written gradient) on CUDA: 8 chains for each
    of 4 data points, and their generator."""
    torch.manual_seed(seed)
    model = VAE(x_dim=20, latent_dims=(3,), hidden=(8,)).double().cuda().eval()
    x = torch.rand(4, 20, dtype=torch.float64, device="cuda").round()
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    return samplers.model_ais_densities(model, x, 8, "posterior", True, g), g


@pytest.mark.cuda
@pytest.mark.skipif(DEVICES[1].marks[0].args[0], reason="needs a CUDA device and kernels")
def test_no_host_synchronisation_in_the_temperature_loop():
    """torch.cuda.set_sync_debug_mode('error') raises on any device-to-host read or blocking copy
    (a plain .to() of the schedule was one): the eager AIS loop of a package model runs through it."""
    dens, g = _small_cuda_model_chains(16)
    betas = samplers.sigmoid_schedule(12)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = samplers.ais(None, None, dens.z0, betas, 3, 0.05, grad_fn=dens.grad_fn, generator=g,
                           cuda_graph=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(res.log_weights).all()


@pytest.mark.cuda
@pytest.mark.skipif(DEVICES[1].marks[0].args[0], reason="needs a CUDA device and kernels")
def test_cuda_graph_captures_once_and_replays_every_later_temperature():
    """The graphed loop of a package model: the capture succeeds (no fallback warning), every
    temperature after the eager warm-up is one replay, and a replay never synchronises
    (sync-debug mode 'error' around each; the host does nothing else between them)."""
    dens, g = _small_cuda_model_chains(18)
    betas = samplers.sigmoid_schedule(40)
    graphed = samplers._hmc_ais._ais_graphed
    seen = []

    def watched(*args, **kw):
        original_replay = torch.cuda.CUDAGraph.replay

        def replay(self):
            torch.cuda.set_sync_debug_mode("error")
            try:
                original_replay(self)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            seen.append(1)

        torch.cuda.CUDAGraph.replay = replay
        try:
            return graphed(*args, **kw)
        finally:
            torch.cuda.CUDAGraph.replay = original_replay

    samplers._hmc_ais._ais_graphed = watched
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="ais: the temperature loop could not be captured")
            res = samplers.ais(None, None, dens.z0, betas, 3, 0.05, grad_fn=dens.grad_fn, generator=g,
                               cuda_graph=True)
    finally:
        samplers._hmc_ais._ais_graphed = graphed
    assert len(seen) == betas.numel() - 1 - 3  # every temperature after the 3 eager warm-ups
    assert torch.isfinite(res.log_weights).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2 or DEVICES[1].marks[0].args[0],
                    reason="needs two CUDA devices and the CUDA kernels")
def test_cuda_graph_on_a_device_that_is_not_the_current_one():
    """z on cuda:1 while cuda:0 is current: the graphed loop captures and replays on cuda:1 and
    gives exactly the eager loop's weights (a capture on the current device would record
    nothing, and the replays would skip temperatures); the current device is left as it was."""
    m = LinearGaussianModel()
    x = (m.b + torch.randn(2, 5, generator=torch.Generator().manual_seed(20), dtype=torch.float64))
    xr = x.repeat(64, 1).to("cuda:1")
    W, b = m.W.to("cuda:1"), m.b.to("cuda:1")

    def grad_fn(z):
        r = xr[:z.shape[0]] - z @ W.T - b  # the first rows: a run without the pilot
        li = -0.5 * (z.square().sum(-1) + 3 * math.log(2 * math.pi))
        lt = li - 0.5 * (r.square().sum(-1) / m.s2 + 5 * math.log(2 * math.pi * m.s2))
        return li, lt, -z, -z + (r @ W) / m.s2

    results = []
    torch.cuda.set_device(0)
    for cuda_graph in (False, True):
        g = torch.Generator(device="cuda:1").manual_seed(21)
        z0 = torch.randn(xr.shape[0], 3, generator=g, dtype=torch.float64, device="cuda:1")
        results.append(samplers.ais(None, None, z0, samplers.sigmoid_schedule(30), num_leapfrog=3,
                                    step_size=0.2, grad_fn=grad_fn, generator=g, cuda_graph=cuda_graph))
        assert torch.cuda.current_device() == 0
    eager, graphed = results
    torch.testing.assert_close(graphed.log_weights, eager.log_weights, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(graphed.z, eager.z, rtol=1e-12, atol=1e-12)
    assert graphed.log_weights.device == torch.device("cuda:1")


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
def test_hand_written_decoder_gradient_equals_autograd(likelihood, activation):
    torch.manual_seed(6)
    model = VAE(x_dim=11, latent_dims=(4,), hidden=(7, 5), activation=activation,
                likelihood=likelihood).double()
    x = torch.rand(9, 11, dtype=torch.float64)
    if likelihood == "bernoulli":
        x = x.round()
    z = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    value, grad = model.log_joint_and_grad(x, z.detach())
    want = model.log_joint(x, z)
    (want_grad,) = torch.autograd.grad(want.sum(), z)
    torch.testing.assert_close(value, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
    none, grad_only = model.log_joint_and_grad(x, z.detach(), value=False)
    assert none is None and torch.equal(grad_only, grad)


def test_fast_gradient_refused_where_it_does_not_apply():
    two = VAE(x_dim=6, latent_dims=(3, 2), hidden=((5,), (4,)))
    assert not two.has_fast_log_joint_grad
    with pytest.raises(ValueError, match="one stochastic layer"):
        two.log_joint_and_grad(torch.rand(2, 6), torch.randn(2, 5))
    model = VAE(x_dim=6, latent_dims=(3,), hidden=(5,))
    with pytest.raises(ValueError, match="z must have shape \\[2, 3\\]"):
        model.log_joint_and_grad(torch.rand(2, 6), torch.randn(3, 3))


def test_ais_agrees_with_a_dense_grid_and_l5000_stays_below(small_2d_model):
    model, x = small_2d_model
    xs = x[:6]
    grid = grid_log_likelihood(model, xs)
    g = torch.Generator().manual_seed(8)
    est = evaluate.ais_log_likelihood(model, xs, num_chains=16, num_temps=500, num_leapfrog=5,
                                      generator=g, return_details=True)
    se = est.stderr
    assert ((est.log_likelihood - grid).abs() < 4 * se + 0.02).all(), (est.log_likelihood - grid, se)
    # L_5000 is below log p(x) in expectation; one draw may overshoot by its standard error
    # (std(w) / (sqrt(k) mean(w)), large where q misses the posterior's mode)
    torch.manual_seed(9)
    with torch.no_grad():
        lw5000 = model.log_weights(xs, 5000)
    l5000 = torch.logsumexp(lw5000, 0) - math.log(5000)
    se5000 = evaluate.log_mean_exp_stderr(lw5000)
    assert (l5000 <= grid + 4 * se5000 + 1e-3).all(), (l5000 - grid, se5000)
    # from the prior (a far worse start: more temperatures) the same answer
    est_prior = evaluate.ais_log_likelihood(model, xs, num_chains=16, num_temps=2000, num_leapfrog=5,
                                            init="prior", generator=g, return_details=True)
    se = est_prior.stderr
    assert ((est_prior.log_likelihood - grid).abs() < 4 * se + 0.02).all(), (est_prior.log_likelihood - grid, se)


def test_ais_is_a_lower_bound_averaged_over_seeds_against_a_dense_grid(small_2d_model):
    """The evaluation's AIS (pilot-adapted step sizes) on a 2-D-latent model whose log p(x) a
    dense grid gives: 6 images x 12 seeds, each image's mean error over seeds is at most 3
    standard errors above zero and the mean over images at most 2. (Every chain adapting on its
    own history sat above the grid by 0.01-0.03 nats per image here.) The seeds are the images'
    stream keys: copy r of image i is keyed (seed, 6 r + i), an independent run of image i."""
    model, x = small_2d_model
    n, seeds = 6, 12
    xs = x[:n]
    grid = grid_log_likelihood(model, xs)
    est = evaluate.ais_log_likelihood(model, xs.repeat(seeds, 1), num_chains=16, num_temps=300, num_leapfrog=5,
                                      seed=3, index=torch.arange(n * seeds), batch_size=n * seeds)
    mean, se = assert_lower_bound(est.view(seeds, n), grid, "AIS against the grid")
    assert (mean.abs() < 4 * se + 0.01).all(), (mean, se)


def test_the_reported_chains_kernels_do_not_depend_on_the_reported_chains(small_2d_model):
    """With the pilot fixed, an image's step sizes and its first chains' weights are the same
    whatever the number of reported chains and the other images in the batch: the kernels the
    reported chains run are fixed by the pilot's numbers alone."""
    model, x = small_2d_model
    kw = dict(num_temps=40, num_leapfrog=3, seed=5, pilot_chains=2, return_details=True, record_step_sizes=True,
              step_size=0.5)
    a = evaluate.ais_log_likelihood(model, x[:4], num_chains=4, **kw)
    b = evaluate.ais_log_likelihood(model, x[2:6], num_chains=8, index=torch.arange(2, 6), **kw)
    torch.testing.assert_close(a.step_schedule[:, 2:], b.step_schedule[:, :2], rtol=0, atol=0)
    torch.testing.assert_close(a.log_weights[:, 2:], b.log_weights[:4, :2], rtol=0, atol=0)
    # the pilot's step sizes move (toward the target acceptance) and differ between images
    assert bool((a.step_schedule[-1] != 0.5).all()) and a.step_schedule[-1].unique().numel() > 1


def test_bdmc_sandwich_holds_on_data_simulated_from_the_default_model():
    """BDMC at 1,000 temperatures on points simulated from the default 784-200-200-50 model:
    forward AIS (a lower bound) sits below reverse AIS with the mirrored step sizes (an upper
    bound) on average: the mean gap is not below zero by more than 2 standard errors."""
    torch.manual_seed(21)
    model = VAE().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    r = evaluate.bdmc(model, num_points=6, num_chains=4, num_temps=1000, num_leapfrog=3,
                      generator=torch.Generator().manual_seed(22))
    gap = r.upper - r.lower
    se = (r.lower_stderr.square() + r.upper_stderr.square()).sum().sqrt() / gap.numel()
    assert torch.isfinite(gap).all()
    assert float(gap.mean()) >= -2 * float(se), (gap, se)


def _evaluation_on(model, xs, device, sim, monkeypatch):
    """L_k, AIS (pilot, recorded steps) and BDMC of `model` on `device` with keyed streams."""
    m = copy.deepcopy(model).to(device)
    x = xs.to(device)
    monkeypatch.setattr(evaluate, "simulate", lambda model, n, generator=None: (sim[0].to(device), sim[1].to(device)))
    lk = evaluate.iwae_log_likelihood(m, x, k=200, seed=3)
    ais = evaluate.ais_log_likelihood(m, x, num_chains=4, num_temps=30, num_leapfrog=3, seed=4,
                                      return_details=True, record_step_sizes=True)
    bd = evaluate.bdmc(m, num_points=sim[0].shape[0], num_chains=4, num_temps=30, num_leapfrog=3, seed=5)
    return lk.cpu(), ais, bd


@pytest.mark.cuda
@pytest.mark.skipif(DEVICES[1].marks[0].args[0], reason="needs a CUDA device and kernels")
def test_evaluation_on_cuda_agrees_with_the_cpu(small_2d_model, monkeypatch):
    """L_k, AIS (the temperature loop in a CUDA graph with the keyed noise and the pilot inside
    it) and BDMC on CUDA give the CPU's numbers: every random number is keyed by image, chain
    and temperature on both devices (float64; the same accept decisions)."""
    model, x = small_2d_model
    xs = x[:5]
    sim = evaluate.simulate(model, 4, torch.Generator().manual_seed(6))
    cpu = _evaluation_on(model, xs, "cpu", sim, monkeypatch)
    gpu = _evaluation_on(model, xs, "cuda", sim, monkeypatch)
    torch.testing.assert_close(gpu[0], cpu[0], rtol=0, atol=1e-9)
    torch.testing.assert_close(gpu[1].log_weights, cpu[1].log_weights, rtol=0, atol=1e-7)
    torch.testing.assert_close(gpu[1].step_schedule, cpu[1].step_schedule, rtol=1e-12, atol=0)
    torch.testing.assert_close(gpu[2].lower, cpu[2].lower, rtol=0, atol=1e-7)
    torch.testing.assert_close(gpu[2].upper, cpu[2].upper, rtol=0, atol=1e-7)


def test_fast_and_autograd_ais_give_the_same_chains(small_2d_model):
    """The hand-written gradient and autograd's drive the same trajectories with the same seed."""
    model, x = small_2d_model
    out = []
    for fast in (True, False):
        g = torch.Generator().manual_seed(10)
        out.append(evaluate.ais_log_likelihood(model, x[:3], num_chains=4, num_temps=30, num_leapfrog=3,
                                               fast_grad=fast, generator=g, return_details=True))
    torch.testing.assert_close(out[0].log_weights, out[1].log_weights, rtol=1e-9, atol=1e-9)


def test_bdmc_sandwiches_the_grid_value(small_2d_model):
    model, _ = small_2d_model
    g = torch.Generator().manual_seed(11)
    r = evaluate.bdmc(model, num_points=5, num_chains=8, num_temps=300, num_leapfrog=5, generator=g)
    grid = grid_log_likelihood(model, r.x.double())
    # each bound holds in expectation: one estimate may cross the true value by its standard error
    assert (r.lower <= grid + 4 * r.lower_stderr + 1e-3).all(), (r.lower - grid, r.lower_stderr)
    assert (r.upper >= grid - 4 * r.upper_stderr - 1e-3).all(), (r.upper - grid, r.upper_stderr)
    assert float(r.gap.mean()) < 0.5


def test_two_layer_model_runs_ais_by_autograd():
    torch.manual_seed(12)
    model = VAE(x_dim=10, latent_dims=(3, 2), hidden=((6,), (4,))).double()
    x = torch.rand(4, 10, dtype=torch.float64).round()
    est = evaluate.ais_log_likelihood(model, x, num_chains=4, num_temps=20, num_leapfrog=2)
    assert est.shape == (4,) and torch.isfinite(est).all()


def test_schedules():
    lin = samplers.linear_schedule(5)
    torch.testing.assert_close(lin, torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64))
    s = samplers.sigmoid_schedule(101, rad=4)
    assert s[0] == 0 and s[-1] == 1 and bool((s[1:] > s[:-1]).all())
    d = s[1:] - s[:-1]
    assert d[0] < d[50] and d[-1] < d[50]  # denser at both ends
    torch.testing.assert_close(s + s.flip(0), torch.ones_like(s))  # symmetric
    with pytest.raises(ValueError, match="num_temps"):
        samplers.linear_schedule(1)
    with pytest.raises(ValueError, match="rad"):
        samplers.sigmoid_schedule(10, rad=0)


def test_api_errors_name_the_argument():
    z0 = torch.zeros(3, 2)
    f = lambda z: -z.square().sum(-1)  # noqa: E731
    with pytest.raises(ValueError, match="betas must run from 0 to 1"):
        samplers.ais(f, f, z0, [0.0, 0.5])
    with pytest.raises(ValueError, match="z0 must have shape"):
        samplers.ais(f, f, torch.zeros(3), [0.0, 1.0])
    with pytest.raises(ValueError, match="num_leapfrog"):
        samplers.ais(f, f, z0, [0.0, 1.0], num_leapfrog=0)
    with pytest.raises(ValueError, match="step_size"):
        samplers.ais(f, f, z0, [0.0, 1.0], step_size=-1.0)
    with pytest.raises(ValueError, match="target_accept"):
        samplers.hmc(f, z0, 2, target_accept=1.5)
    with pytest.raises(ValueError, match="log-density must map"):
        samplers.hmc(lambda z: z, z0, 2)
    with pytest.raises(ValueError, match="init"):
        evaluate.ais_log_likelihood(VAE(x_dim=6, latent_dims=(2,), hidden=(3,)), torch.rand(2, 6),
                                    num_temps=3, init="uniform")
    with pytest.raises(ValueError, match="schedule"):
        evaluate.ais_log_likelihood(VAE(x_dim=6, latent_dims=(2,), hidden=(3,)), torch.rand(2, 6),
                                    num_temps=3, schedule="cosine")
    rw = VAE(x_dim=6, latent_dims=(2,), hidden=(3,), random_weights="all")
    with pytest.raises(ValueError, match="deterministic weights"):
        evaluate.ais_log_likelihood(rw, torch.rand(2, 6), num_temps=3)
