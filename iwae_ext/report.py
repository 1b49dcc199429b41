"""The evaluation report of a trained run: ``iwae-eval CHECKPOINT --report DIR``.

Writes into DIR: ``metrics.json``, ``report.md`` (test and train L_k, ELBO, AIS NLL when asked,
variational and generalisation gaps, active units, reconstruction errors from the encoder mean
and from q_IW) and the figures: samples, reconstructions from q and q_IW, the training curve
(when the run's ``metrics.jsonl`` is there) and, for a 2-D latent, the manifold and the posterior
contours of one test image (true, q, q_IW for k = 1, 10, 100). Any model with posterior(x) and
log_joint(x, z) (:class:`~iwae_ext.protocol.LatentVariableModel`) gets the metrics, the posterior contours
for a 2-D latent and the training curve; the decoder figures (samples, reconstructions, manifold)
need the package's models.
"""
from __future__ import annotations

import json
import math
import os

import torch

from . import evaluate, plots
from . import protocol as _protocol


def _mean_se(t: torch.Tensor) -> tuple[float, float | None]:
    return float(t.mean()), (float(t.std() / math.sqrt(t.numel())) if t.numel() > 1 else None)


def write_report(model, dataset, out_dir: str, run_dir: str | None = None, k: int = 5000, limit: int = 1000,
                 batch_size: int = 100, seed: int = 0, ais: dict | None = None, qiw_k: int = 100,
                 progress: bool = False, posterior_samples: int = 20000) -> dict:
    """Evaluate ``model`` on ``limit`` test and train images (a seeded random choice; 0 = all)
    and write the report, figures and metrics into ``out_dir``. ``ais``: keyword arguments of
    :func:`iwae_ext.evaluate.ais_log_likelihood` to add the AIS NLL (None: no AIS). Returns the
    metrics. ``posterior_samples``: SIR draws per q_IW panel of the posterior figure (2-D latents)."""
    os.makedirs(out_dir, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    def pick(split):
        x = dataset.batch(split, slice(None), gen)
        if limit and limit < x.shape[0]:
            x = x[torch.randperm(x.shape[0], generator=gen)[:limit]]
        return x

    x_test, x_train = pick("test"), pick("train")
    test = evaluate.bounds(model, x_test, k, batch_size, progress=progress)
    train = evaluate.bounds(model, x_train, k, batch_size, progress=progress)
    from .models import VAE
    package = isinstance(model, VAE)
    m = {"n_test": x_test.shape[0], "n_train": x_train.shape[0], "k": k,
         "model": model.config if package else {"class": type(model).__qualname__}}
    m["test_log_likelihood"], m["test_log_likelihood_stderr"] = _mean_se(test.log_likelihood)
    m["train_log_likelihood"], m["train_log_likelihood_stderr"] = _mean_se(train.log_likelihood)
    m["test_elbo"], m["train_elbo"] = float(test.elbo.mean()), float(train.elbo.mean())
    m["test_weights"], m["train_weights"] = test.diagnostics(), train.diagnostics()
    m["variational_gap_test"] = m["test_log_likelihood"] - m["test_elbo"]
    m["generalization_gap"] = m["train_log_likelihood"] - m["test_log_likelihood"]
    m["active_units"] = evaluate.active_units(model, x_test)["active"]
    m["reconstruction_error_mean"] = float(evaluate.reconstruction_error(model, x_test).mean())
    m["reconstruction_error_qiw"] = float(evaluate.reconstruction_error_qiw(model, x_test, qiw_k, batch_size).mean())
    m["qiw_k"] = qiw_k
    if ais is not None:
        a = evaluate.ais_log_likelihood(model, x_test, batch_size=batch_size, progress=progress,
                                        return_details=True, **ais)
        m["ais_log_likelihood"], m["ais_log_likelihood_stderr"] = _mean_se(a.log_likelihood)
        m["ais_nll"] = -m["ais_log_likelihood"]
        m["variational_gap_ais"] = float((a.log_likelihood - test.log_likelihood).mean())
        m["ais"] = dict(ais, gradient_precision=a.gradient_precision)  # what ran ("auto" resolved)
        m["ais_weights"] = a.diagnostics()
    figures, notes = {}, []
    device, dtype = _protocol.device_dtype(model, x_test)
    shape = tuple(dataset.image_shape) if len(dataset.image_shape) == 2 else None
    if not package:
        notes.append("samples, reconstructions and the manifold need the package's models (a decoder); "
                     "not drawn for this model")
    if shape is not None and package:
        plots.samples(model, shape, os.path.join(out_dir, "samples.png"), 64, seed)
        figures["samples.png"] = "64 samples from the model (decoder means)"
        plots.reconstructions(model, x_test[:10], shape, os.path.join(out_dir, "reconstructions.png"), qiw_k,
                              torch.Generator(device).manual_seed(seed))
        figures["reconstructions.png"] = f"10 test images, reconstructed from q and from q_IW (k = {qiw_k})"
        if tuple(model.latent_dims) == (2,) and model.random_weights == "none":
            plots.manifold(model, shape, os.path.join(out_dir, "manifold.png"), 20, "decoder means on the 2-D latent grid")
            figures["manifold.png"] = "the 2-D latent manifold"
    two_d = _protocol.latent_dim(model, x_test[:1].to(device=device, dtype=dtype)) == 2
    if two_d and getattr(model, "random_weights", "none") == "none":
        plots.posterior_contours(model, x_test[0], os.path.join(out_dir, "posterior.png"),
                                 num_samples=posterior_samples, generator=torch.Generator(device).manual_seed(seed))
        figures["posterior.png"] = "posterior of one test image: true (grid), q, q_IW for k = 1, 10, 100"
    curve = os.path.join(run_dir, "metrics.jsonl") if run_dir and os.path.isdir(run_dir) else None
    if curve and os.path.isfile(curve):
        plots.training_curves(curve, os.path.join(out_dir, "training_curves.png"))
        figures["training_curves.png"] = "mean training bound per epoch"
    m["figures"] = figures
    if notes:
        m["notes"] = notes
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(m, f, indent=1)
        f.write("\n")
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(_markdown(m))
    return m


def _cell(text: str) -> str:
    """A table cell's text with its pipes escaped (p(x|z) would otherwise split the cell)."""
    return str(text).replace("|", "\\|")


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _khat_text(w: dict) -> str:
    if w["khat_median"] is None:
        return f"n/a (too few weights: {w['num_weights']})"
    return f"{_num(w['khat_median'])} / {_num(w['khat_max'])}"


def _markdown(m: dict) -> str:
    def se(v):
        return f" +- {v:.2f}" if v is not None else ""
    rows = [
        ("test L_k (log-likelihood estimate)", f"{m['test_log_likelihood']:.2f}{se(m['test_log_likelihood_stderr'])}"),
        ("train L_k", f"{m['train_log_likelihood']:.2f}{se(m['train_log_likelihood_stderr'])}"),
        ("test ELBO", f"{m['test_elbo']:.2f}"), ("train ELBO", f"{m['train_elbo']:.2f}"),
        ("variational gap (L_k - ELBO, test)", f"{m['variational_gap_test']:.2f}"),
        ("generalisation gap (train L_k - test L_k)", f"{m['generalization_gap']:.2f}"),
        ("active units", " / ".join(str(a) for a in m["active_units"])),
        ("reconstruction error, encoder mean (-log p(x|z))", f"{m['reconstruction_error_mean']:.2f}"),
        (f"reconstruction error, q_IW (k = {m['qiw_k']})", f"{m['reconstruction_error_qiw']:.2f}"),
    ]
    for split in ("test", "train"):
        w = m.get(f"{split}_weights")
        if w:
            rows += [(f"{split} weights: Pareto k-hat, median / largest", _khat_text(w)),
                     (f"{split} weights: share of images with k-hat > {_num(w['khat_threshold'])}",
                      "n/a" if w["khat_above_threshold"] is None else f"{100 * w['khat_above_threshold']:.1f}%"),
                     (f"{split} weights: effective sample size, median / smallest (of k)",
                      f"{w['ess_median']:.1f} / {w['ess_min']:.1f}")]
    if "ais_nll" in m:
        rows += [("AIS NLL (test)", f"{m['ais_nll']:.2f}{se(m['ais_log_likelihood_stderr'])}"),
                 ("variational gap (AIS log-likelihood - L_k)", f"{m['variational_gap_ais']:.2f}")]
        w = m.get("ais_weights")
        if w:
            rows += [("AIS chain weights: Pareto k-hat, median / largest", _khat_text(w)),
                     ("AIS chain weights: effective sample size, median / smallest (of the chains)",
                      f"{w['ess_median']:.1f} / {w['ess_min']:.1f}")]
    out = ["# Evaluation report", "",
           f"k = {m['k']} importance samples; {m['n_test']} test and {m['n_train']} train images "
           f"(a seeded random choice). Values in nats per image; +- is the standard error over images. "
           f"An image whose weights have a Pareto k-hat above the threshold has an L_k (and a standard "
           f"error) that is not to be trusted: its importance weights are too heavy-tailed.", "",
           "| metric | value |", "| --- | ---: |"]
    out += [f"| {_cell(a)} | {_cell(b)} |" for a, b in rows]
    out += ["", "## Figures", ""]
    out += [f"- ![{name}]({name}) {desc}" for name, desc in m["figures"].items()]
    out += [f"- {note}" for note in m.get("notes", [])]
    return "\n".join(out) + "\n"
