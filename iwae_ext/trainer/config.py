"""The definition of a training run: :class:`TrainConfig` and the IWAE paper's learning-rate
schedule (:func:`burda_schedule`)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .._checks import check_choice
from ..data import Dataset
from ..objectives import ESTIMATORS, KL_ESTIMATORS

__all__ = ["TrainConfig", "burda_schedule", "RESUMABLE", "BURDA_STAGES", "DTYPES", "PRECISIONS"]

# TrainConfig fields that a resumed run may change (the rest define the run). ``compile`` and
# ``device`` (and ``flush_denormal``) change only the rounding: a resume is bit for bit when they
# stay the same.
RESUMABLE = ("epochs", "device", "progress", "eval_k", "eval_batch_size", "train_eval_size",
             "data_dir", "download", "compile", "sync_every", "flush_denormal", "tensorboard")
BURDA_STAGES = 8  # stage i = 0..7: 3^i passes at lr 1e-3 * 10^(-i/7)
DTYPES = ("float32", "float64")
PRECISIONS = ("float32", "bf16", "tf32")  # the training step's matrix products (docs/training.rst)


@dataclass
class TrainConfig:
    """Everything that defines a run. Defaults: IWAE k = 5, 784-200-200-50 tanh, bundled
    binarized MNIST, batch 100, 30 epochs at lr 1e-3, L_5000 on the test split."""

    model: str = "iwae"  # a registered model kind (iwae_ext.trainer.model_kinds.KINDS): "vae" (ELBO),
    # "iwae" (IWAE bound L_k), "iwaer" / "iwaer_rec" (Hernandez-Lobato et al.), "aiwae" (Ding and Freedman), "ae" (a
    # vanilla autoencoder on squared error: encoder mean -> decoder mean; Kingma and Welling, section 5 of the reproduction by Nicholson et al.)
    k: int = 5  # importance samples per data point in training
    layers: int = 1  # stochastic layers
    hidden: list | None = None  # per layer, e.g. [[200, 200]] (one layer) or [[200, 200], [100, 100]]
    latent_dim: list | None = None  # e.g. [50] or [100, 50]
    activation: str = "tanh"
    # the hidden widths of p(x|z1)'s MLP, from z1 toward x, e.g. [500]; default: the mirror of
    # the first encoder's (hidden[0] reversed). Lets an encoder be deeper than its decoder.
    decoder_hidden: list | None = None
    decoder: str | None = None  # "bernoulli" / "gaussian"; default: what the data set suits
    dataset: str = "binarized_mnist"
    data_dir: str | None = None
    download: bool = False
    batch_size: int = 100
    epochs: int = 30
    schedule: str | None = None  # None: constant lr; "burda": 3^i passes at 1e-3 * 10^(-i/7)
    lr: float = 1e-3
    weight_decay: float = 0.0  # an l2 penalty (weight_decay / 2) ||theta||^2 on every parameter (Adam's weight_decay)
    estimator: str = "standard"  # "standard", "stl", "dreg"
    kl: str | None = None  # "mc" or "analytic"; default analytic for a one-layer VAE, else mc
    prior_std: float | None = None  # random weights: N(0, s^2) prior, KL/N per minibatch
    rho_init: float = -5.0  # random weights: initial rho, sigma = softplus(rho)
    temps: int = 5  # AIWAE: inverse temperatures T, beta_t = t / (T - 1)
    leapfrog: int = 5  # AIWAE: leapfrog steps per HMC transition
    target_accept: float = 0.6  # AIWAE: acceptance the per-temperature step sizes adapt toward
    hmc_step_size: float = 0.1  # AIWAE: initial step size of every temperature
    init_from: str | None = None  # a run / checkpoint of the same architecture to start from
    eval_k: int | None = None  # default 5000; 2000 for iwaer / iwaer_rec (Hernandez-Lobato et al.)
    eval_batch_size: int = 100
    train_eval_size: int = 2000  # training images for train_log_likelihood (0: all)
    # every this many epochs (0: never) the test split's ELBO and L_k (k the training k, keyed draws)
    # go into the epoch's record as test_elbo / test_bound: learning curves on held-out data
    test_every: int = 0
    subset: int = 0  # > 0: train and test on this many images of each split (smoke tests)
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    resume: bool = False
    progress: bool = True
    fused: bool = True  # False: pure PyTorch for logmeanexp and the decoder output layer (comparisons)
    compile: bool | None = None  # the training step under torch.compile; None: where it is faster
    dtype: str = "float32"  # "float32" or "float64" (parameters, data and arithmetic)
    # the training step's matrix products: "float32" (the dtype's), "bf16" (bfloat16 autocast:
    # float32 master weights, Adam, log-weights, bounds and reductions) or "tf32" (CUDA)
    precision: str = "float32"
    sync_every: int = 100  # steps between the loop's read-backs to the host (non-finite check, stops)
    flush_denormal: bool = True  # CPU: subnormal floats as zero while training (as TensorFlow does)
    # a directory for TensorBoard event files (rank 0; iwae_ext.trainer.tensorboard): the training
    # bound, learning rate and step time per epoch, the test curve and the final metrics
    tensorboard: str | None = None
    # set by train(encoder_net=..., decoder_net=...): the user's networks, described (classes, latent size,
    # likelihood, input shape); their code is not saved, so resuming or loading needs them again
    networks: dict | None = None

    def resolved(self, dataset: Dataset) -> "TrainConfig":
        """A copy with defaults filled in and every field checked (errors name the field)."""
        c = dataclasses.replace(self)
        from .model_kinds import KINDS
        check_choice("model", c.model, tuple(KINDS))
        kind = KINDS[c.model]
        if c.layers not in (1, 2):
            raise ValueError(f"layers must be 1 or 2, got {c.layers!r}")
        if c.eval_k is None:
            c.eval_k = kind.eval_k
        check_choice("dtype", c.dtype, DTYPES)
        check_choice("precision", c.precision, PRECISIONS)
        if c.precision != "float32" and c.dtype != "float32":
            raise ValueError(f"precision {c.precision!r} lowers float32 matrix products; dtype is {c.dtype!r}")
        if c.precision == "bf16" and c.model == "aiwae":
            raise ValueError("precision 'bf16': the aiwae model's HMC sampler runs in the model's dtype; "
                             "train it with precision 'float32'")
        if c.compile not in (None, True, False):
            raise ValueError(f"compile must be True, False or None (where faster), got {c.compile!r}")
        for name in ("k", "batch_size", "eval_k", "eval_batch_size", "sync_every"):
            v = getattr(c, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(c.epochs, int) or c.epochs < 0:
            raise ValueError(f"epochs must be a non-negative integer, got {c.epochs!r}")
        if not isinstance(c.subset, int) or c.subset < 0:
            raise ValueError(f"subset must be a non-negative integer, got {c.subset!r}")
        if c.train_eval_size < 0:
            raise ValueError(f"train_eval_size must be >= 0, got {c.train_eval_size}")
        if not (isinstance(c.lr, (int, float)) and math.isfinite(c.lr) and c.lr > 0):
            raise ValueError(f"lr must be a positive number, got {c.lr!r}")
        if c.schedule not in (None, "burda"):
            raise ValueError(f"schedule must be None or 'burda', got {c.schedule!r}")
        if c.schedule == "burda":
            c.epochs = sum(3 ** i for i in range(BURDA_STAGES))
        check_choice("estimator", c.estimator, ESTIMATORS)
        c.hidden = [list(h) for h in (c.hidden or ([[200, 200]] if c.layers == 1 else [[200, 200], [100, 100]]))]
        if len(c.hidden) == 1 and c.layers == 2:
            raise ValueError("hidden gives one layer's widths but layers=2: give both, e.g. "
                             "--hidden 200,200/100,100")
        c.latent_dim = list(c.latent_dim or ([50] if c.layers == 1 else [100, 50]))
        if len(c.hidden) != c.layers or len(c.latent_dim) != c.layers:
            raise ValueError(f"hidden {c.hidden} and latent_dim {c.latent_dim} must each give "
                             f"{c.layers} layer(s)")
        c.decoder = c.decoder or dataset.likelihood
        check_choice("decoder", c.decoder, ("bernoulli", "gaussian"))
        if c.decoder_hidden is not None:
            ok = isinstance(c.decoder_hidden, (list, tuple)) and all(
                isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in c.decoder_hidden)
            if not ok:
                raise ValueError(f"decoder_hidden must be a list of positive widths (e.g. [500]), "
                                 f"got {c.decoder_hidden!r}")
            c.decoder_hidden = list(c.decoder_hidden)
        if not (isinstance(c.weight_decay, (int, float)) and math.isfinite(c.weight_decay)
                and c.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {c.weight_decay!r}")
        if not isinstance(c.test_every, int) or isinstance(c.test_every, bool) or c.test_every < 0:
            raise ValueError(f"test_every must be an integer >= 0 (epochs; 0: never), got {c.test_every!r}")
        if c.test_every and c.model == "ae":
            raise ValueError("test_every: the ae model has no bound to follow (its metrics.json has the "
                             "test reconstruction error)")
        if c.decoder == "bernoulli" and dataset.binarization == "none" and dataset.likelihood != "bernoulli":
            raise ValueError(f"decoder 'bernoulli' needs binary data; data set {dataset.name!r} is "
                             f"continuous: use --decoder gaussian")
        if c.kl is None:
            c.kl = kind.default_kl(c)
        check_choice("kl", c.kl, KL_ESTIMATORS)
        if c.prior_std is not None and not (isinstance(c.prior_std, (int, float)) and c.prior_std > 0):
            raise ValueError(f"prior_std must be a positive number, got {c.prior_std!r}")
        for name in ("temps", "leapfrog"):
            v = getattr(c, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (2 if name == "temps" else 1):
                raise ValueError(f"{name} must be an integer >= {2 if name == 'temps' else 1}, got {v!r}")
        if c.networks is not None:
            if not isinstance(c.networks, dict) or c.networks.get("class") != "NetworkVAE":
                raise ValueError("networks is set by train(encoder_net=..., decoder_net=...), not by hand")
            if c.model not in ("vae", "iwae"):
                raise ValueError(f"model {c.model!r} needs the package's MLPs (its objective reaches into "
                                 f"their layers); the user's own encoder and decoder train as 'vae' or 'iwae'")
            if c.layers != 1:
                raise ValueError("the user's own encoder and decoder make one stochastic layer: layers=1")
            if c.init_from:
                raise ValueError("init_from copies the package's MLPs; with your own networks, load their "
                                 "weights before passing them to train()")
        kind.check(c)  # what the model kind itself needs (errors name the field)
        if c.tensorboard is not None:
            if not isinstance(c.tensorboard, str) or not c.tensorboard:
                raise ValueError(f"tensorboard must be a directory name (or None), got {c.tensorboard!r}")
            from .tensorboard import check_available
            check_available("tensorboard")
        if not math.isfinite(c.rho_init):
            raise ValueError(f"rho_init must be finite, got {c.rho_init!r}")
        return c

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def burda_schedule(epoch: int) -> float:
    """Learning rate of epoch ``epoch`` (0-based) in the IWAE paper's schedule."""
    start = 0
    for i in range(BURDA_STAGES):
        if epoch < start + 3 ** i:
            return 1e-3 * 10 ** (-i / 7)
        start += 3 ** i
    return 1e-3 * 10 ** (-(BURDA_STAGES - 1) / 7)


