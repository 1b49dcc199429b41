"""The experiments of Nicholson, Tebbutt and Budzianowski's reproduction of Kingma and Welling's
Auto-Encoding Variational Bayes (paper 003), one command each:

    python benchmarks/reproduce.py paper003 EXPERIMENT [--workers 2] [--shard i/n] [--time-limit S]
    python benchmarks/reproduce.py paper003 EXPERIMENT --report   # the figure and table only
    python benchmarks/reproduce.py paper003 list

Each experiment is a sweep of independent trainings (benchmarks/sweep.py): ``--workers N`` trains
N at a time with one thread each, ``--shard i/n`` takes every n-th run (cluster arrays), and a
finished run leaves benchmarks/results/paper003/EXPERIMENT/<run>.json (committed; such runs are
skipped, a stopped run continues from its checkpoint under --work-dir). When every run of the
experiment has its file, the figure (docs/figures/paper003-EXPERIMENT.png) and the table
(benchmarks/results/paper003/EXPERIMENT.md) are written.

The protocol is the report's where it gives one and Kingma and Welling's where it is silent;
the rest is ours and said so (PROTOCOL below). ``--smoke``: tiny budgets and a reduced grid (the
test suite's run), into a separate results directory.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from common import median  # noqa: E402
from sweep import Run, history_records, load_results, parse_shard, result_path, run_sweep, write_json  # noqa: E402

TITLE = ("Nicholson, Tebbutt, Budzianowski: reproduction of Kingma and Welling, "
         "Auto-Encoding Variational Bayes")
PROTOCOL = (
    "Both data sets as bundled or in ../shared/data: binarized MNIST (50,000 training, 10,000 test "
    "images; Bernoulli decoder) and Frey Face (1,565 training, 200 test; Gaussian decoder). One "
    "hidden layer of 500 tanh units for MNIST and 200 for Frey Face in the encoder and the "
    "decoder (Kingma and Welling's sizes), the ELBO estimator L^B (closed-form KL) with L samples "
    "per data point, Adam at lr 1e-3 (ours: Kingma and Welling used Adagrad with a weight prior), "
    "seed 0, one thread per run. Bounds are per data point in nats: the ELBO on the whole test "
    "split and on the whole training split (Frey) or 2,000 training images (MNIST), estimated "
    "with 100 samples per image.")

# sigma^2 = 1e-3 for every weight started from a trained VAE (the report's second attempt):
# sigma = softplus(rho)
FROM_VAE_RHO = math.log(math.expm1(math.sqrt(1e-3)))
MNIST = {"dataset": "binarized_mnist", "model": "vae", "k": 1, "hidden": [[500]], "batch_size": 100,
         "eval_k": 100, "train_eval_size": 2000, "compile": False}
FREY = {"dataset": "frey", "model": "vae", "hidden": [[200]], "latent_dim": [10], "eval_k": 100,
        "train_eval_size": 0, "compile": False}


@dataclasses.dataclass
class Experiment:
    name: str
    section: str
    what: str
    budget: str  # the training budget and how it relates to the report's
    runs: list  # (name, config) pairs
    smoke_names: list  # the runs the smoke test keeps
    finding: str  # the report's own finding, quoted in spirit
    starts_from: dict = dataclasses.field(default_factory=dict)  # run -> the run whose weights it starts from
    reconstructions: bool = False  # keep the test MSE and a few reconstructions of every run
    timed: bool = False  # also time the runs' training steps against each other (time_steps)


def _mnist_epochs(smoke):
    return 2 if smoke else 100


def experiments(data_dir: str | None = None, smoke: bool = False) -> dict[str, Experiment]:
    extra = {"data_dir": data_dir} if data_dir else {}
    tiny = {"subset": 120, "train_eval_size": 40, "eval_k": 5} if smoke else {}
    mnist_epochs = _mnist_epochs(smoke)
    seen = f"{mnist_epochs * (tiny['subset'] if smoke else 50_000):,} training samples"
    mnist = dict(MNIST, epochs=mnist_epochs, test_every=1 if smoke else 5, **extra, **tiny)
    frey = dict(FREY, epochs=2 if smoke else 2000, **extra, **tiny)
    exps = {}

    runs = [(f"L{L}-M{M}", dict(frey, k=L, batch_size=M)) for M in (20, 60, 100, 140) for L in range(1, 9)]
    exps["samples-vs-batch"] = Experiment(
        "samples-vs-batch", "4.2, figure 3",
        "Frey Face: L = 1..8 samples per data point against batch size M in {20, 60, 100, 140}, "
        "N_z = 10 (ours: the report does not give it), 2,000 epochs each, 32 models",
        "the report's 2,000 epochs", runs, ["L1-M20", "L2-M20", "L1-M100", "L2-M100"],
        "test bound best at L = 2, M = 100, and invariant to L for M > 20; train bound best at "
        "M = 20, where L matters most; for larger M the train bound is invariant to L")

    runs = [(f"depth{d}", dict(mnist, hidden=[[500] * d], decoder_hidden=[500], latent_dim=[10]))
            for d in (1, 2, 3, 4)]
    exps["encoder-depth"] = Experiment(
        "encoder-depth", "4.3, figure 4",
        "MNIST: encoders of 1 to 4 hidden layers of 500 units, a decoder of one, N_z = 10",
        f"{mnist_epochs} epochs ({seen}; the report's curves run to about 10^8)",
        runs, ["depth1", "depth2"],
        "two hidden layers slightly better than one; no substantial gain from more; four fail to learn")

    runs = [(f"{kl}-z{z}", dict(mnist, latent_dim=[z], kl=kl)) for z in (3, 5, 10, 20, 200)
            for kl in ("mc", "analytic")]
    exps["estimators"] = Experiment(
        "estimators", "4.4, figure 5",
        "MNIST: L^A (Monte Carlo KL) against L^B (closed-form KL), L = 1, N_z in {3, 5, 10, 20, 200} "
        "(Kingma and Welling's)", f"{mnist_epochs} epochs ({seen})", runs,
        ["mc-z3", "analytic-z3"],
        "L^B substantially better than L^A at L = 1 for every N_z")

    runs = [(act, dict(mnist, latent_dim=[10], activation=act)) for act in ("tanh", "sigmoid", "relu")]
    exps["activations"] = Experiment(
        "activations", "4.5, figure 6", "MNIST: tanh, sigmoid and ReLU hidden units, N_z = 10",
        f"{mnist_epochs} epochs ({seen})", runs, ["tanh", "relu"],
        "ReLU learns fastest, with no substantial gain over tanh; sigmoid learns slowest, reaches "
        "the lowest bound and takes about 20% longer per epoch", timed=True)

    ae = dict(mnist, test_every=0, weight_decay=1e-4)
    runs = [(f"{m}-z{z}", dict(ae, model=m, latent_dim=[z])) for z in (2, 5, 10, 20, 50) for m in ("ae", "vae")]
    exps["ae-vs-vae"] = Experiment(
        "ae-vs-vae", "5, figures 7 and 8",
        "MNIST: a vanilla autoencoder (squared error) and the VAE, one hidden layer of 500 tanh units, "
        "the same l2 weight penalty (1e-4, ours) on both, latent sizes 2, 5, 10, 20, 50; "
        "reconstruction MSE per pixel of the decoder mean at the encoder mean on the test split",
        f"{mnist_epochs} epochs", runs, ["ae-z2", "vae-z2"],
        "the VAE reconstructs better than the AE at every latent size, the gap growing with it",
        reconstructions=True)

    full_vb = dict(mnist, latent_dim=[10], model="iwaer", prior_std=1.0)
    runs = [("vae", dict(mnist, latent_dim=[10])), ("full-vb", full_vb),
            ("full-vb-from-vae", dict(full_vb, rho_init=FROM_VAE_RHO))]
    exps["full-vb"] = Experiment(
        "full-vb", "6",
        "MNIST: full variational Bayes (a Gaussian posterior over every weight, N(0, 1) prior, "
        "KL/N per minibatch; --model iwaer --prior-std 1 at k = 1) against the VAE, N_z = 10, "
        "from a fresh start and from the trained VAE (the weights' means at its weights, their "
        "variances 1e-3, as the report's second attempt); reconstruction MSE with one draw of the weights",
        f"{mnist_epochs} epochs (from the VAE: {mnist_epochs} more)", runs,
        ["vae", "full-vb", "full-vb-from-vae"],
        "the bound rises extremely slowly, the training bound much faster than the validation one, "
        "and the model learns to reconstruct nothing, also when started from a trained VAE",
        starts_from={"full-vb-from-vae": "vae"}, reconstructions=True)

    for e in exps.values():
        if smoke:
            e.runs = [(n, c) for n, c in e.runs if n in e.smoke_names]
    return exps


def sweep_runs(exp: Experiment) -> list[Run]:
    return [Run(name, config, init_from_run=exp.starts_from.get(name)) for name, config in exp.runs]


RECON_IMAGES = 8  # test images spread evenly over the split (it is sorted by digit), reconstructed (figure 8)


def reconstruction_extras(run: Run, run_dir: str) -> dict:
    """The test MSE per pixel of the decoder mean at the encoder mean (the same function for the
    AE and the VAE; with random weights, at one seeded draw of them per image) and the
    reconstructions of RECON_IMAGES test images spread evenly over the split, as bytes (0-255,
    base64)."""
    import base64

    import torch

    from iwae_ext import evaluate
    from iwae_ext.data import load_dataset
    from iwae_ext.trainer import load_checkpoint
    from iwae_ext.trainer.loop import _subset
    cfg = run.config
    data = load_dataset(cfg.get("dataset", "binarized_mnist"), cfg.get("data_dir"))
    if cfg.get("subset"):
        data = _subset(data, cfg["subset"], cfg.get("seed", 0))
    x = data.split("test")
    model = load_checkpoint(os.path.join(run_dir, "checkpoint.pt")).eval()
    torch.manual_seed(cfg.get("seed", 0))  # random weights (full-vb): one seeded draw per image
    with torch.no_grad():
        mse = float(evaluate.squared_error(model, x).mean()) / x.shape[1]
        xs = x[torch.linspace(0, x.shape[0] - 1, RECON_IMAGES).round().long()]
        q = model.posterior(xs)
        mean = model.decoder.mean(model.decoder(q.loc))
    def b64(t):
        return base64.b64encode((t.clamp(0, 1) * 255).round().to(torch.uint8).numpy().tobytes()).decode()

    return {"test_mse": mse, "reconstructions": b64(mean), "originals": b64(xs),
            "reconstruction_shape": [xs.shape[0], *data.image_shape]}


def time_steps(exp: Experiment, path: str, rounds: int = 7, steps: int = 50) -> dict:
    """The training step of each run's configuration in this process, one thread, interleaved
    round by round (the order rotating): a per-epoch time from runs that shared the machine
    with other runs compares badly, a ratio from one process does not. Written to ``path``."""
    import statistics
    import time
    from types import SimpleNamespace

    import torch

    from bench_train import trainer_block
    from common import device_name
    from iwae_ext.data import load_dataset
    torch.set_num_threads(1)
    first = exp.runs[0][1]
    data = load_dataset(first["dataset"], first.get("data_dir"))
    blocks = {}
    for name, c in exp.runs:
        args = SimpleNamespace(model=c.get("model", "vae"), k=c.get("k", 1), batch_size=c["batch_size"],
                               estimator="standard", steps=steps, hidden=c["hidden"][0],
                               latent_dim=c["latent_dim"][0], activation=c.get("activation", "tanh"))
        blocks[name] = trainer_block(args, data, torch.device("cpu"), compile=False)
        blocks[name](steps)  # warm-up
    names = list(blocks)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            blocks[n](steps)
            times[n].append((time.perf_counter() - t0) / steps)
    ref = names[0]
    out = {"what": f"{exp.name}: the trainer's step (batch {first['batch_size']}), one thread, {rounds} "
                   f"interleaved rounds of {steps} steps", "device": device_name("cpu"),
           "threads": 1, "date": time.strftime("%Y-%m-%d"),
           "step_ms": {n: 1e3 * statistics.median(t) for n, t in times.items()},
           f"ratio_to_{ref}": {n: statistics.median(a / b for a, b in zip(times[n], times[ref])) for n in names},
           "rounds_ms": {n: [1e3 * v for v in t] for n, t in times.items()}}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, out)
    return out


def redo_extras(run: Run, work_dir: str, results_dir: str) -> bool:
    """Recomputes a finished run's extras from its checkpoint (work_dir/<run>); False when the
    run has no result or no checkpoint here."""
    path = result_path(results_dir, run)
    run_dir = os.path.join(work_dir, run.name)
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(run_dir, "checkpoint.pt"))):
        print(f"paper003: {run.name}: no result or no checkpoint in {run_dir}; its extras are kept")
        return False
    with open(path) as f:
        payload = json.load(f)
    payload["extras"] = reconstruction_extras(run, run_dir)
    write_json(path, payload)
    return True


# ---- reports ------------------------------------------------------------------------------------


def _curve(result, key):
    """(training samples seen, value) at every epoch whose record has key."""
    per_epoch = _n_train(result["metrics"]["config"])
    return [(h["epoch"] * per_epoch, h[key]) for h in history_records(result["history"]) if key in h]


@functools.lru_cache(maxsize=None)
def _n_train_of(dataset: str, data_dir: str | None, subset: int) -> int:
    from iwae_ext.data import load_dataset
    n = load_dataset(dataset, data_dir).split("train").shape[0]
    return min(n, subset) if subset else n


def _n_train(config: dict) -> int:
    """The run's training images (its data set's training split, or its --subset of it)."""
    return _n_train_of(config["dataset"], config.get("data_dir"), config.get("subset") or 0)


def _median_epoch_seconds(result: dict) -> float:
    """The median of a run's per-epoch wall times: what an epoch costs, unmoved by an epoch in
    which the machine paused the run (its mean would carry the pause)."""
    return median(result["history"]["seconds"])


def _table(exp: Experiment, results: dict) -> list[str]:
    lines = [f"# paper003 {exp.name} (section {exp.section})", "", exp.what + ".", "",
             f"Budget: {exp.budget}. Protocol: {PROTOCOL}", ""]
    ae = exp.name == "ae-vs-vae"
    mse = exp.reconstructions and not ae
    median = exp.name == "samples-vs-batch"  # two of its runs were paused inside one epoch
    spe_head = "s/epoch (median)" if median else "s/epoch"
    head = (f"| run | epochs | test MSE per pixel | train MSE (AE) | test ELBO (VAE) | {spe_head} |" if ae else
            f"| run | epochs | test ELBO | train ELBO | test L_100 | {spe_head} |" + (" test MSE per pixel |" if mse else ""))
    lines += [head, "| --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if mse else "")]
    for name, _ in exp.runs:
        m = results[name]["metrics"]
        spe = _median_epoch_seconds(results[name]) if median else m["timings"]["seconds_per_epoch"]
        if ae:
            lines.append(f"| {name} | {m['epochs']} | {results[name]['extras']['test_mse']:.5f} | "
                         f"{m.get('train_mse', float('nan')):.5f} | "
                         f"{m.get('test_elbo', float('nan')):.2f} | {spe:.2f} |")
        else:
            lines.append(f"| {name} | {m['epochs']} | {m['test_elbo']:.2f} | {m['train_elbo']:.2f} | "
                         f"{m['test_log_likelihood']:.2f} | {spe:.2f} |"
                         + (f" {results[name]['extras']['test_mse']:.5f} |" if mse else ""))
    lines += ["", f"The report's finding: {exp.finding}."]
    return lines


def _style(exp: Experiment, name: str) -> dict:
    """A learning curve's label and line: estimators pair L^A (dashed) and L^B (solid) by N_z."""
    if exp.name != "estimators":
        return {"label": name}
    kl, z = name.split("-z")
    zs = sorted({int(n.split("-z")[1]) for n, _ in exp.runs})
    return {"label": f"{'L^A' if kl == 'mc' else 'L^B'}, N_z = {z}", "color": f"C{zs.index(int(z))}",
            "linestyle": "--" if kl == "mc" else "-"}


