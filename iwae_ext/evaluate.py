"""Evaluation the way the papers do it: L_k (k = 5000), the ELBO, active units, gaps.

All functions take any model with ``posterior(x)`` and ``log_joint(x, z)``
(:class:`~iwae_ext.protocol.LatentVariableModel`; the optional hooks of :mod:`iwae_ext.protocol` give
faster or more exact paths, and the package's own models have them all) and data x [N, D]
(values in [0, 1] for Bernoulli models; binarise greyscale data first), run without gradients, in batches of
``batch_size`` data points and, over k, in chunks of at most ``max_rows`` (samples x data
points; default 10,000 on a CPU, 50,000 on a GPU) so that memory stays bounded whatever k is.
Values are per data point, in nats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import protocol as _protocol
from .diagnostics import MIN_TAIL, _khat_from_top, effective_sample_size, pareto_khat, summarize, tail_length
from .keyed import KeyedNoise, keyed_draws, resolve_seed
from .ops import logmeanexp

__all__ = ["Bounds", "iwae_log_likelihood", "bounds", "elbo", "active_units",
           "reconstruction_error", "ACTIVE_UNIT_THRESHOLD", "ais_log_likelihood", "AISEstimate",
           "bdmc", "BDMCResult", "simulate", "log_mean_exp_stderr", "reconstruction_error_qiw",
           "squared_error", "default_pilot_chains"]

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016: unit u is active if Cov_x(E_q[u]) > 0.01

# Rows (samples x data points) per chunk of L_k when max_rows is None. Measured on the 2-core
# Xeon with the default model (benchmarks/bench_decoder.py, 200 test images): L_5000 took 2.40 s
# at 10,000 rows, 2.46 s at 2,000 and 2.61 s at 50,000 (and 1.13-1.17 against 1.34-1.48 s per
# 100 images in a separate run). A GPU wants larger products (not yet measured there).
DEFAULT_MAX_ROWS = {"cpu": 10_000}
DEFAULT_MAX_ROWS_OTHER = 50_000


def _max_rows(max_rows, device: torch.device) -> int:
    if max_rows is None:
        return DEFAULT_MAX_ROWS.get(device.type, DEFAULT_MAX_ROWS_OTHER)
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive int or None, got {max_rows!r}")
    return max_rows


@dataclass
class Bounds:
    """Per-data-point L_k (log-likelihood estimate) and ELBO (mean of the same k log-weights)."""

    log_likelihood: Tensor  # [N]
    elbo: Tensor  # [N]
    stderr: Tensor | None = None  # [N] delta-method standard error of L_k over its k samples
    ess: Tensor | None = None  # [N] effective sample size of the k weights (iwae_ext.diagnostics)
    khat: Tensor | None = None  # [N] Pareto k-hat of the k weights; above 0.7 stderr is not to be trusted
    k: int = 0  # importance samples per data point

    def diagnostics(self) -> dict:
        """The weights' diagnostics summarised over the data points (:func:`iwae_ext.diagnostics.summarize`)."""
        if self.ess is None or self.khat is None:
            raise ValueError("Bounds.diagnostics: these bounds carry no ess / khat")
        return summarize(self.khat, self.ess, self.k)


class _Param:
    """Device and dtype of a model (its first parameter's, or the data's for a model without)."""

    def __init__(self, model, x=None):
        self.device, self.dtype = _protocol.device_dtype(model, x)


def _likelihood(model) -> str | None:
    """The model's observation model ("bernoulli", "gaussian") where it says."""
    config = getattr(model, "config", None)
    if isinstance(config, dict) and isinstance(config.get("likelihood"), str):
        return config["likelihood"]
    value = getattr(model, "likelihood", None)
    return value if isinstance(value, str) else None


