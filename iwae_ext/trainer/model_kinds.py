"""Model kinds: what the training loop optimises, one class per ``TrainConfig.model``.

The loop (:mod:`iwae_ext.trainer.loop`) knows no model kind. For each minibatch it calls
``kind.loss(model, x, scale, noise)`` inside the step's keyed random streams and back-propagates
the loss; after the optimizer step it calls ``kind.update(aux, skipped)`` with ``skipped`` a device
float (1.0 when the step's update was skipped for a non-finite value), and at the end of an epoch
``kind.epoch_record(steps)``. A kind's own state (AIWAE's per-temperature step sizes) lives on the
device, is updated without reading anything back to the host, and is saved in checkpoints through
``state_dict`` / ``load_state_dict``.

A new kind is a subclass of :class:`ModelKind` registered with :func:`register`::

    @register("my_kind")
    class MyKind(ModelKind):
        def loss(self, model, x, scale, noise):
            bound = ...                  # [b] per data point, the training "bound" of the epoch
            return -bound.sum() * scale, bound.detach(), None

after which ``iwae_ext.train(model="my_kind")`` trains it (the command line's ``--model`` lists
the kinds registered when it starts).

``scale`` is world_size / global batch size: the summed per-point loss times ``scale``, averaged
over ranks by DistributedDataParallel, is the mean over the global batch, whatever the split.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..objectives import aiwae_step, objective

__all__ = ["ModelKind", "KINDS", "register", "BoundKind", "AIWAEKind", "AutoencoderKind",
           "AIWAE_STEP_INC", "AIWAE_STEP_DEC", "AIWAE_STEP_MIN", "AIWAE_STEP_MAX"]

KINDS: dict[str, type] = {}

# AIWAE: per-temperature step sizes move by these factors toward target_accept after each step
AIWAE_STEP_INC, AIWAE_STEP_DEC, AIWAE_STEP_MIN, AIWAE_STEP_MAX = 1.02, 0.98, 1e-4, 1.0


def register(name: str):
    """Class decorator: make a :class:`ModelKind` trainable as ``TrainConfig(model=name)``."""
    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, ModelKind)):
            raise TypeError(f"register({name!r}): expected a ModelKind subclass, got {cls!r}")
        cls.name = name
        KINDS[name] = cls
        return cls
    return deco


class ModelKind:
    """One model kind's objective (see the module docstring). Class attributes: ``random_weights``
    (what :class:`iwae_ext.models.VAE` draws: "none", "all", "encoder"), ``eval_k`` (the default
    L_k of the final evaluation), ``compilable`` (whether ``loss`` traces into one graph under
    torch.compile)."""

    name = "?"
    random_weights = "none"
    eval_k = 5000
    compilable = True
    unused_parameters = False  # parameters without a gradient (DistributedDataParallel must know)
    analytic_kl = False  # kl='analytic' applies (the one-layer VAE)

    def __init__(self, config, model, device: torch.device, n_train: int, world: int = 1):
        self.config, self.device, self.n_train, self.world = config, device, n_train, world

    @classmethod
    def check(cls, config):
        """Raise ValueError (naming the field) for settings this kind cannot train with; a
        subclass adds its own checks to these (``super().check(config)``)."""
        if config.kl == "analytic" and not (cls.analytic_kl and config.layers == 1):
            raise ValueError(f"kl='analytic' needs model='vae' with one stochastic layer, got model "
                             f"{config.model!r} with layers={config.layers}")
        if config.prior_std is not None and cls.random_weights == "none":
            raise ValueError(f"prior_std needs a model with random weights (iwaer, iwaer_rec), got "
                             f"model {config.model!r}")

    @classmethod
    def default_kl(cls, config) -> str:
        return "mc"

    def loss(self, model, x: Tensor, scale: float, noise) -> tuple[Tensor, Tensor, object]:
        """(loss to back-propagate, bound per data point [b] detached, aux for :meth:`ModelKind.update`)."""
        raise NotImplementedError

    def update(self, aux, skipped: Tensor):
        """After the optimizer step; ``skipped`` (a 0-dim float on the device) is 1.0 when the
        step's update was skipped (a non-finite value in it or an earlier step), else 0.0."""

    def describe(self) -> str:
        return self.name

    def epoch_record(self, steps: int) -> dict:
        """Extra fields of the epoch's metrics line (read back at the epoch's end)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass


def _need_one_layer(config, why: str):
    if config.layers != 1:
        raise ValueError(f"model {config.model!r} needs layers=1{why}")


class BoundKind(ModelKind):
    """A bound on log p(x) with an encoder-gradient estimator: the ELBO (vae) or the IWAE bound
    L_k (iwae, and iwaer / iwaer_rec with random weights, Hernandez-Lobato et al.); with ``prior_std`` the
    weights' KL / N is added per minibatch (full variational Bayes)."""

    bound_name = "iwae"

    def loss(self, model, x, scale, noise):
        c = self.config
        bound = objective(model, x, c.k, self.bound_name, c.estimator, c.kl, fused=c.fused)
        loss = -bound.sum() * scale
        if c.prior_std is not None:
            loss = loss + model.weight_kl(c.prior_std) / self.n_train
        return loss, bound.detach(), None

    def describe(self) -> str:
        return f"{self.bound_name} k={self.config.k} ({self.config.estimator})"


