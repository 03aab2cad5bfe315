"""The fused kernels of BAGEL's decoder layers (kernels/rms_norm.py, qk_norm_rope.py, swiglu.py), interpreted, against
float64 references written out here that round where the torch path of bagel/experts.py does; and the layers with the
kernels against the layers without them.

The bound, bf16: bit-identical wherever the result does not hinge on the last fp32 bits of one quantity the kernel
computes differently from torch (rstd: a sum in another order; SiLU: another exp). The reference is evaluated with
that quantity scaled by 1 - 2^-16 and 1 + 2^-16 (fp32 sums of a few thousand squares err by ~2^-20); an element whose
rounded intermediate is the same at both ends is "stable" and must match to the bit. The others (0.5-3% here)
may land one bf16 ulp of the intermediate away: within 2^-6 of their vector's largest value. fp32: within fp32's
default tolerances of float64 (a few ulps, no intermediate bf16 roundings).

The tests that take the interpreter come last: it stays on to the module's end (kernel_refs.interpreted_kernels).
"""

import importlib
import sys

import pytest
import torch
from kernel_refs import interpreted_kernels, needs_triton, rel_err  # noqa: F401

import bagel_vae_pp.bagel
from bagel_vae_pp import kernels
from bagel_vae_pp.bagel import experts, llm
from bagel_vae_pp.bagel.config import LLMConfig

BF16 = torch.bfloat16
DTYPES = [BF16, torch.float32]
SLACK = 2.0**-16  # relative slack of the quantity computed differently (rstd, SiLU)
EPS = 1e-6


def rounded(t64, dtype):
    """float64 -> dtype as torch's fp32 opmath does: rounded to fp32, then (bf16) to bf16; back to float64."""
    t = t64.float()
    return (t.to(BF16) if dtype == BF16 else t).double()


def norm64(x, w, scale=1.0):
    """Qwen2's RMSNorm: n = round(x * rsqrt(mean(x²) + eps)), y = round(n * w); (y, n) in float64. w [..., D]."""
    x64 = x.double()
    rstd = (x64.pow(2).mean(-1, keepdim=True) + EPS).rsqrt() * scale
    n = rounded(x64 * rstd, x.dtype)
    return rounded(n * w.double(), x.dtype), n


def rope64(y, cos, sin):
    """RoPE as experts.apply_rope rounds it: round(round(y * cos) + rotate_half(y) * sin); y rounded already."""
    half = y.shape[-1] // 2
    rotated = torch.cat([-y[..., half:], y[..., :half]], dim=-1)
    return rounded(rounded(y * cos.double(), cos.dtype) + rotated * sin.double(), cos.dtype)


def swiglu64(g, u, scale=1.0):
    """round(round(g / (1 + exp(-g))) * u); (out, s) in float64. exp(-g) overflows where fp32's does (g < -88.7:
    s = -0, as torch's fp32 opmath gives, not the float64 SiLU's ~1e-37)."""
    g64 = g.double()
    s = rounded(g64 / (1 + torch.exp(-g64).float().double()) * scale, g.dtype)
    return rounded(s * u.double(), g.dtype), s


def assert_like_torch(out, ref, stable):
    """out (bf16) equals the float64 reference's rounding where `stable`; elsewhere within 2^-6 of its vector's
    largest value. fp32: within fp32's tolerances."""
    if out.dtype != BF16:
        torch.testing.assert_close(out.double(), ref, rtol=1.3e-6, atol=1e-5)
        return
    out = out.double()
    same = (out == ref) | ~stable
    assert same.all(), f"{(~same).sum().item()} of {stable.sum().item()} stable elements differ"
    assert stable.float().mean() > 0.95, stable.float().mean()  # the slack leaves most elements checked to the bit
    bound = 2.0**-6 * ref.abs().amax(-1, keepdim=True)
    assert ((out - ref).abs() <= bound).all(), (out - ref).abs().max()


