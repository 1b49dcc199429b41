"""The training loop: one loop for every model kind, on one device or data-parallel.

Every step draws its random numbers from keyed streams (:mod:`iwae_ext.keyed`): the dynamic
binarisation of image i in epoch e and the noise of its samples (z, random weights, AIWAE's
chains) depend on (seed, e, i) only, so a run's trajectory does not depend on how the global
batch is split across ranks, and a resumed run needs no random-number state.

Inside an epoch nothing is read back to the host except every ``sync_every`` steps: the
training bound accumulates on the device, and a non-finite loss or gradient is detected on the
device and its update skipped (Adam's ``found_inf``, as AMP's GradScaler skips a step); from
that step on the epoch applies no update, and at the next read-back the run raises
:class:`NonFiniteLossError` naming the epoch and step, leaving the last good checkpoint in place.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import signal
import threading
import time
import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._checks import device_problem
from .._distributed import Dist
from ..data import Dataset, load_dataset
from ..keyed import STREAMS, KeyedNoise, keyed_draws
from ..models import VAE
from .checkpoint import CHECKPOINT_FORMAT, load_checkpoint, read_checkpoint, save_checkpoint
from .config import RESUMABLE, TrainConfig, burda_schedule
from .model_kinds import KINDS

__all__ = ["train", "NonFiniteLossError", "build_model", "StepNoise", "key"]


class NonFiniteLossError(RuntimeError):
    """Training met a NaN or infinite loss or gradient; no update was applied from that step on
    and the last good checkpoint is kept."""


def key(*parts) -> int:
    """A 63-bit seed for the keyed streams from (run seed, purpose, ...): sha256 of the parts."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@dataclasses.dataclass
class StepNoise:
    """The keys of one step's random numbers: the global indices of this rank's images
    ``index`` [b], the run's training ``seed`` and the ``epoch``."""

    seed: int
    index: Tensor
    epoch: int

    def keyed(self, purpose: str) -> KeyedNoise:
        """A :class:`~iwae_ext.keyed.KeyedNoise` for these images of its own, for ``purpose`` in this epoch (e.g.
        AIWAE's chains, whose streams count temperatures)."""
        return KeyedNoise(key(self.seed, purpose, self.epoch), self.index)


class _Step(nn.Module):
    """The differentiable part of a training step, as a module (so DistributedDataParallel and
    torch.compile wrap it): rows ``index`` of the training split (a buffer: static under CUDA
    graphs), binarised by keyed uniforms when the data set is dynamically binarised, and the
    model kind's loss inside the step's keyed draws."""

    def __init__(self, model: nn.Module, kind, data: Tensor, binarize: bool, seed: int, low: bool = False):
        super().__init__()
        self.model, self.kind, self.binarize, self.seed = model, kind, binarize, seed
        self.low = low  # bfloat16 autocast around the loss (precision "bf16")
        self.register_buffer("data", data, persistent=False)

    def forward(self, index: Tensor, step: Tensor, scale: float, noise: StepNoise):
        # (noise is made by the caller: an int made in here would be guarded, one graph per epoch)
        from ..ops import keyed_uniform
        x = self.data[index]
        if self.binarize:
            u = keyed_uniform(index, 1, x.shape[-1], self.seed, STREAMS["binarize"], step, dtype=x.dtype)[0]
            x = (u < x).to(x.dtype)
        with keyed_draws(KeyedNoise(self.seed, index), step=step), \
                torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.low):
            # under bf16 the layers' products run in bfloat16; the model returns its densities,
            # log-weights and bound in float32 (docs/training.rst, "Precision")
            loss, bound, aux = self.kind.loss(self.model, x, scale, noise)
        # the step's bound sum and a non-finite loss, formed here (fused when compiled)
        return loss, bound.double().sum(), torch.isfinite(loss).logical_not().to(torch.float32), aux