def _check(x: Tensor, k: int, batch_size: int, model=None):
    """Arguments of every evaluation function; with ``model``, also the data: floating point, no
    NaN, and in [0, 1] for a Bernoulli decoder (one read of x to the host, before any loop)."""
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a tensor of shape [N, D], got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if model is None:
        return
    _protocol.check_model(model, "evaluate")
    if not x.is_floating_point():
        hint = " (0-255 images: x.float() / 255, then binarise)" if x.dtype == torch.uint8 else ""
        raise TypeError(f"x must be floating point with values in [0, 1], got {x.dtype}{hint}")
    if x.numel() == 0:
        return
    nan = torch.isnan(x).any(1)
    lo, hi, any_nan = torch.stack([x.min().double(), x.max().double(), nan.any().double()]).tolist()
    if any_nan:
        raise ValueError(f"x holds NaN (first in row {int(nan.nonzero()[0, 0])} of {x.shape[0]})")
    if _likelihood(model) == "bernoulli" and (lo < 0 or hi > 1):
        hint = " (0-255 images? divide by 255)" if hi > 1 else ""
        raise ValueError(f"x must be in [0, 1] for a model with a Bernoulli decoder, got values in "
                         f"[{lo:g}, {hi:g}]{hint}")


def _index(index, n: int, fn: str) -> Tensor:
    """The images' indices [N] (int64, on the host): ``index`` or 0..N-1."""
    if index is None:
        return torch.arange(n, dtype=torch.int64)
    if not isinstance(index, Tensor) or index.shape != (n,) or index.is_floating_point() or index.is_complex():
        raise ValueError(f"{fn}: index must be an integer tensor of shape [{n}] (one index per row of x), got "
                         f"{tuple(index.shape) if isinstance(index, Tensor) else type(index).__name__}")
    return index.to(device="cpu", dtype=torch.int64)


