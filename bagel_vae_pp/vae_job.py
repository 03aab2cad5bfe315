"""The host's side of a VAE decode or encode job: the weights the workers hold, the input checked and staged, the
room asked for on the GPUs, one job message, the deadline and where the time went. The workers' side is jobs.py.
"""

from __future__ import annotations

import math
import time
import weakref

from torch import nn

from . import shm
from .autoencoder import AutoEncoderParams, detect_params, strip_prefixes
from .inputs import check_latent, check_tiles, non_finite_error, prepare_pixels

LOAD_TIMEOUT_S = 180.0
# Allowance per output megapixel per worker on top of timeout_s; CPU float32 is ~100x slower.
SECONDS_PER_MPX = {"cuda": 2.0, "cpu": 120.0}
# Peak device bytes a worker holds per pixel of its share, in bf16 (measured on 4x H200 with the Triton kernels,
# BENCHMARKS.md: 8.73 GiB for a 4096² decode band, 6.28 GiB for an encode band), rounded up; plus a base
# for weights, workspace and the CUDA context.
PEAK_BYTES_PER_PX = {"decode": 2400, "encode": 1700}
WORKER_BASE_BYTES = 1 << 30


def ensure_vae(pool, vae: nn.Module, interrupt=None) -> AutoEncoderParams:
    """Send `vae`'s weights to the workers unless they already hold this very module."""
    held = pool.holding.get("vae")
    if held is not None and held[0]() is vae:
        return held[1]
    pool.holding.pop("vae", None)  # a load that fails or is cancelled half way leaves the workers with none
    sd = strip_prefixes({k: v.detach().to("cpu").contiguous() for k, v in vae.state_dict().items()})
    params = detect_params(sd)
    path = pool.staging.write_weights(sd, pool.job_id + 1)
    try:
        pool.call({"op": "load", "weights": path}, "loading the VAE", LOAD_TIMEOUT_S, interrupt)
    finally:
        shm.unlink(path)  # the workers hold it open or mapped: unlinked, it is freed once they drop it
    pool.holding["vae"] = (weakref.ref(vae), params)
    return params


def run(pool, op, vae, data, mode, tile_px, overlap_px, interrupt, progress, make_room):
    """Decode a LATENT or encode an IMAGE across the pool's workers.

    Args:
        pool: a WorkerPool.
        op: "decode" or "encode".
        vae: a module holding LDM-layout weights (our AutoEncoder or ComfyUI's first_stage_model);
            its weights are sent once and reused while the same module comes back.
        data: decode: a LATENT [B, z, h, w] in raw VAE space; encode: an IMAGE [B, H, W, 3] in [0, 1].
        mode: "exact" (equals the single-process decode) or "tiled" (approximate, bounded memory).
        tile_px, overlap_px: tile geometry for tiled mode, in image pixels.
        interrupt: called every few ms on this thread; whatever it raises cancels the job and propagates.
        progress: called with (done, total) as the workers advance; may raise likewise.
        make_room: called once before the workers start, with the pool's devices and an estimate of each
            worker's peak device bytes, so the host can evict its own models from those devices.
    """
    with pool.lock:
        entered = time.time()
        pool.ready(interrupt)
        params = ensure_vae(pool, vae, interrupt)
        check_tiles(mode, tile_px, overlap_px, params.downscale)
        name = "samples" if op == "decode" else "pixels"
        data = check_latent(data, params) if op == "decode" else prepare_pixels(data, params)
        B, s = data.shape[0], params.downscale
        if op == "decode":
            out_shape = (B, data.shape[2] * s, data.shape[3] * s, params.out_ch)
        else:
            out_shape = (B, params.z_channels, data.shape[1] // s, data.shape[2] // s)
        staging = pool.staging
        staging.check_room([tuple(data.shape), out_shape], name)
        checked = time.time()
        in_path, inp = staging.input_buffer(tuple(data.shape), pool.job_id + 1)
        if not shm.copy_in_checked(inp, data):  # before make_room: bad input must not evict anyone's models
            raise non_finite_error(name, data)
        if make_room is not None:
            image_px = out_shape[1] * out_shape[2] if op == "decode" else data.shape[1] * data.shape[2]
            make_room(pool.spec.devices, peak_bytes_per_worker(pool.spec, op, image_px, mode, tile_px))
        out_path, out = staging.outputs.acquire(out_shape)
        job = {
            "op": op,
            "mode": mode,
            "tile_px": tile_px,
            "overlap_px": overlap_px,
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


def deadline_s(spec, out_shape, op) -> float:
    pixels = math.prod(out_shape[:3]) if op == "decode" else math.prod(out_shape[:1] + out_shape[2:]) * 64
    per_worker_mpx = pixels / 1e6 / len(spec.devices)
    kind = "cuda" if spec.devices[0].startswith("cuda") else "cpu"
    return spec.timeout_s + SECONDS_PER_MPX[kind] * per_worker_mpx


def peak_bytes_per_worker(spec, op: str, image_px: int, mode: str, tile_px: int) -> int:
    """A generous estimate of one worker's peak device memory for one batch item of `image_px` pixels."""
    share = image_px / len(spec.devices) if mode == "exact" else tile_px * tile_px
    dtype_bytes = 4 if spec.dtype == "fp32" else 2
    return int(PEAK_BYTES_PER_PX[op] * share * dtype_bytes / 2 + WORKER_BASE_BYTES)


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
