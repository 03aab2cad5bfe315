"""Band-parallel forward of the HunyuanVideo VAE: each rank runs the same modules on its own rows of every frame.

The walk is `sharded.py`'s (the model is the LDM structure with 3-D layers, and runs the whole video in one
forward, as ComfyUI does); VIDEO_BAND replaces what looks beyond a row band. The 3x3x3 convs take one halo row
from each neighbour, all frames in one exchange; only the true image edge replicates its own row (`video_conv`'s
halo). The stride-2 downsamples need no special case: bands start on rows even at every level (encode bands are
multiples of 8 pixels), so with one halo row above, the band's windows are the whole conv's. The upsample repeats
the band's own rows and frames, then convolves with the neighbours' repeated rows as halo. GroupNorm statistics
(over all frames and rows) merge across ranks in fp32 (`sharded.group_norm`), and the mid-block attention keeps
this band's queries and gathers every rank's keys and values over all frames: each rank scores its queries
against all T*H*W keys, in query chunks (`attend`), never the square. With one rank this is the plain forward.
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from .autoencoder import ResnetBlock
from .collectives import Shard, exchange_rows
from .hunyuan_video import HunyuanVideoVAE, Upsample, attend, upsample_nearest, video_conv
from .sharded import BandLayers, attention, decoder_forward, encoder_forward, group_norm
from .sharded import count_layers as count_layers  # the same count: one per GroupNorm


def band_conv(conv: nn.Module, x: Tensor, shard: Shard) -> Tensor:
    """A VideoConv3d (or its inner Conv3d) on a band: halo rows from the neighbours, replicated rows at the edge."""
    conv = getattr(conv, "conv", conv)
    if shard.world == 1 or conv.kernel_size[1] == 1:
        return video_conv(conv, x)
    return video_conv(conv, x, halo=exchange_rows(x, shard))


def resnet(block: ResnetBlock, x: Tensor, shard: Shard) -> Tensor:
    # Each conv adds its own bias: `sharded.resnet` folds them into its 2-D kernels' passes, which round otherwise.
    h = band_conv(block.conv1, group_norm(block.norm1, x, shard, silu=True), shard)
    h = band_conv(block.conv2, group_norm(block.norm2, h, shard, silu=True), shard)
    if hasattr(block, "nin_shortcut"):
        x = band_conv(block.nin_shortcut, x, shard)
    return x + h


def upsample(layer: Upsample, x: Tensor, shard: Shard) -> Tensor:
    return band_conv(layer.conv, upsample_nearest(x, layer.temporal), shard)


VIDEO_BAND = BandLayers(
    conv=band_conv,
    resnet=resnet,
    attention=partial(attention, attend=attend),
    downsample=band_conv,
    upsample=upsample,
)


def decode_band(vae: HunyuanVideoVAE, z: Tensor, shard: Shard) -> Tensor:
    """This rank's rows of every frame: raw latent [B, z, T, rows, w] -> [B, 3, 1 + 4(T-1), 8*rows, 8*w]."""
    h = F.conv3d(z, vae.post_quant_conv.weight, vae.post_quant_conv.bias)
    return decoder_forward(vae.decoder, h, shard, VIDEO_BAND)


def encode_band(vae: HunyuanVideoVAE, x: Tensor, shard: Shard) -> Tensor:
    """This rank's rows of the posterior mean: [B, 3, T, rows, W] in [-1, 1] (rows: a multiple of 8) ->
    [B, z, latent_frames(T), rows/8, W/8]."""
    return vae.mean(encoder_forward(vae.encoder, x, shard, VIDEO_BAND))
