"""AIWAE (Ding and Freedman, Algorithm 1): its gradients, constant memory in T and L, training and
resume from the trainer and the CLI, and `iwae-eval --ais`."""
import json
import math
import os

import pytest
import torch

import iwae_ext
from iwae_ext import cli, samplers
from iwae_ext.models import VAE
from iwae_ext.objectives import aiwae_step

TINY = dict(subset=300, batch_size=50, k=3, hidden=[[20]], latent_dim=[4], eval_k=10,
            train_eval_size=50, progress=False, model="aiwae", temps=3, leapfrog=2)


def small(seed=0):
    torch.manual_seed(seed)
    model = VAE(x_dim=12, latent_dims=(3,), hidden=(8,)).double()
    x = torch.rand(5, 12, dtype=torch.float64).round()
    return model, x


def test_decoder_gradient_is_the_weighted_gradient_of_log_joint():
    """decoder_loss's gradient = -(1/B) sum_b sum_k w~_bk grad_theta log p(x_b, z_bk) at the final
    AIS states, recomputed by hand from the same random numbers; the encoder loss is -ELBO."""
    model, x = small()
    betas = samplers.linear_schedule(4)
    steps = torch.full((3,), 0.1, dtype=torch.float64)
    torch.manual_seed(1)
    a = aiwae_step(model, x, 4, betas, 3, steps)
    dec = list(model.decoder.parameters())
    got = torch.autograd.grad(a.decoder_loss, dec)

    torch.manual_seed(1)
    dens = samplers.model_ais_densities(model, x, 4, "posterior", True, None)
    res = samplers.ais(None, None, dens.z0, betas, 3, grad_fn=dens.grad_fn, temperature_step_sizes=steps)
    w = torch.softmax(res.log_weights.view(4, 5), 0)
    want = [torch.zeros_like(p) for p in dec]
    for kk in range(4):
        for b in range(5):
            lp = model.log_joint(x[b:b + 1], res.z.view(4, 5, 3)[kk, b:b + 1].unsqueeze(0)).sum()
            for acc, g in zip(want, torch.autograd.grad(lp, dec)):
                acc -= w[kk, b] * g / 5
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)
    # the AIS bound is the log-mean-exp of the annealed weights
    torch.testing.assert_close(a.bound, torch.logsumexp(res.log_weights.view(4, 5), 0) - math.log(4))
    assert a.acceptance.shape == (3,) and bool(((a.acceptance >= 0) & (a.acceptance <= 1)).all())


def graph_size(t):
    seen, stack = set(), [t.grad_fn]
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        stack.extend(g for g, _ in f.next_functions)
    return len(seen)


def test_no_graph_through_the_hmc_transitions():
    """The losses' autograd graphs are the same size whatever T and L: nothing of the annealing
    is kept for the backward (memory constant in T and L; the figure is in docs/benchmarks.rst)."""
    model, x = small()
    sizes = set()
    for temps, leapfrog in ((2, 1), (6, 4), (12, 8)):
        a = aiwae_step(model, x, 3, samplers.linear_schedule(temps), leapfrog,
                       torch.full((temps - 1,), 0.1, dtype=torch.float64))
        sizes.add((graph_size(a.decoder_loss), graph_size(a.encoder_loss)))
    assert len(sizes) == 1, sizes


