"""The counter-based random numbers of the evaluation (csrc/random.h, iwae_ext.keyed): Philox
against Random123's known answers, the op against its pure-PyTorch twin, the distribution of
its outputs, that a number depends on its coordinates only, and the op's contracts."""
import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from iwae_ext.keyed import KeyedNoise, keyed_draws, standard_normal
from iwae_ext.ops import keyed_normal, keyed_uniform, reference

from conftest import DEVICES

# Random123's known-answer vectors for Philox4x32-10: (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,want", PHILOX_KAT)
def test_twin_philox_matches_random123(counter, key, want):
    assert reference.philox4x32_10(torch.tensor(counter), key).tolist() == list(want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows,dim,row_start,step,stream,seed", [
    (1, 1, 0, 0, 0, 0), (6, 7, 100, 5, 3, 2 ** 40 + 17), (3, 50, 2 ** 32 - 3, 2 ** 31 + 9, 255, 2 ** 63 - 1)])
def test_op_matches_twin(device, normal, dtype, rows, dim, row_start, step, stream, seed):
    index = torch.tensor([3, 0, 7, 2 ** 32 - 1, 12], device=device)
    got = torch.ops.iwae_ext.keyed_random(index, torch.tensor(step), seed, stream, rows, row_start, dim,
                                          normal, dtype)
    want = reference.keyed_random(index, step, seed, stream, rows, row_start, dim, normal, dtype)
    assert got.shape == (rows, 5, dim) and got.dtype == dtype and got.device.type == device
    if normal:  # libm's log/sin/cos against torch's: an ulp or two
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got, want, rtol=2 * eps, atol=2 * eps)
    else:  # the uniforms are exact
        assert torch.equal(got, want)


def test_uniforms_are_the_top_bits_and_never_0_or_1():
    u = keyed_uniform(torch.arange(1000), 200, 2, seed=1, dtype=torch.float64)
    assert bool(((u > 0) & (u < 1)).all())
    m = u * 2.0 ** 53 - 0.5  # integral: 53 random bits, shifted by half an ulp
    assert torch.equal(m, m.round())
    f = keyed_uniform(torch.arange(1000), 200, 4, seed=1, dtype=torch.float32)  # 23 bits in float32
    assert bool(((f > 0) & (f < 1)).all())
    m = f.double() * 2.0 ** 23 - 0.5
    assert torch.equal(m, m.round())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_normal_and_uniform_moments(dtype):
    n = 1_000_000
    z = keyed_normal(torch.arange(100), 100, 100, seed=11, dtype=dtype).double().reshape(-1)
    se = 1 / math.sqrt(n)
    assert abs(float(z.mean())) < 5 * se
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2) * se
    assert abs(float((z ** 3).mean())) < 5 * math.sqrt(15) * se  # skewness: var of z^3 is 15
    assert abs(float((z ** 4).mean()) - 3) < 5 * math.sqrt(96) * se  # kurtosis: var of z^4 is 96
    # the tails: P(|z| > 3) = 0.0026998
    p = float((z.abs() > 3).double().mean())
    assert abs(p - 0.0026998) < 5 * math.sqrt(0.0027 / n)
    u = keyed_uniform(torch.arange(100), 100, 100, seed=11, dtype=dtype).double().reshape(-1)
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    counts = torch.histc(u, 10, 0, 1)
    chi2 = float(((counts - n / 10) ** 2 / (n / 10)).sum())
    assert chi2 < 35  # chi-squared with 9 degrees of freedom: P(> 35) ~ 6e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_streams_steps_images_and_samples_are_uncorrelated(dtype):
    n = 200_000
    base = dict(rows=1000, dim=200, seed=5, dtype=dtype)
    a = keyed_normal(torch.arange(1), **base).reshape(-1)
    others = [keyed_normal(torch.arange(1), stream=1, **base), keyed_normal(torch.arange(1), step=1, **base),
              keyed_normal(torch.tensor([1]), **base), keyed_normal(torch.arange(1), row_start=1000, **base),
              keyed_normal(torch.arange(1), **{**base, "seed": 6})]
    for b in others:
        corr = float(torch.corrcoef(torch.stack([a, b.reshape(-1)]).double())[0, 1])
        assert abs(corr) < 5 / math.sqrt(n), corr
    # neighbouring elements of one row (a Box-Muller pair, and the next pair) too
    z = keyed_normal(torch.arange(1000), 200, 4, seed=5, dtype=dtype).double().reshape(-1, 4)
    c = torch.corrcoef(z.t())
    assert float((c - torch.eye(4)).abs().max()) < 5 / math.sqrt(z.shape[0])


