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

import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ltx_layers as L
from .autoencoder import describe_keys

SELECT_KEY = "decoder.up_blocks.0.res_blocks.0.conv1.conv.weight"  # what comfy/sd.py picks this VAE by
V2_KEY = "encoder.down_blocks.1.conv.conv.bias"  # version 2's space-to-depth level (v1: a res_x_y)
STATISTICS = ("std-of-means", "mean-of-means", "mean-of-stds", "mean-of-stds_over_std-of-means", "channel")
TIMESTEP, NOISE_SCALE = 0.05, 0.025  # core's decode defaults
# The block config the pool sends along with the weights (JSON bytes, uint8): not a weight, dropped before loading.
CONFIG_KEY = "bagel_vae_pp.ltx_config"
# Encoder blocks: kind -> (time stride, space stride, 'conv' | 'space_to_depth' | 'res'). compress_* multiply the
# channels when their params say so (default 2 for *_res / *_x_y, else 1).
ENCODER_KINDS = {
    "res_x": (1, 1, "res"),
    "res_x_y": (1, 1, "res"),
    "compress_time": (2, 1, "conv"),
    "compress_space": (1, 2, "conv"),
    "compress_all": (2, 2, "conv"),
    "compress_all_x_y": (2, 2, "conv"),
    "compress_all_res": (2, 2, "space_to_depth"),
    "compress_space_res": (1, 2, "space_to_depth"),
    "compress_time_res": (2, 1, "space_to_depth"),
}
DECODER_KINDS = {"res_x": (1, 1), "res_x_y": (1, 1), "compress_time": (2, 1), "compress_space": (1, 2),
                 "compress_all": (2, 2)}  # fmt: skip


def _blocks(spec: list) -> tuple[tuple[str, dict], ...]:
    return tuple((name, {"num_layers": p} if isinstance(p, int) else dict(p)) for name, p in spec)


_RES_D = [("res_x", {"num_layers": n, "inject_noise": noise}) for n, noise in ((5, True), (6, True), (7, True))]
_UP = ("compress_all", {"residual": True, "multiplier": 2})
VERSIONS = {  # comfy's guess_config per version: (encoder blocks, decoder blocks, timestep conditioning)
    0: (
        v0 := _blocks(
            [
                ("res_x", 4),
                ("compress_all", 1),
                ("res_x_y", 1),
                ("res_x", 3),
                ("compress_all", 1),
                ("res_x_y", 1),
                ("res_x", 3),
                ("compress_all", 1),
                ("res_x", 3),
                ("res_x", 4),
            ]
        ),  # fmt: skip
        v0,
        False,
    ),
    1: (
        _blocks(
            [
                ("res_x", 4),
                ("compress_all", {}),
                ("res_x_y", 1),
                ("res_x", 3),
                ("compress_all", {}),
                ("res_x_y", 1),
                ("res_x", 3),
                ("compress_all", {}),
                ("res_x", 3),
                ("res_x", 4),
            ]
        ),  # fmt: skip
        _blocks([_RES_D[0], _UP, _RES_D[1], _UP, _RES_D[2], _UP, ("res_x", {"num_layers": 8, "inject_noise": False})]),
        True,
    ),
    2: (
        _blocks(
            [
                ("res_x", 4),
                ("compress_space_res", {"multiplier": 2}),
                ("res_x", 6),
                ("compress_time_res", {"multiplier": 2}),
                ("res_x", 6),
                ("compress_all_res", {"multiplier": 2}),
                ("res_x", 2),
                ("compress_all_res", {"multiplier": 2}),
                ("res_x", 2),
            ]
        ),  # fmt: skip
        _blocks(
            [("res_x", {"num_layers": 5, "inject_noise": False}), _UP] * 3
            + [("res_x", {"num_layers": 5, "inject_noise": False})]
        ),  # fmt: skip
        True,
    ),
}


