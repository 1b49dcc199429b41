"""Figures (PNG, matplotlib): the 2-D latent manifold, samples, reconstructions.

    python -m iwae_ext.plots manifold RUN_DIR_OR_CHECKPOINT --out manifold.png [--n 20]
    python -m iwae_ext.plots samples RUN_DIR_OR_CHECKPOINT --out samples.png
"""
from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor

__all__ = ["manifold_grid", "tile", "save_image_grid", "manifold", "samples"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - matplotlib is in the 'plots' extra
        raise ImportError("figures need matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def manifold_grid(n: int = 20, eps: float = 0.05) -> Tensor:
    """[n*n, 2] latent points: an n x n grid of quantiles in [eps, 1 - eps] mapped through the
    inverse Gaussian CDF (Kingma & Welling, fig. 4); row i of the figure is the second coordinate."""
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    q = torch.linspace(eps, 1 - eps, n, dtype=torch.float64)
    z = torch.distributions.Normal(0.0, 1.0).icdf(q)
    zy, zx = torch.meshgrid(z.flip(0), z, indexing="ij")
    return torch.stack([zx.reshape(-1), zy.reshape(-1)], -1)


def tile(images: Tensor, image_shape: tuple[int, int], ncols: int | None = None, pad: int = 1) -> Tensor:
    """Images [N, H*W] as one [rows*(H+pad)-pad, cols*(W+pad)-pad] picture (padding = 1.0)."""
    h, w = image_shape
    n = images.shape[0]
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    out = torch.ones(nrows * (h + pad) - pad, ncols * (w + pad) - pad)
    for i, img in enumerate(images.detach().float().cpu().reshape(n, h, w)):
        r, c = divmod(i, ncols)
        out[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = img
    return out


def save_image_grid(picture: Tensor, path: str, title: str | None = None):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(picture.shape[1] / 40 + 1, picture.shape[0] / 40 + 1), dpi=100)
    ax.imshow(picture.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


@torch.no_grad()
def manifold(model, image_shape: tuple[int, int], path: str, n: int = 20, title: str | None = None) -> Tensor:
    """Decoder means on the 2-D latent grid of :func:`manifold_grid`, tiled and saved as PNG.

    Needs a one-layer model with a 2-D latent. Returns the decoder means [n*n, D]."""
    if tuple(model.latent_dims) != (2,):
        raise ValueError(f"manifold needs one stochastic layer of width 2, got latent_dims {model.latent_dims}")
    p = next(model.parameters())
    z = manifold_grid(n).to(device=p.device, dtype=p.dtype)
    means = model.decoder.mean(model.decode(z))
    save_image_grid(tile(means, image_shape, n, pad=0), path, title)
    return means


@torch.no_grad()
def samples(model, image_shape: tuple[int, int], path: str, n: int = 100, seed: int = 0) -> Tensor:
    """Decoder means of n draws from the prior, tiled and saved as PNG."""
    x = model.sample(n, mean=True, generator=torch.Generator(next(model.parameters()).device).manual_seed(seed))
    save_image_grid(tile(x, image_shape), path)
    return x


def main(argv=None) -> int:
    from .data import load_dataset
    from .train import load_checkpoint

    p = argparse.ArgumentParser(prog="python -m iwae_ext.plots", description="Figures of a trained run.")
    p.add_argument("figure", choices=["manifold", "samples"])
    p.add_argument("checkpoint", help="checkpoint.pt or a run directory")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--n", type=int, default=20, help="grid size (manifold) or number of samples")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    model, ckpt = load_checkpoint(args.checkpoint, with_state=True)
    name = ckpt["config"]["dataset"]
    shape = {"frey": (28, 20)}.get(name, (28, 28))
    if args.figure == "manifold":
        manifold(model, shape, args.out, args.n, title=f"{name}: decoder means on the 2-D latent grid")
    else:
        samples(model, shape, args.out, args.n)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
