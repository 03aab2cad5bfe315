"""The layers of the LTX-Video VAE (ltx_video.py) and how each runs on rows that a `band` pads: ComfyUI's
CausalConv3d, ResnetBlock3D, UNetMidBlock3D, SpaceToDepthDownsample, DepthToSpaceUpsample, pixel / layer norm and
the decoder's timestep embedder, under their names there.

`band` is ltx_video.Whole (all rows: the single-process module) or ltx_sharded.Band (a rank's rows): it pads a
conv's rows (halo rows, or the true edge's zeros / reflection), normalises over all rows for a GroupNorm, and gives
the rows of a spatial-noise map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GROUPS = 32  # GroupNorm groups (a config's group_norm)


class Conv(nn.Module):
    """A 3x3x3 conv whose padding `conv3d` does (its weights one level down, as ComfyUI's CausalConv3d)."""

    def __init__(self, c_in: int, c_out: int, padding: str, stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out, 3, stride=stride)
        self.padding = padding


def pad_rows(x: Tensor, padding: str, above: Tensor | None = None, below: Tensor | None = None) -> Tensor:
    """x [..., rows, W] with a row more on each side: a neighbour's halo row, or at the true edge (None) a zero row
    or, 'reflect', the mirror of the row next to the edge (found in the halo when the band has one row)."""
    rows = torch.cat([t for t in (above, x, below) if t is not None], dim=-2)
    if padding == "zeros":
        zero = rows.new_zeros(*rows.shape[:-2], 1, rows.shape[-1])
        top, bottom = (zero if above is None else None), (zero if below is None else None)
    else:
        top = rows[..., 1:2, :] if above is None else None
        bottom = rows[..., -2:-1, :] if below is None else None
    return torch.cat([t for t in (top, rows, bottom) if t is not None], dim=-2)


def conv3d(layer: Conv, x: Tensor, causal: bool, band) -> Tensor:
    """layer over x [B, C, T, H, W]: rows padded by `band`, columns by the layer's padding, frames repeated."""
    x = band.pad_rows(x, layer.padding)
    x = F.pad(x, (1, 1, 0, 0, 0, 0), mode="constant" if layer.padding == "zeros" else layer.padding)
    first = x[:, :, :1]
    x = torch.cat([first, first, x] if causal else [first, x, x[:, :, -1:]], dim=2)
    return F.conv3d(x, layer.conv.weight, layer.conv.bias, stride=layer.conv.stride)


class PixelNorm(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x / torch.sqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


class LayerNorm(nn.Module):
    """LayerNorm over channels at each position (its weights one level down, as ComfyUI's)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "group_norm":
        return nn.GroupNorm(GROUPS, channels, eps=1e-6)
    return PixelNorm() if kind == "pixel_norm" else LayerNorm(channels)


def norm(layer: nn.Module, x: Tensor, band) -> Tensor:
    return band.group_norm(layer, x) if isinstance(layer, nn.GroupNorm) else layer(x)


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(256, dim), nn.Linear(dim, dim)


class TimeEmbedder(nn.Module):
    """The decoder's timestep embedding (ComfyUI's PixArt-alpha one): 256 sinusoids, cos first, then an MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = MLP(dim)

    def forward(self, t: Tensor, dtype: torch.dtype) -> Tensor:  # t: [] -> [1, dim]
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32, device=t.device) / 128)
        angles = t.float().reshape(1, 1) * freqs  # [1, 128]
        m = self.timestep_embedder
        return m.linear_2(F.silu(m.linear_1(torch.cat([angles.cos(), angles.sin()], dim=1).to(dtype))))


class ResBlock(nn.Module):
    """ComfyUI's ResnetBlock3D: norm, (scale, shift), SiLU, conv, (noise) twice; a layer-normed 1x1x1 shortcut when
    the width changes."""

    def __init__(self, c_in: int, c_out: int, norm_layer: str, padding: str, inject_noise: bool, timestep: bool):
        super().__init__()
        self.norm1, self.conv1 = make_norm(norm_layer, c_in), Conv(c_in, c_out, padding)
        self.norm2, self.conv2 = make_norm(norm_layer, c_out), Conv(c_out, c_out, padding)
        if inject_noise:
            self.per_channel_scale1 = nn.Parameter(torch.empty(c_in, 1, 1))
            self.per_channel_scale2 = nn.Parameter(torch.empty(c_in, 1, 1))
        if c_in != c_out:
            self.norm3, self.conv_shortcut = LayerNorm(c_in), nn.Conv3d(c_in, c_out, 1)
        if timestep:
            self.scale_shift_table = nn.Parameter(torch.empty(4, c_in))


class MidBlock(nn.Module):
    """A `res_x` block: res blocks of one width, with their own timestep embedder when conditioned."""

    def __init__(self, c: int, layers: int, norm_layer: str, padding: str, inject_noise: bool, timestep: bool):
        super().__init__()
        if timestep:
            self.time_embedder = TimeEmbedder(4 * c)
        self.res_blocks = nn.ModuleList(
            ResBlock(c, c, norm_layer, padding, inject_noise, timestep) for _ in range(layers)
        )


