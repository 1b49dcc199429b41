"""Models trained with pythae or Pyro, evaluated as they are.

:func:`from_pythae` and :func:`from_pyro` turn a trained model of either library into a
:class:`~iwae_ext.protocol.LatentVariableModel`, so that L_k (with its ESS and k-hat), the ELBO,
AIS, BDMC's pieces, SIR and the report take it without a hand-written adapter::

    model = iwae_ext.adapters.from_pythae(trained)               # a pythae VAE / IWAE / ...
    model = iwae_ext.adapters.from_pyro(model_fn, guide_fn)      # a Pyro model and guide
    iwae_ext.evaluate.bounds(model, x, k=5000)

Neither library is a dependency of this package: install the extras (``pip install
iwae_ext[pythae]``, ``iwae_ext[pyro]``) or the libraries themselves. Data are passed as this
package's [N, D] rows; the adapters reshape them to what the model takes. What an adapter cannot
express is refused by name (:class:`AdapterError`): for pythae, models whose posterior is not a
diagonal Gaussian, whose prior is not N(0, I) or whose reconstruction term is not a likelihood;
for Pyro, guides with several latent sites or a site the model does not have, latent sites that
are not reparameterisable, and models with latent sites the guide does not sample.
"""
from __future__ import annotations

import math

import torch
import torch.distributions as D
from torch import Tensor, nn

from ._output_layer import find_output_layer, input_of, last_linear
from .keyed import standard_normal

__all__ = ["from_pythae", "from_pyro", "PythaeModel", "PyroModel", "AdapterError", "PYTHAE_MODELS"]

_LOG_2PI = math.log(2 * math.pi)


class AdapterError(ValueError):
    """A model an adapter cannot express as a LatentVariableModel; the message says why."""


# pythae models whose generative model is z ~ N(0, I), x | z ~ the decoder's likelihood, with a
# diagonal Gaussian q(z|x) from encoder.embedding / encoder.log_covariance: they differ only in
# the objective they were trained with, which evaluation does not need.
PYTHAE_MODELS = ("VAE", "IWAE", "BetaVAE", "DisentangledBetaVAE", "BetaTCVAE", "FactorVAE", "InfoVAE",
                 "CIWAE", "MIWAE", "PIWAE")
_PYTHAE_REFUSED = {
    "VAMP": "its prior is a VampPrior (a mixture over pseudo-inputs), not N(0, I)",
    "VAE_IAF": "its posterior is an inverse autoregressive flow, not a diagonal Gaussian",
    "VAE_LinNF": "its posterior is a normalising flow, not a diagonal Gaussian",
    "HVAE": "its posterior is the end of a Hamiltonian flow, not a diagonal Gaussian",
    "RHVAE": "its posterior is the end of a Riemannian Hamiltonian flow and its prior is learned",
    "SVAE": "its latents live on a hypersphere (von Mises-Fisher), not in R^Z",
    "PoincareVAE": "its latents live in the Poincare ball, not in R^Z",
    "MSSSIM_VAE": "its reconstruction term is a structural-similarity loss, not a likelihood",
    "VAEGAN": "its reconstruction term is a discriminator's feature loss, not a likelihood",
}


