"""Band-parallel forward of the autoencoder: each rank runs the same modules on its own rows.

Mirrors `autoencoder.py` layer by layer, replacing the three operations that look beyond a row band:
3x3 convolutions take halo rows from the neighbours (zero padding only at the true image edge; the decoder's
nearest-2x + 3x3 conv runs as one folded 2x2 conv per output phase, at a quarter of the pixels),
GroupNorm uses statistics merged over all ranks, and mid-block attention lets each rank's query rows
attend to keys/values gathered from every rank. With one rank this is the plain forward.

The walk itself (`mid`, `encoder_forward`, `decoder_forward`) takes its layer operations from a `BandLayers`:
IMAGE_BAND's here, HunyuanVideo's 3-D ones in `hunyuan_sharded.py`, which runs the same module structure.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

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

ATTENTION_SWITCH = "BAGEL_VAE_PP_ATTENTION"  # "split" (default on GPUs), "gemm" or "flash"
ATTENTION_FORMS = {"gemm": kernels.gemm_attention, "split": kernels.split_attention, "flash": kernels.attention}


def conv3x3(conv: nn.Conv2d, x: Tensor, shard: Shard, with_bias: bool = True) -> Tensor:
    """3x3 stride-1 conv of a band: the whole band with zero padding, then its first and last rows redone
    from 3-row strips that include the neighbours' rows. No copy of the band; the halo exchange runs while
    the big convolution does. Without `with_bias` the conv's bias is left for the caller to fold in."""
    bias = conv.bias if with_bias else None
    if shard.world == 1:
        return F.conv2d(x, conv.weight, bias, padding=1)
    if x.shape[2] < 2:
        above, below = exchange_halo(x, shard)
        return F.conv2d(
            torch.cat([edge_row(above, x), x, edge_row(below, x)], dim=2), conv.weight, bias, padding=(0, 1)
        )
    pending = exchange_halo(x, shard, async_op=True)
    y = F.conv2d(x, conv.weight, bias, padding=1)
    above, below = pending()
    if above is not None:
        y[:, :, :1] = F.conv2d(torch.cat([above, x[:, :, :2]], dim=2), conv.weight, bias, padding=(0, 1))
    if below is not None:
        y[:, :, -1:] = F.conv2d(torch.cat([x[:, :, -2:], below], dim=2), conv.weight, bias, padding=(0, 1))
    return y


def upsample_conv(conv: nn.Conv2d, x: Tensor, shard: Shard) -> Tensor:
    """conv(nearest2x(x)) of a band, without the 2x-upsampled input: nearest-2x repeats each pixel, so output
    phase (a, b) in {0,1}² is a 2x2 conv of x whose taps are sums of the 3x3 taps (16 per input pixel instead
    of 36). The four phases run as one conv with 4*Co outputs; Z = conv2d(x, K, padding=1) is [B, 4*Co, H+1,
    W+1] and Y[2i+a, 2j+b] = Z[i+a, j+b] in phase 2a+b's channels.

    Only Z's first row reads the row above the band, and only its last row the row below: as in conv3x3 the
    band runs with zero padding while the halo travels, then those two rows are redone from 2-row strips. For
    a 1-row band they are still two distinct rows, so it needs no special path.
    """
    fmt = torch.channels_last if kernels.is_nhwc(x) else torch.contiguous_format  # the output keeps x's layout
    weight = fold_phases(conv.weight).to(conv.weight.dtype, memory_format=fmt)  # [4*Co, C, 2, 2]
    pending = exchange_halo(x, shard, async_op=True)
    z = F.conv2d(x, weight, padding=1)  # [B, 4*Co, H+1, W+1]; the bias is added while interleaving
    above, below = pending()
    if above is not None:
        z[:, :, :1] = F.conv2d(torch.cat([above, x[:, :, :1]], dim=2), weight, padding=(0, 1))
    if below is not None:
        z[:, :, -1:] = F.conv2d(torch.cat([x[:, :, -1:], below], dim=2), weight, padding=(0, 1))
    return kernels.interleave_phases(z.contiguous(memory_format=fmt), conv.bias)  # [B, Co, 2H, 2W], as x


def fold_phases(w: Tensor) -> Tensor:
    """3x3 weights [Co, C, 3, 3] -> the four phases' 2x2 weights [4*Co, C, 2, 2], phase 2a+b major.

    Summed in (at least) fp32 so that the caller's cast rounds each folded weight once."""
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    w = fold_taps(w, 2)  # [2 (a), Co, C, 2, 3]
    w = fold_taps(w, 4)  # [2 (b), 2 (a), Co, C, 2, 2]
    return w.transpose(0, 1).flatten(0, 2)


def fold_taps(w: Tensor, dim: int) -> Tensor:
    """Taps (0, 1, 2) along `dim` -> phase 0's (0, 1+2) and phase 1's (0+1, 2), stacked in a new dim 0.

    Output row 2i reads input rows (i-1, i, i) through taps (0, 1, 2), row 2i+1 reads (i, i, i+1)."""
    t0, t1, t2 = w.unbind(dim)
    return torch.stack([torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)])


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


