"""AIS throughput: the extension's sampler against an eager PyTorch AIS loop with autograd gradients.

    python benchmarks/bench_ais.py [--device cpu|cuda] [--chains 256 4096] [--temps 20] [--leapfrog 10]
    python benchmarks/bench_ais.py --memory        # AIWAE step peak memory against T and L

Model: the IWAE paper's one-layer architecture (784-200-200-50, tanh, Bernoulli decoder), float32,
on binarized-MNIST test images; C chains (C / 16 images x 16 chains) from q(z|x) to p(x, z), T
temperatures (sigmoid schedule), L leapfrog steps per transition.
  iwae_ext  iwae_ext.evaluate's path: fused hmc_leapfrog / hmc_accept ops and the hand-written
            decoder gradient (no autograd graph per step), step sizes from one pilot chain per
            16 (the reported chains' kernels fixed by the pilot, so the estimate is unbiased);
  per_chain the same with every chain adapting its step size on its own history (Wu et al.'s
            kernel, which biases the estimate upward): "pilot_cost" is iwae_ext / per_chain;
  authors   an eager loop with the structure of the AIWAE authors' HMC (xqding/AIWAE,
            script/AIWAE_models.py, written anew here): every energy is computed from scratch,
            q(z|x) by running the encoder on x, the gradient by torch.autograd.grad; a
            transition evaluates energy and gradient at its start and at each of the L positions
            (L + 1 gradients) and both energies again for the Metropolis-Hastings test; the
            weights' increment evaluates both densities once more; one step size for all chains,
            adapted from the mean acceptance read back to the host every temperature.
  eager     a careful eager loop with exactly our arithmetic (cached densities, L gradients per
            transition, per-chain step sizes, no host reads), gradients by autograd: what fusing
            and the hand-written gradient gain on their own.
  matmuls   the floor: only the decoder's six matrix products per leapfrog step (three forward,
            three backward in z) at the same shapes, which any implementation must do; their
            ratio to each variant bounds what any implementation could gain over it.
  iwae_ext_bf16  iwae_ext with the gradients at each trajectory's L - 1 interior positions in
            bfloat16 (gradient_precision="bf16"; energies, weights and the trajectories' ends
            in float32: the same estimator), and matmuls_bf16 its floor (the interior products
            in bfloat16; at the end the forward products in float32, the backward in
            bfloat16). "bf16_speedup" is iwae_ext / iwae_ext_bf16, "matmuls_vs_matmuls_bf16"
            the most that lowering the gradients' precision can give at these shapes, and the
            acceptance rates of the two paths (same seed) are reported beside them.
The float32 rows ("iwae_ext", the goals against the authors' loop and the float32 floor) run
with gradient_precision="full".
All run the same schedule and L; the figure is chain-gradient evaluations per second counted as
C x (T - 1) x L / seconds for all three. "eager" is checked to give our log-weights from the same
random numbers, "authors" likewise with adaptation off (float64, a few temperatures). Time:
interleaved rounds, median of per-round ratios.
JSON: benchmarks/results/ais-<device>.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import measure_interleaved, median, save, status_bytes  # noqa: E402

import iwae_ext  # noqa: E402
from iwae_ext import _precision, samplers  # noqa: E402
from iwae_ext.evaluate import default_pilot_chains  # noqa: E402
from iwae_ext.data import load_dataset  # noqa: E402
from iwae_ext.models import VAE  # noqa: E402
from iwae_ext.models.vae import normal_log_prob  # noqa: E402

CHAINS_PER_IMAGE = 16


def model_and_data(chains, device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    ds = load_dataset("binarized_mnist")
    model = VAE(x_mean=ds.mean("train")).to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    b = max(1, chains // CHAINS_PER_IMAGE)
    x = ds.split("test")[:b].to(device=device, dtype=dtype)
    return model, x


def ours(model, x, betas, num_leapfrog, step_size, generator, precision="full", details=False):
    """The evaluation's kernel: CHAINS_PER_IMAGE reported chains per image and the pilot's, the
    trajectories' interior gradients in the model's dtype ("full") or bfloat16 ("bf16")."""
    pilot = default_pilot_chains(CHAINS_PER_IMAGE)
    dens = samplers.model_ais_densities(model, x, CHAINS_PER_IMAGE, "posterior", True, generator, pilot,
                                        gradient_precision=precision)
    res = samplers.ais(None, None, dens.z0, betas, num_leapfrog, step_size, grad_fn=dens.grad_fn,
                       generator=generator, pilot_chains=pilot, num_groups=x.shape[0])
    return res if details else res.log_weights


def per_chain(model, x, betas, num_leapfrog, step_size, generator):
    """Every chain adapting on its own history (Wu et al.'s kernel; biased, kept for comparison)."""
    dens = samplers.model_ais_densities(model, x, CHAINS_PER_IMAGE, "posterior", True, generator,
                                        gradient_precision="full")
    return samplers.ais(None, None, dens.z0, betas, num_leapfrog, step_size, grad_fn=dens.grad_fn,
                        generator=generator, adapt_step_size=True).log_weights


def eager(model, x, betas, num_leapfrog, step_size, generator, target=0.65, decay=0.9, inc=1.02,
          dec=0.98, min_step=1e-4, max_step=1.0):
    """AIS with HMC written with PyTorch ops and autograd (the baseline)."""
    with torch.no_grad():
        q = model.posterior(x)
        loc, logvar = q.loc.repeat(CHAINS_PER_IMAGE, 1), q.logvar.repeat(CHAINS_PER_IMAGE, 1)
        xr = x.repeat(CHAINS_PER_IMAGE, 1)
        z = loc + torch.exp(0.5 * logvar) * torch.randn(loc.shape, dtype=loc.dtype, device=loc.device,
                                                          generator=generator)
    c = z.shape[0]

    def densities(z):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            lq = normal_log_prob(z, loc, logvar)
            lp = model.log_joint(xr, z)
            gq = torch.autograd.grad(lq.sum(), z, retain_graph=True)[0]
            gp = torch.autograd.grad(lp.sum(), z)[0]
        return lq.detach(), lp.detach(), gq, gp

    step = torch.full((c,), step_size, dtype=z.dtype, device=z.device)
    avg = torch.full((c,), target, dtype=z.dtype, device=z.device)
    log_w = torch.zeros(c, dtype=torch.float64, device=z.device)
    lq, lp, gq, gp = densities(z)
    betas = betas.to(z.device)
    for t in range(1, betas.numel()):
        b, b0 = betas[t].to(z.dtype), betas[t - 1]
        log_w += (betas[t] - b0) * (lp.double() - lq.double())
        u0 = -((1 - b) * lq + b * lp)
        gu = -((1 - b) * gq + b * gp)
        p0 = torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=generator)
        e = step.unsqueeze(-1)
        p = p0 - 0.5 * e * gu
        z1 = z + e * p
        for i in range(num_leapfrog):
            nq, np_, ngq, ngp = densities(z1)
            gu = -((1 - b) * ngq + b * ngp)
            if i + 1 < num_leapfrog:
                p = p - e * gu
                z1 = z1 + e * p
            else:
                p = p - 0.5 * e * gu
        u1 = -((1 - b) * nq + b * np_)
        h0 = u0.double() + 0.5 * p0.double().square().sum(-1)
        h1 = u1.double() + 0.5 * p.double().square().sum(-1)
        diff = h0 - h1
        finite = torch.isfinite(h1) & ~torch.isnan(diff)
        a = torch.where(finite, torch.exp(diff.clamp(max=0.0)), torch.zeros_like(diff))
        log_u = torch.rand(c, dtype=z.dtype, device=z.device, generator=generator).log()
        acc = finite & (log_u.double() < diff)
        avg = (decay * avg.double() + (1 - decay) * a).to(z.dtype)
        step = torch.where(avg > target, step * inc, step * dec).clamp(min_step, max_step)
        z = torch.where(acc.unsqueeze(-1), z1, z)
        lq, lp = torch.where(acc, nq, lq), torch.where(acc, np_, lp)
        gq, gp = torch.where(acc.unsqueeze(-1), ngq, gq), torch.where(acc.unsqueeze(-1), ngp, gp)
    return log_w


