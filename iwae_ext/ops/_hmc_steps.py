"""Batched Hamiltonian Monte Carlo ops (docs/design.rst, "hmc_leapfrog and hmc_accept"): C independent chains of dimension D.

``hmc_leapfrog`` is one kick-drift of the leapfrog integrator with a per-chain step size and is
differentiable (a trajectory can be backpropagated through, as in Hamiltonian VAEs);
``hmc_accept`` is the Metropolis-Hastings test of the trajectories with per-chain step-size
adaptation. Randomness (momenta, uniforms) comes in as tensors, so both are deterministic.
"""
from typing import NamedTuple

import torch
from torch import Tensor


def hmc_leapfrog(z: Tensor, p: Tensor, grad_u: Tensor, step_size: Tensor, kick: float = 1.0,
                 drift: bool = True) -> tuple[Tensor, Tensor]:
    """One kick-drift: ``p' = p - kick * eps * grad_u``, then ``z' = z + eps * p'`` if drift.

    z, p and grad_u (the potential's gradient at z) are [C, D]; step_size eps is [C]. A whole
    trajectory of L steps is ``kick=0.5`` for the first, ``kick=1`` for the next L-1 and a closing
    ``kick=0.5, drift=False``, each with grad_u at the current z. Returns (z', p').
    """
    return torch.ops.iwae_ext.hmc_leapfrog.default(z, p, grad_u, step_size, float(kick), bool(drift))


class AcceptResult(NamedTuple):
    z: Tensor            # [C, D] the proposal where accepted, else the start
    u: Tensor            # [C] its potential energy
    accepted: Tensor     # [C] bool
    step_size: Tensor    # [C] adapted (unchanged when adapt=False)
    accept_avg: Tensor   # [C] running average of the acceptance probability


def hmc_accept(z0: Tensor, z1: Tensor, p0: Tensor, p1: Tensor, u0: Tensor, u1: Tensor,
               log_uniform: Tensor, step_size: Tensor, accept_avg: Tensor, target_accept: float = 0.65,
               decay: float = 0.9, inc: float = 1.02, dec: float = 0.98, min_step: float = 1e-4,
               max_step: float = 1.0, adapt: bool = True) -> AcceptResult:
    """Metropolis-Hastings for each chain with ``H = U + |p|^2/2`` (start z0, p0, U0; proposal z1, p1, U1).

    The proposal is taken where H1 is finite and ``log_uniform < H0 - H1``. The acceptance probability
    a = min(1, exp(H0 - H1)) (0 for a non-finite H1) updates ``accept_avg' = decay * accept_avg +
    (1 - decay) * a``; with ``adapt`` the step size is multiplied by ``inc`` where accept_avg' >
    target_accept and by ``dec`` elsewhere, then clamped to [min_step, max_step].
    """
    return AcceptResult(*torch.ops.iwae_ext.hmc_accept.default(
        z0, z1, p0, p1, u0, u1, log_uniform, step_size, accept_avg, float(target_accept), float(decay),
        float(inc), float(dec), float(min_step), float(max_step), bool(adapt)))


def _check_states(z, op, name="z"):
    torch._check(z.dim() == 2, lambda: f"{op}: {name} must have shape [chains, dim], got {list(z.shape)}")
    torch._check(z.dtype in (torch.float32, torch.float64),
                 lambda: f"{op}: {name} must be float32 or float64, got {z.dtype}")


def _check_like(t, ref, op, name, ref_name):
    torch._check(t.shape == ref.shape,
                 lambda: f"{op}: {name} must have the shape of {ref_name} ({list(ref.shape)}), got {list(t.shape)}")
    torch._check(t.dtype == ref.dtype, lambda: f"{op}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def _check_per_chain(t, ref, op, name, ref_name):
    torch._check(t.dim() == 1 and t.shape[0] == ref.shape[0],
                 lambda: f"{op}: {name} must have shape [chains] = [{ref.shape[0]}], got {list(t.shape)}")
    torch._check(t.dtype == ref.dtype, lambda: f"{op}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


@torch.library.register_fake("iwae_ext::hmc_leapfrog")
def _hmc_leapfrog_fake(z, p, grad_u, step_size, kick, drift):
    op = "hmc_leapfrog"
    _check_states(z, op)
    _check_like(p, z, op, "p", "z")
    _check_like(grad_u, z, op, "grad_u", "z")
    _check_per_chain(step_size, z, op, "step_size", "z")
    return torch.empty_like(z, memory_format=torch.contiguous_format), torch.empty_like(
        z, memory_format=torch.contiguous_format)


@torch.library.register_fake("iwae_ext::hmc_leapfrog_backward")
def _hmc_leapfrog_backward_fake(grad_z, grad_p, p_out, grad_u, step_size, kick, drift):
    op = "hmc_leapfrog_backward"
    _check_states(grad_z, op, "grad_z")
    for name, t in (("grad_p", grad_p), ("p_out", p_out), ("grad_u", grad_u)):
        _check_like(t, grad_z, op, name, "grad_z")
    _check_per_chain(step_size, grad_z, op, "step_size", "grad_z")
    new = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return new(grad_z), new(grad_z), new(grad_z), new(step_size)


@torch.library.register_fake("iwae_ext::hmc_accept")
def _hmc_accept_fake(z0, z1, p0, p1, u0, u1, log_uniform, step_size, accept_avg, target_accept, decay,
                     inc, dec, min_step, max_step, adapt):
    op = "hmc_accept"
    _check_states(z0, op, "z0")
    for name, t in (("z1", z1), ("p0", p0), ("p1", p1)):
        _check_like(t, z0, op, name, "z0")
    for name, t in (("u0", u0), ("u1", u1), ("log_uniform", log_uniform), ("step_size", step_size),
                    ("accept_avg", accept_avg)):
        _check_per_chain(t, z0, op, name, "z0")
    new = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return new(z0), new(u0), u0.new_empty(u0.shape, dtype=torch.bool), new(step_size), new(accept_avg)
