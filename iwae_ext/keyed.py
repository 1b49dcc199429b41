"""Per-image random streams: every random number of an evaluation keyed by (seed, image index,
sample, step, stream), so an image's L_k, AIS and BDMC values do not depend on the batch it is
evaluated in, how its samples are chunked, the order of the images, or how many processes or
devices share the work (on one device type).

The numbers come from the counter-based op :func:`iwae_ext.ops.keyed_normal` (Philox4x32-10):
drawing them costs about what ``torch.randn`` costs and needs no generator object per image.

Two ways in:

* :class:`KeyedNoise` for a batch of images: ``normal(rows, dim, stream, step)`` gives
  [rows, B, dim]; :func:`iwae_ext.samplers.ais` and :func:`~iwae_ext.samplers.hmc` accept one as
  their ``generator`` (chains laid out c = s * B + b, as the evaluation does).
* :func:`keyed_draws`: while active, the package's distributions (``DiagonalNormal``, the
  two-layer posterior) and random-weight layers (``BayesLinear``) draw their standard normals
  from the keyed streams, one stream per draw in program order; a model's ``posterior(x)``
  returning a ``torch.distributions`` Normal, Independent(Normal) or MultivariateNormal is
  sampled the same way by :func:`iwae_ext.protocol.log_weights`. Draws must have shape
  [rows, B, dim] (or [B, dim]) with B the batch of images.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = ["KeyedNoise", "keyed_draws", "resolve_seed", "STREAMS", "PILOT_ROW"]

# One stream per purpose (0-255). Draws inside keyed_draws take 0, 1, 2, ... in program order.
STREAMS = {
    "draws": 0,             # first of the program-order streams (up to 63)
    "ais_init": 64,         # z0 from q(z|x) or p(z): program-order streams 64-127
    "ais_momentum": 128,
    "ais_uniform": 129,
    "reverse_momentum": 130,  # reverse AIS (BDMC's upper bound)
    "reverse_uniform": 131,
    "binarize": 132,        # training: the dynamic binarisation of an image (step = epoch)
}
_MAX_DRAWS = 64
# The first row (chain) of an AIS pilot's numbers: its chains never share a row with a reported
# chain, whatever the number of reported chains.
PILOT_ROW = 1 << 31


def resolve_seed(seed: int | None, generator: torch.Generator | None = None) -> int:
    """The seed of the keyed streams: ``seed`` itself, else one draw from ``generator`` (or from
    torch's default generator, so ``torch.manual_seed`` still fixes an evaluation)."""
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed must be an int in [0, 2^63), got {seed!r}")
        return seed
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=device))


def check_generator(generator):
    """TypeError unless ``generator`` is None, a torch.Generator or a :class:`KeyedNoise`."""
    if generator is not None and not isinstance(generator, (torch.Generator, KeyedNoise)):
        raise TypeError(f"generator must be a torch.Generator or an iwae_ext.keyed.KeyedNoise, "
                        f"got {type(generator).__name__}")


class KeyedNoise:
    """Random numbers of the images ``index`` [B] (int64; moved to ``device``) under ``seed``."""

    def __init__(self, seed: int, index: Tensor, device=None):
        self.seed = resolve_seed(seed)
        if not isinstance(index, Tensor) or index.dim() != 1:
            raise ValueError(f"index must be a 1-D tensor of image indices, got "
                             f"{tuple(index.shape) if isinstance(index, Tensor) else type(index).__name__}")
        device = torch.device(device) if device is not None else index.device
        # no conversion where none is needed (under torch.compile, no graph node for it)
        if index.dtype != torch.int64 or index.device != device:
            index = index.to(device=device, dtype=torch.int64)
        self.index = index
        self.device = self.index.device

    @property
    def batch(self) -> int:
        return self.index.shape[0]

    def normal(self, rows: int, dim: int, stream: int, step=0, row_start: int = 0,
               dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normals [rows, B, dim]: row r is sample (or chain) ``row_start + r``."""
        from .ops import keyed_normal
        return keyed_normal(self.index, rows, dim, self.seed, stream, step, row_start, dtype)

    def uniform(self, rows: int, dim: int, stream: int, step=0, row_start: int = 0,
                dtype: torch.dtype = torch.float32) -> Tensor:
        """Uniforms in (0, 1) [rows, B, dim]."""
        from .ops import keyed_uniform
        return keyed_uniform(self.index, rows, dim, self.seed, stream, step, row_start, dtype)

    def rows_of(self, chains: int) -> int:
        """Chains per image for ``chains`` chains laid out c = s * B + b."""
        if chains % self.batch:
            raise ValueError(f"keyed noise for {self.batch} images needs a multiple of {self.batch} "
                             f"chains (chain c = s * B + b), got {chains}")
        return chains // self.batch

    def chain_normal(self, chains: int, dim: int, stream: int, step, dtype, row_start: int = 0) -> Tensor:
        """[C, dim] normals for C = S * B chains (chain s * B + b is image b's s-th, keyed as row
        ``row_start + s``)."""
        return self.normal(self.rows_of(chains), dim, stream, step, row_start, dtype).reshape(chains, dim)

    def chain_uniform(self, chains: int, stream: int, step, dtype, row_start: int = 0) -> Tensor:
        return self.uniform(self.rows_of(chains), 1, stream, step, row_start, dtype).reshape(chains)


class _Draws:
    """The state of an active :func:`keyed_draws`: the noise, the first sample's index and the
    next program-order stream."""

    def __init__(self, noise: KeyedNoise, row_start: int, first_stream: int, step):
        self.noise, self.row_start, self.next, self.last = noise, row_start, first_stream, first_stream + _MAX_DRAWS
        self.step = step

    def normal(self, shape, dtype) -> Tensor | None:
        shape = tuple(shape)
        b = self.noise.batch
        if len(shape) == 3 and shape[1] == b:
            rows, dim = shape[0], shape[2]
        elif len(shape) == 2 and shape[0] == b:
            rows, dim = 1, shape[1]
        else:
            return None
        if self.next >= self.last:
            raise RuntimeError(f"keyed_draws: more than {_MAX_DRAWS} random draws in one evaluation step")
        stream, self.next = self.next, self.next + 1
        return self.noise.normal(rows, dim, stream, self.step, self.row_start, dtype).view(shape)


_ACTIVE: list[_Draws] = []


@contextlib.contextmanager
def keyed_draws(noise: KeyedNoise, row_start: int = 0, first_stream: int = STREAMS["draws"], step=0):
    """While active, the package's samplers draw their normals from ``noise``: sample s of image
    b is row ``row_start + s`` of every draw (so chunks of samples continue each other's rows),
    the n-th draw takes stream ``first_stream + n``; ``step`` (an int or an int64 tensor of one
    element, e.g. the trainer's epoch) selects another set of streams."""
    _ACTIVE.append(_Draws(noise, row_start, first_stream, step))
    try:
        yield noise
    finally:
        _ACTIVE.pop()


def standard_normal(shape, dtype, device) -> Tensor:
    """torch.randn(shape), or the keyed normals of the active :func:`keyed_draws` where the
    shape is [rows, B, dim] or [B, dim] for its B images."""
    if _ACTIVE:
        eps = _ACTIVE[-1].normal(shape, dtype)
        if eps is not None:
            return eps.to(device)
    return torch.randn(shape, dtype=dtype, device=device)


def active() -> bool:
    return bool(_ACTIVE)
