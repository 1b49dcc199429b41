"""The fused Bernoulli output layer (iwae_ext.ops.bernoulli_log_prob) against its pure-PyTorch twin.

    python benchmarks/bench_decoder.py [--device cpu|cuda] [--rounds 15] [--e2e-rounds 3]
                                       [--images 200] [--ais-images 50] [--train-steps 20]
                                       [--skip-e2e] [--skip-train] [--toy] [--out FILE]

1. The op at the shapes the package runs it at, on the default model's decoder (784-200-200-50,
   its initial weights; h = the decoder's last hidden layer): training (k = 5, B = 100 and
   k = 50, B = 20: forward and forward+backward), an L_5000 chunk (500 samples x 100 images,
   the evaluation's max_rows = 50,000: forward) and AIS (4,096 chains: the value and d/dh in one
   pass, what every leapfrog step needs). Variants interleaved round by round in this process:
   op, twin (iwae_ext.ops.reference: the logits in full, x * l, softplus, the sums) and, for the
   forward, the bare matrix product h W^T of the same shape (the GPU goal: the op within 1.2x
   of it). Peak memory of one call of each (CPU: the resident-set peak, reset through
   /proc/self/clear_refs; CUDA: torch.cuda.max_memory_allocated), above what was allocated before.
2. End to end, in this process, interleaved: evaluate.iwae_log_likelihood (k = 5000) on the
   first --images test images and evaluate.ais_log_likelihood (16 chains, 200 temperatures) on
   the first --ais-images, with the model's decoder fused (the default) and with the reference
   path (model.fused = False, what --reference-ops selects); L_5000 at the default chunking
   (max_rows None: 10,000 rows on a CPU) and at 2,000 and 50,000 rows, so that each path is also
   compared at its best; the peak memory of L_5000 both ways; L_5000 and AIS also with the
   output layer cut to its matrix products (the "matmul floor": the bound of any fused epilogue).
3. The default training step (k = 5, B = 100, IWAE, the trainer's own loop, eager and compiled)
   with the decoder fused and with the reference path (logmeanexp fused in both).
CPU goals: L_5000 >= 2x, AIS >= 1.5x, the training step not slower, the peak memory
of L_5000 lower. JSON to benchmarks/results/decoder-<device>.json.
"""
import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, measure_interleaved, median, save, status_bytes, synchronize  # noqa: E402

import iwae_ext  # noqa: E402
from iwae_ext import evaluate, ops  # noqa: E402
from iwae_ext.data import load_dataset  # noqa: E402
from iwae_ext.models import VAE  # noqa: E402
from iwae_ext.ops import reference  # noqa: E402

# name: (leading sample dims, B, what is timed)
SHAPES = {
    "train k=5 B=100": ((5,), 100, "train"),
    "train k=50 B=20": ((50,), 20, "train"),
    "L_5000 chunk 500x100": ((500,), 100, "forward"),
    "AIS 4096 chains": ((), 4096, "ais"),
}


