"""Figures (PNG, matplotlib): the 2-D latent manifold, samples, reconstructions from q and from
q_IW, posterior contours (true, q, q_IW), training curves. Each function returns the data it
plotted, so tests check the data rather than pixels.

    python -m iwae_ext.plots manifold RUN_DIR_OR_CHECKPOINT --out manifold.png [--n 20]
    python -m iwae_ext.plots samples RUN_DIR_OR_CHECKPOINT --out samples.png
"""
from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor

__all__ = ["manifold_grid", "tile", "save_image_grid", "manifold", "samples", "reconstructions",
           "posterior_contours", "training_curves", "reconstruction_error_figure"]


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


@torch.no_grad()
def reconstructions(model, x: Tensor, image_shape: tuple[int, int], path: str, k: int = 100,
                    generator: torch.Generator | None = None) -> dict:
    """Three rows: the data, the decoder mean at one z ~ q(z|x), and at one z ~ q_IW(z|x) with k
    proposals (Cremer et al., fig. 3). Returns {"data", "from_q", "from_q_iw"}, each [B, D]."""
    from .samplers import sir
    p = next(model.parameters())
    x = x.to(device=p.device, dtype=p.dtype)
    z_q = sir(model, x, 1, generator=generator)[0]
    z_iw = sir(model, x, k, generator=generator)[0]
    rows = {"data": x, "from_q": model.decoder.mean(model.decode(z_q)),
            "from_q_iw": model.decoder.mean(model.decode(z_iw))}
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(x.shape[0] * 0.6 + 1, 3 * 0.75 + 0.8), dpi=100)
    labels = ("data", "from q (one sample)", f"from q_IW (k = {k})")
    for ax, (name, imgs), label in zip(axes, rows.items(), labels):
        ax.imshow(tile(imgs, image_shape, x.shape[0]).numpy(), cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("Reconstructions: encoder q against importance-resampled q_IW", fontsize=9)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return {name: t.cpu() for name, t in rows.items()}


@torch.no_grad()
def posterior_contours(model, x: Tensor, path: str, ks=(1, 10, 100), num_samples: int = 20000,
                       half_width: float | None = None, n: int = 121, generator: torch.Generator | None = None,
                       max_rows: int = 50_000) -> dict:
    """For one data point x [D] of a model with a 2-D latent: the true posterior p(z|x) on an
    n x n grid (exact up to the grid), q(z|x) on the same grid, and q_IW for each k as a 2-D
    histogram of ``num_samples`` SIR draws (papers 001, 004; at most ``max_rows`` proposals
    through the decoder at once). ``half_width=None`` zooms to the posterior and q (found on a
    coarse grid over [-6, 6]^2); a number fixes the window around q's mean. The panels share the axes around
    the posterior mean. Returns {"grid": [n], "posterior": [n, n], "q": [n, n],
    "q_iw": {k: [n, n]}} (probability per grid cell, rows = second coordinate)."""
    from .samplers import sir
    from . import protocol as _protocol
    device, dtype = _protocol.device_dtype(model, x)
    x = x.reshape(1, -1).to(device=device, dtype=dtype)
    width = _protocol.latent_dim(model, x)
    if width != 2 or len(getattr(model, "latent_dims", (2,))) != 1:
        raise ValueError(f"posterior_contours needs one stochastic layer of width 2, got "
                         f"{getattr(model, 'latent_dims', (width,))}")
    q = model.posterior(x)
    q_mean = q.mean[0].double().cpu()
    if half_width is None:  # zoom: a coarse grid finds the posterior; the window covers it and q
        t = torch.linspace(-6, 6, 241, dtype=torch.float64)
        coarse = torch.cartesian_prod(t, t).to(device=device, dtype=dtype)
        w = torch.softmax(model.log_joint(x, coarse.unsqueeze(1))[:, 0].double(), 0).cpu()
        c = coarse.double().cpu()
        mu = w @ c
        sd = ((c - mu).square() * w[:, None]).sum(0).sqrt().max().clamp(min=float(t[1] - t[0]))
        q_loc, q_sd = q_mean, float(q.stddev[0].max())
        centre = 0.5 * (mu + q_loc)
        half_width = float(4 * max(float(sd), q_sd) + 0.5 * (mu - q_loc).abs().max())
    else:
        centre = q_mean
    axes_t = [torch.linspace(float(c) - half_width, float(c) + half_width, n, dtype=torch.float64) for c in centre]
    zy, zx = torch.meshgrid(axes_t[1], axes_t[0], indexing="ij")
    zz = torch.stack([zx.reshape(-1), zy.reshape(-1)], -1).to(device=device, dtype=dtype)
    post = torch.softmax(model.log_joint(x, zz.unsqueeze(1))[:, 0].double(), 0).reshape(n, n).cpu()
    qd = torch.softmax(q.log_prob(zz.unsqueeze(1))[:, 0].double(), 0).reshape(n, n).cpu()
    step = [float(a[1] - a[0]) for a in axes_t]
    edges = [torch.cat([a - s / 2, a[-1:] + s / 2]) for a, s in zip(axes_t, step)]
    q_iw = {}
    for k in ks:
        chunk = max(1, max_rows // k)  # SIR draws per call: k * chunk rows through the decoder
        z = torch.cat([sir(model, x.expand(min(chunk, num_samples - i), -1), k, generator=generator)[0]
                       for i in range(0, num_samples, chunk)]).double().cpu()
        h = torch.histogramdd(z[:, [1, 0]].contiguous(), bins=[edges[1], edges[0]])[0]
        q_iw[k] = h / num_samples
    plt = _pyplot()
    panels = [("true posterior p(z|x)", post), ("q(z|x)", qd)] + [(f"q_IW, k = {k}", q_iw[k]) for k in ks]
    fig, axs = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2), dpi=100, sharex=True, sharey=True)
    for ax, (title, grid) in zip(axs, panels):
        ax.contourf(axes_t[0].numpy(), axes_t[1].numpy(), grid.numpy(), levels=12, cmap="viridis")
        ax.contour(axes_t[0].numpy(), axes_t[1].numpy(), post.numpy(), levels=5, colors="white", linewidths=0.6)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("z1")
    axs[0].set_ylabel("z2")
    fig.suptitle("Posterior of one image (white: true posterior contours)", fontsize=9)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return {"grid": axes_t, "posterior": post, "q": qd, "q_iw": q_iw}