class PythaeModel(nn.Module):
    """A trained pythae VAE-family model as a LatentVariableModel (see :func:`from_pythae`).

    q(z|x) = N(embedding, exp(log_covariance / 2)) from the model's encoder, p(z) = N(0, I), and
    p(x|z) the decoder's "reconstruction" under the config's ``reconstruction_loss``: "bce",
    independent Bernoulli pixels with those means (the data in [0, 1]), or "mse", N(mean, I) (as
    pythae's own ``get_nll``). ``fused`` says whether log p(x|z) takes the package's fused output
    layer (``bernoulli_log_prob``), which works from the decoder's logits: exact where the
    decoder's float32 sigmoid rounds to 0 or 1 (there the probabilities' binary cross-entropy is
    clamped at -100 nats per pixel, as pythae's is).
    """

    def __init__(self, model, fused: bool = True):
        super().__init__()
        name = type(model).__name__
        if name in _PYTHAE_REFUSED:
            raise AdapterError(f"from_pythae: a pythae {name} cannot be evaluated as z ~ N(0, I), "
                               f"x | z ~ decoder: {_PYTHAE_REFUSED[name]}")
        if name not in PYTHAE_MODELS:
            raise AdapterError(f"from_pythae: a pythae {name} is not one of the Gaussian-encoder VAEs "
                               f"this adapter knows ({', '.join(PYTHAE_MODELS)})"
                               + ("; it has no probabilistic encoder" if "AE" in name and "VAE" not in name else ""))
        config = getattr(model, "model_config", None)
        loss = getattr(config, "reconstruction_loss", None)
        if loss not in ("bce", "mse"):
            raise AdapterError(f"from_pythae: reconstruction_loss {loss!r} is not a likelihood this adapter "
                               f"knows ('bce': Bernoulli, 'mse': unit-variance Gaussian)")
        input_dim = getattr(config, "input_dim", None)
        if not input_dim:
            raise AdapterError("from_pythae: the model's config has no input_dim (the shape of one data point)")
        self.pythae = model
        self.input_shape = tuple(int(d) for d in input_dim)
        self.data_dim = math.prod(self.input_shape)
        self.latent_dim = int(config.latent_dim)
        self.likelihood = "bernoulli" if loss == "bce" else "gaussian"
        self._final = self._find_output_layer() if fused and loss == "bce" else None

    @property
    def fused(self) -> bool:
        return self._final is not None

    # -- the protocol ---------------------------------------------------------------------------

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.pythae.encoder(x.reshape(x.shape[0], *self.input_shape))
        return out.embedding.reshape(x.shape[0], -1), out.log_covariance.reshape(x.shape[0], -1)

    def posterior(self, x: Tensor) -> D.Distribution:
        mu, log_var = self._encode(x)
        return D.Independent(D.Normal(mu, torch.exp(0.5 * log_var), validate_args=False), 1, validate_args=False)

    def prior(self) -> D.Distribution:
        p = next(self.parameters())
        zero = torch.zeros(self.latent_dim, dtype=p.dtype, device=p.device)
        return D.Independent(D.Normal(zero, torch.ones_like(zero), validate_args=False), 1, validate_args=False)

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x|z) for x [B, D], z [S, B, Z]: [S, B]."""
        lead = z.shape[:-1]
        flat = z.reshape(-1, self.latent_dim)
        if self._final is not None:
            h = self._hidden(flat)
            from .ops import bernoulli_log_prob
            return bernoulli_log_prob(h.reshape(*lead, h.shape[-1]), self._final.weight, self._final.bias, x)
        mean = self.pythae.decoder(flat)["reconstruction"].reshape(*lead, self.data_dim)
        if self.likelihood == "bernoulli":
            xe = x.expand_as(mean)
            return -nn.functional.binary_cross_entropy(mean, xe, reduction="none").sum(-1)
        return -0.5 * (x - mean).square().sum(-1) - 0.5 * self.data_dim * _LOG_2PI

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        return self.log_likelihood(x, z) + (-0.5 * z.square().sum(-1) - 0.5 * self.latent_dim * _LOG_2PI)

    def log_weights(self, x: Tensor, k: int, return_latent: bool = False):
        """log p(x, z) - log q(z|x) for k draws z ~ q per data point: [k, B] (and z). One encoder
        pass; q's density from the standard normals themselves; the per-image keyed draws of
        :mod:`iwae_ext.keyed` where active."""
        mu, log_var = self._encode(x)
        eps = standard_normal((k, *mu.shape), mu.dtype, mu.device)
        z = mu + torch.exp(0.5 * log_var) * eps
        # log p(z) - log q(z|x): the log(2 pi) terms cancel
        log_ratio = 0.5 * (eps.square() - z.square()).sum(-1) + 0.5 * log_var.sum(-1)
        lw = self.log_likelihood(x, z) + log_ratio
        return (lw, z) if return_latent else lw

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Decoder means [n, D] at n draws of p(z)."""
        p = next(self.parameters())
        z = torch.randn(n, self.latent_dim, dtype=p.dtype, device=p.device, generator=generator)
        return self.pythae.decoder(z)["reconstruction"].reshape(n, self.data_dim)

    # -- the fused output layer -----------------------------------------------------------------

    def _hidden(self, z: Tensor) -> Tensor:
        """The input of the decoder's output layer for z [N, Z]: the decoder runs up to it."""
        return input_of(self._final, self.pythae.decoder, z)

    def _find_output_layer(self):
        """The decoder's last nn.Linear with D outputs when the decoder's output is exactly
        sigmoid of it (checked on probe latents); else None (the decoder's probabilities are used)."""
        decoder = self.pythae.decoder
        return find_output_layer(decoder, lambda z: decoder(z)["reconstruction"].reshape(z.shape[0], -1),
                                 self.latent_dim, self.data_dim, torch.sigmoid)


