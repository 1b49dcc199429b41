"""What the command lines share: argument types that name the flag, the thread count, the device."""
from __future__ import annotations

import argparse
import sys

__all__ = ["positive_int", "non_negative_int", "positive_float", "hidden_widths", "int_list",
           "add_threads_flag", "apply_threads", "check_device"]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def non_negative_int(text: str) -> int:
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def at_least(n: int):
    def check(text: str) -> int:
        v = _int(text)
        if v < n:
            raise argparse.ArgumentTypeError(f"must be an integer >= {n}, got {v}")
        return v
    check.__name__ = f"integer >= {n}"
    return check


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v > 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return v


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive widths, got {text!r}")
    return values


def hidden_widths(text: str) -> list[list[int]]:
    """'200,200' (one stochastic layer) or '200,200/100,100' (two)."""
    return [int_list(part) for part in text.split("/")]



def add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads for torch's kernels and ours (default: OMP_NUM_THREADS, else one "
                        "per core; torchrun sets 1 per process). On a shared or loaded machine fewer "
                        "threads are often much faster: try --threads 1")


def apply_threads(prog: str, threads: int | None, speak: bool) -> int:
    """Set torch's intra-op (OpenMP) thread count if asked, and say (on stderr) what is used."""
    import os

    import torch
    if threads is not None:
        torch.set_num_threads(threads)
    n = torch.get_num_threads()
    if speak:
        source = ("--threads" if threads is not None else
                  "OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS") else "one per core")
        print(f"{prog}: {n} CPU thread{'s' if n != 1 else ''} ({source})", file=sys.stderr, flush=True)
    return n


def check_device(name: str) -> str | None:
    """None if ``name`` is a device this process can use, else a one-line reason."""
    import torch
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        return f"--device {name!r} is not a device (cpu, cuda, cuda:1)"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "CUDA_VISIBLE_DEVICES hides every GPU or no driver is loaded")
            return f"--device {name}: no CUDA device is visible ({why})"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible"
    elif dev.type != "cpu":
        return f"--device {name}: only cpu and cuda are supported"
    return None
