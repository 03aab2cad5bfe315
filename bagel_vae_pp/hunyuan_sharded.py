"""Band-parallel forward of the HunyuanVideo VAE: each rank runs the same modules on its own rows of every frame.

Mirrors the walk of `hunyuan_video.py` (the whole video in one forward, as ComfyUI runs it), replacing what looks
beyond a row band. The 3x3x3 convs take one halo row from each neighbour, all frames in one exchange; only the true
image edge replicates its own row (`video_conv`'s halo). The stride-2 downsamples need no special case: bands start
on rows even at every level (encode bands are multiples of 8 pixels), so with one halo row above, the band's
windows are the whole conv's. The upsample repeats the band's own rows and frames, then convolves with the
neighbours' repeated rows as halo. GroupNorm statistics (over all frames and rows) merge across ranks in fp32
(`sharded.group_norm`), and the mid-block attention keeps this band's queries and gathers every rank's keys and
values over all frames: each rank scores its queries against all T*H*W keys, in query chunks (`attend`), never
the square. With one rank this is the plain forward.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .collectives import Shard, exchange_rows, gather_tokens
from .hunyuan_video import (
    AttnBlock,
    HunyuanVideoVAE,
    MidBlock,
    ResnetBlock,
    attend,
    linear_1x1,
    to_tokens,
    upsample_nearest,
    video_conv,
)
from .sharded import group_norm


def band_conv(conv: nn.Module, x: Tensor, shard: Shard) -> Tensor:
    """A VideoConv3d (or its inner Conv3d) on a band: halo rows from the neighbours, replicated rows at the edge."""
    conv = getattr(conv, "conv", conv)
    if shard.world == 1 or conv.kernel_size[1] == 1:
        return video_conv(conv, x)
    return video_conv(conv, x, halo=exchange_rows(x, shard))


def resnet(block: ResnetBlock, x: Tensor, shard: Shard) -> Tensor:
    h = band_conv(block.conv1, group_norm(block.norm1, x, shard, silu=True), shard)
    h = band_conv(block.conv2, group_norm(block.norm2, h, shard, silu=True), shard)
    if hasattr(block, "nin_shortcut"):
        x = band_conv(block.nin_shortcut, x, shard)
    return x + h


def attention(attn: AttnBlock, x: Tensor, shard: Shard) -> Tensor:
    """Exact attention over all frames and rows with queries sharded by rows: K/V of every rank's band."""
    B, C, T, H, W = x.shape
    h = to_tokens(group_norm(attn.norm, x, shard))  # [B, T*rows*W, C]
    q = linear_1x1(attn.q, h)
    k = gather_tokens(linear_1x1(attn.k, h), shard)  # [B, L, C]: rank-major (softmax is blind to key order)
    v = gather_tokens(linear_1x1(attn.v, h), shard)
    h = attend(q, k, v)  # [B, T*rows*W, C]
    return x + linear_1x1(attn.proj_out, h).transpose(1, 2).reshape(B, C, T, H, W)


def mid(block: MidBlock, x: Tensor, shard: Shard) -> Tensor:
    return resnet(block.block_2, attention(block.attn_1, resnet(block.block_1, x, shard), shard), shard)


def decode_band(vae: HunyuanVideoVAE, z: Tensor, shard: Shard) -> Tensor:
    """This rank's rows of every frame: raw latent [B, z, T, rows, w] -> [B, 3, 1 + 4(T-1), 8*rows, 8*w]."""
    dec = vae.decoder
    h = F.conv3d(z, vae.post_quant_conv.weight, vae.post_quant_conv.bias)
    h = mid(dec.mid, band_conv(dec.conv_in, h, shard), shard)
    for stage in reversed(dec.up):
        for block in stage.block:
            h = resnet(block, h, shard)
        if hasattr(stage, "upsample"):
            h = band_conv(stage.upsample.conv, upsample_nearest(h, stage.upsample.temporal), shard)
    return band_conv(dec.conv_out, group_norm(dec.norm_out, h, shard, silu=True), shard)


def encode_band(vae: HunyuanVideoVAE, x: Tensor, shard: Shard) -> Tensor:
    """This rank's rows of the posterior mean: [B, 3, T, rows, W] in [-1, 1] (rows: a multiple of 8) ->
    [B, z, latent_frames(T), rows/8, W/8]."""
    enc = vae.encoder
    h = band_conv(enc.conv_in, x, shard)
    for stage in enc.down:
        for block in stage.block:
            h = resnet(block, h, shard)
        if hasattr(stage, "downsample"):
            h = band_conv(stage.downsample.conv, h, shard)
    h = mid(enc.mid, h, shard)
    return vae.mean(band_conv(enc.conv_out, group_norm(enc.norm_out, h, shard, silu=True), shard))


def count_layers(vae: HunyuanVideoVAE, op: str) -> int:
    """How many times `Shard.on_layer` fires in one band forward (once per GroupNorm), for progress."""
    part = vae.encoder if op == "encode" else vae.decoder
    return sum(isinstance(m, nn.GroupNorm) for m in part.modules())
