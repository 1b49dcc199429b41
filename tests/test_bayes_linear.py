"""bayes_linear against its float64 twin, its gradients, and the exact per-row-weights layer."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from iwae_ext.ops import bayes_linear, reference

from conftest import DEVICES

NAMES = ("x", "weight_mu", "weight_rho", "bias_mu", "bias_rho", "eps")


def make(lead, n_in, n_out, dtype=torch.float64, device="cpu", seed=0, rho=(-3.0, 1.0)):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    lo, hi = rho
    args = [r(*lead, n_in), r(n_out, n_in) / math.sqrt(max(n_in, 1)),
            lo + (hi - lo) * torch.rand(n_out, n_in, generator=g, dtype=torch.float64), r(n_out),
            lo + (hi - lo) * torch.rand(n_out, generator=g, dtype=torch.float64), r(*lead, n_out)]
    return [a.to(device=device, dtype=dtype) for a in args]


def grads(fn, args, g):
    args = [a.detach().requires_grad_() for a in args]
    out = fn(*args)
    return out, torch.autograd.grad(out, args, g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,n_in,n_out", [((7,), 5, 3), ((4, 6), 1, 9), ((97,), 33, 17),
                                              ((2, 3, 5), 8, 4), ((1,), 784, 400)])
def test_float64_matches_twin(device, lead, n_in, n_out):
    args = make(lead, n_in, n_out, device=device)
    g = torch.randn(*lead, n_out, dtype=torch.float64, device=device)
    out, gs = grads(bayes_linear, args, g)
    ref, rgs = grads(reference.bayes_linear, args, g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(NAMES, gs, rgs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_error_within_twice_pytorchs(device):
    args64 = make((500,), 64, 32, device=device, seed=3)
    args32 = [a.float() for a in args64]
    g64 = torch.randn(500, 32, dtype=torch.float64, device=device)
    want, wgs = grads(reference.bayes_linear, args64, g64)
    ours, ogs = grads(bayes_linear, args32, g64.float())
    theirs, tgs = grads(reference.bayes_linear, args32, g64.float())
    err = lambda a, b: float((a.detach().double() - b.detach()).abs().max())  # noqa: E731
    assert err(ours, want) <= 2 * err(theirs, want) + 1e-6
    for name, o, t, w in zip(NAMES, ogs, tgs, wgs):
        assert err(o, w) <= 2 * err(t, w) + 1e-5 * float(w.abs().max()), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    args = make((3, 4), 5, 2, device=device)
    args = [a.requires_grad_(requires_grad) for a in args]
    torch.library.opcheck(torch.ops.iwae_ext.bayes_linear.default, args)
    g = torch.randn(3, 4, 2, dtype=torch.float64, device=device)
    out, std = torch.ops.iwae_ext.bayes_linear(*[a.detach() for a in args])
    x, wmu, wrho, _, brho, eps = [a.detach() for a in args]
    for mask in ([True] * 6, [False, True, True, True, True, False]):
        torch.library.opcheck(torch.ops.iwae_ext.bayes_linear_backward.default,
                              (g, x, wmu, wrho, brho, eps, std, mask))
    # non-contiguous x and eps: the kernels return contiguous d_x and d_eps, and so does the fake
    xt = torch.randn(4, 3, 5, dtype=torch.float64, device=device).transpose(0, 1)
    et = torch.randn(4, 3, 2, dtype=torch.float64, device=device).transpose(0, 1)
    _, std_t = torch.ops.iwae_ext.bayes_linear(xt, wmu, wrho, args[3].detach(), brho, et)
    torch.library.opcheck(torch.ops.iwae_ext.bayes_linear_backward.default,
                          (g, xt, wmu, wrho, brho, et, std_t, [True] * 6))


@given(lead=st.lists(st.integers(1, 6), min_size=1, max_size=2), n_in=st.integers(1, 8),
       n_out=st.integers(1, 8), lo=st.floats(-6, 2), span=st.floats(0, 4), seed=st.integers(0, 10**6))
def test_gradcheck_hypothesis(lead, n_in, n_out, lo, span, seed):
    args = make(tuple(lead), n_in, n_out, seed=seed, rho=(lo, lo + span))
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(bayes_linear, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_input_with_vanishing_variance_has_no_nan_gradient(device, dtype):
    """x = 0 and softplus(b_rho)^2 below the smallest float: var = 0 exactly. The twin's sqrt
    gives NaN gradients there; the op gives finite ones (d/d var taken as 0)."""
    x, wmu, wrho, bmu, brho, eps = make((5,), 4, 3, dtype=dtype, device=device)
    x = torch.zeros_like(x)
    brho = torch.full_like(brho, -800.0 if dtype == torch.float64 else -120.0)
    args = [x, wmu, wrho, bmu, brho, eps]
    g = torch.ones(5, 3, dtype=dtype, device=device)
    out, gs = grads(bayes_linear, args, g)
    torch.testing.assert_close(out, bmu.expand(5, 3))
    assert all(torch.isfinite(t).all() for t in gs)
    _, rgs = grads(reference.bayes_linear, args, g)
    assert any(torch.isnan(t).any() for t in rgs)  # what the op avoids


def _moments_match(a, b, what):
    """Means and variances of two samples [N, ...] agree within 5 standard errors everywhere."""
    n = a.shape[0]
    se_mean = ((a.var(0) + b.var(0)) / n).sqrt()
    z = ((a.mean(0) - b.mean(0)).abs() / se_mean).max()
    assert float(z) < 5, f"{what}: means differ by {float(z):.1f} standard errors"
    # var of the sample variance ~ (m4 - s^4)/n, per sample
    def var_se(s):
        c = s - s.mean(0)
        return ((c ** 4).mean(0) - c.var(0) ** 2) / n
    zv = ((a.var(0) - b.var(0)).abs() / (var_se(a) + var_se(b)).sqrt()).max()
    assert float(zv) < 5, f"{what}: variances differ by {float(zv):.1f} standard errors"


def test_same_distribution_as_per_row_weights():
    """Each row of the op's output has the distribution of a layer whose weights are drawn for
    that row (here 3 fixed inputs, 40,000 draws each way); also through a two-layer network."""
    torch.manual_seed(0)
    n, n_in, hidden, n_out = 40000, 6, 5, 4
    x = torch.randn(3, n_in, dtype=torch.float64)
    l1 = make((1,), n_in, hidden, seed=1, rho=(-2.0, 0.0))[1:5]
    l2 = make((1,), hidden, n_out, seed=2, rho=(-2.0, 0.0))[1:5]
    xs = x.expand(n, 3, n_in)
    gen = torch.Generator().manual_seed(5)
    y_op = bayes_linear(xs, *l1, torch.randn(n, 3, hidden, dtype=torch.float64, generator=gen))
    y_ref = reference.bayes_linear_per_row_weights(xs, *l1, generator=gen)
    _moments_match(y_op, y_ref, "one layer")
    h_op = torch.tanh(y_op)
    z_op = bayes_linear(h_op, *l2, torch.randn(n, 3, n_out, dtype=torch.float64, generator=gen))
    z_ref = reference.bayes_linear_per_row_weights(torch.tanh(y_ref), *l2, generator=gen)
    _moments_match(z_op, z_ref, "two layers")
    # and the test can tell: weights shared by all rows of a draw give another distribution
    # of the sample mean over rows of one draw (covariances), seen here as a variance change
    # of a row sum.
    shared_w = l1[0] + F.softplus(l1[1]) * torch.randn(n, 1, hidden, n_in, dtype=torch.float64, generator=gen)
    shared = (shared_w @ xs.unsqueeze(-1)).squeeze(-1) + l1[2] + F.softplus(l1[3]) * torch.randn(
        n, 1, hidden, dtype=torch.float64, generator=gen)
    with pytest.raises(AssertionError):
        _moments_match(y_op.sum(1), shared.sum(1), "shared weights")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_bad_input(device):
    args = make((0, 3), 4, 2, device=device)
    out = bayes_linear(*args)
    assert out.shape == (0, 3, 2)
    x, wmu, wrho, bmu, brho, eps = make((5,), 4, 3, device=device)
    with pytest.raises(RuntimeError, match=r"eps must have shape \[5, 3\]"):
        bayes_linear(x, wmu, wrho, bmu, brho, eps[:, :2])
    with pytest.raises(RuntimeError, match=r"x's last dimension \(4\) must equal weight_mu's in \(5\)"):
        bayes_linear(x, torch.zeros(3, 5, dtype=x.dtype, device=device), wrho, bmu, brho, eps)
    with pytest.raises(RuntimeError, match="weight_rho must have the dtype of x"):
        bayes_linear(x, wmu, wrho.float(), bmu, brho, eps)
    with pytest.raises(RuntimeError, match="bias_mu must have shape"):
        bayes_linear(x, wmu, wrho, bmu[:2], brho, eps)
    with pytest.raises(RuntimeError, match="float32, float64 or bfloat16"):
        bayes_linear(x.half(), wmu.half(), wrho.half(), bmu.half(), brho.half(), eps.half())
    with pytest.raises(RuntimeError, match="at least one dimension"):
        bayes_linear(x[0, 0], wmu, wrho, bmu, brho, eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_in,n_out", [(0, 3), (4, 0), (0, 0)])
def test_zero_in_or_out_features(device, n_in, n_out):
    """No inputs: the output is b_mu + sigma_b eps; no outputs: an empty [..., 0] result. Values
    and every gradient equal the twin's."""
    args = make((5, 2), n_in, n_out, device=device)
    g = torch.randn(5, 2, n_out, dtype=torch.float64, device=device)
    out, gs = grads(bayes_linear, args, g)
    ref, rgs = grads(reference.bayes_linear, args, g)
    assert out.shape == (5, 2, n_out)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(NAMES, gs, rgs):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(DEVICES[1].marks[0].args[0], reason="needs a CUDA device and kernels")
