"""One rank's share of a video VAE job: its rows of every frame, written straight into the host's output (Wan 2.1 /
2.2 chunk by chunk as each finishes; HunyuanVideo and LTX-Video in one forward over all frames, as ComfyUI runs them).

Layouts are ComfyUI's: a video LATENT is [B, z, T, h, w] float32 in raw VAE space; frames are an IMAGE
[frames, H, W, 3] in [0, 1] (decode gives B videos' frames one after the other, as core VAE Decode does; encode
takes one video). Wan's activations run NDHWC where the worker's layout is channels_last (GPUs; video_layout.py).
Exact mode: `sharded`-style bands through `wan_sharded` / `hunyuan_sharded` / `ltx_sharded`; Wan's ranks agree on
the cancel flag before each chunk (there is no GroupNorm to carry it), LTX-Video's after each block, HunyuanVideo's
GroupNorms carry it. LTX-Video's decode noise comes from the job's `seed` (ltx_video.py). Tiled mode (core's tiled
video decode/encode, tiles dealt over the ranks) is `video_tiles.py`.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import hunyuan_sharded, ltx_sharded
from .bands import plan_bands
from .collectives import agree_cancel
from .hunyuan_video import HunyuanVideoVAE
from .jobs import Rank, band_shard, progress_counter
from .ltx_video import LTXVideoVAE
from .video_layout import to_layout
from .wan import WanVAE, decode_chunks, time_chunks
from .wan_sharded import decode_chunk, encode_chunk

DECODE_STEP_SWITCH = "BAGEL_VAE_PP_WAN_DECODE_FRAMES"


def to_frames(y: Tensor) -> Tensor:
    """Decoder output [3, n, rows, W] in [-1, 1] -> IMAGE rows of n frames [n, rows, W, 3] in [0, 1]."""
    return ((y.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(1, 2, 3, 0)


def decode_step() -> int:
    """Latent frames per Wan decode chunk after the first (wan.decode_chunks): 1, as ComfyUI runs it, unless
    BAGEL_VAE_PP_WAN_DECODE_FRAMES says otherwise (a measuring knob: more frames, fewer and larger convs, more
    memory; bench/bench_video_vae.py --wan-decode-frames)."""
    return max(1, int(os.environ.get(DECODE_STEP_SWITCH, "1")))


def exact_decode(vae: WanVAE, latent: Tensor, out: Tensor, r: Rank) -> None:
    B, _, T, h, _ = latent.shape
    s = vae.params.downscale
    chunks = decode_chunks(T, decode_step())
    bands = plan_bands(h, r.world)
    shard = band_shard(r, bands, 1, progress_counter(r, B * len(chunks)))
    if shard is None:
        return
    a, b = bands[r.rank]
    video = out.view(B, -1, *out.shape[1:])  # [B, frames, H, W, 3]
    ndhwc = r.memory_format == torch.channels_last
    for i in range(B):
        cache, done = {}, 0
        for t0, t1 in chunks:
            agree_cancel(shard, r.device)
            z = to_layout(latent[i : i + 1, :, t0:t1, a:b].to(r.device, r.dtype), ndhwc)  # [1, z, n, rows, w]
            y = to_frames(decode_chunk(vae, z, cache, shard)[0])  # [frames, 8*rows, 8*w, 3]
            video[i, done : done + y.shape[0], a * s : b * s].copy_(y)
            done += y.shape[0]
            shard.on_layer()


def exact_encode(vae: WanVAE, pixels: Tensor, out: Tensor, r: Rank) -> None:
    H = pixels.shape[1]
    s = vae.params.downscale
    bands = plan_bands(H, r.world, unit=s)
    chunks = time_chunks(pixels.shape[0], vae.params.time_scale)
    shard = band_shard(r, bands, s, progress_counter(r, len(chunks)))
    if shard is None:
        return
    a, b = bands[r.rank]
    cache = {}
    for t, (f0, f1) in enumerate(chunks):
        agree_cancel(shard, r.device)
        x = pixels[f0:f1, a:b].to(r.device).permute(3, 0, 1, 2)[None] * 2.0 - 1.0  # [1, 3, n, rows, W]
        x = to_layout(x.to(r.dtype), r.memory_format == torch.channels_last)
        out[0, :, t : t + 1, a // s : b // s].copy_(encode_chunk(vae, x, cache, shard)[0])
        shard.on_layer()


# The kinds that run the whole video in one forward, as ComfyUI does, and the module that walks one of them band by
# band (decode_band, encode_band, count_layers).
WHOLE_VIDEO = {HunyuanVideoVAE: hunyuan_sharded, LTXVideoVAE: ltx_sharded}


def whole_video_decode(vae: HunyuanVideoVAE | LTXVideoVAE, latent: Tensor, out: Tensor, r: Rank, seed: int) -> None:
    walk = WHOLE_VIDEO[type(vae)]
    B, _, _, h, _ = latent.shape
    s = vae.params.downscale
    bands = plan_bands(h, r.world)
    shard = band_shard(r, bands, 1, progress_counter(r, B * walk.count_layers(vae, "decode")))
    if shard is None:
        return
    a, b = bands[r.rank]
    video = out.view(B, -1, *out.shape[1:])  # [B, frames, H, W, 3]
    noise = {}
    if isinstance(vae, LTXVideoVAE):  # the one kind that draws noise
        latent = vae.noised(latent, seed)  # the whole latent's noise, the same on every rank: before taking the rows
        noise["seed"] = seed
    for i in range(B):
        z = latent[i : i + 1, :, :, a:b].to(r.device, r.dtype)  # [1, z, T, rows, w]
        video[i, :, a * s : b * s].copy_(to_frames(walk.decode_band(vae, z, shard, **noise)[0]))


def whole_video_encode(vae: HunyuanVideoVAE | LTXVideoVAE, pixels: Tensor, out: Tensor, r: Rank) -> None:
    walk = WHOLE_VIDEO[type(vae)]
    s = vae.params.downscale
    bands = plan_bands(pixels.shape[1], r.world, unit=s)
    shard = band_shard(r, bands, s, progress_counter(r, walk.count_layers(vae, "encode")))
    if shard is None:
        return
    a, b = bands[r.rank]
    x = pixels[:, a:b].to(r.device).permute(3, 0, 1, 2)[None] * 2.0 - 1.0  # [1, 3, frames, rows, W]
    out[0, :, :, a // s : b // s].copy_(walk.encode_band(vae, x.to(r.dtype), shard)[0])


def run_job(vae: WanVAE | HunyuanVideoVAE | LTXVideoVAE, job: dict, inp: Tensor, out: Tensor, r: Rank) -> None:
    if job["mode"] == "tiled":
        from . import video_tiles  # here, not at the top: video_tiles builds on this module

        video_tiles.run_tiled(vae, job, inp, out, r)
    elif type(vae) in WHOLE_VIDEO:
        if job["op"] == "decode":
            whole_video_decode(vae, inp, out, r, job.get("seed", 0))
        else:
            whole_video_encode(vae, inp, out, r)
    else:
        (exact_decode if job["op"] == "decode" else exact_encode)(vae, inp, out, r)