def activations(shape, dtype, seed):
    """Gaussians whose rows (last dim) span 2^-8 .. 2^8 in scale, with an outlier channel, as hidden states."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-8, 9, (*shape[:-1], 1), generator=g).float())
    t[..., 1] *= 30
    return t.to(dtype)


def weights(d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (1 + 0.3 * torch.randn(d, generator=g)).to(dtype), (0.5 + torch.randn(d, generator=g)).to(dtype)


def norm_expected(x, w, w_tail, split):
    """(ref, stable) of the RMSNorm with rows [split:] scaled by w_tail."""
    wr = torch.cat([w.expand(split, -1), w_tail.expand(x.shape[0] - split, -1)]).view(
        x.shape[0], *[1] * (x.dim() - 2), -1
    )
    (ref, _), (_, lo), (_, hi) = (norm64(x, wr, s) for s in (1.0, 1 - SLACK, 1 + SLACK))
    return ref, lo == hi


def rope_tables(n, d, dtype, per_token):
    positions = torch.arange(n) * 37 + 5 if per_token else torch.tensor([11])
    return llm.rope_cos_sin(positions, d, 1e4, dtype)


def qk_expected(t, cos, sin, w, w_tail, split):
    wr = torch.cat([w.expand(split, -1), w_tail.expand(t.shape[0] - split, -1)])[:, None]  # [N, 1, Dh]
    (y, _), (_, lo), (_, hi) = (norm64(t, wr, s) for s in (1.0, 1 - SLACK, 1 + SLACK))
    stable = lo == hi
    return rope64(y, cos, sin), stable & stable.roll(t.shape[-1] // 2, -1)  # an output reads n[d] and its partner


def swiglu_expected(g, u):
    (ref, _), (_, lo), (_, hi) = (swiglu64(g, u, s) for s in (1.0, 1 - SLACK, 1 + SLACK))
    return ref, lo == hi


class TestReferencesAreTheTorchPath:
    """The references above round where experts.py's torch path does: it meets them under the same bound (its rstd
    and exp differ from float64's in the last bits too)."""

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_norm_and_rope(self, dtype):
        t = activations((9, 7, 128), dtype, seed=7)
        w, w_tail = weights(128, dtype, seed=8)
        rows = experts.Rows(9, slice(3, 9))  # rows [3:] generation
        und, gen = llm.RMSNorm(128, EPS).to(dtype), llm.RMSNorm(128, EPS).to(dtype)
        und.weight.data, gen.weight.data = w, w_tail
        cos, sin = rope_tables(9, 128, dtype, per_token=True)
        assert_like_torch(experts.norm(t, rows, und, gen), *norm_expected(t, w, w_tail, 3))
        assert_like_torch(
            experts.apply_rope(experts.norm(t, rows, und, gen), cos, sin), *qk_expected(t, cos, sin, w, w_tail, 3)
        )

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_swiglu(self, dtype):
        g, u = activations((37, 1001), dtype, seed=9) * 4, activations((37, 1001), dtype, seed=10)
        assert_like_torch(experts.silu_mul_(g.clone(), u), *swiglu_expected(g, u))


def test_the_cpu_path_stays_torch():
    x = torch.zeros(4, 8)
    assert not kernels.fuses_layers(x)  # no interpreter: CPU tensors never reach a kernel


@pytest.fixture
def ik(interp, monkeypatch):
    """The interpreted kernels package; the CPU tensors below run the kernels."""
    return interp.kernels