def authors(model, x, betas, num_leapfrog, step_size, generator, target=0.65, inc=1.02, dec=0.98,
            adapt=True):
    """The AIWAE authors' HMC structure (see the module docstring), float64 weights."""
    xr = x.repeat(CHAINS_PER_IMAGE, 1)

    def log_q(z):
        loc, logvar = model.encoders[0](xr)  # the encoder runs on x at every evaluation
        return normal_log_prob(z, loc, logvar)

    def energy(z, beta):
        with torch.no_grad():
            lq, lp = log_q(z), model.log_joint(xr, z)
        return -(beta * lp + (1 - beta) * lq), lq, lp

    def energy_and_force(z, beta):
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            lq, lp = log_q(z), model.log_joint(xr, z)
            u = -(beta * lp + (1 - beta) * lq)
            (g,) = torch.autograd.grad(u, z, torch.ones_like(u))
        return u.detach(), g

    with torch.no_grad():
        loc, logvar = model.encoders[0](xr)
        z = loc + torch.exp(0.5 * logvar) * torch.randn(loc.shape, dtype=loc.dtype, device=loc.device,
                                                          generator=generator)
    log_w = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
    eps = step_size
    bl = betas.tolist()
    for t in range(1, len(bl)):
        _, lq, lp = energy(z, bl[t])
        log_w += (bl[t] - bl[t - 1]) * (lp.double() - lq.double())
        beta = bl[t]
        p0 = torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=generator)
        _, g = energy_and_force(z, beta)
        p = p0 - 0.5 * eps * g
        q = z
        for i in range(num_leapfrog):
            q = q + eps * p
            _, g = energy_and_force(q, beta)
            if i != num_leapfrog - 1:
                p = p - eps * g
        p = p - 0.5 * eps * g
        u0, _, _ = energy(z, beta)
        u1, _, _ = energy(q, beta)
        h0 = u0.double() + 0.5 * p0.double().square().sum(-1)
        h1 = u1.double() + 0.5 * p.double().square().sum(-1)
        log_u = torch.rand(z.shape[0], dtype=z.dtype, device=z.device, generator=generator).log()
        acc = torch.isfinite(h1) & (log_u.double() < h0 - h1)
        z = torch.where(acc.unsqueeze(-1), q, z)
        if adapt:
            eps = eps * (inc if acc.double().mean().item() > target else dec)  # a host read
    return log_w


