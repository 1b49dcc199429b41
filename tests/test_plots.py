"""Figures: the manifold grid's quantiles, tiling, and PNG files written."""
import pytest
import torch

from iwae_ext import plots
from iwae_ext.models import VAE


def test_manifold_grid_is_gaussian_quantiles():
    z = plots.manifold_grid(5, eps=0.05)
    assert z.shape == (25, 2)
    q = torch.distributions.Normal(0.0, 1.0).cdf(z)
    torch.testing.assert_close(q[:5, 0], torch.linspace(0.05, 0.95, 5, dtype=torch.float64))
    torch.testing.assert_close(q[::5, 1], torch.linspace(0.95, 0.05, 5, dtype=torch.float64))  # top row: high z2


def test_tile_places_images():
    imgs = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4) / 24
    pic = plots.tile(imgs, (2, 2), ncols=3, pad=1)
    assert pic.shape == (2 * 3 - 1, 3 * 3 - 1)
    torch.testing.assert_close(pic[3:5, 6:8], imgs[5].reshape(2, 2))
    assert float(pic[2, 0]) == 1.0  # padding


def test_manifold_and_samples_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    m = VAE(560, (2,), ((10,),), likelihood="gaussian")
    means = plots.manifold(m, (28, 20), str(tmp_path / "m.png"), n=6)
    assert means.shape == (36, 560)
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plots.samples(VAE(784, (3,), ((10,),)), (28, 28), str(tmp_path / "s.png"), n=9)
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="width 2"):
        plots.manifold(VAE(784, (3,), ((10,),)), (28, 28), str(tmp_path / "x.png"))
