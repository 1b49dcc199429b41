"""Batched HMC and annealed importance sampling over C independent chains (docs/design.rst, "hmc_leapfrog and hmc_accept").

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

from .._checks import check_choice
from .._precision import GRADIENT_PRECISIONS, gradient_dtype
from ..keyed import PILOT_ROW, STREAMS, KeyedNoise, check_generator
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
    """beta_t = t / (T - 1), t = 0..T-1 (Ding and Freedman's schedule)."""
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


def _autograd_value_and_grad(fns: Sequence[LogDensity], gradient_dtype: torch.dtype | None = None):
    """z -> (f(z) for f in fns) + (grad_z f(z) for f in fns), by autograd, values detached.

    ``gradient_dtype`` (e.g. torch.bfloat16): the function also gets ``grads_only(z)`` -> the
    gradients alone, by autograd of the densities computed under ``torch.autocast`` in that
    dtype (matrix products in it, float32 accumulation): the trajectories' interior gradients.
    The values and the gradients that come with them stay in z's dtype."""

    def value_and_grad(z: Tensor):
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            values = [f(zz) for f in fns]
            _check_values(values, z)
            grads = _grads(values, zz)
        return tuple(v.detach() for v in values) + tuple(grads)

    if gradient_dtype is not None:
        def grads_only(z: Tensor):
            with torch.enable_grad(), torch.autocast(z.device.type, dtype=gradient_dtype):
                zz = z.detach().requires_grad_(True)
                values = [f(zz) for f in fns]
                _check_values(values, z)
                grads = _grads(values, zz)
            return tuple(g.to(z.dtype) for g in grads)

        value_and_grad.grads_only = grads_only
    return value_and_grad


def _check_values(values, z):
    for v in values:
        if not isinstance(v, Tensor) or v.shape != (z.shape[0],):
            raise ValueError(f"a log-density must map z [{z.shape[0]}, {z.shape[1]}] to "
                             f"[{z.shape[0]}], got {getattr(v, 'shape', type(v).__name__)}")


def _grads(values, zz):
    grads = []
    for i, v in enumerate(values):
        g = (torch.autograd.grad(v.sum(), zz, retain_graph=i + 1 < len(values), allow_unused=True)[0]
             if v.requires_grad else None)
        grads.append(torch.zeros_like(zz) if g is None else g)  # a density constant in z
    return grads


def _interior_dtype(precision, grad_fn, z0, fn):
    """The autograd path's interior gradient dtype; a caller's grad_fn sets its own precision."""
    check_choice("gradient_precision", precision, GRADIENT_PRECISIONS, fn)
    if grad_fn is not None:
        if precision == "bf16":
            raise ValueError(f"{fn}: gradient_precision applies to autograd's gradients; a grad_fn "
                             f"computes its own (e.g. model_ais_densities(..., gradient_precision='bf16'))")
        return None
    return gradient_dtype(precision, z0.dtype, z0.device, False, fn, autocast=True)


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
        self.pilot = None  # a _Pilot: the reported chains take its step sizes

    @staticmethod
    def potential(cache, beta):
        li, lt, gi, gt = cache
        if li is None:
            return -lt, -gt
        # -(li + beta (lt - li)): lerp keeps it one kernel per tensor, beta a 0-d tensor
        return -torch.lerp(li, lt, beta), -torch.lerp(gi, gt, beta)

    def _keyed(self, draw, rows):
        """A KeyedNoise's numbers for every row: the reported chains from rows 0.., the pilot's
        from rows PILOT_ROW.. (so they do not change with the number of reported chains)."""
        if self.pilot is None:
            return draw(rows, 0)
        n = self.pilot.reported
        return torch.cat([draw(n, 0), draw(rows - n, PILOT_ROW)])

    def _momentum(self, z, t):
        g = self.generator
        if isinstance(g, KeyedNoise):
            return self._keyed(lambda n, r0: g.chain_normal(n, z.shape[1], self.streams[0], t, z.dtype, r0),
                               z.shape[0])
        return torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=g)

    def _log_uniform(self, z, t):
        g = self.generator
        if isinstance(g, KeyedNoise):
            return self._keyed(lambda n, r0: g.chain_uniform(n, self.streams[1], t, z.dtype, r0),
                               z.shape[0]).log_()
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
        step = res.step_size if self.pilot is None else self.pilot.share(res.step_size)
        return res.z, cache, acc, step, res.accept_avg


