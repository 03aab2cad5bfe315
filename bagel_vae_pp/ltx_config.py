"""An LTX-Video VAE's configuration: the block lists ComfyUI guesses per version (VERSIONS), the one read off a
state dict (`detect_params`: version by the weights' shapes, or a config sent along with them) and the config the
pool sends along with a module's weights (`module_config`, under CONFIG_KEY), since its blocks are not all in them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .autoencoder import describe_keys

SELECT_KEY = "decoder.up_blocks.0.res_blocks.0.conv1.conv.weight"  # what comfy/sd.py picks this VAE by
V2_KEY = "encoder.down_blocks.1.conv.conv.bias"  # version 2's space-to-depth level (v1: a res_x_y)
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