class _EpochState:
    """The device tensors of an epoch in progress: its permutation, its key (the epoch as a
    tensor), the bound summed per step, and the non-finite latch ``found_inf`` (1.0 from the
    first non-finite loss or gradient on: fused Adam skips every update while it is set) with
    ``good``, the number of steps applied since ``start``."""

    def __init__(self, perm: Tensor, step_t: Tensor, bound_sums: Tensor, found_inf: Tensor, start: int = 0):
        dev = perm.device
        self.perm, self.step_t, self.bound_sums, self.found_inf = perm, step_t, bound_sums, found_inf
        self.start = start
        self.good = torch.zeros((), dtype=torch.int64, device=dev)
        self.one = torch.ones((), dtype=torch.float32, device=dev)
        found_inf.zero_()


class _StopFlag:
    """Set by SIGINT/SIGTERM (or a user callback); checked at step boundaries."""

    def __init__(self, announce: bool):
        self.requested, self.announce = False, announce
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
        if self.announce:
            print(f"\niwae_ext.train: {signal.Signals(signum).name} received; stopping after this step "
                  f"with a checkpoint (press Ctrl-C again to stop at once)", flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _device(name: str) -> torch.device:
    if name == "auto":
        import iwae_ext
        name = "cuda" if torch.cuda.is_available() and iwae_ext.build_info()["cuda_kernels"] else "cpu"
    name = Dist.device_of(name)
    problem = device_problem(name)
    if problem:
        raise ValueError(f"device {problem}")
    return torch.device(name)


def build_model(config: TrainConfig, dataset: Dataset) -> VAE:
    return VAE(dataset.x_dim, config.latent_dim, config.hidden, config.activation, config.decoder,
               x_mean=dataset.mean("train"), random_weights=KINDS[config.model].random_weights,
               rho_init=config.rho_init, decoder_hidden=config.decoder_hidden)


def _network_model(encoder: nn.Module, decoder: nn.Module, config: TrainConfig, dataset: Dataset):
    """The user's networks as a NetworkVAE; Z read from the encoder's output on two training rows."""
    from ..models import NetworkVAE
    for name, net in (("encoder", encoder), ("decoder", decoder)):
        if not isinstance(net, nn.Module):
            raise ValueError(f"train: {name} must be an nn.Module, got {type(net).__name__}")
    shape = tuple(dataset.image_shape)
    if len(shape) == 2:
        shape = (1, *shape)  # one channel, as convolutional networks take images
    return NetworkVAE.probing(encoder, decoder, dataset.split("train")[:2], config.decoder or dataset.likelihood,
                              shape if math.prod(shape) == dataset.x_dim else None)


def _init_from(model: VAE, path: str) -> VAE:
    """The model's parameters from a trained run: copied, or (deterministic run, random-weight
    model) used as the means of the random weights."""
    source = load_checkpoint(path)
    arch = ("x_dim", "latent_dims", "hidden", "activation", "likelihood", "decoder_hidden")
    if any(source.config.get(k) != model.config.get(k) for k in arch):
        raise ValueError(f"init_from {path}: the run's architecture "
                         f"{ {k: source.config.get(k) for k in arch} } differs from this model's "
                         f"{ {k: model.config.get(k) for k in arch} }")
    if source.random_weights == model.random_weights:
        model.load_state_dict(source.state_dict())
        return model
    return VAE.from_deterministic(source, model.random_weights, model.config["rho_init"])


def _subset(dataset: Dataset, n: int, seed: int) -> Dataset:
    """n images of each split, a seeded random choice (never a prefix: test splits can be sorted)."""
    gen = torch.Generator().manual_seed(seed)
    splits = {name: x[torch.randperm(x.shape[0], generator=gen)[:n]] for name, x in dataset.splits.items()}
    return Dataset(dataset.name, splits, dataset.image_shape, dataset.binarization, dataset.likelihood,
                   dict(dataset.info, subset=n))


def _resume_config(config: TrainConfig, overrides: dict):
    """(config, checkpoint or None): on resume the saved run's config with the allowed overrides."""
    out = config.out
    if config.resume:
        if not out:
            raise ValueError("resume=True needs out (the run directory to resume)")
        path = os.path.join(out, "checkpoint.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resume: no checkpoint at {path}")
        ckpt = read_checkpoint(path)
        if ckpt["format"] != CHECKPOINT_FORMAT:
            raise ValueError(f"resume: {path} was written by an older iwae_ext ({ckpt['format']}, "
                             f"before keyed training draws) and cannot be continued exactly; evaluate "
                             f"it with iwae-eval, or start a new run (init_from={out!r} starts from its "
                             f"weights)")
        saved = dict(ckpt["config"])
        for name, value in overrides.items():
            if name in RESUMABLE:
                saved[name] = value
            elif name not in ("out", "resume") and value != saved.get(name):
                raise ValueError(f"resume: {name} cannot change when resuming (the run has "
                                 f"{saved.get(name)!r}, got {value!r}); start a new run instead")
        saved.update(out=out, resume=True)
        return TrainConfig(**saved), ckpt
    if out and os.path.exists(os.path.join(out, "checkpoint.pt")):
        raise FileExistsError(f"{out} already holds a run (checkpoint.pt): pass resume=True / --resume "
                              f"to continue it, or choose another out directory")
    return config, None


def train(config: TrainConfig | None = None, should_stop=None, data: Dataset | None = None,
          encoder_net: nn.Module | None = None, decoder_net: nn.Module | None = None, **overrides) -> dict:
    """Train (and evaluate) one model; returns the final metrics (also in ``out/metrics.json``).

    ``config`` or keyword overrides of :class:`~iwae_ext.trainer.config.TrainConfig` fields. With ``resume=True`` the
    saved run's config is used and only the keyword overrides in ``RESUMABLE`` (e.g. a larger
    ``epochs``) may change it. ``should_stop()``, if given, is polled at every step boundary (at
    every read-back under torch.distributed); when it returns True the run checkpoints and returns
    {"stopped": True, ...} (as on SIGINT/SIGTERM). ``data``: a :class:`~iwae_ext.data.Dataset`
    to train on instead of loading ``config.dataset`` (pass it again to resume). Raises
    :class:`~iwae_ext.trainer.loop.NonFiniteLossError` on a NaN or infinite loss, keeping the last good checkpoint.

    Launched by torchrun (WORLD_SIZE > 1), or inside an initialised process group, the run is
    data-parallel (DistributedDataParallel; gloo on CPUs, NCCL on GPUs, ``device="cuda"`` meaning
    this rank's LOCAL_RANK GPU): the global batch ``batch_size`` is split across the ranks, only
    rank 0 writes files, and the final evaluation is split across the ranks and gathered.

    ``encoder_net`` and ``decoder_net``: the user's own networks instead of the package's MLPs (model
    "vae" or "iwae", any estimator), made a :class:`~iwae_ext.models.NetworkVAE`: the encoder
    takes data points in the data set's image shape and returns (loc, log-variance) or one
    tensor of both, the decoder takes z [N, Z] and returns the logits (Bernoulli) or the mean
    and log-variance (Gaussian); Z is read from the encoder. The checkpoint names their classes
    but cannot hold their code: pass the same networks again to resume, and to
    :func:`~iwae_ext.trainer.checkpoint.load_checkpoint` (its ``encoder_net`` and ``decoder_net``).
    """
    if "networks" in overrides:
        raise ValueError("networks is set by train(encoder_net=..., decoder_net=...), not by hand")
    config = dataclasses.replace(config or TrainConfig(), **overrides)
    config, ckpt = _resume_config(config, overrides)
    if (encoder_net is None) != (decoder_net is None):
        raise ValueError("train: give both encoder_net and decoder_net (your own networks), or neither (the package's MLPs)")
    if config.networks and encoder_net is None:
        raise ValueError(f"this run trained your own networks ({config.networks['encoder']} and "
                         f"{config.networks['decoder']}), whose code a checkpoint cannot hold: pass "
                         f"encoder_net= and decoder_net=, built as for the run, to resume it")
    if data is not None:
        if not isinstance(data, Dataset):
            raise TypeError(f"data must be an iwae_ext.data.Dataset, got {type(data).__name__}")
        dataset = data
        config = dataclasses.replace(config, dataset=data.name)
    else:
        dataset = load_dataset(config.dataset, config.data_dir, config.download)
    if config.subset:
        dataset = _subset(dataset, config.subset, config.seed)
    model = None
    if encoder_net is not None:
        model = _network_model(encoder_net, decoder_net, config, dataset)
        if config.networks is not None:  # resuming: the same networks as the run's
            for part in ("encoder", "decoder", "latent_dim", "likelihood"):
                if model.config[part] != config.networks[part]:
                    raise ValueError(f"resume: the run's {part} is {config.networks[part]!r}, the one "
                                     f"given is {model.config[part]!r}")
        config = dataclasses.replace(config, networks=model.config, latent_dim=[model.latent_dim])
    config = config.resolved(dataset)
    device = _device(config.device)
    # decided once and saved with the run: a resumed run keeps its mode (resume is exact per mode)
    config = dataclasses.replace(config, compile=_use_compile(config, dataset.split("train").shape[0], device))
    group = Dist(device)
    run = None
    try:
        run = _Run(config, dataset, device, group, ckpt, model)
        return run.run(should_stop)
    finally:
        # the run's DistributedDataParallel reducer sits in reference cycles: collected here, it
        # goes while its process group still exists, not at interpreter exit after it (where a
        # gloo rank could abort with "terminate called without an active exception")
        del run
        gc.collect()
        group.close()


def _use_compile(config: TrainConfig, n_train: int, device: torch.device) -> bool:
    """``config.compile``, or (None) whether compiling pays here: the kind traces into one graph
    and the run is long enough for the measured saving per step to repay the compilation."""
    kind_cls = KINDS[config.model]
    if _hook_breaks_inductor(config):
        if config.compile:
            raise ValueError(f"compile: estimator 'dreg' compiles with torch >= 2.13 only (torch "
                             f"{torch.__version__}'s inductor mis-orders the graph of its gradient hook); "
                             f"use compile=False or a newer torch")
        return False
    if config.compile is None:
        steps = config.epochs * math.ceil(n_train / config.batch_size)
        return kind_cls.compilable and steps >= COMPILE_MIN_STEPS.get(device.type, math.inf)
    if config.compile and not kind_cls.compilable:
        raise ValueError(f"compile: model {config.model!r} does not compile (its step is a long "
                         f"Python loop); use compile=False")
    return bool(config.compile)


def _hook_breaks_inductor(config: TrainConfig) -> bool:
    """DReG scales z's gradient by a hook over a tensor of the step; torch 2.11's inductor builds
    that hook's graph without the step's inputs ("used before it has been defined")."""
    return getattr(config, "estimator", "standard") == "dreg" and _TORCH_VERSION < (2, 13)


_TORCH_VERSION = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])

