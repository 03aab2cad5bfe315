"""The memory layout of 5-D video activations [B, C, T, H, W]: NCDHW, or NDHWC (`torch.channels_last_3d`).

On CUDA the video VAEs run NDHWC end to end: cuDNN's bf16 3-D convs work channels-last (an NCDHW input costs a
transpose in and out of every conv), the per-position RMS norm reduces over contiguous channels, and a frame of an
NDHWC video is a channels_last image, so the 2-D resamples, attention tokens and the final IMAGE frames are views.
Whatever builds a new activation (zero frames, a frame buffer with its past and halo rows, the interleave of a
temporal upsample) builds it in its input's layout, so one layout holds from the first conv to the last.
"""

from __future__ import annotations

import torch
from torch import Tensor

NDHWC = torch.channels_last_3d


def is_ndhwc(x: Tensor) -> bool:
    """Channels innermost (a row band of an NDHWC video too, whose frames are further apart than its rows)."""
    return x.dim() == 5 and x.stride(1) == 1 and x.shape[1] > 1


def to_layout(x: Tensor, ndhwc: bool) -> Tensor:
    return x.contiguous(memory_format=NDHWC if ndhwc else torch.contiguous_format)


def empty_as(x: Tensor, shape) -> Tensor:
    """An uninitialised [B, C, T, H, W] of `shape` with x's dtype, device and layout."""
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=NDHWC if is_ndhwc(x) else None)


def cat_frames(a: Tensor, b: Tensor) -> Tensor:
    """a's frames, then b's, in b's layout (torch.cat picks NCDHW when a 1-frame `a` reads as both layouts)."""
    out = empty_as(b, (*b.shape[:2], a.shape[2] + b.shape[2], *b.shape[3:]))
    out[:, :, : a.shape[2]] = a
    out[:, :, a.shape[2] :] = b
    return out


def keep_layout(y: Tensor, x: Tensor) -> Tensor:
    """y in x's layout (a no-op where the op already kept it, as cuDNN's convs do; CPU convs return NCDHW)."""
    return to_layout(y, True) if is_ndhwc(x) and not is_ndhwc(y) else y


def interleave_halves(y: Tensor) -> Tensor:
    """[B, 2C, T, H, W] -> [B, C, 2T, H, W]: channel k*C + c of frame t becomes channel c of frame 2t + k (a
    temporal upsample's two outputs per window), in y's layout."""
    B, C2, T, H, W = y.shape
    C = C2 // 2
    if is_ndhwc(y):
        z = y.permute(0, 2, 3, 4, 1).reshape(B, T, H, W, 2, C).permute(0, 1, 4, 2, 3, 5)  # [B, T, 2, H, W, C]
        return z.contiguous().view(B, 2 * T, H, W, C).permute(0, 4, 1, 2, 3)  # (reshape could keep z's strides)
    return y.view(B, 2, C, T, H, W).permute(0, 2, 3, 1, 4, 5).reshape(B, C, 2 * T, H, W)
