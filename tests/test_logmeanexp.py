"""logmeanexp: the kernels against the float64 twin, autograd, edge cases, torch.compile."""
import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from iwae_ext.ops import logmeanexp, logmeanexp_backward, logmeanexp_stats, reference
from conftest import DEVICES

OP = torch.ops.iwae_ext.logmeanexp.default
BACKWARD_OP = torch.ops.iwae_ext.logmeanexp_backward.default
INF = math.inf

# Shapes and dims covering the kernels' paths: rows (dim last, K small / warp / block /
# split), columns (a non-last dim of a contiguous tensor), odd sizes and K = 1.
CASES = [
    ((7,), 0),
    ((1, 1), -1),
    ((5, 1), 1),
    ((97, 7), -1),
    ((7, 97), 1),
    ((13, 33), 0),
    ((3, 1025, 5), 1),
    ((2, 3, 4, 5), 2),
    ((20, 5000), -1),
    ((4, 2049), -1),
    ((5000, 3), 0),
    ((3, 700, 40), 1),    # columns: two tiles of 32, K split across blocks on CUDA
    ((2, 300, 6), 1),     # columns: tiles of 8
]


def _logw(shape, dtype, device, scale=5.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dim", CASES)
def test_float64_matches_twin(device, shape, dim):
    x = _logw(shape, torch.float64, device)
    torch.testing.assert_close(logmeanexp(x, dim), reference.logmeanexp(x, dim), rtol=1e-12, atol=1e-12)
    g = _logw(reference.logmeanexp(x, dim).shape, torch.float64, device, seed=1)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    (gx1,) = torch.autograd.grad(logmeanexp(x1, dim), x1, g)
    (gx2,) = torch.autograd.grad(reference.logmeanexp(x2, dim), x2, g)
    torch.testing.assert_close(gx1, gx2, rtol=1e-12, atol=1e-12)


def _float32_errors(x64, dim, lowp):
    """Max error, against the float64 twin, of the kernel and of PyTorch at dtype lowp."""
    ref = reference.logmeanexp(x64, dim)
    xl = x64.to(lowp)
    ours = (logmeanexp(xl, dim).double() - ref).abs().max().item()
    torchs = (reference.logmeanexp(xl.float() if lowp != torch.float32 else xl, dim).to(lowp).double() - ref).abs().max().item()
    return ours, torchs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dim", CASES + [
    ((100, 5000), -1), ((5000, 100), 0),
    # the [k, B] log-weights of every bound (dim 0) with large k and few columns, and rows
    # numerous enough for one block each with very large K: the float32 error must not grow
    # with K (a CUDA thread that walked a whole column or row lost about K ulps)
    ((5000, 10), 0), ((50000, 4), 0), ((300, 30000), -1)])
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3])
def test_float32_error_at_most_twice_pytorchs(device, shape, dim, scale):
    x64 = _logw(shape, torch.float64, device, scale=scale, seed=2)
    ours, torchs = _float32_errors(x64, dim, torch.float32)
    # 2x PyTorch's float32 error; the floor is half an ulp of the output, which both may
    # reach when PyTorch happens to round exactly.
    ulp = torch.finfo(torch.float32).eps * max(1.0, reference.logmeanexp(x64, dim).abs().max().item())
    assert ours <= 2 * torchs + ulp, (ours, torchs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(device, dtype):
    """float16 and bfloat16 logw on both devices (the CPU through float32 copies): exact on the
    rounded inputs up to the final rounding, the gradient from float32 stats."""
    for shape, dim in CASES:
        x64 = _logw(shape, torch.float64, device, scale=3.0, seed=3)
        xl = x64.to(dtype)
        ours = logmeanexp(xl, dim)
        assert ours.dtype == dtype
        # Exact on the rounded inputs up to the final rounding to dtype.
        want = reference.logmeanexp(xl.double(), dim).to(dtype)
        torch.testing.assert_close(ours, want, rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)
        # the backward, from the float32 stats: softmax of the rounded inputs, rounded once
        xg = xl.clone().requires_grad_()
        g = torch.randn(ours.shape, dtype=torch.float64, device=device, generator=None).to(dtype)
        logmeanexp(xg, dim).backward(g)
        assert xg.grad.dtype == dtype
        want_g = (g.double().unsqueeze(dim) * torch.softmax(xl.double(), dim)).to(dtype)
        torch.testing.assert_close(xg.grad, want_g, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
        _, stats = logmeanexp_stats(xl, dim)
        assert stats.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("shape,dim", [((5, 9), -1), ((9, 5), 0), ((2, 3, 4), 1), ((4, 2100), 1)])
def test_opcheck(device, requires_grad, shape, dim):
    for dtype in (torch.float32, torch.float64):
        x = _logw(shape, dtype, device).requires_grad_(requires_grad)
        torch.library.opcheck(OP, (x, dim))
        out = OP(x.detach(), dim)
        g = torch.randn_like(out)
        torch.library.opcheck(BACKWARD_OP, (g.requires_grad_(requires_grad), x, out.requires_grad_(requires_grad), dim))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_non_contiguous(device):
    x = _logw((8, 6), torch.float64, device).t().requires_grad_()  # [6, 8], strides (1, 6)
    for dim in (0, 1):
        torch.library.opcheck(OP, (x, dim))
    x = _logw((8, 12), torch.float64, device)[:, ::3].requires_grad_()
    for dim in (0, 1):
        torch.library.opcheck(OP, (x, dim))


@st.composite
def logw_and_dim(draw):
    ndim = draw(st.integers(1, 3))
    sizes = draw(st.lists(st.integers(1, 64), min_size=ndim, max_size=ndim))
    dim = draw(st.integers(-ndim, ndim - 1))
    sizes[dim] = draw(st.integers(1, 300))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0, 1e4]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = scale * (2 * torch.rand(sizes, generator=g, dtype=torch.float64) - 1)
    # Some -inf entries, but never a whole reduced row of them (finite differences of a
    # -inf output are NaN; that case has its own test).
    if draw(st.booleans()):
        mask = torch.rand(sizes, generator=g) < 0.3
        keep = torch.zeros_like(mask).narrow(dim, 0, 1).fill_(True)
        mask.narrow(dim, 0, 1).copy_(~keep)
        x = x.masked_fill(mask, -INF)
    transpose = draw(st.booleans()) and ndim >= 2
    return x, dim, transpose


@pytest.mark.parametrize("device", DEVICES)
@given(case=logw_and_dim())
def test_gradcheck_float64(device, case):
    x, dim, transpose = case
    x = x.to(device)
    if transpose:  # a non-contiguous input with the same values
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    torch.testing.assert_close(logmeanexp(x, dim), reference.logmeanexp(x, dim), rtol=1e-12, atol=1e-9)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: logmeanexp(t, dim), (x,), fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_gradgradcheck_small(device):
    x = _logw((4, 6), torch.float64, device).requires_grad_()
    for dim in (0, 1, -1):
        assert torch.autograd.gradcheck(lambda t: logmeanexp(t, dim), (x,))
        assert torch.autograd.gradgradcheck(lambda t: logmeanexp(t, dim), (x,))
    # The backward op on its own: every input.
    out = logmeanexp(x.detach(), 1).requires_grad_()
    g = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g_, x_, o_: logmeanexp_backward(g_, x_, o_, 1), (g, x, out))


