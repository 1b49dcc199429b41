"""The fused HMC ops against their float64 twins: leapfrog (values, gradients, opcheck,
gradcheck), the Metropolis-Hastings step (decisions, rejection of non-finite energies,
step-size adaptation and clamping) and their argument errors."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from iwae_ext.ops import hmc_accept, hmc_leapfrog, reference

from conftest import DEVICES


def leapfrog_args(c, d, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    args = [r(c, d), r(c, d), r(c, d), 0.05 + torch.rand(c, generator=g, dtype=torch.float64)]
    return [a.to(device=device, dtype=dtype) for a in args]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c,d", [(1, 1), (7, 3), (64, 50), (5, 257)])
@pytest.mark.parametrize("kick,drift", [(0.5, True), (1.0, True), (0.5, False)])
def test_leapfrog_matches_twin_with_gradients(device, c, d, kick, drift):
    args = [a.requires_grad_() for a in leapfrog_args(c, d, device=device)]
    gz, gp = torch.randn(c, d, dtype=torch.float64, device=device), torch.randn(
        c, d, dtype=torch.float64, device=device)
    out = hmc_leapfrog(*args, kick, drift)
    ref = reference.hmc_leapfrog(*args, kick, drift)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    got = torch.autograd.grad(out, args, (gz, gp))
    want = torch.autograd.grad(ref, args, (gz, gp))
    for name, a, b in zip(("z", "p", "grad_u", "step_size"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_leapfrog_float32_close_to_float64(device):
    args = leapfrog_args(300, 20, device=device, seed=1)
    want = reference.hmc_leapfrog(*args, 1.0, True)
    got = hmc_leapfrog(*[a.float() for a in args], 1.0, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    args = [a.requires_grad_(requires_grad) for a in leapfrog_args(6, 4, device=device)]
    for kick, drift in ((0.5, True), (0.5, False)):
        torch.library.opcheck(torch.ops.iwae_ext.hmc_leapfrog.default, (*args, kick, drift))
    z, p, g, e = [a.detach() for a in args]
    p_out = torch.randn_like(p)
    torch.library.opcheck(torch.ops.iwae_ext.hmc_leapfrog_backward.default,
                          (torch.randn_like(z), torch.randn_like(p), p_out, g, e, 1.0, True))
    acc = accept_args(6, 4, device=device)
    torch.library.opcheck(torch.ops.iwae_ext.hmc_accept.default,
                          (*acc, 0.65, 0.9, 1.02, 0.98, 1e-4, 1.0, True))


@given(c=st.integers(1, 5), d=st.integers(1, 9), kick=st.sampled_from([0.5, 1.0]), drift=st.booleans(),
       seed=st.integers(0, 10**6))
def test_gradcheck_hypothesis(c, d, kick, drift, seed):
    args = [a.requires_grad_() for a in leapfrog_args(c, d, seed=seed)]
    assert torch.autograd.gradcheck(lambda *a: hmc_leapfrog(*a, kick, drift), args)


def test_differentiating_through_a_trajectory():
    """A whole trajectory on U(z) = |z|^2 / 2 (grad_u = z, by autograd with create_graph) gives
    the same gradient of the end point with respect to the start as the twin's."""
    def trajectory(step, z, p, leapfrog):
        gu = z
        z, p = leapfrog(z, p, gu, step, 0.5, True)
        for i in range(4):
            gu = z  # the gradient of |z|^2/2, differentiable in z
            z, p = leapfrog(z, p, gu, step, 1.0 if i < 3 else 0.5, i < 3)
        return (z.square().sum() + p.sum()).sum()

    z0, p0, _, step = [a.requires_grad_() for a in leapfrog_args(3, 2, seed=5)]
    got = torch.autograd.grad(trajectory(step, z0, p0, hmc_leapfrog), (z0, p0, step))
    want = torch.autograd.grad(trajectory(step, z0, p0, reference.hmc_leapfrog), (z0, p0, step))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_double_backward_raises():
    args = [a.requires_grad_() for a in leapfrog_args(2, 3)]
    z, _ = hmc_leapfrog(*args)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(torch.autograd.grad(z.sum(), args[0], create_graph=True)[0].sum(), args[0])


