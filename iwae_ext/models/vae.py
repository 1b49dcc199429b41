"""MLP encoders and decoders and the VAE/IWAE model with one or two stochastic layers.

Architectures of Burda et al. (2016): 784-200-200-50 (one stochastic layer) and
784-[200,200]-100-[100,100]-50 (two), tanh, Bernoulli output; Kingma & Welling's Gaussian
decoder (mean and log-variance) for continuous data such as Frey Face (Kingma and Welling).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, constraints
from torch.func import functional_call

from .._checks import check_choice
from ..keyed import standard_normal
from ..ops import activation, activation_backward, bernoulli_log_prob, bernoulli_log_prob_grad_h
from .bayes import BayesLinear

LOG_2PI = math.log(2 * math.pi)
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}
LIKELIHOODS = ("bernoulli", "gaussian")
RANDOM_WEIGHTS = ("none", "encoder", "all")


def normal_log_prob(z: Tensor, loc: Tensor, logvar: Tensor) -> Tensor:
    """Sum over the last dim of log N(z; loc, exp(logvar)); broadcasts; [..., Z] -> [...]."""
    return -0.5 * (LOG_2PI + logvar + (z - loc).square() * torch.exp(-logvar)).sum(-1)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """Sum over the last dim of log N(z; 0, I); [..., Z] -> [...]."""
    return -0.5 * (LOG_2PI + z.square()).sum(-1)


_LOW = (torch.bfloat16, torch.float16)


def _full(t: Tensor) -> Tensor:
    """t in float32 if a lower-precision autocast made it bfloat16 or float16, else t."""
    return t.float() if t.dtype in _LOW else t


def _hidden_backward(dh: Tensor, h: Tensor, hs: list[Tensor], weights: list[Tensor], act: str) -> Tensor:
    """Back through an MLP's hidden layers without autograd: d/d(input) from d/dh at its output h,
    given each layer's input ``hs`` and weight (bottom first); every output is read in dh's
    dtype (the products then run in it: bfloat16 for the low-precision gradients)."""
    for w, h_in in zip(reversed(weights), reversed(hs)):
        dh = activation_backward(dh, h.to(dh.dtype), act) @ w
        h = h_in
    return dh


def _bias(layer: nn.Module) -> Tensor:
    """The (mean) bias of an nn.Linear or a BayesLinear."""
    return layer.bias_mu if isinstance(layer, BayesLinear) else layer.bias


class MLP(nn.Sequential):
    """Linear layers of the given sizes, each followed by the activation. ``linear``: the layer
    class (``nn.Linear``, or ``BayesLinear`` / a partial of it for random weights)."""

    def __init__(self, sizes: Sequence[int], activation: str = "tanh", linear=nn.Linear):
        check_choice("activation", activation, sorted(ACTIVATIONS), "MLP")
        layers = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            layers += [linear(n_in, n_out), ACTIVATIONS[activation]()]
        super().__init__(*layers)
        self.out_features = sizes[-1]


class ConditionalGaussian(nn.Module):
    """A diagonal Gaussian whose mean and log-variance are an MLP of the input: [..., in] -> 2 x [..., out]."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int,
                 activation: str = "tanh", linear=nn.Linear):
        super().__init__()
        self.body = MLP([in_features, *hidden], activation, linear)
        self.loc = linear(self.body.out_features, out_features)
        self.logvar = linear(self.body.out_features, out_features)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(h)
        # under bfloat16 autocast the products are bfloat16; the distribution's parameters (and
        # every density and draw made from them) are float32 again
        return _full(self.loc(h)), _full(self.logvar(h))


class DiagonalNormal(Distribution):
    """N(loc, diag(exp(logvar))) with batch shape loc.shape[:-1] and event shape [Z]."""

    arg_constraints = {"loc": constraints.real, "logvar": constraints.real}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: Tensor, logvar: Tensor):
        self.loc, self.logvar = loc, logvar
        super().__init__(loc.shape[:-1], loc.shape[-1:], validate_args=False)

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def variance(self) -> Tensor:
        return self.logvar.exp()

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        eps = standard_normal(self._extended_shape(sample_shape), self.loc.dtype, self.loc.device)
        return self.loc + torch.exp(0.5 * self.logvar) * eps

    def log_prob(self, value: Tensor) -> Tensor:
        return normal_log_prob(value, self.loc, self.logvar)

    def entropy(self) -> Tensor:
        return 0.5 * (LOG_2PI + 1 + self.logvar).sum(-1)

    def detached(self) -> "DiagonalNormal":
        """The same distribution with its parameters cut from the graph (STL and DReG)."""
        return DiagonalNormal(self.loc.detach(), self.logvar.detach())

    def kl_standard_normal(self) -> Tensor:
        """KL(self || N(0, I)) in closed form, [B]."""
        return 0.5 * (self.loc.square() + self.logvar.exp() - 1 - self.logvar).sum(-1)


