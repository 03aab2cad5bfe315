"""One rank's share of a decode or encode job: read its rows from shared memory, compute, write back.

Layouts are ComfyUI's: a LATENT is [B, z, h, w] float32 in raw VAE space, an IMAGE [B, H, W, 3] float32
in [0, 1]. Exact mode runs `sharded` on a row band; tiled mode decodes whole tiles independently and
blends them with feathered weights (approximate, no collectives).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import graphs
from .autoencoder import AutoEncoder
from .bands import blend_weights, plan_bands, plan_tile_rows, plan_tiles
from .collectives import JobCancelled, Shard, agree_cancel
from .graphs import GraphCache
from .hunyuan_video import HunyuanVideoVAE
from .ltx_video import LTXVideoVAE
from .sharded import count_layers, decode_band, encode_band
from .wan import WanVAE


@dataclass
class Rank:
    """What a job needs to know about the worker running it."""

    rank: int
    world: int
    groups: dict  # participants -> process group (None for 1)
    device: torch.device
    dtype: torch.dtype
    is_cancelled: Callable[[], bool]
    report: Callable[[int, int], None]  # (done, total) progress, only rank 0's is shown
    graphs: GraphCache | None = None  # this worker's CUDA graphs of small bands (None: always eager)
    memory_format: torch.memory_format = torch.contiguous_format  # the model's and the bands' layout

    def to_band(self, x: Tensor) -> Tensor:
        """x in the model's dtype, and channels_last where the model is (else as it comes: the CPU reference
        convolves the same strides, which keeps fp32 results equal to its rounding)."""
        x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.memory_format == torch.channels_last else x


def to_image(x: Tensor) -> Tensor:
    """Decoder output [3, H, W] in [-1, 1] -> IMAGE rows [H, W, 3] in [0, 1]."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(1, 2, 0)