# compile=None compiles a run of at least this many steps (benchmarks/bench_train.py measures the
# saving per step and the compilation time on each device type).
COMPILE_MIN_STEPS = {"cpu": 10_000, "cuda": 5_000}


@contextlib.contextmanager
def subnormals_as_zero(on: bool = True):
    """While active (``on``), the CPU treats subnormal floats (below 1.2e-38 in float32) as zero
    on every thread of torch's intra-op pool. Training otherwise meets them in the decoder's
    backward (sigmoid of very negative logits), where each costs ~100 cycles: 4x the step time
    at k = 50, batch 20 (benchmarks/bench_train.py). The previous setting comes back after."""
    if not on:
        yield
        return
    from .. import _C
    was = _C.flush_denormal(True)
    try:
        yield
    finally:
        if was is not None:
            _C.flush_denormal(was)


@contextlib.contextmanager
def _tf32(on: bool):
    """TF32 matrix products (CUDA tensor cores) for the training loop only: the final evaluation
    and everything after the loop run with the process's own setting again."""
    if not on:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _quiet_first_call(fn):
    """``fn`` whose first call (when Dynamo traces the optimizer) does not log Dynamo's notice
    that the optimizer's profiler annotation is ignored."""
    import logging
    state = {"first": True}

    def quiet(record):
        return "Profiler record function" not in str(record.msg)

    def call(*args, **kwargs):
        if not state["first"]:
            return fn(*args, **kwargs)
        state["first"] = False
        logger = logging.getLogger("torch._dynamo.variables.ctx_manager")
        logger.addFilter(quiet)
        try:
            return fn(*args, **kwargs)
        finally:
            logger.removeFilter(quiet)

    return call