@register("vae")
class VAEKind(BoundKind):
    bound_name = "elbo"
    analytic_kl = True

    @classmethod
    def default_kl(cls, config) -> str:
        return "analytic" if (config.layers == 1 and config.estimator == "standard") else "mc"

    @classmethod
    def check(cls, config):
        super().check(config)
        if config.estimator == "dreg":
            raise ValueError("estimator 'dreg' is for the IWAE bound (model iwae, iwaer, iwaer_rec); "
                             "use 'stl' for the VAE")


@register("iwae")
class IWAEKind(BoundKind):
    pass


@register("iwaer")
class IWAERKind(IWAEKind):
    """Random encoder and decoder weights drawn per data point and sample (Hernandez-Lobato et al.)."""
    random_weights = "all"
    eval_k = 2000

    @classmethod
    def check(cls, config):
        super().check(config)
        _need_one_layer(config, " (random weights)")


@register("iwaer_rec")
class IWAERRecKind(IWAERKind):
    """Random encoder weights only (Hernandez-Lobato et al.'s IWAER_rec)."""
    random_weights = "encoder"


@register("ae")
class AutoencoderKind(ModelKind):
    """A vanilla autoencoder on squared error (encoder mean -> decoder mean; Kingma and Welling; Nicholson et al., section 5);
    its "bound" is minus the error."""

    unused_parameters = True  # the encoder's log-variance head

    @classmethod
    def check(cls, config):
        super().check(config)
        _need_one_layer(config, "")

    def loss(self, model, x, scale, noise):
        from ..evaluate import squared_error
        bound = -squared_error(model, x)
        return -bound.sum() * scale, bound.detach(), None

    def describe(self) -> str:
        return f"squared_error k={self.config.k} ({self.config.estimator})"


@register("aiwae")
class AIWAEKind(ModelKind):
    """Annealed importance weights (Ding and Freedman, Algorithm 1): the decoder on the AIS-weighted
    log p(x, z) of K chains from q(z|x), the encoder on the ELBO, each part its own gradient from
    one backward pass; per-temperature step sizes adapted on the device toward ``target_accept``
    from the acceptance of the whole global batch."""

    compilable = False  # T x L leapfrog steps would unroll into one enormous graph

    @classmethod
    def check(cls, config):
        super().check(config)
        _need_one_layer(config, " (the hand-written HMC gradient)")
        if config.estimator != "standard":
            raise ValueError("model 'aiwae' trains its encoder on the ELBO with the standard "
                             f"estimator; got estimator {config.estimator!r}")
        if not 0 < config.target_accept < 1:
            raise ValueError(f"target_accept must be in (0, 1), got {config.target_accept!r}")
        s = config.hmc_step_size
        if not (isinstance(s, (int, float)) and AIWAE_STEP_MIN <= s <= AIWAE_STEP_MAX):
            raise ValueError(f"hmc_step_size must be in [{AIWAE_STEP_MIN}, {AIWAE_STEP_MAX}], got {s!r}")

    def __init__(self, config, model, device, n_train, world=1):
        super().__init__(config, model, device, n_train, world)
        from ..samplers import linear_schedule
        self.betas = linear_schedule(config.temps)
        self.step_sizes = torch.full((config.temps - 1,), float(config.hmc_step_size), dtype=torch.float64,
                                     device=device)
        self.accept_sum = torch.zeros(config.temps - 1, dtype=torch.float64, device=device)

    def loss(self, model, x, scale, noise):
        c = self.config
        a = aiwae_step(model, x, c.k, self.betas, c.leapfrog, self.step_sizes, generator=noise.keyed("aiwae"),
                       encoder_only_elbo=True)
        # decoder_loss and encoder_loss are means over this rank's b points: back to sums, scaled
        b = x.shape[0]
        accepted = a.acceptance * (b * c.k)  # accepted transitions per temperature on this rank
        chains = c.k * round(self.world / scale)  # chains per temperature in the global batch
        return (a.decoder_loss + a.encoder_loss) * (b * scale), a.bound.detach(), (accepted, chains)

    def update(self, aux, skipped: Tensor):
        accepted, chains = aux
        ok = skipped == 0
        if self.world > 1:
            torch.distributed.all_reduce(accepted)
        acceptance = accepted / chains
        self.accept_sum += torch.where(ok, acceptance, 0.0)
        adapted = torch.where(acceptance > self.config.target_accept, self.step_sizes * AIWAE_STEP_INC,
                              self.step_sizes * AIWAE_STEP_DEC).clamp_(AIWAE_STEP_MIN, AIWAE_STEP_MAX)
        self.step_sizes = torch.where(ok, adapted, self.step_sizes)

    def describe(self) -> str:
        c = self.config
        return f"aiwae k={c.k} T={c.temps} L={c.leapfrog}"

    def epoch_record(self, steps: int) -> dict:
        record = {"hmc_acceptance": [round(v, 4) for v in (self.accept_sum / steps).tolist()],
                  "hmc_step_sizes": [round(v, 5) for v in self.step_sizes.tolist()]}
        self.accept_sum.zero_()
        return record

    def state_dict(self) -> dict:
        return {"hmc_step_sizes": self.step_sizes.cpu(), "accept_sum": self.accept_sum.cpu()}

    def load_state_dict(self, state: dict):
        self.step_sizes = state["hmc_step_sizes"].to(self.device)
        self.accept_sum = state["accept_sum"].to(self.device)
