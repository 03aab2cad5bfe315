"""The HunyuanVideo VAE, as ComfyUI's VAE Loader holds it and `comfy.sd.VAE` runs it.

ComfyUI builds it as the LDM autoencoder of `autoencoder.py` with 3-D convs (its `conv3d=True, time_compress=4`),
and so do we: `autoencoder.Encoder` / `Decoder` built of `video_layers`. Module names are the LDM ones with each
3x3x3 conv one level deeper (`decoder.conv_in.conv.weight`, `decoder.mid.block_1.conv1.conv.weight`,
`decoder.up.2.upsample.conv.conv.weight`; the mid-block attention's 1x1x1 convs are plain:
`decoder.mid.attn_1.q.weight`). The configuration is read off the weights; the time compression (4) is ComfyUI's
constant, not in them.

What the row split has to honour, all as ComfyUI computes it:
- every 3x3x3 conv pads by replicating: the edge row and column on each side, and the first frame twice before
  it (causal in time: output frame t sees input frames t-2..t, clamped at 0);
- GroupNorm (32 groups) normalises over all frames and rows at once: the whole video is one forward, no chunks;
- a temporal downsample (encoder levels 1 and 2) is a stride-2 conv after the same replicate padding, a spatial
  one (level 0) strides rows and columns only; a temporal upsample (decoder levels 2 and 1) doubles every frame
  but the first, by nearest neighbour, before its conv; level 3 upsamples rows and columns only;
- the mid-block attention is one head over all T*H*W positions with no mask. The original HunyuanVideo VAE
  (diffusers' AutoencoderKLHunyuanVideo) masks it causally by frame, so a position sees only its own and earlier
  frames; ComfyUI does not, and neither do we. It is computed in query chunks, so no T*H*W-square score matrix
  exists even on SDPA's math path.

Everything is in raw VAE space (the latent scale 0.476986 is the diffusion model's): encode returns the posterior
mean, decode takes it back. This is the single-process reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autoencoder import Decoder, Encoder, Layers, describe_keys, ldm_sizes, randomized

TIME_COMPRESS = 4  # ComfyUI's time_compress for this VAE: frames = 1 + 4 (latent frames - 1)
# Score elements per query chunk in attention: 256 Mi (1 GiB in fp32) should SDPA fall back to its math path.
SCORE_BUDGET = 1 << 28


@dataclass(frozen=True)
class HunyuanVideoParams:
    in_channels: int  # video channels (3)
    out_ch: int  # decoded channels (3)
    ch: int  # base width (128)
    ch_mult: tuple[int, ...]  # width multiplier per resolution level ((1, 2, 4, 4))
    num_res_blocks: int  # resnets per encoder level; the decoder has one more
    z_channels: int  # latent channels (16)
    time_compress: int  # frames per latent frame after the first (ComfyUI: 4)
    has_encoder: bool
    has_decoder: bool

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def time_scale(self) -> int:
        return self.time_compress

    @property
    def time_levels(self) -> int:
        return int(math.log2(self.time_compress))

    def encoder_halves_time(self, level: int) -> bool:
        """Whether encoder level `level`'s downsample strides time too: the last `time_levels` ones do."""
        return len(self.ch_mult) - 1 - level <= self.time_levels

    def decoder_doubles_time(self, level: int) -> bool:
        """Whether decoder level `level`'s upsample doubles time: levels 1..time_levels (not the mirror of the
        encoder: ComfyUI's rule, kept)."""
        return level <= self.time_levels

    def frames_out(self, latent_frames: int) -> int:
        return 1 + self.time_compress * (latent_frames - 1)

    def latent_frames(self, frames: int) -> int:
        """Each temporal downsample takes T frames to (T - 1) // 2 + 1 (2 replicated frames before, stride 2)."""
        for _ in range(self.time_levels):
            frames = (frames - 1) // 2 + 1
        return frames