@torch.no_grad()
def bounds(model, x: Tensor, k: int = 5000, batch_size: int = 100, max_rows: int | None = None,
           progress: bool = False, desc: str | None = None, seed: int | None = None,
           index: Tensor | None = None) -> Bounds:
    """L_k and the ELBO per data point, from the same k importance samples per point.

    L_k = log (1/k) sum_i w_i (Burda et al. 2016, eq. 8), combined across chunks of samples
    exactly (a log-sum-exp of the chunks' log-mean-exps weighted by their sizes);
    ELBO = (1/k) sum_i log w_i. ``desc`` names the progress bar (e.g. the split). Each point
    also gets the delta-method standard error of L_k, the effective sample size of its k weights
    and their Pareto k-hat (:mod:`iwae_ext.diagnostics`; fitted to the largest
    ceil(min(k / 5, 3 sqrt(k))) weights, kept across chunks, so memory stays bounded; NaN for
    k < 21): where k-hat > 0.7 neither L_k nor its standard error is to be trusted.

    Per-image streams (:mod:`iwae_ext.keyed`): sample i of image ``index[n]`` (default n, the row
    of x) is drawn from the stream of (seed, index[n], i), so a value does not depend on
    ``batch_size``, ``max_rows``, the other rows of x or the process computing it. ``seed``
    None draws one from torch's default generator.
    """
    _check(x, k, batch_size, model)
    index = _index(index, x.shape[0], "bounds")
    seed = resolve_seed(seed)
    p = _Param(model, x)
    max_rows = _max_rows(max_rows, torch.device(p.device))
    lls, elbos, errs, esss, khats = [], [], [], [], []
    tail = tail_length(k) + 1  # the largest weights the Pareto k-hat is fitted to (and its cutoff)
    fit_tail = tail - 1 >= MIN_TAIL and k > tail - 1
    n_batches = math.ceil(x.shape[0] / batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_batches, desc=f"{desc} L_{k}" if desc else f"L_{k}", unit="batch", leave=False)
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device=p.device, dtype=p.dtype)
        noise = KeyedNoise(seed, index[start:start + batch_size], p.device)
        chunk = max(1, min(k, max_rows // xb.shape[0]))
        parts, squares, total = [], [], torch.zeros(xb.shape[0], dtype=torch.float64, device=p.device)
        top = None  # the `tail` largest log-weights so far, [<= tail, B]
        for done in range(0, k, chunk):
            kc = min(chunk, k - done)
            with keyed_draws(noise, row_start=done):
                log_w = _protocol.log_weights(model, xb, kc)
            lw64 = log_w.double()  # chunks combine in double: a value does not depend on the chunking
            parts.append(logmeanexp(lw64, 0) + math.log(kc))
            squares.append(torch.logsumexp(2 * lw64, 0))
            total += lw64.sum(0)
            if fit_tail:
                pool = lw64 if top is None else torch.cat([top, lw64])
                top = torch.topk(pool, min(tail, pool.shape[0]), dim=0).values
        log_s1 = torch.logsumexp(torch.stack(parts), 0)
        lls.append(log_s1 - math.log(k))
        elbos.append(total / k)
        log_s2 = torch.logsumexp(torch.stack(squares), 0)
        # stderr = sqrt((k S2 / S1^2 - 1) / (k - 1)), S_j = sum_i w_i^j: log_mean_exp_stderr's value
        ratio = torch.exp(math.log(k) + log_s2 - 2 * log_s1) - 1
        errs.append((ratio.clamp_min(0) / (k - 1)).sqrt() if k > 1 else torch.full_like(log_s1, math.nan))
        esss.append(torch.exp(2 * log_s1 - log_s2))  # Kong's ESS, S1^2 / S2
        khats.append(_khat_from_top(top, log_w.dtype) if fit_tail else torch.full_like(log_s1, math.nan))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return Bounds(torch.cat(lls).cpu(), torch.cat(elbos).cpu(), torch.cat(errs).cpu(), torch.cat(esss).cpu(),
                  torch.cat(khats).cpu(), k)


def iwae_log_likelihood(model, x: Tensor, k: int = 5000, batch_size: int = 100,
                        max_rows: int | None = None, progress: bool = False, seed: int | None = None,
                        index: Tensor | None = None) -> Tensor:
    """L_k per data point [N] (float64): the importance-sampled log-likelihood estimate."""
    return bounds(model, x, k, batch_size, max_rows, progress, seed=seed, index=index).log_likelihood


def elbo(model, x: Tensor, k: int = 1000, batch_size: int = 100, max_rows: int | None = None,
         seed: int | None = None, index: Tensor | None = None) -> Tensor:
    """The ELBO per data point [N], averaged over k samples of q(z|x)."""
    return bounds(model, x, k, batch_size, max_rows, seed=seed, index=index).elbo


@torch.no_grad()
def active_units(model, x: Tensor, batch_size: int = 1000, threshold: float = ACTIVE_UNIT_THRESHOLD,
                 num_samples: int = 100) -> dict:
    """Active units per stochastic layer: unit u is active when Cov_x(E_q[u]) > threshold.

    Returns {"active": [count per layer], "variances": [tensor [Z_i] per layer]}. The top layer of
    a two-layer model takes E_q[z2] = E_{q(z1|x)}[mean of q(z2|z1)] by ``num_samples`` draws.
    """
    _check(x, 1, batch_size, model)
    p = _Param(model, x)
    means = None
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device=p.device, dtype=p.dtype)
        m = _protocol.posterior_means(model, xb, num_samples)
        means = [[t] for t in m] if means is None else [acc + [t] for acc, t in zip(means, m)]
    variances = [torch.cat(m).double().var(0, unbiased=False).cpu() for m in means]
    return {"active": [int((v > threshold).sum()) for v in variances], "variances": variances}


@torch.no_grad()
def reconstruction_error(model, x: Tensor, batch_size: int = 1000) -> Tensor:
    """-log p(x | z1 = E_q[z1]) per data point [N]: the negative log-likelihood of x under the
    decoder at the posterior mean (binary cross-entropy summed over pixels for Bernoulli data)."""
    _check(x, 1, batch_size, model)
    p = _Param(model, x)
    out = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device=p.device, dtype=p.dtype)
        q = model.posterior(xb)
        if hasattr(q, "q1"):  # two layers: z1 at its mean, z2 at the mean of q(z2|z1 = E[z1])
            z1 = q.q1.loc
            z = torch.cat([z1, q.layer2(z1)[0]], -1)
        else:
            z = q.mean
        out.append(-_protocol.log_likelihood(model, xb, z.unsqueeze(0))[0].double().cpu())
    return torch.cat(out)


