"""The trainer: ``iwae_ext.train(...)`` (argument parsing lives in :mod:`iwae_ext.cli`).

One run: load the data set, build the model, train with Adam (beta 0.9, 0.999, eps 1e-4) on the
IWAE bound or the ELBO, checkpoint atomically after every epoch (and when asked to stop), then
evaluate L_{eval_k} on the whole test split, the ELBO, the train log-likelihood, active units
and the reconstruction error. ``out`` receives ``checkpoint.pt`` (loads with
``weights_only=True``), ``metrics.jsonl`` (one line per epoch) and ``metrics.json``.

Resuming (``resume=True``) continues exactly: model, optimizer, epoch permutation, position in the
epoch and every random-number state are restored, so a stopped and resumed run ends bit for bit
where an uninterrupted one ends (on the CPU). SIGINT/SIGTERM stop a run at the next step
boundary after writing a checkpoint; a second SIGINT stops at once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field

import torch

from .._checks import check_choice
from ..data import DATASETS, Dataset, load_dataset
from ..models import VAE
from ..objectives import ESTIMATORS, KL_ESTIMATORS, aiwae_step, objective

__all__ = ["TrainConfig", "train", "load_checkpoint", "NonFiniteLossError", "CorruptCheckpointError",
           "burda_schedule", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "iwae_ext.checkpoint/1"
MODELS = ("vae", "iwae", "iwaer", "iwaer_rec", "aiwae", "ae")
# model -> (objective, random weights)
_MODEL_KIND = {"vae": ("elbo", "none"), "iwae": ("iwae", "none"), "iwaer": ("iwae", "all"),
               "iwaer_rec": ("iwae", "encoder"), "aiwae": ("aiwae", "none"), "ae": ("squared_error", "none")}
# AIWAE: per-temperature step sizes move by these factors toward target_accept after each step
AIWAE_STEP_INC, AIWAE_STEP_DEC, AIWAE_STEP_MIN, AIWAE_STEP_MAX = 1.02, 0.98, 1e-4, 1.0
# TrainConfig fields that a resumed run may change (the rest define the run).
RESUMABLE = ("epochs", "device", "progress", "eval_k", "eval_batch_size", "train_eval_size",
             "data_dir", "download")
BURDA_STAGES = 8  # stage i = 0..7: 3^i passes at lr 1e-3 * 10^(-i/7)


class NonFiniteLossError(RuntimeError):
    """Training met a NaN or infinite loss; the last good checkpoint is kept."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read, is not an iwae_ext checkpoint, or whose tensors no
    longer match the digest written with them."""


@dataclass
class TrainConfig:
    """Everything that defines a run. Defaults: IWAE k = 5, 784-200-200-50 tanh, bundled
    binarized MNIST, batch 100, 30 epochs at lr 1e-3, L_5000 on the test split."""

    model: str = "iwae"  # "vae" (ELBO), "iwae" (IWAE bound L_k), "iwaer" / "iwaer_rec" (paper 000), "aiwae" (paper 004),
    # "ae" (a vanilla autoencoder on squared error: encoder mean -> decoder mean; paper 003 section 5)
    k: int = 5  # importance samples per data point in training
    layers: int = 1  # stochastic layers
    hidden: list | None = None  # per layer, e.g. [[200, 200]] (one layer) or [[200, 200], [100, 100]]
    latent_dim: list | None = None  # e.g. [50] or [100, 50]
    activation: str = "tanh"
    decoder: str | None = None  # "bernoulli" / "gaussian"; default: what the data set suits
    dataset: str = "binarized_mnist"
    data_dir: str | None = None
    download: bool = False
    batch_size: int = 100
    epochs: int = 30
    schedule: str | None = None  # None: constant lr; "burda": 3^i passes at 1e-3 * 10^(-i/7)
    lr: float = 1e-3
    estimator: str = "standard"  # "standard", "stl", "dreg"
    kl: str | None = None  # "mc" or "analytic"; default analytic for a one-layer VAE, else mc
    prior_std: float | None = None  # random weights: N(0, s^2) prior, KL/N per minibatch
    rho_init: float = -5.0  # random weights: initial rho, sigma = softplus(rho)
    temps: int = 5  # AIWAE: inverse temperatures T, beta_t = t / (T - 1)
    leapfrog: int = 5  # AIWAE: leapfrog steps per HMC transition
    target_accept: float = 0.6  # AIWAE: acceptance the per-temperature step sizes adapt toward
    hmc_step_size: float = 0.1  # AIWAE: initial step size of every temperature
    init_from: str | None = None  # a run / checkpoint of the same architecture to start from
    eval_k: int | None = None  # default 5000; 2000 for iwaer / iwaer_rec (paper 000)
    eval_batch_size: int = 100
    train_eval_size: int = 2000  # training images for train_log_likelihood (0: all)
    subset: int = 0  # > 0: train and test on this many images of each split (smoke tests)
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    resume: bool = False
    progress: bool = True
    fused: bool = True  # False: the pure-PyTorch twin of logmeanexp (for comparisons)

    def resolved(self, dataset: Dataset) -> "TrainConfig":
        """A copy with defaults filled in and every field checked (errors name the field)."""
        c = dataclasses.replace(self)
        check_choice("model", c.model, MODELS)
        if c.layers not in (1, 2):
            raise ValueError(f"layers must be 1 or 2, got {c.layers!r}")
        if c.eval_k is None:
            c.eval_k = 2000 if c.model in ("iwaer", "iwaer_rec") else 5000
        for name in ("k", "batch_size", "eval_k", "eval_batch_size"):
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
        if c.decoder == "bernoulli" and dataset.binarization == "none" and dataset.likelihood != "bernoulli":
            raise ValueError(f"decoder 'bernoulli' needs binary data; data set {dataset.name!r} is "
                             f"continuous: use --decoder gaussian")
        if c.kl is None:
            c.kl = "analytic" if (c.model == "vae" and c.layers == 1 and c.estimator == "standard") else "mc"
        check_choice("kl", c.kl, KL_ESTIMATORS)
        if c.kl == "analytic" and (c.model != "vae" or c.layers != 1):
            raise ValueError("kl='analytic' needs model='vae' with one stochastic layer")
        if c.estimator == "dreg" and c.model == "vae":
            raise ValueError("estimator 'dreg' is for the IWAE bound (model iwae, iwaer, iwaer_rec); "
                             "use 'stl' for the VAE")
        if c.model in ("iwaer", "iwaer_rec") and c.layers != 1:
            raise ValueError(f"model {c.model!r} (random weights) needs layers=1")
        if c.prior_std is not None and (c.model not in ("iwaer", "iwaer_rec") or not c.prior_std > 0):
            raise ValueError(f"prior_std needs a model with random weights (iwaer, iwaer_rec) and a "
                             f"positive value, got model {c.model!r}, prior_std {c.prior_std!r}")
        if c.model == "ae" and c.layers != 1:
            raise ValueError("model 'ae' needs layers=1")
        if c.model == "aiwae":
            if c.layers != 1:
                raise ValueError("model 'aiwae' needs layers=1 (the hand-written HMC gradient)")
            if c.estimator != "standard":
                raise ValueError("model 'aiwae' trains its encoder on the ELBO with the standard "
                                 f"estimator; got estimator {c.estimator!r}")
        for name in ("temps", "leapfrog"):
            v = getattr(c, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (2 if name == "temps" else 1):
                raise ValueError(f"{name} must be an integer >= {2 if name == 'temps' else 1}, got {v!r}")
        if not 0 < c.target_accept < 1:
            raise ValueError(f"target_accept must be in (0, 1), got {c.target_accept!r}")
        if not (math.isfinite(c.hmc_step_size) and AIWAE_STEP_MIN <= c.hmc_step_size <= AIWAE_STEP_MAX):
            raise ValueError(f"hmc_step_size must be in [{AIWAE_STEP_MIN}, {AIWAE_STEP_MAX}], got {c.hmc_step_size!r}")
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


def _device(name: str) -> torch.device:
    if name == "auto":
        import iwae_ext
        cuda = torch.cuda.is_available() and iwae_ext.build_info()["cuda_kernels"]
        return torch.device("cuda" if cuda else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA device is visible")
    return dev


def build_model(config: TrainConfig, dataset: Dataset) -> VAE:
    return VAE(dataset.x_dim, config.latent_dim, config.hidden, config.activation, config.decoder,
               x_mean=dataset.mean("train"), random_weights=_MODEL_KIND[config.model][1],
               rho_init=config.rho_init)


def _init_from(model: VAE, path: str) -> VAE:
    """The model's parameters from a trained run: copied, or (deterministic run, random-weight
    model) used as the means of the random weights."""
    source = load_checkpoint(path)
    arch = ("x_dim", "latent_dims", "hidden", "activation", "likelihood")
    if any(source.config[k] != model.config[k] for k in arch):
        raise ValueError(f"init_from {path}: the run's architecture "
                         f"{ {k: source.config[k] for k in arch} } differs from this model's "
                         f"{ {k: model.config[k] for k in arch} }")
    if source.random_weights == model.random_weights:
        model.load_state_dict(source.state_dict())
        return model
    return VAE.from_deterministic(source, model.random_weights, model.config["rho_init"])


def _with_digest(ckpt: dict) -> dict:
    ckpt["digest"] = _state_digest(ckpt)
    return ckpt


def _save_atomic(obj, path: str):
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _state_digest(ckpt: dict) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor of the model and optimizer
    states (in a fixed order): what a checkpoint's "digest" entry records."""
    h = hashlib.sha256()

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"{prefix}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for key in sorted(obj, key=str):
                walk(f"{prefix}/{key}", obj[key])
        elif isinstance(obj, (list, tuple)):
            for i, item in enumerate(obj):
                walk(f"{prefix}/{i}", item)
        else:
            h.update(f"{prefix}={obj!r};".encode())

    walk("model", ckpt["model_state"])
    walk("optimizer", ckpt.get("optimizer_state", {}))
    return h.hexdigest()


