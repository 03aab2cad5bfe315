"""Pure planning: row bands for exact mode, tiles and blend weights for tiled mode (images; and the video VAEs, whose
tiles are placed and feathered as ComfyUI's tiled video decode / encode does).

Every rank calls these with the same arguments and gets the same plan, so no rank ever waits in a
collective that another rank skipped. Intervals are half-open `(start, stop)` row or column ranges.
"""

from __future__ import annotations

import math

import torch

Interval = tuple[int, int]


def plan_bands(rows: int, world: int, unit: int = 1) -> list[Interval]:
    """Split `rows` into at most `world` balanced contiguous bands whose edges are multiples of `unit`.

    Fewer bands than `world` come back when there are fewer units than workers; the first
    `units % bands` bands get one unit more.

    Args:
        rows: rows to split (a multiple of `unit`).
        world: number of workers available.
        unit: granularity; 1 for a decoder latent, the downscale factor (8) for encoder pixels.
    """
    if rows <= 0 or rows % unit:
        raise ValueError(f"rows must be a positive multiple of {unit}, got {rows}.")
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}.")
    units = rows // unit
    parts = min(world, units)
    base, extra = divmod(units, parts)
    bands, start = [], 0
    for i in range(parts):
        stop = start + (base + (i < extra)) * unit
        bands.append((start, stop))
        start = stop
    return bands


def plan_tiles(size: int, tile: int, overlap: int, unit: int = 1) -> list[Interval]:
    """Evenly spaced tiles of length `tile` covering `size`, neighbours overlapping by at least `overlap`.

    Starts are multiples of `unit` (8 for encoder pixels, so each tile maps onto whole latent rows).
    """
    if tile <= overlap or tile % unit or overlap < 0:
        raise ValueError(
            f"tile ({tile}) must exceed overlap ({overlap}) and be a multiple of {unit}; overlap must be >= 0."
        )
    if size <= tile:
        return [(0, size)]
    count = math.ceil((size - overlap) / (tile - overlap))
    span = size - tile
    starts = [(i * span // (count - 1)) // unit * unit for i in range(count)]
    starts[-1] = span  # end flush with the image edge
    return [(s, s + tile) for s in starts]


def blend_weights(tiles: list[Interval], size: int, ramp: int) -> list[torch.Tensor]:
    """1-D weights per tile, normalised to sum to 1 at every position (a partition of unity).

    Each tile's raw weight rises linearly over `ramp` positions at an edge it shares with another tile
    and is 1 at the image edge. Normalising per axis is exact for a grid of tiles because 2-D weights are
    products of the row and column weights.
    """
    raw = []
    for start, stop in tiles:
        w = torch.ones(stop - start, dtype=torch.float64)
        n = min(ramp, (stop - start) // 2)
        up = torch.arange(1, n + 1, dtype=torch.float64) / (n + 1)
        if start > 0 and n:
            w[:n] = up
        if stop < size and n:
            w[-n:] = torch.minimum(w[-n:], up.flip(0))
        raw.append(w)
    return normalised(tiles, raw, size)


def normalised(tiles: list[Interval], raw: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """Raw float64 weights per tile divided by their sum over the tiles at each position, as float32."""
    total = torch.zeros(size, dtype=torch.float64)
    for (start, stop), w in zip(tiles, raw):
        total[start:stop] += w
    return [(w / total[start:stop]).float() for (start, stop), w in zip(tiles, raw)]


def plan_core_tiles(size: int, tile: int, overlap: int) -> list[Interval]:
    """Tiles along one axis placed as ComfyUI's tiled video decode / encode places them: one tile (0, size) when it
    fits, else starts 0, tile - overlap, 2 (tile - overlap), ... while a start is below size - overlap, the last tile
    cut short at the edge (never moved back to end flush, unlike plan_tiles).
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"tile ({tile}) must exceed overlap ({overlap}), and overlap must be >= 0.")
    if size <= tile:
        return [(0, size)]
    return [(start, min(start + tile, size)) for start in range(0, size - overlap, tile - overlap)]


def feather_weights(spans: list[Interval], size: int, feather: int) -> list[torch.Tensor]:
    """ComfyUI's video feather along one axis, normalised: each tile's share at every position of its span.

    A tile's raw weight is multiplied by 1/f, 2/f, ..., f/f over the f positions in from *each* of its ends (the
    image edge too; at a position no other tile covers it normalises to 1 anyway), the two ramps multiplying where
    they meet; a tile no longer than f keeps weight 1. Shares are raw weights over their sum at each position.
    """
    raw = []
    for start, stop in spans:
        w = torch.ones(stop - start, dtype=torch.float64)
        if 0 < feather < stop - start:
            up = torch.arange(1, feather + 1, dtype=torch.float64) / feather
            w[:feather] *= up
            w[-feather:] *= up.flip(0)
        raw.append(w)
    return normalised(spans, raw, size)


def plan_tile_deal(spans: list[Interval], world: int) -> list[tuple[Interval, Interval, Interval]]:
    """Deal tiles along one axis to workers, none computed twice: per worker (its tiles as an index range, the span
    they cover, the span it owns).

    Workers take consecutive groups of tiles (plan_bands) and own from their first tile's start to the next worker's
    first tile's start, so the owned spans partition the axis; the end of a worker's covered span that the next one
    owns is the strip it hands over. `spans` are sorted tiles, each overlapping only its neighbours (overlap below
    half a tile), so a handed-over strip never reaches past the receiver's owned span.
    """
    groups = plan_bands(len(spans), world)
    covered = [(spans[first][0], spans[last - 1][1]) for first, last in groups]
    stops = [start for start, _ in covered[1:]] + [covered[-1][1]]
    for (_, before), stop in zip(covered, stops[1:]):
        assert before <= stop, (spans, world)
    return [(g, c, (c[0], stop)) for g, c, stop in zip(groups, covered, stops)]


def plan_tile_rows(row_tiles: list[Interval], scale: float, world: int) -> list[tuple[Interval, list[int]]]:
    """Deal tile rows to workers: each owns a disjoint band of output rows and the tile rows covering it.

    Tile rows are split into contiguous groups; the boundary between two groups sits in the middle of the
    overlap of their neighbouring tile rows. A worker computes every tile row that touches its owned
    band, so a tile row next to a boundary is computed by both workers (no communication, no shared
    accumulation). Returns per worker `((out_start, out_stop), [tile_row indices])`.
    """
    out = [(round(a * scale), round(b * scale)) for a, b in row_tiles]
    groups = plan_bands(len(out), world)
    cuts = [0]
    for (_, stop), (start, _) in zip(groups, groups[1:]):
        cuts.append((out[start][0] + out[stop - 1][1]) // 2)
    cuts.append(out[-1][1])
    plan = []
    for lo, hi in zip(cuts, cuts[1:]):
        rows = [i for i, (a, b) in enumerate(out) if a < hi and b > lo]
        plan.append(((lo, hi), rows))
    return plan
