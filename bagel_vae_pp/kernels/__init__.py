"""Triton kernels for the GPU hot path: mid-block attention (D = 512; flash, GEMM and split forms), GroupNorm
statistics / apply, Wan's channel RMS norm, and BAGEL's fused layer kernels (RMSNorm, q/k norm + RoPE, SwiGLU).

Each public function falls back to the plain torch computation when Triton is missing or the tensors
sit on the CPU (unless TRITON_INTERPRET=1, which runs the kernels on CPU tensors for the tests).
"""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

LAYER_FUSION_SWITCH = "BAGEL_VAE_PP_FUSED_LAYERS"  # "0": BAGEL's layers take the torch path on GPUs too


def is_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels run for tensors on `device`: CUDA, or the CPU under the interpreter (never the meta
    device, where a model is sized or built before its weights exist)."""
    if not HAS_TRITON:
        return False
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def fuses_layers(t: torch.Tensor) -> bool:
    """Whether BAGEL's decoder layers (bagel/experts.py) run the fused kernels (rms_norm, qk_norm_rope, swiglu) on t: a
    device they run on, bf16 or fp32, contiguous, and LAYER_FUSION_SWITCH not set to "0" (the torch path, for
    comparison: bench/bench_layer_fusion.py)."""
    return (
        is_available(t.device)
        and t.dtype in (torch.bfloat16, torch.float32)
        and t.is_contiguous()
        and os.environ.get(LAYER_FUSION_SWITCH, "1") != "0"
    )


def is_nhwc(x: torch.Tensor) -> bool:
    """Whether x is a 4-D channels_last map that is not also NCHW-contiguous (C == 1 or H*W == 1 are both)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def takes_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """What every attention kernel asks of q, k, v: a device they run on, one half dtype, one device, k and v
    alike, one batch, one head dim; each kernel adds its own layout and size conditions. Never fp32: on a GPU
    their tl.dot would take fp32 operands as TF32 (10-bit mantissa), and an fp32 job must stay fp32."""
    return (
        is_available(q.device)
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.dtype == k.dtype == v.dtype
        and q.device == k.device == v.device
        and q.dim() == k.dim() == v.dim()
        and k.shape == v.shape
        and q.shape[0] == k.shape[0]
        and q.shape[-1] == k.shape[-1]
        and q.shape[-2] > 0
        and k.shape[-2] > 0
    )


from .attention import attention  # noqa: E402
from .channel_rms_norm import channel_rms_norm  # noqa: E402
from .gemm_attention import gemm_attention  # noqa: E402
from .group_norm import group_norm_apply, group_stats, with_conv_bias  # noqa: E402
from .phases import interleave_phases  # noqa: E402
from .qk_norm_rope import qk_norm_rope  # noqa: E402
from .residual import residual_add_  # noqa: E402
from .rms_norm import rms_norm  # noqa: E402
from .split_attention import split_attention  # noqa: E402
from .swiglu import swiglu_  # noqa: E402

__all__ = [
    "attention",
    "channel_rms_norm",
    "fuses_layers",
    "gemm_attention",
    "group_norm_apply",
    "group_stats",
    "interleave_phases",
    "is_available",
    "qk_norm_rope",
    "residual_add_",
    "rms_norm",
    "split_attention",
    "swiglu_",
    "with_conv_bias",
]