def matmul_floor(model, c, temps, num_leapfrog, device, low=False):
    """Only the matrix products any implementation of this AIS loop must do: per leapfrog step
    the decoder's three forward products and the three of its backward in z, at C rows, in
    float32. ``low``: the floor of the bfloat16-gradient path instead: at the L - 1 interior
    positions of each trajectory all six in bfloat16, at its end the three forward products in
    float32 (the exact energy) and the three backward ones in bfloat16."""
    dec = model.decoder
    ws = [m.weight for m in (dec.body[0], dec.body[2], dec.logits)]
    g = torch.Generator(device=device).manual_seed(3)
    hs = [torch.randn(c, w.shape[1], device=device, generator=g) for w in ws]
    gs = [torch.randn(c, w.shape[0], device=device, generator=g) for w in ws]
    lw, lh, lg = ([t.to(torch.bfloat16) for t in ts] for ts in (ws, hs, gs))

    def run():
        for _ in range(temps - 1):
            for step in range(num_leapfrog):
                end = step + 1 == num_leapfrog
                for i in range(3):
                    if not low:
                        torch.mm(hs[i], ws[i].t())
                        torch.mm(gs[i], ws[i])
                        continue
                    torch.mm(hs[i], ws[i].t()) if end else torch.mm(lh[i], lw[i].t())
                    torch.mm(lg[i], lw[i])
    return run


