"""The host's side of a VAE decode or encode job: the weights the workers hold, the input checked and staged, the
room asked for on the GPUs, one job message, the deadline and where the time went. The workers' side is jobs.py.
"""

from __future__ import annotations

import math
import time
import weakref

from torch import nn

from . import ltx_config, shm
from .autoencoder import strip_prefixes
from .inputs import (
    check_latent,
    check_temporal_tiles,
    check_tiles,
    check_video_latent,
    non_finite_error,
    prepare_pixels,
)
from .ltx_config import LTXVideoParams
from .vae_kinds import detect_params, frames_per_forward, is_video

LOAD_TIMEOUT_S = 180.0
# Allowance per output megapixel per worker on top of timeout_s; CPU float32 is ~100x slower.
SECONDS_PER_MPX = {"cuda": 2.0, "cpu": 120.0}
# Peak device bytes a worker holds per pixel of its share, in bf16 (measured on 4x H200 with the Triton kernels,
# BENCHMARKS.md: 8.73 GiB for a 4096² decode band, 6.28 GiB for an encode band), rounded up; plus a base
# for weights, workspace and the CUDA context.
PEAK_BYTES_PER_PX = {"decode": 2400, "encode": 1700}
# The same per pixel of one frame for the Wan VAEs, whose chunks are up to 4 frames deep and whose causal caches
# hold 2 frames per 3-D conv: an estimate, not yet measured (ComfyUI reserves 7000 x 2 B per frame pixel in bf16).
VIDEO_PEAK_BYTES_PER_PX = {"decode": 8000, "encode": 6000}
WORKER_BASE_BYTES = 1 << 30


def ensure_vae(pool, vae: nn.Module, interrupt=None):
    """Send `vae`'s weights to the workers unless they already hold this very module; its params (image or video)."""
    held = pool.holding.get("vae")
    if held is not None and held[0]() is vae:
        return held[1]
    pool.holding.pop("vae", None)  # a load that fails or is cancelled half way leaves the workers with none
    sd = strip_prefixes({k: v.detach().to("cpu").contiguous() for k, v in vae.state_dict().items()})
    config = ltx_config.module_config(vae)  # the one VAE whose blocks are not all in its weights
    if config is not None:
        sd[ltx_config.CONFIG_KEY] = ltx_config.config_tensor(config)
    params = detect_params(sd)
    path = pool.staging.write_weights(sd, pool.job_id + 1)
    try:
        pool.call({"op": "load", "weights": path}, "loading the VAE", LOAD_TIMEOUT_S, interrupt)
    finally:
        shm.unlink(path)  # the workers hold it open or mapped: unlinked, it is freed once they drop it
    pool.holding["vae"] = (weakref.ref(vae), params)
    return params