def training_curves(records, path: str) -> dict:
    """The mean training bound per epoch from ``metrics.jsonl`` records (a path or a list of
    dicts). Returns {"epoch": [...], "train_bound": [...]}."""
    import json
    if isinstance(records, str):
        with open(records) as f:
            records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise ValueError("training_curves: no epochs recorded")
    epochs = [r["epoch"] for r in records]
    bound = [r["train_bound"] for r in records]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(epochs, bound, marker="o", markersize=2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training bound (nats)")
    ax.set_title(records[-1].get("objective", "training"), fontsize=9)
    ax.grid(alpha=0.3)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return {"epoch": epochs, "train_bound": bound}


def reconstruction_error_figure(rows, path: str) -> dict:
    """Kingma and Welling's figure 7 (as reproduced by Nicholson et al.): test reconstruction MSE of the AE and the VAE against the latent
    size, from rows {"latent", "ae_mse", "vae_mse"}. Returns the plotted series."""
    rows = sorted(rows, key=lambda r: r["latent"])
    data = {"latent": [r["latent"] for r in rows], "ae_mse": [r["ae_mse"] for r in rows],
            "vae_mse": [r["vae_mse"] for r in rows]}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
    ax.plot(data["latent"], data["ae_mse"], marker="o", label="autoencoder (squared error)")
    ax.plot(data["latent"], data["vae_mse"], marker="s", label="VAE (ELBO), decoder at the posterior mean")
    ax.set_xlabel("latent size")
    ax.set_ylabel("test reconstruction MSE per pixel")
    ax.set_xticks(data["latent"])
    ax.set_title("Reconstruction error against the latent size", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return data


def main(argv=None) -> int:
    import sys

    from .trainer import load_checkpoint

    p = argparse.ArgumentParser(prog="python -m iwae_ext.plots", description="Figures of a trained run.")
    p.add_argument("figure", choices=["manifold", "samples"])
    p.add_argument("checkpoint", help="checkpoint.pt or a run directory")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--n", type=int, default=20, help="grid size (manifold) or number of samples")
    args = p.parse_args(argv)
    try:
        model, ckpt = load_checkpoint(args.checkpoint, with_state=True)
        name = ckpt["config"]["dataset"]
        shape = {"frey": (28, 20)}.get(name, (28, 28))
        if args.figure == "manifold":
            if tuple(model.latent_dims) != (2,):
                raise ValueError(f"manifold: {args.checkpoint} has latent widths {list(model.latent_dims)}; the "
                                 f"manifold figure needs one stochastic layer of width 2 (--latent-dim 2)")
            manifold(model, shape, args.out, args.n, title=f"{name}: decoder means on the 2-D latent grid")
        else:
            samples(model, shape, args.out, args.n)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"python -m iwae_ext.plots: error: {e}", file=sys.stderr)
        return 2
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
