"""The Wan 2.1 video VAE (Wan 2.1, Wan 2.2-14B, Qwen-Image), as ComfyUI's VAE Loader holds it.

Module names mirror the keys `comfy.sd.VAE` sees (`decoder.middle.0.residual.0.gamma`,
`encoder.downsamples.3.time_conv.weight`, `conv1.weight`, ...), so a state dict loads with `strict=True`; the
configuration (width, latent channels, levels, which levels resample time) is read off the weights.

Time is causal: a 3-D conv's output frame t sees input frames t-2, t-1, t (zero frames before the first). The model
runs chunk by chunk as ComfyUI's `comfy/ldm/wan/vae.py` does (decode: one latent frame per chunk; encode: the first
frame, then 4 at a time), each temporal conv keeping in a cache the input frames its next windows reach back to.
Two effects of that chunking are part of the output and are kept: a temporal upsample passes its first chunk
through without its time conv (frame 0 is not doubled, and the later windows see zeros in its place), and a
temporal downsample passes its first frame through, then runs stride-2 windows starting at that frame.

Everything is in ComfyUI's raw VAE space: Wan's latent mean/std live in the diffusion model's latent format, not
in the VAE, so core VAE Decode feeds the LATENT straight in. This is the single-process reference;
`wan_sharded.py` walks the same modules band by band.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .autoencoder import describe_keys, from_tokens, linear_1x1, to_tokens
from .video_layout import cat_frames, empty_as, interleave_halves, keep_layout

Cache = dict  # temporal conv -> the input frames its next chunk's windows reach back to (None: zeros)


@dataclass(frozen=True)
class WanParams:
    dim: int  # encoder base width (Wan 2.1: 96, Wan 2.2: 160)
    decoder_dim: int  # decoder base width (Wan 2.1: the same, Wan 2.2: 256)
    z_channels: int  # latent channels (ComfyUI's z_dim: 16, Wan 2.2: 48)
    dim_mult: tuple[int, ...]  # width multiplier per resolution level ((1, 2, 4, 4))
    num_res_blocks: int  # residual blocks per encoder level; the decoder has one more
    temporal_down: tuple[bool, ...]  # per encoder level but the last: its downsample halves time too
    patch: int  # pixels per side folded into channels before the encoder (Wan 2.1: 1, Wan 2.2: 2)
    has_encoder: bool
    has_decoder: bool

    @property
    def downscale(self) -> int:
        return self.patch * 2 ** (len(self.dim_mult) - 1)

    @property
    def time_scale(self) -> int:
        return 2 ** sum(self.temporal_down)

    def frames_out(self, latent_frames: int) -> int:
        return 1 + self.time_scale * (latent_frames - 1)

    def latent_frames(self, frames: int) -> int:
        """Encode: the first frame, then whole chunks of time_scale frames; a partial chunk is dropped (as core)."""
        return 1 + (frames - 1) // self.time_scale


def time_chunks(frames: int, step: int) -> list[tuple[int, int]]:
    """Encode chunks: [0, 1), then [1 + step*i, 1 + step*(i+1)) while whole."""
    return [(0, 1)] + [(1 + step * i, 1 + step * (i + 1)) for i in range((frames - 1) // step)]


def decode_chunks(frames: int, step: int) -> list[tuple[int, int]]:
    """Decode chunks of latent frames: [0, 1) alone (a temporal upsample passes its first chunk through), then `step`
    at a time, the last one possibly shorter. Any step gives ComfyUI's frames (step 1, as it runs): the caches carry
    every causal window across chunk ends, and nothing else looks across frames. A larger step runs fewer, larger
    convs at more activation memory."""
    return [(0, 1)] + [(a, min(a + step, frames)) for a in range(1, frames, step)]


def conv3d(c_in: int, c_out: int) -> nn.Conv3d:
    return nn.Conv3d(c_in, c_out, 3, padding=(0, 1, 1))  # time is padded causally by causal_conv


def causal_conv(conv: nn.Conv3d, x: Tensor, cache: Cache, halo=None) -> Tensor:
    """The conv with a causal window in time: [B, C, T, H, W] -> [B, Co, T, H, W]. The frames before this chunk
    come from `cache` (zeros before the first chunk), which then keeps this chunk's last k-1 input frames.

    halo: for a row band, (row above, row below) [B, C, T, 1, W] (None at the image edge): the rows are padded
    with them instead of zeros, and the cache keeps them with the band, so no cached frame travels again.
    The past frames, the band and its halo rows are laid out in one buffer (one copy of x, in x's layout).
    """
    kt, kh, kw = conv.kernel_size
    past, rows = kt - 1, kh // 2 if halo is not None else 0
    if past or rows:
        B, C, T, H, W = x.shape
        buf = empty_as(x, (B, C, past + T, H + 2 * rows, W))
        buf[:, :, past:, rows : rows + H] = x
        if rows:
            fill(buf[:, :, past:, :1], halo[0])
            fill(buf[:, :, past:, -1:], halo[1])
        if past:
            fill(buf[:, :, :past], cache.get(conv))
            cache[conv] = buf[:, :, -past:].clone()
        x = buf
    return keep_layout(F.conv3d(x, conv.weight, conv.bias, padding=(0, kh // 2 - rows, kw // 2)), x)


def fill(dst: Tensor, src: Tensor | None) -> None:
    dst.copy_(src) if src is not None else dst.zero_()


def upsample_time(conv: nn.Conv3d, x: Tensor, cache: Cache) -> Tensor:
    """Double the frames: each causal window gives two frames, from the two halves of its 2C channels.

    The first chunk passes through untouched (marked in `cache` with None, so the next windows see zeros)."""
    if conv not in cache:
        cache[conv] = None
        return x
    return interleave_halves(causal_conv(conv, x, cache))  # [B, 2C, T, H, W] -> [B, C, 2T, H, W]


def downsample_time(conv: nn.Conv3d, x: Tensor, cache: Cache) -> Tensor:
    """Halve the frames with stride-2 windows of 3. The first chunk passes through; each later chunk's windows
    start at the last frame of the chunk before."""
    past = cache.get(conv)
    cache[conv] = x[:, :, -1:].clone()
    if past is None:
        return x
    return keep_layout(F.conv3d(cat_frames(past, x), conv.weight, conv.bias, stride=(2, 1, 1)), x)


def patchify(x: Tensor, p: int) -> Tensor:
    """[B, C, T, p*h, p*w] -> [B, C*p*p, T, h, w], channel c*p*p + j*p + i from pixel (row i, column j) of each
    p x p block (ComfyUI's `b c f (h q) (w r) -> b (c r q) f h w`)."""
    if p == 1:
        return x
    B, C, T, H, W = x.shape
    x = x.view(B, C, T, H // p, p, W // p, p).permute(0, 1, 6, 4, 2, 3, 5)  # [B, C, j, i, T, h, w]
    return x.reshape(B, C * p * p, T, H // p, W // p)


def unpatchify(x: Tensor, p: int) -> Tensor:
    if p == 1:
        return x
    B, C, T, h, w = x.shape
    x = x.view(B, C // (p * p), p, p, T, h, w).permute(0, 1, 4, 5, 3, 6, 2)  # [B, C', T, h, i, w, j]
    return x.reshape(B, C // (p * p), T, h * p, w * p)


def frames(x: Tensor) -> Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W], frames batch-major (as ComfyUI's `b c t h w -> (b t) c h w`)."""
    B, C, T, H, W = x.shape
    return x.transpose(1, 2).reshape(B * T, C, H, W)


def unframes(f: Tensor, T: int) -> Tensor:
    return f.view(f.shape[0] // T, T, *f.shape[1:]).transpose(1, 2)  # [B, C, T, H, W]


class RMSNorm(nn.Module):
    """x / |x| over channels at each position, times sqrt(C) * gamma: nothing crosses rows or frames. With `silu`,
    the SiLU that follows it in every residual block and head, in the same pass (kernels/channel_rms_norm.py)."""

    def __init__(self, dim: int, spatial_dims: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))  # [C, 1, 1(, 1)]

    def forward(self, x: Tensor, silu: bool = False) -> Tensor:
        return kernels.channel_rms_norm(x, self.gamma, silu)


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        # Indices as in the checkpoints: 1, 4 are SiLUs and 5 a dropout, none holding weights.
        self.residual = nn.Sequential(
            RMSNorm(c_in, 3), nn.SiLU(), conv3d(c_in, c_out), RMSNorm(c_out, 3), nn.SiLU(), nn.Identity(),
            conv3d(c_out, c_out),
        )  # fmt: skip
        if c_in != c_out:
            self.shortcut = nn.Conv3d(c_in, c_out, 1)

    def skip(self, x: Tensor) -> Tensor:
        return causal_conv(self.shortcut, x, {}) if hasattr(self, "shortcut") else x

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        r = self.residual
        h = causal_conv(r[2], r[0](x, silu=True), cache)
        h = causal_conv(r[6], r[3](h, silu=True), cache)
        return h + self.skip(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame, over its H*W positions."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        B, C, T, H, W = x.shape
        h = to_tokens(self.norm(frames(x)))  # [B*T, H*W, C]
        q, k, v = linear_1x1(self.to_qkv, h).chunk(3, dim=-1)  # [B*T, H*W, C] each
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + unframes(from_tokens(linear_1x1(self.proj, h), H, W), T)


class Resample(nn.Module):
    """Spatial 2x up (nearest + 3x3 conv to c_out channels) or down ((0,1,0,1) pad + stride-2 3x3 conv), per
    frame; with `temporal`, a time conv first doubles the frames (up) or afterwards halves them (down)."""

    def __init__(self, dim: int, c_out: int, up: bool, temporal: bool):
        super().__init__()
        self.up, self.temporal = up, temporal
        conv = nn.Conv2d(dim, c_out, 3, padding=1) if up else nn.Conv2d(dim, c_out, 3, stride=2)
        self.resample = nn.Sequential(nn.Identity(), conv)  # index 0: ComfyUI's weightless Upsample / ZeroPad2d
        if temporal:
            self.time_conv = nn.Conv3d(dim, 2 * dim, (3, 1, 1)) if up else nn.Conv3d(dim, dim, (3, 1, 1), (2, 1, 1))

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        if self.up and self.temporal:
            x = upsample_time(self.time_conv, x, cache)
        T, conv = x.shape[2], self.resample[1]
        if self.up:
            f = F.conv2d(F.interpolate(frames(x), scale_factor=2.0, mode="nearest"), conv.weight, conv.bias, padding=1)
        else:
            f = F.conv2d(F.pad(frames(x), (0, 1, 0, 1)), conv.weight, conv.bias, stride=2)
        x = keep_layout(unframes(f, T), x)  # CPU convs and pads may drop it
        if not self.up and self.temporal:
            x = downsample_time(self.time_conv, x, cache)
        return x


def mid_block(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def head(dim: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim, 3), nn.SiLU(), conv3d(dim, c_out))


class Encoder3d(nn.Module):
    def __init__(self, p: WanParams):
        super().__init__()
        widths = [p.dim * m for m in (1, *p.dim_mult)]
        self.conv1 = conv3d(3, widths[0])
        layers = []
        for level in range(len(p.dim_mult)):
            c_in, c_out = widths[level], widths[level + 1]
            layers += [ResidualBlock(c_in if i == 0 else c_out, c_out) for i in range(p.num_res_blocks)]
            if level != len(p.dim_mult) - 1:
                layers.append(Resample(c_out, c_out, up=False, temporal=p.temporal_down[level]))
        self.downsamples = nn.Sequential(*layers)
        self.middle = mid_block(widths[-1])
        self.head = head(widths[-1], 2 * p.z_channels)

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        x = causal_conv(self.conv1, x, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        return causal_conv(self.head[2], self.head[0](x, silu=True), cache)  # [B, 2z, T', h, w]: mean, log-variance


class Decoder3d(nn.Module):
    def __init__(self, p: WanParams):
        super().__init__()
        top = p.decoder_dim * p.dim_mult[-1]
        self.conv1 = conv3d(p.z_channels, top)
        self.middle = mid_block(top)
        layers, c_in = [], top
        temporal_up = p.temporal_down[::-1]
        for level, mult in enumerate(reversed(p.dim_mult)):
            c_out = p.decoder_dim * mult
            layers += [ResidualBlock(c_in if i == 0 else c_out, c_out) for i in range(p.num_res_blocks + 1)]
            if level != len(p.dim_mult) - 1:
                layers.append(Resample(c_out, c_out // 2, up=True, temporal=temporal_up[level]))
            c_in = c_out // 2  # the upsample's conv halves the channels
        self.upsamples = nn.Sequential(*layers)
        self.head = head(p.decoder_dim, 3)

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        x = causal_conv(self.conv1, x, cache)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache)
        return causal_conv(self.head[2], self.head[0](x, silu=True), cache)  # [B, 3, frames, H, W]


class WanVAE(nn.Module):
    """The Wan 2.1 VAE; with other encoder/decoder classes and a patch size, Wan 2.2's (wan22.py)."""

    encoder_class, decoder_class = Encoder3d, Decoder3d

    def __init__(self, params: WanParams):
        super().__init__()
        self.params = params
        z = params.z_channels
        if params.has_encoder:
            self.encoder = self.encoder_class(params)
            self.conv1 = nn.Conv3d(2 * z, 2 * z, 1)
        if params.has_decoder:
            self.conv2 = nn.Conv3d(z, z, 1)
            self.decoder = self.decoder_class(params)

    def mean(self, moments: Tensor) -> Tensor:
        """The posterior mean: conv1's first z output channels (the log-variance half is never needed)."""
        z = self.params.z_channels
        return F.conv3d(moments, self.conv1.weight[:z], self.conv1.bias[:z])

    def encode(self, x: Tensor) -> Tensor:
        """Video [B, 3, T, H, W] in [-1, 1] -> posterior mean [B, z, 1 + (T-1)//4, H/s, W/s] (s = downscale)."""
        x, cache = keep_layout(patchify(x, self.params.patch), x), {}
        chunks = [self.encoder(x[:, :, a:b], cache) for a, b in time_chunks(x.shape[2], self.params.time_scale)]
        return self.mean(torch.cat(chunks, dim=2))

    def decode(self, z: Tensor) -> Tensor:
        """Latent [B, z, T, h, w] in raw VAE space -> video [B, 3, 1 + 4(T-1), s*h, s*w], nominally in [-1, 1]."""
        x = causal_conv(self.conv2, z, {})
        cache: Cache = {}
        out = torch.cat([self.decoder(x[:, :, t : t + 1], cache) for t in range(x.shape[2])], dim=2)
        return unpatchify(out, self.params.patch)


def levels(sd: dict[str, Tensor], prefix: str) -> list[tuple[list[int], bool | None]]:
    """The levels of a flat `encoder.downsamples` / `decoder.upsamples` stack, in running order: per level the
    output widths of its residual blocks and whether its resample has a time conv (None: no resample)."""
    found, blocks, i = [], [], 0
    while True:
        key = f"{prefix}.{i}"
        if f"{key}.residual.6.weight" in sd:
            blocks.append(int(sd[f"{key}.residual.6.weight"].shape[0]))
        elif f"{key}.resample.1.weight" in sd:
            found.append((blocks, f"{key}.time_conv.weight" in sd))
            blocks = []
        else:
            break
        i += 1
    found.append((blocks, None))
    if any(not b for b, _ in found) or any(k.startswith(f"{prefix}.{i}.") for k in sd):
        raise ValueError(f"vae: the Wan {prefix}.* stack is not residual blocks and resamples ({describe_keys(sd)}).")
    return found


def detect_params(sd: dict[str, Tensor]) -> WanParams:
    """Read the configuration off a Wan 2.1 VAE state dict (ComfyUI's keys, prefixes already stripped)."""
    has_encoder, has_decoder = "encoder.conv1.weight" in sd, "decoder.conv1.weight" in sd
    if not (has_encoder or has_decoder):
        raise ValueError(
            f"vae: no 'encoder.conv1.weight' or 'decoder.conv1.weight' in this Wan VAE ({describe_keys(sd)})."
        )
    if any(".to_qkv." in k for k in sd if ".middle." not in k):
        raise ValueError(
            "vae: this Wan VAE has attention inside its resolution levels; only the mid-block's is supported."
        )
    if has_encoder:
        found = levels(sd, "encoder.downsamples")
        dim = int(sd["encoder.conv1.weight"].shape[0])
        z = int(sd["encoder.head.2.weight"].shape[0]) // 2
        res_blocks, temporal = len(found[0][0]), tuple(t for _, t in found[:-1])
    else:
        found = levels(sd, "decoder.upsamples")[::-1]
        dim = int(sd["decoder.head.2.weight"].shape[1])
        z = int(sd["decoder.conv1.weight"].shape[1])
        res_blocks, temporal = len(found[0][0]) - 1, tuple(t for _, t in found[1:])
    decoder_dim = int(sd["decoder.head.2.weight"].shape[1]) if has_decoder else dim
    return WanParams(
        dim=dim,
        decoder_dim=decoder_dim,
        z_channels=z,
        dim_mult=tuple(blocks[-1] // dim for blocks, _ in found),
        num_res_blocks=res_blocks,
        temporal_down=temporal,
        patch=1,
        has_encoder=has_encoder,
        has_decoder=has_decoder,
    )


# Named sizes for random-weight models: Wan 2.1's own (as comfy/sd.py builds it) and the tests' tiny one.
CONFIGS = {
    "wan2.1": WanParams(96, 96, 16, (1, 2, 4, 4), 2, (False, True, True), 1, True, True),
    "tiny": WanParams(8, 8, 4, (1, 2, 2, 2), 1, (False, True, True), 1, True, True),
}


def random_wan(name: str = "wan2.1", seed: int = 0) -> WanVAE:
    """A seeded random-weight Wan 2.1 VAE of a named size."""
    return randomized(WanVAE(CONFIGS[name]), seed)


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """The model with seeded random weights: RMS gains near 1, biases near 0, convs scaled by fan-in so that the
    signal neither dies nor explodes through the blocks."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("gamma"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * p[0].numel() ** -0.5)
    return model.eval().requires_grad_(False)
