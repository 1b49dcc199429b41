"""Per-image determinism, sharded and resumable evaluation: an image's
L_k, AIS and BDMC values do not depend on the batch, the chunking of its samples, the order of
the images or the process computing them; `iwae-eval` under torchrun (2 gloo ranks) equals one
process image for image; a killed evaluation resumes to the numbers of an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal

import iwae_ext
from iwae_ext import evaluate
from iwae_ext._sharded_eval import ResultsFile
from iwae_ext.models import VAE

TINY = dict(subset=300, batch_size=50, k=3, hidden=[[20]], latent_dim=[4], eval_k=10,
            train_eval_size=50, progress=False)


class TorchNormalVAE(nn.Module):
    """A user's model: posterior(x) is a torch.distributions Independent(Normal)."""

    def __init__(self, d=12, z=3):
        super().__init__()
        self.enc, self.dec = nn.Linear(d, 2 * z), nn.Linear(z, d)

    def posterior(self, x):
        loc, log_scale = self.enc(x).chunk(2, -1)
        return Independent(Normal(loc, log_scale.exp()), 1)

    def log_joint(self, x, z):
        prior = Normal(torch.zeros_like(z), torch.ones_like(z)).log_prob(z).sum(-1)
        logits = self.dec(z)
        return prior - nn.functional.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none").sum(-1)


def _models():
    torch.manual_seed(3)
    vae = VAE(x_dim=12, latent_dims=(3,), hidden=[[16]]).double()
    two = VAE(x_dim=12, latent_dims=(3, 2), hidden=[[16], [8]]).double()
    iwaer = VAE.from_deterministic(VAE(x_dim=12, latent_dims=(3,), hidden=[[16]]), "all").double()
    return {"vae": vae, "two_layers": two, "iwaer": iwaer, "torch_normal": TorchNormalVAE().double()}


