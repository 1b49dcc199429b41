"""logmeanexp against its eager twin and torch.compile of the twin, forward and
forward+backward, at the shapes of IWAE training and evaluation.

    python benchmarks/bench_logmeanexp.py [--device cpu|cuda] [--dtype float32] [--shapes 100x50 ...]
                                          [--dim -1|0]

Each case first checks that the three agree, then times each (median of >= 20 timed
blocks after warm-up). ``--dim 0`` lays each case out as [K, rows] and reduces along dim 0, as
the bounds reduce their [k, B] log-weights (JSON to logmeanexp-dim0-<device>.json). Prints a torch.utils.benchmark Compare table and writes
benchmarks/results/logmeanexp-<device>.json. On CUDA it also measures the device's copy
bandwidth and reports the forward's fraction of it, and counts the kernels each
direction launches (at the largest shape).
"""
import argparse
import os
import sys

import torch
from torch.utils import benchmark

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, measure, save  # noqa: E402

import iwae_ext  # noqa: E402
from iwae_ext.ops import logmeanexp, logmeanexp_stats, reference  # noqa: E402

SHAPES = [(20, 50), (100, 50), (2000, 50), (20, 5000), (10000, 5000)]


def _shape(text: str) -> tuple:
    try:
        rows, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is ROWSxK, e.g. 100x50, got {text!r}") from None
    if rows < 1 or k < 1:
        raise argparse.ArgumentTypeError(f"a shape needs rows and K >= 1, got {text!r}")
    return rows, k


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    n = 1 << 28  # 1 GiB of float32
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    m = measure(lambda: dst.copy_(src), device, "copy", "", "copy", min_runs=20, block_seconds=0.05)
    return 2 * src.numel() * src.element_size() / m.median


def kernels_launched(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the twin")
    p.add_argument("--shapes", nargs="+", type=_shape, default=SHAPES, metavar="RxK",
                   help="shapes [rows, K] reduced over K (default: " + " ".join(f"{r}x{k}" for r, k in SHAPES) + ")")
    p.add_argument("--dim", type=int, default=-1, choices=[-1, 0],
                   help="-1: [rows, K] reduced along the last dim; 0: [K, rows] reduced along dim 0")
    p.add_argument("--out", help="JSON path (default benchmarks/results/logmeanexp-<device>.json)")
    args = p.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 64  # one compiled graph per shape and direction
    compiled_twin = None if args.no_compile else torch.compile(reference.logmeanexp, dynamic=False)

    rows, results = [], []
    for shape in args.shapes:
        dim = args.dim
        x = torch.randn(shape if dim == -1 else shape[::-1], device=device, dtype=dtype)
        xg = x.clone().requires_grad_()
        g = torch.randn(shape[0], device=device, dtype=dtype)
        variants = {"iwae_ext": logmeanexp, "eager": reference.logmeanexp}
        if compiled_twin is not None:
            variants["compiled"] = compiled_twin
        # Agreement first, forward and gradient, against the eager twin in float64.
        want = reference.logmeanexp(x.double(), dim)
        want_g = reference.logmeanexp_backward(g.double(), x.double(), want, dim)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for name, f in variants.items():
            y = f(xg, dim)
            (gx,) = torch.autograd.grad(y, xg, g)
            torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol, msg=f"{name} forward")
            torch.testing.assert_close(gx.double(), want_g, rtol=tol, atol=tol, msg=f"{name} grad")
        case = {"shape": list(x.shape), "dim": dim, "dtype": args.dtype}
        for name, f in variants.items():
            def fwd(f=f):
                with torch.no_grad():
                    f(x, dim)

            def fwd_bwd(f=f):
                torch.autograd.grad(f(xg, dim), xg, g)

            for direction, fn in (("forward", fwd), ("forward+backward", fwd_bwd)):
                m = measure(fn, device, "logmeanexp", f"{list(x.shape)} dim {dim} {direction}", name)
                rows.append(m)
                case[f"{name}_{direction}_s"] = m.median
        for direction in ("forward", "forward+backward"):
            ours = case[f"iwae_ext_{direction}_s"]
            case[f"speedup_vs_eager_{direction}"] = case[f"eager_{direction}_s"] / ours
            if compiled_twin is not None:
                case[f"speedup_vs_compiled_{direction}"] = case[f"compiled_{direction}_s"] / ours
        results.append(case)
        print(f"{list(x.shape)} dim {dim}: forward x{case['speedup_vs_eager_forward']:.2f}, "
              f"forward+backward x{case['speedup_vs_eager_forward+backward']:.2f} vs eager", flush=True)

    payload = {"op": "logmeanexp", "device": device_name(device), "build": iwae_ext.build_info(),
               "results": results}
    if device == "cuda":
        bw = copy_bandwidth(device)
        payload["copy_bandwidth_bytes_per_s"] = bw
        for case in results:
            n = case["shape"][0] * case["shape"][1] * torch.tensor([], dtype=dtype).element_size()
            case["forward_fraction_of_copy_bandwidth"] = n / case["iwae_ext_forward_s"] / bw
        big = max(args.shapes, key=lambda s: s[0] * s[1])
        x = torch.randn(big if args.dim == -1 else big[::-1], device=device, dtype=dtype, requires_grad=True)
        xd = x.detach()
        y, stats = logmeanexp_stats(xd, args.dim)
        g = torch.ones_like(y)  # made outside the profiled calls: they must launch the op's kernels only
        tag = f"{big[0]}x{big[1]}"
        payload["kernels_forward_" + tag] = kernels_launched(lambda: logmeanexp(xd, args.dim))
        payload["kernels_forward_stats_" + tag] = kernels_launched(lambda: logmeanexp_stats(xd, args.dim))
        payload["kernels_backward_" + tag] = kernels_launched(
            lambda: torch.ops.iwae_ext.logmeanexp_backward(g, xd, y, args.dim, stats))
    benchmark.Compare(rows).print()
    print("saved", save(payload, device, "logmeanexp" if args.dim == -1 else "logmeanexp-dim0", args.out))


if __name__ == "__main__":
    main()
