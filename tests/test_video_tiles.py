"""Tiled mode of the video VAEs through the real pool (CPU workers, gloo, fp32) on tiny random Wan 2.1, Wan 2.2 and
HunyuanVideo VAEs, against `core_tiled`: ComfyUI's tiled video blend written out plainly in the test, over tiles the
single-process module decodes (encodes). Grids where tiles do not divide evenly (the last tile cut short on every
axis), the most tiles on each axis in turn (the pool deals that axis), 1, 2 and 3 workers.
"""

import itertools

import pytest
import torch
from video_checks import module_frames

from bagel_vae_pp.hunyuan_video import random_hunyuan_video
from bagel_vae_pp.wan import random_wan
from bagel_vae_pp.wan22 import random_wan22

pytestmark = pytest.mark.timeout(600)

VAES = {
    "wan2.1": lambda: random_wan("tiny", seed=11),
    "wan2.2": lambda: random_wan22("tiny", seed=11),
    "hunyuan-video": lambda: random_hunyuan_video("tiny", seed=11),
}
TS = 4  # frames per latent frame after the first, for all three
# Tiles: 4 latent units a side overlapping by 1 (32/8 px at 8x, 64/16 px at 16x); 4 latent frames overlapping by 2
# (16/8 frames: a 5-frame feather in time).
TEMPORAL = {"temporal_size": 16, "temporal_overlap": 8}
# latent (B, T, h, w): time tiles [0,4) [2,6) [4,7), row tiles [0,4) [3,7), column tiles [0,4) [3,7) [6,9): time
# has the most (and the first of equals) and is dealt; then rows (3 row tiles, one frame tile); then columns.
SHAPES = [(1, 7, 7, 9), (2, 3, 10, 5), (1, 2, 5, 9)]


def tiles_px(vae) -> dict:
    s = vae.params.downscale
    return {"tile_px": 4 * s, "overlap_px": s, **TEMPORAL}


def core_tiled(run_tile, sizes, tile, overlap, scale, trim):
    """ComfyUI's tiled video blend, float64, on an input grid `sizes` (time, rows, columns). Per axis: tiles start at
    0, L - o, 2 (L - o), ... below n - o (one tile when n <= L), the last cut at the edge; a tile of input [a, b)
    lands at output [scale a, scale b - trim). A tile's mask is ramped by (j + 1) / f at j = 0..f-1 from both of its
    ends on every axis where it is longer than f = scale o - trim; the outputs times their masks are summed and
    divided by the summed masks."""
    starts = [range(0, n - o, L - o) if n > L else [0] for n, L, o in zip(sizes, tile, overlap)]
    out = [sc * n - tr for sc, n, tr in zip(scale, sizes, trim)]
    acc, div = None, torch.zeros(out, dtype=torch.float64)
    for corner in itertools.product(*starts):
        box = [(a, min(a + L, n)) for a, L, n in zip(corner, tile, sizes)]
        y = run_tile(box).double()  # [C, t, h, w]
        mask = torch.ones(y.shape[1:], dtype=torch.float64)
        for d in range(3):
            f, m = scale[d] * overlap[d] - trim[d], mask.shape[d]
            if f < m:
                for j in range(f):
                    mask.narrow(d, j, 1).mul_((j + 1) / f)
                    mask.narrow(d, m - 1 - j, 1).mul_((j + 1) / f)
        region = tuple(slice(sc * a, sc * a + m) for sc, (a, _), m in zip(scale, box, mask.shape))
        acc = acc if acc is not None else torch.zeros(y.shape[0], *out, dtype=torch.float64)
        acc[(slice(None), *region)] += y * mask
        div[region] += mask
    return acc / div


