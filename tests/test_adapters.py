"""Models of pythae and Pyro evaluated as they are (iwae_ext.adapters): a small pythae IWAE and a
small Pyro VAE trained here with their own libraries; our L_k equals pythae's get_nll and Pyro's
RenyiELBO(alpha=0) bound image by image within Monte Carlo error; AIS sits above L_k on
average; what an adapter cannot express is refused by name. Without pythae or Pyro (the extras
iwae_ext[pythae], iwae_ext[pyro]) these tests skip, saying so."""
import math
import os
import sys

import pytest
import torch

import iwae_ext
from iwae_ext import adapters, evaluate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import peers  # noqa: E402

SMALL = dict(hidden=(64,), latent=4)


@pytest.fixture(scope="module")
def data():
    ds = iwae_ext.data.load_dataset()
    g = torch.Generator().manual_seed(0)
    test = ds.split("test")
    return ds.split("train")[:2000], test[torch.randperm(test.shape[0], generator=g)[:30]]


def _agree(ours: torch.Tensor, theirs: torch.Tensor, what: str):
    """Paired per-image differences of two L_k estimates (independent draws) within 4 standard errors."""
    d = ours - theirs
    se = float(d.std()) / math.sqrt(d.numel())
    assert abs(float(d.mean())) < 4 * se + 0.02, f"{what}: mean difference {float(d.mean()):.3f} +- {se:.3f}"


@pytest.fixture(scope="module")
def pythae_model(data):
    pytest.importorskip("pythae", reason="pythae is not installed (pip install iwae_ext[pythae])")
    torch.manual_seed(0)
    return peers.train_pythae(peers.pythae_iwae(**SMALL), data[0], epochs=6, lr=3e-3)


@pytest.fixture(scope="module")
def pyro_model(data):
    pytest.importorskip("pyro", reason="Pyro is not installed (pip install iwae_ext[pyro])")
    torch.manual_seed(0)
    return peers.train_pyro(peers.PyroVAE(**SMALL), data[0], epochs=6, lr=3e-3)


def test_pythae_lk_equals_get_nll_and_ais_lies_above(pythae_model, data):
    x = data[1]
    model = adapters.from_pythae(pythae_model)
    assert isinstance(model, iwae_ext.LatentVariableModel) and model.likelihood == "bernoulli"
    assert model.fused  # the user's decoder ends in Linear -> Sigmoid: the fused output layer
    ours = evaluate.bounds(model, x, k=1000, seed=0)
    torch.manual_seed(1)
    _agree(ours.log_likelihood, peers.pythae_nll(pythae_model, x, 1000), "L_1000 against pythae's get_nll")
    assert ours.ess.shape == (30,) and ours.khat.shape == (30,)
    # the decoder's probabilities (pythae's own arithmetic) give the same values on the same draws
    plain = evaluate.bounds(adapters.from_pythae(pythae_model, fused=False), x, k=1000, seed=0)
    assert not adapters.from_pythae(pythae_model, fused=False).fused
    torch.testing.assert_close(plain.log_likelihood, ours.log_likelihood, rtol=0, atol=2e-3)
    ais = evaluate.ais_log_likelihood(model, x[:10], num_chains=32, num_temps=300, num_leapfrog=5, seed=0)
    assert float(ais.mean()) > float(ours.log_likelihood[:10].mean())


def test_pythae_gaussian_decoder_equals_get_nll(data):
    pytest.importorskip("pythae", reason="pythae is not installed (pip install iwae_ext[pythae])")
    torch.manual_seed(0)
    m = peers.train_pythae(peers.pythae_iwae(**SMALL, reconstruction_loss="mse"), data[0][:500], epochs=2)
    model = adapters.from_pythae(m)
    assert model.likelihood == "gaussian" and not model.fused
    x = data[1][:10]
    ours = evaluate.bounds(model, x, k=500, seed=0).log_likelihood
    torch.manual_seed(1)
    _agree(ours, peers.pythae_nll(m, x, 500), "Gaussian decoder against get_nll")


def test_pythae_models_it_cannot_express_are_refused_by_name():
    pytest.importorskip("pythae", reason="pythae is not installed (pip install iwae_ext[pythae])")
    from pythae.models import AE, VAMP, AEConfig, VAMPConfig
    with pytest.raises(adapters.AdapterError, match="VAMP.*VampPrior"):
        adapters.from_pythae(VAMP(VAMPConfig(input_dim=(1, 28, 28), latent_dim=2)))
    with pytest.raises(adapters.AdapterError, match="AE is not one of.*no probabilistic encoder"):
        adapters.from_pythae(AE(AEConfig(input_dim=(1, 28, 28), latent_dim=2)))