def peak_bytes(fn, device: str) -> int:
    """Memory one call of fn takes at its peak, above what was in use before it."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = status_bytes("VmRSS")
    fn()
    return max(0, status_bytes("VmHWM") - base)


def ratio(times, slow, fast):
    """Median of the per-round ratios slow / fast (> 1: fast is faster)."""
    return statistics.median(a / b for a, b in zip(times[slow], times[fast]))


def op_part(model, x_all, device, rounds, toy=False):
    dec = model.decoder
    w, b = dec.logits.weight.detach(), dec.logits.bias.detach()
    rows = {}
    for name, (lead, batch, what) in SHAPES.items():
        if toy:  # gpu.sh --dry-run: the same code at a tenth of the rows
            lead, batch = tuple(max(1, n // 10) for n in lead), max(1, batch // 10)
        g = torch.Generator(device="cpu").manual_seed(0)
        z = torch.randn(*lead, batch, model.latent_dim, generator=g).to(device)
        x = x_all[torch.arange(batch) % x_all.shape[0]]
        with torch.no_grad():
            h = dec.body(z).contiguous()
        if what == "ais":
            fns = {"op": lambda: ops.bernoulli_log_prob_grad_h(h, w, b, x),
                   "twin": lambda: reference.bernoulli_log_prob_grad_h(h, w, b, x)}
        else:
            fns = {"op": lambda: ops.bernoulli_log_prob(h, w, b, x),
                   "twin": lambda: reference.bernoulli_log_prob(h, w, b, x),
                   "matmul": lambda: torch.mm(h.reshape(-1, h.shape[-1]), w.t())}
        with torch.no_grad():
            times = measure_interleaved(fns, device, rounds)
            mem = {k: peak_bytes(f, device) for k, f in fns.items()}
        row = {"h": list(h.shape), "x": list(x.shape), "weight": list(w.shape),
               "ms": {k: 1e3 * median(v) for k, v in times.items()},
               "op_speedup_vs_twin": ratio(times, "twin", "op"), "peak_mib": {k: v / 2 ** 20 for k, v in mem.items()}}
        if "matmul" in times:
            row["op_over_matmul"] = ratio(times, "op", "matmul")
        if what == "train":
            hg, wg, bg = (t.clone().requires_grad_() for t in (h, w, b))

            def fb(fn):
                def run():
                    fn(hg, wg, bg, x).sum().backward()
                    hg.grad = wg.grad = bg.grad = None
                return run
            fb_fns = {"op": fb(ops.bernoulli_log_prob), "twin": fb(reference.bernoulli_log_prob)}
            fb_times = measure_interleaved(fb_fns, device, rounds)
            row["fwd_bwd_ms"] = {k: 1e3 * median(v) for k, v in fb_times.items()}
            row["fwd_bwd_op_speedup_vs_twin"] = ratio(fb_times, "twin", "op")
            row["fwd_bwd_peak_mib"] = {k: peak_bytes(f, device) / 2 ** 20 for k, f in fb_fns.items()}
        rows[name] = row
        msg = f"{name:24s} op {row['ms']['op']:8.3f} ms  twin {row['ms']['twin']:8.3f} ms  x{row['op_speedup_vs_twin']:.2f}"
        if "op_over_matmul" in row:
            msg += f"  op/matmul {row['op_over_matmul']:.2f}"
        if "fwd_bwd_ms" in row:
            msg += (f" | fwd+bwd op {row['fwd_bwd_ms']['op']:.3f} twin {row['fwd_bwd_ms']['twin']:.3f}"
                    f" x{row['fwd_bwd_op_speedup_vs_twin']:.2f}")
        msg += "  peak MiB " + " ".join(f"{k} {v:.1f}" for k, v in row["peak_mib"].items())
        print(msg, flush=True)
    return rows


class _Timed:
    """Interleaved timing of whole evaluations (each call takes seconds): rounds x variants
    (warmed up by the caller)."""

    def __init__(self, fns, device, rounds):
        names = list(fns)
        self.times = {n: [] for n in names}
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                synchronize(device)
                t0 = time.perf_counter()
                fns[n]()
                synchronize(device)
                self.times[n].append(time.perf_counter() - t0)


def fused_as(model, fused, fn):
    def run():
        model.fused = fused
        try:
            return fn()
        finally:
            model.fused = True
    return run


def _matmul_floor(fn):
    """fn with the output layer cut to its matrix products (the value: h W^T, its sum never
    taken; the AIS gradient: h W^T, then that times W), no elementwise work: what the
    evaluation would cost if the fused op's epilogue were free (the estimates are then
    meaningless; only the time is kept). The bound of any output layer built on the BLAS."""
    import iwae_ext.models.vae as vae

    def value(h, w, b, x):
        torch.mm(h.reshape(-1, h.shape[-1]), w.t())
        return h.new_zeros(h.shape[:-1])

    def grad_h(h, w, b, x, value=True, low_weight=None):
        l = torch.mm(h.reshape(-1, h.shape[-1]), w.t())
        return (h.new_zeros(h.shape[:-1]) if value else None), torch.mm(l, w).view(h.shape)

    def run():
        saved = vae.bernoulli_log_prob, vae.bernoulli_log_prob_grad_h
        vae.bernoulli_log_prob, vae.bernoulli_log_prob_grad_h = value, grad_h
        try:
            return fn()
        finally:
            vae.bernoulli_log_prob, vae.bernoulli_log_prob_grad_h = saved
    return run


def _estimate(result):
    return result.log_likelihood if hasattr(result, "log_likelihood") else result


def end_to_end(model, x_test, device, args):
    xl, xa = x_test[:args.images], x_test[:args.ais_images]
    out = {}
    # L_5000 at the default chunking (max_rows None: 10,000 rows on a CPU) and at 2,000 and
    # 50,000 rows (the old default), so that each path is also compared at its best chunking
    rows_grid = [None, 2000, 50000]
    fns = {}
    for mr in rows_grid:
        tag = "default" if mr is None else str(mr)
        run = (lambda m: lambda: evaluate.iwae_log_likelihood(model, xl, k=5000, seed=1, max_rows=m))(mr)
        fns[f"fused@{tag}"] = fused_as(model, True, run)
        fns[f"reference@{tag}"] = fused_as(model, False, run)
        if mr is None:
            fns["matmul floor@default"] = _matmul_floor(fused_as(model, True, run))
    a, r = fns["fused@default"](), fns["reference@default"]()
    fns["matmul floor@default"]()
    timed = _Timed(fns, device, args.e2e_rounds)
    s = {k: median(v) for k, v in timed.times.items()}
    row_bound = ratio(timed.times, "reference@default", "matmul floor@default")
    best_f = min((k for k in s if k.startswith("fused")), key=s.get)
    best_r = min((k for k in s if k.startswith("reference")), key=s.get)
    row = {"s": s, "per_round_s": timed.times,
           "speedup": ratio(timed.times, "reference@default", "fused@default"),
           "speedup_bound": row_bound,
           "best": {"fused": best_f, "reference": best_r, "speedup": s[best_r] / s[best_f]},
           "mean_estimate": {"fused": float(a.mean()), "reference": float(r.mean())},
           "max_abs_difference_per_image": float((a - r).abs().max()),
           "peak_mib": {k: peak_bytes(fns[f"{k}@default"], device) / 2 ** 20 for k in ("fused", "reference")}}
    out["L_5000"] = row
    print("L_5000   " + "  ".join(f"{k} {v:.2f} s" for k, v in s.items()), flush=True)
    print(f"L_5000   default chunking: x{row['speedup']:.2f} (matmul floor: bound x{row_bound:.2f}); each at its best ({best_f}, {best_r}): "
          f"x{row['best']['speedup']:.2f}; mean estimate {row['mean_estimate']['fused']:.4f} vs "
          f"{row['mean_estimate']['reference']:.4f}; peak MiB fused {row['peak_mib']['fused']:.0f} "
          f"reference {row['peak_mib']['reference']:.0f}", flush=True)
    ais = lambda: evaluate.ais_log_likelihood(model, xa, num_chains=16, num_temps=200, seed=1)  # noqa: E731
    fns = {"fused": fused_as(model, True, ais), "reference": fused_as(model, False, ais),
           "matmul floor": _matmul_floor(ais)}
    a, r = _estimate(fns["fused"]()), _estimate(fns["reference"]())
    fns["matmul floor"]()
    timed = _Timed(fns, device, args.e2e_rounds)
    row = {"s": {k: median(v) for k, v in timed.times.items()}, "per_round_s": timed.times,
           "speedup": ratio(timed.times, "reference", "fused"),
           "speedup_bound": ratio(timed.times, "reference", "matmul floor"),
           "mean_estimate": {"fused": float(a.mean()), "reference": float(r.mean())},
           "max_abs_difference_per_image": float((a - r).abs().max())}
    out["AIS"] = row
    print(f"AIS      fused {row['s']['fused']:.2f} s  reference {row['s']['reference']:.2f} s  "
          f"x{row['speedup']:.2f}  matmul floor {row['s']['matmul floor']:.2f} s (bound "
          f"x{row['speedup_bound']:.2f})  (mean estimate {row['mean_estimate']['fused']:.4f} vs "
          f"{row['mean_estimate']['reference']:.4f})", flush=True)
    return out


def train_part(device, args):
    from bench_train import trainer_block
    dataset = load_dataset()
    targs = argparse.Namespace(k=5, batch_size=100, estimator="standard", steps=args.train_steps)
    out = {}
    for compiled in (False, True):
        fns = {}
        for fused in (True, False):
            block = trainer_block(targs, dataset, torch.device(device), compiled)
            block.run.model.fused = fused
            fns["fused" if fused else "reference"] = (lambda blk: lambda: blk(args.train_steps))(block)
        t0 = time.perf_counter()
        times = measure_interleaved(fns, device, args.rounds, block_seconds=0.0)
        label = "compiled" if compiled else "eager"
        out[label] = {"step_ms": {k: 1e3 * median(v) / args.train_steps for k, v in times.items()},
                      "speedup": ratio(times, "reference", "fused"),
                      "seconds": time.perf_counter() - t0}
        print(f"train step ({label}, k=5, B=100): fused {out[label]['step_ms']['fused']:.2f} ms  "
              f"reference {out[label]['step_ms']['reference']:.2f} ms  x{out[label]['speedup']:.3f}", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds of the op and step timings")
    p.add_argument("--e2e-rounds", type=int, default=3, help="interleaved rounds of the end-to-end evaluations")
    p.add_argument("--images", type=int, default=200, help="test images of the L_5000 measurement")
    p.add_argument("--ais-images", type=int, default=50, help="test images of the AIS measurement")
    p.add_argument("--train-steps", type=int, default=20, help="trainer steps per timed block")
    p.add_argument("--skip-e2e", action="store_true", help="no end-to-end evaluation measurement")
    p.add_argument("--skip-train", action="store_true", help="no training-step measurement")
    p.add_argument("--toy", action="store_true", help="the op at a tenth of the rows, nothing else (gpu.sh --dry-run)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = args.device
    torch.manual_seed(0)
    ds = load_dataset("binarized_mnist")
    model = VAE(x_mean=ds.mean("train")).to(device).eval()
    for q in model.parameters():
        q.requires_grad_(False)
    x_test = ds.split("test").to(device)
    print(f"device: {device_name(device)}; iwae_ext {iwae_ext.__version__}; torch {torch.__version__}", flush=True)
    result = {"model": "784-200-200-50 (initial weights)", "threads": torch.get_num_threads(),
              "op": op_part(model, x_test, device, args.rounds, args.toy)}
    if not (args.skip_e2e or args.toy):
        result["end_to_end"] = end_to_end(model, x_test, device, args)
    if not (args.skip_train or args.toy):
        result["train_step"] = train_part(device, args)
    goals = {}
    if "end_to_end" in result and device == "cpu":
        e = result["end_to_end"]
        goals = {"L_5000 >= 2x": e["L_5000"]["speedup"] >= 2.0, "AIS >= 1.5x": e["AIS"]["speedup"] >= 1.5,
                 "L_5000 peak memory lower": e["L_5000"]["peak_mib"]["fused"] < e["L_5000"]["peak_mib"]["reference"]}
    if "train_step" in result and device == "cpu":
        goals["training step not slower (eager)"] = result["train_step"]["eager"]["speedup"] >= 1.0
        goals["training step not slower (compiled)"] = result["train_step"]["compiled"]["speedup"] >= 1.0
    if device == "cuda":
        worst = max(r["op_over_matmul"] for r in result["op"].values() if "op_over_matmul" in r)
        goals["op within 1.2x of the matmul (every forward shape)"] = worst <= 1.2
    result["goals"] = goals
    for k, v in goals.items():
        print(f"goal {k}: {'met' if v else 'NOT met'}")
    print(save(result, device, "decoder", args.out))


if __name__ == "__main__":
    main()