class HierarchicalPosterior(Distribution):
    """q(z1|x) q(z2|z1) over z = cat([z1, z2], -1): batch shape [B], event shape [Z1 + Z2]."""

    support = constraints.real_vector
    has_rsample = True
    arg_constraints = {}

    def __init__(self, q1: DiagonalNormal, layer2: ConditionalGaussian, params: dict | None = None):
        self.q1, self.layer2, self._params = q1, layer2, params
        self.z1_dim = q1.event_shape[0]
        self.z2_dim = layer2.loc.out_features
        super().__init__(q1.batch_shape, torch.Size([self.z1_dim + self.z2_dim]), validate_args=False)

    def _layer2(self, z1: Tensor) -> tuple[Tensor, Tensor]:
        if self._params is None:
            return self.layer2(z1)
        return functional_call(self.layer2, self._params, (z1,))

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        z1 = self.q1.rsample(sample_shape)
        z2 = DiagonalNormal(*self._layer2(z1)).rsample()
        return torch.cat([z1, z2], -1)

    def log_prob(self, value: Tensor) -> Tensor:
        z1, z2 = value.split([self.z1_dim, self.z2_dim], -1)
        return self.q1.log_prob(z1) + normal_log_prob(z2, *self._layer2(z1))

    def detached(self) -> "HierarchicalPosterior":
        """Parameters (of both layers) cut from the graph; z1's path into q(z2|z1) kept."""
        params = {n: p.detach() for n, p in self.layer2.named_parameters()}
        return HierarchicalPosterior(self.q1.detached(), self.layer2, params)


def _body(body: nn.Module, z: Tensor, detach_params: bool):
    """body(z), with its parameters cut from the graph if asked."""
    if not detach_params:
        return body(z)
    return functional_call(body, {n: p.detach() for n, p in body.named_parameters()}, (z,))


class BernoulliDecoder(nn.Module):
    """p(x|z) = prod_d Bernoulli(x_d; sigmoid(logits_d)); logits = MLP(z). Output bias = logit(mean).

    ``fused`` (default True): :meth:`log_likelihood` forms the output layer and the
    log-likelihood in one pass (:func:`iwae_ext.ops.bernoulli_log_prob`) where the output layer
    is an ``nn.Linear``; False: the logits in full and the pure-PyTorch formula (comparisons)."""

    def __init__(self, latent_dim: int, hidden: Sequence[int], x_dim: int, activation: str = "tanh",
                 x_mean: Tensor | None = None, linear=nn.Linear):
        super().__init__()
        self.fused = True
        self.body = MLP([latent_dim, *hidden], activation, linear)
        self.logits = linear(self.body.out_features, x_dim)
        if x_mean is not None:
            bias = _bias(self.logits)
            with torch.no_grad():
                bias.copy_(torch.logit(x_mean.to(bias).clamp(1e-3, 1 - 1e-3)))

    def forward(self, z: Tensor) -> Tensor:
        return self.logits(self.body(z))

    @staticmethod
    def log_prob(x: Tensor, logits: Tensor) -> Tensor:
        # sum_d x log sigmoid(l) + (1 - x) log sigmoid(-l) = sum_d x l - softplus(l)
        return (x * logits).sum(-1) - F.softplus(logits).sum(-1)

    def fuses(self, x: Tensor, h: Tensor) -> bool:
        """Whether :meth:`log_likelihood` takes the fused op for data x and hidden units h."""
        out = self.logits
        return (self.fused and type(out) is nn.Linear and out.bias is not None and x.dim() == 2
                and h.dim() >= 2 and x.shape[0] == h.shape[-2]
                and (x.dtype == h.dtype or (h.dtype == torch.bfloat16 and x.dtype == torch.float32))
                and h.dtype in (torch.float32, torch.float64, torch.bfloat16))

    def log_likelihood(self, x: Tensor, z: Tensor, detach_params: bool = False) -> Tensor:
        """log p(x|z) for x [B, D], z [..., B, Z]: [..., B]. ``detach_params``: the decoder's
        parameters cut from the graph (z keeps its path)."""
        h = _body(self.body, z, detach_params)
        low = h.dtype in _LOW  # bfloat16 autocast: the product in bfloat16, the likelihood in float32
        x = x.float() if low else x.to(h.dtype)
        if self.fuses(x, h):
            w, b = self.logits.weight, self.logits.bias
            if detach_params:
                w, b = w.detach(), b.detach()
            if low:  # the fused op's bfloat16 path: float32 accumulation, a float32 value
                w, b = w.to(h.dtype), b.float()
            return bernoulli_log_prob(h, w, b, x)
        if detach_params:
            params = {n: p.detach() for n, p in self.logits.named_parameters()}
            return self.log_prob(x, _full(functional_call(self.logits, params, (h,))))
        return self.log_prob(x, _full(self.logits(h)))

    @staticmethod
    def mean(logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)

    @staticmethod
    def sample(logits: Tensor, generator=None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(logits), generator=generator)


