"""The user's own networks trained by the trainer (NetworkVAE): a convolutional encoder and
decoder trained as an IWAE, evaluated, checkpointed, stopped and resumed to the same numbers,
reloaded only with the networks given again; an MLP pair takes the fused output layer and gives
the values of the plain Bernoulli formula; what cannot be trained with them is refused by name."""
import json
import os

import pytest
import torch
from torch import nn

import iwae_ext
from iwae_ext import evaluate
from iwae_ext.models import NetworkVAE

SMALL = dict(subset=300, batch_size=50, k=3, eval_k=20, train_eval_size=50, progress=False, compile=False,
             dtype="float64")


class ConvEncoder(nn.Module):
    def __init__(self, z=4):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 4, 2, 1), nn.ReLU(), nn.Conv2d(4, 8, 4, 2, 1), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(8 * 7 * 7, 2 * z))

    def forward(self, x):  # [B, 1, 28, 28] -> [B, 2 Z]: loc and log-variance
        return self.net(x)


class ConvDecoder(nn.Module):
    def __init__(self, z=4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(z, 8 * 7 * 7), nn.ReLU(), nn.Unflatten(1, (8, 7, 7)),
                                 nn.ConvTranspose2d(8, 4, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(4, 1, 4, 2, 1))

    def forward(self, z):  # [N, Z] -> logits [N, 1, 28, 28]
        return self.net(z)


def conv_pair(seed=0):
    torch.manual_seed(seed)
    return ConvEncoder().double(), ConvDecoder().double()


def test_a_convolutional_pair_trains_evaluates_and_reloads(tmp_path):
    enc, dec = conv_pair()
    out = str(tmp_path / "run")
    m = iwae_ext.train(model="iwae", epochs=2, out=out, encoder_net=enc, decoder_net=dec, **SMALL)
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert lines[1]["train_bound"] > lines[0]["train_bound"]  # it learns
    assert m["config"]["networks"]["encoder"].endswith("ConvEncoder") and m["config"]["latent_dim"] == [4]
    assert m["test_log_likelihood"] > m["test_elbo"] and m["active_units"][0] <= 4
    with pytest.raises(ValueError, match="your own networks .*ConvEncoder and .*ConvDecoder.*code is not"):
        iwae_ext.load_checkpoint(out)
    model = iwae_ext.load_checkpoint(out, encoder_net=ConvEncoder().double(), decoder_net=ConvDecoder().double())
    assert isinstance(model, NetworkVAE) and isinstance(model, iwae_ext.LatentVariableModel) and not model.fused
    trained = enc.state_dict()  # the run trained the modules it was given, in place
    assert all(torch.equal(t, trained[n[len("encoder."):]]) for n, t in model.state_dict().items()
               if n.startswith("encoder."))
    x = iwae_ext.data.load_dataset().split("test")[:5].double()
    b = evaluate.bounds(model, x, k=50, seed=0)
    assert torch.isfinite(b.log_likelihood).all() and (b.log_likelihood >= b.elbo).all()
    with pytest.raises(ValueError, match="the run's encoder was a .*ConvEncoder, the one given is a .*Linear"):
        iwae_ext.load_checkpoint(out, encoder_net=nn.Linear(784, 8), decoder_net=ConvDecoder())


def test_a_stopped_run_of_own_networks_resumes_exactly(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    enc, dec = conv_pair()
    a = iwae_ext.train(model="iwae", epochs=2, out=full, encoder_net=enc, decoder_net=dec, **SMALL)
    calls = {"n": 0}

    def stop():  # 6 steps an epoch: stop inside the second
        calls["n"] += 1
        return calls["n"] > 8

    enc, dec = conv_pair()
    from iwae_ext.trainer import TrainConfig
    from iwae_ext.trainer.loop import train as loop_train
    first = loop_train(TrainConfig(model="iwae", epochs=2, out=part, **SMALL), should_stop=stop, encoder_net=enc,
                       decoder_net=dec)
    assert first["stopped"]
    with pytest.raises(ValueError, match="pass encoder_net= and decoder_net=.*to resume"):
        iwae_ext.train(out=part, resume=True)
    b = iwae_ext.train(out=part, resume=True, encoder_net=ConvEncoder().double(), decoder_net=ConvDecoder().double())
    assert b["test_log_likelihood"] == a["test_log_likelihood"]  # bit for bit
    sa = torch.load(os.path.join(full, "checkpoint.pt"), weights_only=True)["model_state"]
    sb = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=True)["model_state"]
    assert all(torch.equal(sa[n], sb[n]) for n in sa)


def test_an_mlp_pair_takes_the_fused_output_layer_with_the_same_values():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 6)).double()
    dec = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 784)).double()
    fused = NetworkVAE(enc, dec, 3, input_shape=(1, 28, 28))
    plain = NetworkVAE(enc, dec, 3, input_shape=(1, 28, 28), fused=False)
    assert fused.fused and not plain.fused
    x = iwae_ext.data.load_dataset().split("test")[:7].double()
    torch.testing.assert_close(evaluate.bounds(fused, x, 40, seed=1).log_likelihood,
                               evaluate.bounds(plain, x, 40, seed=1).log_likelihood, rtol=0, atol=1e-10)
    for estimator in ("standard", "stl", "dreg"):  # the objectives take it, gradients reach both networks
        enc.zero_grad(), dec.zero_grad()
        bound = iwae_ext.objectives.objective(fused, x, 5, "iwae", estimator)
        (-bound.sum()).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fused.parameters())


