"""Shared test configuration: the DEVICES list, the hypothesis profiles, and a small trained
model with a 2-D latent whose posterior a dense grid gives (AIS and SIR tests)."""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import iwae_ext
from iwae_ext.models import VAE

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


def _is_cuda_case(item) -> bool:
    """A CUDA case: a parameter equal to "cuda" (the DEVICES id), or marked ``cuda``."""
    if item.get_closest_marker("cuda") is not None:
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and any(v == "cuda" for v in callspec.params.values())


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: a test that runs only on a CUDA device (no device parameter)")


def pytest_collection_modifyitems(config, items):
    """IWAE_EXT_TESTS=cuda keeps the CUDA cases only (the GPU script: CI runs the CPU ones); every
    CUDA case gets the ``cuda`` marker, so ``-m cuda`` selects them too."""
    for item in items:
        if _is_cuda_case(item):
            item.add_marker(pytest.mark.cuda)
    if os.environ.get("IWAE_EXT_TESTS") == "cuda":
        keep = [item for item in items if _is_cuda_case(item)]
        config.hook.pytest_deselected(items=[item for item in items if not _is_cuda_case(item)])
        items[:] = keep


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


@pytest.fixture(scope="session")
def small_2d_model():
    """A VAE with a 2-D latent trained briefly on 1,000 binarized MNIST images (float64)."""
    from iwae_ext.data import load_dataset
    from iwae_ext.objectives import objective
    torch.manual_seed(7)
    x = load_dataset("binarized_mnist").split("train")[:1000].double()
    model = VAE(x_dim=784, latent_dims=(2,), hidden=(64,), x_mean=x.mean(0)).double()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        for i in range(0, x.shape[0], 100):
            loss = -objective(model, x[i:i + 100], 5).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), x


def grid_log_likelihood(model, x, half_width=6.0, n=601):
    """log p(x) = log sum over a dense grid of p(x, z) dz (the posterior is well inside it)."""
    t = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    zz = torch.cartesian_prod(t, t)  # [n^2, 2]
    dz = (t[1] - t[0]) ** 2
    out = []
    with torch.no_grad():
        for xi in x:
            lj = model.log_joint(xi.unsqueeze(0), zz.unsqueeze(1))[:, 0]
            out.append(torch.logsumexp(lj, 0) + math.log(dz))
    return torch.stack(out)


def grid_posterior(model, xi, half_width=6.0, n=601):
    """The posterior p(z|x) of one data point on a dense grid: (z [n^2, 2], probabilities [n^2])."""
    t = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    zz = torch.cartesian_prod(t, t)
    with torch.no_grad():
        lj = model.log_joint(xi.unsqueeze(0), zz.unsqueeze(1))[:, 0]
    return zz, torch.softmax(lj, 0)