@pytest.mark.parametrize("device", DEVICES)
def test_a_number_depends_on_its_coordinates_only(device):
    whole = keyed_normal(torch.tensor([5, 9, 2], device=device), 10, 7, seed=3, stream=2, step=4)
    part = keyed_normal(torch.tensor([2, 5], device=device), 4, 7, seed=3, stream=2, step=4, row_start=6)
    assert torch.equal(part, whole[6:10][:, [2, 0]])
    wider = keyed_normal(torch.tensor([5], device=device), 10, 12, seed=3, stream=2, step=4)
    assert torch.equal(wider[..., :7], whole[:, :1])  # a dim that ends mid-block is a prefix
    on_device = torch.tensor(4, device=device)
    assert torch.equal(keyed_normal(torch.tensor([5, 9, 2], device=device), 10, 7, seed=3, stream=2,
                                    step=on_device), whole)


def test_keyed_draws_key_the_package_distributions_and_torch_normals():
    from torch.distributions import Independent, Normal

    from iwae_ext.models.vae import DiagonalNormal
    noise = KeyedNoise(4, torch.tensor([10, 11, 12]))
    loc, logvar = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    with keyed_draws(noise, row_start=2):
        a = DiagonalNormal(loc, logvar).rsample((4,))
        b = DiagonalNormal(loc, logvar).rsample((4,))  # the next stream
    want = loc + torch.exp(0.5 * logvar) * noise.normal(4, 5, 0, row_start=2, dtype=torch.float64)
    assert torch.equal(a, want) and not torch.equal(a, b)
    from iwae_ext.protocol import _draw
    with keyed_draws(noise, row_start=2):
        c = _draw(Independent(Normal(loc, torch.exp(0.5 * logvar)), 1), (4,))
    torch.testing.assert_close(c, want, rtol=0, atol=1e-15)
    # outside the context: torch's generator
    torch.manual_seed(0)
    x = standard_normal((2, 3), torch.float32, "cpu")
    torch.manual_seed(0)
    assert torch.equal(x, torch.randn(2, 3))


def test_opcheck_and_compile():
    index = torch.tensor([1, 4, 2])
    torch.library.opcheck(torch.ops.iwae_ext.keyed_random.default,
                          (index, torch.tensor(3), 7, 1, 4, 2, 5, True, torch.float32))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(i):
        return keyed_normal(i, 4, 5, seed=7, stream=1, step=3, row_start=2) * 2

    assert torch.equal(f(index), 2 * keyed_normal(index, 4, 5, seed=7, stream=1, step=3, row_start=2))


@pytest.mark.parametrize("kwargs,message", [
    (dict(stream=256), "stream must be in [0, 255]"), (dict(seed=-1), "seed must be >= 0"),
    (dict(row_start=2 ** 32), "row_start + rows must be in [0, 2^32]"), (dict(dtype=torch.int32), "dtype must be float32"),
])
def test_op_errors_name_the_argument(kwargs, message):
    args = dict(rows=2, dim=3, seed=1, stream=0, step=0, row_start=0, dtype=torch.float32)
    args.update(kwargs)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        torch.ops.iwae_ext.keyed_random(torch.arange(2), torch.tensor(args["step"]), args["seed"],
                                        args["stream"], args["rows"], args["row_start"], args["dim"],
                                        True, args["dtype"])
    with pytest.raises(RuntimeError, match="index must be int64"):
        keyed_normal(torch.arange(2).int(), 1, 1, seed=0)
    with pytest.raises(ValueError, match="seed must be an int"):
        KeyedNoise(-3, torch.arange(2))


@given(st.integers(0, 2 ** 32 - 1), st.integers(0, 5), st.integers(0, 2 ** 32 - 6), st.integers(0, 2 ** 40),
       st.integers(0, 255), st.integers(0, 2 ** 63 - 1), st.integers(0, 9), st.booleans(),
       st.sampled_from([torch.float32, torch.float64]))
def test_op_equals_twin_anywhere_in_its_counter_space(image, rows, row_start, step, stream, seed, dim, normal, dtype):
    """The op has no gradient (integer keys in, random numbers out): its contract is the twin's
    values, checked at coordinates hypothesis picks across the whole key and counter range."""
    index = torch.tensor([image, 0])
    got = torch.ops.iwae_ext.keyed_random(index, torch.tensor(step), seed, stream, rows, row_start, dim,
                                          normal, dtype)
    want = reference.keyed_random(index, step, seed, stream, rows, row_start, dim, normal, dtype)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got, want, rtol=2 * eps, atol=2 * eps)