def _read_checkpoint(path: str, map_location="cpu") -> dict:
    """A checkpoint file's dict, loaded with weights_only=True, its format checked and its tensors
    verified against the digest written with them (CorruptCheckpointError otherwise)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch's message would advise weights_only=False: never for a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptCheckpointError(
            f"{path} is not a readable iwae_ext checkpoint ({type(e).__name__}: {first[:200]}); "
            f"it may be truncated or another kind of file. Use an earlier checkpoint or train again"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CorruptCheckpointError(f"{path} is not an iwae_ext checkpoint (format {CHECKPOINT_FORMAT})")
    want = ckpt.get("digest")
    if want is None:
        warnings.warn(f"{path} was written without a digest (an older iwae_ext); its tensors are not "
                      f"verified", stacklevel=3)
    elif _state_digest(ckpt) != want:
        raise CorruptCheckpointError(
            f"{path} is corrupt: its tensors do not match the sha256 digest written with them "
            f"(bytes changed on disk after it was saved). Use an earlier checkpoint or train again")
    return ckpt


def load_checkpoint(path: str, map_location="cpu", with_state: bool = False):
    """The model of a training run's checkpoint (in eval mode), loaded with weights_only=True.

    ``with_state=True`` returns (model, checkpoint dict) instead.
    """
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    ckpt = _read_checkpoint(path, map_location)
    cfg = ckpt["model_config"]
    model = VAE(**cfg)
    model.load_state_dict(ckpt["model_state"])
    model.eval()
    return (model, ckpt) if with_state else model


class _StopFlag:
    """Set by SIGINT/SIGTERM (or a user callback); checked at step boundaries."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\niwae_ext.train: {signal.Signals(signum).name} received; stopping after this step "
              f"with a checkpoint (press Ctrl-C again to stop at once)", flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _rng_state(device: torch.device, data_gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device, data_gen: torch.Generator):
    torch.set_rng_state(state["torch"])
    data_gen.set_state(state["data"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _subset(dataset: Dataset, n: int, seed: int) -> Dataset:
    """n images of each split, a seeded random choice (never a prefix: test splits can be sorted)."""
    gen = torch.Generator().manual_seed(seed)
    splits = {name: x[torch.randperm(x.shape[0], generator=gen)[:n]] for name, x in dataset.splits.items()}
    return Dataset(dataset.name, splits, dataset.image_shape, dataset.binarization, dataset.likelihood,
                   dict(dataset.info, subset=n))


def train(config: TrainConfig | None = None, should_stop=None, data: Dataset | None = None,
          **overrides) -> dict:
    """Train (and evaluate) one model; returns the final metrics (also in ``out/metrics.json``).

    ``config`` or keyword overrides of :class:`TrainConfig` fields. With ``resume=True`` the
    saved run's config is used and only the keyword overrides in ``RESUMABLE`` (e.g. a larger
    ``epochs``) may change it. ``should_stop()``, if given, is polled at every step boundary;
    when it returns True the run checkpoints and returns {"stopped": True, ...} (as on SIGINT).
    ``data``: a :class:`~iwae_ext.data.Dataset` to train on instead of loading
    ``config.dataset`` (pass it again to resume). Raises :class:`NonFiniteLossError` on a NaN
    or infinite loss, keeping the last good checkpoint.
    """
    from .. import evaluate  # lazily: `python -m iwae_ext.evaluate` must find it unimported
    config = dataclasses.replace(config or TrainConfig(), **overrides)
    out = config.out
    ckpt = None
    if config.resume:
        if not out:
            raise ValueError("resume=True needs out (the run directory to resume)")
        path = os.path.join(out, "checkpoint.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resume: no checkpoint at {path}")
        ckpt = _read_checkpoint(path)
        saved = dict(ckpt["config"])
        # The run's definition is the saved one; on resume only these may change.
        for name, value in overrides.items():
            if name in RESUMABLE:
                saved[name] = value
            elif name not in ("out", "resume") and value != saved.get(name):
                raise ValueError(f"resume: {name} cannot change when resuming (the run has "
                                 f"{saved.get(name)!r}, got {value!r}); start a new run instead")
        saved.update(out=out, resume=True)
        config = TrainConfig(**saved)
    elif out and os.path.exists(os.path.join(out, "checkpoint.pt")):
        raise FileExistsError(f"{out} already holds a run (checkpoint.pt): pass resume=True / --resume "
                              f"to continue it, or choose another out directory")

    if data is not None:
        if not isinstance(data, Dataset):
            raise TypeError(f"data must be an iwae_ext.data.Dataset, got {type(data).__name__}")
        dataset = data
        config = dataclasses.replace(config, dataset=data.name)
    else:
        dataset = load_dataset(config.dataset, config.data_dir, config.download)
    if config.subset:
        dataset = _subset(dataset, config.subset, config.seed)
    config = config.resolved(dataset)
    device = _device(config.device)
    torch.manual_seed(config.seed)
    data_gen = torch.Generator().manual_seed(config.seed + 1)
    model = build_model(config, dataset)
    if config.init_from and ckpt is None:
        model = _init_from(model, config.init_from)
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.999), eps=1e-4)
    objective_name = _MODEL_KIND[config.model][0]

    epoch, step, perm, sums, history, train_seconds = 0, 0, None, [0.0, 0], [], 0.0
    aiwae = config.model == "aiwae"
    if aiwae:
        from ..samplers import linear_schedule
        betas = linear_schedule(config.temps)
        hmc_steps = torch.full((config.temps - 1,), config.hmc_step_size, dtype=torch.float64, device=device)
        accept_sum = torch.zeros(config.temps - 1, dtype=torch.float64, device=device)
        enc_params = list(model.encoders.parameters())
        dec_params = [p for p in model.parameters() if all(p is not q for q in enc_params)]
    if ckpt is not None:
        model.load_state_dict(ckpt["model_state"])
        opt.load_state_dict(ckpt["optimizer_state"])
        st = ckpt["train_state"]
        epoch, step, perm = st["epoch"], st["step"], st["perm"]
        sums, train_seconds = [st["bound_sum"], st["bound_count"]], st["train_seconds"]
        history = list(ckpt.get("history", []))
        _set_rng_state(st["rng"], device, data_gen)
        if aiwae:
            hmc_steps = st["hmc_step_sizes"].to(device)
            accept_sum = st["accept_sum"].to(device)
    if out:
        os.makedirs(out, exist_ok=True)

    x_train = dataset.split("train")
    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / config.batch_size)

    def checkpoint(epoch, step, perm, sums):
        if not out:
            return
        _save_atomic(_with_digest({
            "format": CHECKPOINT_FORMAT,
            "config": config.to_dict(),
            "model_config": model.config,
            "model_state": model.state_dict(),
            "optimizer_state": opt.state_dict(),
            "train_state": {"epoch": epoch, "step": step, "perm": perm, "bound_sum": sums[0],
                            "bound_count": sums[1], "train_seconds": train_seconds,
                            "rng": _rng_state(device, data_gen),
                            **({"hmc_step_sizes": hmc_steps.cpu(), "accept_sum": accept_sum.cpu()}
                               if aiwae else {})},
            "history": history,
        }), os.path.join(out, "checkpoint.pt"))

    bar = None
    if config.progress and epoch < config.epochs:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.epochs, initial=epoch, desc=f"{config.model} k={config.k}", unit="epoch")
    stopped = False
    model.train()
    with _StopFlag() as flag:
        while epoch < config.epochs:
            lr = burda_schedule(epoch) if config.schedule == "burda" else config.lr
            for group in opt.param_groups:
                group["lr"] = lr
            if perm is None:
                perm = torch.randperm(n, generator=data_gen)
            t0 = time.perf_counter()
            while step < steps_per_epoch:
                if flag.requested or (should_stop is not None and should_stop()):
                    stopped = True
                    break
                idx = perm[step * config.batch_size:(step + 1) * config.batch_size]
                x = dataset.batch("train", idx, data_gen).to(device)
                if aiwae:
                    a = aiwae_step(model, x, config.k, betas, config.leapfrog, hmc_steps)
                    bound, loss = a.bound, a.decoder_loss + a.encoder_loss
                elif config.model == "ae":
                    bound = -evaluate.squared_error(model, x)  # the "bound" is minus the error
                    loss = -bound.mean()
                else:
                    bound = objective(model, x, config.k, objective_name, config.estimator, config.kl,
                                      fused=config.fused)
                    loss = -bound.mean()
                if config.prior_std is not None:  # full variational Bayes: KL/N per minibatch
                    loss = loss + model.weight_kl(config.prior_std) / n
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step + 1} of "
                        f"{steps_per_epoch}; stopped without updating. "
                        + (f"The last good checkpoint is {os.path.join(out, 'checkpoint.pt')}"
                           if out and os.path.exists(os.path.join(out, "checkpoint.pt"))
                           else "No checkpoint was written yet.")
                        + " Try a lower --lr or another --seed.")
                opt.zero_grad(set_to_none=True)
                if aiwae:
                    # theta from the AIS-weighted log p(x, z) only, phi from the ELBO only
                    for params, part in ((dec_params, a.decoder_loss), (enc_params, a.encoder_loss)):
                        for p, g in zip(params, torch.autograd.grad(part, params)):
                            p.grad = g
                    accept_sum += a.acceptance
                    hmc_steps = torch.where(a.acceptance > config.target_accept, hmc_steps * AIWAE_STEP_INC,
                                            hmc_steps * AIWAE_STEP_DEC).clamp_(AIWAE_STEP_MIN, AIWAE_STEP_MAX)
                else:
                    loss.backward()
                opt.step()
                sums[0] += float(bound.detach().sum())
                sums[1] += x.shape[0]
                step += 1
            train_seconds += time.perf_counter() - t0
            if stopped:
                checkpoint(epoch, step, perm, sums)
                break
            record = {"epoch": epoch + 1, "lr": lr, "train_bound": sums[0] / max(sums[1], 1),
                      "objective": (f"aiwae k={config.k} T={config.temps} L={config.leapfrog}" if aiwae else
                                    f"{objective_name} k={config.k} ({config.estimator})"),
                      "seconds": round(time.perf_counter() - t0, 3),
                      "train_seconds": round(train_seconds, 3)}
            if aiwae:
                record["hmc_acceptance"] = [round(v, 4) for v in (accept_sum / steps_per_epoch).tolist()]
                record["hmc_step_sizes"] = [round(v, 5) for v in hmc_steps.tolist()]
                accept_sum.zero_()
            history.append(record)
            epoch, step, perm, sums = epoch + 1, 0, None, [0.0, 0]
            checkpoint(epoch, step, perm, sums)
            if out:
                with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")
            if bar is not None:
                bar.set_postfix(bound=f"{record['train_bound']:.2f}")
                bar.update()
    if bar is not None:
        bar.close()
    if stopped:
        where = f"; resume with --resume --out {out}" if out else ""
        print(f"iwae_ext.train: stopped at epoch {epoch + 1}, step {step}{where}", flush=True)
        return {"stopped": True, "epoch": epoch, "step": step, "config": config.to_dict()}

    model.eval()
    metrics = final_metrics(model, dataset, config, history, train_seconds)
    if out:
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
            f.write("\n")
    return metrics