class _Run:
    def __init__(self, config: TrainConfig, dataset: Dataset, device: torch.device, group: Dist, ckpt,
                 model: nn.Module | None = None):
        self.config, self.dataset, self.device, self.group = config, dataset, device, group
        self.rank, self.world = group.rank, group.world
        self.dtype = getattr(torch, config.dtype)
        torch.manual_seed(config.seed)  # the initial parameters: the same on every rank
        model = model if model is not None else build_model(config, dataset)
        if config.init_from and ckpt is None:
            model = _init_from(model, config.init_from)
        self.model = model.to(device=device, dtype=self.dtype)
        self.model.fused = config.fused  # --reference-ops: the decoder's log-likelihood in plain PyTorch too
        self.x_train = dataset.split("train").to(device=device, dtype=self.dtype)
        self.n = self.x_train.shape[0]
        if config.batch_size < self.world:
            raise ValueError(f"batch_size {config.batch_size} is smaller than the number of ranks "
                             f"{self.world}: every rank needs a share of the global batch")
        self.kind = KINDS[config.model](config, self.model, device, self.n, self.world)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=config.lr, betas=(0.9, 0.999), eps=1e-4,
                                    weight_decay=config.weight_decay, fused=True)
        self.epoch, self.step, self.history, self.train_seconds, self.resumed_sums = 0, 0, [], 0.0, None
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model_state"])
            self.opt.load_state_dict(ckpt["optimizer_state"])
            st = ckpt["train_state"]
            self.epoch, self.step, self.train_seconds = st["epoch"], st["step"], st["train_seconds"]
            self.resumed_sums = st["bound_sums"]
            self.history = list(ckpt.get("history", []))
            self.kind.load_state_dict(st["kind"])
        self.seed = key(config.seed, "train")
        if config.precision == "tf32" and device.type != "cuda":
            raise ValueError(f"precision 'tf32' is a CUDA precision (tensor cores); the device is {device}")
        module = _Step(self.model, self.kind, self.x_train, dataset.binarization == "dynamic", self.seed,
                       low=config.precision == "bf16")
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            # every rank holds the same training split: not broadcast at the start
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ["data"])
            with warnings.catch_warnings():  # broadcast_buffers=False is what we mean (torch 2.13's advice)
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                module = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda"
                                                 else None, broadcast_buffers=False,
                                                 find_unused_parameters=self.kind.unused_parameters)
        self.forward, self.opt_step, self.lr = module, self.opt.step, None
        if config.compile:
            if device.type == "cuda":  # one GPU: a CUDA graph of the forward and the backward
                module = torch.compile(module, mode="reduce-overhead" if self.world == 1 else None)
            else:  # the graph's kernels called from generated C++ rather than Python
                module = torch.compile(module, options={"cpp_wrapper": True})
            self.forward = module
            # the optimizer's bookkeeping (step counts, found_inf) fused around fused Adam's
            # kernel: bit for bit the eager update; the learning rate a tensor, so a schedule's
            # change is no recompilation
            self.lr = torch.tensor(config.lr, dtype=torch.float64, device=device)
            self.opt_step = _quiet_first_call(torch.compile(self.opt.step))
        self.steps_per_epoch = math.ceil(self.n / config.batch_size)
        # the non-finite latch, read by fused Adam (as GradScaler sets it): see _EpochState
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.opt.found_inf, self.opt.grad_scale = self.found_inf, None
        self.out = config.out if self.rank == 0 else None
        if self.out:
            os.makedirs(self.out, exist_ok=True)
        self.tensorboard = None
        if config.tensorboard and self.rank == 0:
            from .tensorboard import TensorBoardLog
            self.tensorboard = TensorBoardLog(config.tensorboard, self.epoch, self.steps_per_epoch, config.to_dict())

    # -- the loop ----------------------------------------------------------------------------

    def run(self, should_stop) -> dict:
        try:
            return self._run(should_stop)
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()

    def _run(self, should_stop) -> dict:
        c = self.config
        bar = None
        if c.progress and self.rank == 0 and self.epoch < c.epochs:
            from tqdm.auto import tqdm
            bar = tqdm(total=c.epochs, initial=self.epoch, desc=f"{c.model} k={c.k}", unit="epoch")
        stopped = False
        self.model.train()
        try:
            flush = subnormals_as_zero(self.device.type == "cpu" and c.flush_denormal)
            with _StopFlag(announce=self.rank == 0) as flag, flush, _tf32(c.precision == "tf32"):
                def stop_requested():
                    return flag.requested or (should_stop is not None and should_stop())

                while self.epoch < c.epochs:
                    stopped = self._epoch(stop_requested)
                    if stopped:
                        break
                    if bar is not None:
                        bar.set_postfix(bound=f"{self.history[-1]['train_bound']:.2f}")
                        bar.update()
        finally:
            if bar is not None:
                bar.close()
        if stopped:
            where = f"; resume with --resume --out {c.out}" if c.out else ""
            if self.rank == 0:
                print(f"iwae_ext.train: stopped at epoch {self.epoch + 1}, step {self.step}{where}", flush=True)
            return {"stopped": True, "epoch": self.epoch, "step": self.step, "config": c.to_dict()}
        self.model.eval()
        from .final import final_metrics
        metrics = final_metrics(self.model, self.dataset, c, self.history, self.train_seconds, self.group)
        if self.out:
            with open(os.path.join(self.out, "metrics.json"), "w") as f:
                json.dump(metrics, f, indent=1)
                f.write("\n")
        if self.tensorboard is not None:
            self.tensorboard.final(metrics, self.epoch)
        return metrics

    def _start_epoch(self) -> tuple[float, "_EpochState"]:
        """The epoch's learning rate (set in the optimizer) and its state on the device."""
        c, dev = self.config, self.device
        lr = burda_schedule(self.epoch) if c.schedule == "burda" else c.lr
        if self.lr is not None:
            self.lr.fill_(lr)
        for group in self.opt.param_groups:
            group["lr"] = lr if self.lr is None else self.lr
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(key(c.seed, "perm", self.epoch)))
        perm = perm.to(dev)
        step_t = torch.tensor(self.epoch, dtype=torch.int64).to(dev)  # keys the epoch's streams
        # the bound summed per step (this rank's points), reduced over ranks at the read-back and
        # summed in step order: the same number whether the epoch was interrupted or not
        bound_sums = torch.zeros(self.steps_per_epoch, dtype=torch.float64, device=dev)
        if self.rank == 0 and self.step:
            bound_sums[:self.step] = self.resumed_sums.to(dev)
        self.resumed_sums = None
        return lr, _EpochState(perm, step_t, bound_sums, self.found_inf, self.step)

    def _epoch(self, stop_requested) -> bool:
        """One epoch from ``self.step``; True when a stop was requested (after a checkpoint)."""
        lr, st = self._start_epoch()
        bound_sums = st.bound_sums
        t0 = time.perf_counter()
        stop = self._steps(st, stop_requested)
        self._raise_if_bad(st)
        self.train_seconds += time.perf_counter() - t0
        if self.world > 1:
            dist.all_reduce(bound_sums)
        if stop:
            self._checkpoint(bound_sums[:self.step].cpu())
            return True
        count = self.n
        record = {"epoch": self.epoch + 1, "lr": lr, "train_bound": float(bound_sums.sum()) / count,
                  "objective": self.kind.describe(), "seconds": round(time.perf_counter() - t0, 3),
                  "train_seconds": round(self.train_seconds, 3), **self.kind.epoch_record(self.steps_per_epoch)}
        if self.config.test_every and (self.epoch + 1) % self.config.test_every == 0:
            record.update(self._test_curve())
        self.history.append(record)
        self.epoch, self.step = self.epoch + 1, 0
        self._checkpoint(torch.zeros(0, dtype=torch.float64))
        if self.out:
            with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.epoch(record)
        if self.world > 1 and self._any_rank(stop_requested()) and self.epoch < self.config.epochs:
            return True
        return False

    def _test_curve(self) -> dict:
        """The test split's ELBO and L_k (k = the training k) now, for a learning curve: the same
        keyed draws at every epoch (common random numbers: the curve's steps are the model's,
        not the draws'), computed alike on every rank (the history is the same everywhere)."""
        from ..evaluate import bounds
        c, t0 = self.config, time.perf_counter()
        self.model.eval()
        try:
            b = bounds(self.model, self.dataset.split("test"), c.k, c.eval_batch_size,
                       seed=key(c.seed, "test_curve"))
        finally:
            self.model.train()
        return {"test_elbo": float(b.elbo.double().mean()), "test_bound": float(b.log_likelihood.double().mean()),
                "test_seconds": round(time.perf_counter() - t0, 3)}

    def _steps(self, st: "_EpochState", stop_requested) -> bool:
        """The epoch's steps from ``self.step``: nothing read back to the host except every
        ``sync_every`` steps; True when a stop was requested."""
        B = self.config.batch_size
        while self.step < self.steps_per_epoch:
            if self.world == 1 and stop_requested():  # a host-side check: no read-back
                return True
            rows = st.perm[self.step * B:(self.step + 1) * B]
            index = rows.tensor_split(self.world)[self.rank] if self.world > 1 else rows
            loss, bound_sum, loss_bad, aux = self.forward(index, st.step_t, self.world / rows.shape[0],
                                                          StepNoise(self.seed, index, self.epoch))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            # on the device: a non-finite gradient (one fused pass, x 1.0) or loss sets the latch,
            # and fused Adam skips this update and every later one of the epoch
            self._update(st.found_inf, st.one, st.good, loss_bad)
            self.kind.update(aux, st.found_inf)
            st.bound_sums[self.step] = bound_sum  # (unused once a step was bad: the run stops)
            self.step += 1
            if self.step % self.config.sync_every == 0 and self.step < self.steps_per_epoch:
                self._raise_if_bad(st)  # the read-back
                if self.world > 1 and self._any_rank(stop_requested()):
                    return True
        return False

    def _update(self, found_inf: Tensor, one: Tensor, good: Tensor, loss_bad: Tensor):
        """After the backward: a non-finite gradient (one fused pass, x 1.0) or loss sets the
        latch ``found_inf``, and fused Adam skips this update and every later one of the epoch;
        ``good`` counts the updates applied."""
        torch._amp_foreach_non_finite_check_and_unscale_(
            [p.grad for g in self.opt.param_groups for p in g["params"] if p.grad is not None], found_inf, one)
        torch.maximum(found_inf, loss_bad, out=found_inf)
        if self.world > 1:  # the loss is this rank's: agree, so every rank skips alike
            dist.all_reduce(found_inf, dist.ReduceOp.MAX)
        good += found_inf == 0
        self.opt_step()

    def _any_rank(self, local: bool) -> bool:
        t = torch.tensor([float(local)], device=self.device)
        dist.all_reduce(t, dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _raise_if_bad(self, st: "_EpochState"):
        if not float(st.found_inf):
            return
        step = st.start + int(st.good)  # the first step not applied
        path = os.path.join(self.config.out, "checkpoint.pt") if self.config.out else None
        raise NonFiniteLossError(
            f"non-finite loss or gradient at epoch {self.epoch + 1}, step "
            f"{step + 1} of {self.steps_per_epoch}; no update was applied from that step on. "
            + (f"The last good checkpoint is {path}" if path and os.path.exists(path)
               else "No checkpoint was written yet.")
            + " Try a lower --lr or another --seed.")

    def _checkpoint(self, bound_sums: Tensor):
        if not self.out:
            return
        save_checkpoint({
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "model_config": self.model.config,
            "model_state": self.model.state_dict(),
            "optimizer_state": self.opt.state_dict(),
            "train_state": {"epoch": self.epoch, "step": self.step, "bound_sums": bound_sums,
                            "train_seconds": self.train_seconds, "world_size": self.world,
                            "kind": self.kind.state_dict()},
            "history": self.history,
        }, os.path.join(self.out, "checkpoint.pt"))
