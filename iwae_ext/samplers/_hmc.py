"""Batched HMC and annealed importance sampling over C independent chains (DESIGN.md 3.2).

Both run on the fused ops ``iwae_ext.ops.hmc_leapfrog`` / ``hmc_accept``; the densities and their
gradients come from the caller (autograd, or a hand-written ``grad_fn``). Nothing in the loops
reads a value back to the host, so on CUDA they queue without synchronising.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..keyed import STREAMS, KeyedNoise, check_generator
from ..ops import hmc_accept, hmc_leapfrog

LogDensity = Callable[[Tensor], Tensor]


@dataclass
class StepSizeAdaptation:
    """Per-chain step-size adaptation (see :func:`iwae_ext.ops.hmc_accept`): a running average of
    the acceptance probability (weight ``decay`` on the past); the step size is multiplied by
    ``inc`` while that average is above the target and by ``dec`` otherwise, within
    [min_step, max_step]. Wu et al. (2017)'s values by default."""

    decay: float = 0.9
    inc: float = 1.02
    dec: float = 0.98
    min_step: float = 1e-4
    max_step: float = 1.0


def linear_schedule(num_temps: int, dtype=torch.float64, device=None) -> Tensor:
    """beta_t = t / (T - 1), t = 0..T-1 (paper 004's schedule)."""
    _check_num_temps(num_temps)
    return torch.linspace(0.0, 1.0, num_temps, dtype=dtype, device=device)


def sigmoid_schedule(num_temps: int, rad: float = 4.0, dtype=torch.float64, device=None) -> Tensor:
    """Wu et al. (2017)'s schedule: sigmoid of T points evenly spaced in [-rad, rad], rescaled to
    run from exactly 0 to exactly 1 (denser steps near both ends)."""
    _check_num_temps(num_temps)
    if not (isinstance(rad, (int, float)) and rad > 0 and math.isfinite(rad)):
        raise ValueError(f"sigmoid_schedule: rad must be a positive number, got {rad!r}")
    s = torch.sigmoid(torch.linspace(-rad, rad, num_temps, dtype=torch.float64))
    s = (s - s[0]) / (s[-1] - s[0])
    return s.to(dtype=dtype, device=device)


def _check_num_temps(num_temps):
    if not isinstance(num_temps, int) or isinstance(num_temps, bool) or num_temps < 2:
        raise ValueError(f"num_temps must be an int >= 2 (beta_0 = 0 and beta_T-1 = 1), got {num_temps!r}")


def _check_positive_int(name, value, fn):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{fn}: {name} must be a positive int, got {value!r}")


def _check_z0(z0, fn):
    if not isinstance(z0, Tensor):
        raise TypeError(f"{fn}: z0 must be a torch.Tensor, got {type(z0).__name__}")
    if z0.dim() != 2 or z0.shape[0] == 0 or z0.shape[1] == 0:
        raise ValueError(f"{fn}: z0 must have shape [chains, dim] with both > 0, got {tuple(z0.shape)}")
    if z0.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{fn}: z0 must be float32 or float64, got {z0.dtype}")


def _per_chain(value, name, z0, fn) -> Tensor:
    """A positive scalar or a [C] tensor -> a [C] tensor like z0."""
    if isinstance(value, Tensor):
        if value.shape != (z0.shape[0],):
            raise ValueError(f"{fn}: {name} must be a number or a tensor of shape [{z0.shape[0]}], "
                             f"got shape {tuple(value.shape)}")
        out = value.detach().to(dtype=z0.dtype, device=z0.device).clone()
        if not bool(((out > 0) & torch.isfinite(out)).all()):  # one read-back, before any loop
            raise ValueError(f"{fn}: {name} must be positive and finite")
        return out
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{fn}: {name} must be positive and finite, got {value!r}")
    return torch.full((z0.shape[0],), float(value), dtype=z0.dtype, device=z0.device)


def _check_target_accept(target_accept, fn):
    if not (isinstance(target_accept, (int, float)) and 0 < target_accept < 1):
        raise ValueError(f"{fn}: target_accept must be in (0, 1), got {target_accept!r}")