def final_metrics(model, dataset: Dataset, config: TrainConfig, history: list,
                  train_seconds: float) -> dict:
    """Test L_{eval_k} (whole test split), ELBO, train log-likelihood, active units, timings;
    for an autoencoder (no likelihood) the reconstruction errors only."""
    from .. import evaluate  # lazily: `python -m iwae_ext.evaluate` must find it unimported
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed + 2)
    if config.model == "ae":
        with torch.no_grad():
            x_test, x_train = _eval_data(dataset, "test", gen), _eval_data(dataset, "train", gen)
            test_se = evaluate.squared_error(model, x_test.to(next(model.parameters()).device))
            train_se = evaluate.squared_error(model, x_train.to(next(model.parameters()).device))
        return {"test_squared_error": float(test_se.mean()), "train_squared_error": float(train_se.mean()),
                "test_mse": float(test_se.mean()) / dataset.x_dim, "train_mse": float(train_se.mean()) / dataset.x_dim,
                "n_test": x_test.shape[0], "epochs": len(history),
                "final_train_bound": history[-1]["train_bound"] if history else None,
                "config": config.to_dict(),
                "timings": {"train_seconds": train_seconds, "seconds_per_epoch": train_seconds / max(len(history), 1),
                            "eval_seconds": time.perf_counter() - t0},
                "device": str(next(model.parameters()).device), "torch": torch.__version__}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 3)
        x_test = _eval_data(dataset, "test", gen)
        test = evaluate.bounds(model, x_test, config.eval_k, config.eval_batch_size,
                               progress=config.progress, desc="test")
        x_train = _eval_data(dataset, "train", gen)
        if config.train_eval_size and config.train_eval_size < x_train.shape[0]:
            pick = torch.randperm(x_train.shape[0], generator=gen)[:config.train_eval_size]
            x_train = x_train[pick]
        train_b = evaluate.bounds(model, x_train, config.eval_k, config.eval_batch_size,
                                  progress=config.progress, desc="train")
        units = evaluate.active_units(model, x_test)
        recon = evaluate.reconstruction_error(model, x_test)
    eval_seconds = time.perf_counter() - t0
    test_ll, train_ll = float(test.log_likelihood.mean()), float(train_b.log_likelihood.mean())
    n_test = test.log_likelihood.numel()
    return {
        "test_log_likelihood": test_ll,
        "test_log_likelihood_stderr": float(test.log_likelihood.std() / math.sqrt(n_test)),
        "test_elbo": float(test.elbo.mean()),
        "train_log_likelihood": train_ll,
        "train_elbo": float(train_b.elbo.mean()),
        "generalization_gap": train_ll - test_ll,
        "variational_gap_test": test_ll - float(test.elbo.mean()),
        "active_units": units["active"],
        "reconstruction_error": float(recon.mean()),
        "eval_k": config.eval_k,
        "n_test": n_test,
        "n_train_eval": train_b.log_likelihood.numel(),
        "final_train_bound": history[-1]["train_bound"] if history else None,
        "epochs": len(history),
        "config": config.to_dict(),
        "timings": {"train_seconds": train_seconds,
                    "seconds_per_epoch": train_seconds / max(len(history), 1),
                    "eval_seconds": eval_seconds},
        "device": str(next(model.parameters()).device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _eval_data(dataset: Dataset, split: str, gen: torch.Generator) -> torch.Tensor:
    """A split as evaluated: dynamic data binarised once with a seeded draw."""
    return dataset.batch(split, slice(None), gen)
