"""The LTX-Video VAE, as ComfyUI's VAE Loader holds it and `comfy.sd.VAE` runs it (comfy/ldm/lightricks/vae).

Built from ComfyUI's block list (a config's `encoder_blocks` / `decoder_blocks`); the three configs ComfyUI guesses
from the weights are VERSIONS here, and a config from the file's metadata with the same block kinds may replace
them. Module names are ComfyUI's (`decoder.up_blocks.0.res_blocks.0.conv1.conv.weight`,
`per_channel_statistics.mean-of-means`), so its files load strictly.

What the row split (ltx_sharded.py) has to honour, all as ComfyUI computes it:
- every 3x3x3 conv pads one row and column each side: zeros in the encoder, reflect in the decoder (unless a config
  says otherwise); in time the encoder is causal (two copies of the first frame before), the decoder is not (one
  copy of the first frame before, one of the last after);
- pixel norm (the guessed configs) and layer norm work per position; a config's group norm spans all frames and rows;
- space-to-depth / depth-to-space resample 2x2(x2) groups of rows, local when bands start on even rows;
- decode is one forward over all frames; with timestep conditioning (versions 1 and 2) the latent is first mixed
  with noise, randn * 0.025 + 0.975 * latent, and version 1's res blocks add a random H x W map after each conv.
  ComfyUI draws those unseeded; here they are seeded, and each drawn at its full size from a generator of its own
  (`latent_noise`, `spatial_noise`), so a rank takes its rows of the same maps.

decode takes ComfyUI's LTX LATENT (normalised by the per-channel statistics) and encode returns one.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ltx_layers as L
from .ltx_config import DECODER_KINDS, ENCODER_KINDS, LTXVideoParams, config_params

STATISTICS = ("std-of-means", "mean-of-means", "mean-of-stds", "mean-of-stds_over_std-of-means", "channel")
TIMESTEP, NOISE_SCALE = 0.05, 0.025  # core's decode defaults


def latent_noise(shape: tuple[int, ...], seed: int) -> Tensor:
    """The noise decode mixes into a whole latent (core: randn_like), float32 on the CPU."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def spatial_noise(seed: int, index: int, H: int, W: int) -> Tensor:
    """Injection point `index`'s [H, W] map (core: randn(H, W) after each conv of a v1 res block), float32, CPU."""
    # Any 64-bit seed (the node's range) with any index: a hash of both, not a shift that would overflow manual_seed.
    mixed = int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "little")
    return torch.randn(H, W, generator=torch.Generator().manual_seed(mixed))


class Whole:
    """How the forward sees rows when it holds all of them (ltx_sharded.Band: a rank's band of them). It counts the
    spatial-noise maps drawn: each map's index seeds it."""

    def __init__(self, seed: int = 0):
        self.seed, self.drawn = seed, 0

    def pad_rows(self, x: Tensor, padding: str) -> Tensor:
        return L.pad_rows(x, padding)

    def group_norm(self, layer: nn.GroupNorm, x: Tensor) -> Tensor:
        return layer(x)

    def noise(self, x: Tensor) -> Tensor:
        """The next spatial-noise map's rows that x [B, C, T, rows, W] holds, [rows, W] float32."""
        self.drawn += 1
        return self.noise_rows(self.drawn - 1, x)

    def noise_rows(self, index: int, x: Tensor) -> Tensor:
        return spatial_noise(self.seed, index, x.shape[-2], x.shape[-1])

    def block_done(self) -> None:
        pass


class Encoder(nn.Module):
    def __init__(self, p: LTXVideoParams):
        super().__init__()
        c, pad = p.base_channels, p.encoder_padding
        self.conv_in = L.Conv(3 * p.patch_size**2, c, pad)
        self.down_blocks = nn.ModuleList()
        for name, bp in p.encoder_blocks:
            st, s, form = ENCODER_KINDS[name]
            c_out = c * (bp.get("multiplier", 2) if name == "res_x_y" or name.endswith(("_x_y", "_res")) else 1)
            if name == "res_x":
                block = L.MidBlock(c, bp["num_layers"], p.norm_layer, pad, False, False)
            elif name == "res_x_y":
                block = L.ResBlock(c, c_out, p.norm_layer, pad, False, False)
            elif form == "conv":
                block = L.Conv(c, c_out, pad, (st, s, s))
            else:
                block = L.SpaceToDepth(c, c_out, (st, s, s), pad)
            self.down_blocks.append(block)
            c = c_out
        self.conv_norm_out = L.make_norm(p.norm_layer, c)
        self.conv_out = L.Conv(c, p.encoder_out_channels, pad)