@pytest.mark.parametrize("device", DEVICES)
def test_edge_values(device):
    x = torch.tensor(
        [[-INF, -INF, -INF], [1.0, math.nan, 2.0], [INF, 1.0, 2.0], [-INF, 0.0, -INF], [1e4, -1e4, 0.0]],
        dtype=torch.float64,
        device=device,
        requires_grad=True,
    )
    out = logmeanexp(x, 1)
    assert out[0].item() == -INF
    assert math.isnan(out[1].item())
    assert out[2].item() == INF
    assert out[3].item() == pytest.approx(-math.log(3), abs=1e-15)
    assert out[4].item() == pytest.approx(1e4 - math.log(3), abs=1e-12)
    (g,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.equal(g[0], torch.zeros(3, dtype=torch.float64, device=device)), "all -inf: zero gradient"
    assert torch.isnan(g[1]).all(), "NaN propagates to the gradient"
    torch.testing.assert_close(g[3], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64, device=device))
    torch.testing.assert_close(g[4], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_neg_inf_rows_in_every_kernel_path(device, dtype):
    for K in (3, 30, 1000, 5000):
        x = torch.full((3, K), -INF, dtype=dtype, device=device, requires_grad=True)
        out = logmeanexp(x)
        assert (out == -INF).all()
        (g,) = torch.autograd.grad(out.sum(), x)
        assert (g == 0).all()
        y = torch.full((K, 3), -INF, dtype=dtype, device=device)
        assert (logmeanexp(y, 0) == -INF).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_in_every_kernel_path(device):
    for K in (3, 30, 1000, 5000):
        x = torch.randn(4, K, device=device)
        x[1, K // 2] = math.nan
        x[2, K - 1] = INF
        x[3, 0] = -INF
        for t, dim in ((x, 1), (x.t().contiguous(), 0)):
            out = logmeanexp(t, dim)
            assert math.isnan(out[1].item())
            assert out[2].item() == INF
            assert math.isfinite(out[0].item()) and math.isfinite(out[3].item())


@pytest.mark.parametrize("device", DEVICES)
def test_any_dim_keepdim_and_non_contiguous(device):
    x = _logw((3, 4, 5, 6), torch.float64, device)
    for dim in range(-4, 4):
        want = reference.logmeanexp(x, dim)
        torch.testing.assert_close(logmeanexp(x, dim), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(logmeanexp(x, dim, keepdim=True), want.unsqueeze(dim))
        p = x.permute(2, 0, 3, 1)  # dense but not contiguous
        torch.testing.assert_close(logmeanexp(p, dim), reference.logmeanexp(p, dim), rtol=1e-12, atol=1e-12)
        s = x[:, ::2, 1:, ::3]  # neither dense nor contiguous
        torch.testing.assert_close(logmeanexp(s, dim), reference.logmeanexp(s, dim), rtol=1e-12, atol=1e-12)
        ps = p.detach().requires_grad_()
        (g,) = torch.autograd.grad(logmeanexp(ps, dim).sum(), ps)
        pr = p.detach().requires_grad_()
        (gr,) = torch.autograd.grad(reference.logmeanexp(pr, dim).sum(), pr)
        torch.testing.assert_close(g, gr, rtol=1e-12, atol=1e-12)
        assert g.stride() == ps.stride(), "the gradient keeps the input's layout"


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_gives_empty_result(device):
    x = torch.empty(0, 5, device=device, requires_grad=True)
    out = logmeanexp(x)
    assert out.shape == (0,)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.shape == (0, 5)
    assert logmeanexp(torch.empty(5, 0, 3, device=device), 0).shape == (0, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_errors_name_the_argument(device):
    with pytest.raises(RuntimeError, match="logw has no samples to average along dim 1"):
        logmeanexp(torch.empty(3, 0, device=device))
    with pytest.raises(RuntimeError, match="logw must be a floating-point tensor, got Long"):
        logmeanexp(torch.ones(3, 4, dtype=torch.long, device=device))
    with pytest.raises(RuntimeError, match="logw must have at least one dimension"):
        logmeanexp(torch.tensor(1.0, device=device))
    with pytest.raises(RuntimeError, match=r"dim must be in \[-2, 1\]"):
        logmeanexp(torch.ones(3, 4, device=device), 2)
    with pytest.raises(TypeError, match="logw must be a torch.Tensor"):
        logmeanexp([1.0, 2.0])
    x = torch.ones(3, 4, device=device)
    out = logmeanexp(x)
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        logmeanexp_backward(torch.ones(4, device=device), x, out, 1)
    with pytest.raises(RuntimeError, match="out must have the dtype of logw"):
        logmeanexp_backward(torch.ones(3, device=device), x, out.double(), 1)


def test_integer_logw_is_refused_by_name():
    with pytest.raises(RuntimeError, match="logw must be a floating-point tensor, got Long"):
        logmeanexp(torch.ones(3, 4, dtype=torch.int64))


@pytest.mark.parametrize("device", DEVICES)
def test_fake_kernel_errors_match(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 0, device=device)
        with pytest.raises(RuntimeError, match="no samples to average"):
            OP(x, 1)
        y = OP(torch.empty(3, 4, device=device), 0)
        assert y.shape == (4,)


def test_torch_compile_fullgraph_cpu():
    torch._dynamo.reset()

    def bound(logw):
        return logmeanexp(logw, 0).sum()

    compiled = torch.compile(bound, fullgraph=True)
    x = _logw((50, 20), torch.float32, "cpu").requires_grad_()
    y = compiled(x)
    (g,) = torch.autograd.grad(y, x)
    x2 = x.detach().clone().requires_grad_()
    y2 = bound(x2)
    (g2,) = torch.autograd.grad(y2, x2)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(g, g2)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    x = _logw((300, 777), torch.float32, device)
    assert torch.equal(logmeanexp(x), logmeanexp(x))
    assert torch.equal(logmeanexp(x, 0), logmeanexp(x, 0))


GRADIENT_SHAPES = [((7, 97), -1), ((5, 1025), -1), ((64, 5000), -1), ((2, 33333), -1), ((1000, 50), -1),
                   ((5000, 64), 0), ((1025, 5), 0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1.0, 100.0, 1e4])
@pytest.mark.parametrize("shape, dim", GRADIENT_SHAPES)
def test_float32_gradient_error_is_at_most_pytorchs(device, shape, dim, scale):
    """Values randn * scale - 300: the float32 gradient's largest error against float64 is at
    most PyTorch's logsumexp backward's (summed over 12 draws, 10% slack). The backward forms
    exp((x - row max) - log s) from the forward's stats; from the rounded output (x - out) it
    was 0.0006-0.0045 at scale 1e4, thousands of times PyTorch's."""
    ours, theirs = [], []
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        x64 = (torch.randn(shape, generator=g, dtype=torch.float64) * scale - 300.0).to(device)
        out_shape = [s for i, s in enumerate(shape) if i != dim % len(shape)]
        go = torch.randn(out_shape, generator=g, dtype=torch.float64).to(device)
        k = shape[dim]

        def grad(fn, x):
            x = x.detach().requires_grad_()
            fn(x).backward(go.to(x.dtype))
            return x.grad.double()

        ref = grad(lambda x: torch.logsumexp(x, dim) - math.log(k), x64)
        ours.append((grad(lambda x: logmeanexp(x, dim), x64.float()) - ref).abs().max().item())
        theirs.append((grad(lambda x: torch.logsumexp(x, dim) - math.log(k), x64.float()) - ref).abs().max().item())
    assert sum(ours) <= 1.1 * sum(theirs) + 1e-30, (sum(ours) / max(sum(theirs), 1e-300), ours, theirs)


@pytest.mark.parametrize("device", DEVICES)
def test_stats_are_the_row_max_and_the_log_normalised_sum(device):
    """logmeanexp_stats against its float64 twin (rows, columns, -inf rows); the backward from
    the stats equals the twin's in float64, and from out alone it is the same gradient."""
    x = _logw((6, 9, 4), torch.float64, device)
    x[1, :, 2] = -INF
    for dim in (0, 1, 2):
        out, stats = logmeanexp_stats(x, dim)
        rout, rstats = reference.logmeanexp_stats(x, dim)
        torch.testing.assert_close(out, rout, rtol=1e-12, atol=0)
        torch.testing.assert_close(stats, rstats, rtol=1e-12, atol=1e-14, equal_nan=True)
        g = torch.randn_like(out)
        want = reference.logmeanexp_backward(g, x, out, dim, stats)
        torch.testing.assert_close(BACKWARD_OP(g, x, out, dim, stats), want, rtol=1e-12, atol=0)
        torch.testing.assert_close(BACKWARD_OP(g, x, out, dim), want, rtol=1e-12, atol=1e-15)
        torch.library.opcheck(torch.ops.iwae_ext.logmeanexp_stats.default, (x, dim))
        torch.library.opcheck(BACKWARD_OP, (g, x, out, dim, stats))
    with pytest.raises(RuntimeError, match="stats must be"):
        BACKWARD_OP(g, x, out, 2, stats.float())
    with pytest.raises(RuntimeError, match="stats must have shape"):
        BACKWARD_OP(g, x, out, 2, stats[:, :1])


_GRID_STRIDE = """
import torch, iwae_ext
from iwae_ext.ops import logmeanexp, reference
for shape, dim in (((300, 1000), -1), ((1000, 300), 0)):
    x = torch.randn(shape, dtype=torch.float64, device="cuda").requires_grad_()
    g = torch.randn(reference.logmeanexp(x.detach(), dim).shape, dtype=torch.float64, device="cuda")
    logmeanexp(x, dim).backward(g)
    want = reference.logmeanexp_backward(g, x.detach(), reference.logmeanexp(x.detach(), dim), dim)
    torch.testing.assert_close(x.grad, want, rtol=1e-12, atol=1e-14)
print("ok")
"""


@pytest.mark.cuda
@pytest.mark.skipif(DEVICES[1].marks[0].args[0], reason="needs a CUDA device and kernels")
def test_backward_grid_stride_loop_past_one_pass():
    """The backward's grid is capped (IWAE_EXT_LME_BACKWARD_MAX_BLOCKS=2: 512 threads for 300,000
    values), so every thread walks its grid-stride loop many times; the gradient is the twin's."""
    import subprocess
    import sys
    env = dict(os.environ, IWAE_EXT_LME_BACKWARD_MAX_BLOCKS="2")
    r = subprocess.run([sys.executable, "-c", _GRID_STRIDE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_column_forward_does_not_depend_on_the_thread_count(dtype):
    """Along a non-last dim the CPU splits K into fixed chunks of rows merged in order: the same
    bits with 1 thread or several (a long K with few columns, as L_5000's log-weights)."""
    x = torch.randn(3000, 70, 3, dtype=dtype, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = logmeanexp(x, 0)
        torch.set_num_threads(max(2, threads))
        many = logmeanexp(x, 0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    torch.testing.assert_close(many, reference.logmeanexp(x.double(), 0).to(dtype),
                               rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)
