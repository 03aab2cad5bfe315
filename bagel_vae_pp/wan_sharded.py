"""Band-parallel forward of the Wan 2.1 and 2.2 VAEs: each rank runs the same modules on its own rows of every frame.

Mirrors the walk of `wan.py`, chunk by chunk in time as there, replacing what looks beyond a row band. The 3x3x3
convs take one halo row from each neighbour (zero rows only at the true image edge), all frames of the chunk in one
exchange, and their causal cache keeps the band with those halo rows, so a cached frame never travels again. The
spatial resamples run `sharded.py`'s halo convs on each frame (the upsample as folded 2x2 phase convs, the
downsample redoing its last row). Mid-block attention keeps this band's queries and gathers every rank's keys and
values, frame by frame. RMS norm, the 1x1x1 shortcuts and the time convs (1x1 in space) need nothing from other
ranks: no statistics cross rows; nor do Wan 2.2's 2x2 fold and unfold or its level shortcuts, whose 2-row groups
never straddle a band edge (bands are multiples of 16 pixels). With one rank this is the plain forward.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .autoencoder import from_tokens, linear_1x1, to_tokens
from .collectives import Shard, exchange_rows, gather_tokens
from .sharded import downsample, upsample_conv
from .video_layout import keep_layout
from .wan import (
    AttentionBlock,
    Cache,
    Resample,
    ResidualBlock,
    WanVAE,
    causal_conv,
    downsample_time,
    frames,
    patchify,
    unframes,
    unpatchify,
    upsample_time,
)
from .wan22 import DownBlock, UpBlock


def band_conv(conv, x: Tensor, cache: Cache, shard: Shard) -> Tensor:
    if shard.world == 1 or conv.kernel_size[1] == 1:
        return causal_conv(conv, x, cache)
    return causal_conv(conv, x, cache, halo=exchange_rows(x, shard))


def resblock(block: ResidualBlock, x: Tensor, cache: Cache, shard: Shard) -> Tensor:
    r = block.residual
    h = band_conv(r[2], r[0](x, silu=True), cache, shard)
    h = band_conv(r[6], r[3](h, silu=True), cache, shard)
    return h + block.skip(x)


def attention(attn: AttentionBlock, x: Tensor, cache: Cache, shard: Shard) -> Tensor:
    """Exact per-frame attention with queries sharded by rows: K/V of every rank's rows of the same frame."""
    B, C, T, H, W = x.shape
    h = to_tokens(attn.norm(frames(x)))  # [B*T, H*W, C]
    q, k, v = linear_1x1(attn.to_qkv, h).chunk(3, dim=-1)  # [B*T, H*W, C] each
    k, v = gather_tokens(k.contiguous(), shard), gather_tokens(v.contiguous(), shard)  # [B*T, L, C]
    h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # [B*T, H*W, C]
    return x + unframes(from_tokens(linear_1x1(attn.proj, h), H, W), T)


def resample(res: Resample, x: Tensor, cache: Cache, shard: Shard) -> Tensor:
    if res.up and res.temporal:
        x = upsample_time(res.time_conv, x, cache)
    T, conv = x.shape[2], res.resample[1]
    f = upsample_conv(conv, frames(x), shard) if res.up else downsample(conv, frames(x), shard)
    x = keep_layout(unframes(f, T), x)  # CPU convs and pads may drop it
    if not res.up and res.temporal:
        x = downsample_time(res.time_conv, x, cache)
    return x


def down_block(block: DownBlock, x: Tensor, cache: Cache, shard: Shard) -> Tensor:
    """Wan 2.2: the level's layers plus its averaging shortcut (2x2 groups: band edges are even here)."""
    return run_layers(block.downsamples, x, cache, shard) + block.shortcut(x, cache)


def up_block(block: UpBlock, x: Tensor, cache: Cache, shard: Shard) -> Tensor:
    h = run_layers(block.upsamples, x, cache, shard)
    return h + block.shortcut(x, cache) if block.up else h


LAYERS = {
    ResidualBlock: resblock,
    AttentionBlock: attention,
    Resample: resample,
    DownBlock: down_block,
    UpBlock: up_block,
}


def run_layers(layers, x: Tensor, cache: Cache, shard: Shard) -> Tensor:
    for layer in layers:
        x = LAYERS[type(layer)](layer, x, cache, shard)
    return x


def decode_chunk(vae: WanVAE, z: Tensor, cache: Cache, shard: Shard) -> Tensor:
    """One decode chunk (wan.decode_chunks) of this rank's rows, [B, z, n, rows, w] raw -> [B, 3, 1 (the first
    chunk, one frame) or 4n, s*rows, s*w]."""
    dec = vae.decoder
    x = band_conv(dec.conv1, causal_conv(vae.conv2, z, cache), cache, shard)
    x = run_layers((*dec.middle, *dec.upsamples), x, cache, shard)
    return unpatchify(band_conv(dec.head[2], dec.head[0](x, silu=True), cache, shard), vae.params.patch)


def encode_chunk(vae: WanVAE, x: Tensor, cache: Cache, shard: Shard) -> Tensor:
    """One encode chunk of this rank's rows (frame 0, then 4 frames), [B, 3, n, rows, W] in [-1, 1] -> the
    posterior mean's frames [B, z, 1, rows/s, W/s] (rows: a multiple of s)."""
    enc = vae.encoder
    x = band_conv(enc.conv1, keep_layout(patchify(x, vae.params.patch), x), cache, shard)
    x = run_layers((*enc.downsamples, *enc.middle), x, cache, shard)
    return vae.mean(band_conv(enc.head[2], enc.head[0](x, silu=True), cache, shard))
