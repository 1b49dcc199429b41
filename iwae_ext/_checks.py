"""Argument checks shared by the Python layers; messages name the argument."""
from __future__ import annotations


def check_choice(name: str, value, choices, where: str = ""):
    """Raise ValueError unless ``value`` is one of ``choices``: "<where>: <name> must be one of ..."."""
    if value not in choices:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{name} must be one of {tuple(choices)}, got {value!r}")


def device_problem(name: str) -> str | None:
    """None if this process can use device ``name``, else "<name>: <why not>" (one line)."""
    import torch
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        return f"{name!r} is not a device (cpu, cuda, cuda:1)"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "CUDA_VISIBLE_DEVICES hides every GPU or no driver is loaded")
            return f"{name}: no CUDA device is visible ({why})"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"{name}: only {torch.cuda.device_count()} CUDA device(s) are visible"
    elif dev.type != "cpu":
        return f"{name}: only cpu and cuda are supported"
    return None