@pytest.mark.parametrize("moved", range(6))
def test_a_tensor_on_another_device_is_named(moved):
    """One argument on the GPU and the rest on the CPU, or the reverse: the dispatcher sends the
    call to the CUDA kernel either way, whose checks name the misplaced tensor (with x on the
    CPU, before any CUDA device guard is taken)."""
    for home, other in (("cpu", "cuda"), ("cuda", "cpu")):
        args = make((5,), 4, 3, device=home)
        args[moved] = args[moved].to(other)
        name = NAMES[moved] if moved else "weight_mu"  # x moved: the first argument checked
        with pytest.raises(RuntimeError, match=f"{name} must be on the device of x"):
            bayes_linear(*args)


def test_double_backward_raises_a_clear_error():
    args = [a.requires_grad_() for a in make((5,), 4, 3)]
    out = bayes_linear(*args)
    (gx,) = torch.autograd.grad(out.sum(), args[0], create_graph=False)
    assert gx.shape == (5, 4)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(bayes_linear(*args).sum(), args[0], create_graph=True)


def test_torch_compile_fullgraph():
    args = make((8,), 6, 3, dtype=torch.float32)

    def f(*a):
        return torch.tanh(bayes_linear(*a)).sum()

    compiled = torch.compile(f, fullgraph=True)
    a1 = [t.clone().requires_grad_() for t in args]
    a2 = [t.clone().requires_grad_() for t in args]
    torch.testing.assert_close(compiled(*a1), f(*a2))
    compiled(*a1).backward()
    f(*a2).backward()
    for p, q in zip(a1, a2):
        torch.testing.assert_close(p.grad, q.grad)
