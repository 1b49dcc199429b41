"""Lower precision where it is exact: the bfloat16 inputs of the fused output layer (against the
float64 twin on the rounded inputs), its low_weight gradient, the fused activation ops, the
decoder's bfloat16 gradient, and HMC / AIS whose interior gradients are bfloat16 against known
answers (a correlated Gaussian's moments, a linear-Gaussian model's exact log p(x), a dense
grid's log p(x), and float32 AIS paired image by image)."""
import math

import pytest
import torch

import iwae_ext
from iwae_ext import _precision, evaluate, samplers
from iwae_ext.models import VAE
from iwae_ext.ops import (activation, activation_backward, bernoulli_log_prob, bernoulli_log_prob_grad_h,
                          reference)

from conftest import DEVICES, grid_log_likelihood
from test_bernoulli import make
from test_samplers import MU, S, LinearGaussianModel, assert_lower_bound

BF16 = torch.bfloat16


def rounded(*ts):
    """The tensors rounded to bfloat16 and back to float64: what a bfloat16 op is given."""
    return [t.to(BF16).double() for t in ts]


def logits_bound(h, w, b, x):
    """A bound on |op - twin| for bfloat16 h and weight: the logits are stored in bfloat16, so each
    is off by at most half an ulp (2^-9 relative) after a float32-accumulated product (which
    adds ~1e-6 relative); the value moves by sum_d |x_d - sigmoid(l_d)| |dl_d|, the gradient by
    sum_d |dl_d| sigmoid'(l_d) |W_d|."""
    hd, wd, bd, xd = rounded(h, w, b, x)
    l0 = hd @ wd.T
    dl = l0.abs() * 2.0 ** -8 + 1e-5
    l = l0 + bd
    s = torch.sigmoid(l)
    value = ((xd - s).abs() * dl).sum(-1)
    grad = (dl * s * (1 - s)) @ wd.abs()
    return value, grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(), (3,)])
def test_bfloat16_inputs_against_the_twin_on_rounded_inputs(device, lead):
    h, w, b, x = make(lead, 40, 30, 70, device=device, seed=1)
    hb, wb = h.to(BF16), w.to(BF16)
    vbound, gbound = logits_bound(h, w, b, x)
    for bias, data in ((b.to(BF16), x.to(BF16)), (b.float(), x.float())):
        out = bernoulli_log_prob(hb, wb, bias, data)
        assert out.dtype == torch.float32 and out.shape == (*lead, 40)
        ref = reference.bernoulli_log_prob(*rounded(h, w), bias.double(), data.double())
        assert ((out.double() - ref).abs() <= vbound + 1e-3).all()
        v, gh = bernoulli_log_prob_grad_h(hb, wb, bias, data)
        rv, rgh = reference.bernoulli_log_prob_grad_h(*rounded(h, w), bias.double(), data.double())
        assert v.dtype == torch.float32 and gh.dtype == BF16
        torch.testing.assert_close(v, out, rtol=0, atol=0)
        # the gradient is rounded to bfloat16 at the end too
        assert ((gh.double() - rgh).abs() <= gbound + rgh.abs() * 2.0 ** -8 + 1e-4).all()
    # the bound is not vacuous: the logits' rounding does move the value
    assert float(vbound.max()) < 0.5 and float((out.double() - ref).abs().max()) > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keep", [True, False])
def test_bfloat16_gradients_by_autograd(device, keep, monkeypatch):
    """Both backward paths (the logits kept, or recomputed block by block) give the twin's
    gradients on the rounded inputs, in the inputs' dtypes (float32 bias and x stay float32)."""
    h, w, b, x = make((2,), 30, 20, 50, device=device, seed=2)
    args = [h.to(BF16), w.to(BF16), b.float(), x.float()]
    if not keep:  # force the recomputing backward by a zero keep limit: call it directly
        g = torch.randn(2, 30, device=device)
        dh, dw, db = torch.ops.iwae_ext.bernoulli_log_prob_backward(g, *args, [True, True, True])
    else:
        leaves = [a.detach().requires_grad_(True) for a in args]
        g = torch.randn(2, 30, device=device)
        bernoulli_log_prob(*leaves).backward(g)
        dh, dw, db = (t.grad for t in leaves[:3])
    assert (dh.dtype, dw.dtype, db.dtype) == (BF16, BF16, torch.float32)
    ref = [t.double().requires_grad_(True) for t in args]
    reference.bernoulli_log_prob(*ref).backward(g.double())
    for name, got, r in zip(("h", "weight", "bias"), (dh, dw, db), ref):
        err = (got.double() - r.grad).norm() / r.grad.norm()
        assert float(err) < 2e-2, (name, float(err))


