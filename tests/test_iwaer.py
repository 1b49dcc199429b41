"""Random-weight models (IWAER, IWAER_rec; Hernandez-Lobato et al.): BayesLinear, per-sample weight draws,
the KL of full variational Bayes, conversion from a deterministic model, training."""
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

import iwae_ext
from iwae_ext.models import VAE, BayesLinear


def test_bayes_linear_module():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3).double()
    layer = BayesLinear.from_linear(lin, rho_init=-2.0)
    assert torch.equal(layer.weight_mu, lin.weight) and torch.equal(layer.bias_mu, lin.bias)
    assert float(layer.weight_rho.detach().max()) == -2.0 and layer.weight_rho.dtype == torch.float64
    x = torch.randn(7, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x, torch.zeros(7, 3, dtype=torch.float64)), lin(x))
    assert layer(x).shape == (7, 3)
    want = (kl_divergence(Normal(layer.weight_mu, F.softplus(layer.weight_rho)), Normal(0.0, 0.5)).sum()
            + kl_divergence(Normal(layer.bias_mu, F.softplus(layer.bias_rho)), Normal(0.0, 0.5)).sum())
    torch.testing.assert_close(layer.kl(0.5), want)
    with pytest.raises(ValueError, match="rho_init must be finite"):
        BayesLinear(2, 2, float("nan"))


@pytest.mark.parametrize("mode", ["encoder", "all"])
def test_weights_are_drawn_per_data_point_and_sample(mode):
    torch.manual_seed(0)
    m = VAE(12, (3,), ((8,),), random_weights=mode, rho_init=0.0).double()
    x = torch.bernoulli(torch.full((1, 12), 0.5, dtype=torch.float64)).expand(4, 12)  # 4 equal rows
    seen = {}
    m.encoders[0].register_forward_hook(lambda mod, inp, out: seen.__setitem__("loc", out[0]))
    log_w = m.log_weights(x, 6)
    assert log_w.shape == (6, 4)
    loc = seen["loc"]  # [6, 4, 3]: the same image, a different encoder draw in every cell
    assert loc.shape == (6, 4, 3)
    assert float((loc - loc[0, 0]).abs().flatten(0, 1)[1:].sum(-1).min()) > 0
    z = torch.zeros(6, 4, 3, dtype=torch.float64)
    logits = m.decode(z)
    differs = float((logits - logits[0, 0]).abs().flatten(0, 1)[1:].sum(-1).min()) > 0
    assert differs == (mode == "all")  # decoder weights are random only in IWAER


def test_from_deterministic_keeps_the_means_and_kl():
    torch.manual_seed(0)
    det = VAE(12, (3,), ((8,),)).double()
    rnd = VAE.from_deterministic(det, "all", rho_init=-40.0)  # sigma ~ 4e-18: the same network
    x = torch.rand(5, 12, dtype=torch.float64)
    torch.testing.assert_close(rnd.posterior(x).loc, det.posterior(x).loc, rtol=1e-12, atol=1e-12)
    z = torch.randn(2, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(rnd.decode(z), det.decode(z), rtol=1e-12, atol=1e-12)
    rec = VAE.from_deterministic(det, "encoder")
    assert isinstance(rec.encoders[0].loc, BayesLinear) and not isinstance(rec.decoder.logits, BayesLinear)
    layers = [mod for mod in rnd.modules() if isinstance(mod, BayesLinear)]
    torch.testing.assert_close(rnd.weight_kl(1.0), sum(layer.kl(1.0) for layer in layers))
    assert float(det.weight_kl(1.0)) == 0.0
    with pytest.raises(ValueError, match="one stochastic layer"):
        VAE(12, (3, 2), random_weights="all")
    with pytest.raises(ValueError, match="random_weights must be one of"):
        VAE(12, (3,), random_weights="decoder")


def test_train_iwaer_models_and_checkpoint(tmp_path):
    tiny = dict(subset=200, batch_size=50, k=3, hidden=[[16]], latent_dim=[3], epochs=1,
                train_eval_size=20, progress=False)
    det = iwae_ext.train(model="iwae", eval_k=5, out=str(tmp_path / "det"), **tiny)
    r = iwae_ext.train(model="iwaer", prior_std=1.0, eval_k=5, out=str(tmp_path / "r"),
                       init_from=str(tmp_path / "det"), **tiny)
    assert r["config"]["prior_std"] == 1.0 and det["eval_k"] == 5
    data = iwae_ext.data.load_dataset()
    assert iwae_ext.TrainConfig(model="iwaer").resolved(data).eval_k == 2000
    assert iwae_ext.TrainConfig(model="iwae").resolved(data).eval_k == 5000
    model = iwae_ext.load_checkpoint(str(tmp_path / "r"))
    assert model.random_weights == "all" and isinstance(model.decoder.logits, BayesLinear)
    with pytest.raises(ValueError, match="init_from .* architecture"):
        iwae_ext.train(model="iwaer", init_from=str(tmp_path / "det"), eval_k=5,
                       **dict(tiny, hidden=[[17]]))
    r2 = iwae_ext.train(model="iwaer_rec", eval_k=7, **tiny)
    assert r2["eval_k"] == 7 and r2["test_log_likelihood"] < 0
    with pytest.raises(ValueError, match="prior_std needs a model with random weights"):
        iwae_ext.train(model="iwae", prior_std=1.0, progress=False)
    with pytest.raises(ValueError, match="needs layers=1"):
        iwae_ext.train(model="iwaer", layers=2, progress=False)
