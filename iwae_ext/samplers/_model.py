"""AIS for a latent-variable model: the initial density, the target log p(x, z) and their
gradients for B data points with S chains each (chain c = s * B + b). The package's models get
analytic and hand-written gradients; any other model with posterior(x) and log_joint(x, z)
(:class:`iwae_ext.LatentVariableModel`) gets autograd's."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import protocol as _protocol
from ..keyed import PILOT_ROW, STREAMS, KeyedNoise, check_generator, keyed_draws, standard_normal
from .._checks import check_choice
from .._precision import GRADIENT_PRECISIONS, gradient_dtype
from ..models.vae import VAE, DiagonalNormal, normal_log_prob, standard_normal_log_prob

INITS = ("posterior", "prior")


@dataclass
class ModelAIS:
    """Everything :func:`iwae_ext.samplers.ais` needs for one batch: ``z0`` [S*B, Z] drawn from the
    initial density, ``grad_fn`` (z -> log_init, log_target, their gradients) and the data rows
    ``x`` [S*B, D] the chains target. ``fast`` says whether the target's gradient is the
    hand-written one (:meth:`iwae_ext.models.VAE.log_joint_and_grad`) or autograd's;
    ``gradient_dtype`` the dtype of the trajectories' interior gradients (None: the model's)."""

    z0: Tensor
    grad_fn: object
    x: Tensor
    fast: bool
    gradient_dtype: torch.dtype | None = None  # the interior gradients' dtype; None: the model's


def model_ais_densities(model, x: Tensor, num_chains: int, init: str = "posterior",
                        fast_grad: bool = True, generator: torch.Generator | None = None,
                        pilot_chains: int = 0, gradient_precision: str = "auto") -> ModelAIS:
    """AIS densities for ``model`` and data x [B, D]: ``num_chains`` chains per data point, then
    ``pilot_chains`` more (rows (num_chains + p) * B + b, for :func:`iwae_ext.samplers.ais`'s
    ``pilot_chains``). With a :class:`iwae_ext.keyed.KeyedNoise` the pilot's starting states come
    from rows of their own (``PILOT_ROW`` + p), so they do not change with num_chains.

    init="posterior": start from q(z|x) (its density is the normalised initial density);
    init="prior": from p(z) (N(0, I) for the package's one-layer models; ``model.prior()`` for
    others). The target is log p(x, z). A model that is not the package's
    :class:`iwae_ext.models.VAE` needs posterior(x) and log_joint(x, z) (and prior() to start
    there); its gradients are autograd's. With
    ``fast_grad`` and a model that allows it, the target's gradient is the hand-written decoder
    backward and q's is analytic; otherwise autograd. Random-weight models are refused: their
    log p(x) also integrates over the weights, which AIS over z alone does not do.

    ``gradient_precision``: the precision of the target's gradient at the interior positions of
    each HMC trajectory (``grad_fn.grads_only``), the densities' values and the gradients that
    come with them staying in the model's dtype (docs/sampling.rst, "Gradient precision"):
    "bf16" (the hand-written decoder backward with bfloat16 weights and products, or autograd
    under bfloat16 autocast), "full" (the model's dtype) or "auto" (bf16 for the package's
    float32 models on the hand-written path where the device multiplies bfloat16 faster
    than float32: a CPU with AVX512-BF16 or AMX, a CUDA GPU of compute capability 8.0 or more; "full" otherwise). ``ModelAIS.gradient_dtype`` says which.
    """
    check_choice("init", init, INITS, "model_ais_densities")
    if getattr(model, "random_weights", "none") != "none":
        raise ValueError("AIS over z needs deterministic weights; a random-weight model (IWAER) "
                         "is evaluated by importance sampling over weights and z (bounds, L_S)")
    if not isinstance(num_chains, int) or num_chains < 1:
        raise ValueError(f"num_chains must be a positive int, got {num_chains!r}")
    if not isinstance(pilot_chains, int) or isinstance(pilot_chains, bool) or pilot_chains < 0:
        raise ValueError(f"pilot_chains must be an int >= 0, got {pilot_chains!r}")
    check_choice("gradient_precision", gradient_precision, GRADIENT_PRECISIONS, "model_ais_densities")
    if not isinstance(model, VAE):
        return _protocol_densities(model, x, num_chains, init, generator, pilot_chains, gradient_precision)
    if init == "prior" and len(model.latent_dims) != 1:
        raise ValueError("init='prior' needs one stochastic layer (the prior of two layers is not a "
                         "standard normal over z = (z1, z2)); use init='posterior'")
    p = next(model.parameters())
    x = model._check_x(x).to(device=p.device, dtype=p.dtype)
    rows = num_chains + pilot_chains
    xr = x.repeat(rows, 1)
    zdim = model.latent_dim
    _check_generator(generator, x.shape[0])
    loc = logvar = q = None
    with torch.no_grad():
        if init == "posterior":
            q = model.posterior(x)
            if isinstance(q, DiagonalNormal):
                loc, logvar = q.loc.repeat(rows, 1), q.logvar.repeat(rows, 1)

        def draw(n):  # [n * B, Z] starting states
            if init == "prior":
                return _normal((n, x.shape[0], zdim), p.dtype, p.device, generator).reshape(-1, zdim)
            if isinstance(q, DiagonalNormal):
                eps = _normal((n, *q.loc.shape), p.dtype, p.device, generator).reshape(-1, zdim)
                return q.loc.repeat(n, 1) + torch.exp(0.5 * q.logvar.repeat(n, 1)) * eps
            return _hierarchical_sample(q, n, generator).reshape(-1, zdim)  # z = (z1, z2)

        z0 = _draw_rows(draw, num_chains, pilot_chains, generator)
    fast = bool(fast_grad and getattr(model, "has_fast_log_joint_grad", False) and
                (init == "prior" or loc is not None))

    interior = gradient_dtype(gradient_precision, p.dtype, p.device, fast, "model_ais_densities",
                              autocast=not fast)
    if fast:
        grad_fn = _FastDensities(model, x, loc, logvar, interior)
    else:
        def log_init(z: Tensor) -> Tensor:
            if init == "prior":
                return standard_normal_log_prob(z)
            if loc is not None:
                return normal_log_prob(z, loc, logvar)
            zs = z.view(rows, x.shape[0], zdim)
            return q.log_prob(zs).reshape(-1)

        def log_target(z: Tensor) -> Tensor:
            return model.log_joint(xr, z)

        from ._hmc_ais import _autograd_value_and_grad
        grad_fn = _autograd_value_and_grad([log_init, log_target], interior)
    return ModelAIS(z0, grad_fn, xr, fast, interior)


def _draw_rows(draw, num_chains: int, pilot_chains: int, generator) -> Tensor:
    """draw(n) -> [n * B, Z] for the chains and then the pilot; keyed by a KeyedNoise, the chains
    take rows 0.. of the ais_init streams and the pilot rows PILOT_ROW.. (inside keyed_draws)."""
    if not isinstance(generator, KeyedNoise):
        return draw(num_chains + pilot_chains)
    with keyed_draws(generator, 0, STREAMS["ais_init"]):
        z0 = draw(num_chains)
    if pilot_chains:
        with keyed_draws(generator, PILOT_ROW, STREAMS["ais_init"]):
            z0 = torch.cat([z0, draw(pilot_chains)])
    return z0


def _protocol_densities(model, x: Tensor, num_chains: int, init: str, generator, pilot_chains: int = 0,
                        gradient_precision: str = "auto") -> ModelAIS:
    """AIS densities of any model with posterior(x) and log_joint(x, z), gradients by autograd."""
    from ._hmc_ais import _autograd_value_and_grad
    _protocol.check_model(model, "model_ais_densities")
    device, dtype = _protocol.device_dtype(model, x)
    x = x.to(device=device, dtype=dtype)
    b = x.shape[0]
    s = num_chains + pilot_chains
    with torch.no_grad():
        dist = model.posterior(x) if init == "posterior" else _protocol.prior(model, "AIS with init='prior'")
        z0 = _draw_rows(lambda n: _sample(dist, (n,) if init == "posterior" else (n, b), generator, device)
                        .reshape(n * b, -1), num_chains, pilot_chains, generator).to(dtype)

    def log_init(z: Tensor) -> Tensor:
        return dist.log_prob(z.view(s, b, -1)).reshape(-1)

    def log_target(z: Tensor) -> Tensor:
        return model.log_joint(x, z.view(s, b, -1)).reshape(-1)

    interior = gradient_dtype(gradient_precision, dtype, device, False, "model_ais_densities", autocast=True)
    return ModelAIS(z0, _autograd_value_and_grad([log_init, log_target], interior), x.repeat(s, 1), False,
                    interior)


def _check_generator(generator, batch: int):
    check_generator(generator)
    if isinstance(generator, KeyedNoise) and generator.batch != batch:
        raise ValueError(f"the KeyedNoise is for {generator.batch} images, x has {batch}")


def _normal(shape, dtype, device, generator) -> Tensor:
    """Standard normals [S, B, Z]: keyed (inside keyed_draws) or from ``generator``."""
    if isinstance(generator, KeyedNoise):
        return standard_normal(shape, dtype, device)
    return torch.randn(shape, dtype=dtype, device=device, generator=generator)


def _sample(dist, shape, generator, device) -> Tensor:
    """dist.sample(shape) with its randomness from ``generator`` (a Distribution takes none: the
    default generator of the device is seeded from it, and restored afterwards), or keyed per
    image inside keyed_draws (a KeyedNoise)."""
    if isinstance(generator, KeyedNoise):  # the caller's keyed_draws is active
        return _protocol._draw(dist, shape)
    if generator is None:
        return dist.sample(shape)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device))
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device.index if device.index is not None else 0] if cuda else []):
        if cuda:
            torch.cuda.default_generators[device.index or 0].manual_seed(seed)
        else:
            torch.random.default_generator.manual_seed(seed)
        return dist.sample(shape)


class _FastDensities:
    """z -> (log_init, log_target, their gradients) with the hand-written decoder backward and
    q's analytic gradient; ``grads_only`` skips the density values (inside trajectories), with
    the decoder in ``gradient_dtype`` (its weights cast once here) when one is given.

    x is the batch's [B, D], not repeated per chain: the chains' rows (r * B + b) are viewed as
    [R, B, Z] so that the fused output layer reads x [B, D] (cache-resident) for every chain
    instead of an [R * B, D] copy (bf16 AIS at 1,600 chains: 0.204 -> 0.194 s)."""

    def __init__(self, model, x, loc, logvar, gradient_dtype=None):
        self.model, self.x, self.loc, self.logvar = model, x, loc, logvar
        self.inv_var = None if loc is None else torch.exp(-logvar)
        self.weights = None
        self.x_low = x
        if gradient_dtype is not None and gradient_dtype != x.dtype:
            self.weights = model._decoder_weights(gradient_dtype)
            if x.dtype != torch.float32:  # the fused op takes float32 or bfloat16 data
                self.x_low = x.to(gradient_dtype)

    def _grad_init(self, z):
        return -z if self.loc is None else -(z - self.loc) * self.inv_var

    def _rows(self, z):
        return z.reshape(-1, self.x.shape[0], z.shape[-1])

    def __call__(self, z: Tensor):
        lt, gt = self.model._log_joint_and_grad(self.x, self._rows(z), True, self.weights)
        li = standard_normal_log_prob(z) if self.loc is None else normal_log_prob(z, self.loc, self.logvar)
        return li, lt.reshape(-1), self._grad_init(z), gt.reshape(z.shape)

    def grads_only(self, z: Tensor):
        if self.weights is not None:
            gt = self.model._low_precision_grad(self.x_low, self._rows(z), self.weights)
        else:
            gt = self.model._log_joint_and_grad(self.x, self._rows(z), False)[1]
        return self._grad_init(z), gt.reshape(z.shape)


def _hierarchical_sample(q, num_chains, generator):
    """[S, B, Z] draws of a HierarchicalPosterior with an explicit generator."""
    loc1, logvar1 = q.q1.loc, q.q1.logvar
    e1 = _normal((num_chains, *loc1.shape), loc1.dtype, loc1.device, generator)
    z1 = loc1 + torch.exp(0.5 * logvar1) * e1
    loc2, logvar2 = q._layer2(z1)
    e2 = _normal(loc2.shape, loc2.dtype, loc2.device, generator)
    return torch.cat([z1, loc2 + torch.exp(0.5 * logvar2) * e2], -1)
