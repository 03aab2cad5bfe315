"""The Wan 2.2 VAE (TI2V-5B: 48 latent channels, 16x spatial), as ComfyUI's VAE Loader holds it.

Built from Wan 2.1's parts (wan.py) with the differences of comfy/ldm/wan/vae2_2.py: the video is folded 2x2 into
12 channels before the encoder and unfolded after the decoder; the decoder is wider than the encoder (256 vs 160);
each resolution level is one block (`encoder.downsamples.{i}.downsamples.{j}`, `decoder.upsamples.{i}.upsamples.{j}`)
whose input also reaches its output through a weightless shortcut (on the way down the mean of 2x2 (x2 in time)
blocks folded into channel groups, on the way up the channels repeated and unfolded); and the upsampling conv keeps
its width. The shortcuts see the chunks ComfyUI feeds them: the down one puts a zero frame before a chunk whose
frame count is odd (the first), the up one drops the first of the two frames it makes of the first latent frame.
Nothing in a shortcut crosses a row band whose edges are even at its level.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .video_layout import keep_layout
from .wan import (
    Cache,
    Resample,
    ResidualBlock,
    WanParams,
    WanVAE,
    causal_conv,
    conv3d,
    head,
    mid_block,
    randomized,
)


def avg_down(x: Tensor, c_out: int, ft: int, fs: int) -> Tensor:
    """[B, C, T, H, W] -> [B, c_out, T/ft, H/fs, W/fs]: fold each ft x fs x fs block into channels (c, dt, dy, dx)
    and average runs of C*ft*fs*fs/c_out of them; a zero frame goes first when T is not a multiple of ft."""
    y = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))
    B, C, T, H, W = y.shape
    y = y.view(B, C, T // ft, ft, H // fs, fs, W // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)  # [B, C, dt, dy, dx, ...]
    return keep_layout(y.reshape(B, c_out, -1, T // ft, H // fs, W // fs).mean(2), x)


def dup_up(x: Tensor, c_out: int, ft: int, fs: int, first: bool) -> Tensor:
    """[B, C, T, H, W] -> [B, c_out, T*ft, H*fs, W*fs]: each channel repeated, the copies unfolded as (c, dt, dy, dx);
    the first chunk drops its first ft - 1 frames (one latent frame makes one frame)."""
    B, C, T, H, W = x.shape
    y = x.repeat_interleave(c_out * ft * fs * fs // C, dim=1).view(B, c_out, ft, fs, fs, T, H, W)
    y = y.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(B, c_out, T * ft, H * fs, W * fs)  # [B, c_out, T, dt, H, dy, W, dx]
    return keep_layout(y[:, :, ft - 1 :] if first else y, x)


class DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, blocks: int, down: bool, temporal: bool):
        super().__init__()
        layers = [ResidualBlock(c_in if i == 0 else c_out, c_out) for i in range(blocks)]
        if down:
            layers.append(Resample(c_out, c_out, up=False, temporal=temporal))
        self.downsamples = nn.Sequential(*layers)
        self.c_out, self.ft, self.fs = c_out, 2 if temporal else 1, 2 if down else 1

    def shortcut(self, x: Tensor, cache: Cache) -> Tensor:
        return avg_down(x, self.c_out, self.ft, self.fs)

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        h = x
        for layer in self.downsamples:
            h = layer(h, cache)
        return h + self.shortcut(x, cache)


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, blocks: int, up: bool, temporal: bool):
        super().__init__()
        layers = [ResidualBlock(c_in if i == 0 else c_out, c_out) for i in range(blocks)]
        if up:
            layers.append(Resample(c_out, c_out, up=True, temporal=temporal))
        self.upsamples = nn.Sequential(*layers)
        self.up, self.c_out, self.ft = up, c_out, 2 if temporal else 1

    def shortcut(self, x: Tensor, cache: Cache) -> Tensor:
        first = self not in cache  # the first chunk: marked as seen in the cache
        cache[self] = None
        return dup_up(x, self.c_out, self.ft, 2, first)

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        h = x
        for layer in self.upsamples:
            h = layer(h, cache)
        return h + self.shortcut(x, cache) if self.up else h


def temporal_flags(p: WanParams) -> list[bool]:
    return [*p.temporal_down, *[False] * (len(p.dim_mult) - len(p.temporal_down))]


class Encoder3d(nn.Module):
    def __init__(self, p: WanParams):
        super().__init__()
        widths = [p.dim * m for m in (1, *p.dim_mult)]
        self.conv1 = conv3d(3 * p.patch**2, widths[0])
        last = len(p.dim_mult) - 1
        self.downsamples = nn.Sequential(
            *(
                DownBlock(widths[i], widths[i + 1], p.num_res_blocks, i != last, t)
                for i, t in enumerate(temporal_flags(p))
            )
        )
        self.middle = mid_block(widths[-1])
        self.head = head(widths[-1], 2 * p.z_channels)

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        x = causal_conv(self.conv1, x, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        return causal_conv(self.head[2], self.head[0](x, silu=True), cache)  # [B, 2z, T', h, w]


class Decoder3d(nn.Module):
    def __init__(self, p: WanParams):
        super().__init__()
        widths = [p.decoder_dim * m for m in (p.dim_mult[-1], *reversed(p.dim_mult))]
        self.conv1 = conv3d(p.z_channels, widths[0])
        self.middle = mid_block(widths[0])
        temporal_up = temporal_flags(p)[-2::-1] + [False]  # the encoder's flags for its downsampling levels, reversed
        last = len(p.dim_mult) - 1
        self.upsamples = nn.Sequential(
            *(UpBlock(widths[i], widths[i + 1], p.num_res_blocks + 1, i != last, t) for i, t in enumerate(temporal_up))
        )
        self.head = head(widths[-1], 3 * p.patch**2)

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        x = causal_conv(self.conv1, x, cache)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache)
        return causal_conv(self.head[2], self.head[0](x, silu=True), cache)  # [B, 3*p*p, frames, H, W]


class WanVAE22(WanVAE):
    encoder_class, decoder_class = Encoder3d, Decoder3d


def levels(sd: dict[str, Tensor], prefix: str, inner: str) -> list[tuple[int, int, bool]]:
    """Per level of a `{prefix}.{i}.{inner}.{j}` stack: (residual blocks, their output width, has a time conv)."""
    found, i = [], 0
    while f"{prefix}.{i}.{inner}.0.residual.6.weight" in sd:
        key = f"{prefix}.{i}.{inner}"
        blocks = 0
        while f"{key}.{blocks}.residual.6.weight" in sd:
            blocks += 1
        width = int(sd[f"{key}.{blocks - 1}.residual.6.weight"].shape[0])
        found.append((blocks, width, f"{key}.{blocks}.time_conv.weight" in sd))
        i += 1
    return found


def detect_params(sd: dict[str, Tensor]) -> WanParams:
    """Read the configuration off a Wan 2.2 VAE state dict (ComfyUI's keys, prefixes already stripped)."""
    has_encoder, has_decoder = "encoder.conv1.weight" in sd, "decoder.conv1.weight" in sd
    if has_encoder:
        found, z = levels(sd, "encoder.downsamples", "downsamples"), int(sd["encoder.head.2.weight"].shape[0]) // 2
        dim, folded = int(sd["encoder.conv1.weight"].shape[0]), int(sd["encoder.conv1.weight"].shape[1])
        res_blocks, temporal = found[0][0], tuple(t for _, _, t in found[:-1])
    else:
        found, z = levels(sd, "decoder.upsamples", "upsamples")[::-1], int(sd["decoder.conv1.weight"].shape[1])
        dim, folded = int(sd["decoder.head.2.weight"].shape[1]), int(sd["decoder.head.2.weight"].shape[0])
        res_blocks, temporal = found[0][0] - 1, tuple(t for _, _, t in found[1:])
    if not found:
        raise ValueError("vae: this Wan 2.2 VAE has no residual blocks where ComfyUI's has them.")
    return WanParams(
        dim=dim,
        decoder_dim=int(sd["decoder.head.2.weight"].shape[1]) if has_decoder else dim,
        z_channels=z,
        dim_mult=tuple(width // dim for _, width, _ in found),
        num_res_blocks=res_blocks,
        temporal_down=temporal,
        patch=math.isqrt(folded // 3),
        has_encoder=has_encoder,
        has_decoder=has_decoder,
    )


# Named sizes: Wan 2.2's own (as comfy/sd.py builds it: dim 160, ComfyUI's default decoder width 256) and a tiny one.
CONFIGS = {
    "wan2.2": WanParams(160, 256, 48, (1, 2, 4, 4), 2, (False, True, True), 2, True, True),
    "tiny": WanParams(8, 8, 4, (1, 2, 2, 2), 1, (False, True, True), 2, True, True),
}


def random_wan22(name: str = "wan2.2", seed: int = 0) -> WanVAE22:
    """A seeded random-weight Wan 2.2 VAE of a named size."""
    return randomized(WanVAE22(CONFIGS[name]), seed)
