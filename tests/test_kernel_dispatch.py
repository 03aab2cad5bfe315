"""The engine's calls into the kernels (sharded.py, interpreted) against float64: fp32 stays fp32 on every path (a
GPU pool's fp32 jobs: no bf16 probabilities, no half-precision kernel), bf16 reaches the half-precision kernels."""

import pytest
import torch
import torch.nn.functional as F
from kernel_refs import attention64, channels_last, interpreted_kernels, needs_triton, norm64, rel_err  # noqa: F401

from bagel_vae_pp.autoencoder import AttnBlock, ResnetBlock


def conv64(conv, x, padding=0):
    return F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=padding)


def resnet64(block, x):
    """The resnet block in float64."""
    h = conv64(block.conv1, norm64(block.norm1, x, silu=True), padding=1)
    h = conv64(block.conv2, norm64(block.norm2, h, silu=True), padding=1)
    return (conv64(block.nin_shortcut, x) if hasattr(block, "nin_shortcut") else x.double()) + h


def linear64(conv, t):
    """A 1x1 conv applied to tokens [B, L, C] in float64."""
    return t.double() @ conv.weight.double().flatten(1).T + conv.bias.double()


def mid_attention64(attn, x):
    """The mid-block attention in float64: x + proj_out(softmax(q k^T / sqrt(C)) v) over the H*W tokens."""
    B, C, H, W = x.shape
    t = norm64(attn.norm, x).flatten(2).transpose(1, 2)  # [B, L, C]
    o = linear64(attn.proj_out, attention64(linear64(attn.q, t), linear64(attn.k, t), linear64(attn.v, t)))
    return x.double() + o.transpose(1, 2).reshape(B, C, H, W)


def one_rank(interp, H):
    return interp.sharded.Shard(0, 1, None, [(0, H)])


class Launches:
    """Stands in for a @triton.jit kernel: counts its launches and runs it."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


def count_launches(monkeypatch, *modules):
    """{name: Launches} for every `_*_kernel` of the modules, each put in its kernel's place."""
    launches = {}
    for module in modules:
        for name in [n for n in vars(module) if n.startswith("_") and n.endswith("_kernel")]:
            launches[name] = Launches(getattr(module, name))
            monkeypatch.setattr(module, name, launches[name])
    return launches


# Which Triton kernels each attention form launches: bf16 goes to the half-precision kernels; fp32 never does
# (on a GPU they would round it: P stored in bf16, tl.dot in TF32), only to the row softmax with P in fp32.
LAUNCHED = {
    ("split", torch.bfloat16): {"_scores_kernel", "_merge_stats_kernel", "_pv_kernel"},
    ("gemm", torch.bfloat16): {"_softmax_rows_kernel"},
    ("flash", torch.bfloat16): {"_attention_kernel"},
    ("split", torch.float32): {"_softmax_rows_kernel"},  # split -> gemm_attention
    ("gemm", torch.float32): {"_softmax_rows_kernel"},
    ("flash", torch.float32): set(),  # SDPA
}


@needs_triton
class TestEngineDispatch:
    """sharded.attention, resnet and upsample_conv through the interpreted kernels, in one rank."""

    @pytest.mark.parametrize("form", ["split", "gemm", "flash"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_mid_block_attention(self, interp, monkeypatch, form, dtype):
        monkeypatch.setenv(interp.sharded.ATTENTION_SWITCH, form)
        launches = count_launches(monkeypatch, interp.split_attention, interp.attention, interp.gemm_attention)
        torch.manual_seed(41)
        C, H, W = 128, 5, 13  # 65 tokens: ragged row and key tiles
        attn = AttnBlock(C).to(dtype)
        x = (torch.randn(1, C, H, W) * 0.02 + 0.01).to(dtype)  # small: the attention branch dominates the output
        with torch.no_grad():
            out = interp.sharded.attention(attn, x, one_rank(interp, H))
        assert out.dtype == dtype
        assert {n for n, launch in launches.items() if launch.count} == LAUNCHED[form, dtype]
        # bf16: five roundings in a row (normalised h; q, k, v; P; the attention output; proj_out), ~1.1e-3 rms each
        # and doubled by the interpreter's truncation in the kernels: 5e-3 to 7e-3 measured, bound 2e-2.
        assert rel_err(out, mid_attention64(attn, x)) < (1e-5 if dtype == torch.float32 else 2e-2)

    @pytest.mark.parametrize("layout", ["nhwc", "nchw"])
    def test_fp32_resnet_block(self, interp, layout):
        """GroupNorm kernels with conv1's bias folded into norm2, the residual kernel with conv2's and the shortcut's
        bias; 64 -> 96 channels (NHWC tiles padded to 128, 3 channels a group)."""
        torch.manual_seed(43)
        block = ResnetBlock(64, 96)
        for norm in (block.norm1, block.norm2):
            torch.nn.init.normal_(norm.weight, 1.0), torch.nn.init.normal_(norm.bias)
        x = torch.randn(1, 64, 7, 9) * 3 + 2
        x = channels_last(x) if layout == "nhwc" else x
        with torch.no_grad():
            out = interp.sharded.resnet(block, x, one_rank(interp, 7))
        assert out.dtype == torch.float32 and interp.kernels.is_nhwc(out) == (layout == "nhwc")
        assert rel_err(out, resnet64(block, x)) < 1e-5

    @pytest.mark.parametrize("layout", ["nhwc", "nchw"])
    def test_fp32_upsample(self, interp, layout):
        """The folded sub-pixel weights (summed in fp32) and the interleave kernel (+ bias in fp32)."""
        torch.manual_seed(47)
        conv = torch.nn.Conv2d(48, 24, 3, padding=1)
        torch.nn.init.normal_(conv.bias)
        x = torch.randn(1, 48, 5, 6) + 0.5
        x = channels_last(x) if layout == "nhwc" else x
        with torch.no_grad():
            out = interp.sharded.upsample_conv(conv, x, one_rank(interp, 5))
        assert out.dtype == torch.float32 and interp.kernels.is_nhwc(out) == (layout == "nhwc")
        assert rel_err(out, conv64(conv, F.interpolate(x.double(), scale_factor=2.0), padding=1)) < 1e-5