def run(pool, op, vae, data, mode, tile_px, overlap_px, interrupt, progress, make_room, temporal_size=64,
        temporal_overlap=8, seed=0):  # fmt: skip
    """Decode a LATENT or encode an IMAGE across the pool's workers.

    Args:
        pool: a WorkerPool.
        op: "decode" or "encode".
        vae: a module holding LDM-layout or Wan 2.1 / 2.2 weights (our AutoEncoder / WanVAE(22) or ComfyUI's
            first_stage_model); its weights are sent once and reused while the same module comes back.
        data: decode: a LATENT [B, z, h, w] (video VAE: [B, z, T, h, w]) in raw VAE space; encode: an IMAGE
            [B, H, W, 3] in [0, 1] (video VAE: the frames of one video).
        mode: "exact" (equals the single-process decode) or "tiled" (approximate, bounded memory; a video VAE's
            tiles are placed and blended as core VAE Decode (Tiled) / VAE Encode (Tiled) do: video_tiles.py).
        tile_px, overlap_px: tile geometry for tiled mode, in image pixels.
        interrupt: called every few ms on this thread; whatever it raises cancels the job and propagates.
        progress: called with (done, total) as the workers advance; may raise likewise.
        make_room: called once before the workers start, with the pool's devices and an estimate of each
            worker's peak device bytes, so the host can evict its own models from those devices.
        temporal_size, temporal_overlap: tiled mode with a video VAE: temporal tiles in frames (core's defaults).
        seed: the LTX-Video VAE's decode noise (ltx_video.py); other VAEs draw none.
    """
    with pool.lock:
        entered = time.time()
        pool.ready(interrupt)
        params = ensure_vae(pool, vae, interrupt)
        check_tiles(mode, tile_px, overlap_px, params.downscale)
        video = is_video(params)
        if mode == "tiled" and isinstance(params, LTXVideoParams):
            raise ValueError("mode: tiled mode does not run the LTX-Video VAE yet; use exact mode for it.")
        if video and mode == "tiled":
            check_temporal_tiles(temporal_size, temporal_overlap, params.time_scale)
        name = "samples" if op == "decode" else "pixels"
        if op == "decode":
            data = (check_video_latent if video else check_latent)(data, params)
        else:
            data = prepare_pixels(data, params)
        out_shape = output_shape(op, tuple(data.shape), params)
        staging = pool.staging
        staging.check_room([tuple(data.shape), out_shape], name)
        checked = time.time()
        in_path, inp = staging.input_buffer(tuple(data.shape), pool.job_id + 1)
        if not shm.copy_in_checked(inp, data):  # before make_room: bad input must not evict anyone's models
            raise non_finite_error(name, data)
        if make_room is not None:
            image_px = out_shape[1] * out_shape[2] if op == "decode" else data.shape[1] * data.shape[2]
            tile_frames = 1
            if video:  # decode: B videos of out_shape[0] / B frames; encode: the frames of one video
                frames = out_shape[0] // data.shape[0] if op == "decode" else data.shape[0]
                image_px *= frames_per_forward(params, frames)
                tile_t = params.frames_out(temporal_size // params.time_scale)  # frames of a temporal tile
                tile_frames = frames_per_forward(params, min(frames, tile_t))
            peak = peak_bytes_per_worker(pool.spec, op, image_px, mode, tile_px, video, tile_frames)
            make_room(pool.spec.devices, peak)
        out_path, out = staging.outputs.acquire(out_shape)
        job = {
            "op": op,
            "mode": mode,
            "tile_px": tile_px,
            "overlap_px": overlap_px,
            "temporal_size": temporal_size,
            "temporal_overlap": temporal_overlap,
            "seed": seed,
            "input": in_path,
            "input_shape": list(data.shape),
            "output": out_path,
            "output_shape": list(out_shape),
            "release": staging.take_released(),
        }
        staged = time.time()
        pool.last_replies = pool.call(job, op, deadline_s(pool.spec, out_shape, op), interrupt, progress)
        pool.last_timing = timing(entered, checked, staged, pool.last_replies)
        return out


def output_shape(op: str, shape: tuple[int, ...], params) -> tuple[int, ...]:
    """decode: the IMAGE [B, H, W, C] (a video VAE: every video's frames one after the other, [B*frames, H, W, 3],
    as core VAE Decode returns them); encode: the LATENT [B, z, h, w] (a video VAE: [1, z, T, h, w])."""
    s = params.downscale
    if op == "decode" and is_video(params):
        B, _, T, h, w = shape
        return (B * params.frames_out(T), h * s, w * s, 3)
    if op == "decode":
        B, _, h, w = shape
        return (B, h * s, w * s, params.out_ch)
    N, H, W, _ = shape
    if is_video(params):
        return (1, params.z_channels, params.latent_frames(N), H // s, W // s)
    return (N, params.z_channels, H // s, W // s)


def deadline_s(spec, out_shape, op) -> float:
    if op == "decode":
        pixels = math.prod(out_shape[:3])
    else:  # a video latent frame stands for up to 4 frames
        pixels = math.prod(out_shape[:1] + out_shape[2:]) * 64 * (4 if len(out_shape) == 5 else 1)
    per_worker_mpx = pixels / 1e6 / len(spec.devices)
    kind = "cuda" if spec.devices[0].startswith("cuda") else "cpu"
    return spec.timeout_s + SECONDS_PER_MPX[kind] * per_worker_mpx


def peak_bytes_per_worker(
    spec, op: str, image_px: int, mode: str, tile_px: int, video: bool = False, tile_frames: int = 1
) -> int:
    """A generous estimate of one worker's peak device memory for one batch item (or one frame) of `image_px`; a tile
    holds `tile_frames` frames at once (a HunyuanVideo temporal tile). Tiled video also holds a float32 blend of a
    share of the output, small beside this."""
    share = image_px / len(spec.devices) if mode == "exact" else tile_px * tile_px * tile_frames
    dtype_bytes = 4 if spec.dtype == "fp32" else 2
    per_px = (VIDEO_PEAK_BYTES_PER_PX if video else PEAK_BYTES_PER_PX)[op]
    return int(per_px * share * dtype_bytes / 2 + WORKER_BASE_BYTES)


def timing(entered: float, checked: float, staged: float, replies: list[dict]) -> dict:
    """Where a job's wall time went, in ms: host preparation (checks; then staging: the input copied into shared
    memory with its NaN/Inf check, room made on the GPUs, the output file created), hand-over to workers,
    compute, hand-back."""
    busy = [r for r in replies if "received" in r]
    received, finished = max(r["received"] for r in busy), max(r["finished"] for r in busy)
    return {
        "prepare_ms": 1000 * (staged - entered),
        "check_ms": 1000 * (checked - entered),
        "stage_ms": 1000 * (staged - checked),
        "dispatch_ms": 1000 * (received - staged),
        "compute_ms": 1000 * max(r["seconds"] for r in busy),
        "collect_ms": 1000 * (time.time() - finished),
    }