def band_shard(r: Rank, bands: list[tuple[int, int]], scale: int, on_layer) -> Shard | None:
    if r.rank >= len(bands):
        return None  # fewer rows than workers: this rank sits the job out
    latent_bands = [(a // scale, b // scale) for a, b in bands]
    return Shard(r.rank, len(bands), r.groups[(0, len(bands))], latent_bands, r.is_cancelled, on_layer)


def progress_counter(r: Rank, total: int):
    done = [0]

    def tick(n: int = 1):
        done[0] += n
        if r.rank == 0:
            r.report(done[0], total)

    return tick


def band_runner(r: Rank, shard: Shard, op: str, forward: Callable[[Tensor], Tensor], band_px: int, layers: int):
    """forward itself, or its CUDA graph for this band shape when the band is small (see graphs.py).

    A replay fires no per-layer callbacks, so the ranks agree on cancelling before it and progress
    advances by a whole band after it."""
    if r.graphs is None or not graphs.wanted(r.device, band_px):
        return forward

    def replay(x: Tensor) -> Tensor:
        agree_cancel(shard, x.device)
        key = (op, tuple(x.shape), x.dtype, r.dtype, shard.rank, tuple(shard.latent_bands))
        out = r.graphs.run(key, forward, x, shard)
        shard.on_layer(layers)
        return out

    return replay


def exact_decode(ae: AutoEncoder, latent: Tensor, out: Tensor, r: Rank) -> None:
    B, _, h, _ = latent.shape
    s = ae.params.downscale
    bands = plan_bands(h, r.world)
    layers = count_layers(ae, "decode")
    shard = band_shard(r, bands, 1, progress_counter(r, B * layers))
    if shard is None:
        return
    a, b = bands[r.rank]

    def forward(z: Tensor) -> Tensor:  # [1, z, rows, w] float32 on the device -> IMAGE rows [8*rows, 8*w, 3]
        return to_image(decode_band(ae, r.to_band(z), shard)[0])

    run = band_runner(r, shard, "decode", forward, (b - a) * s * latent.shape[3] * s, layers)
    for i in range(B):
        out[i, a * s : b * s].copy_(run(latent[i : i + 1, :, a:b].to(r.device)))


def exact_encode(ae: AutoEncoder, pixels: Tensor, out: Tensor, r: Rank) -> None:
    B, H, _, _ = pixels.shape
    s = ae.params.downscale
    bands = plan_bands(H, r.world, unit=s)
    layers = count_layers(ae, "encode")
    shard = band_shard(r, bands, s, progress_counter(r, B * layers))
    if shard is None:
        return
    a, b = bands[r.rank]

    def forward(x: Tensor) -> Tensor:  # IMAGE rows [rows, W, 3] float32 on the device -> latent [z, rows/8, W/8]
        return encode_band(ae, r.to_band(x.permute(2, 0, 1)[None] * 2.0 - 1.0), shard)[0]

    run = band_runner(r, shard, "encode", forward, (b - a) * pixels.shape[2], layers)
    for i in range(B):
        out[i, :, a // s : b // s].copy_(run(pixels[i, a:b].to(r.device)))


def tiled(run_tile, inp_hw, tile: int, overlap: int, unit: int, scale: float, out_rows_first: bool, out, r: Rank):
    """Blend independently computed tiles into this rank's disjoint band of output rows.

    Tiles run through the same band forward as exact mode, with one rank (the GPU kernels, and on GPUs a CUDA
    graph per tile shape). A tile's result may live in a graph's static output: it is used before the next tile.

    `run_tile(i, y0, y1, x0, x1)` computes tile (y0:y1, x0:x1) of batch item i, in input units, and returns
    its output as [C, rows, cols] (before any final clamp). `out` is [B, rows, cols, C] if
    `out_rows_first` (IMAGE) else [B, C, rows, cols] (LATENT).
    """
    H, W = inp_hw
    rows, cols = plan_tiles(H, tile, overlap, unit), plan_tiles(W, tile, overlap, unit)
    out_H, out_W = round(H * scale), round(W * scale)
    ramp = round(overlap * scale)
    wy = blend_weights([(round(a * scale), round(b * scale)) for a, b in rows], out_H, ramp)
    wx = blend_weights([(round(a * scale), round(b * scale)) for a, b in cols], out_W, ramp)
    plan = plan_tile_rows(rows, scale, r.world)
    if r.rank >= len(plan):
        return
    (lo, hi), my_rows = plan[r.rank]
    B = out.shape[0]
    done, total = 0, B * len(my_rows) * len(cols)
    for i in range(B):
        acc = None
        for ty in my_rows:
            y0, y1 = round(rows[ty][0] * scale), round(rows[ty][1] * scale)
            c0, c1 = max(y0, lo), min(y1, hi)  # the part of this tile row inside the owned band
            for tx, (x0, x1) in enumerate(cols):
                if r.is_cancelled():
                    raise JobCancelled("cancelled")
                y = run_tile(i, *rows[ty], x0, x1).float()  # [C, y1-y0, tile cols]
                acc = acc if acc is not None else y.new_zeros(y.shape[0], hi - lo, out_W)
                weight = wy[ty][c0 - y0 : c1 - y0, None].to(y.device) * wx[tx][None, :].to(y.device)
                ox0, ox1 = round(x0 * scale), round(x1 * scale)
                acc[:, c0 - lo : c1 - lo, ox0:ox1] += y[:, c0 - y0 : c1 - y0] * weight
                done += 1
                if r.rank == 0:
                    r.report(done, total)
        if out_rows_first:
            out[i, lo:hi].copy_(to_image(acc))
        else:
            out[i, :, lo:hi].copy_(acc)


def tiled_decode(ae, latent: Tensor, out: Tensor, r: Rank, tile_px: int, overlap_px: int) -> None:
    s = ae.params.downscale
    shard = Shard(0, 1, None, [(0, 1)])  # a tile is a whole image of its own: the band forward with one rank

    def forward(z: Tensor) -> Tensor:  # [1, z, h, w] float32 on the device -> [3, 8h, 8w]
        return decode_band(ae, r.to_band(z), shard)[0]

    run = band_runner(r, shard, "decode tile", forward, tile_px * tile_px, layers=0)

    def run_tile(i, y0, y1, x0, x1):
        return run(latent[i : i + 1, :, y0:y1, x0:x1].to(r.device))

    tiled(run_tile, latent.shape[2:], tile_px // s, overlap_px // s, 1, s, True, out, r)


def tiled_encode(ae, pixels: Tensor, out: Tensor, r: Rank, tile_px: int, overlap_px: int) -> None:
    s = ae.params.downscale
    shard = Shard(0, 1, None, [(0, 1)])

    def forward(x: Tensor) -> Tensor:  # IMAGE tile [h, w, 3] float32 on the device -> latent [z, h/8, w/8]
        return encode_band(ae, r.to_band(x.permute(2, 0, 1)[None] * 2.0 - 1.0), shard)[0]

    run = band_runner(r, shard, "encode tile", forward, tile_px * tile_px, layers=0)

    def run_tile(i, y0, y1, x0, x1):
        return run(pixels[i, y0:y1, x0:x1].to(r.device))

    tiled(run_tile, pixels.shape[1:3], tile_px, overlap_px, s, 1 / s, False, out, r)


def run_job(ae: AutoEncoder, job: dict, inp: Tensor, out: Tensor, r: Rank) -> None:
    with torch.inference_mode():
        if isinstance(ae, (WanVAE, HunyuanVideoVAE, LTXVideoVAE)):
            from . import video_jobs  # here, not at the top: video_jobs builds on this module

            video_jobs.run_job(ae, job, inp, out, r)
        elif job["mode"] == "exact":
            (exact_decode if job["op"] == "decode" else exact_encode)(ae, inp, out, r)
        else:
            fn = tiled_decode if job["op"] == "decode" else tiled_encode
            fn(ae, inp, out, r, job["tile_px"], job["overlap_px"])