SCHEDULES = ("sigmoid", "linear")


@dataclass
class AISEstimate:
    """AIS log-likelihood per data point with the sampler's diagnostics."""

    log_likelihood: Tensor     # [N] float64, log-mean-exp of each point's chains' weights
    log_weights: Tensor        # [S, N] float64, every chain's log weight
    acceptance_rate: Tensor    # [N] mean over the point's chains
    step_size: Tensor          # [N] the step size of the point's last transition
    step_schedule: Tensor | None = None  # [T-1, N] with record_step_sizes: each transition's step
    gradient_precision: str = "full"  # what the trajectories' interior gradients took: "bf16" or "full"

    @property
    def stderr(self) -> Tensor:
        """[N] standard error of each point's estimate over its chains (delta method)."""
        return log_mean_exp_stderr(self.log_weights)

    @property
    def ess(self) -> Tensor:
        """[N] effective sample size of each point's chain weights (:mod:`iwae_ext.diagnostics`)."""
        return effective_sample_size(self.log_weights)

    @property
    def khat(self) -> Tensor:
        """[N] Pareto k-hat of each point's chain weights (:func:`iwae_ext.diagnostics.pareto_khat`),
        NaN below 21 chains (too few weights to fit a tail)."""
        return pareto_khat(self.log_weights)

    def diagnostics(self) -> dict:
        """The chain weights' diagnostics summarised over the data points."""
        return summarize(self.khat, self.ess, self.log_weights.shape[0])


def _schedule(schedule: str, num_temps: int) -> Tensor:
    from .samplers import linear_schedule, sigmoid_schedule
    from ._checks import check_choice
    check_choice("schedule", schedule, SCHEDULES, "ais_log_likelihood")
    return sigmoid_schedule(num_temps) if schedule == "sigmoid" else linear_schedule(num_temps)