@dataclass(frozen=True)
class LTXVideoParams:
    encoder_blocks: tuple[tuple[str, dict], ...]  # ComfyUI's list, first block first
    decoder_blocks: tuple[tuple[str, dict], ...]  # as the config lists them: the decoder runs them last to first
    base_channels: int  # encoder conv_in / decoder conv_out width (ComfyUI: 128)
    latent_channels: int  # 128
    encoder_out_channels: int  # 2 * latent (a log-variance per channel) or latent + 1 (one for all): the mean leads
    patch_size: int  # 4: pixels per side folded into channels
    norm_layer: str  # pixel_norm | group_norm | layer_norm
    timestep_conditioning: bool
    causal_decoder: bool
    encoder_padding: str  # zeros | reflect (rows and columns)
    decoder_padding: str
    has_encoder: bool
    has_decoder: bool

    def __post_init__(self):
        unknown = [n for n, _ in self.encoder_blocks if n not in ENCODER_KINDS]
        unknown += [n for n, _ in self.decoder_blocks if n not in DECODER_KINDS]
        if unknown or self.norm_layer not in ("pixel_norm", "group_norm", "layer_norm"):
            what = sorted(set(unknown)) or self.norm_layer
            raise ValueError(
                f"vae: this LTX-Video VAE's config has blocks or norms the engine does not run: {what}; use core "
                "VAE Decode / VAE Encode for it."
            )

    @property
    def z_channels(self) -> int:
        return self.latent_channels

    @property
    def out_ch(self) -> int:
        return 3

    def strides(self) -> list[tuple[int, int]]:
        """(time, space) stride of each block of the side that is there (the other one mirrors it)."""
        if self.has_decoder:
            return [DECODER_KINDS[n] for n, _ in self.decoder_blocks]
        return [ENCODER_KINDS[n][:2] for n, _ in self.encoder_blocks]

    @property
    def downscale(self) -> int:
        return self.patch_size * math.prod(s for _, s in self.strides())

    @property
    def time_scale(self) -> int:
        return math.prod(t for t, _ in self.strides())

    def frames_out(self, latent_frames: int) -> int:
        return 1 + self.time_scale * (latent_frames - 1)

    def latent_frames(self, frames: int) -> int:
        return 1 + (frames - 1) // self.time_scale


def latent_noise(shape: tuple[int, ...], seed: int) -> Tensor:
    """The noise decode mixes into a whole latent (core: randn_like), float32 on the CPU."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def spatial_noise(seed: int, index: int, H: int, W: int) -> Tensor:
    """Injection point `index`'s [H, W] map (core: randn(H, W) after each conv of a v1 res block), float32, CPU."""
    return torch.randn(H, W, generator=torch.Generator().manual_seed((seed << 20) + index + 1))


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


