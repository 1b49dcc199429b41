"""Shared benchmark helpers: device description, timing with >= 20 runs, JSON output."""
import datetime
import json
import os
import platform
import re
import time

import torch
from torch.utils import benchmark

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = re.search(r"model name\s*:\s*(.*)", f.read())
        cpu = model.group(1).strip() if model else platform.processor()
    except OSError:
        cpu = platform.processor()
    return f"{cpu} ({torch.get_num_threads()} threads)"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn, device: str, label: str, sub_label: str, description: str,
            min_runs: int = 20, block_seconds: float = 0.02):
    """Median over >= min_runs timed blocks (after warm-up) of fn(); a torch Measurement."""
    stmt = "fn(); synchronize(device)"
    timer = benchmark.Timer(
        stmt=stmt,
        globals={"fn": fn, "synchronize": synchronize, "device": device},
        label=label,
        sub_label=sub_label,
        description=description,
        num_threads=torch.get_num_threads(),
    )
    for _ in range(3):  # warm-up (allocator, caches, lazy init)
        fn()
    synchronize(device)
    once = timer.timeit(1).median
    number = max(1, int(block_seconds / max(once, 1e-7)))
    runs = [timer.timeit(number) for _ in range(min_runs)]
    return benchmark.Measurement.merge(runs)[0]


def measure_interleaved(fns: dict, device: str, rounds: int = 21, block_seconds: float = 0.05,
                        warmup: int = 3) -> dict:
    """Paired timing of several variants on a shared, noisy machine: each of ``rounds`` rounds
    times every variant for one block (the order rotating between rounds), so slow phases of the
    machine hit all variants alike. Returns {name: [seconds per call, one per round]}; compare
    variants by the median of their per-round ratios. ``warmup`` calls of each precede the one
    that sizes the blocks (which warms up too: 0 suits calls of seconds)."""
    for fn in fns.values():  # warm-up
        for _ in range(warmup):
            fn()
    synchronize(device)
    number = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        number[name] = max(1, int(block_seconds / max(time.perf_counter() - t0, 1e-7)))
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, n = fns[name], number[name]
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            synchronize(device)
            times[name].append((time.perf_counter() - t0) / n)
    return times


def median(values):
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def status_bytes(key: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS: resident now; VmHWM: its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def save(payload: dict, device: str, name: str, out: str | None) -> str:
    payload = dict(payload)
    payload.setdefault("device", device_name(device))
    payload.setdefault("torch", torch.__version__)
    payload.setdefault("date", datetime.date.today().isoformat())
    path = out or os.path.join(RESULTS, f"{name}-{slug(payload['device'])}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    return path