def _autograd_value_and_grad(fns: Sequence[LogDensity]):
    """z -> (f(z) for f in fns) + (grad_z f(z) for f in fns), by autograd, values detached."""

    def value_and_grad(z: Tensor):
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            values = [f(zz) for f in fns]
            for f, v in zip(fns, values):
                if not isinstance(v, Tensor) or v.shape != (z.shape[0],):
                    raise ValueError(f"a log-density must map z [{z.shape[0]}, {z.shape[1]}] to "
                                     f"[{z.shape[0]}], got {getattr(v, 'shape', type(v).__name__)}")
            grads = []
            for i, v in enumerate(values):
                g = (torch.autograd.grad(v.sum(), zz, retain_graph=i + 1 < len(values), allow_unused=True)[0]
                     if v.requires_grad else None)
                grads.append(torch.zeros_like(z) if g is None else g)  # a density constant in z
        return tuple(v.detach() for v in values) + tuple(grads)

    return value_and_grad


class _Trajectory:
    """HMC transitions for U(z) = -((1 - beta) log_init(z) + beta log_target(z)) from a
    value-and-gradient function returning (log_init, log_target, grad_init, grad_target)
    (log_init and grad_init may be None: plain HMC on the target, beta = 1)."""

    def __init__(self, value_and_grad, num_leapfrog, target_accept, adapt, settings, generator,
                 streams=(STREAMS["ais_momentum"], STREAMS["ais_uniform"])):
        check_generator(generator)
        self.streams = streams
        self.value_and_grad = value_and_grad
        self.num_leapfrog = num_leapfrog
        self.target_accept = float(target_accept)
        self.adapt = bool(adapt)
        self.settings = settings
        self.generator = generator

    @staticmethod
    def potential(cache, beta):
        li, lt, gi, gt = cache
        if li is None:
            return -lt, -gt
        # -(li + beta (lt - li)): lerp keeps it one kernel per tensor, beta a 0-d tensor
        return -torch.lerp(li, lt, beta), -torch.lerp(gi, gt, beta)

    def _momentum(self, z, t):
        g = self.generator
        if isinstance(g, KeyedNoise):
            return g.chain_normal(z.shape[0], z.shape[1], self.streams[0], t, z.dtype)
        return torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=g)

    def _log_uniform(self, z, t):
        g = self.generator
        if isinstance(g, KeyedNoise):
            return g.chain_uniform(z.shape[0], self.streams[1], t, z.dtype).log_()
        return torch.rand(z.shape[0], dtype=z.dtype, device=z.device, generator=g).log_()

    def transition(self, z, cache, beta, step, avg, t=0):
        """One HMC transition of every chain; returns (z, cache, accepted, step, avg). ``t``
        (an int or a device counter) keys the random numbers of a :class:`KeyedNoise`."""
        u0, gu = self.potential(cache, beta)
        p0 = self._momentum(z, t)
        zl, p = hmc_leapfrog(z, p0, gu, step, 0.5, True)
        grads_only = getattr(self.value_and_grad, "grads_only", None)
        for step_index in range(self.num_leapfrog):
            last = step_index + 1 == self.num_leapfrog
            if last or grads_only is None:
                new = self.value_and_grad(zl)
                u1, gu = self.potential(new, beta)
            else:  # inside the trajectory only the gradient is needed
                gi, gt = grads_only(zl)
                gu = -gt if gi is None else -torch.lerp(gi, gt, beta)
            if last:
                _, p = hmc_leapfrog(zl, p, gu, step, 0.5, False)
            else:
                zl, p = hmc_leapfrog(zl, p, gu, step, 1.0, True)
        log_u = self._log_uniform(z, t)
        s = self.settings
        res = hmc_accept(z, zl, p0, p, u0, u1, log_u, step, avg, self.target_accept, s.decay, s.inc,
                         s.dec, s.min_step, s.max_step, self.adapt)
        acc = res.accepted
        acc2 = acc.unsqueeze(-1)
        cache = tuple(None if old is None else torch.where(acc2 if old.dim() == 2 else acc, n, old)
                      for old, n in zip(cache, new))
        return res.z, cache, acc, res.step_size, res.accept_avg


