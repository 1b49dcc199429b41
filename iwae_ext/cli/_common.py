"""What the command lines share: argument types that name the flag, and the thread count."""
from __future__ import annotations

import argparse
import sys

__all__ = ["positive_int", "non_negative_int", "positive_float", "hidden_widths", "int_list",
           "add_threads_flag", "apply_threads", "at_least"]


def at_least(n: int, what: str | None = None):
    """An argparse type: an integer >= n (``what`` names the bound in the message)."""
    def check(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < n:
            raise argparse.ArgumentTypeError(f"must be {what or f'an integer >= {n}'}, got {v}")
        return v
    check.__name__ = f"integer >= {n}"
    return check


positive_int = at_least(1, "a positive integer")
non_negative_int = at_least(0, ">= 0")


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