def default_pilot_chains(num_chains: int) -> int:
    """The evaluation's pilot chains per data point: one for every 16 reported chains, at least one."""
    return max(1, num_chains // 16)


def ais_log_likelihood(model, x: Tensor, num_chains: int = 16, num_temps: int = 10000,
                       num_leapfrog: int = 10, schedule: str = "sigmoid", init: str = "posterior",
                       step_size: float = 0.05, target_accept: float = 0.65, batch_size: int = 100,
                       fast_grad: bool = True, generator: torch.Generator | None = None,
                       progress: bool = False, return_details: bool = False, seed: int | None = None,
                       index: Tensor | None = None, reverse_z: Tensor | None = None,
                       desc: str | None = None, pilot_chains: int | None = None,
                       step_schedule: Tensor | None = None, record_step_sizes: bool = False,
                       gradient_precision: str = "auto"):
    """log p(x) per data point [N] (float64) by annealed importance sampling (Wu et al. 2017).

    ``num_chains`` independent AIS chains per point from q(z|x) (``init="posterior"``) or p(z)
    (``init="prior"``) to p(x, z), ``num_temps`` inverse temperatures (``schedule`` "sigmoid",
    Wu et al.'s, or "linear"), one HMC transition of ``num_leapfrog`` steps per temperature. The
    estimate is the log-mean-exp of the chains' weights: a stochastic lower bound of log p(x)
    (below it on average over seeds) that tightens as num_temps grows.

    Step sizes: ``pilot_chains`` (default one per 16 chains, :func:`default_pilot_chains`) extra
    chains per point, on streams of their own, start at ``step_size`` and adapt toward
    ``target_accept`` on their own history; each point's reported chains take, at every
    temperature, the mean step size of that point's pilot chains. Their transitions so never
    depend on their own states, which keeps the weights unbiased (adapting each chain on its own
    history, as Wu et al. do, put estimates above log p(x) on average). The pilot's chains are
    not in the estimate; they cost pilot_chains / num_chains more work. ``step_schedule``
    [T-1, N] fixes every point's step sizes instead (no pilot), e.g. a forward run's
    ``step_schedule`` through :func:`iwae_ext.samplers.mirrored_schedule` for BDMC's reverse run.
    ``return_details``: an :class:`AISEstimate` with every chain's weight and the diagnostics
    (and ``record_step_sizes``: the step size of every point at every transition).

    Per-image streams (:mod:`iwae_ext.keyed`): every random number of chain s of image
    ``index[n]`` (default n) at temperature t comes from (seed, index[n], s, t), so an image's
    estimate does not depend on ``batch_size``, the other images or the process computing it.
    ``seed`` None takes one draw from ``generator`` (or torch's default generator).
    ``reverse_z`` [N, Z]: run reverse AIS from these exact posterior samples instead (BDMC's
    upper bound; the estimate is then of 1/p(x), see :func:`bdmc`).

    ``gradient_precision`` ("auto", "bf16" or "full"): the precision of the gradients at the
    interior positions of each HMC trajectory (:func:`iwae_ext.samplers.model_ais_densities`).
    The weights, the energies of every Metropolis test and the gradients at the trajectories'
    ends stay in the model's dtype, so "bf16" is the same estimator (only the acceptance rate
    can differ); "auto" takes bf16 for the package's float32 models where the device multiplies
    bfloat16 faster (docs/sampling.rst, "Gradient precision"). The result's
    ``gradient_precision`` says which ran.
    """
    from .samplers import ais, model_ais_densities
    _check(x, 1, batch_size, model)
    index = _index(index, x.shape[0], "ais_log_likelihood")
    seed = resolve_seed(seed, generator)
    betas = _schedule(schedule, num_temps)
    if step_schedule is not None:
        if not isinstance(step_schedule, Tensor) or step_schedule.shape != (num_temps - 1, x.shape[0]):
            raise ValueError(f"ais_log_likelihood: step_schedule must be a tensor of shape "
                             f"[num_temps - 1, N] = [{num_temps - 1}, {x.shape[0]}], got "
                             f"{getattr(step_schedule, 'shape', type(step_schedule).__name__)}")
        if pilot_chains:
            raise ValueError("ais_log_likelihood: step_schedule fixes the step sizes; pilot_chains adapts them")
        pilot = 0
    elif pilot_chains is None:
        pilot = default_pilot_chains(num_chains)
    elif isinstance(pilot_chains, int) and not isinstance(pilot_chains, bool) and pilot_chains >= 1:
        pilot = pilot_chains
    else:
        raise ValueError(f"ais_log_likelihood: pilot_chains must be a positive int (or None), got {pilot_chains!r}")
    p = _Param(model, x)
    with _protocol.evaluation_mode(model):
        rows, weights, rates, steps, schedules = [], [], [], [], []
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=x.shape[0], desc=desc or f"AIS T={num_temps}", unit="image", leave=False)
        try:
            for start in range(0, x.shape[0], batch_size):
                xb = x[start:start + batch_size].to(device=p.device, dtype=p.dtype)
                b = xb.shape[0]
                noise = KeyedNoise(seed, index[start:start + batch_size], p.device)
                dens = model_ais_densities(model, xb, num_chains, init, fast_grad, noise, pilot,
                                           gradient_precision)
                used = "full" if dens.gradient_dtype is None else "bf16"
                fixed = None if step_schedule is None else step_schedule[:, start:start + batch_size]
                kw = dict(grad_fn=dens.grad_fn, generator=noise, pilot_chains=pilot,
                          temperature_step_sizes=fixed, record_step_sizes=record_step_sizes)
                if reverse_z is None:
                    res = ais(None, None, dens.z0, betas, num_leapfrog, step_size, target_accept, **kw)
                else:
                    def backwards(zz, f=dens.grad_fn):
                        li, lt, gi, gt = f(zz)
                        return lt, li, gt, gi  # the target is the start, q(z|x) the end

                    inner = getattr(dens.grad_fn, "grads_only", None)
                    if inner is not None:
                        backwards.grads_only = lambda zz, f=inner: f(zz)[::-1]

                    zb = reverse_z[start:start + batch_size].to(device=p.device, dtype=p.dtype)
                    kw["grad_fn"] = backwards
                    res = ais(None, None, zb.repeat(num_chains + pilot, 1), betas, num_leapfrog, step_size,
                              target_accept, reverse=True, **kw)
                rows.append(res.log_normalizer(b).cpu())
                weights.append(res.log_weights.view(num_chains, b).cpu())
                rates.append(res.acceptance_rate.view(num_chains, b).mean(0).cpu())
                steps.append(res.step_size.double().view(num_chains, b)[0].cpu())
                if record_step_sizes:
                    schedules.append(res.step_schedule.cpu())
                if bar is not None:
                    bar.update(b)
        finally:
            if bar is not None:
                bar.close()
    ll = torch.cat(rows)
    if not return_details:
        return ll
    return AISEstimate(ll, torch.cat(weights, 1), torch.cat(rates), torch.cat(steps),
                       torch.cat(schedules, 1) if record_step_sizes else None,
                       used if x.shape[0] else "full")


