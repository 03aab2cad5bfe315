"""Which VAE a state dict holds, and the engine's model for it.

The keys that tell the kinds apart are the ones `comfy.sd.VAE` selects its model by, so the pool accepts what core
VAE Decode accepts. Kinds ComfyUI loads that the engine does not run yet get an error naming what was found.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import autoencoder, hunyuan_video, ltx_config, ltx_video, wan, wan22
from .video_layout import NDHWC

# kind -> (config read off the weights, model class)
KINDS = {
    "ldm": (autoencoder.detect_params, autoencoder.AutoEncoder),
    "wan2.1": (wan.detect_params, wan.WanVAE),
    "wan2.2": (wan22.detect_params, wan22.WanVAE22),
    "hunyuan-video": (hunyuan_video.detect_params, hunyuan_video.HunyuanVideoVAE),
    "ltx-video": (ltx_config.detect_params, ltx_video.LTXVideoVAE),
}
# HunyuanVideo's VAE, by its 3-D conv_in; one with 32 latent channels is HunyuanVideo 1.5's, another model.
HUNYUAN_KEYS = ("decoder.conv_in.conv.weight", "encoder.conv_in.conv.weight")
HUNYUAN15_CHANNELS = {"decoder.conv_in.conv.weight": (1, 32), "encoder.conv_out.conv.weight": (0, 64)}
WAN_KEYS = ("decoder.middle.0.residual.0.gamma", "encoder.middle.0.residual.0.gamma")
# Among Wan VAEs, what only Wan 2.2's nested level blocks have (the first is comfy/sd.py's own test).
WAN22_KEYS = (
    "decoder.upsamples.0.upsamples.0.residual.2.weight",
    "encoder.downsamples.0.downsamples.0.residual.2.weight",
)


def detect_kind(sd: dict[str, Tensor]) -> str:
    """'ldm', 'wan2.1', 'wan2.2', 'hunyuan-video' or 'ltx-video' for a state dict with prefixes stripped; a
    ValueError for the video VAEs not run yet (HunyuanVideo 1.5's)."""
    if ltx_config.SELECT_KEY in sd:
        return "ltx-video"
    if any(k in sd for k in HUNYUAN_KEYS):
        for key, (dim, channels) in HUNYUAN15_CHANNELS.items():
            if key in sd and sd[key].shape[dim] == channels:
                raise ValueError(
                    f"vae: this is a HunyuanVideo 1.5 VAE ('{key}' has {channels} channels), a different model from "
                    "HunyuanVideo's; Distributed VAE Decode/Encode does not run it yet. Use core VAE Decode / VAE "
                    "Encode for it."
                )
        return "hunyuan-video"
    if not any(k in sd for k in WAN_KEYS):
        return "ldm"
    return "wan2.2" if any(k in sd for k in WAN22_KEYS) else "wan2.1"


def detect_params(sd: dict[str, Tensor]):
    """The configuration of whichever supported VAE `sd` holds (AutoEncoderParams, WanParams, HunyuanVideoParams or
    LTXVideoParams)."""
    return KINDS[detect_kind(sd)][0](sd)


def vae_from_state_dict(
    sd: dict[str, Tensor], device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """Build the model the weights describe (AutoEncoder, WanVAE(22), HunyuanVideoVAE or LTXVideoVAE) and load them
    strictly.

    Args:
        sd: a state dict as ComfyUI's VAE Loader holds it, optionally under `first_stage_model.` / `vae.`.
        device: where the weights go.
        dtype: weight dtype; None keeps the checkpoint's.
    """
    sd = autoencoder.strip_prefixes(sd)
    detect, model_class = KINDS[detect_kind(sd)]
    params = detect(sd)
    sd.pop(ltx_config.CONFIG_KEY, None)  # an LTX-Video VAE's config, sent along by the pool
    return autoencoder.load_strict(model_class, params, sd, device, dtype)


def is_video(params) -> bool:
    return isinstance(params, (wan.WanParams, hunyuan_video.HunyuanVideoParams, ltx_config.LTXVideoParams))


def frames_per_forward(params, frames: int) -> int:
    """How many of a video's `frames` one forward holds at once: a Wan VAE runs chunk by chunk (its per-frame memory
    figure covers a chunk and its caches), the HunyuanVideo and LTX-Video VAEs run the whole video in one forward, as
    ComfyUI's."""
    return frames if isinstance(params, (hunyuan_video.HunyuanVideoParams, ltx_config.LTXVideoParams)) else 1


def in_memory_format(model: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    """The model in the worker's layout: channels_last on GPUs, which for a Wan VAE means its 3-D conv weights
    channels_last_3d (its activations run NDHWC: video_layout.py) and its 2-D ones channels_last. The HunyuanVideo
    VAE stays contiguous (its GroupNorm statistics kernels read NCDHW), and so does the LTX-Video VAE (no NDHWC path
    written for it yet)."""
    if not is_video(model.params):
        return model.to(memory_format=memory_format)
    if memory_format == torch.channels_last and isinstance(model.params, wan.WanParams):
        for p in model.parameters():
            if p.dim() in (4, 5):
                p.data = p.data.contiguous(memory_format=torch.channels_last if p.dim() == 4 else NDHWC)
    return model