@needs_triton
class TestKernels:
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("d, split", [(1000, 3), (64, 0), (3584, 7)])
    def test_rms_norm(self, ik, dtype, d, split):
        x = activations((7, d), dtype, seed=d)
        w, w_tail = weights(d, dtype, seed=1)
        assert_like_torch(ik.rms_norm(x, EPS, w, w_tail, split), *norm_expected(x, w, w_tail, split))

    def test_rms_norm_splits_leading_dim(self, ik):
        x = activations((5, 3, 40), BF16, seed=2)  # q/k through _norm: the experts split tokens, not head vectors
        w, w_tail = weights(40, BF16, seed=3)
        assert_like_torch(ik.rms_norm(x, EPS, w, w_tail, 2), *norm_expected(x, w, w_tail, 2))

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("n, h, d, per_token", [(9, 7, 128, True), (5, 3, 6, True), (4, 2, 16, False)])
    def test_qk_norm_rope(self, ik, dtype, n, h, d, per_token):
        t = activations((n, h, d), dtype, seed=n * d)
        cos, sin = rope_tables(n, d, dtype, per_token)
        w, w_tail = weights(d, dtype, seed=4)
        expected = qk_expected(t, cos, sin, w, w_tail, 3)
        out = ik.qk_norm_rope(t, cos, sin, EPS, w, w_tail, 3)
        assert out.data_ptr() == t.data_ptr()  # in place
        assert_like_torch(out, *expected)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_qk_norm_rope_gathers_tokens_in_order(self, ik, dtype):
        """Token i of the output is token order[i] of the input, with that token's tables and expert weight."""
        t = activations((11, 3, 32), dtype, seed=13)
        cos, sin = rope_tables(11, 32, dtype, per_token=True)
        w, w_tail = weights(32, dtype, seed=14)
        order = torch.randperm(11, generator=torch.Generator().manual_seed(15))
        ref, stable = qk_expected(t, cos, sin, w, w_tail, 4)
        before = t.clone()
        assert_like_torch(ik.qk_norm_rope(t, cos, sin, EPS, w, w_tail, 4, order), ref[order], stable[order])
        assert torch.equal(t, before)  # the input is left as it was

    @pytest.mark.filterwarnings("ignore:overflow encountered in exp")
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_swiglu(self, ik, dtype):
        # g >= -60 keeps the products normal: the interpreter's bf16 store mangles subnormals (a GPU's does not)
        g = (activations((37, 1001), dtype, seed=5) * 4).clamp(min=-60)
        g[0, :4] = torch.tensor([-200.0, -90.0, 90.0, 0.0]).to(dtype)  # exp(-g) overflows to inf (s = -0), or to 0
        u = activations((37, 1001), dtype, seed=6)
        expected = swiglu_expected(g, u)
        out = ik.swiglu_(g, u)
        assert out.data_ptr() == g.data_ptr()
        assert_like_torch(out, *expected)


@pytest.fixture
def fused_llm(interp):
    """llm.py and the experts.py it calls imported afresh next to the interpreted kernels (experts.py's `kernels` is
    theirs), for this test only."""
    with pytest.MonkeyPatch.context() as mp:
        for name, module in (("experts", experts), ("llm", llm)):
            mp.setattr(bagel_vae_pp.bagel, name, module)  # restored afterwards, as the sys.modules entries
            mp.delitem(sys.modules, f"bagel_vae_pp.bagel.{name}")
        yield importlib.import_module("bagel_vae_pp.bagel.llm")


def random_model(module, dtype):
    """A 2-layer decoder of odd sizes (5 heads, 1 KV head, Dh 16, MLP 150) with random weights and norm weights."""
    torch.manual_seed(11)
    model = module.Qwen2MoTModel(LLMConfig(80, 150, 2, 5, 1, 32, 1e4, EPS, "silu"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model.to(dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_layers_with_the_kernels_match_the_torch_path(interp, fused_llm, monkeypatch, dtype):
    """Both experts' rows (the gen block mid-sequence, and batched passes), every fused kernel launched; against
    the same model with BAGEL_VAE_PP_FUSED_LAYERS=0."""
    kernels_pkg = interp.kernels  # the package fused_llm's experts.py calls
    calls = {name: 0 for name in ("rms_norm", "qk_norm_rope", "swiglu_")}

    def counted(name):
        fn = getattr(kernels_pkg, name)

        def call(*args):
            calls[name] += 1
            return fn(*args)

        return call

    for name in calls:
        monkeypatch.setattr(kernels_pkg, name, counted(name))
    model = random_model(fused_llm, dtype)
    x = activations((11, 80), dtype, seed=12)
    past = model(x[:4], torch.arange(4), None, causal=True)[1]

    def run():
        one, kv = model(x[4:], torch.arange(4, 11), past, gen=slice(1, 6))
        two = model.passes(x[4:], [torch.arange(4, 11), torch.arange(2, 9)], [past, past], gen=slice(1, 6))
        return [one, kv[1][0], *two]

    fused = run()
    # three calls (the cache's, one pass, two batched) of 2 layers: 2 norms + q, k + one SwiGLU per expert a layer
    # (the cache's: one expert), and the final norm
    assert calls == {"rms_norm": 3 * (2 * 2 + 1), "qk_norm_rope": 3 * 2 * 2, "swiglu_": 2 + 2 * 2 * 2}
    monkeypatch.setenv(kernels_pkg.LAYER_FUSION_SWITCH, "0")
    plain = run()
    assert calls["swiglu_"] == 10  # the switch: no further launches
    for a, b in zip(fused, plain):
        # bf16: 0 measured (the kernels' rare one-ulp ties did not occur); fp32: 3e-7 to 5e-7
        assert rel_err(a, b.double()) < (1e-3 if dtype == BF16 else 1e-5)
