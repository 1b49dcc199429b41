"""Checkpoints: written atomically (a temporary file, fsynced, then renamed), loaded with
``weights_only=True`` and verified against the sha256 digest of their tensors written with them."""
from __future__ import annotations

import hashlib
import os
import warnings

import torch

from ..models import VAE

__all__ = ["CHECKPOINT_FORMAT", "CorruptCheckpointError", "load_checkpoint", "save_checkpoint",
           "read_checkpoint", "state_digest"]

CHECKPOINT_FORMAT = "iwae_ext.checkpoint/2"
# Format 1 (before the keyed training draws) still loads for evaluation; it cannot be resumed.
READABLE_FORMATS = ("iwae_ext.checkpoint/1", CHECKPOINT_FORMAT)


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read, is not an iwae_ext checkpoint, or whose tensors no
    longer match the digest written with them."""


def save_checkpoint(ckpt: dict, path: str):
    """Write ``ckpt`` with its digest to ``path`` atomically."""
    ckpt["digest"] = state_digest(ckpt)
    _save_atomic(ckpt, path)


def _save_atomic(obj, path: str):
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def state_digest(ckpt: dict) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor of the model and optimizer
    states (in a fixed order): what a checkpoint's "digest" entry records."""
    h = hashlib.sha256()

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"{prefix}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for key in sorted(obj, key=str):
                walk(f"{prefix}/{key}", obj[key])
        elif isinstance(obj, (list, tuple)):
            for i, item in enumerate(obj):
                walk(f"{prefix}/{i}", item)
        else:
            h.update(f"{prefix}={obj!r};".encode())

    walk("model", ckpt["model_state"])
    walk("optimizer", ckpt.get("optimizer_state", {}))
    return h.hexdigest()


def _why_unreadable(path: str, e: Exception, map_location) -> tuple[str, bool]:
    """What is wrong with a file that torch.load(weights_only=True) refused, in our words, and
    whether the file itself is at fault (else it may load elsewhere)."""
    import pickle
    import zipfile
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e) or "Weights only" in str(e):
        return ("it holds pickled Python objects beyond tensors and plain containers, which iwae_ext "
                "never unpickles (it may be another program's file)"), True
    if "CUDA" in str(e) and not torch.cuda.is_available():
        return (f"no CUDA device is visible to load its tensors onto (map_location={map_location!r}, or "
                f"tensors saved on a GPU); the file may be fine: load it with map_location='cpu'"), False
    if zipfile.is_zipfile(path):
        return "a torch.save archive, but damaged or truncated", True
    return "not a file written by torch.save (truncated, or another kind of file)", True


def read_checkpoint(path: str, map_location="cpu") -> dict:
    """A checkpoint file's dict, loaded with weights_only=True, its format checked and its tensors
    verified against the digest written with them (CorruptCheckpointError otherwise)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # e.g. torch's note on the pickle protocol of a foreign file
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        # torch's own message advises loading with weights_only=False: never quoted, never done
        why, file_at_fault = _why_unreadable(path, e, map_location)
        advice = ". Use an earlier checkpoint or train again" if file_at_fault else ""
        raise CorruptCheckpointError(f"{path} is not a readable iwae_ext checkpoint here: {why}{advice}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE_FORMATS:
        raise CorruptCheckpointError(f"{path} is not an iwae_ext checkpoint (format {CHECKPOINT_FORMAT})")
    want = ckpt.get("digest")
    if want is None:
        warnings.warn(f"{path} was written without a digest (an older iwae_ext); its tensors are not "
                      f"verified", stacklevel=3)
    elif state_digest(ckpt) != want:
        raise CorruptCheckpointError(
            f"{path} is corrupt: its tensors do not match the sha256 digest written with them "
            f"(bytes changed on disk after it was saved). Use an earlier checkpoint or train again")
    return ckpt


def load_checkpoint(path: str, map_location="cpu", with_state: bool = False, encoder_net=None, decoder_net=None):
    """The model of a training run's checkpoint (in eval mode), loaded with weights_only=True.

    ``with_state=True`` returns (model, checkpoint dict) instead. A run of the user's own
    networks (``train(encoder_net=..., decoder_net=...)``) needs them again, built as for the run: the
    checkpoint holds their weights and names their classes, but cannot hold their code.
    """
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    ckpt = read_checkpoint(path, map_location)
    cfg = ckpt["model_config"]
    if cfg.get("class") == "NetworkVAE":
        if encoder_net is None or decoder_net is None:
            raise ValueError(f"{path} holds a run of your own networks ({cfg['encoder']} and {cfg['decoder']}): "
                             f"its weights are there, their code is not. Build them as for the run and pass "
                             f"load_checkpoint(path, encoder_net=..., decoder_net=...)")
        from ..models import NetworkVAE
        model = NetworkVAE(encoder_net, decoder_net, cfg["latent_dim"], cfg["likelihood"],
                           tuple(cfg["input_shape"]) if cfg.get("input_shape") else None, cfg.get("x_dim"))
        for part in ("encoder", "decoder"):
            if model.config[part] != cfg[part]:
                raise ValueError(f"load_checkpoint: the run's {part} was a {cfg[part]}, the one given is a "
                                 f"{model.config[part]}")
        model.load_state_dict(ckpt["model_state"])
        model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
        model.eval()
        return (model, ckpt) if with_state else model
    if encoder_net is not None or decoder_net is not None:
        raise ValueError(f"load_checkpoint: {path} is a run of the package's MLPs; encoder_net= and decoder_net= are "
                         f"for runs of your own networks")
    model = VAE(**cfg)
    model.load_state_dict(ckpt["model_state"])
    model.eval()
    return (model, ckpt) if with_state else model