@pytest.mark.parametrize("device", DEVICES)
def test_low_weight_keeps_the_value_and_rounds_the_gradient(device):
    h, w, b, x = make((3,), 20, 16, 40, dtype=torch.float32, device=device, seed=3)
    v, gh = bernoulli_log_prob_grad_h(h, w, b, x)
    v2, gh2 = bernoulli_log_prob_grad_h(h, w, b, x, low_weight=w.to(BF16))
    torch.testing.assert_close(v2, v, rtol=0, atol=0)  # the value is the float32 one, bit for bit
    assert gh2.dtype == BF16
    e = (x - torch.sigmoid(torch.nn.functional.linear(h.double(), w.double(), b.double()))).to(BF16)
    expect = e.double() @ w.to(BF16).double()
    torch.testing.assert_close(gh2.double(), expect, rtol=2 ** -7, atol=1e-3)
    assert float((gh2.double() - gh.double()).abs().max()) > 0  # another gradient field
    with pytest.raises(RuntimeError, match="low_weight must be bfloat16"):
        bernoulli_log_prob_grad_h(h, w, b, x, low_weight=w.half())
    with pytest.raises(RuntimeError, match="low_weight must have weight's shape"):
        bernoulli_log_prob_grad_h(h, w, b, x, low_weight=w[:3].to(BF16))
    with pytest.raises(RuntimeError, match="h is already bfloat16"):
        bernoulli_log_prob_grad_h(h.to(BF16), w.to(BF16), b, x, low_weight=w.to(BF16))


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_opcheck_and_dtype_errors(device):
    h, w, b, x = make((3,), 4, 5, 9, device=device)
    args = [h.to(BF16), w.to(BF16), b.float(), x.float()]
    torch.library.opcheck(torch.ops.iwae_ext.bernoulli_log_prob.default, args)
    for value in (True, False):
        torch.library.opcheck(torch.ops.iwae_ext.bernoulli_log_prob_grad_h.default, (*args, value))
        torch.library.opcheck(torch.ops.iwae_ext.bernoulli_log_prob_grad_h.default,
                              (h.float(), w.float(), b.float(), x.float(), value, w.to(BF16)))
    g = torch.randn(3, 4, device=device)
    torch.library.opcheck(torch.ops.iwae_ext.bernoulli_log_prob_backward.default, (g, *args, [True] * 3))
    torch.library.opcheck(torch.ops.iwae_ext.bernoulli_log_prob_dlogit.default, args)
    with pytest.raises(RuntimeError, match=r"bias must have the dtype of h \(BFloat16\) or float32"):
        bernoulli_log_prob(args[0], args[1], b, x.float())  # float64 bias
    with pytest.raises(RuntimeError, match="weight must have the dtype of h"):
        bernoulli_log_prob(args[0], w.float(), b.float(), x.float())
    with pytest.raises(RuntimeError, match="grad_out must have the output's dtype"):
        torch.ops.iwae_ext.bernoulli_log_prob_backward(g.to(BF16), *args, [True] * 3)


# -- activation ------------------------------------------------------------------------------

