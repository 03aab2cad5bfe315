"""Band-parallel forward of the autoencoder: each rank runs the same modules on its own rows.

Mirrors `autoencoder.py` layer by layer, replacing the three operations that look beyond a row band:
3x3 convolutions take halo rows from the neighbours (zero padding only at the true image edge),
GroupNorm uses statistics merged over all ranks, and mid-block attention lets each rank's query rows
attend to keys/values gathered from every rank. With one rank this is the plain forward.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .autoencoder import (
    AttnBlock,
    AutoEncoder,
    Decoder,
    Encoder,
    MidBlock,
    ResnetBlock,
    from_tokens,
    linear_1x1,
    to_tokens,
)
from .collectives import Shard, exchange_halo, gather_tokens, group_stats

ATTENTION_SWITCH = "BAGEL_VAE_PP_ATTENTION"  # "gemm" (default on GPUs) or "flash"


def conv3x3(conv: nn.Conv2d, x: Tensor, shard: Shard) -> Tensor:
    """3x3 stride-1 conv of a band: the whole band with zero padding, then its first and last rows redone
    from 3-row strips that include the neighbours' rows. No copy of the band; the halo exchange runs while
    the big convolution does."""
    if shard.world == 1:
        return conv(x)
    if x.shape[2] < 2:
        above, below = exchange_halo(x, shard)
        return F.conv2d(
            torch.cat([edge_row(above, x), x, edge_row(below, x)], dim=2), conv.weight, conv.bias, padding=(0, 1)
        )
    pending = exchange_halo(x, shard, async_op=True)
    y = conv(x)
    above, below = pending()
    if above is not None:
        y[:, :, :1] = F.conv2d(torch.cat([above, x[:, :, :2]], dim=2), conv.weight, conv.bias, padding=(0, 1))
    if below is not None:
        y[:, :, -1:] = F.conv2d(torch.cat([x[:, :, -2:], below], dim=2), conv.weight, conv.bias, padding=(0, 1))
    return y


def edge_row(row: Tensor | None, x: Tensor) -> Tensor:
    return row if row is not None else x.new_zeros(x.shape[0], x.shape[1], 1, x.shape[3])


def downsample(conv: nn.Conv2d, x: Tensor, shard: Shard) -> Tensor:
    """Stride-2 conv after (0,1,0,1) padding. Bands start on even rows, so only the last output row reads
    past the band: it is redone with the row below from the next rank."""
    pending = exchange_halo(x, shard, async_op=True) if shard.world > 1 else None
    y = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, conv.bias, stride=2)
    if pending is not None:
        _, below = pending()
        if below is not None:
            strip = F.pad(torch.cat([x[:, :, -2:], below], dim=2), (0, 1, 0, 0))
            y[:, :, -1:] = F.conv2d(strip, conv.weight, conv.bias, stride=2)
    return y


def group_norm(norm: nn.GroupNorm, x: Tensor, shard: Shard, silu: bool = False) -> Tensor:
    mean, var = group_stats(x, norm.num_groups, shard)  # [B, G] fp32
    y = kernels.group_norm_apply(x, mean, torch.rsqrt(var + norm.eps), norm.weight, norm.bias, norm.num_groups, silu)
    shard.on_layer()
    return y


def resnet(block: ResnetBlock, x: Tensor, shard: Shard) -> Tensor:
    h = conv3x3(block.conv1, group_norm(block.norm1, x, shard, silu=True), shard)
    h = conv3x3(block.conv2, group_norm(block.norm2, h, shard, silu=True), shard)
    if hasattr(block, "nin_shortcut"):
        x = block.nin_shortcut(x)
    return x + h


def attention(attn: AttnBlock, x: Tensor, shard: Shard) -> Tensor:
    """Exact global attention with queries sharded by rows: K/V of every rank, Q of this band only."""
    B, C, H, W = x.shape
    h = to_tokens(group_norm(attn.norm, x, shard))  # [B, H*W, C]
    q = linear_1x1(attn.q, h)  # [B, H*W, C]
    k = gather_tokens(linear_1x1(attn.k, h), shard)  # [B, L, C]
    v = gather_tokens(linear_1x1(attn.v, h), shard)  # [B, L, C]
    # On GPUs the GEMM form beats the flash kernel at D = 512 (kernels/gemm_attention.py); "flash" compares.
    use_gemm = q.is_cuda and os.environ.get(ATTENTION_SWITCH, "gemm") == "gemm"
    h = (kernels.gemm_attention if use_gemm else kernels.attention)(q, k, v)  # [B, H*W, C]
    return x + from_tokens(linear_1x1(attn.proj_out, h), H, W)


def mid(block: MidBlock, x: Tensor, shard: Shard) -> Tensor:
    x = resnet(block.block_1, x, shard)
    x = attention(block.attn_1, x, shard)
    return resnet(block.block_2, x, shard)


def encoder_forward(enc: Encoder, x: Tensor, shard: Shard) -> Tensor:
    h = conv3x3(enc.conv_in, x, shard)
    for stage in enc.down:
        for block in stage.block:
            h = resnet(block, h, shard)
        if hasattr(stage, "downsample"):
            h = downsample(stage.downsample.conv, h, shard)
    h = mid(enc.mid, h, shard)
    return conv3x3(enc.conv_out, group_norm(enc.norm_out, h, shard, silu=True), shard)


def decoder_forward(dec: Decoder, z: Tensor, shard: Shard) -> Tensor:
    h = mid(dec.mid, conv3x3(dec.conv_in, z, shard), shard)
    for stage in reversed(dec.up):
        for block in stage.block:
            h = resnet(block, h, shard)
        if hasattr(stage, "upsample"):
            h = conv3x3(stage.upsample.conv, F.interpolate(h, scale_factor=2.0, mode="nearest"), shard)
    return conv3x3(dec.conv_out, group_norm(dec.norm_out, h, shard, silu=True), shard)


def encode_band(ae: AutoEncoder, x: Tensor, shard: Shard) -> Tensor:
    """This rank's rows of the posterior mean: [B, 3, rows, W] in [-1, 1] -> [B, z, rows/8, W/8]."""
    moments = encoder_forward(ae.encoder, x, shard)
    if ae.params.has_quant_conv:
        moments = ae.quant_conv(moments)
    return moments[:, : ae.params.z_channels]


def decode_band(ae: AutoEncoder, z: Tensor, shard: Shard) -> Tensor:
    """This rank's rows of the image: raw latent [B, z, rows, w] -> [B, 3, 8*rows, 8*w]."""
    if ae.params.has_quant_conv:
        z = ae.post_quant_conv(z)
    return decoder_forward(ae.decoder, z, shard)


def count_layers(ae: AutoEncoder, op: str) -> int:
    """How many times `Shard.on_layer` fires in one band forward (for progress)."""
    part = ae.encoder if op == "encode" else ae.decoder
    return sum(isinstance(m, nn.GroupNorm) for m in part.modules())