def test_aiwae_trains_resumes_and_adapts_step_sizes(tmp_path):
    full = str(tmp_path / "full")
    m = iwae_ext.train(out=full, epochs=2, **TINY)
    assert math.isfinite(m["test_log_likelihood"])
    lines = [json.loads(line) for line in open(os.path.join(full, "metrics.jsonl"))]
    assert lines[0]["objective"] == "aiwae k=3 T=3 L=2"
    assert len(lines[0]["hmc_acceptance"]) == 2 and len(lines[0]["hmc_step_sizes"]) == 2
    assert lines[0]["hmc_step_sizes"] != [0.1, 0.1]  # adapted
    # stop in the middle of epoch 2 and resume: the same final state, step sizes included
    part = str(tmp_path / "part")
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 8

    r = iwae_ext.train(out=part, epochs=2, should_stop=stop, **TINY)
    assert r["stopped"]
    iwae_ext.train(out=part, resume=True, epochs=2, progress=False)
    a = torch.load(os.path.join(full, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=True)
    for name in a["model_state"]:
        assert torch.equal(a["model_state"][name], b["model_state"][name]), name
    for key in ("hmc_step_sizes", "accept_sum"):
        assert torch.equal(a["train_state"]["kind"][key], b["train_state"]["kind"][key]), key


def test_aiwae_config_errors():
    with pytest.raises(ValueError, match="temps must be an integer >= 2"):
        iwae_ext.train(model="aiwae", temps=1, progress=False)
    with pytest.raises(ValueError, match="leapfrog must be an integer >= 1"):
        iwae_ext.train(model="aiwae", leapfrog=0, progress=False)
    with pytest.raises(ValueError, match="model 'aiwae' needs layers=1"):
        iwae_ext.train(model="aiwae", layers=2, progress=False)
    with pytest.raises(ValueError, match="target_accept"):
        iwae_ext.train(model="aiwae", target_accept=1.0, progress=False)


def test_cli_aiwae_and_eval_ais(tmp_path, capsys):
    out = str(tmp_path / "run")
    rc = cli.train_main(["--model", "aiwae", "--subset", "200", "--batch-size", "50", "--k", "2",
                         "--temps", "3", "--leapfrog", "2", "--hidden", "16", "--latent-dim", "3",
                         "--epochs", "1", "--eval-k", "5", "--train-eval-size", "20", "--out", out,
                         "--no-progress"])
    assert rc == 0
    capsys.readouterr()
    per_point = str(tmp_path / "pp.pt")
    assert cli.eval_main([out, "--k", "50", "--limit", "6", "--ais", "--ais-temps", "50",
                          "--ais-chains", "4", "--ais-leapfrog", "3", "--no-progress",
                          "--per-point", per_point]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ais"]["temps"] == 50 and r["ais"]["chains"] == 4
    assert r["ais_nll"] == pytest.approx(-r["ais_log_likelihood"])
    assert r["nvlb"] == pytest.approx(-r["log_likelihood"])
    assert r["variational_gap"] == pytest.approx(r["ais_log_likelihood"] - r["log_likelihood"])
    pp = torch.load(per_point, weights_only=True)
    assert pp["ais_log_likelihood"].shape == (6,) and pp["ais_log_weights"].shape == (4, 6)
    assert cli.eval_main([out, "--k", "5", "--limit", "2", "--bdmc", "3", "--ais-temps", "20",
                          "--ais-chains", "2", "--ais-leapfrog", "2", "--no-progress"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["bdmc"]["n"] == 3 and r["bdmc"]["gap"] == pytest.approx(r["bdmc"]["upper"] - r["bdmc"]["lower"])


def test_one_backward_gives_each_part_its_own_gradient():
    """encoder_only_elbo=True (what the trainer and DDP use): one backward of decoder_loss +
    encoder_loss gives the decoder the AIS-weighted gradient and the encoder the ELBO's, equal to
    two separate autograd.grad calls on the parameter groups."""
    from iwae_ext.keyed import KeyedNoise, keyed_draws
    model, x = small()
    enc = list(model.encoders.parameters())
    dec = [p for p in model.parameters() if all(p is not q for q in enc)]
    betas = samplers.linear_schedule(4)
    steps = torch.full((3,), 0.1, dtype=torch.float64)
    noise = KeyedNoise(5, torch.arange(x.shape[0]))

    def step(only):
        with keyed_draws(noise, first_stream=0):
            return aiwae_step(model, x, 3, betas, 2, steps, generator=noise, encoder_only_elbo=only)

    a = step(False)
    want = list(torch.autograd.grad(a.decoder_loss, dec)) + list(torch.autograd.grad(a.encoder_loss, enc))
    b = step(True)
    assert torch.equal(a.encoder_loss, b.encoder_loss) and torch.equal(a.decoder_loss, b.decoder_loss)
    got = torch.autograd.grad(b.decoder_loss + b.encoder_loss, dec + enc)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