def _figure(exp: Experiment, results: dict, path: str, steps: dict | None = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if exp.name == "samples-vs-batch":
        Ls = sorted({int(n.split("-")[0][1:]) for n, _ in exp.runs})
        Ms = sorted({int(n.split("-")[1][1:]) for n, _ in exp.runs})
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, key, title in zip(axes, ("train_elbo", "test_elbo"), ("train", "test")):
            grid = [[results[f"L{L}-M{M}"]["metrics"][key] for L in Ls] for M in Ms]
            im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
            ax.set_xticks(range(len(Ls)), Ls)
            ax.set_yticks(range(len(Ms)), Ms)
            ax.set_xlabel("samples per data point L")
            ax.set_ylabel("batch size M")
            ax.set_title(f"{title} ELBO (nats per image)")
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w")
            fig.colorbar(im, ax=ax)
    elif exp.name == "ae-vs-vae":
        import base64

        import numpy as np
        zs = sorted({int(n.split("-z")[1]) for n, _ in exp.runs})
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1.6]})
        for model in ("ae", "vae"):
            ax.plot(zs, [results[f"{model}-z{z}"]["extras"]["test_mse"] for z in zs], "o-", label=model.upper())
        ax.set_xscale("log")
        ax.set_xticks(zs, [str(z) for z in zs])
        ax.minorticks_off()
        ax.set_xlabel("latent size")
        ax.set_ylabel("test reconstruction MSE per pixel")
        ax.legend()
        def images(e, field):
            n, h, w = e["reconstruction_shape"]
            img = np.frombuffer(base64.b64decode(e[field]), dtype=np.uint8).reshape(n, h, w)
            return np.concatenate(list(img), axis=1), n, h

        first = results[f"ae-z{zs[0]}"]["extras"]
        row, n, h = images(first, "originals")
        rows, labels = [row], ["test image"]
        for z in zs:
            for model in ("ae", "vae"):
                rows.append(images(results[f"{model}-z{z}"]["extras"], "reconstructions")[0])
                labels.append(f"{model.upper()} z={z}")
        ax2.imshow(np.concatenate(rows, axis=0), cmap="gray")
        ax2.set_yticks([(i + 0.5) * h for i in range(len(labels))], labels, fontsize=7)
        ax2.set_xticks([])
        ax2.set_title(f"reconstructions of {n} test images", fontsize=10)
    else:
        timed = exp.timed
        fig, axes = plt.subplots(1, 3 if timed else 2, figsize=(15 if timed else 11, 3.6),
                                 gridspec_kw={"width_ratios": [1, 1, 0.6] if timed else [1, 1]})
        for name, _ in exp.runs:
            r = results[name]
            style = _style(exp, name)
            for ax, key, title in zip(axes, ("train_bound", "test_elbo"), ("train", "test")):
                pts = _curve(r, key)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], **style)
                ax.set_xscale("log")
                ax.set_xlabel("training samples seen")
                ax.set_ylabel(f"{title} bound (nats per image)")
        axes[1].sharex(axes[0])
        axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
        if timed:
            names = [n for n, _ in exp.runs]
            if steps:  # the interleaved measurement (time_steps), else the runs' own epochs
                axes[2].bar(names, [steps["step_ms"][n] for n in names])
                axes[2].set_ylabel("ms per training step (one thread)")
                axes[2].set_title("training step, interleaved rounds", fontsize=9)
            else:
                axes[2].bar(names, [results[n]["metrics"]["timings"]["seconds_per_epoch"] for n in names])
                axes[2].set_ylabel("seconds per epoch (one thread)")
                axes[2].set_title("training time", fontsize=9)
    fig.suptitle(f"paper003 {exp.name}: {exp.budget}", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _steps_path(results_dir: str) -> str:
    return results_dir.rstrip(os.sep) + "-steps.json"


def _load_steps(exp: Experiment, results_dir: str):
    """time_steps' measurement of the experiment, if it has one."""
    path = _steps_path(results_dir)
    if exp.timed and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def report(exp: Experiment, results_dir: str, figure_path: str) -> bool:
    """Writes the table (results_dir/../<name>.md, .json) and the figure when every run is done."""
    results = load_results(results_dir, sweep_runs(exp))
    missing = [n for n, _ in exp.runs if n not in results]
    if missing:
        print(f"paper003 {exp.name}: {len(missing)} of {len(exp.runs)} runs not finished "
              f"({', '.join(missing[:6])}{'...' if len(missing) > 6 else ''})")
        return False
    steps = _load_steps(exp, results_dir)
    lines = _table(exp, results)
    if steps:
        ref = next(iter(steps["step_ms"]))
        lines[-2:-2] = ["", f"Training step, {steps['what']} ({steps['device']}, {steps['date']}):", "",
                        "| run | ms per step | against " + ref + " |", "| --- | ---: | ---: |"] + [
            f"| {n} | {ms:.2f} | {steps[f'ratio_to_{ref}'][n]:.3f} |" for n, ms in steps["step_ms"].items()]
    base = results_dir.rstrip(os.sep)
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    summary = {"experiment": exp.name, "section": exp.section, "what": exp.what, "budget": exp.budget,
               "protocol": PROTOCOL, "finding": exp.finding,
               "runs": {n: {**{k: results[n]["metrics"].get(k) for k in
                               ("test_elbo", "train_elbo", "test_log_likelihood", "epochs")},
                               "test_mse": results[n].get("extras", {}).get("test_mse"),
                               "seconds_per_epoch": results[n]["metrics"]["timings"]["seconds_per_epoch"],
                               "median_seconds_per_epoch": _median_epoch_seconds(results[n])}
                        for n, _ in exp.runs}}
    write_json(base + ".json", summary)
    _figure(exp, results, figure_path, steps)
    print("\n".join(lines))
    return True


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reproduce.py paper003", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", help="an experiment's name, or 'list'")
    p.add_argument("--workers", type=int, default=1, help="trainings side by side, one thread each")
    p.add_argument("--shard", default="0/1", help="i/n: every n-th run from the i-th (cluster arrays)")
    p.add_argument("--time-limit", type=float, dest="time_limit",
                   help="seconds after which the running trainings checkpoint and stop")
    p.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "paper003"),
                   help="checkpoints and logs (not committed)")
    p.add_argument("--results-dir", default=None,
                   help="the runs' result files (default benchmarks/results/paper003, smoke: under --work-dir)")
    p.add_argument("--figures-dir", default=None, help="default docs/figures (smoke: under --work-dir)")
    p.add_argument("--data-dir", default=None, help="where frey_faces.npz is (default: $IWAE_EXT_DATA)")
    p.add_argument("--report", action="store_true", help="the table and figure only (no training)")
    p.add_argument("--smoke", action="store_true", help="tiny budgets and a reduced grid")
    p.add_argument("--redo-extras", action="store_true", dest="redo_extras",
                   help="recompute the finished runs' reconstructions from their checkpoints in --work-dir")
    p.add_argument("--time-steps", action="store_true", dest="time_steps",
                   help="(activations) time the training steps again, interleaved in one process")
    return p


