"""Which precision the gradients inside HMC trajectories take (docs/sampling.rst, "Gradient
precision").

A leapfrog trajectory built from any deterministic gradient field is volume-preserving and
reversible, so a Metropolis test on the exact energy keeps the target invariant: gradients in
bfloat16 leave HMC and AIS exact (the same estimator), and only the acceptance rate can move.
Energies, AIS weights and the gradients at a trajectory's two ends (which come with the
energies) stay in the model's dtype; the gradients at the L - 1 interior positions take the
lower precision.
"""
from __future__ import annotations

import torch

from ._checks import check_choice

GRADIENT_PRECISIONS = ("auto", "full", "bf16")


def fast_bf16(device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices faster than float32: a CPU with AVX512-BF16
    or AMX (through oneDNN), a CUDA GPU of compute capability 8.0 or more."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and
                    (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))
    return False


def gradient_dtype(precision: str, dtype: torch.dtype, device, measured: bool, fn: str,
                   autocast: bool = False) -> torch.dtype | None:
    """The dtype of the interior gradients for ``precision`` ("auto", "full" or "bf16"), or None
    for the model's own dtype. "auto" is bf16 only where it was measured to be faster
    (``measured``: the package's own models with the hand-written gradient), for float32
    models on a device with fast bfloat16 products (:func:`fast_bf16`); "full" otherwise.
    ``autocast``: the low precision comes from ``torch.autocast``, which lowers float32 only,
    so "bf16" with float64 densities is refused rather than silently left in float64."""
    check_choice("gradient_precision", precision, GRADIENT_PRECISIONS, fn)
    if precision == "full":
        return None
    if precision == "bf16":
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{fn}: gradient_precision='bf16' needs a float32 or float64 model, got {dtype}")
        if autocast and dtype != torch.float32:
            raise ValueError(f"{fn}: gradient_precision='bf16' takes autograd's gradients under "
                             f"torch.autocast, which lowers float32 only; these densities are {dtype} "
                             f"(use float32, or gradient_precision='full')")
        return torch.bfloat16
    return torch.bfloat16 if (measured and dtype == torch.float32 and fast_bf16(device)) else None