class SpaceToDepth(nn.Module):
    """Encoder resample: a conv to c_out / (st*s*s) channels folded to c_out, plus the input folded and averaged."""

    def __init__(self, c_in: int, c_out: int, stride: tuple[int, int, int], padding: str):
        super().__init__()
        self.stride = stride
        self.conv = Conv(c_in, c_out // math.prod(stride), padding)


class DepthToSpace(nn.Module):
    """Decoder resample: a conv to st*s*s*c / reduction channels unfolded into frames, rows and columns (the first
    frame dropped when time doubles), plus, with `residual`, the input unfolded the same way and repeated."""

    def __init__(self, c: int, stride: tuple[int, int, int], residual: bool, reduction: int, padding: str):
        super().__init__()
        self.stride, self.residual, self.reduction = stride, residual, reduction
        self.conv = Conv(c, math.prod(stride) * c // reduction, padding)


def space_to_depth(x: Tensor, stride: tuple[int, int, int]) -> Tensor:
    """[B, C, T*pt, H*ph, W*pw] -> [B, C*pt*ph*pw, T, H, W], channel-major (ComfyUI's `(c p1 p2 p3)`)."""
    (pt, ph, pw), (B, C, T, H, W) = stride, x.shape
    x = x.view(B, C, T // pt, pt, H // ph, ph, W // pw, pw).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(B, C * pt * ph * pw, T // pt, H // ph, W // pw)


def depth_to_space(x: Tensor, stride: tuple[int, int, int]) -> Tensor:
    """[B, C*pt*ph*pw, T, H, W] -> [B, C, T*pt, H*ph, W*pw], the inverse of space_to_depth."""
    (pt, ph, pw), (B, C, T, H, W) = stride, x.shape
    x = x.view(B, C // (pt * ph * pw), pt, ph, pw, T, H, W).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(B, -1, T * pt, H * ph, W * pw)


def patchify(x: Tensor, p: int) -> Tensor:
    """[B, 3, T, H, W] -> [B, 3*p*p, T, H/p, W/p], channels ordered (c, column offset, row offset) as ComfyUI's."""
    return space_to_depth(x, (1, p, p)).unflatten(1, (-1, p, p)).transpose(2, 3).flatten(1, 3)


def unpatchify(x: Tensor, p: int) -> Tensor:
    return depth_to_space(x.unflatten(1, (-1, p, p)).transpose(2, 3).flatten(1, 3), (1, p, p))


def inject_noise(h: Tensor, scale: Tensor, band) -> Tensor:
    """h [B, C, T, rows, W] plus the band's rows of the next spatial-noise map, scaled per channel."""
    noise = band.noise(h).to(h.device, h.dtype)  # [rows, W]
    return h + (noise[None] * scale)[None, :, None]


def modulation(table: Tensor, emb: Tensor, x: Tensor) -> tuple[Tensor, ...]:
    """table [n, C] + emb [1, n*C] -> n tensors [1, C, 1, 1, 1] in x's dtype (shift, scale, ...)."""
    ada = table[None, :, :, None, None, None].to(x.dtype) + emb.view(1, table.shape[0], -1, 1, 1, 1)
    return ada.unbind(1)


def resblock(block: ResBlock, x: Tensor, causal: bool, band, emb: Tensor | None = None) -> Tensor:
    h = norm(block.norm1, x, band)
    if emb is not None:
        shift1, scale1, shift2, scale2 = modulation(block.scale_shift_table, emb, h)
        h = h * (1 + scale1) + shift1
    h = conv3d(block.conv1, F.silu(h), causal, band)
    if hasattr(block, "per_channel_scale1"):
        h = inject_noise(h, block.per_channel_scale1, band)
    h = norm(block.norm2, h, band)
    if emb is not None:
        h = h * (1 + scale2) + shift2
    h = conv3d(block.conv2, F.silu(h), causal, band)
    if hasattr(block, "per_channel_scale2"):
        h = inject_noise(h, block.per_channel_scale2, band)
    if hasattr(block, "conv_shortcut"):
        x = block.conv_shortcut(block.norm3(x))
    return x + h


def mid_block(block: MidBlock, x: Tensor, causal: bool, band, t: Tensor | None) -> Tensor:
    """t: the scaled decode timestep [] when the block is conditioned, else None."""
    emb = block.time_embedder(t, x.dtype) if hasattr(block, "time_embedder") else None  # [1, 4C]
    for res in block.res_blocks:
        x = resblock(res, x, causal, band, emb)
    return x


def down(layer: SpaceToDepth, x: Tensor, causal: bool, band) -> Tensor:
    if layer.stride[0] == 2:
        x = torch.cat([x[:, :, :1], x], dim=2)  # the first frame twice, so frames pair up
    skip = space_to_depth(x, layer.stride)  # [B, C*st*s*s, T', H', W']
    c_out = layer.conv.conv.out_channels * math.prod(layer.stride)
    skip = skip.unflatten(1, (c_out, -1)).mean(dim=2)  # [B, c_out, T', H', W']
    return space_to_depth(conv3d(layer.conv, x, causal, band), layer.stride) + skip


def up(layer: DepthToSpace, x: Tensor, causal: bool, band) -> Tensor:
    drop = 1 if layer.stride[0] == 2 else 0  # time doubling makes 2T frames; the first is dropped
    y = depth_to_space(conv3d(layer.conv, x, causal, band), layer.stride)[:, :, drop:]
    if not layer.residual:
        return y
    skip = depth_to_space(x, layer.stride).repeat(1, math.prod(layer.stride) // layer.reduction, 1, 1, 1)
    return y + skip[:, :, drop:]