def group_norm(norm: nn.GroupNorm, x: Tensor, shard: Shard, silu: bool = False, x_bias: Tensor | None = None):
    """norm(x + x_bias) (x_bias: [C], the bias its conv left out, or None), SiLU after it if asked."""
    x, x_bias = kernels.with_conv_bias(x, x_bias)
    mean, var = group_stats(x, norm.num_groups, shard, x_bias)  # [B, G] fp32
    rstd = torch.rsqrt(var + norm.eps)
    y = kernels.group_norm_apply(x, mean, rstd, norm.weight, norm.bias, norm.num_groups, silu, x_bias=x_bias)
    shard.on_layer()
    return y


def resnet(block: ResnetBlock, x: Tensor, shard: Shard) -> Tensor:
    # The convs leave out their bias (cuDNN adds one in a slow pass of its own over a channels_last output):
    # conv1's is folded into norm2, conv2's (and the shortcut's) into the closing sum.
    h = conv3x3(block.conv1, group_norm(block.norm1, x, shard, silu=True), shard, with_bias=False)
    h = group_norm(block.norm2, h, shard, silu=True, x_bias=block.conv1.bias)
    h = conv3x3(block.conv2, h, shard, with_bias=False)
    bias = block.conv2.bias
    if hasattr(block, "nin_shortcut"):
        x = F.conv2d(x, block.nin_shortcut.weight)
        bias = bias + block.nin_shortcut.bias
    return kernels.residual_add_(h, x, bias)


def attention(attn: AttnBlock, x: Tensor, shard: Shard, attend: Callable | None = None) -> Tensor:
    """Exact global attention with queries sharded by rows: K/V of every rank (of all frames, for a video), Q of
    this band only. attend: one head's softmax(q k^T / sqrt(C)) v; None (the image VAEs) picks the kernels' form."""
    h = to_tokens(group_norm(attn.norm, x, shard))  # [B, L, C]: this band's H*W (T*H*W) positions
    q = linear_1x1(attn.q, h)  # [B, L, C]
    k = gather_tokens(linear_1x1(attn.k, h), shard)  # [B, L_all, C]: rank-major (softmax is blind to key order)
    v = gather_tokens(linear_1x1(attn.v, h), shard)  # [B, L_all, C]
    if attend is None:
        # At D = 512 on an H100 the split form (two Triton GEMMs, bf16 probabilities stored once) ran 1.77x the GEMM
        # form (cuBLAS around an fp32 score matrix), which ran 1.5x the flash kernel (bench/attention_forms.py).
        # The form is picked wherever the kernels run (so the interpreted tests walk the GPUs' path); elsewhere
        # SDPA. Every form sends only bf16/fp16 into its half-precision kernels: fp32 stays fp32, probabilities
        # included.
        switch = os.environ.get(ATTENTION_SWITCH, "split")
        attend = ATTENTION_FORMS[switch] if kernels.is_available(q.device) else kernels.attention
    h = attend(q, k, v)  # [B, L, C]
    return x + from_tokens(linear_1x1(attn.proj_out, h), *x.shape[2:])


@dataclass(frozen=True)
class BandLayers:
    """How a band runs each kind of layer of the LDM structure; the walk below is the same for every model built
    on `autoencoder.Encoder` / `Decoder`. Each takes (layer, x, shard)."""

    conv: Callable  # a 3x3 (3x3x3) conv keeping the size: conv_in, conv_out
    resnet: Callable  # a ResnetBlock
    attention: Callable  # the mid block's AttnBlock
    downsample: Callable  # an encoder level's Downsample's conv: all that either model needs of it
    upsample: Callable  # a decoder level's Upsample (HunyuanVideo's says whether it doubles time)


IMAGE_BAND = BandLayers(
    conv=conv3x3,
    resnet=resnet,
    attention=attention,
    downsample=downsample,
    upsample=lambda layer, x, shard: upsample_conv(layer.conv, x, shard),
)


def mid(block: MidBlock, x: Tensor, shard: Shard, layers: BandLayers = IMAGE_BAND) -> Tensor:
    x = layers.resnet(block.block_1, x, shard)
    x = layers.attention(block.attn_1, x, shard)
    return layers.resnet(block.block_2, x, shard)


def encoder_forward(enc: Encoder, x: Tensor, shard: Shard, layers: BandLayers = IMAGE_BAND) -> Tensor:
    h = layers.conv(enc.conv_in, x, shard)
    for stage in enc.down:
        for block in stage.block:
            h = layers.resnet(block, h, shard)
        if hasattr(stage, "downsample"):
            h = layers.downsample(stage.downsample.conv, h, shard)
    h = mid(enc.mid, h, shard, layers)
    return layers.conv(enc.conv_out, group_norm(enc.norm_out, h, shard, silu=True), shard)


def decoder_forward(dec: Decoder, z: Tensor, shard: Shard, layers: BandLayers = IMAGE_BAND) -> Tensor:
    h = mid(dec.mid, layers.conv(dec.conv_in, z, shard), shard, layers)
    for stage in reversed(dec.up):
        for block in stage.block:
            h = layers.resnet(block, h, shard)
        if hasattr(stage, "upsample"):
            h = layers.upsample(stage.upsample, h, shard)
    return layers.conv(dec.conv_out, group_norm(dec.norm_out, h, shard, silu=True), shard)


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


def count_layers(ae: nn.Module, op: str) -> int:
    """How many times `Shard.on_layer` fires in one band forward of `ae` (an AutoEncoder or HunyuanVideoVAE): once
    per GroupNorm, for progress."""
    part = ae.encoder if op == "encode" else ae.decoder
    return sum(isinstance(m, nn.GroupNorm) for m in part.modules())
