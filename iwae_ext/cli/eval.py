"""``iwae-eval`` (also ``python -m iwae_ext.cli.eval``, and under ``torchrun -m iwae_ext.cli.eval``):
evaluate a run's checkpoint, sharded and resumable. The work is in :mod:`iwae_ext.evaluate`."""
from __future__ import annotations

import argparse
import json
import sys

from .._checks import device_problem
from .._distributed import Dist
from ._common import add_threads_flag, apply_threads

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``iwae-eval``."""
    p = argparse.ArgumentParser(
        prog="iwae-eval", description="Evaluate a training run's checkpoint. Under torchrun the images are "
        "split across the processes (gloo on CPUs, NCCL on GPUs) and rank 0 reports.")
    p.add_argument("checkpoint", help="checkpoint.pt or a run directory")
    p.add_argument("--k", type=int, default=5000, help="importance samples for L_k (default 5000)")
    p.add_argument("--split", default="test", help="data split (default test)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate N images, a seeded random choice (default: all)")
    p.add_argument("--dataset", default=None, help="default: the run's data set")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-point", metavar="PATH", help="also save per-data-point L_k and ELBO (.pt)")
    p.add_argument("--out", metavar="DIR",
                   help="write per-image results into DIR as they finish (<split>-<estimator>.rank<r>.jsonl, "
                        "one JSON line per image) and results.json at the end")
    p.add_argument("--resume", action="store_true",
                   help="continue the evaluation in --out: images already there are not computed again")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--report", metavar="DIR",
                   help="write the evaluation report into DIR: metrics.json, report.md and the figures "
                        "(test and train L_k on --limit images each, default 1000)")
    add_threads_flag(p)
    g = p.add_argument_group("AIS (Wu et al., On the Quantitative Analysis of Decoder-Based Generative Models)")
    g.add_argument("--ais", action="store_true",
                   help="also estimate log p(x) by AIS and report the AIS NLL and the variational gap "
                        "(AIS log-likelihood - L_k)")
    g.add_argument("--ais-chains", type=int, default=16, help="chains per data point (default 16)")
    g.add_argument("--ais-temps", type=int, default=10000, help="inverse temperatures (default 10000)")
    g.add_argument("--ais-leapfrog", type=int, default=10, help="leapfrog steps per transition (default 10)")
    g.add_argument("--ais-schedule", choices=["sigmoid", "linear"], default="sigmoid",
                   help="sigmoid (Wu et al.) or linear (Ding and Freedman) (default sigmoid)")
    g.add_argument("--ais-init", choices=["posterior", "prior"], default="posterior",
                   help="start the chains from q(z|x) or p(z) (default posterior)")
    g.add_argument("--ais-precision", choices=["auto", "full", "bf16"], default="auto",
                   help="precision of the gradients inside each HMC trajectory: bf16 (bfloat16 matrix "
                        "products; the energies, the weights and the trajectories' end points stay in the "
                        "model's dtype, so the estimator is the same), full, or auto (bf16 for the "
                        "package's float32 models where the device multiplies bfloat16 faster) "
                        "(default auto)")
    g.add_argument("--bdmc", type=int, default=0, metavar="N",
                   help="also run BDMC on N points simulated from the model with the AIS settings: "
                        "forward (lower) and reverse (upper) bounds of their log p(x)")
    return p


def main(argv=None) -> int:
    import math

    import torch

    from .. import evaluate
    from ..data import DataError, load_dataset
    from ..diagnostics import summarize
    from ..trainer import load_checkpoint

    p = parser()
    args = p.parse_args(argv)
    for name in ("k", "batch_size", "ais_chains", "ais_temps", "ais_leapfrog"):
        value = getattr(args, name)
        if value < (2 if name == "ais_temps" else 1):
            p.error(f"--{name.replace('_', '-')} must be >= {2 if name == 'ais_temps' else 1}, got {value}")
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be >= 1 (leave it out to evaluate every image), got {args.limit}")
    if args.bdmc < 0:
        p.error(f"--bdmc must be >= 0, got {args.bdmc}")
    if args.resume and not args.out:
        p.error("--resume needs --out (the directory of the evaluation to continue)")
    problem = device_problem(args.device)
    if problem:
        print(f"iwae-eval: error: --device {problem}", file=sys.stderr)
        return 2
    import os
    apply_threads("iwae-eval", args.threads, os.environ.get("RANK", "0") == "0")
    from .. import _sharded_eval
    device = Dist.device_of(args.device)
    try:
        d = Dist(torch.device(device))
    except (RuntimeError, ValueError) as e:
        print(f"iwae-eval: error: could not join the torch.distributed job: {e}", file=sys.stderr)
        return 2
    try:
        model, ckpt = load_checkpoint(args.checkpoint, map_location=device, with_state=True)
        dataset = load_dataset(args.dataset or ckpt["config"]["dataset"], args.data_dir)
        gen = torch.Generator().manual_seed(args.seed)
        if args.split not in dataset.splits:
            raise ValueError(f"--split {args.split}: data set {dataset.name} has the splits "
                             f"{', '.join(sorted(dataset.splits))}")
        x = dataset.batch(args.split, slice(None), gen)
    except (DataError, ValueError, FileNotFoundError, KeyError) as e:
        # a KeyError's str() is its repr: the message alone, without quotes
        print(f"iwae-eval: error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        d.close()
        return 2
    if args.limit is not None and args.limit > x.shape[0]:
        print(f"iwae-eval: error: --limit {args.limit} is larger than the {args.split} split "
              f"({x.shape[0]} images)", file=sys.stderr)
        d.close()
        return 2
    if args.report and d.world > 1:
        print("iwae-eval: error: --report runs in one process (launch it without torchrun)", file=sys.stderr)
        d.close()
        return 2
    ais_settings = (dict(num_chains=args.ais_chains, num_temps=args.ais_temps, num_leapfrog=args.ais_leapfrog,
                         schedule=args.ais_schedule, init=args.ais_init, gradient_precision=args.ais_precision)
                    if args.ais else None)
    if args.report:
        import os

        from ..report import write_report
        run_dir = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(args.checkpoint)
        try:
            m = write_report(model, dataset, args.report, run_dir, args.k, args.limit or 1000, args.batch_size,
                             args.seed, ais_settings, progress=args.progress)
        except (ValueError, ImportError) as e:
            print(f"iwae-eval: error: {e}", file=sys.stderr)
            return 2
        print(json.dumps({k: v for k, v in m.items() if k != "model"}, indent=1))
        print(f"iwae-eval: report written to {os.path.join(args.report, 'report.md')}", file=sys.stderr)
        return 0
    index = torch.arange(x.shape[0])
    if args.limit:  # a random choice, never a prefix (the test split is sorted by digit)
        index = torch.randperm(x.shape[0], generator=gen)[:args.limit]
        x = x[index]
    settings = {"checkpoint_digest": ckpt.get("digest"), "dataset": args.dataset or ckpt["config"]["dataset"],
                "split": args.split, "limit": args.limit, "seed": args.seed, "k": args.k, "ais": ais_settings,
                "bdmc": args.bdmc, "batch_size": args.batch_size}  # the batches fix each image's rounding
    try:
        if args.out:
            _sharded_eval.check_settings(args.out, settings, args.resume, d.rank, d)
        rows = _sharded_eval.run(f"{args.split}-L{args.k}", lambda pos: _lk_rows(model, x, index, pos, args),
                             index, args.batch_size, d, args.out, args.resume, args.progress,
                             f"{args.split} L_{args.k}")
        ais_rows = bdmc_rows = None
        if args.ais:
            ais_rows = _sharded_eval.run(f"{args.split}-ais", lambda pos: _ais_rows(model, x, index, pos, args),
                                     index, args.batch_size, d, args.out, args.resume, args.progress,
                                     f"{args.split} AIS T={args.ais_temps}")
        if args.bdmc:
            points = torch.arange(args.bdmc)
            bdmc_rows = _sharded_eval.run("bdmc", lambda pos: _bdmc_rows(model, pos, args), points,
                                      args.batch_size, d, args.out, args.resume, args.progress,
                                      f"BDMC T={args.ais_temps}")
    except (ValueError, TypeError, FileExistsError) as e:
        print(f"iwae-eval: error: {e}", file=sys.stderr)
        d.close()
        return 2
    if d.rank != 0:  # rank 0 reports what one process would
        d.close()
        return 0
    col = lambda rs, key: torch.tensor([r[key] for r in rs], dtype=torch.float64)  # noqa: E731
    # rows of an evaluation resumed from an earlier version may lack the diagnostics: NaN there
    diag = lambda rs, key: torch.tensor([r.get(key, math.nan) for r in rs], dtype=torch.float64)  # noqa: E731
    ll, elbo_ = col(rows, "log_likelihood"), col(rows, "elbo")
    n = x.shape[0]
    sem = lambda t: float(t.std() / math.sqrt(n)) if n > 1 else None  # noqa: E731
    units = evaluate.active_units(model, x)
    result = {
        "checkpoint": args.checkpoint, "split": args.split, "n": n, "k": args.k,
        "log_likelihood": float(ll.mean()),
        "log_likelihood_stderr": sem(ll),
        "elbo": float(elbo_.mean()),
        "active_units": units["active"],
        "reconstruction_error": float(evaluate.reconstruction_error(model, x).mean()),
        "weights": summarize(diag(rows, "khat"), diag(rows, "ess"), args.k),
    }
    per_point = {"index": index, "log_likelihood": ll, "elbo": elbo_, "log_likelihood_stderr": col(rows, "stderr"),
                 "ess": diag(rows, "ess"), "khat": diag(rows, "khat")}
    if ais_rows is not None:
        a = col(ais_rows, "log_likelihood")
        gap = a - ll
        result.update({
            "ais_log_likelihood": float(a.mean()),
            "ais_nll": -float(a.mean()),
            "ais_log_likelihood_stderr": sem(a),
            "nvlb": -result["log_likelihood"],
            "variational_gap": float(gap.mean()),
            "variational_gap_stderr": sem(gap),
            "ais": {"chains": args.ais_chains, "temps": args.ais_temps, "leapfrog": args.ais_leapfrog,
                    "schedule": args.ais_schedule, "init": args.ais_init,
                    "gradient_precision": ais_rows[0]["gradient_precision"] if ais_rows else args.ais_precision,
                    "acceptance_rate": float(col(ais_rows, "acceptance_rate").mean()),
                    "step_size": float(col(ais_rows, "step_size").mean()),
                    "weights": summarize(diag(ais_rows, "khat"), diag(ais_rows, "ess"), args.ais_chains)},
        })
        per_point["ais_log_likelihood"] = a
        per_point["ais_log_weights"] = torch.tensor([r["log_weights"] for r in ais_rows], dtype=torch.float64).t()
    if bdmc_rows is not None:
        lower, upper = col(bdmc_rows, "lower"), col(bdmc_rows, "upper")
        result["bdmc"] = {"n": args.bdmc, "lower": float(lower.mean()), "upper": float(upper.mean()),
                          "gap": float((upper - lower).mean()), "chains": args.ais_chains,
                          "temps": args.ais_temps, "schedule": args.ais_schedule}
    if args.per_point:
        torch.save(per_point, args.per_point)
    text = json.dumps(result, indent=1)
    if args.out:
        import os
        with open(os.path.join(args.out, "results.json.tmp"), "w") as f:
            f.write(text + "\n")
        os.replace(os.path.join(args.out, "results.json.tmp"), os.path.join(args.out, "results.json"))
    print(text)
    d.close()
    return 0


def _lk_rows(model, x, index, pos, args) -> list[dict]:
    from .. import evaluate
    b = evaluate.bounds(model, x[pos], args.k, pos.shape[0], seed=args.seed, index=index[pos])
    return [{"log_likelihood": float(v), "elbo": float(e), "stderr": float(s), "ess": float(n), "khat": float(kh)}
            for v, e, s, n, kh in zip(b.log_likelihood, b.elbo, b.stderr, b.ess, b.khat)]


def _ais_rows(model, x, index, pos, args) -> list[dict]:
    from .. import evaluate
    a = evaluate.ais_log_likelihood(model, x[pos], args.ais_chains, args.ais_temps, args.ais_leapfrog,
                                    args.ais_schedule, args.ais_init, batch_size=pos.shape[0],
                                    seed=args.seed, index=index[pos], return_details=True,
                                    gradient_precision=args.ais_precision)
    return [{"log_likelihood": float(v), "stderr": float(s), "acceptance_rate": float(r),
             "step_size": float(st), "log_weights": w.tolist(), "gradient_precision": a.gradient_precision,
             "ess": float(n), "khat": float(kh)}
            for v, s, r, st, w, n, kh in zip(a.log_likelihood, a.stderr, a.acceptance_rate, a.step_size,
                                             a.log_weights.t(), a.ess, a.khat)]


def _bdmc_rows(model, pos, args) -> list[dict]:
    import torch

    from .. import evaluate
    device = next(model.parameters()).device
    r = evaluate.bdmc(model, args.bdmc, args.ais_chains, args.ais_temps, args.ais_leapfrog, args.ais_schedule,
                      batch_size=pos.shape[0], generator=torch.Generator(device=device).manual_seed(args.seed + 1),
                      seed=args.seed + 1, points=pos, gradient_precision=args.ais_precision)
    return [{"lower": float(lo), "upper": float(up), "lower_stderr": float(ls), "upper_stderr": float(us)}
            for lo, up, ls, us in zip(r.lower, r.upper, r.lower_stderr, r.upper_stderr)]


if __name__ == "__main__":
    raise SystemExit(main())