def check_equal(device):
    model, x = model_and_data(64, device, torch.float64)
    betas = samplers.sigmoid_schedule(6)
    a = per_chain(model, x, betas, 3, 0.05, torch.Generator(device=device).manual_seed(1))
    b = eager(model, x, betas, 3, 0.05, torch.Generator(device=device).manual_seed(1))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    g = torch.Generator(device=device).manual_seed(2)
    dens = samplers.model_ais_densities(model, x, CHAINS_PER_IMAGE, "posterior", True, g)
    a = samplers.ais(None, None, dens.z0, betas, 3, 0.05, adapt_step_size=False, grad_fn=dens.grad_fn,
                     generator=g).log_weights
    c = authors(model, x, betas, 3, 0.05, torch.Generator(device=device).manual_seed(2), adapt=False)
    torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9)


def throughput(args, device):
    rows = []
    for chains in args.chains:
        model, x = model_and_data(chains, device)
        c = x.shape[0] * CHAINS_PER_IMAGE
        betas = samplers.sigmoid_schedule(args.temps)
        gen = torch.Generator(device=device).manual_seed(0)
        fns = {"iwae_ext": lambda: ours(model, x, betas, args.leapfrog, 0.05, gen),
               "iwae_ext_bf16": lambda: ours(model, x, betas, args.leapfrog, 0.05, gen, "bf16"),
               "per_chain": lambda: per_chain(model, x, betas, args.leapfrog, 0.05, gen),
               "authors": lambda: authors(model, x, betas, args.leapfrog, 0.05, gen),
               "eager": lambda: eager(model, x, betas, args.leapfrog, 0.05, gen),
               "matmuls": matmul_floor(model, c, args.temps, args.leapfrog, device),
               "matmuls_bf16": matmul_floor(model, c, args.temps, args.leapfrog, device, low=True)}
        if not _precision.fast_bf16(device):
            print(f"bench_ais: {device} has no fast bfloat16 products; timing the bf16 rows anyway", flush=True)
        times = measure_interleaved(fns, device, rounds=args.rounds, block_seconds=0.0)
        evals = c * (args.temps - 1) * args.leapfrog
        row = {"chains": c, "images": x.shape[0], "temps": args.temps, "leapfrog": args.leapfrog}
        for name in fns:
            row[f"{name}_s"] = median(times[name])
            row[f"{name}_grad_evals_per_s"] = evals / median(times[name])
        # what the pilot chains cost against every chain adapting on its own history
        row["pilot_cost"] = median([o / p for o, p in zip(times["iwae_ext"], times["per_chain"])])
        for name in ("authors", "eager", "per_chain"):
            ratios = [e / o for e, o in zip(times[name], times["iwae_ext"])]
            row[f"speedup_vs_{name}"] = median(ratios)
            row[f"speedup_vs_{name}_range"] = [min(ratios), max(ratios)]
        # the matmuls alone: how close ours is to them, and the most any implementation doing
        # them could gain over the two baselines
        row["iwae_ext_vs_matmuls"] = median([o / m for o, m in zip(times["iwae_ext"], times["matmuls"])])
        row["per_chain_vs_matmuls"] = median([o / m for o, m in zip(times["per_chain"], times["matmuls"])])
        for name in ("authors", "eager"):
            row[f"{name}_vs_matmuls"] = median([e / m for e, m in zip(times[name], times["matmuls"])])
        # bfloat16 interior gradients: the speedup over the float32 path, how close to its own
        # matmul floor, and the most that lowering the gradients' precision could give here (the
        # float32 path's time over the bf16 floor, and the two floors' ratio)
        ratios = [f / b for f, b in zip(times["iwae_ext"], times["iwae_ext_bf16"])]
        row["bf16_speedup"] = median(ratios)
        row["bf16_speedup_range"] = [min(ratios), max(ratios)]
        row["bf16_vs_matmuls_bf16"] = median([b / m for b, m in zip(times["iwae_ext_bf16"], times["matmuls_bf16"])])
        row["float32_path_vs_matmuls_bf16"] = median([f / m for f, m in zip(times["iwae_ext"], times["matmuls_bf16"])])
        row["matmuls_vs_matmuls_bf16"] = median([f / m for f, m in zip(times["matmuls"], times["matmuls_bf16"])])
        full = ours(model, x, betas, args.leapfrog, 0.05, torch.Generator(device=device).manual_seed(5), "full", True)
        low = ours(model, x, betas, args.leapfrog, 0.05, torch.Generator(device=device).manual_seed(5), "bf16", True)
        row["acceptance_float32"] = float(full.acceptance_rate.mean())
        row["acceptance_bf16"] = float(low.acceptance_rate.mean())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def full_test_set_estimate(rows, temps=10000, leapfrog=10, images=10000):
    """Seconds for the whole test set with Wu et al.'s protocol at the largest measured chain
    count's rate (an extrapolation; stated as such)."""
    best = max(rows, key=lambda r: r["chains"])
    evals = images * CHAINS_PER_IMAGE * (temps - 1) * leapfrog
    return {"from_chains": best["chains"], "grad_evals": evals,
            "iwae_ext_seconds": evals / best["iwae_ext_grad_evals_per_s"]}