@dataclass
class AISResult:
    """What :func:`ais` returns, for the reported chains (a pilot's are not among them).
    ``log_weights`` [C] (float64): log Z is estimated by their log-mean-exp over chains
    (:meth:`log_normalizer`); ``z`` [C, D] the final states; ``acceptance_rate`` [C] the fraction
    of accepted transitions; ``step_size`` [C] the step sizes of the last transition."""

    log_weights: Tensor
    z: Tensor
    acceptance_rate: Tensor
    step_size: Tensor
    acceptance_per_temperature: Tensor | None = None  # [T-1], with temperature_step_sizes
    step_schedule: Tensor | None = None  # [T-1, G] with record_step_sizes: the steps group g used
    pilot_acceptance_rate: Tensor | None = None  # [P * G] with pilot_chains

    def log_normalizer(self, num_groups: int = 1) -> Tensor:
        """log-mean-exp of the weights over chains; with ``num_groups`` = G the chains are read as
        [C / G, G] (chain c = s * G + g, as :func:`iwae_ext.evaluate.ais_log_likelihood` lays
        them out) and one estimate per group [G] is returned."""
        from ..ops import logmeanexp
        c = self.log_weights.shape[0]
        if num_groups < 1 or c % num_groups:
            raise ValueError(f"num_groups must divide the number of chains ({c}), got {num_groups}")
        return logmeanexp(self.log_weights.view(c // num_groups, num_groups), 0)


def mirrored_schedule(step_schedule: Tensor) -> Tensor:
    """The step sizes [T-1, ...] of a forward AIS run, rearranged for the reverse run over the
    same symmetric schedule (``betas[T-1-t] = 1 - betas[t]``, as :func:`linear_schedule` and
    :func:`sigmoid_schedule` are): reverse transition t targets the density of forward transition
    T-1-t and takes its step size; the last reverse transition (at q itself, where the forward
    run has none) takes the first forward one's. BDMC's upper bound runs with it, so both
    directions use the same kernels (Grosse et al. 2015)."""
    if not isinstance(step_schedule, Tensor) or step_schedule.dim() < 1 or step_schedule.shape[0] < 1:
        raise ValueError("mirrored_schedule: step_schedule must be a tensor [T-1, ...]")
    return torch.cat([step_schedule[:-1].flip(0), step_schedule[:1]])


class _Pilot:
    """The pilot of :func:`ais`: the last P * G rows of the state adapt their step sizes on their
    own history; every reported chain of group g takes, at each temperature, the mean step size
    of group g's pilot chains. The reported chains' kernels then depend on the pilot's random
    numbers only, never on their own states, so their weights stay unbiased."""

    def __init__(self, reported: int, pilot: int, groups: int):
        self.reported, self.pilot, self.groups = reported, pilot, groups

    def share(self, step: Tensor) -> Tensor:
        g = self.groups
        mean = step[self.reported:].view(self.pilot, g).mean(0)
        return torch.cat([mean.repeat(self.reported // g), step[self.reported:]])


def ais(log_init: LogDensity | None, log_target: LogDensity | None, z0: Tensor, betas,
        num_leapfrog: int = 10, step_size=0.1, target_accept: float = 0.65, adapt_step_size: bool = False,
        grad_fn=None, generator: torch.Generator | None = None,
        adaptation: StepSizeAdaptation | None = None,
        temperature_step_sizes: Tensor | None = None, cuda_graph: bool | None = None,
        reverse: bool = False, pilot_chains: int = 0, num_groups: int | None = None,
        record_step_sizes: bool = False, gradient_precision: str = "auto") -> AISResult:
    """Annealed importance sampling from log_init to log_target with HMC transitions.

    Args:
        log_init: z [C, D] -> [C], the normalised initial log-density (z0 must be drawn from it).
        log_target: z [C, D] -> [C], the unnormalised target log-density.
        z0: [C, D] initial states, one per chain (float32 or float64), independent draws from
            the initial density; with ``pilot_chains`` = P its last P * G rows are the pilot's.
        betas: inverse temperatures, a 1-D sequence or tensor from 0 to 1, non-decreasing
            (:func:`linear_schedule`, :func:`sigmoid_schedule`), at least two.
        num_leapfrog: leapfrog steps per HMC transition.
        step_size: the step size (initial step size of an adapting chain), a number or a tensor
            with one per row of z0.
        pilot_chains: P > 0 runs P pilot chains per group beside the reported ones (the last
            P * G rows of z0, laid out like the others: row c = s * G + g is group g's; a
            KeyedNoise keys them as chains ``PILOT_ROW`` + p, apart from any reported chain). The
            pilot chains adapt their step sizes toward ``target_accept`` on their own history
            (``adaptation``); every reported chain of group g takes, at each temperature, the
            mean step size of group g's pilot chains at that temperature. The reported chains'
            transitions then never depend on their own states, and their weights estimate Z
            without bias. The pilot's weights are not reported. The evaluation
            (:func:`iwae_ext.evaluate.ais_log_likelihood`) runs this way.
        num_groups: G, the groups whose chains share a pilot (e.g. data points, chains laid out
            c = s * G + g); default the KeyedNoise's image count, else 1.
        target_accept, adaptation: the acceptance the pilot's step sizes adapt toward, and how
            (:class:`StepSizeAdaptation`, Wu et al.'s values by default).
        adapt_step_size: True adapts every chain's step size on that chain's own history (Wu et
            al. 2017's kernel). **This biases the estimate**: the transitions then depend on the
            chain's past states, the sequence of kernels is no longer fixed in advance, and the
            weights no longer estimate Z without bias; on a 2-D-latent model whose log p(x) a
            dense grid gives, log-estimates sat above the exact value by 0.03 nats per image on
            average (a "lower bound" that is not one). Use ``pilot_chains`` for adapted step
            sizes; this option is kept for reproducing that kernel.
        grad_fn: optional z -> (log_init(z), log_target(z), grad log_init(z), grad log_target(z))
            replacing autograd (e.g. :func:`iwae_ext.samplers.model_ais_densities`); then
            log_init and log_target may be None. If it also has a method ``grads_only(z) ->
            (grad log_init, grad log_target)``, that is used inside trajectories, where the
            density values are not needed. It is called on all rows of z0, the pilot's included.
        generator: for the momenta and the uniforms (on z0's device): a torch.Generator, or an
            :class:`iwae_ext.keyed.KeyedNoise` for B images whose chains are laid out
            c = s * B + b (every number then keyed by image, chain and temperature, so an
            image's result does not depend on the other chains in the run).
        temperature_step_sizes: optional fixed step sizes, [T-1] (one per transition, shared by
            all chains, as AIWAE keeps them across training steps, Ding and Freedman) or [T-1, G] (one
            per transition and group, e.g. a forward run's ``step_schedule`` mirrored for a
            reverse run); replaces step_size; the result has each temperature's mean acceptance.
        cuda_graph: capture one temperature in a CUDA graph and replay it (CUDA only); default:
            on for CUDA tensors with a ``grad_fn`` (autograd's gradient is not captured).
        reverse: draw from the reverse-AIS streams of a KeyedNoise (BDMC's upper bound runs the
            same images backwards and must not reuse the forward run's numbers).
        record_step_sizes: return ``step_schedule`` [T-1, G], the step size group g's reported
            chains used at each transition (for :func:`mirrored_schedule`; needs equal step
            sizes within a group: a pilot, a fixed schedule or a scalar step_size).
        gradient_precision: "full" (autograd in z0's dtype), "bf16" (the gradients at a
            trajectory's L - 1 interior positions by autograd under ``torch.autocast`` in
            bfloat16; the energies, the weights and the gradients at the trajectory's ends stay
            in z0's dtype: the same exact estimator, see docs/sampling.rst) or "auto" ("full"
            here: it is measured faster only for the package's own models, whose
            :func:`model_ais_densities` takes the option). For autograd's gradients only; a
            ``grad_fn`` computes its own.

    At each temperature t = 1..T-1 the weights get ``(beta_t - beta_{t-1}) (log_target - log_init)``
    at the current states, then one HMC transition leaves the intermediate density
    ``init^(1 - beta_t) target^beta_t`` invariant. Returns an :class:`AISResult`.
    """
    fn = "ais"
    _check_z0(z0, fn)
    _check_positive_int("num_leapfrog", num_leapfrog, fn)
    _check_target_accept(target_accept, fn)
    user_grad_fn = grad_fn is not None
    interior = _interior_dtype(gradient_precision, grad_fn, z0, fn)
    if grad_fn is None:
        if log_init is None or log_target is None:
            raise ValueError("ais: log_init and log_target are needed unless grad_fn is given")
        grad_fn = _autograd_value_and_grad([log_init, log_target], interior)
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.dim() != 1 or betas.numel() < 2:
        raise ValueError(f"ais: betas must be a 1-D schedule of at least two values, got shape {tuple(betas.shape)}")
    if not (betas[0] == 0 and betas[-1] == 1 and bool((betas[1:] >= betas[:-1]).all())):
        raise ValueError("ais: betas must run from 0 to 1 and be non-decreasing")
    groups = _num_groups(num_groups, generator)
    rows = z0.shape[0]
    if not isinstance(pilot_chains, int) or isinstance(pilot_chains, bool) or pilot_chains < 0:
        raise ValueError(f"ais: pilot_chains must be an int >= 0, got {pilot_chains!r}")
    if rows % groups or rows <= pilot_chains * groups:
        raise ValueError(f"ais: z0 must have a multiple of num_groups ({groups}) rows, more than the "
                         f"pilot's pilot_chains * num_groups = {pilot_chains * groups}; got {rows}")
    reported = rows - pilot_chains * groups
    pilot = _Pilot(reported, pilot_chains, groups) if pilot_chains else None
    if pilot is not None and adapt_step_size:
        raise ValueError("ais: adapt_step_size=True (every chain on its own history) and pilot_chains "
                         "(the reported chains on the pilot's) exclude each other")
    fixed = temperature_step_sizes
    if fixed is not None:
        if pilot is not None:
            raise ValueError("ais: temperature_step_sizes fixes the step sizes; pilot_chains adapts them")
        n = betas.numel() - 1
        if not isinstance(fixed, Tensor) or fixed.shape not in ((n,), (n, groups)):
            raise ValueError(f"ais: temperature_step_sizes must be a tensor of shape [{n}] (one per "
                             f"transition) or [{n}, {groups}] (and per group), got "
                             f"{getattr(fixed, 'shape', type(fixed).__name__)}")
        fixed = _to_device(fixed.detach().to(dtype=z0.dtype), z0.device)
        if fixed.dim() == 2:  # [T-1, G] -> per row, c = s * G + g
            fixed = fixed.repeat(1, rows // groups)
        adapt_step_size = False
        step_size = 1.0
    if record_step_sizes and adapt_step_size:
        raise ValueError("ais: record_step_sizes needs one step size per group (a pilot or a fixed "
                         "schedule), not per-chain adaptation")
    step = _per_chain(step_size, "step_size", z0, fn)
    streams = ((STREAMS["reverse_momentum"], STREAMS["reverse_uniform"]) if reverse
               else (STREAMS["ais_momentum"], STREAMS["ais_uniform"]))
    traj = _Trajectory(grad_fn, num_leapfrog, target_accept, adapt_step_size or pilot is not None,
                       adaptation or StepSizeAdaptation(), generator, streams)
    traj.pilot = pilot
    if cuda_graph is None:
        cuda_graph = z0.is_cuda and user_grad_fn
    if cuda_graph and not z0.is_cuda:
        raise ValueError("ais: cuda_graph=True needs CUDA tensors")
    with torch.no_grad():
        z = z0.detach()
        betas_dev = _to_device(betas, z.device)
        betas_z = betas_dev.to(z.dtype)
        dbeta = betas_dev[1:] - betas_dev[:-1]
        if pilot is not None:
            step = pilot.share(step)
        avg = torch.full_like(step, float(target_accept))
        accepted = torch.zeros(z.shape[0], dtype=torch.int64, device=z.device)
        log_w = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
        per_temp = None if fixed is None else torch.empty(betas.numel() - 1, dtype=torch.float64,
                                                          device=z.device)
        record = (torch.empty(betas.numel() - 1, groups, dtype=z.dtype, device=z.device)
                  if record_step_sizes else None)
        cache = grad_fn(z)
        if cuda_graph:
            with torch.cuda.device(z.device):  # capture and replay on z's device, not the current one
                z, step = _ais_graphed(traj, z, cache, step, avg, log_w, accepted, per_temp, betas_z, dbeta,
                                       fixed, record, reported)
        else:
            for t in range(1, betas.numel()):
                li, lt = cache[0], cache[1]
                log_w.add_((lt.double() - li.double()) * dbeta[t - 1])
                if fixed is not None:
                    step = fixed[t - 1] if fixed.dim() == 2 else fixed[t - 1].expand(z.shape[0])
                if record is not None:
                    record[t - 1] = step[:groups]
                z, cache, acc, step, avg = traj.transition(z, cache, betas_z[t], step, avg, t)
                accepted.add_(acc)
                if per_temp is not None:
                    per_temp[t - 1] = acc[:reported].double().mean()
        rate = accepted.double() / (betas.numel() - 1)
    return AISResult(log_w[:reported], z[:reported], rate[:reported], step[:reported].contiguous(), per_temp,
                     record, None if pilot is None else rate[reported:])


def _num_groups(num_groups, generator) -> int:
    if num_groups is None:
        return generator.batch if isinstance(generator, KeyedNoise) else 1
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"ais: num_groups must be a positive int, got {num_groups!r}")
    return num_groups


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device`` without blocking the host: to a GPU through pinned memory and
    an asynchronous copy (a plain ``.to`` of pageable memory waits for the copy)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _ais_graphed(traj, z, cache, step, avg, log_w, accepted, per_temp, betas_z, dbeta, fixed, record,
                 reported, warmup: int = 3):
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
        if fixed is None:
            step_in = step_s
        elif fixed.dim() == 2:
            step_in = fixed.index_select(0, t_dev - 1).squeeze(0)
        else:
            step_in = fixed.index_select(0, t_dev - 1).expand(c)
        if record is not None:
            record.index_copy_(0, t_dev - 1, step_in[:record.shape[1]].unsqueeze(0))
        z1, cache1, acc, step1, avg1 = traj.transition(z_s, cache_s, beta, step_in, avg_s, t_dev)
        z_s.copy_(z1)
        for dst, src in zip(cache_s, cache1):
            dst.copy_(src)
        step_s.copy_(step1)
        avg_s.copy_(avg1)
        accepted.add_(acc)
        if per_temp is not None:
            per_temp.index_copy_(0, t_dev - 1, acc[:reported].double().mean().view(1))
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
        adaptation: StepSizeAdaptation | None = None, gradient_precision: str = "auto") -> HMCResult:
    """Hamiltonian Monte Carlo sampling of exp(log_target) with C independent chains.

    log_target: z [C, D] -> [C] (unnormalised); or ``grad_fn``: z -> (log_target(z), its gradient).
    The step sizes adapt toward ``target_accept`` during the ``num_warmup`` transitions only, then
    stay fixed, so the sampling phase is an exact (reversible, volume-preserving) HMC chain.
    ``generator``: a torch.Generator, or an :class:`iwae_ext.keyed.KeyedNoise` (transition i keyed
    by i, warm-up included), as in :func:`ais`. ``gradient_precision``: as in :func:`ais`
    ("bf16": the interior gradients of each trajectory under bfloat16 autocast, still an exact
    HMC kernel for exp(log_target)). A ``grad_fn`` with a method ``grads_only(z) -> gradient``
    has it used inside trajectories.
    """
    fn = "hmc"
    _check_z0(z0, fn)
    _check_positive_int("num_samples", num_samples, fn)
    _check_positive_int("num_leapfrog", num_leapfrog, fn)
    _check_positive_int("thin", thin, fn)
    if not isinstance(num_warmup, int) or num_warmup < 0:
        raise ValueError(f"hmc: num_warmup must be an int >= 0, got {num_warmup!r}")
    _check_target_accept(target_accept, fn)
    interior = _interior_dtype(gradient_precision, grad_fn, z0, fn)
    if grad_fn is None:
        if log_target is None:
            raise ValueError("hmc: log_target is needed unless grad_fn is given")
        base = _autograd_value_and_grad([log_target], interior)
        base_grads_only = getattr(base, "grads_only", None)
        inner = None if base_grads_only is None else (lambda z: base_grads_only(z)[0])
    else:
        base = grad_fn
        inner = getattr(grad_fn, "grads_only", None)

    def value_and_grad(z):
        lt, gt = base(z)
        return None, lt, None, gt

    if inner is not None:
        value_and_grad.grads_only = lambda z: (None, inner(z))

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