@dataclass
class AISResult:
    """What :func:`ais` returns. ``log_weights`` [C] (float64): log Z is estimated by their
    log-mean-exp over chains (:meth:`log_normalizer`); ``z`` [C, D] the final states;
    ``acceptance_rate`` [C] the fraction of accepted transitions; ``step_size`` [C] the final
    (adapted) step sizes."""

    log_weights: Tensor
    z: Tensor
    acceptance_rate: Tensor
    step_size: Tensor
    acceptance_per_temperature: Tensor | None = None  # [T-1], with temperature_step_sizes

    def log_normalizer(self, num_groups: int = 1) -> Tensor:
        """log-mean-exp of the weights over chains; with ``num_groups`` = G the chains are read as
        [C / G, G] (chain c = s * G + g, as :func:`iwae_ext.evaluate.ais_log_likelihood` lays
        them out) and one estimate per group [G] is returned."""
        from ..ops import logmeanexp
        c = self.log_weights.shape[0]
        if num_groups < 1 or c % num_groups:
            raise ValueError(f"num_groups must divide the number of chains ({c}), got {num_groups}")
        return logmeanexp(self.log_weights.view(c // num_groups, num_groups), 0)


def ais(log_init: LogDensity | None, log_target: LogDensity | None, z0: Tensor, betas,
        num_leapfrog: int = 10, step_size=0.1, target_accept: float = 0.65, adapt_step_size: bool = True,
        grad_fn=None, generator: torch.Generator | None = None,
        adaptation: StepSizeAdaptation | None = None,
        temperature_step_sizes: Tensor | None = None, cuda_graph: bool | None = None,
        reverse: bool = False) -> AISResult:
    """Annealed importance sampling from log_init to log_target with HMC transitions.

    Args:
        log_init: z [C, D] -> [C], the normalised initial log-density (z0 must be drawn from it).
        log_target: z [C, D] -> [C], the unnormalised target log-density.
        z0: [C, D] initial states, one per chain (float32 or float64).
        betas: inverse temperatures, a 1-D sequence or tensor from 0 to 1, non-decreasing
            (:func:`linear_schedule`, :func:`sigmoid_schedule`), at least two.
        num_leapfrog: leapfrog steps per HMC transition.
        step_size: initial step size, a number or a [C] tensor.
        target_accept, adapt_step_size, adaptation: per-chain step-size adaptation toward the
            target acceptance (:class:`StepSizeAdaptation`).
        grad_fn: optional z -> (log_init(z), log_target(z), grad log_init(z), grad log_target(z))
            replacing autograd (e.g. :func:`iwae_ext.samplers.model_ais_densities`); then
            log_init and log_target may be None. If it also has a method ``grads_only(z) ->
            (grad log_init, grad log_target)``, that is used inside trajectories, where the
            density values are not needed.
        generator: for the momenta and the uniforms (on z0's device): a torch.Generator, or an
            :class:`iwae_ext.keyed.KeyedNoise` for B images whose chains are laid out
            c = s * B + b (every number then keyed by image, chain and temperature, so an
            image's result does not depend on the other chains in the run).
        temperature_step_sizes: optional [T-1] tensor, one step size per temperature shared by
            all chains (as AIWAE keeps them across training steps, paper 004); replaces step_size,
            no adaptation within the run, and the result has each temperature's mean acceptance.
        cuda_graph: capture one temperature in a CUDA graph and replay it (CUDA only); default:
            on for CUDA tensors with a ``grad_fn`` (autograd's gradient is not captured).
        reverse: draw from the reverse-AIS streams of a KeyedNoise (BDMC's upper bound runs the
            same images backwards and must not reuse the forward run's numbers).

    At each temperature t = 1..T-1 the weights get ``(beta_t - beta_{t-1}) (log_target - log_init)``
    at the current states, then one HMC transition leaves the intermediate density
    ``init^(1 - beta_t) target^beta_t`` invariant. Returns an :class:`AISResult`.
    """
    fn = "ais"
    _check_z0(z0, fn)
    _check_positive_int("num_leapfrog", num_leapfrog, fn)
    _check_target_accept(target_accept, fn)
    user_grad_fn = grad_fn is not None
    if grad_fn is None:
        if log_init is None or log_target is None:
            raise ValueError("ais: log_init and log_target are needed unless grad_fn is given")
        grad_fn = _autograd_value_and_grad([log_init, log_target])
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.dim() != 1 or betas.numel() < 2:
        raise ValueError(f"ais: betas must be a 1-D schedule of at least two values, got shape {tuple(betas.shape)}")
    if not (betas[0] == 0 and betas[-1] == 1 and bool((betas[1:] >= betas[:-1]).all())):
        raise ValueError("ais: betas must run from 0 to 1 and be non-decreasing")
    fixed = temperature_step_sizes
    if fixed is not None:
        if not isinstance(fixed, Tensor) or fixed.shape != (betas.numel() - 1,):
            raise ValueError(f"ais: temperature_step_sizes must be a tensor of shape [{betas.numel() - 1}] "
                             f"(one per transition), got {getattr(fixed, 'shape', type(fixed).__name__)}")
        fixed = _to_device(fixed.detach().to(dtype=z0.dtype), z0.device)
        adapt_step_size = False
        step_size = 1.0
    step = _per_chain(step_size, "step_size", z0, fn)
    streams = ((STREAMS["reverse_momentum"], STREAMS["reverse_uniform"]) if reverse
               else (STREAMS["ais_momentum"], STREAMS["ais_uniform"]))
    traj = _Trajectory(grad_fn, num_leapfrog, target_accept, adapt_step_size,
                       adaptation or StepSizeAdaptation(), generator, streams)
    if cuda_graph is None:
        cuda_graph = z0.is_cuda and user_grad_fn
    if cuda_graph and not z0.is_cuda:
        raise ValueError("ais: cuda_graph=True needs CUDA tensors")
    with torch.no_grad():
        z = z0.detach()
        betas_dev = _to_device(betas, z.device)
        betas_z = betas_dev.to(z.dtype)
        dbeta = betas_dev[1:] - betas_dev[:-1]
        avg = torch.full_like(step, float(target_accept))
        accepted = torch.zeros(z.shape[0], dtype=torch.int64, device=z.device)
        log_w = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
        per_temp = None if fixed is None else torch.empty(betas.numel() - 1, dtype=torch.float64,
                                                          device=z.device)
        cache = grad_fn(z)
        if cuda_graph:
            with torch.cuda.device(z.device):  # capture and replay on z's device, not the current one
                z, step = _ais_graphed(traj, z, cache, step, avg, log_w, accepted, per_temp, betas_z, dbeta,
                                       fixed)
        else:
            for t in range(1, betas.numel()):
                li, lt = cache[0], cache[1]
                log_w.add_((lt.double() - li.double()) * dbeta[t - 1])
                if fixed is not None:
                    step = fixed[t - 1].expand(z.shape[0])
                z, cache, acc, step, avg = traj.transition(z, cache, betas_z[t], step, avg, t)
                accepted.add_(acc)
                if per_temp is not None:
                    per_temp[t - 1] = acc.double().mean()
        rate = accepted.double() / (betas.numel() - 1)
    return AISResult(log_w, z, rate, step.contiguous(), per_temp)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device`` without blocking the host: to a GPU through pinned memory and
    an asynchronous copy (a plain ``.to`` of pageable memory waits for the copy)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _ais_graphed(traj, z, cache, step, avg, log_w, accepted, per_temp, betas_z, dbeta, fixed,
                 warmup: int = 3):
    """The temperature loop of :func:`ais` with one temperature captured in a CUDA graph and
    replayed: the state lives in static tensors updated in place, the temperature index is a
    device tensor the graph increments, so the host only launches replays (no synchronisation,
    one launch per temperature instead of dozens of kernels). The first ``warmup`` temperatures
    run eagerly on a side stream, as capture requires. Every stream, the capture and the
    replays are on z's device (the caller makes it the current device as well)."""
    n = dbeta.numel()
    c = z.shape[0]
    z_s, step_s, avg_s = z.clone(), step.contiguous().clone(), avg.clone()
    cache_s = tuple(t.clone() for t in cache)
    t_dev = torch.ones(1, dtype=torch.int64, device=z.device)

    def body():
        li, lt = cache_s[0], cache_s[1]
        log_w.add_((lt.double() - li.double()) * dbeta.index_select(0, t_dev - 1).squeeze(0))
        beta = betas_z.index_select(0, t_dev).squeeze(0)
        step_in = step_s if fixed is None else fixed.index_select(0, t_dev - 1).expand(c)
        z1, cache1, acc, step1, avg1 = traj.transition(z_s, cache_s, beta, step_in, avg_s, t_dev)
        z_s.copy_(z1)
        for dst, src in zip(cache_s, cache1):
            dst.copy_(src)
        step_s.copy_(step1)
        avg_s.copy_(avg1)
        accepted.add_(acc)
        if per_temp is not None:
            per_temp.index_copy_(0, t_dev - 1, acc.double().mean().view(1))
        t_dev.add_(1)

    side = torch.cuda.Stream(device=z.device)
    side.wait_stream(torch.cuda.current_stream(z.device))
    with torch.cuda.stream(side):
        for _ in range(min(warmup, n)):
            body()
    torch.cuda.current_stream(z.device).wait_stream(side)
    if n > warmup:
        graph = torch.cuda.CUDAGraph()
        try:
            if isinstance(traj.generator, torch.Generator):
                graph.register_generator_state(traj.generator)
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(device=z.device)):
                body()
        except (RuntimeError, AttributeError) as e:  # a grad_fn that cannot be captured
            warnings.warn(f"ais: the temperature loop could not be captured in a CUDA graph ({e}); "
                          f"running it eagerly (pass cuda_graph=False to skip the attempt)")
            graph = None
        for _ in range(n - warmup):
            if graph is None:
                body()
            else:
                graph.replay()
    return z_s, step_s


@dataclass
class HMCResult:
    """What :func:`hmc` returns: ``samples`` [S, C, D] (after warm-up, every ``thin``-th state),
    ``acceptance_rate`` [C] over the sampling phase, ``step_size`` [C] (fixed after warm-up)."""

    samples: Tensor
    acceptance_rate: Tensor
    step_size: Tensor


def hmc(log_target: LogDensity | None, z0: Tensor, num_samples: int, num_leapfrog: int = 10,
        step_size=0.1, num_warmup: int = 100, target_accept: float = 0.65, adapt_step_size: bool = True,
        thin: int = 1, grad_fn=None, generator: torch.Generator | None = None,
        adaptation: StepSizeAdaptation | None = None) -> HMCResult:
    """Hamiltonian Monte Carlo sampling of exp(log_target) with C independent chains.

    log_target: z [C, D] -> [C] (unnormalised); or ``grad_fn``: z -> (log_target(z), its gradient).
    The step sizes adapt toward ``target_accept`` during the ``num_warmup`` transitions only, then
    stay fixed, so the sampling phase is an exact (reversible, volume-preserving) HMC chain.
    ``generator``: a torch.Generator, or an :class:`iwae_ext.keyed.KeyedNoise` (transition i keyed
    by i, warm-up included), as in :func:`ais`.
    """
    fn = "hmc"
    _check_z0(z0, fn)
    _check_positive_int("num_samples", num_samples, fn)
    _check_positive_int("num_leapfrog", num_leapfrog, fn)
    _check_positive_int("thin", thin, fn)
    if not isinstance(num_warmup, int) or num_warmup < 0:
        raise ValueError(f"hmc: num_warmup must be an int >= 0, got {num_warmup!r}")
    _check_target_accept(target_accept, fn)
    if grad_fn is None:
        if log_target is None:
            raise ValueError("hmc: log_target is needed unless grad_fn is given")
        base = _autograd_value_and_grad([log_target])
    else:
        base = grad_fn

    def value_and_grad(z):
        lt, gt = base(z)
        return None, lt, None, gt

    step = _per_chain(step_size, "step_size", z0, fn)
    settings = adaptation or StepSizeAdaptation()
    warm = _Trajectory(value_and_grad, num_leapfrog, target_accept, adapt_step_size, settings, generator)
    sample = _Trajectory(value_and_grad, num_leapfrog, target_accept, False, settings, generator)
    with torch.no_grad():
        z = z0.detach()
        one = torch.ones((), dtype=z.dtype, device=z.device)
        avg = torch.full_like(step, float(target_accept))
        cache = value_and_grad(z)
        for i in range(num_warmup):
            z, cache, _, step, avg = warm.transition(z, cache, one, step, avg, i)
        out = torch.empty((num_samples, *z.shape), dtype=z.dtype, device=z.device)
        accepted = torch.zeros(z.shape[0], dtype=torch.int64, device=z.device)
        for i in range(num_samples * thin):
            z, cache, acc, step, avg = sample.transition(z, cache, one, step, avg, num_warmup + i)
            accepted.add_(acc)
            if (i + 1) % thin == 0:
                out[i // thin] = z
    return HMCResult(out, accepted.double() / (num_samples * thin), step)
