"""Image and latent layouts for BAGEL (data/transforms.py, Bagel.prepare_*/decode_image).

Input images arrive as ComfyUI IMAGE tensors [H, W, 3] in [0, 1]. The official app resizes 8-bit PIL images
with PIL bicubic, so we round to uint8 and use PIL too: a PNG loaded by ComfyUI resizes to the same pixels
as in the official app. Generation tokens hold 2x2 latent pixels with channels fastest ("chpwq->hwpqc").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from .config import LATENT_PATCH_SIZE, MAX_PIXELS, VAE_SCALE, VAE_SHIFT, VIT_RESIZE_MIN, BagelParams


@dataclass(frozen=True)
class ResizeSpec:
    max_size: int  # longest side limit
    min_size: int  # shortest side target
    stride: int  # both sides become multiples of this
    max_pixels: int = MAX_PIXELS


def vae_resize_spec(params: BagelParams) -> ResizeSpec:
    """ImageTransform(1024, 512, 16) for the real model; scaled with max_latent_size for small ones."""
    side = params.max_image_size
    return ResizeSpec(side, side // 2, params.latent_downsample)


def vit_resize_spec(params: BagelParams) -> ResizeSpec:
    """ImageTransform(980, 224, 14) for the real model."""
    p = params.vit.patch_size
    side = params.vit_max_patches_per_side * p
    return ResizeSpec(side, min(VIT_RESIZE_MIN, side), p)


def _scaled(width: int, height: int, scale: float, stride: int) -> tuple[int, int]:
    def fit(v: float) -> int:
        return max(stride, int(round(round(v) / stride) * stride))

    return fit(width * scale), fit(height * scale)


def resized_size(width: int, height: int, spec: ResizeSpec) -> tuple[int, int]:
    """(width, height) after MaxLongEdgeMinShortEdgeResize: long <= max, short >= min, stride multiples.

    The short-side rule can push the long side over the limit; the final long-side clamp then wins
    (2000x500 -> 1024x256 for the VAE spec).
    """
    scale = max(min(spec.max_size / max(width, height), 1.0), spec.min_size / min(width, height))
    w, h = _scaled(width, height, scale, spec.stride)
    if w * h > spec.max_pixels:
        w, h = _scaled(w, h, spec.max_pixels / (w * h), spec.stride)
    if max(w, h) > spec.max_size:
        w, h = _scaled(w, h, spec.max_size / max(w, h), spec.stride)
    return w, h


def to_pil(image: Tensor) -> Image.Image:
    """ComfyUI image [H, W, 3] in [0, 1] -> 8-bit RGB PIL image (rounded: lossless for loaded PNGs)."""
    pixels = (image[..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().contiguous()  # [H, W, 3]
    return Image.frombytes("RGB", (pixels.shape[1], pixels.shape[0]), bytes(pixels.untyped_storage()))


def resize_pil(image: Image.Image, spec: ResizeSpec) -> Image.Image:
    size = resized_size(*image.size, spec)
    return image if size == image.size else image.resize(size, Image.BICUBIC)


def pil_to_unit(image: Image.Image) -> Tensor:
    """8-bit PIL -> [H, W, 3] float in [0, 1] (ToTensor's uint8 / 255)."""
    data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return data.reshape(image.height, image.width, 3).float().div(255)


def unit_to_signed(pixels: Tensor) -> Tensor:
    """[H, W, 3] in [0, 1] -> [3, H, W] in [-1, 1], as Normalize(mean=0.5, std=0.5)."""
    return (pixels.permute(2, 0, 1) - 0.5) / 0.5


def latent_grid(height: int, width: int, params: BagelParams) -> tuple[int, int]:
    """Generation tokens per column and row for an image of height x width pixels."""
    return height // params.latent_downsample, width // params.latent_downsample


def raw_to_tokens(raw: Tensor, params: BagelParams) -> Tensor:
    """Raw VAE latent [z, 2h, 2w] -> BAGEL-space tokens [h*w, 4z] (scale/shift, then "chpwq->hwpqc")."""
    p = LATENT_PATCH_SIZE
    z, H, W = raw.shape
    h, w = H // p, W // p
    x = VAE_SCALE * (raw[:, : h * p, : w * p] - VAE_SHIFT)
    x = x.reshape(z, h, p, w, p)
    return torch.einsum("chpwq->hwpqc", x).reshape(h * w, p * p * z)


def tokens_to_raw(tokens: Tensor, h: int, w: int, params: BagelParams) -> Tensor:
    """BAGEL-space tokens [h*w, 4z] -> raw VAE latent [1, z, 2h, 2w] (ComfyUI LATENT space)."""
    p, z = LATENT_PATCH_SIZE, params.vae_z_channels
    x = tokens.reshape(1, h, w, p, p, z)
    x = torch.einsum("nhwpqc->nchpwq", x).reshape(1, z, h * p, w * p)
    return x / VAE_SCALE + VAE_SHIFT