class VideoConv3d(nn.Module):
    """A 3-D conv whose padding is done by `video_conv` (the weights sit one level down, as in ComfyUI)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int | tuple[int, int, int] = 1):
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return video_conv(self.conv, x)


def video_conv(conv: nn.Conv3d, x: Tensor, halo: tuple[Tensor | None, Tensor | None] | None = None) -> Tensor:
    """conv over x [B, C, T, H, W] after replicate padding: 1 row and column each side, k-1 copies of the first
    frame before it. A 1x1x1 conv is unpadded.

    halo: for a row band, (rows above, rows below) [B, C, T, 1, W] from the neighbours, None at the true image
    edge, where the edge row replicates as for the whole video.
    """
    kt = conv.kernel_size[0]
    if kt == 1:
        return F.conv3d(x, conv.weight, conv.bias, stride=conv.stride)
    if halo is None:
        x = F.pad(x, (1, 1, 1, 1, kt - 1, 0), mode="replicate")
    else:
        above = halo[0] if halo[0] is not None else x[:, :, :, :1]
        below = halo[1] if halo[1] is not None else x[:, :, :, -1:]
        x = F.pad(torch.cat([above, x, below], dim=3), (1, 1, 0, 0, kt - 1, 0), mode="replicate")
    return F.conv3d(x, conv.weight, conv.bias, stride=conv.stride)


def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(C)) v for one head, q [B, Lq, C], k and v [B, L, C]: queries in chunks whose score
    block stays within SCORE_BUDGET, so the square is never built whatever kernel SDPA picks."""
    out = torch.empty_like(q)
    step = max(1, SCORE_BUDGET // max(1, k.shape[1] * q.shape[0]))
    for i in range(0, q.shape[1], step):
        chunk = F.scaled_dot_product_attention(q[:, None, i : i + step], k[:, None], v[:, None])  # [B, 1, n, C]
        out[:, i : i + step] = chunk[:, 0]
    return out


class Downsample(nn.Module):
    """3x3x3 conv of stride 2 in rows and columns (and in time when `temporal`), after the replicate padding."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.conv = VideoConv3d(channels, channels, stride=(2 if temporal else 1, 2, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def upsample_nearest(x: Tensor, temporal: bool) -> Tensor:
    """[B, C, T, H, W] -> [B, C, T', 2H, 2W] by repetition; with `temporal` each frame but the first twice
    (T' = 2T - 1: frames 0, 1, 1, 2, 2, ...)."""
    x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
    if temporal:
        x = x.index_select(2, torch.arange(1, 2 * x.shape[2], device=x.device) // 2)
    return x


class Upsample(nn.Module):
    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = VideoConv3d(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(upsample_nearest(x, self.temporal))


def video_layers(p: HunyuanVideoParams) -> Layers:
    """The LDM structure's layers in 3-D, as ComfyUI builds this VAE: replicate-padded 3x3x3 convs, 1x1x1 ones in
    the attention, resampling in time at the levels `p` says, attention in query chunks."""
    return Layers(
        conv=VideoConv3d,
        shortcut=partial(VideoConv3d, kernel=1),
        linear=partial(nn.Conv3d, kernel_size=1),
        attend=attend,
        downsample=lambda channels, level: Downsample(channels, p.encoder_halves_time(level)),
        upsample=lambda channels, level: Upsample(channels, p.decoder_doubles_time(level)),
    )


class HunyuanVideoVAE(nn.Module):
    def __init__(self, params: HunyuanVideoParams):
        super().__init__()
        self.params = params
        z = params.z_channels
        layers = video_layers(params)
        if params.has_encoder:
            self.encoder = Encoder(params, layers)
            self.quant_conv = nn.Conv3d(2 * z, 2 * z, 1)
        if params.has_decoder:
            self.decoder = Decoder(params, layers)
            self.post_quant_conv = nn.Conv3d(z, z, 1)

    def mean(self, moments: Tensor) -> Tensor:
        """The posterior mean: quant_conv's first z output channels (the log-variance half is never needed)."""
        z = self.params.z_channels
        return F.conv3d(moments, self.quant_conv.weight[:z], self.quant_conv.bias[:z])

    def encode(self, x: Tensor) -> Tensor:
        """Video [B, 3, T, H, W] in [-1, 1] (H, W multiples of 8) -> posterior mean [B, z, latent_frames(T), H/8,
        W/8]."""
        return self.mean(self.encoder(x))

    def decode(self, z: Tensor) -> Tensor:
        """Latent [B, z, T, h, w] in raw VAE space -> video [B, 3, 1 + 4(T-1), 8h, 8w], nominally in [-1, 1]."""
        return self.decoder(F.conv3d(z, self.post_quant_conv.weight, self.post_quant_conv.bias))


def detect_params(sd: dict[str, Tensor]) -> HunyuanVideoParams:
    """Read the configuration off a HunyuanVideo VAE state dict (ComfyUI's keys, prefixes already stripped)."""
    if "encoder.conv_in.conv.weight" not in sd and "decoder.conv_in.conv.weight" not in sd:
        raise ValueError(
            f"vae: no 'encoder.conv_in.conv.weight' or 'decoder.conv_in.conv.weight' in this HunyuanVideo VAE "
            f"({describe_keys(sd)})."
        )
    return HunyuanVideoParams(**ldm_sizes(sd, ".conv", "HunyuanVideo VAE"), time_compress=TIME_COMPRESS)


# Named sizes for random-weight models: HunyuanVideo's own (as comfy/sd.py builds it) and the tests' tiny one.
CONFIGS = {
    "hunyuan-video": HunyuanVideoParams(3, 3, 128, (1, 2, 4, 4), 2, 16, TIME_COMPRESS, True, True),
    "tiny": HunyuanVideoParams(3, 3, 32, (1, 1, 2, 2), 1, 4, TIME_COMPRESS, True, True),
}


def random_hunyuan_video(name: str = "hunyuan-video", seed: int = 0) -> HunyuanVideoVAE:
    """A seeded random-weight HunyuanVideo VAE of a named size (`autoencoder.randomized`)."""
    return randomized(HunyuanVideoVAE(CONFIGS[name]), seed)