def test_pyro_lk_equals_renyi_elbo_and_ais_lies_above(pyro_model, data):
    x = data[1]
    model = adapters.from_pyro(pyro_model.model, pyro_model.guide, modules=[pyro_model], example=x[:2])
    assert isinstance(model, iwae_ext.LatentVariableModel) and model.likelihood == "bernoulli"
    assert model.vectorized and not model.fused
    ours = evaluate.bounds(model, x, k=1000, seed=0)
    _agree(ours.log_likelihood, peers.pyro_renyi(pyro_model, x, 1000), "L_1000 against Pyro's RenyiELBO(0)")
    # given the decoder, the fused output layer: the same values on the same draws
    fused = adapters.from_pyro(pyro_model.model, pyro_model.guide, modules=[pyro_model],
                               decoder=pyro_model.decoder, example=x[:2])
    assert fused.fused
    torch.testing.assert_close(evaluate.bounds(fused, x, k=1000, seed=0).log_likelihood, ours.log_likelihood,
                               rtol=0, atol=2e-3)
    with _no_warning():  # Pyro's Normal is drawn from the keyed streams: no warning, and per-image values
        again = evaluate.bounds(model, x[:3], k=50, seed=4, batch_size=1)
    torch.testing.assert_close(again.log_likelihood, evaluate.bounds(model, x[:3], k=50, seed=4).log_likelihood,
                               rtol=0, atol=1e-4)
    ais = evaluate.ais_log_likelihood(model, x[:10], num_chains=32, num_temps=300, num_leapfrog=5, seed=0)
    assert float(ais.mean()) > float(ours.log_likelihood[:10].mean())


class _no_warning:
    def __enter__(self):
        import warnings
        self.cm = warnings.catch_warnings()
        self.cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


def test_pyro_pairs_it_cannot_express_are_refused_by_name(pyro_model):
    import pyro
    import pyro.distributions as dist
    x = torch.rand(3, 784).round()

    def two_sites(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 4), 1.0).to_event(1))
            pyro.sample("u", dist.Normal(torch.zeros(x.shape[0]), 1.0))

    with pytest.raises(adapters.AdapterError, match="exactly one latent site.*'z', 'u'"):
        adapters.from_pyro(pyro_model.model, two_sites, example=x)

    def discrete(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(0.5 * torch.ones(x.shape[0], 4)).to_event(1))

    with pytest.raises(adapters.AdapterError, match="'z' .*Bernoulli.* not reparameterisable"):
        adapters.from_pyro(pyro_model.model, discrete, example=x)

    def extra_latent(x):
        pyro_model.model(x)
        pyro.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(adapters.AdapterError, match="latent sites the guide does not sample: 'w'"):
        adapters.from_pyro(extra_latent, pyro_model.guide, example=x)

    def no_plate(x):
        pyro.sample("z", dist.Normal(torch.zeros(4), 1.0).to_event(1))

    with pytest.raises(adapters.AdapterError, match="batch shape \\[B\\]"):
        adapters.from_pyro(pyro_model.model, no_plate, example=x)


def test_a_pyro_model_that_cannot_be_vectorised_runs_on_data_rows(pyro_model, data):
    import pyro
    import pyro.distributions as dist
    x = data[1][:5]

    def flat_model(x):  # reshapes by x's batch size: Pyro's vectorisation of samples breaks it
        pyro.module("decoder", pyro_model.decoder)
        with pyro.plate("data", x.shape[0]):
            zero = x.new_zeros(x.shape[0], pyro_model.latent)
            z = pyro.sample("z", dist.Normal(zero, torch.ones_like(zero)).to_event(1))
            logits = pyro_model.decoder(z).reshape(x.shape[0], -1)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    rows = adapters.from_pyro(flat_model, pyro_model.guide, modules=[pyro_model], decoder=pyro_model.decoder,
                              example=x)
    assert not rows.vectorized and not rows.fused
    vec = adapters.from_pyro(pyro_model.model, pyro_model.guide, modules=[pyro_model], example=x)
    torch.testing.assert_close(evaluate.bounds(rows, x, k=200, seed=0).log_likelihood,
                               evaluate.bounds(vec, x, k=200, seed=0).log_likelihood, rtol=0, atol=1e-3)