KINDS = ("tanh", "sigmoid", "relu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_activation_against_the_twin(device, kind):
    g = torch.Generator().manual_seed(4)
    a = torch.randn(300, 37, generator=g, dtype=torch.float64) * 4
    a[0, :8] = torch.tensor([0.0, 1e-12, -1e-9, 1e-4, 0.0624, 0.0626, 30.0, -400.0])
    b = torch.randn(37, generator=g, dtype=torch.float64)
    a, b = a.to(device), b.to(device)
    # float64 within ten ulp of torch's own
    out = activation(a, b, kind)
    torch.testing.assert_close(out, reference.activation(a, b, kind), rtol=10 * 2.0 ** -52, atol=1e-300)
    # float32 and bfloat16: the exact value (float64 arithmetic) rounded to the dtype
    for dt in (torch.float32, BF16):
        ad, bd = a.to(dt), b.to(dt)
        got = activation(ad, bd, kind)
        exact = reference.activation(ad.double() + bd.double(), None, kind)
        want = exact.float().to(dt)  # rounded to float32, then (bfloat16) again: the op's rounding
        mismatch = (got != want).double().mean()
        assert float(mismatch) <= (0.0 if dt == torch.float32 else 1e-3), (dt, float(mismatch))
        # no bias
        torch.testing.assert_close(activation(ad, None, kind),
                                   reference.activation(ad.double(), None, kind).float().to(dt), rtol=0, atol=0)
        # backward: torch's formula in the dtype's math type
        gr = torch.randn(300, 37, generator=g, dtype=torch.float64).to(device=device, dtype=dt)
        bw = activation_backward(gr, got, kind)
        torch.testing.assert_close(bw, reference.activation_backward(gr.float(), got.float(), kind).to(dt),
                                   rtol=2 ** -7 if dt == BF16 else 1e-6, atol=1e-6)
    nan = activation(torch.tensor([float("nan")], dtype=torch.float64, device=device), None, kind)
    assert bool(torch.isnan(nan).all())


@pytest.mark.parametrize("device", DEVICES)
def test_activation_autograd_opcheck_and_errors(device):
    a = torch.randn(5, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    for kind in ("tanh", "sigmoid"):  # relu is not differentiable at 0: gradcheck's points avoid it
        assert torch.autograd.gradcheck(lambda a, b: activation(a, b, kind), (a, b))
        torch.library.opcheck(torch.ops.iwae_ext.activation.default, (a, b, kind))
        torch.library.opcheck(torch.ops.iwae_ext.activation.default, (a.detach(), None, kind))
        out = activation(a.detach(), b.detach(), kind)
        torch.library.opcheck(torch.ops.iwae_ext.activation_backward.default, (torch.randn_like(out), out, kind))
    # a non-contiguous input
    at = torch.randn(4, 6, dtype=torch.float64, device=device).t()
    torch.testing.assert_close(activation(at, None, "tanh"), torch.tanh(at))
    with pytest.raises(RuntimeError, match="activation must be one of"):
        activation(a.detach(), None, "gelu")
    with pytest.raises(RuntimeError, match=r"bias must have shape \[4\]"):
        activation(a.detach(), b.detach()[:3], "tanh")
    with pytest.raises(RuntimeError, match="bias must have the dtype of a"):
        activation(a.detach(), b.detach().float(), "tanh")
    with pytest.raises(RuntimeError, match="a must be float32, float64 or bfloat16"):
        activation(a.detach().half(), None, "tanh")
    with pytest.raises(RuntimeError, match="grad must have shape"):
        activation_backward(a.detach()[0], a.detach(), "tanh")
    with pytest.raises(RuntimeError, match="double backward"):
        x = a.detach().requires_grad_(True)
        y = activation(x, None, "tanh").sum()
        (gx,) = torch.autograd.grad(y, x, create_graph=True)


def test_activation_under_torch_compile():
    f = torch.compile(lambda a, b: activation(a @ a.T, b, "tanh"), fullgraph=True, backend="eager")
    a, b = torch.randn(6, 6), torch.randn(6)
    torch.testing.assert_close(f(a, b), torch.tanh(a @ a.T + b))


# -- the decoder's low-precision gradient ---------------------------------------------------

@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("act", ["tanh", "sigmoid", "relu"])
def test_decoder_gradient_in_bfloat16_is_close_and_the_value_exact(likelihood, act):
    torch.manual_seed(5)
    model = VAE(x_dim=60, latent_dims=(6,), hidden=(40, 30), activation=act, likelihood=likelihood).eval()
    x = (torch.rand(50, 60) < 0.4).float() if likelihood == "bernoulli" else torch.rand(50, 60)
    z = torch.randn(50, 6)
    v, g = model.log_joint_and_grad(x, z)
    none, g16 = model.log_joint_and_grad(x, z, value=False, gradient_dtype=BF16)
    assert none is None and g16.dtype == torch.float32
    # about 1e-3 relative; a few rows more where a relu unit's pre-activation rounds across 0
    rel = (g16 - g).norm(dim=1) / g.norm(dim=1)
    assert 0 < float(rel.median()) < 5e-3 and float((rel < 5e-2).double().mean()) >= 0.9, rel
    # with the value: the value is the model's (float32, exact), the gradient the cheaper one
    # the reference output layer (fused = False): its own bfloat16 path, as close
    model.decoder.fused = False
    rel_ref = (model.log_joint_and_grad(x, z, value=False, gradient_dtype=BF16)[1] - g).norm(dim=1) / g.norm(dim=1)
    model.decoder.fused = True
    assert float(rel_ref.median()) < 5e-3 and float((rel_ref < 5e-2).double().mean()) >= 0.9, rel_ref
    v2, gm = model.log_joint_and_grad(x, z, gradient_dtype=BF16)
    torch.testing.assert_close(v2, v, rtol=0, atol=0)
    torch.testing.assert_close(v, model.log_joint(x, z), rtol=1e-5, atol=1e-3)
    rel = (gm - g).norm(dim=1) / g.norm(dim=1)
    assert float(rel.median()) < 5e-3 and float((rel < 5e-2).double().mean()) >= 0.9, rel


def test_gradient_precision_choice():
    dev = torch.device("cpu")
    assert _precision.gradient_dtype("full", torch.float32, dev, True, "f") is None
    assert _precision.gradient_dtype("bf16", torch.float64, dev, True, "f") == BF16
    auto = _precision.gradient_dtype("auto", torch.float32, dev, True, "f")
    assert auto == (BF16 if _precision.fast_bf16(dev) else None)
    assert _precision.gradient_dtype("auto", torch.float64, dev, True, "f") is None
    assert _precision.gradient_dtype("auto", torch.float32, dev, False, "f") is None
    with pytest.raises(ValueError, match="gradient_precision must be one of"):
        _precision.gradient_dtype("fp16", torch.float32, dev, True, "f")
    with pytest.raises(ValueError, match="lowers float32 only"):
        samplers.hmc(lambda z: -z.square().sum(-1), torch.zeros(3, 2, dtype=torch.float64), 1,
                     gradient_precision="bf16")
    with pytest.raises(ValueError, match="a grad_fn computes its own"):
        samplers.ais(None, None, torch.zeros(3, 2), [0.0, 1.0], grad_fn=lambda z: None,
                     gradient_precision="bf16")


# -- HMC and AIS with bfloat16 interior gradients -------------------------------------------

def test_hmc_with_bfloat16_gradients_leaves_a_correlated_gaussian_invariant():
    """float32 chains started at exact draws of N(mu, S) (correlation 0.9), the interior
    gradients by autograd under bfloat16 autocast (the energies in float32): after 10
    transitions the mean and covariance are within 4 standard errors of the target's."""
    c = 8000
    mu, cov, prec = MU.float(), S.float(), torch.linalg.inv(S).float()

    def log_density(z):
        d = z - mu
        return -0.5 * ((d @ prec) * d).sum(-1)  # the product runs in bfloat16 under autocast

    g = torch.Generator().manual_seed(12)
    z0 = mu + torch.randn(c, 2, generator=g) @ torch.linalg.cholesky(cov).T
    # the interior gradient is really another field
    vg = samplers._hmc_ais._autograd_value_and_grad([log_density], BF16)
    exact = vg(z0)[1]
    low = vg.grads_only(z0)[0]
    assert float((low - exact).abs().max()) > 1e-3
    res = samplers.hmc(log_density, z0, num_samples=10, num_leapfrog=5, step_size=0.15, num_warmup=0,
                       generator=g, gradient_precision="bf16")
    z = res.samples[-1].double()
    se_mean = (S.diagonal() / c).sqrt()
    assert ((z.mean(0) - MU).abs() < 4 * se_mean).all(), (z.mean(0), se_mean)
    se_cov = ((S.diagonal()[:, None] * S.diagonal()[None, :] + S * S) / c).sqrt()
    assert ((torch.cov(z.T) - S).abs() < 4 * se_cov).all()
    assert 0.5 < float(res.acceptance_rate.mean()) < 1.0


def test_ais_with_bfloat16_gradients_recovers_a_linear_gaussian_log_likelihood():
    """As the float64 test of the exact log p(x), in float32 with bfloat16 interior gradients
    (autocast): 4 points x 12 seeds within 4 standard errors, and not above it on average."""
    m = LinearGaussianModel()
    g = torch.Generator().manual_seed(4)
    x = m.b + torch.randn(4, 5, generator=g, dtype=torch.float64) * 2
    chains, pilot = 64, 2
    xr = x.repeat(chains + pilot, 1).float()
    W, b = m.W.float(), m.b.float()
    log2pi = math.log(2 * math.pi)

    def log_joint(z):
        r = xr - z @ W.T - b
        return -0.5 * (z.square().sum(-1) + 3 * log2pi) - 0.5 * (r.square().sum(-1) / m.s2 + 5 * math.log(2 * math.pi * m.s2))

    est, rates = [], []
    for seed in range(12):
        gd = torch.Generator().manual_seed(100 + seed)
        z0 = torch.randn(xr.shape[0], 3, generator=gd)
        res = samplers.ais(lambda z: -0.5 * (z.square().sum(-1) + 3 * log2pi), log_joint, z0,
                           samplers.sigmoid_schedule(300), num_leapfrog=5, step_size=0.2, generator=gd,
                           pilot_chains=pilot, num_groups=4, gradient_precision="bf16")
        est.append(res.log_normalizer(4))
        rates.append(float(res.acceptance_rate.mean()))
    mean, se = assert_lower_bound(torch.stack(est), m.exact(x), "linear-Gaussian AIS, bf16 gradients")
    assert (mean.abs() < 4 * se + 2e-3).all(), (mean, se)
    assert all(0.4 < r < 0.95 for r in rates), rates


def test_bfloat16_gradient_ais_against_the_dense_grid(small_2d_model):
    """The evaluation's AIS with bfloat16 interior gradients (the hand-written decoder backward
    with bfloat16 weights) on the 2-D-latent model: 6 images x 12 seeds, within 4 standard
    errors of the grid and not above it on average, as the full-precision run."""
    model, x = small_2d_model
    n, seeds = 6, 12
    xs = x[:n]
    grid = grid_log_likelihood(model, xs)
    est = evaluate.ais_log_likelihood(model, xs.repeat(seeds, 1), num_chains=16, num_temps=300, num_leapfrog=5,
                                      seed=3, index=torch.arange(n * seeds), batch_size=n * seeds,
                                      gradient_precision="bf16", return_details=True)
    assert est.gradient_precision == "bf16"
    mean, se = assert_lower_bound(est.log_likelihood.view(seeds, n), grid, "bf16-gradient AIS against the grid")
    assert (mean.abs() < 4 * se + 0.01).all(), (mean, se)


def test_bfloat16_and_full_precision_ais_agree_image_by_image():
    """Paired on 24 images of the default 784-200-200-50 architecture (float32; the same keyed
    streams): the mean difference of the two estimates is within 2 standard errors of zero
    (over images), and the acceptance rates within 0.05."""
    from iwae_ext.data import load_dataset
    torch.manual_seed(13)
    data = load_dataset("binarized_mnist")
    model = VAE(x_mean=data.mean("train")).eval()
    x = data.split("test")[:24]
    kw = dict(num_chains=8, num_temps=60, num_leapfrog=5, seed=14, return_details=True, batch_size=24)
    full = evaluate.ais_log_likelihood(model, x, gradient_precision="full", **kw)
    low = evaluate.ais_log_likelihood(model, x, gradient_precision="bf16", **kw)
    assert (full.gradient_precision, low.gradient_precision) == ("full", "bf16")
    d = low.log_likelihood - full.log_likelihood
    se = d.std() / math.sqrt(d.numel())
    assert abs(float(d.mean())) < 2 * float(se) + 1e-3, (float(d.mean()), float(se))
    assert abs(float(low.acceptance_rate.mean() - full.acceptance_rate.mean())) < 0.05
    assert not torch.equal(low.log_weights, full.log_weights)  # really two runs


# -- bayes_linear in bfloat16 ----------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_bayes_linear_in_bfloat16_against_the_twin_on_rounded_inputs(device):
    """All six inputs bfloat16: the output and every gradient against the float64 twin on the
    same (rounded) inputs, within what the bfloat16 products' rounding allows (2^-8 relative to
    the largest entry, a few of them at most)."""
    g = torch.Generator().manual_seed(15)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    args = [r(3, 40, 30), r(20, 30) * 0.2, r(20, 30) - 3, r(20), r(20) - 3, r(3, 40, 20)]
    low = [a.to(device=device, dtype=BF16).requires_grad_(True) for a in args]
    ref = [a.to(BF16).double().to(device).requires_grad_(True) for a in args]
    out = iwae_ext.ops.bayes_linear(*low)
    want = reference.bayes_linear(*ref)
    assert out.dtype == BF16
    assert float((out.detach().double() - want.detach()).abs().max() / want.detach().abs().max()) < 2 ** -6
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device)
    out.backward(gout.to(BF16))
    want.backward(gout.to(BF16).double())
    for name, a, b in zip(("x", "weight_mu", "weight_rho", "bias_mu", "bias_rho", "eps"), low, ref):
        assert a.grad.dtype == BF16, name
        err = (a.grad.double() - b.grad).norm() / b.grad.norm().clamp_min(1e-30)
        assert float(err) < 2e-2, (name, float(err))
    torch.library.opcheck(torch.ops.iwae_ext.bayes_linear.default, [a.detach() for a in low])


# -- training in bfloat16 --------------------------------------------------------------------

def _tiny_run(**kw):
    from iwae_ext.trainer import TrainConfig, train
    return train(TrainConfig(k=3, epochs=2, subset=300, batch_size=50, progress=False, eval_k=20,
                             train_eval_size=100, compile=False, **kw))


def test_training_in_bfloat16_keeps_float32_state_and_follows_float32():
    """precision="bf16": the same run as float32 to within bfloat16's rounding (the last epoch's
    training bound and the test L_k within 1 nat on this tiny run), the parameters and Adam's
    state in float32."""
    from iwae_ext.trainer import TrainConfig
    from iwae_ext.trainer.loop import _Run
    from iwae_ext.data import load_dataset
    full = _tiny_run()
    low = _tiny_run(precision="bf16")
    assert low["config"]["precision"] == "bf16"
    assert abs(full["final_train_bound"] - low["final_train_bound"]) < 1.0
    assert abs(full["test_log_likelihood"] - low["test_log_likelihood"]) < 1.0
    assert full["final_train_bound"] != low["final_train_bound"]  # the products really were bfloat16
    ds = load_dataset()
    run = _Run(TrainConfig(k=3, epochs=1, subset=300, batch_size=50, progress=False, compile=False,
                           eval_k=20, train_eval_size=100, precision="bf16").resolved(ds), ds, torch.device("cpu"),
               __import__("iwae_ext._distributed", fromlist=["Dist"]).Dist(torch.device("cpu")), None)
    run.run(None)
    assert all(p.dtype == torch.float32 for p in run.model.parameters())
    assert all(t.dtype == torch.float32 for st in run.opt.state.values() for k, t in st.items() if k != "step")


def test_training_in_bfloat16_with_random_weights():
    m = _tiny_run(model="iwaer", precision="bf16")
    assert math.isfinite(m["test_log_likelihood"])


def test_precision_errors_name_the_field():
    from iwae_ext.trainer import TrainConfig, train
    with pytest.raises(ValueError, match="precision must be one of"):
        train(TrainConfig(precision="fp16", epochs=0, subset=10, progress=False))
    with pytest.raises(ValueError, match="lowers float32 matrix products; dtype is 'float64'"):
        train(TrainConfig(precision="bf16", dtype="float64", epochs=0, subset=10, progress=False))
    with pytest.raises(ValueError, match="the aiwae model's HMC sampler"):
        train(TrainConfig(model="aiwae", precision="bf16", epochs=0, subset=10, progress=False))
    with pytest.raises(ValueError, match="'tf32' is a CUDA precision"):
        train(TrainConfig(precision="tf32", epochs=1, subset=10, progress=False, device="cpu"))


def test_the_command_lines_take_the_precision_flags():
    from iwae_ext.cli.eval import parser as eval_parser
    from iwae_ext.cli.train import parser as train_parser
    assert train_parser().parse_args(["--precision", "bf16"]).precision == "bf16"
    assert eval_parser().parse_args(["run", "--ais", "--ais-precision", "full"]).ais_precision == "full"
    assert eval_parser().parse_args(["run"]).ais_precision == "auto"
    with pytest.raises(SystemExit):
        train_parser().parse_args(["--precision", "fp16"])


def test_random_weight_layers_run_in_bfloat16_under_autocast():
    """A model of BayesLinear layers only has no nn.Linear for autocast to lower: the layer lowers
    its float32 input itself, as autocast lowers nn.Linear's, and its gradients reach the float32
    parameters."""
    from iwae_ext.models import BayesLinear
    torch.manual_seed(16)
    layer = BayesLinear(6, 4)
    x = torch.randn(5, 6)
    with torch.autocast("cpu", dtype=BF16):
        y = layer(x)
    assert y.dtype == BF16
    y.float().sum().backward()
    assert layer.weight_mu.grad.dtype == torch.float32 and layer.weight_mu.grad.abs().sum() > 0
    assert layer(x).dtype == torch.float32  # outside autocast: float32