def detect_params(sd: dict[str, Tensor], config: dict | None = None) -> LTXVideoParams:
    """The configuration of an LTX-Video VAE state dict (ComfyUI's keys, prefixes stripped): the blocks of
    `config` (a file's metadata 'vae' config, as ComfyUI reads it) or else of the version ComfyUI guesses from the
    weights; the widths off the weights."""
    has_encoder, has_decoder = "encoder.conv_in.conv.weight" in sd, "decoder.conv_in.conv.weight" in sd
    if not has_encoder and not has_decoder:
        raise ValueError(f"vae: no 'encoder.conv_in.conv.weight' or 'decoder.conv_in.conv.weight' in this LTX-Video "
                         f"VAE ({describe_keys(sd)}).")  # fmt: skip
    if config is None and CONFIG_KEY in sd:
        config = json.loads(bytes(sd[CONFIG_KEY].tolist()).decode())
    if config is None:
        width = sd[SELECT_KEY].shape[0] if SELECT_KEY in sd else 512
        version = 2 if width == 1024 and V2_KEY in sd else 1 if width == 1024 else 0
        encoder_blocks, decoder_blocks, conditioned = VERSIONS[version]
        config = {"timestep_conditioning": conditioned, "norm_layer": "pixel_norm", "patch_size": 4}
    else:
        if config.get("dims", 3) != 3:
            raise ValueError(f"vae: this LTX-Video VAE's config has dims {config['dims']}; the engine runs 3-D ones.")
        encoder_blocks = _blocks(config.get("encoder_blocks", config.get("blocks", [])))
        decoder_blocks = _blocks(config.get("decoder_blocks", config.get("blocks", [])))
    padding = config.get("spatial_padding_mode")
    return LTXVideoParams(
        encoder_blocks=encoder_blocks,
        decoder_blocks=decoder_blocks,
        base_channels=int(
            sd["encoder.conv_in.conv.weight" if has_encoder else "decoder.conv_out.conv.weight"].shape[
                0 if has_encoder else 1
            ]
        ),  # fmt: skip
        latent_channels=int(sd["per_channel_statistics.mean-of-means"].shape[0]),
        encoder_out_channels=int(sd["encoder.conv_out.conv.weight"].shape[0]) if has_encoder else 0,
        patch_size=int(config.get("patch_size", 1)),
        norm_layer=config.get("norm_layer", "group_norm"),
        timestep_conditioning=bool(config.get("timestep_conditioning", False)),
        causal_decoder=bool(config.get("causal_decoder", False)),
        encoder_padding=padding or "zeros",
        decoder_padding=padding or "reflect",
        has_encoder=has_encoder,
        has_decoder=has_decoder,
    )


def module_config(vae: nn.Module) -> dict | None:
    """The config (ComfyUI's keys) of an LTX-Video VAE module, ours or ComfyUI's first_stage_model (whose Encoder
    and Decoder keep their block lists as `blocks_desc`), for the pool to send with the weights; None for others."""
    p = getattr(vae, "params", None)
    if isinstance(p, LTXVideoParams):
        paddings = (p.encoder_padding, p.decoder_padding)
        config = {"encoder_blocks": p.encoder_blocks, "decoder_blocks": p.decoder_blocks, "norm_layer": p.norm_layer,
                  "patch_size": p.patch_size, "timestep_conditioning": p.timestep_conditioning,
                  "causal_decoder": p.causal_decoder}  # fmt: skip
    elif hasattr(vae, "per_channel_statistics") and hasattr(getattr(vae, "decoder", None), "blocks_desc"):
        enc, dec = vae.encoder, vae.decoder
        paddings = (enc.conv_in.conv.padding_mode, dec.conv_in.conv.padding_mode)
        config = {"encoder_blocks": enc.blocks_desc, "decoder_blocks": dec.blocks_desc, "norm_layer": enc.norm_layer,
                  "patch_size": enc.patch_size, "timestep_conditioning": vae.timestep_conditioning,
                  "causal_decoder": dec.causal}  # fmt: skip
    else:
        return None
    if paddings != ("zeros", "reflect"):  # a config's one mode for both
        config["spatial_padding_mode"] = paddings[1]
    return config


def config_tensor(config: dict) -> Tensor:
    return torch.frombuffer(bytearray(json.dumps(config).encode()), dtype=torch.uint8)


def config_params(version: int, base_channels: int = 128, **changes) -> LTXVideoParams:
    """A version's configuration at a base width (ComfyUI's: 128), with fields changed as a metadata config may."""
    encoder_blocks, decoder_blocks, conditioned = VERSIONS[version]
    fields = dict(encoder_blocks=encoder_blocks, decoder_blocks=decoder_blocks, base_channels=base_channels,
                  latent_channels=128, encoder_out_channels=129, patch_size=4, norm_layer="pixel_norm",
                  timestep_conditioning=conditioned, causal_decoder=False, encoder_padding="zeros",
                  decoder_padding="reflect", has_encoder=True, has_decoder=True)  # fmt: skip
    return LTXVideoParams(**(fields | changes))


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
