"""Pure-PyTorch twins of the compiled operators: the definitions the kernels are tested
against (in float64) and benchmarked against (eager and torch.compile)."""
import math

import torch
import torch.nn.functional as F
from torch import Tensor


def logmeanexp(logw: Tensor, dim: int = -1) -> Tensor:
    """log((1/K) sum_k exp(logw_k)) along dim; logw [..., K, ...] -> [..., ...]."""
    return torch.logsumexp(logw, dim) - math.log(logw.shape[dim])


def logmeanexp_stats(logw: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """(logmeanexp, stats): stats [2, ...] is the row max and the log of sum exp(logw - max)."""
    m = logw.amax(dim)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    ls = torch.log(torch.exp(logw - shift.unsqueeze(dim)).sum(dim))  # -inf for a row of -inf
    return logmeanexp(logw, dim), torch.stack([m, ls])


def logmeanexp_backward(grad_out: Tensor, logw: Tensor, out: Tensor, dim: int = -1,
                        stats: Tensor | None = None) -> Tensor:
    """grad_out * softmax(logw, dim); zero for rows whose out is -inf. Shape of logw. With
    ``stats`` (logmeanexp_stats's), softmax = exp((logw - max) - log sum)."""
    if stats is None:
        ref, off = out.unsqueeze(dim), math.log(logw.shape[dim])
    else:
        ref, off = stats[0].unsqueeze(dim), stats[1].unsqueeze(dim)
    p = torch.exp((logw - ref) - off)
    p = torch.where(torch.isneginf(ref), torch.zeros_like(p), p)
    return grad_out.unsqueeze(dim) * p


def bayes_linear(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Tensor,
                 bias_rho: Tensor, eps: Tensor) -> Tensor:
    """Local reparameterization: x [..., in], weights [out, in], biases [out], eps [..., out]."""
    mean = F.linear(x, weight_mu, bias_mu)
    var = F.linear(x * x, F.softplus(weight_rho).square(), F.softplus(bias_rho).square())
    return mean + var.sqrt() * eps


def bernoulli_log_prob(h: Tensor, weight: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    """sum_d x l - softplus(l), l = h W^T + bias: h [..., B, H], weight [D, H], bias [D], x [B, D]
    -> [..., B] (the logits formed in full, as a decoder does in plain PyTorch)."""
    logits = F.linear(h, weight, bias)
    return (x * logits).sum(-1) - F.softplus(logits).sum(-1)


def bernoulli_log_prob_grad_h(h: Tensor, weight: Tensor, bias: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(bernoulli_log_prob, its gradient in h = (x - sigmoid(l)) W)."""
    logits = F.linear(h, weight, bias)
    value = (x * logits).sum(-1) - F.softplus(logits).sum(-1)
    return value, (x - torch.sigmoid(logits)) @ weight


def bayes_linear_per_row_weights(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Tensor,
                                 bias_rho: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The exact (naive) Bayesian layer: one weight matrix and bias drawn per row of x.

    x [..., in] -> [..., out]; materialises [rows, out, in] weights (memory grows with rows)."""
    rows = x.reshape(-1, x.shape[-1])
    m = rows.shape[0]
    w = weight_mu + F.softplus(weight_rho) * torch.randn(
        m, *weight_mu.shape, dtype=x.dtype, device=x.device, generator=generator)
    b = bias_mu + F.softplus(bias_rho) * torch.randn(
        m, *bias_mu.shape, dtype=x.dtype, device=x.device, generator=generator)
    y = torch.bmm(w, rows.unsqueeze(-1)).squeeze(-1) + b
    return y.reshape(*x.shape[:-1], weight_mu.shape[0])


def hmc_leapfrog(z: Tensor, p: Tensor, grad_u: Tensor, step_size: Tensor, kick: float = 1.0,
                 drift: bool = True) -> tuple[Tensor, Tensor]:
    """p' = p - kick * eps * grad_u; z' = z + eps * p' (if drift); z, p, grad_u [C, D], eps [C]."""
    e = step_size.unsqueeze(-1)
    p_out = p - kick * e * grad_u
    return (z + e * p_out if drift else z.clone()), p_out


def hmc_accept(z0: Tensor, z1: Tensor, p0: Tensor, p1: Tensor, u0: Tensor, u1: Tensor,
               log_uniform: Tensor, step_size: Tensor, accept_avg: Tensor, target_accept: float = 0.65,
               decay: float = 0.9, inc: float = 1.02, dec: float = 0.98, min_step: float = 1e-4,
               max_step: float = 1.0, adapt: bool = True):
    """Metropolis-Hastings with ``H = U + |p|^2/2`` and step-size adaptation; see iwae_ext.ops.hmc_accept.

    Returns (z, u, accepted, step_size, accept_avg); sums and decisions in float64."""
    d = lambda t: t.double()  # noqa: E731
    h0 = d(u0) + 0.5 * d(p0).square().sum(-1)
    h1 = d(u1) + 0.5 * d(p1).square().sum(-1)
    diff = h0 - h1
    finite = torch.isfinite(h1) & ~torch.isnan(diff)
    a = torch.where(finite, torch.exp(diff.clamp(max=0.0)), torch.zeros_like(diff))
    accepted = finite & (d(log_uniform) < diff)
    avg = decay * d(accept_avg) + (1 - decay) * a
    step = d(step_size)
    if adapt:
        step = torch.where(avg > target_accept, step * inc, step * dec).clamp(min_step, max_step)
    z = torch.where(accepted.unsqueeze(-1), z1, z0)
    u = torch.where(accepted, u1, u0)
    return z, u, accepted, step.to(step_size.dtype), avg.to(accept_avg.dtype)


_MASK32 = 0xFFFFFFFF


def philox4x32_10(counter: Tensor, key: tuple[int, int]) -> Tensor:
    """Philox4x32-10 of counters [..., 4] (int64 holding uint32 words) under key (k0, k1):
    [..., 4]. int64 products of two 32-bit words wrap modulo 2^64, which keeps both halves."""
    c = [counter[..., i] for i in range(4)]
    k0, k1 = key
    for _ in range(10):
        p0 = c[0] * 0xD2511F53
        p1 = c[2] * 0xCD9E8D57
        hi0, lo0 = (p0 >> 32) & _MASK32, p0 & _MASK32
        hi1, lo1 = (p1 >> 32) & _MASK32, p1 & _MASK32
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return torch.stack(c, -1)


def keyed_random(index: Tensor, step: int, seed: int, stream: int, rows: int, row_start: int,
                 dim: int, normal: bool, dtype: torch.dtype) -> Tensor:
    """Element (r, b, d) of [rows, B, dim] from Philox4x32-10 with key (seed low, seed high) and
    counter (index[b], row_start + r, step, stream << 24 | d // g) (csrc/random.h). float64:
    g = 2, two 53-bit uniforms u = (m + 1/2) 2^-53 per block, used as they are or as one
    Box-Muller pair in double; float32: g = 4, four 23-bit uniforms u = (m + 1/2) 2^-23 per
    block, or two Box-Muller pairs in float."""
    b = index.shape[0]
    wide = dtype == torch.float64
    group = 2 if wide else 4
    blocks = (dim + group - 1) // group
    r = torch.arange(row_start, row_start + rows, dtype=torch.int64, device=index.device)
    j = torch.arange(blocks, dtype=torch.int64, device=index.device)
    shape = (rows, b, blocks)
    counter = torch.stack([index.view(1, b, 1).expand(shape) & _MASK32, r.view(rows, 1, 1).expand(shape),
                           torch.full(shape, step & _MASK32, dtype=torch.int64, device=index.device),
                           ((stream << 24) | j).view(1, 1, blocks).expand(shape)], -1)
    w = philox4x32_10(counter, (seed & _MASK32, (seed >> 32) & _MASK32))
    if wide:  # the top 53 bits of hi:lo, exactly representable in float64
        u = [((((w[..., 2 * i] << 21) | (w[..., 2 * i + 1] >> 11))).double() + 0.5) * 2.0 ** -53 for i in range(2)]
    else:  # the top 23 bits of each word: m + 1/2 exactly representable in float32
        u = [((w[..., i] >> 9).float() + 0.5) * 2.0 ** -23 for i in range(4)]
    if normal:
        two_pi = torch.tensor(2 * math.pi, dtype=u[0].dtype)
        out = []
        for i in range(0, len(u), 2):
            radius = torch.sqrt(-2.0 * torch.log(u[i]))
            out += [radius * torch.cos(two_pi * u[i + 1]), radius * torch.sin(two_pi * u[i + 1])]
        u = out
    return torch.stack(u, -1).reshape(rows, b, group * blocks)[..., :dim].to(dtype)


def activation(a: Tensor, bias: Tensor | None = None, kind: str = "tanh") -> Tensor:
    """act(a + bias), act in tanh, sigmoid, relu (torch's own functions)."""
    v = a if bias is None else a + bias
    return {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu}[kind](v)


def activation_backward(grad: Tensor, out: Tensor, kind: str = "tanh") -> Tensor:
    """grad * act'(a) from out = act(a): PyTorch's formulas."""
    if kind == "tanh":
        return grad * (1 - out * out)
    if kind == "sigmoid":
        return grad * out * (1 - out)
    return grad * (out > 0)