class GaussianDecoder(nn.Module):
    """p(x|z) = N(x; sigmoid(m(z)), diag(exp(v(z)))) (Kingma & Welling, appendix C.2)."""

    def __init__(self, latent_dim: int, hidden: Sequence[int], x_dim: int, activation: str = "tanh",
                 x_mean: Tensor | None = None, linear=nn.Linear):
        super().__init__()
        self.fused = True  # no fused path for a Gaussian output (kept for a uniform switch)
        self.net = ConditionalGaussian(latent_dim, hidden, x_dim, activation, linear)
        if x_mean is not None:
            bias = _bias(self.net.loc)
            with torch.no_grad():
                bias.copy_(torch.logit(x_mean.to(bias).clamp(1e-3, 1 - 1e-3)))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        loc, logvar = self.net(z)  # float32 (ConditionalGaussian) under autocast too
        return torch.sigmoid(loc), logvar

    @staticmethod
    def log_prob(x: Tensor, params: tuple[Tensor, Tensor]) -> Tensor:
        return normal_log_prob(x, *params)

    def log_likelihood(self, x: Tensor, z: Tensor, detach_params: bool = False) -> Tensor:
        """log p(x|z) for x [B, D], z [..., B, Z]: [..., B] (parameters cut from the graph if asked)."""
        return self.log_prob(x, _body(self, z, detach_params))

    @staticmethod
    def mean(params: tuple[Tensor, Tensor]) -> Tensor:
        return params[0]

    @staticmethod
    def sample(params: tuple[Tensor, Tensor], generator=None) -> Tensor:
        loc, logvar = params
        eps = torch.randn(loc.shape, dtype=loc.dtype, device=loc.device, generator=generator)
        return loc + torch.exp(0.5 * logvar) * eps