def accept_args(c, d, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    z0, z1, p0, p1 = r(c, d), r(c, d), r(c, d), r(c, d)
    u0, u1 = r(c).abs() * d, r(c).abs() * d
    log_u = torch.rand(c, generator=g, dtype=torch.float64).log()
    step = 0.05 + torch.rand(c, generator=g, dtype=torch.float64)
    avg = torch.rand(c, generator=g, dtype=torch.float64)
    return [a.to(device=device, dtype=dtype) for a in (z0, z1, p0, p1, u0, u1, log_u, step, avg)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c,d", [(1, 1), (100, 2), (33, 50), (9, 70)])
@pytest.mark.parametrize("adapt", [True, False])
def test_accept_matches_twin(device, dtype, c, d, adapt):
    args = accept_args(c, d, dtype, device)
    kw = dict(target_accept=0.65, decay=0.9, inc=1.02, dec=0.98, min_step=0.06, max_step=0.9, adapt=adapt)
    got = hmc_accept(*args, **kw)
    want = reference.hmc_accept(*args, **kw)
    assert got.accepted.dtype == torch.bool
    assert torch.equal(got.accepted, want[2])
    torch.testing.assert_close(got.z, want[0], rtol=0, atol=0)
    torch.testing.assert_close(got.u, want[1], rtol=0, atol=0)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(got.step_size, want[3], rtol=tol, atol=tol)
    torch.testing.assert_close(got.accept_avg, want[4], rtol=tol, atol=tol)
    if adapt:
        assert bool((got.step_size >= 0.06 - 1e-7).all() and (got.step_size <= 0.9 + 1e-7).all())
    else:
        assert torch.equal(got.step_size, args[7])
    # both outcomes occur in the larger cases, so the test sees both branches
    if c >= 33:
        assert 0 < int(got.accepted.sum()) < c


@pytest.mark.parametrize("device", DEVICES)
def test_accept_decisions_by_hand(device):
    """Chain 0: H drops -> always accepted; chain 1: H rises by 1, accepted iff log u < -1;
    chains 2-4: U1 = +inf, NaN, -inf -> rejected whatever u; chain 5: U0 = +inf (a bad start)
    -> accepted."""
    f = lambda v: torch.tensor(v, dtype=torch.float64, device=device)  # noqa: E731
    inf, nan = math.inf, math.nan
    z0 = f([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [6.0]])
    z1 = z0 + 10
    p0 = torch.zeros_like(z0)
    p1 = torch.zeros_like(z0)
    u0 = f([5.0, 0.0, 0.0, 0.0, 0.0, inf, 0.0])
    u1 = f([1.0, 1.0, inf, nan, -inf, 3.0, 1.0])
    log_u = f([-0.1, -1.1, -50.0, -50.0, -50.0, -0.1, -0.9])
    step = torch.full((7,), 0.1, dtype=torch.float64, device=device)
    avg = torch.full((7,), 0.65, dtype=torch.float64, device=device)
    r = hmc_accept(z0, z1, p0, p1, u0, u1, log_u, step, avg, decay=0.5)
    assert r.accepted.tolist() == [True, True, False, False, False, True, False]
    assert r.z[:, 0].tolist() == [10.0, 11.0, 2.0, 3.0, 4.0, 15.0, 6.0]
    # acceptance probabilities 1, e^-1, 0, 0, 0, 1, e^-1; avg' = (0.65 + a) / 2
    a = torch.tensor([1, math.exp(-1), 0, 0, 0, 1, math.exp(-1)], dtype=torch.float64)
    torch.testing.assert_close(r.accept_avg.cpu(), (0.65 + a) / 2)
    up = (0.65 + a) / 2 > 0.65
    torch.testing.assert_close(r.step_size.cpu(), torch.where(up, 0.102, 0.098).double())


@pytest.mark.parametrize("device", DEVICES)
def test_float32_chains_decide_in_double(device):
    """U0 = U1 = 1e4 and |p1|^2/2 = 2e-4: H0 - H1 = -2e-4, below log u = -1e-4, so the
    proposal is rejected. In float32 arithmetic 1e4 + 2e-4 rounds to 1e4 (an ulp there is
    ~1e-3), H0 - H1 = 0 and it would be accepted; every device decides in double, like the twin."""
    f = lambda v: torch.tensor(v, dtype=torch.float32, device=device)  # noqa: E731
    z0, z1 = f([[0.0]]), f([[1.0]])
    p0, p1 = f([[0.0]]), f([[0.02]])
    u, log_u, step, avg = f([1e4]), f([-1e-4]), f([0.1]), f([0.65])
    args = (z0, z1, p0, p1, u, u, log_u, step, avg)
    r = hmc_accept(*args, decay=0.5)
    want = reference.hmc_accept(*args, decay=0.5)
    assert r.accepted.tolist() == [False] and want[2].tolist() == [False]
    assert r.z.tolist() == [[0.0]]
    # the acceptance probability exp(-2e-4) enters the average: (0.65 + a) / 2 > 0.65
    torch.testing.assert_close(r.accept_avg.double().cpu(), torch.tensor([(0.65 + math.exp(-2e-4)) / 2],
                               dtype=torch.float64), rtol=1e-7, atol=0)
    torch.testing.assert_close(r.step_size, want[3], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_step_size_gradient_sums_in_double(device):
    """d L / d eps_c sums D terms; with 2^20 positive float32 terms a float accumulator (32
    lanes, each adding 2^15 terms) is off by 5-10 ulps of the result, a double one only by the
    terms' own rounding."""
    c, d = 2, 1 << 20
    g = torch.Generator().manual_seed(3)
    u = lambda: torch.rand(c, d, generator=g, dtype=torch.float64)  # noqa: E731
    gz, gp, p_out, grad_u = u(), u(), u(), -u()
    step = torch.tensor([0.1, 0.3], dtype=torch.float64)
    to32 = lambda t: t.float().to(device)  # noqa: E731
    for kick, drift in ((1.0, True), (0.5, False)):
        got = torch.ops.iwae_ext.hmc_leapfrog_backward(to32(gz), to32(gp), to32(p_out), to32(grad_u),
                                                         to32(step), kick, drift)[3].double().cpu()
        # the float64 value of the same float32 inputs
        gz64, gp64, p64, gu64, e64 = (t.float().double() for t in (gz, gp, p_out, grad_u, step))
        gq = gp64 + (e64.unsqueeze(1) * gz64 if drift else 0)
        want = ((gz64 * p64).sum(1) if drift else 0) - kick * (gq * gu64).sum(1)
        # each term rounds a few times in float32 (|error| <~ eps * sqrt(sum |term|^2) * few),
        # and the result once (half an ulp); a float accumulator is off by ~10 ulps here
        terms = (gz64 * p64).abs() + (kick * gq * gu64).abs()
        w32 = want.float()
        half_ulp = 0.5 * (torch.nextafter(w32, torch.tensor(math.inf)) - w32).double()
        bound = 8 * torch.finfo(torch.float32).eps * terms.square().sum(1).sqrt() + half_ulp
        assert ((got - want).abs() <= bound).all(), (got - want, bound)


@pytest.mark.parametrize("device", DEVICES)
def test_accept_kinetic_energy_enters(device):
    """Same potentials, the proposal's momentum larger by |p1|^2/2 = 2: H rises by 2."""
    z0 = torch.zeros(2, 2, dtype=torch.float64, device=device)
    p0 = torch.zeros_like(z0)
    p1 = torch.tensor([[2.0, 0.0], [2.0, 0.0]], dtype=torch.float64, device=device)
    u = torch.zeros(2, dtype=torch.float64, device=device)
    log_u = torch.tensor([-1.9, -2.1], dtype=torch.float64, device=device)
    s = torch.ones(2, dtype=torch.float64, device=device) * 0.1
    r = hmc_accept(z0, z0 + 1, p0, p1, u, u, log_u, s, s)
    assert r.accepted.tolist() == [False, True]


def test_step_size_clamped():
    args = accept_args(50, 3)
    lo = hmc_accept(*args, min_step=0.5, max_step=0.5)
    assert torch.equal(lo.step_size, torch.full_like(lo.step_size, 0.5))


@pytest.mark.parametrize("bad,match", [
    (dict(target_accept=1.0), "target_accept"), (dict(decay=1.0), "decay"), (dict(inc=0.9), "inc"),
    (dict(dec=1.5), "dec"), (dict(min_step=0.0), "min_step"), (dict(min_step=2.0, max_step=1.0), "min_step"),
])
def test_accept_setting_errors(bad, match):
    with pytest.raises(RuntimeError, match=match):
        hmc_accept(*accept_args(3, 2), **bad)


def test_argument_errors_name_the_argument():
    z, p, g, e = leapfrog_args(4, 3)
    with pytest.raises(RuntimeError, match="hmc_leapfrog: z must have shape \\[chains, dim\\]"):
        hmc_leapfrog(z[0], p[0], g[0], e)
    with pytest.raises(RuntimeError, match="hmc_leapfrog: p must have the shape of z"):
        hmc_leapfrog(z, p[:, :2], g, e)
    with pytest.raises(RuntimeError, match="hmc_leapfrog: grad_u must have the dtype of z"):
        hmc_leapfrog(z, p, g.float(), e)
    with pytest.raises(RuntimeError, match="hmc_leapfrog: step_size must have shape \\[chains\\]"):
        hmc_leapfrog(z, p, g, e[:3])
    with pytest.raises(RuntimeError, match="hmc_leapfrog: z must be float32 or float64"):
        hmc_leapfrog(z.half(), p.half(), g.half(), e.half())
    a = accept_args(4, 3)
    for i, name in enumerate(("z1", "p0", "p1")):
        bad = list(a)
        bad[i + 1] = bad[i + 1][:, :2]
        with pytest.raises(RuntimeError, match=f"hmc_accept: {name} must have the shape of z0"):
            hmc_accept(*bad)
    for i, name in enumerate(("u0", "u1", "log_uniform", "step_size", "accept_avg")):
        bad = list(a)
        bad[i + 4] = bad[i + 4][:2]
        with pytest.raises(RuntimeError, match=f"hmc_accept: {name} must have shape \\[chains\\]"):
            hmc_accept(*bad)


def test_fake_kernels_under_compile():
    args = leapfrog_args(5, 3)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(z, p, g, e):
        z1, p1 = hmc_leapfrog(z, p, g, e, 0.5, True)
        r = hmc_accept(z, z1, p, p1, g.sum(-1), g.sum(-1) + 1, torch.zeros_like(e), e, e)
        return r.z, r.step_size

    got = f(*args)
    z1, p1 = reference.hmc_leapfrog(*args, 0.5, True)
    want = reference.hmc_accept(args[0], z1, args[1], p1, args[2].sum(-1), args[2].sum(-1) + 1,
                                torch.zeros_like(args[3]), args[3], args[3])
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[3])


@pytest.mark.cuda
@pytest.mark.skipif(DEVICES[1].marks[0].args[0], reason="needs a CUDA device and kernels")
def test_a_tensor_on_another_device_is_named():
    """z on the CPU and p on the GPU (or the reverse) reaches the CUDA kernel, whose checks name
    the misplaced tensor before taking a device guard."""
    for home, other in (("cpu", "cuda"), ("cuda", "cpu")):
        z, p, g, e = leapfrog_args(3, 2, device=home)
        with pytest.raises(RuntimeError, match="p must be on the device of z"):
            hmc_leapfrog(z, p.to(other), g, e)
        args = accept_args(3, 2, device=home)
        args[7] = args[7].to(other)
        with pytest.raises(RuntimeError, match="step_size must be on the device of z0"):
            hmc_accept(*args)
