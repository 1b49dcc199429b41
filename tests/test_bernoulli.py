"""bernoulli_log_prob (the fused decoder output layer) against its float64 twin: values, every
gradient on both backward paths, accuracy per element and against PyTorch in float32,
stability for |l| up to 1e4, the (value, d/dh) op, opcheck, torch.compile, and the models."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import iwae_ext
from iwae_ext.models import VAE
from iwae_ext.ops import bernoulli_log_prob, bernoulli_log_prob_grad_h, reference

from conftest import DEVICES

NAMES = ("h", "weight", "bias", "x")


def make(lead, b, h_dim, d, dtype=torch.float64, device="cpu", seed=0, scale=1.0, binary=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    h = torch.tanh(r(*lead, b, h_dim))
    w = scale * r(d, h_dim) / math.sqrt(max(h_dim, 1)) * 3
    bias = scale * r(d)
    x = torch.rand(b, d, generator=g, dtype=torch.float64)
    if binary:
        x = (x < 0.3).double()
    return [t.to(device=device, dtype=dtype) for t in (h, w, bias, x)]


def grads(fn, args, g, wrt=(0, 1, 2, 3)):
    args = [a.detach().requires_grad_(i in wrt) for i, a in enumerate(args)]
    out = fn(*args)
    return out, torch.autograd.grad(out, [args[i] for i in wrt], g)


def pytorch_bce(h, w, b, x):
    """What a plain PyTorch decoder computes: -BCE-with-logits summed over pixels."""
    logits = F.linear(h, w, b)
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,b,h_dim,d", [((), 7, 5, 3), ((3,), 4, 6, 17), ((2, 3), 5, 8, 33),
                                            ((5,), 100, 200, 784), ((50,), 20, 20, 31), ((1,), 1, 1, 1)])
def test_float64_matches_twin(device, lead, b, h_dim, d):
    args = make(lead, b, h_dim, d, device=device, binary=False)
    g = torch.randn(*lead, b, dtype=torch.float64, device=device)
    out, gs = grads(bernoulli_log_prob, args, g)
    ref, rgs = grads(reference.bernoulli_log_prob, args, g)
    assert out.shape == (*lead, b)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-11)
    for name, a, r in zip(NAMES, gs, rgs):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-11, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, True]])
def test_recomputing_backward_matches_twin(device, mask):
    """The backward op recomputes the logits block by block (what autograd takes when d/dl would
    be large): every requested gradient equals the twin's, the others are None."""
    h, w, b, x = make((3, 7), 50, 13, 61, device=device, binary=False)
    g = torch.randn(3, 7, 50, dtype=torch.float64, device=device)
    got = torch.ops.iwae_ext.bernoulli_log_prob_backward(g, h, w, b, x, mask)
    _, want = grads(reference.bernoulli_log_prob, [h, w, b, x], g, wrt=(0, 1, 2))
    for name, m, a, r in zip(NAMES, mask, got, want):
        if m:
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-11, msg=name)
        else:
            assert a is None, name


@pytest.mark.parametrize("device", DEVICES)
def test_autograd_recomputes_above_the_keep_limit(device):
    """d/dl of more than 64 MiB is not kept: the autograd formula then takes the recomputing
    backward, with the same gradients. On CUDA the 66 MiB of logits are also more than one row
    block (32 MB each), forward and backward."""
    h, w, b, x = make((11,), 1000, 6, 784, binary=False, device=device)  # [11000, 784] float64: 66 MiB
    g = torch.randn(11, 1000, dtype=torch.float64, device=device)
    out, gs = grads(bernoulli_log_prob, [h, w, b, x], g)
    ref, rgs = grads(reference.bernoulli_log_prob, [h, w, b, x], g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-10)
    for name, a, r in zip(NAMES, gs, rgs):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-9, msg=name)


@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=2), b=st.integers(1, 5),
       h_dim=st.integers(1, 6), d=st.integers(1, 40), scale=st.floats(0.1, 30),
       binary=st.booleans(), seed=st.integers(0, 10 ** 6))