class VAE(nn.Module):
    """A VAE/IWAE model with one or two stochastic layers (see the package docstring).

    Args:
        x_dim: data dimension D (784 for 28x28 images).
        latent_dims: stochastic layer widths, bottom first: (50,) or (100, 50).
        hidden: deterministic hidden widths of each encoder layer, bottom first; the decoder
            mirrors them. Default: (200, 200) for one layer; ((200, 200), (100, 100)) for two.
        activation: tanh, relu or sigmoid.
        likelihood: "bernoulli" (logits) or "gaussian" (mean and log-variance).
        x_mean: the training data mean [D], to initialise the decoder's output bias.
        random_weights: "none"; "encoder" (IWAER_rec) or "all" (IWAER, Hernandez-Lobato et al.): those
            networks' layers are :class:`BayesLinear`, with one weight draw per data point and
            per importance sample in ``log_weights`` (one stochastic layer only).
        rho_init: initial rho of the random weights (sigma = softplus(rho)).
        decoder_hidden: the hidden widths of p(x|z1)'s MLP, from z1 toward x; default (None)
            the mirror of the first encoder's, ``hidden[0]`` reversed.
    """

    def __init__(self, x_dim: int = 784, latent_dims: Sequence[int] = (50,),
                 hidden: Sequence | None = None, activation: str = "tanh",
                 likelihood: str = "bernoulli", x_mean: Tensor | None = None,
                 random_weights: str = "none", rho_init: float = -5.0,
                 decoder_hidden: Sequence[int] | None = None):
        super().__init__()
        latent_dims = tuple(int(d) for d in latent_dims)
        if len(latent_dims) not in (1, 2) or min(latent_dims) < 1:
            raise ValueError(f"VAE: latent_dims must be one or two positive widths, got {latent_dims}")
        if hidden is None:
            hidden = ((200, 200), (100, 100))[: len(latent_dims)]
        elif len(hidden) and isinstance(hidden[0], int):
            hidden = (tuple(hidden),) * len(latent_dims)
        hidden = tuple(tuple(int(h) for h in layer) for layer in hidden)
        if len(hidden) != len(latent_dims):
            raise ValueError(f"VAE: hidden must give one tuple of widths per stochastic layer "
                             f"({len(latent_dims)}), got {hidden}")
        check_choice("likelihood", likelihood, LIKELIHOODS, "VAE")
        check_choice("activation", activation, sorted(ACTIVATIONS), "VAE")
        check_choice("random_weights", random_weights, RANDOM_WEIGHTS, "VAE")
        if random_weights != "none" and len(latent_dims) != 1:
            raise ValueError("VAE: random weights (IWAER) are implemented for one stochastic layer")
        if decoder_hidden is not None:
            decoder_hidden = tuple(int(w) for w in decoder_hidden)
            if min(decoder_hidden, default=1) < 1:
                raise ValueError(f"VAE: decoder_hidden must be positive widths, got {decoder_hidden}")
        if x_mean is not None and tuple(x_mean.shape) != (x_dim,):
            raise ValueError(f"VAE: x_mean must have shape [{x_dim}], got {tuple(x_mean.shape)}")
        self.config = {"x_dim": int(x_dim), "latent_dims": list(latent_dims),
                       "hidden": [list(h) for h in hidden], "activation": activation,
                       "likelihood": likelihood, "random_weights": random_weights,
                       "rho_init": float(rho_init),
                       "decoder_hidden": None if decoder_hidden is None else list(decoder_hidden)}
        self.x_dim, self.latent_dims = int(x_dim), latent_dims
        self.random_weights = random_weights
        bayes = lambda n_in, n_out: BayesLinear(n_in, n_out, rho_init)  # noqa: E731
        enc_linear = nn.Linear if random_weights == "none" else bayes
        dec_linear = bayes if random_weights == "all" else nn.Linear
        inputs = (x_dim,) + latent_dims[:-1]
        self.encoders = nn.ModuleList(
            ConditionalGaussian(n_in, h, z, activation, enc_linear)
            for n_in, h, z in zip(inputs, hidden, latent_dims))
        # p(z1|z2) for two layers: the mirror of q(z2|z1).
        self.priors = nn.ModuleList(
            ConditionalGaussian(latent_dims[i + 1], hidden[i + 1][::-1], latent_dims[i], activation)
            for i in range(len(latent_dims) - 1))
        decoder = BernoulliDecoder if likelihood == "bernoulli" else GaussianDecoder
        dec_hidden = hidden[0][::-1] if decoder_hidden is None else decoder_hidden
        self.decoder = decoder(latent_dims[0], dec_hidden, x_dim, activation, x_mean, dec_linear)

    @property
    def latent_dim(self) -> int:
        """The width Z of the latent tensor z (Z1 + Z2 for two layers)."""
        return sum(self.latent_dims)

    def split_latent(self, z: Tensor) -> tuple[Tensor, ...]:
        """(z1,) or (z1, z2) from z = cat([z1, z2], -1)."""
        if z.shape[-1] != self.latent_dim:
            raise ValueError(f"z must have last dimension {self.latent_dim} "
                             f"(latent_dims {self.latent_dims}), got shape {tuple(z.shape)}")
        return tuple(z.split(self.latent_dims, -1))

    def _check_x(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[-1] != self.x_dim:
            raise ValueError(f"x must have shape [B, {self.x_dim}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be floating point (values in [0, 1]), got {x.dtype}")
        return x

    def posterior(self, x: Tensor) -> Distribution:
        """q(z|x): batch shape [B], event shape [Z]."""
        x = self._check_x(x)
        q1 = DiagonalNormal(*self.encoders[0](x))
        if len(self.encoders) == 1:
            return q1
        return HierarchicalPosterior(q1, self.encoders[1])

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """log p(z): [..., Z] -> [...]."""
        zs = self.split_latent(z)
        log_p = standard_normal_log_prob(zs[-1])
        for i, prior in enumerate(self.priors):
            log_p = log_p + normal_log_prob(zs[i], *prior(zs[i + 1]))
        return log_p

    def decode(self, z: Tensor):
        """The decoder's output for z [..., Z]: logits (Bernoulli) or (mean, logvar) (Gaussian)."""
        return self.decoder(self.split_latent(z)[0])

    @property
    def fused(self) -> bool:
        """Whether the Bernoulli log-likelihood uses the fused output-layer op (default True;
        False: the logits in full and the pure-PyTorch formula, for comparisons). Not saved."""
        return self.decoder.fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self.decoder.fused = bool(value)

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x|z) for x [B, D], z [S, B, Z]: [S, B]."""
        return self.decoder.log_likelihood(self._check_x(x), self.split_latent(z)[0])

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x, z) for x [B, D], z [S, B, Z]: [S, B]."""
        return self.prior_log_prob(z) + self.log_likelihood(x, z)

    def log_weights(self, x: Tensor, k: int, stop_gradient_q: bool = False,
                    return_latent: bool = False):
        """log w_k = log p(x, z_k) - log q(z_k|x), z_k ~ q(z|x) reparameterised: [k, B].

        ``stop_gradient_q``: evaluate log q with its parameters cut from the graph (z keeps its
        reparameterisation path), as the STL and DReG estimators need. ``return_latent``:
        also return z [k, B, Z].
        """
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if self.random_weights != "none":
            # Hernandez-Lobato et al., eq. 3: encoder weights drawn per data point and per sample (x repeated
            # k times, each row its own draw), z_j ~ q(z|x, phi_j); the decoder's BayesLinear
            # layers draw per row of z, i.e. per sample and data point, too.
            q = DiagonalNormal(*self.encoders[0](self._check_x(x).expand(k, *x.shape)))
            z = q.rsample()
        else:
            q = self.posterior(x)
            z = q.rsample((k,))
        log_q = (q.detached() if stop_gradient_q else q).log_prob(z)
        log_w = self.log_joint(x, z) - log_q
        return (log_w, z) if return_latent else log_w

    def kl_divergence(self, x: Tensor) -> Tensor:
        """KL(q(z|x) || p(z)) in closed form, [B]; one stochastic layer only."""
        q = self.posterior(x)
        if not isinstance(q, DiagonalNormal):
            raise ValueError("kl_divergence: the analytic KL exists for one stochastic layer only; "
                             "use the Monte Carlo KL (kl='mc') with two layers")
        return q.kl_standard_normal()

    def posterior_means(self, x: Tensor, num_samples: int = 100) -> list[Tensor]:
        """E_q[z_i] for each stochastic layer, each [B, Z_i]; the top layer of a two-layer model
        by Monte Carlo over z1 (``num_samples`` draws), the bottom layer exactly."""
        q = self.posterior(x)
        if isinstance(q, DiagonalNormal):
            return [q.loc]
        z1 = q.q1.rsample((num_samples,))
        return [q.q1.loc, q.layer2(z1)[0].mean(0)]

    @property
    def has_fast_log_joint_grad(self) -> bool:
        """Whether :meth:`log_joint_and_grad` applies: one stochastic layer and a deterministic
        decoder (nn.Linear layers)."""
        return len(self.latent_dims) == 1 and self.random_weights != "all"

    @torch.no_grad()
    def log_joint_and_grad(self, x: Tensor, z: Tensor, value: bool = True,
                           gradient_dtype: torch.dtype | None = None) -> tuple[Tensor | None, Tensor]:
        """log p(x, z) and its gradient in z by a hand-written backward through the decoder MLP
        (no autograd graph): x [C, D], z [C, Z] -> ([C], [C, Z]). Equal to autograd's up to
        rounding; one stochastic layer, deterministic decoder (:attr:`has_fast_log_joint_grad`).

        Bernoulli: d/d logits = x - sigmoid(logits), with the value and d/dh of the output layer
        from the fused op :func:`iwae_ext.ops.bernoulli_log_prob_grad_h` (logits never formed in
        full) unless :attr:`fused` is False. Gaussian (mean sigmoid(m), log-variance v):
        d/dm = (x - mean) exp(-v) mean (1 - mean), d/dv = ((x - mean)^2 exp(-v) - 1) / 2.
        Each hidden layer h = act(a): d/da = d/dh * act'(a), read from h alone.
        The prior N(0, I) adds -z. ``value=False``: the gradient only (the value is None).

        ``gradient_dtype`` (e.g. ``torch.bfloat16``): a cheaper gradient, another deterministic
        function of z close to the exact one (about 1e-3 relative in bfloat16), returned in z's
        dtype. With ``value=False`` the decoder's forward and backward run with its weights, z
        and every matrix product in that dtype (float32 accumulation; the output layer's
        epilogue in float32): what HMC needs inside a trajectory. With ``value=True`` the
        forward and the value stay in the model's dtype and only the backward's products take
        ``gradient_dtype`` (Bernoulli decoders; a Gaussian decoder's gradient is then the full
        one): what a trajectory's end needs, the exact energy beside a cheaper gradient.
        """
        if not self.has_fast_log_joint_grad:
            raise ValueError("log_joint_and_grad: needs one stochastic layer and a deterministic decoder "
                             "(use autograd on log_joint otherwise)")
        x = self._check_x(x)
        if z.dim() != 2 or z.shape != (x.shape[0], self.latent_dim):
            raise ValueError(f"log_joint_and_grad: z must have shape [{x.shape[0]}, {self.latent_dim}] "
                             f"(one row per row of x), got {tuple(z.shape)}")
        low = None
        if gradient_dtype is not None and gradient_dtype != z.dtype:
            low = self._decoder_weights(gradient_dtype)
            if not value:
                return None, self._low_precision_grad(x, z, low)
        return self._log_joint_and_grad(x, z, value, low)

    @torch.no_grad()
    def _log_joint_and_grad(self, x: Tensor, z: Tensor, value: bool, low: dict | None = None):
        """:meth:`log_joint_and_grad` on checked arguments, also for z [..., B, Z] with x [B, D]
        (the fused output layer then reads x once for all leading rows); ``low``
        (:meth:`_decoder_weights`): the backward's products in its dtype where the output layer
        is fused."""
        dec = self.decoder
        body = dec.body if isinstance(dec, BernoulliDecoder) else dec.net.body
        layers = [(body[i], body[i + 1]) for i in range(0, len(body), 2)]
        act = self.config["activation"]
        hs, h = [], z
        for lin, _ in layers:
            hs.append(h)
            h = activation(F.linear(h, lin.weight), lin.bias, act)  # the bias and activation in one pass
        fused = isinstance(dec, BernoulliDecoder) and dec.fuses(x, h)
        weights = [lin.weight for lin, _ in layers]
        if fused and low is not None:  # the backward's products in low's dtype
            log_lik, dh = bernoulli_log_prob_grad_h(h, dec.logits.weight, dec.logits.bias, x, value,
                                                    low_weight=low["out"][0][0])
            weights = [w for w, _ in low["hidden"]]
        elif fused:
            log_lik, dh = bernoulli_log_prob_grad_h(h, dec.logits.weight, dec.logits.bias, x, value)
        elif isinstance(dec, BernoulliDecoder):
            logits = F.linear(h, dec.logits.weight, dec.logits.bias)
            log_lik = (x * logits).sum(-1) - F.softplus(logits).sum(-1) if value else None
            dh = (x - torch.sigmoid(logits)) @ dec.logits.weight
        else:
            mean = torch.sigmoid(F.linear(h, dec.net.loc.weight, dec.net.loc.bias))
            logvar = F.linear(h, dec.net.logvar.weight, dec.net.logvar.bias)
            r = x - mean
            prec_r = r * torch.exp(-logvar)
            log_lik = -0.5 * (LOG_2PI + logvar + r * prec_r).sum(-1) if value else None
            d_loc = prec_r * mean * (1 - mean)
            d_logvar = 0.5 * (r * prec_r - 1)
            dh = d_loc @ dec.net.loc.weight + d_logvar @ dec.net.logvar.weight
        dh = _hidden_backward(dh, h, hs, weights, act)
        return (standard_normal_log_prob(z) + log_lik if value else None), dh.to(z.dtype) - z

    def _decoder_weights(self, dtype: torch.dtype) -> dict:
        """The decoder's weights and biases cast to ``dtype`` once, for
        :meth:`_low_precision_grad` (an AIS run casts them once, not at every leapfrog step)."""
        dec = self.decoder
        body = dec.body if isinstance(dec, BernoulliDecoder) else dec.net.body
        cast = lambda t: t.detach().to(dtype)  # noqa: E731
        hidden = [(cast(body[i].weight), cast(body[i].bias)) for i in range(0, len(body), 2)]
        if isinstance(dec, BernoulliDecoder):
            out = [(cast(dec.logits.weight), dec.logits.bias.detach().float())]  # fused op: float32 bias
        else:
            out = [(cast(dec.net.loc.weight), cast(dec.net.loc.bias)),
                   (cast(dec.net.logvar.weight), cast(dec.net.logvar.bias))]
        return {"dtype": dtype, "hidden": hidden, "out": out, "activation": self.config["activation"],
                "bernoulli": isinstance(dec, BernoulliDecoder)}

    @torch.no_grad()
    def _low_precision_grad(self, x: Tensor, z: Tensor, weights: dict) -> Tensor:
        """grad_z log p(x, z) with the decoder in ``weights['dtype']`` (see
        :meth:`log_joint_and_grad`'s ``gradient_dtype``); x [B, D], z [..., B, Z] -> z's shape, in z's
        dtype."""
        dtype, act = weights["dtype"], weights["activation"]
        hs, h = [], z.to(dtype)
        for w, b in weights["hidden"]:
            hs.append(h)
            h = activation(F.linear(h, w), b, act)  # the bias and activation in one pass
        if weights["bernoulli"] and self.decoder.fused:
            (w, b), = weights["out"]
            xx = x if x.dtype == torch.float32 or x.dtype == dtype else x.float()
            dh = bernoulli_log_prob_grad_h(h, w, b, xx, False)[1]
        elif weights["bernoulli"]:  # the reference path (fused = False): the logits in full
            (w, b), = weights["out"]
            dh = (x.float() - torch.sigmoid(F.linear(h, w).float() + b)).to(dtype) @ w
        else:
            (wl, bl), (wv, bv) = weights["out"]
            mean = torch.sigmoid(F.linear(h, wl, bl).float())
            logvar = F.linear(h, wv, bv).float()
            r = x.float() - mean
            prec_r = r * torch.exp(-logvar)
            dh = (prec_r * mean * (1 - mean)).to(dtype) @ wl + (0.5 * (r * prec_r - 1)).to(dtype) @ wv
        dh = _hidden_backward(dh, h, hs, [w for w, _ in weights["hidden"]], act)
        return dh.to(z.dtype) - z

    @classmethod
    def from_deterministic(cls, model: "VAE", random_weights: str = "all", rho_init: float = -5.0) -> "VAE":
        """A random-weight copy of a (trained) deterministic model: its weights become the means
        of the BayesLinear layers, rho = rho_init."""
        if model.random_weights != "none":
            raise ValueError("from_deterministic: the model already has random weights")
        cfg = dict(model.config, random_weights=random_weights, rho_init=rho_init)
        p = next(model.parameters())
        new = cls(**cfg).to(dtype=p.dtype, device=p.device)
        state = {}
        for name, value in model.state_dict().items():
            prefix, _, leaf = name.rpartition(".")
            target = new.get_submodule(prefix)
            if isinstance(target, BayesLinear):
                name = f"{prefix}.{leaf}_mu"
            state[name] = value
        missing, unexpected = new.load_state_dict(state, strict=False)
        if unexpected or any(not m.endswith("_rho") for m in missing):
            raise RuntimeError(f"from_deterministic: parameters do not map: {missing} {unexpected}")
        return new

    def weight_kl(self, prior_std: float) -> Tensor:
        """KL(q(weights) || N(0, prior_std^2)) summed over the random layers (0 without any)."""
        p = next(self.parameters())
        total = torch.zeros((), dtype=p.dtype, device=p.device)
        for m in self.modules():
            if isinstance(m, BayesLinear):
                total = total + m.kl(prior_std)
        return total

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """n draws from p(x): decoder means (``mean=True``) or samples, [n, D]."""
        p = next(self.parameters())
        z = torch.randn(n, self.latent_dims[-1], dtype=p.dtype, device=p.device, generator=generator)
        for prior in reversed(self.priors):
            loc, logvar = prior(z)
            eps = torch.randn(loc.shape, dtype=p.dtype, device=p.device, generator=generator)
            z = loc + torch.exp(0.5 * logvar) * eps
        params = self.decoder(z)
        return self.decoder.mean(params) if mean else self.decoder.sample(params, generator)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Decoder mean at the posterior mean of z1: [B, D]."""
        q = self.posterior(x)
        z1 = q.loc if isinstance(q, DiagonalNormal) else q.q1.loc
        return self.decoder.mean(self.decoder(z1))
