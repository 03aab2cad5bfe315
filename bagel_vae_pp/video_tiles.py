"""Tiled mode for the video VAEs (Wan 2.1 / 2.2, HunyuanVideo): what ComfyUI's tiled video decode / encode computes
(`comfy.sd.VAE.decode_tiled` / `encode_tiled`, behind core VAE Decode (Tiled) / VAE Encode (Tiled)), its tiles dealt
across the pool.

Geometry, on the latent grid (time, rows, columns): tiles are placed as core places them (bands.plan_core_tiles) and
each runs through the model's own single-process decode / encode, so a temporal tile starts its causal caches afresh
at its first latent frame, which decodes to a single frame, exactly as core's tile does: latent frames [a, b) are
frames [4a, 4b - 3). Blend: core's feather (bands.feather_weights) on each axis, a tile's 3-D weight the product of
its three, the weighted sum normalised (core divides by the summed weights: for a grid of tiles that is the product
of the per-axis sums, so normalising per axis is the same blend). Decode blends in [-1, 1] and clamps after, as core.
Encode keeps 1 + 4k frames: core's tiled encode drops a last partial group, HunyuanVideo's too.

Dealing: the axis with the most tiles is split into consecutive groups of tiles, one group per rank
(bands.plan_tile_deal). A rank computes every tile of its group (with every tile of the other two axes), sums their
weighted outputs over the span they cover, hands the strip the next rank owns over in one all_gather, adds the strip
from the rank before and writes the span it owns. No tile is computed twice; the blend differs from a one-process
one only in the order of float additions. Ranks past the group count sit the job out.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from .bands import Interval, feather_weights, plan_core_tiles, plan_tile_deal
from .collectives import Shard, agree_cancel, all_gather_stacked
from .jobs import Rank, band_shard, progress_counter
from .video_jobs import to_frames


@dataclass(frozen=True)
class Axis:
    """One axis of the tile grid."""

    tiles: list[Interval]  # in latent units (latent frames, rows or columns)
    spans: list[Interval]  # where each tile's output lands, in output units
    size: int  # the output's length on this axis
    shares: list[Tensor]  # float32 [span length] per tile: its blend weight, normalised


def plan_axis(size: int, tile: int, overlap: int, scale: int, trim: int) -> Axis:
    """An axis of `size` latent units whose latent units [a, b) make output [scale*a, scale*b - trim): decode space
    (s, 0), decode time (4, 3); encode (1, 0). Core feathers over the overlap in output units, scale*overlap - trim."""
    tiles = plan_core_tiles(size, tile, overlap)
    spans = [(scale * a, scale * b - trim) for a, b in tiles]
    out = scale * size - trim
    return Axis(tiles, spans, out, feather_weights(spans, out, scale * overlap - trim))


def plan_axes(params, job: dict, latent_thw: tuple[int, int, int], op: str) -> list[Axis]:
    """The (time, rows, columns) axes of a job: tile_px / overlap_px in pixels, temporal_size / temporal_overlap in
    frames (whole latent frames: the host checked them), as the core tiled nodes take them."""
    ts, s = params.time_scale, params.downscale
    T, h, w = latent_thw
    tile_t, overlap_t = job["temporal_size"] // ts, job["temporal_overlap"] // ts
    tile, overlap = job["tile_px"] // s, job["overlap_px"] // s
    (st, trim), ss = ((ts, ts - 1), s) if op == "decode" else ((1, 0), 1)
    return [plan_axis(T, tile_t, overlap_t, st, trim)] + [plan_axis(n, tile, overlap, ss, 0) for n in (h, w)]


def hand_over(acc: Tensor, dim: int, strips: list[int], shard: Shard) -> None:
    """Send the last strips[rank] entries of `acc` along `dim` (the next rank owns them) and add the strip the rank
    before sent to the first entries: one all_gather of strips padded to the longest."""
    longest = max(strips)
    if shard.world == 1 or longest == 0:  # one rank, or tiles that do not overlap on this axis
        return
    mine = strips[shard.rank]
    strip = acc.new_zeros(*acc.shape[:dim], longest, *acc.shape[dim + 1 :])
    strip.narrow(dim, 0, mine).copy_(acc.narrow(dim, acc.shape[dim] - mine, mine))
    gathered, _ = all_gather_stacked(strip, shard)  # [world, *strip.shape]
    if shard.rank > 0:
        before = strips[shard.rank - 1]
        acc.narrow(dim, 0, before).add_(gathered[shard.rank - 1].narrow(dim, 0, before))


def blend_tiles(run_tile: Callable, axes: list[Axis], batch: int, r: Rank, write: Callable) -> None:
    """Compute this rank's tiles of each of `batch` items, blend, hand over, and `write(i, owned, blended)`.

    `run_tile(i, tiles)` gives item i's tile of latent intervals `tiles` (time, rows, columns) as [C, t, h, w] on the
    device (before any clamp); `write` gets this rank's owned slices (time, rows, columns) of the output and the
    blend there, [C, t, h, w] float32.
    """
    dealt = max(range(3), key=lambda d: len(axes[d].tiles))  # the first axis with the most tiles
    plan = plan_tile_deal(axes[dealt].spans, r.world)
    if r.rank >= len(plan):
        return  # fewer tiles on that axis than workers: this rank sits the job out
    (first, last), (start, stop), (own_start, own_stop) = plan[r.rank]
    grid = [range(len(a.tiles)) for a in axes]
    grid[dealt] = range(first, last)
    shard = band_shard(r, [g for g, _, _ in plan], 1, progress_counter(r, batch * math.prod(map(len, grid))))
    shares = [[w.to(r.device) for w in a.shares] for a in axes]
    extent = [a.size for a in axes]
    extent[dealt] = stop - start
    owned = [slice(None)] * 3
    owned[dealt] = slice(own_start, own_stop)
    for i in range(batch):
        acc = None
        for k in itertools.product(*grid):
            if r.is_cancelled():  # stop here; every rank stops at agree_cancel below
                break
            y = run_tile(i, [a.tiles[n] for a, n in zip(axes, k)]).float()  # [C, t, h, w]
            wt, wy, wx = (shares[d][n] for d, n in enumerate(k))
            acc = acc if acc is not None else y.new_zeros(y.shape[0], *extent)
            spans = [a.spans[n] for a, n in zip(axes, k)]
            spans[dealt] = (spans[dealt][0] - start, spans[dealt][1] - start)
            region = (slice(None), *(slice(a, b) for a, b in spans))
            acc[region] += y * (wt[:, None, None] * wy[None, :, None] * wx[None, None, :])
            shard.on_layer()
        agree_cancel(shard, r.device)
        hand_over(acc, 1 + dealt, [c[1] - o[1] for _, c, o in plan], shard)
        write(i, owned, acc.narrow(1 + dealt, 0, own_stop - own_start))


def tiled_decode(vae, job: dict, latent: Tensor, out: Tensor, r: Rank) -> None:
    B, _, T, h, w = latent.shape
    axes = plan_axes(vae.params, job, (T, h, w), "decode")
    video = out.view(B, -1, *out.shape[1:])  # [B, frames, H, W, 3]

    def run_tile(i, tiles):
        (t0, t1), (y0, y1), (x0, x1) = tiles
        return vae.decode(latent[i : i + 1, :, t0:t1, y0:y1, x0:x1].to(r.device, r.dtype))[0]  # [3, 4t-3, sh, sw]

    def write(i, owned, blended):
        video[i][tuple(owned)].copy_(to_frames(blended))

    blend_tiles(run_tile, axes, B, r, write)


def tiled_encode(vae, job: dict, pixels: Tensor, out: Tensor, r: Rank) -> None:
    ts, s = vae.params.time_scale, vae.params.downscale
    axes = plan_axes(vae.params, job, tuple(out.shape[2:]), "encode")

    def run_tile(i, tiles):
        (t0, t1), (y0, y1), (x0, x1) = tiles  # latent frames [t0, t1) are frames [4 t0, 4 t1 - 3)
        x = pixels[ts * t0 : ts * t1 - ts + 1, s * y0 : s * y1, s * x0 : s * x1].to(r.device)  # [t, H, W, 3]
        return vae.encode((x.permute(3, 0, 1, 2)[None] * 2.0 - 1.0).to(r.dtype))[0]  # [z, latent t, h, w]

    def write(i, owned, blended):
        out[0][(slice(None), *owned)].copy_(blended)

    blend_tiles(run_tile, axes, 1, r, write)


def run_tiled(vae, job: dict, inp: Tensor, out: Tensor, r: Rank) -> None:
    (tiled_decode if job["op"] == "decode" else tiled_encode)(vae, job, inp, out, r)