def reference_decode(vae, z):
    """IMAGE frames [B*frames, H, W, 3] of core's tiled decode of z [B, C, T, h, w] with `tiles_px(vae)`."""
    s = vae.params.downscale

    def video(zi):
        def run_tile(box):
            (t0, t1), (y0, y1), (x0, x1) = box
            with torch.inference_mode():
                return vae.decode(zi[None, :, t0:t1, y0:y1, x0:x1])[0]

        y = core_tiled(run_tile, zi.shape[1:], (4, 4, 4), (2, 1, 1), (TS, s, s), (TS - 1, 0, 0))
        return ((y + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0)  # [frames, H, W, 3]

    return torch.cat([video(zi) for zi in z])


def reference_encode(vae, frames, latent_thw):
    """Core's tiled encode of IMAGE frames [N, H, W, 3] with `tiles_px(vae)`, on the latent grid: latent frames
    [t0, t1) are frames [4 t0, 4 t1 - 3), latent rows [y0, y1) pixel rows [s y0, s y1)."""
    s = vae.params.downscale

    def run_tile(box):
        (t0, t1), (y0, y1), (x0, x1) = box
        x = frames[TS * t0 : TS * t1 - TS + 1, s * y0 : s * y1, s * x0 : s * x1]
        with torch.inference_mode():
            return vae.encode(x.permute(3, 0, 1, 2)[None] * 2 - 1)[0]

    return core_tiled(run_tile, latent_thw, (4, 4, 4), (2, 1, 1), (1, 1, 1), (0, 0, 0))[None]


# Every kind with time dealt; the dealing of rows and columns (the same code for every kind) on Wan 2.1.
def case(kind: str, i: int):
    return pytest.param(kind, SHAPES[i], id=f"{kind}-{('time', 'rows', 'columns')[i]}-dealt")


DECODE_CASES = [case(kind, 0) for kind in VAES] + [case("wan2.1", 1), case("wan2.1", 2)]
ENCODE_CASES = [case(kind, 0) for kind in VAES] + [case("wan2.1", 2)]


@pytest.mark.parametrize("kind, shape", DECODE_CASES)
def test_decode_equals_core_tiling_on_any_worker_count(cpu_pool, kind, shape):
    vae = VAES[kind]()
    B, T, h, w = shape
    z = torch.randn(B, vae.params.z_channels, T, h, w, generator=torch.Generator().manual_seed(T + h))
    ref = reference_decode(vae, z)
    assert (ref.double() - module_frames(vae, z).double()).abs().max() > 1e-3, "tiling must change the frames here"
    err = {}  # workers -> max abs error; frames are in [0, 1]
    for n in (1, 2, 3):
        err[n] = (cpu_pool(n).decode(vae, z, "tiled", **tiles_px(vae)).double() - ref).abs().max().item()
    print(f"{kind} {shape}: {err}")
    assert max(err.values()) <= 1e-5, err


@pytest.mark.parametrize("kind, shape", ENCODE_CASES)
def test_encode_equals_core_tiling_on_any_worker_count(cpu_pool, kind, shape):
    vae = VAES[kind]()
    _, T, h, w = shape
    s = vae.params.downscale
    gen = torch.Generator().manual_seed(w)
    frames = torch.rand(1 + TS * (T - 1) + 2, s * h, s * w, 3, generator=gen)  # 2 frames of a partial group, dropped
    ref = reference_encode(vae, frames, (T, h, w))
    err = {}
    for n in (1, 2, 3):
        out = cpu_pool(n).encode(vae, frames, "tiled", **tiles_px(vae))
        assert out.shape == ref.shape
        err[n] = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    print(f"{kind} {shape}: {err}")
    assert max(err.values()) <= 1e-5, err


@pytest.mark.parametrize(
    "tiles, message",
    [
        ({"tile_px": 36}, r"tile_size/overlap: got 36/8; both must be multiples of 8"),
        ({"overlap_px": 16}, r"tile_size/overlap: got 32/16; .* overlap must be less than half the tile size"),
        ({"temporal_size": 18}, r"temporal_size/temporal_overlap: got 18/8 frames; both must be multiples of 4"),
        ({"temporal_size": 4, "temporal_overlap": 4}, r"got 4/4 frames; .* temporal_size at least 8"),
        ({"temporal_overlap": 0}, r"got 16/0 frames; .* temporal_overlap from 4 up to half of temporal_size"),
        ({"temporal_overlap": 12}, r"got 16/12 frames; .* temporal_overlap from 4 up to half of temporal_size"),
    ],
)
def test_bad_tiles_get_one_clear_error_naming_the_input_and_the_pool_still_decodes(cpu_pool, tiles, message):
    vae, pool = VAES["wan2.1"](), cpu_pool(2)
    z = torch.randn(1, 4, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=message):
        pool.decode(vae, z, "tiled", **{"tile_px": 32, "overlap_px": 8, **TEMPORAL, **tiles})
    out = pool.decode(vae, z, "tiled", **tiles_px(vae))
    assert (out.double() - reference_decode(vae, z)).abs().max() <= 1e-5