class Decoder(nn.Module):
    def __init__(self, p: LTXVideoParams):
        super().__init__()
        blocks, pad = p.decoder_blocks[::-1], p.decoder_padding
        c = p.base_channels
        for name, bp in blocks:  # the widest level first: undo every narrowing
            c *= (
                bp.get("multiplier", 2)
                if name == "res_x_y"
                else bp.get("multiplier", 1)
                if name == "compress_all"
                else 1
            )
        self.conv_in = L.Conv(p.latent_channels, c, pad)
        self.up_blocks = nn.ModuleList()
        for name, bp in blocks:
            st, s = DECODER_KINDS[name]
            noise = bp.get("inject_noise", False)
            if name == "res_x":
                block = L.MidBlock(c, bp["num_layers"], p.norm_layer, pad, noise, p.timestep_conditioning)
            elif name == "res_x_y":
                block = L.ResBlock(c, c // bp.get("multiplier", 2), p.norm_layer, pad, noise, False)
                c = c // bp.get("multiplier", 2)
            else:
                reduction = bp.get("multiplier", 1) if name == "compress_all" else 1
                block = L.DepthToSpace(c, (st, s, s), bp.get("residual", False), reduction, pad)
                c = c // reduction
            self.up_blocks.append(block)
        self.conv_norm_out = L.make_norm(p.norm_layer, c)
        self.conv_out = L.Conv(c, 3 * p.patch_size**2, pad)
        if p.timestep_conditioning:
            self.timestep_scale_multiplier = nn.Parameter(torch.empty(()))
            self.last_time_embedder = L.TimeEmbedder(2 * c)
            self.last_scale_shift_table = nn.Parameter(torch.empty(2, c))


class Statistics(nn.Module):
    """The per-channel statistics a LATENT is normalised by (ComfyUI keeps five; two are used)."""

    def __init__(self, channels: int):
        super().__init__()
        for name in STATISTICS:
            self.register_buffer(name, torch.empty(channels))

    def scale_shift(self, x: Tensor) -> tuple[Tensor, Tensor]:
        view = (1, -1, 1, 1, 1)
        return self.get_buffer("std-of-means").view(view).to(x), self.get_buffer("mean-of-means").view(view).to(x)


def encoder_forward(enc: Encoder, x: Tensor, band, p: LTXVideoParams) -> Tensor:
    """Video [B, 3, T, H, W] in [-1, 1] -> the posterior mean [B, z, latent frames, H/s, W/s], unnormalised."""
    x = L.conv3d(enc.conv_in, L.patchify(x, p.patch_size), True, band)
    for block in enc.down_blocks:
        if isinstance(block, L.MidBlock):
            x = L.mid_block(block, x, True, band, None)
        elif isinstance(block, L.ResBlock):
            x = L.resblock(block, x, True, band)
        elif isinstance(block, L.SpaceToDepth):
            x = L.down(block, x, True, band)
        else:
            x = L.conv3d(block, x, True, band)
        band.block_done()
    x = F.silu(L.norm(enc.conv_norm_out, x, band))
    return L.conv3d(enc.conv_out, x, True, band)[:, : p.latent_channels]


def decoder_forward(dec: Decoder, x: Tensor, band, p: LTXVideoParams, timestep: float) -> Tensor:
    """Unnormalised latent [B, z, T, h, w] -> video [B, 3, 1 + st*(T-1), s*h, s*w], nominally in [-1, 1]."""
    causal = p.causal_decoder
    x = L.conv3d(dec.conv_in, x, causal, band)
    t = timestep * dec.timestep_scale_multiplier if hasattr(dec, "timestep_scale_multiplier") else None
    for block in dec.up_blocks:
        if isinstance(block, L.MidBlock):
            x = L.mid_block(block, x, causal, band, t)
        elif isinstance(block, L.ResBlock):
            x = L.resblock(block, x, causal, band)
        else:
            x = L.up(block, x, causal, band)
        band.block_done()
    x = L.norm(dec.conv_norm_out, x, band)
    if t is not None:
        shift, scale = L.modulation(dec.last_scale_shift_table, dec.last_time_embedder(t, x.dtype), x)
        x = x * (1 + scale) + shift
    x = L.conv3d(dec.conv_out, F.silu(x), causal, band)
    return L.unpatchify(x, p.patch_size)


class LTXVideoVAE(nn.Module):
    def __init__(self, params: LTXVideoParams):
        super().__init__()
        self.params = params
        if params.has_encoder:
            self.encoder = Encoder(params)
        if params.has_decoder:
            self.decoder = Decoder(params)
        self.per_channel_statistics = Statistics(params.latent_channels)

    def noised(self, z: Tensor, seed: int, noise_scale: float = NOISE_SCALE) -> Tensor:
        """What core's decode feeds its decoder for the LATENT z [B, z, T, h, w]: with timestep conditioning z mixed
        with `latent_noise(z.shape, seed)`, else z."""
        if not self.params.timestep_conditioning:
            return z
        return latent_noise(tuple(z.shape), seed).to(z) * noise_scale + (1.0 - noise_scale) * z

    def decode_forward(self, z: Tensor, band, timestep: float = TIMESTEP) -> Tensor:
        """A noised LATENT (or a band of its rows) -> video frames (those rows), [B, 3, frames, rows*s, w*s]."""
        std, mean = self.per_channel_statistics.scale_shift(z)
        return decoder_forward(self.decoder, z * std + mean, band, self.params, timestep)

    def decode(self, z: Tensor, seed: int = 0, timestep: float = TIMESTEP, noise_scale: float = NOISE_SCALE):
        """LATENT [B, z, T, h, w] (normalised) -> video [B, 3, 1 + 8(T-1), 32h, 32w] nominally in [-1, 1]."""
        return self.decode_forward(self.noised(z, seed, noise_scale), Whole(seed), timestep)

    def encode_forward(self, x: Tensor, band) -> Tensor:
        std, mean = self.per_channel_statistics.scale_shift(x)
        return (encoder_forward(self.encoder, x, band, self.params) - mean) / std

    def encode(self, x: Tensor) -> Tensor:
        """Video [B, 3, 1 + 8k, H, W] in [-1, 1] (H, W multiples of 32) -> LATENT [B, z, 1 + k, H/32, W/32]."""
        return self.encode_forward(x, Whole())


def randomized(model: LTXVideoVAE, seed: int) -> LTXVideoVAE:
    """Seeded random weights that keep the signal alive (norm affines near 1, convs scaled by fan-in), a visible
    timestep modulation and noise injection, and per-channel statistics of a real file's order (std ~ 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            draw = torch.randn(p.shape, generator=generator)
            if key.endswith("timestep_scale_multiplier"):
                p.fill_(1000.0)
            elif p.ndim == 1:
                p.copy_((1.0 if key.endswith("weight") and "norm" in key else 0.0) + 0.1 * draw)
            elif "scale_shift_table" in key or "per_channel_scale" in key:
                p.copy_(0.3 * draw)
            else:
                p.copy_(draw * p[0].numel() ** -0.5)
        for name in STATISTICS:
            buffer = model.per_channel_statistics.get_buffer(name)
            buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
        model.per_channel_statistics.get_buffer("mean-of-means").sub_(1.0)
    return model.eval().requires_grad_(False)


def random_ltx_video(params: LTXVideoParams | int = 0, seed: int = 0) -> LTXVideoVAE:
    """A seeded random-weight LTX-Video VAE: of a version's full size, or of the given configuration."""
    return randomized(LTXVideoVAE(params if isinstance(params, LTXVideoParams) else config_params(params)), seed)