def test_what_cannot_train_with_own_networks_is_refused_by_name(tmp_path):
    enc, dec = conv_pair()
    for model, match in (("iwaer", "model 'iwaer' needs the package's MLPs"),
                         ("aiwae", "model 'aiwae' needs the package's MLPs"),
                         ("ae", "model 'ae' needs the package's MLPs")):
        with pytest.raises(ValueError, match=match):
            iwae_ext.train(model=model, epochs=1, out=str(tmp_path / model), encoder_net=enc, decoder_net=dec, **SMALL)
    with pytest.raises(ValueError, match="give both encoder_net and decoder_net"):
        iwae_ext.train(model="iwae", epochs=1, out=str(tmp_path / "one"), encoder_net=enc, **SMALL)
    with pytest.raises(ValueError, match="networks is set by train"):
        iwae_ext.train(model="iwae", epochs=1, networks={"class": "NetworkVAE"}, **SMALL)
    with pytest.raises(ValueError, match="encoder must return"):
        iwae_ext.train(model="iwae", epochs=1, out=str(tmp_path / "odd"), encoder_net=nn.Sequential(nn.Flatten(), nn.Linear(784, 5)).double(),
                       decoder_net=dec, **SMALL)


SCRIPT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
import iwae_ext
from test_networks import ConvEncoder, ConvDecoder, SMALL
torch.manual_seed(int(os.environ.get("RANK", "0")))  # each rank builds other weights: rank 0's are broadcast
iwae_ext.train(model="iwae", epochs=1, out=sys.argv[1], encoder_net=ConvEncoder().double(), decoder_net=ConvDecoder().double(),
               **SMALL)
"""


def test_own_networks_under_torchrun_follow_one_process(tmp_path):
    import subprocess
    import sys
    script = tmp_path / "train_own.py"
    script.write_text(SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    subprocess.run([sys.executable, str(script), one], check=True, env=env, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), two], check=True, env=env, capture_output=True, timeout=300)
    a = torch.load(os.path.join(one, "checkpoint.pt"), weights_only=True)["model_state"]
    b = torch.load(os.path.join(two, "checkpoint.pt"), weights_only=True)["model_state"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-9, atol=1e-12, msg=name)


def test_own_networks_train_under_bf16_autocast(tmp_path):
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 6))
    dec = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 784))
    m = iwae_ext.train(model="iwae", epochs=2, precision="bf16", encoder_net=enc, decoder_net=dec, out=str(tmp_path / "bf16"),
                       **dict(SMALL, dtype="float32"))
    lines = [json.loads(line) for line in open(tmp_path / "bf16" / "metrics.jsonl")]
    assert lines[1]["train_bound"] > lines[0]["train_bound"] and m["test_log_likelihood"] > m["test_elbo"]
