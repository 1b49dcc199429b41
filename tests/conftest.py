"""Shared test configuration: the DEVICES list and the hypothesis profiles."""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import iwae_ext

# Every device-parametrised test runs on each of these; CUDA cases skip cleanly when no
# GPU is visible or the extension was built without CUDA kernels.
_CUDA_SKIP = None
if not torch.cuda.is_available():
    _CUDA_SKIP = "no CUDA device visible"
elif not iwae_ext.build_info()["cuda_kernels"]:
    _CUDA_SKIP = "iwae_ext was built without CUDA kernels (IWAE_EXT_CUDA=1 to build them)"

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))),
]

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
