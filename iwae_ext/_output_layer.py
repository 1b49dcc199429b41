"""Finding a decoder's output layer in someone else's network, so that the Bernoulli likelihood can
take the fused output layer (``iwae_ext.ops.bernoulli_log_prob``) from its input: used by
:class:`iwae_ext.models.NetworkVAE` and :mod:`iwae_ext.adapters`.

A forward pre-hook on the layer stops the network where the layer is called, with the layer's
input (so the layer itself, the widest product, is not computed twice); a layer qualifies only
when the network's output, on probe latents, equals the layer's output through ``link``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class Captured(BaseException):  # not an Exception: a network's `except Exception` cannot swallow it
    pass


def raise_input(module, args):
    """A forward pre-hook: stop the network here, carrying the layer's input."""
    raise Captured(args[0])


def input_of(layer: nn.Module, fn, *args) -> Tensor:
    """Run ``fn(*args)`` up to the call of ``layer`` and return that call's input."""
    handle = layer.register_forward_pre_hook(raise_input)
    try:
        fn(*args)
    except Captured as c:
        return c.args[0]
    finally:
        handle.remove()
    raise RuntimeError("the network did not call its output layer")


def last_linear(network: nn.Module, width: int) -> nn.Linear | None:
    """``network``'s last ``nn.Linear`` if it has ``width`` outputs and a bias (the candidate for
    its output layer), else None."""
    linears = [m for m in network.modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1].out_features != width or linears[-1].bias is None:
        return None
    return linears[-1]


def find_output_layer(network: nn.Module, outputs, latent_dim: int, width: int, link=None) -> nn.Linear | None:
    """``network``'s :func:`last_linear` when ``outputs(z)`` (the network's output rows
    [N, width] for z [N, Z]) equals ``link`` of that layer's output on probe latents; else None."""
    final = last_linear(network, width)
    if final is None:
        return None
    p = final.weight
    z = torch.randn(3, latent_dim, dtype=p.dtype, device=p.device,
                    generator=torch.Generator(p.device).manual_seed(0)) * 2
    was = network.training
    network.eval()
    try:
        with torch.no_grad():
            full = outputs(z)
            if not isinstance(full, Tensor):
                return None
            try:
                h = input_of(final, outputs, z)
            except (RuntimeError, TypeError, ValueError):
                return None
            mine = nn.functional.linear(h, final.weight, final.bias)
            mine = link(mine) if link is not None else mine
    finally:
        network.train(was)
    tol = 1e-5 if p.dtype == torch.float32 else 1e-12
    full = full.reshape(mine.shape[0], -1)
    return final if mine.shape == full.shape and torch.allclose(mine, full, rtol=tol, atol=tol) else None