# --- AIWAE training step memory -------------------------------------------------------------------

def memory_child(device, temps, leapfrog):
    from iwae_ext.objectives import aiwae_step
    torch.manual_seed(0)
    ds = load_dataset("binarized_mnist")
    model = VAE(x_mean=ds.mean("train")).to(device)
    x = ds.split("train")[:100].to(device)
    steps = torch.full((temps - 1,), 0.05, dtype=torch.float64, device=device)
    betas = samplers.linear_schedule(temps)

    def once():
        a = aiwae_step(model, x, 5, betas, leapfrog, steps)
        (a.decoder_loss + a.encoder_loss).backward()

    once()  # lazy state
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        once()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    before = status_bytes("VmRSS")
    once()
    return max(0, status_bytes("VmHWM") - before)


def memory(device):
    rows = []
    for temps, leapfrog in ((2, 1), (5, 5), (20, 5), (5, 20), (50, 10)):
        if device == "cuda":
            peak = memory_child(device, temps, leapfrog)
        else:  # a fresh process per setting: the resident-set peak is per process
            out = subprocess.run([sys.executable, __file__, "--_memory_child", str(temps), str(leapfrog)],
                                 capture_output=True, text=True, check=True)
            peak = int(out.stdout.strip().splitlines()[-1])
        rows.append({"temps": temps, "leapfrog": leapfrog, "peak_bytes": peak})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--chains", type=int, nargs="+", default=[256, 4096])
    p.add_argument("--temps", type=int, default=20)
    p.add_argument("--leapfrog", type=int, default=10)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--memory", action="store_true", help="AIWAE training-step peak memory against T and L")
    p.add_argument("--out")
    p.add_argument("--_memory_child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._memory_child:
        print(memory_child("cpu", *args._memory_child))
        return
    device = args.device
    if args.memory:
        payload = {"benchmark": "aiwae_step_memory", "k": 5, "batch": 100, "build": iwae_ext.build_info(),
                   "results": memory(device)}
        print("saved", save(payload, device, "aiwae-memory", args.out))
        return
    try:
        check_equal(device)
        agreement = "equal log-weights (float64, 1e-9)"
    except AssertionError as e:  # reported, and the timing still runs: a GPU window is scarce
        agreement = f"FAILED: {str(e).splitlines()[0]}"
        print(f"bench_ais: the variants disagree ({agreement}); timing them anyway", flush=True)
    t0 = time.perf_counter()
    rows = throughput(args, device)
    payload = {"benchmark": "ais", "model": "784-200-200-50 tanh, Bernoulli", "chains_per_image": CHAINS_PER_IMAGE,
               "agreement": agreement, "build": iwae_ext.build_info(), "results": rows,
               "full_test_set_estimate": full_test_set_estimate(rows), "wall_seconds": time.perf_counter() - t0}
    print("saved", save(payload, device, "ais", args.out))


if __name__ == "__main__":
    main()
