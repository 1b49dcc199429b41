"""The peers' models, built the way their users build them: a pythae IWAE with a user's encoder
and decoder (pythae's BaseEncoder / BaseDecoder returning ModelOutput), and a Pyro VAE as a
model / guide pair, both MLPs of the same shape, trained with their own library's objective.
Used by benchmarks/bench_peers.py and tests/test_adapters.py; each function imports its peer
library when called."""
from __future__ import annotations

import torch
from torch import nn


def mlp(sizes: list[int], last=None) -> nn.Sequential:
    """Linear layers of ``sizes`` with tanh between them (and ``last`` after the final one)."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    if last is not None:
        layers.append(last)
    return nn.Sequential(*layers)


def pythae_iwae(hidden=(200, 200), latent=50, k=5, data_dim=784, input_dim=(1, 28, 28),
                reconstruction_loss="bce"):
    """A pythae IWAE (k samples in training) with the user's MLP encoder and decoder."""
    from pythae.models import IWAE, IWAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    class Encoder(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.body = mlp([data_dim, *hidden], nn.Tanh())
            self.loc = nn.Linear(hidden[-1], latent)
            self.log_var = nn.Linear(hidden[-1], latent)

        def forward(self, x):
            h = self.body(x.reshape(x.shape[0], -1))
            return ModelOutput(embedding=self.loc(h), log_covariance=self.log_var(h))

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.net = mlp([latent, *reversed(hidden), data_dim],
                           nn.Sigmoid() if reconstruction_loss == "bce" else None)

        def forward(self, z):
            return ModelOutput(reconstruction=self.net(z).reshape(z.shape[0], *input_dim))

    config = IWAEConfig(input_dim=input_dim, latent_dim=latent, reconstruction_loss=reconstruction_loss,
                        number_samples=k)
    return IWAE(config, encoder=Encoder(), decoder=Decoder())


def train_pythae(model, x: torch.Tensor, epochs: int, batch_size: int = 100, lr: float = 1e-3, seed: int = 0,
                 input_dim=(1, 28, 28)):
    """pythae's own loss (model.forward(...).loss), Adam: what its trainer does, without its files."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch_size):
            out = model({"data": x[perm[i:i + batch_size]].reshape(-1, *input_dim)})
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    return model.eval()


class PyroVAE(nn.Module):
    """A Pyro VAE: ``model(x)`` (z ~ N(0, I), x | z ~ Bernoulli(logits = decoder(z))) and
    ``guide(x)`` (z ~ N(loc, softplus(.))), each in a plate over the data."""

    def __init__(self, hidden=(200, 200), latent=50, data_dim=784):
        super().__init__()
        self.latent = latent
        self.body = mlp([data_dim, *hidden], nn.Tanh())
        self.loc = nn.Linear(hidden[-1], latent)
        self.scale = nn.Linear(hidden[-1], latent)
        self.decoder = mlp([latent, *reversed(hidden), data_dim])

    def model(self, x):
        import pyro
        import pyro.distributions as dist
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            zero = x.new_zeros(x.shape[0], self.latent)
            z = pyro.sample("z", dist.Normal(zero, torch.ones_like(zero)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        import pyro
        import pyro.distributions as dist
        pyro.module("encoder", nn.ModuleList([self.body, self.loc, self.scale]))
        with pyro.plate("data", x.shape[0]):
            h = self.body(x)
            pyro.sample("z", dist.Normal(self.loc(h), nn.functional.softplus(self.scale(h)) + 1e-4).to_event(1))


def train_pyro(vae: PyroVAE, x: torch.Tensor, epochs: int, batch_size: int = 100, lr: float = 1e-3,
               seed: int = 0, k: int = 1) -> PyroVAE:
    """SVI with Pyro's Adam: Trace_ELBO (k = 1) or RenyiELBO(alpha=0, k) (the IWAE bound)."""
    import pyro
    from pyro.infer import SVI, RenyiELBO, Trace_ELBO
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    loss = Trace_ELBO() if k == 1 else RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True,
                                                    max_plate_nesting=1)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": lr}), loss)
    g = torch.Generator().manual_seed(seed)
    vae.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch_size):
            svi.step(x[perm[i:i + batch_size]])
    return vae.eval()


def pythae_nll(model, x: torch.Tensor, k: int, input_dim=(1, 28, 28), batch_size: int | None = None) -> torch.Tensor:
    """pythae's own ``get_nll``, image by image (``batch_size`` samples per call; default all k):
    its L_k per image [N] (float64)."""
    with torch.no_grad():
        return torch.tensor([model.get_nll(x[i:i + 1].reshape(1, *input_dim), n_samples=k, batch_size=batch_size or k)
                             for i in range(x.shape[0])], dtype=torch.float64)


def pyro_renyi(vae: PyroVAE, x: torch.Tensor, k: int) -> torch.Tensor:
    """Pyro's RenyiELBO(alpha=0, k) bound, image by image (its bound is of the whole batch's
    likelihood, so one image per call is the per-image L_k): [N] (float64)."""
    import pyro
    from pyro.infer import RenyiELBO
    elbo = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad(), pyro.validation_enabled(False):
        return torch.tensor([-elbo.loss(vae.model, vae.guide, x[i:i + 1]) for i in range(x.shape[0])],
                            dtype=torch.float64)