@pytest.mark.parametrize("name", ["vae", "two_layers", "iwaer", "torch_normal"])
def test_bounds_of_an_image_do_not_depend_on_batch_chunks_or_order(name):
    model = _models()[name]
    x = (torch.rand(11, 12, generator=torch.Generator().manual_seed(0)) > 0.5).double()
    whole = evaluate.bounds(model, x, k=60, batch_size=11, seed=9)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(1))
    other = evaluate.bounds(model, x[perm], k=60, batch_size=3, max_rows=40, seed=9, index=perm)
    for a, b in ((whole.log_likelihood[perm], other.log_likelihood), (whole.elbo[perm], other.elbo),
                 (whole.stderr[perm], other.stderr)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    one = evaluate.bounds(model, x[4:5], k=60, batch_size=1, max_rows=7, seed=9, index=torch.tensor([4]))
    torch.testing.assert_close(one.log_likelihood, whole.log_likelihood[4:5], rtol=1e-13, atol=1e-13)
    assert not torch.equal(evaluate.bounds(model, x, k=60, seed=10).log_likelihood, whole.log_likelihood)


def test_bounds_stderr_is_the_delta_method_over_the_k_weights():
    model = _models()["vae"]
    x = (torch.rand(5, 12, generator=torch.Generator().manual_seed(0)) > 0.5).double()
    from iwae_ext.keyed import KeyedNoise, keyed_draws
    with torch.no_grad(), keyed_draws(KeyedNoise(2, torch.arange(5))):
        log_w = model.log_weights(x, 300)
    b = evaluate.bounds(model, x, k=300, max_rows=50, seed=2)
    torch.testing.assert_close(b.stderr, evaluate.log_mean_exp_stderr(log_w.double()), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b.log_likelihood, torch.logsumexp(log_w.double(), 0) - torch.log(torch.tensor(300.)).double())


@pytest.mark.parametrize("init", ["posterior", "prior"])
@pytest.mark.parametrize("name", ["vae", "torch_normal"])
def test_ais_of_an_image_does_not_depend_on_its_batch(name, init):
    model = _models()[name]
    if name == "torch_normal" and init == "prior":
        model.prior = lambda: Independent(Normal(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)), 1)
    x = (torch.rand(7, 12, generator=torch.Generator().manual_seed(0)) > 0.5).double()
    kw = dict(num_chains=3, num_temps=30, num_leapfrog=2, init=init, seed=4, return_details=True)
    whole = evaluate.ais_log_likelihood(model, x, batch_size=7, **kw)
    perm = torch.tensor([6, 2, 0, 5, 1, 3, 4])
    parts = evaluate.ais_log_likelihood(model, x[perm], batch_size=2, index=perm, **kw)
    torch.testing.assert_close(parts.log_likelihood, whole.log_likelihood[perm], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(parts.log_weights, whole.log_weights[:, perm], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(parts.acceptance_rate, whole.acceptance_rate[perm])


def test_bdmc_of_a_share_of_the_points_equals_the_whole_run():
    model = _models()["vae"]
    kw = dict(num_chains=3, num_temps=30, num_leapfrog=2, seed=8)
    whole = evaluate.bdmc(model, 6, batch_size=6, generator=torch.Generator().manual_seed(1), **kw)
    share = evaluate.bdmc(model, 6, batch_size=6, generator=torch.Generator().manual_seed(1),
                          points=torch.tensor([4, 1]), **kw)
    torch.testing.assert_close(share.lower, whole.lower[[4, 1]], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(share.upper, whole.upper[[4, 1]], rtol=1e-10, atol=1e-10)
    assert torch.equal(share.x, whole.x[[4, 1]])


# --- the command line: torchrun and resume ---------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval") / "run")
    iwae_ext.train(out=out, epochs=1, **TINY)
    return out


EVAL = ["--k", "20", "--limit", "14", "--batch-size", "4", "--ais", "--ais-temps", "15", "--ais-chains", "3",
        "--ais-leapfrog", "2", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _eval(args, torchrun=0, **kw):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun),
            "-m", "iwae_ext.evaluate"] if torchrun else [sys.executable, "-m", "iwae_ext.evaluate"])
    return subprocess.run(cmd + args, capture_output=True, text=True, env=ENV, timeout=300, **kw)


def _same_per_point(a, b):
    pa, pb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert pa.keys() == pb.keys()
    for key in pa:
        assert torch.equal(pa[key], pb[key]) or (torch.isnan(pa[key]).any()  # k-hat is NaN for few weights
                                                 and torch.allclose(pa[key], pb[key], equal_nan=True)), key


def test_two_gloo_ranks_equal_one_process_image_for_image(run_dir, tmp_path):
    one = _eval([run_dir, *EVAL, "--bdmc", "5", "--per-point", str(tmp_path / "one.pt"), "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = _eval([run_dir, *EVAL, "--bdmc", "5", "--per-point", str(tmp_path / "two.pt"), "--out", str(tmp_path / "two")],
                torchrun=2)
    assert two.returncode == 0, two.stderr
    assert two.stdout == one.stdout  # rank 0 alone prints, exactly what one process prints
    _same_per_point(tmp_path / "one.pt", tmp_path / "two.pt")
    assert json.load(open(tmp_path / "two" / "results.json")) == json.loads(one.stdout)
    names = sorted(os.listdir(tmp_path / "two"))
    assert "test-ais.rank1.jsonl" in names and "test-L20.rank1.jsonl" in names, names
    # and the result equals the per-image values the library computes directly
    per = torch.load(tmp_path / "one.pt", weights_only=True)
    model = iwae_ext.load_checkpoint(run_dir)
    x = iwae_ext.data.load_dataset("binarized_mnist").batch("test", slice(None), torch.Generator().manual_seed(0))
    direct = evaluate.bounds(model, x[per["index"]], k=20, batch_size=4, seed=0, index=per["index"])
    assert torch.equal(direct.log_likelihood, per["log_likelihood"])  # same batches: bit for bit
    # other batch mates: the float32 matrix products round differently, at float32 precision
    direct = evaluate.bounds(model, x[per["index"]], k=20, batch_size=14, seed=0, index=per["index"])
    torch.testing.assert_close(direct.log_likelihood, per["log_likelihood"], rtol=1e-6, atol=0)


def test_a_killed_evaluation_resumes_to_the_same_numbers(run_dir, tmp_path):
    args = [run_dir, "--k", "20", "--limit", "16", "--batch-size", "2", "--ais", "--ais-temps", "400",
            "--ais-chains", "4", "--ais-leapfrog", "3", "--no-progress"]
    full = _eval([*args, "--out", str(tmp_path / "full"), "--per-point", str(tmp_path / "full.pt")])
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    results = out / "test-ais.rank0.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "iwae_ext.evaluate", *args, "--out", str(out)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the evaluation ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = results.read_text().count("\n")
    assert 2 <= done < 16 and not (out / "results.json").exists()
    fresh = _eval([*args, "--out", str(out)])  # no --resume: refused, nothing overwritten
    assert fresh.returncode == 2 and "pass --resume" in fresh.stderr
    changed = _eval([*args, "--out", str(out), "--resume", "--k", "21"])
    assert changed.returncode == 2 and "k: 20 then, 21 now" in changed.stderr
    resumed = _eval([*args, "--out", str(out), "--resume", "--per-point", str(tmp_path / "resumed.pt")])
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == full.stdout
    _same_per_point(tmp_path / "full.pt", tmp_path / "resumed.pt")
    lines = results.read_text().splitlines()
    assert len(lines) == 16 and len({json.loads(line)["index"] for line in lines}) == 16


def test_results_file_drops_a_line_cut_short(tmp_path):
    f = ResultsFile(str(tmp_path), "test-L5", 0)
    f.append([{"index": 3, "log_likelihood": -1.5}, {"index": 8, "log_likelihood": -0.1 + 1e-17}])
    with open(f.path, "a") as h:
        h.write('{"index": 9, "log_lik')  # a crash in the middle of a write
    rows = f.load()
    assert sorted(rows) == [3, 8] and rows[8]["log_likelihood"] == -0.1 + 1e-17
    f.append([{"index": 9, "log_likelihood": -2.0}])
    assert sorted(f.load()) == [3, 8, 9]
    other = ResultsFile(str(tmp_path), "test-L5", 1)  # another rank's file is read too
    other.append([{"index": 1, "log_likelihood": -4.0}])
    assert sorted(f.load()) == [1, 3, 8, 9]


def test_resume_needs_out(run_dir, capsys):
    from iwae_ext import cli
    with pytest.raises(SystemExit):
        cli.eval_main([run_dir, "--resume"])
    assert "--resume needs --out" in capsys.readouterr().err