def test_gradcheck_hypothesis(lead, b, h_dim, d, scale, binary, seed):
    args = [a.requires_grad_() for a in make(tuple(lead), b, h_dim, d, seed=seed, scale=scale, binary=binary)]
    assert torch.autograd.gradcheck(bernoulli_log_prob, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_term_to_a_few_ulp(device, dtype):
    """One pixel per output (D = 1, l = h): the term x l - softplus(l) and x - sigmoid(l) for
    l over [-120, 120] and x in {0, 1/3, 1}, against float64 (or exact) arithmetic, within
    4 ulp of the result (+ the input rounding of l x; results below the smallest normal number
    are flushed to 0); this is the fast exp and log1p's test."""
    l = torch.cat([torch.linspace(-120, 120, 24001, dtype=torch.float64),
                   torch.tensor([0.0, 1e-30, -1e-30, 1e-7, -1e-7], dtype=torch.float64)]).to(dtype).double()
    n = l.numel()
    eps = torch.finfo(dtype).eps
    for xv in (0.0, 1.0 / 3, 1.0):
        x = torch.full((n, 1), xv, dtype=dtype, device=device)
        h = l.to(dtype).view(1, n, 1).to(device)
        one = torch.ones(1, 1, dtype=dtype, device=device)
        zero = torch.zeros(1, dtype=dtype, device=device)
        out = bernoulli_log_prob(h, one, zero, x).double().cpu().view(-1)
        xd = x.double().cpu().view(-1)
        want = xd * l - (l.clamp_min(0) + torch.log1p(torch.exp(-l.abs())))  # F.softplus cuts at 20
        tol = 4 * eps * want.abs() + 2 * eps * (xd * l).abs() + torch.finfo(dtype).smallest_normal
        assert ((out - want).abs() <= tol).all(), float(((out - want).abs() / tol).max())
        _, gh = bernoulli_log_prob_grad_h(h, one, zero, x, value=False)
        gwant = xd - torch.sigmoid(l)
        gtol = 4 * eps * (gwant.abs() + torch.sigmoid(l)) + torch.finfo(dtype).smallest_normal
        assert ((gh.double().cpu().view(-1) - gwant).abs() <= gtol).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_float32_error_within_twice_pytorchs(device, scale):
    """Against float64, the op's float32 value and gradients err at most 2x as much as
    PyTorch's float32 F.linear + binary_cross_entropy_with_logits (the training shape)."""
    args64 = make((5,), 100, 200, 784, device=device, seed=3, scale=scale)
    args32 = [a.float() for a in args64]
    g64 = torch.randn(5, 100, dtype=torch.float64, device=device)
    want, wgs = grads(reference.bernoulli_log_prob, args64, g64)
    ours, ogs = grads(bernoulli_log_prob, args32, g64.float())
    theirs, tgs = grads(pytorch_bce, args32, g64.float())
    err = lambda a, b: float((a.detach().double() - b.detach()).abs().max())  # noqa: E731
    assert err(ours, want) <= 2 * err(theirs, want)
    for name, o, t, w in zip(NAMES, ogs, tgs, wgs):
        assert err(o, w) <= 2 * err(t, w) + 1e-6 * float(w.abs().max()), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stable_for_logits_up_to_1e4(device, dtype):
    """|l| = 1e4: the exact terms (0 or -|l|) and gradients (0 or +-1 times W), no inf or NaN."""
    big = 1e4
    h = torch.tensor([[[1.0]], [[-1.0]]], dtype=dtype, device=device)  # [2, 1, 1]
    w = torch.tensor([[big], [big], [big / 2]], dtype=dtype, device=device)
    b = torch.zeros(3, dtype=dtype, device=device)
    x = torch.tensor([[1.0, 0.0, 0.25]], dtype=dtype, device=device)
    args = [h, w, b, x]
    out, gs = grads(bernoulli_log_prob, args, torch.ones(2, 1, dtype=dtype, device=device), wrt=(0, 1, 2))
    # h = 1: l = (1e4, 1e4, 5e3): 0 - 1e4 - 0.75 * 5e3; h = -1: l = -l: -1e4 + 0 - 0.25 * 5e3
    torch.testing.assert_close(out.view(-1).double().cpu(),
                               torch.tensor([-1e4 - 3750.0, -1e4 - 1250.0], dtype=torch.float64))
    assert all(torch.isfinite(t).all() for t in gs)
    # d/dh = sum_d (x - sigmoid(l)) W: h = 1: (0 - 1e4 - 0.75 * 5e3); h = -1: (1e4 + 0 + 0.25 * 5e3)
    torch.testing.assert_close(gs[0].view(-1).double().cpu(),
                               torch.tensor([-1e4 - 3750.0, 1e4 + 1250.0], dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_h_op(device, dtype):
    h, w, b, x = make((), 300, 20, 50, dtype=dtype, device=device)
    v, gh = bernoulli_log_prob_grad_h(h, w, b, x)
    rv, rgh = reference.bernoulli_log_prob_grad_h(*(t.double() for t in (h, w, b, x)))
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(v.double(), rv, **tol)
    torch.testing.assert_close(gh.double(), rgh, **tol)
    none, gh2 = bernoulli_log_prob_grad_h(h, w, b, x, value=False)
    assert none is None
    torch.testing.assert_close(gh2, gh, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    h, w, b, x = make((3,), 4, 5, 9, device=device)
    args = [t.requires_grad_(requires_grad) for t in (h, w, b, x)]
    torch.library.opcheck(torch.ops.iwae_ext.bernoulli_log_prob.default, args)
    plain = [t.detach() for t in args]
    g = torch.randn(3, 4, dtype=torch.float64, device=device)
    for mask in ([True] * 3, [False, True, False]):
        torch.library.opcheck(torch.ops.iwae_ext.bernoulli_log_prob_backward.default, (g, *plain, mask))
    for value in (True, False):
        torch.library.opcheck(torch.ops.iwae_ext.bernoulli_log_prob_grad_h.default, (*plain, value))
    torch.library.opcheck(torch.ops.iwae_ext.bernoulli_log_prob_dlogit.default, plain)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_zero_sizes(device):
    """No rows, no pixels (value 0, zero gradients) or no hidden units (l = bias): the twin's
    values and gradients, of the right shapes."""
    for lead, bsz, h_dim, d in (((0,), 3, 4, 5), ((2,), 3, 4, 0), ((2,), 3, 0, 5)):
        args = make(lead, bsz, h_dim, d, device=device)
        g = torch.randn(*lead, bsz, dtype=torch.float64, device=device)
        out, gs = grads(bernoulli_log_prob, args, g)
        ref, rgs = grads(reference.bernoulli_log_prob, args, g)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for name, a, r in zip(NAMES, gs, rgs):
            assert a.shape == r.shape, name
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_names_the_argument(device):
    h, w, b, x = make((2,), 3, 4, 5, device=device)
    cases = [((h[0, 0], w, b, x), r"h must have shape \[\.\.\., B, H\]"),
             ((h, w[:, :3], b, x), r"h's last dimension \(4\) must equal weight's H \(3\)"),
             ((h, w, b[:4], x), r"bias must have shape \[5\]"),
             ((h, w, b, x[:2]), r"x must have shape \[B, D\] = \[3, 5\]"),
             ((h, w.float(), b, x), "weight must have the dtype of h"),
             ((h, w, b, x.float()), "x must have the dtype of h"),
             ((h.half(), w.half(), b.half(), x.half()), "h must be float32, float64 or bfloat16")]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            bernoulli_log_prob(*args)
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        torch.ops.iwae_ext.bernoulli_log_prob_backward(torch.zeros(3, dtype=h.dtype, device=device), h, w, b, x,
                                                      [True, True, True])


@pytest.mark.cuda
@pytest.mark.skipif(DEVICES[1].marks[0].args[0], reason="needs a CUDA device and kernels")
@pytest.mark.parametrize("moved", range(4))
def test_a_tensor_on_another_device_is_named(moved):
    for home, other in (("cpu", "cuda"), ("cuda", "cpu")):
        args = make((2,), 3, 4, 5, device=home)
        args[moved] = args[moved].to(other)
        name = NAMES[moved] if moved else "weight"
        with pytest.raises(RuntimeError, match=f"{name} must be on the device of h"):
            bernoulli_log_prob(*args)


def test_non_contiguous_inputs():
    h, w, b, x = make((4,), 6, 5, 7)
    ht = h.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    wt = w.t().contiguous().t()
    xt = x.t().contiguous().t()
    torch.testing.assert_close(bernoulli_log_prob(ht, wt, b, xt), reference.bernoulli_log_prob(h, w, b, x))


def test_double_backward_raises_a_clear_error():
    args = [a.requires_grad_() for a in make((2,), 3, 4, 5)]
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(bernoulli_log_prob(*args).sum(), args[0], create_graph=True)


def test_torch_compile_fullgraph():
    args = make((4,), 8, 6, 10, dtype=torch.float32)

    def f(h, w, b, x):
        return torch.tanh(bernoulli_log_prob(h, w, b, x) / 100).sum()

    compiled = torch.compile(f, fullgraph=True)
    a1 = [t.clone().requires_grad_() for t in args]
    a2 = [t.clone().requires_grad_() for t in args]
    torch.testing.assert_close(compiled(*a1), f(*a2))
    compiled(*a1).backward()
    f(*a2).backward()
    for p, q in zip(a1, a2):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("latent_dims,random_weights", [((50,), "none"), ((10, 5), "none"), ((8,), "encoder"),
                                                        ((8,), "all")])
def test_model_paths_agree(latent_dims, random_weights):
    """VAE.log_likelihood, log_weights and their gradients with the fused op and with the
    reference path (model.fused = False) agree in float64; a random-weight output layer keeps
    its own path."""
    torch.manual_seed(0)
    model = VAE(30, latent_dims, hidden=(12, 9) if len(latent_dims) == 1 else ((12, 9), (7, 6)),
                random_weights=random_weights).double()
    x = (torch.rand(6, 30, dtype=torch.float64) < 0.4).double()
    z = torch.randn(4, 6, model.latent_dim, dtype=torch.float64)
    assert model.decoder.fuses(x, torch.zeros(4, 6, 9, dtype=torch.float64)) == (random_weights != "all")
    outs = {}
    for fused in (True, False):
        model.fused = fused
        model.zero_grad()
        torch.manual_seed(1)
        lw = model.log_weights(x, 4)
        lw.sum().backward()
        outs[fused] = (model.log_likelihood(x, z).detach(), lw.detach(),
                       [p.grad.clone() for p in model.parameters()])
    model.fused = True
    torch.testing.assert_close(outs[True][0], outs[False][0], rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(outs[True][1], outs[False][1], rtol=1e-12, atol=1e-11)
    for a, b in zip(outs[True][2], outs[False][2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_joint_and_grad_fused_matches_reference(dtype):
    torch.manual_seed(0)
    model = VAE(40, (6,), hidden=(15, 11)).to(dtype)
    x = (torch.rand(9, 40) < 0.5).to(dtype)
    z = torch.randn(9, 6, dtype=dtype)
    v1, g1 = model.log_joint_and_grad(x, z)
    model.fused = False
    v2, g2 = model.log_joint_and_grad(x, z)
    zz = z.clone().requires_grad_()
    auto = model.log_joint(x, zz.unsqueeze(0))[0]
    (ga,) = torch.autograd.grad(auto.sum(), zz)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(v1, v2, **tol)
    torch.testing.assert_close(g1, g2, **tol)
    torch.testing.assert_close(g1, ga, **tol)
    model.fused = True
    assert model.log_joint_and_grad(x, z, value=False)[0] is None


def test_reference_ops_switch_reaches_the_decoder(tmp_path):
    """TrainConfig(fused=False) (--reference-ops) trains with the reference decoder path; the
    epoch's bound and the final L_k equal the fused run's to float64 tolerance."""
    from iwae_ext.trainer import TrainConfig, train
    res = {}
    for fused in (True, False):
        cfg = TrainConfig(k=3, batch_size=50, epochs=1, subset=100, eval_k=5, train_eval_size=20, seed=3,
                          fused=fused, progress=False, out=str(tmp_path / str(fused)), dtype="float64",
                          compile=False)
        res[fused] = train(cfg)
    for key in ("final_train_bound", "test_log_likelihood"):
        a, b = res[True][key], res[False][key]
        assert math.isclose(a, b, rel_tol=1e-9), (key, a, b)


def test_exported_names():
    assert "bernoulli_log_prob" in iwae_ext.ops.__all__
    assert "bernoulli_log_prob_grad_h" in iwae_ext.ops.__all__


def test_data_of_another_dtype_keeps_the_promoting_path():
    """log_joint_and_grad with float32 data and a float64 model: the fused op needs one dtype,
    so the decoder takes the reference path there (as before), with the float64 result."""
    torch.manual_seed(0)
    model = VAE(20, (4,), hidden=(8,)).double()
    x = (torch.rand(5, 20) < 0.5).float()
    z = torch.randn(5, 4, dtype=torch.float64)
    v, g = model.log_joint_and_grad(x, z)
    v2, g2 = model.log_joint_and_grad(x.double(), z)
    assert v.dtype == torch.float64
    torch.testing.assert_close(v, v2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g2, rtol=1e-12, atol=1e-12)


def test_no_grad_keeps_nothing():
    """Under torch.no_grad (an evaluation) a layer whose parameters require grad runs the plain
    forward; with grad enabled and a small d/dl, the forward that keeps d/dl."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    h, w, b, x = make((3,), 4, 5, 6)
    w.requires_grad_()
    for grad, want in ((False, "iwae_ext.bernoulli_log_prob"), (True, "iwae_ext.bernoulli_log_prob_dlogit")):
        with torch.set_grad_enabled(grad), Calls() as calls:
            bernoulli_log_prob(h, w, b, x)
        assert want in calls.names and ("iwae_ext.bernoulli_log_prob_dlogit" in calls.names) == grad, calls.names