def main(argv) -> int:
    p = parser()
    a = p.parse_args(argv)
    exps = experiments(a.data_dir, a.smoke)
    if a.experiment == "list":
        for e in exps.values():
            print(f"{e.name:18s} section {e.section:18s} {len(e.runs):3d} runs; {e.what}")
        return 0
    if a.experiment not in exps:
        p.error(f"experiment must be one of {sorted(exps)} or 'list', got {a.experiment!r}")
    try:
        shard = parse_shard(a.shard)
    except ValueError as e:
        p.error(str(e))
    if a.workers < 1:
        p.error(f"--workers must be >= 1, got {a.workers}")
    exp = exps[a.experiment]
    sub = "paper003-smoke" if a.smoke else "paper003"
    results_root = a.results_dir or (os.path.join(a.work_dir, "results") if a.smoke
                                     else os.path.join(HERE, "results", sub))
    results_dir = os.path.join(results_root, exp.name)
    figures = a.figures_dir or (os.path.join(a.work_dir, "figures") if a.smoke
                                else os.path.join(ROOT, "docs", "figures"))
    figure_path = os.path.join(figures, f"{sub}-{exp.name}.png")
    if not a.report:
        st = run_sweep(sweep_runs(exp), os.path.join(a.work_dir, exp.name), results_dir, workers=a.workers,
                       shard=shard, time_limit=a.time_limit,
                       post=reconstruction_extras if exp.reconstructions else None)
        if st["failed"]:
            print(f"paper003 {exp.name}: failed: {', '.join(st['failed'])}", file=sys.stderr)
            return 1
        if st["waiting"]:
            print(f"paper003 {exp.name}: {', '.join(st['waiting'])} waiting for the run they start from "
                  f"(see above)", file=sys.stderr)
            return 1
        if st["stopped"]:
            print(f"paper003 {exp.name}: stopped; run the same command again to continue "
                  f"({len(st['stopped'])} runs left in this shard)")
            return 0
    if a.redo_extras and exp.reconstructions:  # e.g. after a change to reconstruction_extras
        for run in sweep_runs(exp):
            redo_extras(run, os.path.join(a.work_dir, exp.name), results_dir)
    if exp.timed and (a.time_steps or not os.path.isfile(_steps_path(results_dir))):
        if len(load_results(results_dir, sweep_runs(exp))) == len(exp.runs):
            time_steps(exp, _steps_path(results_dir), *((2, 3) if a.smoke else (7, 50)))
    report(exp, results_dir, figure_path)
    return 0