@dataclass
class BDMCResult:
    """Bidirectional Monte Carlo on data simulated from the model (Grosse et al. 2015; Wu et al.
    2017): ``lower`` (forward AIS) and ``upper`` (reverse AIS from the exact posterior sample that
    generated each point) sandwich the true log p(x) of the simulated ``x``, per point [N]."""

    x: Tensor
    z: Tensor
    lower: Tensor
    upper: Tensor
    lower_stderr: Tensor  # [N] delta-method standard errors of the two log-mean-exps over chains
    upper_stderr: Tensor

    @property
    def gap(self) -> Tensor:
        """The gap ``upper - lower`` per point: how far AIS with this schedule may be from log p(x)."""
        return self.upper - self.lower


@torch.no_grad()
def simulate(model, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(x, z) with z ~ p(z), x ~ p(x|z): n exact joint draws ([n, D], [n, Z]); the package's models
    with one stochastic layer, or any model with a ``simulate(n, generator)`` method."""
    own = getattr(model, "simulate", None)
    if callable(own):
        return own(n, generator)
    if not hasattr(model, "latent_dims") or not hasattr(model, "decoder"):
        raise ValueError("simulate: the model has no simulate(n, generator) method to draw (x, z) "
                         "from p(x, z), which BDMC needs")
    if len(model.latent_dims) != 1:
        raise ValueError("simulate: one stochastic layer only")
    p = _Param(model)
    z = torch.randn(n, model.latent_dim, dtype=p.dtype, device=p.device, generator=generator)
    return model.decoder.sample(model.decoder(z), generator), z


def bdmc(model, num_points: int = 100, num_chains: int = 16, num_temps: int = 10000,
         num_leapfrog: int = 10, schedule: str = "sigmoid", step_size: float = 0.05,
         target_accept: float = 0.65, batch_size: int = 100, fast_grad: bool = True,
         generator: torch.Generator | None = None, seed: int | None = None,
         points: Tensor | None = None, gradient_precision: str = "auto") -> BDMCResult:
    """Sandwich log p(x) on ``num_points`` points simulated from the model (one stochastic layer).

    Forward AIS (q(z|x) -> p(x, z)) gives a stochastic lower bound; reverse AIS (p(z|x) -> q(z|x),
    starting every chain at the z that generated x, an exact posterior sample) estimates 1/p(x)
    without bias, so minus its log-mean-exp is a stochastic upper bound. The forward run's step
    sizes come from its pilot chains (see :func:`ais_log_likelihood`); the reverse run uses them
    mirrored (:func:`iwae_ext.samplers.mirrored_schedule`), the same kernels in reverse order. The points are drawn
    with ``generator``; the AIS runs use per-point streams under ``seed`` (None: one draw from
    ``generator``), so ``points`` (indices into the simulated set, e.g. one process's share)
    gives each point the values it has in the whole run. ``gradient_precision``: as in
    :func:`ais_log_likelihood`, for both directions.
    """
    x, z = simulate(model, num_points, generator)
    seed = resolve_seed(seed, generator)
    index = torch.arange(num_points) if points is None else _index(points, points.shape[0], "bdmc")
    x, z = x[index.to(x.device)], z[index.to(z.device)]
    common = (num_chains, num_temps, num_leapfrog, schedule, "posterior", step_size, target_accept,
              batch_size, fast_grad)
    from .samplers import mirrored_schedule
    fwd = ais_log_likelihood(model, x, *common, return_details=True, seed=seed, index=index,
                             record_step_sizes=True, gradient_precision=gradient_precision)
    rev = ais_log_likelihood(model, x, *common, return_details=True, seed=seed, index=index, reverse_z=z,
                             step_schedule=mirrored_schedule(fwd.step_schedule),
                             gradient_precision=gradient_precision)
    return BDMCResult(x.cpu(), z.cpu(), fwd.log_likelihood, -rev.log_likelihood,
                      log_mean_exp_stderr(fwd.log_weights), log_mean_exp_stderr(rev.log_weights))


def log_mean_exp_stderr(log_w: Tensor, dim: int = 0) -> Tensor:
    """Standard error of log((1/S) sum_s w_s) from the S log-weights along ``dim`` (delta method:
    std(w) / (sqrt(S) mean(w)), computed stably)."""
    w = torch.exp(log_w - log_w.amax(dim, keepdim=True))
    return w.std(dim) / (math.sqrt(log_w.shape[dim]) * w.mean(dim))


@torch.no_grad()
def reconstruction_error_qiw(model, x: Tensor, k: int = 100, batch_size: int = 100) -> Tensor:
    """-log p(x | z) per data point [N] with z one draw from q_IW(z|x) with k proposals (paper
    001: reconstructions through importance resampling rather than the encoder alone)."""
    from .samplers import sir
    _check(x, k, batch_size, model)
    p = _Param(model, x)
    out = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device=p.device, dtype=p.dtype)
        z = sir(model, xb, k)  # [1, B, Z]
        out.append(-_protocol.log_likelihood(model, xb, z)[0].double().cpu())
    return torch.cat(out)


def squared_error(model, x: Tensor) -> Tensor:
    """||x - decoder mean at z = E_q[z1]||^2 per data point [N] (differentiable): the
    reconstruction error of Kingma and Welling, section 5 of the reproduction by Nicholson et al., and the loss of the vanilla autoencoder
    (``iwae-train --model ae``: the encoder's mean is its code). Divide by D for the MSE."""
    p = _Param(model, x)
    x = x.to(device=p.device, dtype=p.dtype)
    q = model.posterior(x)
    z1 = q.loc if hasattr(q, "loc") else q.q1.loc
    return (x - model.decoder.mean(model.decoder(z1))).square().sum(-1)


if __name__ == "__main__":  # the old entry point; iwae-eval is iwae_ext.cli.eval
    import warnings
    warnings.warn("python -m iwae_ext.evaluate moved to python -m iwae_ext.cli.eval (or iwae-eval); the old "
                  "path will be removed in the next release", FutureWarning, stacklevel=1)
    from iwae_ext.cli.eval import main
    raise SystemExit(main())
