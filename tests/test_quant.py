"""kernels/quant.py: per-row FP8 quantization, the Triton kernel (interpreted) against float64 references written
out here and against the torch path, byte for byte."""

import importlib

import pytest
import torch
from kernel_refs import interpreted_kernels, needs_triton  # noqa: F401

from bagel_vae_pp.kernels import quant

FP8 = torch.float8_e4m3fn
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
E4M3 = torch.arange(0, 127, dtype=torch.uint8).view(FP8).double()  # codes 0..126: every finite value >= 0, sorted


def e4m3_codes(v):
    """float64 v -> e4m3fn bytes, each the nearest finite value, ties to the even code (the even mantissa)."""
    a = v.abs().flatten()
    hi = torch.searchsorted(E4M3, a).clamp(1, 126)  # E4M3[hi - 1] < a <= E4M3[hi]
    lo = hi - 1
    d_lo, d_hi = a - E4M3[lo], E4M3[hi] - a
    code = torch.where((d_lo < d_hi) | ((d_lo == d_hi) & (lo % 2 == 0)), lo, hi).to(torch.uint8)
    sign = torch.signbit(v.flatten()).to(torch.uint8) << 7
    return (code | sign).view(v.shape)


def reference(t, amax=None):
    """float64 reference: scale = amax / 448 and quotient t / scale, each rounded once to fp32 (the division done in
    float64 then rounded equals the correctly rounded fp32 division), then rounded to nearest-even e4m3."""
    amax = t.double().abs().amax(dim=1) if amax is None else amax.double()
    scale = torch.where(amax > 0, (amax / 448).float(), 1.0)
    return e4m3_codes((t.double() / scale.double()[:, None]).float().double()), scale


def assert_same(out, ref):
    (q, scale), (q_ref, scale_ref) = out, ref
    assert q.dtype == FP8 and scale.dtype == torch.float32
    assert torch.equal(scale, scale_ref)
    same = q.view(torch.uint8) == q_ref.view(torch.uint8)
    assert same.all(), f"{(~same).sum().item()} bytes differ, first at {(~same).nonzero()[0].tolist()}"


def many_magnitudes(n, k, dtype, seed):
    """[n, k] rows of Gaussians whose sizes span 2^-30 .. 2^30 (2^-12 .. 2^12 in fp16: activations of very
    different tokens), a zero row, a row of one nonzero entry near its end (past the first block) and a row of
    negative zeros."""
    g = torch.Generator().manual_seed(seed)
    e = 12 if dtype == torch.float16 else 30
    t = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-e, e, (n, 1), generator=g).float())
    t[1] = 0
    t[2] = 0
    t[2, max(k - 3, 0)] = -7.5
    t[3] = -0.0
    return t.to(dtype)


def ties_and_subnormals(dtype):
    """One row with amax 448 (scale exactly 1), so each entry is its own quotient: every e4m3 value and the midpoint
    between each pair of neighbours (a tie), both signs, and each midpoint nudged one ulp of `dtype` either way;
    values in e4m3's subnormal range (below 2^-6) and under half its smallest step (2^-10, rounded to 0)."""
    mid = (E4M3[1:] + E4M3[:-1]) / 2
    eps = torch.finfo(dtype).eps
    below, above = mid * (1 - eps), mid * (1 + eps)
    powers = torch.exp2(torch.arange(-14, 9, dtype=torch.float64))  # 2^-14 .. 2^8
    sub = torch.linspace(0, 2**-6, 97, dtype=torch.float64)
    row = torch.cat([E4M3, mid, below, above, powers, sub, torch.tensor([2.0**-10, 2.0**-11, 3 * 2.0**-11])])
    row = torch.cat([row, -row, torch.tensor([448.0])])
    return row.to(dtype)[None]


@needs_triton
class TestKernel:
    @pytest.fixture
    def q(self, interp, monkeypatch):
        """The interpreted module, its torch path refused: every call below runs the kernel."""

        def refuse(*args):
            raise AssertionError("the torch path ran instead of the kernel")

        interpreted = importlib.import_module("bagel_vae_pp.kernels.quant")  # the interpreted copy
        monkeypatch.setattr(interpreted, "_torch_quantize_rows", refuse)
        return interpreted

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_random_rows_match_float64_and_the_torch_path(self, q, dtype):
        t = many_magnitudes(9, 2 * q.BLOCK + 300, dtype, seed=1)  # K is not a multiple of the block
        out = q.quantize_rows(t)
        assert_same(out, reference(t))
        assert_same(out, quant._torch_quantize_rows(t, None))

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_ties_round_to_even_and_subnormals(self, q, dtype):
        t = ties_and_subnormals(dtype)
        out = q.quantize_rows(t)
        assert out[1].item() == 1.0
        assert_same(out, reference(t))
        assert_same(out, quant._torch_quantize_rows(t, None))

    def test_fp32_subnormal_inputs(self, q):
        t = torch.tensor([[1.0, 1e-40, -1e-45, 2.0**-126, -(2.0**-127), 0.0]])  # fp32 subnormals quantize to 0
        assert_same(q.quantize_rows(t), reference(t))

    @pytest.mark.parametrize("k", [1, 7, 1024])
    def test_short_rows(self, q, k):
        t = many_magnitudes(5, k, torch.bfloat16, seed=k)
        assert_same(q.quantize_rows(t), reference(t))

    def test_given_row_maxima(self, q):
        t = many_magnitudes(6, 1500, torch.bfloat16, seed=3)
        amax = t.float().abs().amax(dim=1) * torch.tensor([1, 1, 1, 1, 2.5, 1e3])  # a shard of longer rows
        out = q.quantize_rows(t, amax)
        assert_same(out, reference(t, amax))
        assert_same(out, quant._torch_quantize_rows(t, amax))


@needs_triton
def test_the_torch_path_takes_what_the_kernel_does_not(interp):
    interpreted = importlib.import_module("bagel_vae_pp.kernels.quant")
    t = many_magnitudes(4, 600, torch.bfloat16, seed=4)
    assert_same(interpreted.quantize_rows(t.t().contiguous().t()), reference(t))  # not contiguous
    q, scale = interpreted.quantize_rows(t[:0])
    assert q.shape == (0, 600) and scale.shape == (0,)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_path(dtype):
    for t in (ties_and_subnormals(dtype), many_magnitudes(5, 300, dtype, seed=5)):
        assert_same(quant._torch_quantize_rows(t, None), reference(t))
