"""Counter-based random numbers keyed by (seed, image, sample, step, stream) (csrc/random.h).

Element (r, b, d) of ``keyed_normal(index, rows, dim, ...)`` depends on (seed, index[b],
row_start + r, step, stream, d) and nothing else, so an image (index[b]) gets the same numbers
whatever batch, chunk, order, process or device count it is drawn in. The numbers are
Philox4x32-10 (Random123's known answers are in the tests) turned into uniforms in (0, 1) and
Box-Muller normals: 53-bit uniforms and double arithmetic for float64, 23-bit uniforms and float
arithmetic for float32 (about torch.randn's cost).
"""
from __future__ import annotations

import torch
from torch import Tensor

MAX_STREAM = 255


def _step(step) -> Tensor:
    if isinstance(step, Tensor):
        return step
    return torch.tensor(int(step), dtype=torch.int64)  # a host scalar: read without a sync


def keyed_normal(index: Tensor, rows: int, dim: int, seed: int, stream: int = 0, step=0,
                 row_start: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normals [rows, B, dim] on index's device for images ``index`` [B] (int64):
    row r is sample ``row_start + r``; ``step`` (an int, or an int64 tensor of one element on
    the host or on index's device, e.g. a temperature counter inside a CUDA graph) and
    ``stream`` (0-255, one per purpose) select independent streams; ``seed`` >= 0 (< 2^64)."""
    return torch.ops.iwae_ext.keyed_random.default(index, _step(step), int(seed), int(stream),
                                                    int(rows), int(row_start), int(dim), True, dtype)


def keyed_uniform(index: Tensor, rows: int, dim: int, seed: int, stream: int = 0, step=0,
                  row_start: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniforms in (0, 1) [rows, B, dim], keyed as :func:`keyed_normal`, never exactly 0 or 1:
    53 random bits each in float64, 23 in float32 (float32 and float64 draws differ)."""
    return torch.ops.iwae_ext.keyed_random.default(index, _step(step), int(seed), int(stream),
                                                    int(rows), int(row_start), int(dim), False, dtype)


@torch.library.register_fake("iwae_ext::keyed_random")
def _keyed_random_fake(index, step, seed, stream, rows, row_start, dim, normal, dtype):
    torch._check(index.dim() == 1, lambda: f"keyed_random: index must have shape [B], got {list(index.shape)}")
    torch._check(index.dtype == torch.int64, lambda: f"keyed_random: index must be int64, got {index.dtype}")
    torch._check(dtype in (torch.float32, torch.float64),
                 lambda: f"keyed_random: dtype must be float32 or float64, got {dtype}")
    return index.new_empty((rows, index.shape[0], dim), dtype=dtype)
