"""iwae_ext: fused C++/CUDA ops and models for importance-weighted generative models.

The compiled operators live in ``torch.ops.iwae_ext``; ``iwae_ext.ops`` holds their typed,
differentiable wrappers and ``iwae_ext.ops.reference`` their pure-PyTorch twins. On top:
``data`` (data sets), ``models`` (VAE/IWAE modules), ``objectives`` (bounds and gradient
estimators), the function ``train`` with ``TrainConfig`` and ``load_checkpoint`` (from the
trainer's package, ``iwae_ext.trainer``); ``evaluate``, ``diagnostics`` (ESS and Pareto k-hat of
importance weights), ``samplers`` (HMC, AIS, SIR), ``plots`` (matplotlib figures) and ``report``
load on first use. The command lines are ``iwae_ext.cli.train``
(``iwae-train``) and ``iwae_ext.cli.eval`` (``iwae-eval``).
"""
import importlib as _importlib
import re as _re

import torch as _torch  # loads libtorch before the extension

from . import _extension

_C = _extension.load()

from . import ops  # noqa: E402  (registers fake kernels and autograd)
from . import data, models, objectives  # noqa: E402
from .protocol import LatentVariableModel  # noqa: E402
from .trainer import CorruptCheckpointError, TrainConfig, load_checkpoint, train  # noqa: E402

__version__ = "0.1.0"

__all__ = ["build_info", "ops", "data", "models", "objectives", "evaluate", "train", "TrainConfig",
           "load_checkpoint", "CorruptCheckpointError", "LatentVariableModel", "__version__"]
_LAZY = ("evaluate", "samplers", "plots", "report", "diagnostics")


def __getattr__(name):  # PEP 562: iwae_ext.evaluate / .samplers / .plots / .report on first use
    if name in _LAZY:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'iwae_ext' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def build_info() -> dict:
    """What was compiled: versions, whether CUDA kernels were built, arch list, OpenMP.

    ``ops`` maps each operator to the devices that have a kernel for it.
    """
    has = _torch._C._dispatch_has_kernel_for_dispatch_key
    op_names = [f"iwae_ext::{name}" for name in ops.OP_NAMES]
    devices = {name: [d for d in ("CPU", "CUDA") if has(name, d)] for name in op_names}
    cuda_kernels = any("CUDA" in d for d in devices.values())
    return {
        "version": __version__,
        "torch": _torch.__version__,
        "built_with_torch": _C.built_with_torch,
        "cuda_kernels": cuda_kernels,
        "cuda_arch_list": [a for a in _re.split(r"[;\s]+", _C.cuda_arch_list.strip()) if a] if cuda_kernels else [],
        "torch_cuda_version": _torch.version.cuda,
        "openmp": bool(_C.openmp),
        "openmp_version": _C.openmp or None,
        "compiler": _C.compiler,
        "ops": devices,
    }
