"""Checks and normalisation of what users hand the pool, each failure naming the input and what is allowed.

All of this runs in the host before any worker sees a job, so a bad input never leaves ranks waiting
in a collective.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .autoencoder import AutoEncoderParams
from .ltx_config import LTXVideoParams

DTYPE_NAMES = ("auto", "bf16", "fp16", "fp32")
MODES = ("exact", "tiled")


def parse_devices(text: str, cuda_count: int, prefer_cpu: bool = False) -> tuple[str, ...]:
    """'all' | 'cpu' | 'cpu:N' | '0,1,3' | 'cuda:0,cuda:2' -> one device string per worker.

    'all' means every visible GPU, or two CPU workers where there is none (or the host runs on CPU).
    """
    text = text.strip().lower()
    if text == "all":
        if cuda_count and not prefer_cpu:
            return tuple(f"cuda:{i}" for i in range(cuda_count))
        return ("cpu", "cpu")
    if text == "cpu" or text.startswith("cpu:"):
        count = text[4:] or "1"
        if not count.isdigit() or not 1 <= int(count) <= 64:
            raise ValueError(f"devices: '{text}' is not valid; use 'cpu:N' with N from 1 to 64 workers.")
        return ("cpu",) * int(count)
    ids = []
    for part in text.split(","):
        part = part.strip().removeprefix("cuda:")
        if not part.isdigit():
            raise ValueError(f"devices: '{text}' is not valid; use 'all', 'cpu:N', or GPU ids like '0,1,2,3'.")
        ids.append(int(part))
    if len(set(ids)) != len(ids):
        raise ValueError(f"devices: '{text}' names a GPU twice; list each GPU once.")
    missing = [i for i in ids if i >= cuda_count]
    if missing:
        raise ValueError(
            f"devices: GPU {missing[0]} does not exist; this machine has {cuda_count} GPU(s)"
            + (f" (ids 0-{cuda_count - 1})." if cuda_count else "; use 'cpu:N'.")
        )
    return tuple(f"cuda:{i}" for i in ids)


def resolve_dtype(name: str, devices: tuple[str, ...]) -> str:
    """'auto' is bf16 on GPUs (FLUX VAEs overflow in fp16) and fp32 on CPU."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype: '{name}' is not one of {', '.join(DTYPE_NAMES)}.")
    if name != "auto":
        return name
    return "bf16" if devices[0].startswith("cuda") else "fp32"


def non_finite_error(name: str, x: Tensor) -> ValueError:
    """The error for an input found to hold NaN/Inf (the pool finds it while staging the input)."""
    bad = (~torch.isfinite(x)).sum().item()
    return ValueError(
        f"{name}: contains {bad} NaN/Inf value(s); a VAE cannot turn them into pixels. "
        "Check the node that produced it (a diverged sampler or an fp16 overflow upstream)."
    )


def check_latent(latent: Tensor, params: AutoEncoderParams) -> Tensor:
    """A ComfyUI LATENT 'samples' tensor for this VAE, as contiguous float32 [B, z, h, w]."""
    if not params.has_decoder:
        raise ValueError("vae: this VAE has no decoder weights; load a full VAE to decode.")
    if getattr(latent, "is_nested", False) or latent.ndim != 4:
        raise ValueError(
            f"samples: this image VAE decodes an image latent [B, C, H, W], got shape {tuple(latent.shape)}; "
            "a video latent [B, C, T, H, W] (or a nested one) needs the video VAE of the model that made it."
        )
    return checked_samples(latent, params)


def check_video_latent(latent: Tensor, params) -> Tensor:
    """A ComfyUI video LATENT 'samples' tensor for a video VAE (Wan, HunyuanVideo), as contiguous float32
    [B, z, T, h, w]."""
    if not params.has_decoder:
        raise ValueError("vae: this VAE has no decoder weights; load a full VAE to decode.")
    if getattr(latent, "is_nested", False) or latent.ndim != 5:
        raise ValueError(
            f"samples: this video VAE decodes a video latent [B, C, T, H, W], got shape "
            f"{tuple(latent.shape)}; an image latent needs the image VAE of the model that made it."
        )
    if latent.shape[2] == 0:
        raise ValueError("samples: the video latent has 0 frames.")
    return checked_samples(latent, params)


def checked_samples(latent: Tensor, params) -> Tensor:
    B, C = latent.shape[:2]
    if B == 0:
        raise ValueError("samples: the batch is empty (0 latents).")
    if C != params.z_channels:
        raise ValueError(
            f"samples: the latent has {C} channels but this VAE takes {params.z_channels}; "
            "use the VAE of the model that made the latent."
        )
    return latent.detach().to("cpu", torch.float32).contiguous()


def prepare_pixels(pixels: Tensor, params) -> Tensor:
    """A ComfyUI IMAGE [B, H, W, C] -> contiguous float32 [B, H', W', 3], H', W' cropped to the VAE's
    multiple around the centre (as core VAEEncode does); alpha is dropped. For a video VAE the B images are the
    frames of one video (as core encodes an IMAGE batch)."""
    if not params.has_encoder:
        raise ValueError("vae: this VAE has no encoder weights; load a full VAE to encode.")
    if pixels.ndim != 4 or pixels.shape[-1] < 3:
        raise ValueError(f"pixels: expected an IMAGE [B, H, W, 3], got shape {tuple(pixels.shape)}.")
    B, H, W, _ = pixels.shape
    s = params.downscale
    if B == 0:
        raise ValueError("pixels: the batch is empty (0 images).")
    if isinstance(params, LTXVideoParams) and (B - 1) % params.time_scale:
        raise ValueError(  # core's message (comfy's LTX VideoVAE.encode), with the count found
            "pixels: Invalid number of frames: Encode input must have 1 + 8 * x frames (e.g., 1, 9, 17, ...), got "
            f"{B}. Please check your input."
        )
    if H < s or W < s:
        raise ValueError(f"pixels: the image is {W}x{H}; the VAE needs at least {s}x{s} pixels.")
    top, left = (H % s) // 2, (W % s) // 2
    pixels = pixels[:, top : top + H // s * s, left : left + W // s * s, :3]
    return pixels.detach().to("cpu", torch.float32).contiguous()


def check_tiles(mode: str, tile_px: int, overlap_px: int, downscale: int) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: '{mode}' is not one of {', '.join(MODES)}.")
    if mode == "tiled" and (tile_px % downscale or overlap_px % downscale or not 0 <= overlap_px < tile_px // 2):
        raise ValueError(
            f"tile_size/overlap: got {tile_px}/{overlap_px}; both must be multiples of {downscale} "
            "and overlap must be less than half the tile size."
        )


def check_temporal_tiles(temporal_size: int, temporal_overlap: int, time_scale: int) -> None:
    """Tiled mode with a video VAE: temporal tiles in frames, as core VAE Decode (Tiled) takes them, of whole latent
    frames (`time_scale` frames each); overlapping by at most half a tile, so only neighbouring tiles overlap."""
    if (
        temporal_size % time_scale
        or temporal_overlap % time_scale
        or temporal_size < 2 * time_scale
        or not time_scale <= temporal_overlap <= temporal_size // 2
    ):
        raise ValueError(
            f"temporal_size/temporal_overlap: got {temporal_size}/{temporal_overlap} frames; both must be multiples "
            f"of {time_scale}, temporal_size at least {2 * time_scale}, and temporal_overlap from {time_scale} up to "
            "half of temporal_size."
        )
