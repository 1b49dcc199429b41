"""bayes_linear against its eager twin and against naive per-row weights, forward+backward.

    python benchmarks/bench_bayes_linear.py [--device cpu|cuda] [--rows 2500 100000]

Layers (in, out) = (784, 400), (400, 20), (400, 784) of Hernandez-Lobato et al.'s networks, at M rows
(M = 2,500 = batch 100 x k 25, and 100,000). Variants, all float32, gradients to x and to every
parameter with a fixed grad_out:
  iwae_ext  the fused op (two matmuls forward; analytic backward);
  eager     its pure-PyTorch twin (F.linear twice, sqrt, autograd);
  naive     one weight matrix per row, materialised ([M, out, in]), bmm: what drawing the
            weights "per data point and per importance sample" costs without the local
            reparameterization.
The op and the twin are checked equal on the same eps first (naive is equal in distribution
only, which tests/test_bayes_linear.py checks). Time: the op and the eager twin in 21 interleaved
rounds (one timed block of each per round, the order rotating), speedup = the median of the
per-round ratios, with their range; naive: median of >= 5 blocks (torch.utils.benchmark). Peak memory: on CUDA torch.cuda.max_memory_allocated; on the CPU the
growth of the peak resident set (VmHWM over VmRSS with the inputs made) of a fresh
subprocess that runs the variant once. A naive case
whose weights would not fit in memory is reported as such. On CUDA the two cuBLAS matmuls of the
same shapes (forward and backward) are timed as the floor. JSON: benchmarks/results/bayes-linear-<device>.json.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, measure, measure_interleaved, median, save, status_bytes  # noqa: E402

import iwae_ext  # noqa: E402
from iwae_ext.ops import bayes_linear, reference  # noqa: E402

LAYERS = [(784, 400), (400, 20), (400, 784)]
VARIANTS = ("iwae_ext", "eager", "naive")


def inputs(m, n_in, n_out, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    x = t(m, n_in).requires_grad_()
    params = [(t(n_out, n_in) / n_in ** 0.5).requires_grad_(), torch.full((n_out, n_in), -5.0, device=device,
              requires_grad=True), t(n_out).requires_grad_(), torch.full((n_out,), -5.0, device=device,
              requires_grad=True)]
    return x, params, t(m, n_out), t(m, n_out)


def step(variant, x, params, eps, grad_out):
    if variant == "iwae_ext":
        y = bayes_linear(x, *params, eps)
    elif variant == "eager":
        y = reference.bayes_linear(x, *params, eps)
    else:
        y = reference.bayes_linear_per_row_weights(x, *params)
    return torch.autograd.grad(y, [x, *params], grad_out)


def naive_bytes(m, n_in, n_out):
    # weights and their noise [M, out, in], float32, plus the gradient of the weights
    return 3 * m * n_out * n_in * 4


def available_bytes(device):
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def cpu_peak_memory(variant, m, n_in, n_out):
    """Peak RSS growth (bytes) of a fresh process running one forward+backward."""
    out = subprocess.run([sys.executable, __file__, "--_child", variant, str(m), str(n_in), str(n_out)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def child(variant, m, n_in, n_out):
    x, params, eps, g = inputs(1, n_in, n_out, "cpu")
    step(variant, x, params, eps, g)  # load the libraries' lazy state on a one-row problem
    x, params, eps, g = inputs(m, n_in, n_out, "cpu", seed=1)
    before = status_bytes("VmRSS")
    step(variant, x, params, eps, g)
    print(max(0, status_bytes("VmHWM") - before))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, nargs="+", default=[2500, 100000])
    p.add_argument("--rounds", type=int, default=21, help="interleaved rounds of op vs eager (default 21)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory measurements (on the CPU, a fresh process per case)")
    p.add_argument("--out")
    p.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        v, m, i, o = args._child
        return child(v, int(m), int(i), int(o))
    device = args.device
    results = []
    for m in args.rows:
        for n_in, n_out in LAYERS:
            x, params, eps, g = inputs(m, n_in, n_out, device)
            torch.testing.assert_close(bayes_linear(x, *params, eps), reference.bayes_linear(x, *params, eps),
                                       rtol=1e-5, atol=1e-5)
            for a, b in zip(step("iwae_ext", x, params, eps, g), step("eager", x, params, eps, g)):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            case = {"rows": m, "in": n_in, "out": n_out}
            # the op and its eager twin: paired, interleaved rounds (their difference is a few
            # percent on a CPU, the size of a shared machine's drift between two sequential runs)
            fns = {v: (lambda v=v: step(v, x, params, eps, g)) for v in ("iwae_ext", "eager")}
            times = measure_interleaved(fns, device, rounds=args.rounds)
            for variant in ("iwae_ext", "eager"):
                case[f"{variant}_s"] = median(times[variant])
            case["speedup_vs_eager"] = median([e / o for e, o in zip(times["eager"], times["iwae_ext"])])
            case["speedup_vs_eager_range"] = [min(e / o for e, o in zip(times["eager"], times["iwae_ext"])),
                                              max(e / o for e, o in zip(times["eager"], times["iwae_ext"]))]
            for variant in VARIANTS:
                if variant == "naive":
                    if naive_bytes(m, n_in, n_out) > 0.8 * available_bytes(device):
                        case["naive_s"] = None
                        case["naive_note"] = (f"does not fit: needs about {naive_bytes(m, n_in, n_out) / 2**30:.0f} GiB "
                                              f"for the per-row weights, {available_bytes(device) / 2**30:.0f} GiB available")
                        continue
                    fn = lambda: step("naive", x, params, eps, g)  # noqa: E731
                    case["naive_s"] = measure(fn, device, "bayes_linear", f"M={m} ({n_in}, {n_out}) fwd+bwd",
                                              "naive", min_runs=5, block_seconds=0.05).median
                fn = lambda v=variant: step(v, x, params, eps, g)  # noqa: E731
                if args.no_memory:
                    continue
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    fn()
                    torch.cuda.synchronize()
                    case[f"{variant}_peak_bytes"] = torch.cuda.max_memory_allocated() - base
                else:
                    case[f"{variant}_peak_bytes"] = cpu_peak_memory(variant, m, n_in, n_out)
            if device == "cuda":  # the floor: the op's matmuls alone (2 forward, up to 4 backward)
                xd, wd = x.detach(), params[0].detach()
                gd = g.detach()
                def matmuls():
                    torch.mm(xd, wd.t()); torch.mm(xd, wd.t())  # noqa: E702
                    torch.mm(gd, wd); torch.mm(gd.t(), xd); torch.mm(gd.t(), xd); torch.mm(gd, wd)  # noqa: E702
                case["cublas_matmuls_s"] = measure(matmuls, device, "bayes_linear", f"M={m} ({n_in}, {n_out})",
                                                   "matmuls").median
                case["vs_matmuls"] = case["iwae_ext_s"] / case["cublas_matmuls_s"]
            if case.get("naive_s"):
                case["speedup_vs_naive"] = case["naive_s"] / case["iwae_ext_s"]
            results.append(case)
            print(json.dumps({k: (round(v * 1e3, 3) if k.endswith("_s") and v else v) for k, v in case.items()}),
                  flush=True)
    payload = {"op": "bayes_linear", "device": device_name(device), "build": iwae_ext.build_info(),
               "results": results}
    print("saved", save(payload, device, "bayes-linear", args.out))


if __name__ == "__main__":
    main()