def from_pythae(model, fused: bool = True) -> PythaeModel:
    """A trained pythae model of the Gaussian-encoder VAE family (``PYTHAE_MODELS``: VAE, IWAE,
    beta-VAEs, ...) as a LatentVariableModel: L_k, AIS, SIR and the report take it as it is.

    With ``fused`` (default) and a Bernoulli decoder ("bce") whose output is the sigmoid of a
    final ``nn.Linear`` (checked numerically on probe latents, so a user's own decoder qualifies
    as well as pythae's MLPs), log p(x|z) is the package's fused output layer from the logits.
    Refused (:class:`AdapterError`, saying why): models with another prior (VAMP), a flow or
    Hamiltonian posterior (IAF, LinNF, HVAE, RHVAE), non-Euclidean latents (SVAE, PoincareVAE),
    a reconstruction term that is not a likelihood (MSSSIM_VAE, VAEGAN), and autoencoders
    without a probabilistic encoder.
    """
    return PythaeModel(model, fused)


class PyroModel(nn.Module):
    """A Pyro model and guide with one local latent site as a LatentVariableModel (see
    :func:`from_pyro`)."""

    def __init__(self, model, guide, modules=(), decoder: nn.Module | None = None, example: Tensor | None = None):
        super().__init__()
        import importlib
        try:
            importlib.import_module("pyro")
        except ImportError as e:
            raise AdapterError(f"from_pyro: Pyro is not installed (pip install pyro-ppl): {e}") from None
        if not callable(model) or not callable(guide):
            raise AdapterError("from_pyro: model and guide must be callables taking the data x [B, ...]")
        if decoder is not None and not isinstance(decoder, nn.Module):
            raise AdapterError(f"from_pyro: decoder must be the nn.Module whose output the model's likelihood "
                               f"takes, got {type(decoder).__name__}")
        self.model_fn, self.guide_fn = model, guide
        self.networks = nn.ModuleList(modules)
        self.decoder = decoder  # a submodule too: its device and eval mode follow the adapter's
        self.site = None  # the latent site's name
        self.likelihood = None
        self.vectorized = None  # the S samples as a plate of Pyro's (True) or as S x B data rows (False)
        self._final = None  # the decoder's output layer, once the fused path is checked
        self._checked = False
        if example is not None:
            self._setup(example)

    # -- tracing ---------------------------------------------------------------------------------

    def _guide_site(self, x: Tensor) -> dict:
        import pyro
        from pyro import poutine
        with pyro.validation_enabled(False):  # its checks read values back to the host
            trace = poutine.trace(self.guide_fn).get_trace(x)
        latent = [s for s in _samples(trace) if not s["is_observed"] and not s["infer"].get("is_auxiliary")]
        if len(latent) != 1:
            raise AdapterError(f"from_pyro: the guide must sample exactly one latent site, it samples "
                               f"{len(latent)}: {', '.join(repr(s['name']) for s in latent) or 'none'}")
        site = latent[0]
        if not site["fn"].has_rsample:
            raise AdapterError(f"from_pyro: the guide's site {site['name']!r} ({_dist_name(site['fn'])}) "
                               f"is not reparameterisable (no rsample)")
        return site

    def _trace(self, x: Tensor, z: Tensor, vectorized: bool, stop_at_output: bool = False):
        """The model's trace conditioned on z: z [S, B, Z] with the S samples as a plate over
        x [B, ...] (vectorized), or z [N, Z] for data rows x [N, ...]. ``stop_at_output``: the
        model stops where the decoder's output layer is called; (trace so far, its input)."""
        import pyro
        from pyro import poutine
        handler = poutine.trace(poutine.condition(self.model_fn, data={self.site: z}))

        def run():
            with pyro.validation_enabled(False):
                if vectorized:
                    with pyro.plate("_iwae_ext_samples", z.shape[0], dim=-2):
                        handler(x)
                else:
                    handler(x)
        if stop_at_output:
            h = input_of(self._final, run)
            return handler.trace, h
        run()
        return handler.trace, None

    def _site_log_probs(self, trace, shape: tuple) -> Tensor:
        total = 0
        for s in _samples(trace):
            lp = s["fn"].log_prob(s["value"])
            if lp.shape != shape:
                raise AdapterError(f"from_pyro: the model's site {s['name']!r} has log-density shape "
                                   f"{list(lp.shape)}, expected {list(shape)} (one value per sample and "
                                   f"data row: sample it inside a plate over the data, with .to_event "
                                   f"for the per-row dimensions, and size the plate by x)")
            total = total + lp
        return total

    def _setup(self, x: Tensor):
        """Checks the pair on a few rows of x once: the sites, how samples are batched, the
        likelihood, and whether the fused output layer reproduces the model's log p(x, z)."""
        x = x[:2]
        q = self.posterior(x)
        z = q.sample((2,))  # [2, B, Z]
        rows = z.reshape(-1, z.shape[-1])
        x_rows = x.repeat(2, *([1] * (x.dim() - 1)))
        try:  # Pyro's own vectorisation (as vectorize_particles): the samples as a plate at dim -2
            trace, _ = self._trace(x, z, True)
            self.vectorized = True
        except (ValueError, RuntimeError):
            trace, _ = self._trace(x_rows, rows, False)
            self.vectorized = False
        self._check_sites(trace)
        ref = None
        if self.vectorized:
            try:
                ref = self._site_log_probs(trace, (2, x.shape[0]))
            except (AdapterError, RuntimeError):
                self.vectorized = False
                trace, _ = self._trace(x_rows, rows, False)
        if ref is None:
            ref = self._site_log_probs(trace, (rows.shape[0],)).reshape(2, x.shape[0])
        obs = [getattr(s["fn"], "base_dist", s["fn"]) for s in _samples(trace) if s["is_observed"] and s["name"] != self.site]
        self.likelihood = ("bernoulli" if obs and all(isinstance(b, D.Bernoulli) for b in obs)
                           else "gaussian" if obs and all(isinstance(b, D.Normal) for b in obs) else "other")
        self._checked = True
        if self.decoder is not None and self.likelihood == "bernoulli" and len(obs) == 1 and self.vectorized:
            self._final = self._check_fused(x, z, ref)

    def _check_sites(self, trace):
        names = [s["name"] for s in _samples(trace)]
        if self.site not in names:
            raise AdapterError(f"from_pyro: the model has no sample site {self.site!r}, which the guide samples")
        other = [s["name"] for s in _samples(trace) if not s["is_observed"] and s["name"] != self.site]
        if other:
            raise AdapterError(f"from_pyro: the model has latent sites the guide does not sample: "
                               f"{', '.join(repr(n) for n in other)} (one local latent site only)")

    def _check_fused(self, x: Tensor, z: Tensor, ref: Tensor):
        final = last_linear(self.decoder, math.prod(x.shape[1:]))
        if final is None:
            return None
        self._final = final
        try:
            with torch.no_grad():
                mine = self._fused_log_joint(x, z)
        except (AdapterError, RuntimeError, ValueError):
            mine = None
        finally:
            self._final = None
        tol = 1e-4 if ref.dtype == torch.float32 else 1e-10
        if mine is None or mine.shape != ref.shape or not torch.allclose(mine, ref.to(mine.dtype), rtol=tol, atol=tol):
            return None
        return final

    def _fused_log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(z) from the model's latent site, log p(x|z) by the fused output layer from the
        decoder's last hidden layer (the model stops there)."""
        trace, h = self._trace(x, z, True, stop_at_output=True)
        site = trace.nodes[self.site]
        from .ops import bernoulli_log_prob
        return site["fn"].log_prob(site["value"]) + bernoulli_log_prob(
            h, self._final.weight, self._final.bias, x.reshape(x.shape[0], -1))

    @property
    def fused(self) -> bool:
        return self._final is not None

    # -- the protocol ---------------------------------------------------------------------------

    def posterior(self, x: Tensor) -> D.Distribution:
        site = self._guide_site(x)
        q = site["fn"]
        if len(q.event_shape) == 0 and len(q.batch_shape) == 2:
            q = D.Independent(q, 1)
        if tuple(q.batch_shape) != (x.shape[0],) or len(q.event_shape) != 1:
            raise AdapterError(f"from_pyro: the guide's site {site['name']!r} must have batch shape [B] = "
                               f"[{x.shape[0]}] and one event dimension (a local latent in a plate over the "
                               f"data, e.g. Normal(loc, scale).to_event(1)); it has batch shape "
                               f"{list(q.batch_shape)} and event shape {list(q.event_shape)}")
        self.site = site["name"]
        return q

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x, z) for x [B, D], z [S, B, Z]: the model run once for all S x B pairs."""
        if not self._checked:
            self._setup(x)
        lead = z.shape[:-1]
        zs = z.reshape(-1, *z.shape[-2:]) if z.dim() > 2 else z.unsqueeze(0)  # [S, B, Z]
        if self._final is not None:
            out = self._fused_log_joint(x, zs)
        elif self.vectorized:
            trace, _ = self._trace(x, zs, True)
            out = self._site_log_probs(trace, tuple(zs.shape[:-1]))
        else:
            rows = zs.reshape(-1, zs.shape[-1])
            xr = x.expand(zs.shape[0], *x.shape).reshape(rows.shape[0], *x.shape[1:])
            trace, _ = self._trace(xr, rows, False)
            out = self._site_log_probs(trace, (rows.shape[0],))
        return out.reshape(lead)


def _dist_name(fn) -> str:
    """Independent(Bernoulli) rather than Independent."""
    base = getattr(fn, "base_dist", None)
    return f"{type(fn).__name__}({_dist_name(base)})" if base is not None else type(fn).__name__


def _samples(trace) -> list[dict]:
    """The trace's sample sites, without the plates' subsample sites."""
    from pyro.poutine.util import site_is_subsample
    return [s for s in trace.nodes.values() if s["type"] == "sample" and not site_is_subsample(s)]


def from_pyro(model, guide, modules=(), decoder: nn.Module | None = None,
              example: Tensor | None = None) -> PyroModel:
    """A Pyro ``model(x)`` / ``guide(x)`` pair with one local latent site as a LatentVariableModel.

    The guide's single latent site gives q(z|x) (a reparameterisable distribution with batch
    shape [B] and event shape [Z]); log p(x, z) is the model's trace conditioned on z, run once
    for all S samples of a chunk at once: as Pyro's ``vectorize_particles`` does, with the
    samples as a plate at dim -2 around the model's data plate, or, for a model that cannot be
    vectorised so, on S x B data rows (its data plate sized by x). ``modules``: the networks the
    model and guide use (their ``nn.Module``s): they give the device and dtype, and are put in
    eval mode during evaluation. ``decoder``: the network whose output is the logits of the
    model's Bernoulli likelihood; where its last ``nn.Linear`` gives those logits (checked on
    the first data, against the model's own log p(x, z)), log p(x|z) is the package's fused
    output layer and the model runs only up to that layer. ``example``: a few data rows to check
    the pair now rather than at first use. Refused by name (:class:`AdapterError`): several
    latent sites in the guide, a latent site of the model the guide does not sample, a site that
    is not reparameterisable, and sites outside a plate over the data.
    """
    return PyroModel(model, guide, modules, decoder, example)
