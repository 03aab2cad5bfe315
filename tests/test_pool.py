"""The worker pool against the single-process result, and its lifecycle (real gloo processes on CPU).

Faults, interrupts, bad inputs, soak, threads and security are in test_faults.py.
"""

import os
import time

import pytest
import torch

from bagel_vae_pp import shm
from bagel_vae_pp.bands import plan_tiles
from bagel_vae_pp.pool import PoolSpec, WorkerPool

pytestmark = pytest.mark.timeout(120)  # a broken deadline fails the test instead of hanging the run

TOL = {"rtol": 0, "atol": 1e-4}  # fp32: images live in [0, 1], so this is also ~1e-4 relative


def reference_decode(ae, latent):
    with torch.inference_mode():
        return ((ae.decode(latent) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)


def reference_encode(ae, pixels):
    with torch.inference_mode():
        return ae.encode(pixels.permute(0, 3, 1, 2) * 2 - 1)


def sky_and_ground(batch, channels, h, w, seed=0):
    """Latents whose top and bottom bands differ strongly in mean, so a GroupNorm that merged
    statistics wrongly (within-band variance only) would be visibly off."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.linspace(-3, 3, h)[None, None, :, None]
    return torch.randn(batch, channels, h, w, generator=g) + offset


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class TestExactness:
    @pytest.mark.parametrize("workers", [1, 2, 3, 4])
    @pytest.mark.parametrize("h,w,batch", [(11, 7, 2), (4, 5, 1)])
    def test_decode_equals_single_process(self, cpu_pool, tiny_vae, workers, h, w, batch):
        latent = sky_and_ground(batch, 16, h, w)
        out = cpu_pool(workers).decode(tiny_vae, latent)
        assert out.shape == (batch, 8 * h, 8 * w, 3) and out.dtype == torch.float32
        torch.testing.assert_close(out, reference_decode(tiny_vae, latent), **TOL)

    @pytest.mark.parametrize("workers", [1, 2, 3, 4])
    @pytest.mark.parametrize("H,W,batch", [(88, 40, 2), (24, 16, 1)])
    def test_encode_equals_single_process(self, cpu_pool, tiny_vae, workers, H, W, batch):
        pixels = torch.rand(batch, H, W, 3)
        pixels[:, : H // 2] *= 0.2  # dark top, bright bottom
        out = cpu_pool(workers).encode(tiny_vae, pixels)
        ref = reference_encode(tiny_vae, pixels)
        assert out.shape == (batch, 16, H // 8, W // 8)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * ref.abs().max().item())

    def test_fewer_latent_rows_than_workers(self, cpu_pool, tiny_vae):
        latent = sky_and_ground(1, 16, 2, 3)
        torch.testing.assert_close(cpu_pool(4).decode(tiny_vae, latent), reference_decode(tiny_vae, latent), **TOL)

    def test_a_one_by_one_latent_decodes(self, cpu_pool, tiny_vae):
        latent = sky_and_ground(1, 16, 1, 1)
        torch.testing.assert_close(cpu_pool(3).decode(tiny_vae, latent), reference_decode(tiny_vae, latent), **TOL)

    def test_sd_family_vae_with_quant_convs(self, cpu_pool, tiny_sd_vae):
        latent = sky_and_ground(1, 4, 9, 6)
        torch.testing.assert_close(
            cpu_pool(3).decode(tiny_sd_vae, latent), reference_decode(tiny_sd_vae, latent), **TOL
        )
        pixels = torch.rand(1, 72, 48, 3)
        ref = reference_encode(tiny_sd_vae, pixels)
        torch.testing.assert_close(
            cpu_pool(3).encode(tiny_sd_vae, pixels), ref, rtol=0, atol=1e-4 * ref.abs().max().item()
        )

    def test_encode_crops_odd_sizes_around_the_centre_like_core(self, cpu_pool, tiny_vae):
        pixels = torch.rand(1, 53, 70, 4)  # RGBA, 53 = 6*8 + 5 -> crop 2 rows top, 3 bottom
        out = cpu_pool(2).encode(tiny_vae, pixels)
        ref = reference_encode(tiny_vae, pixels[:, 2:50, 3:67, :3].contiguous())
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


class TestTiled:
    def test_one_tile_covering_the_image_is_exact(self, cpu_pool, tiny_vae):
        latent = sky_and_ground(1, 16, 6, 5)
        out = cpu_pool(2).decode(tiny_vae, latent, mode="tiled", tile_px=64, overlap_px=16)
        torch.testing.assert_close(out, reference_decode(tiny_vae, latent), **TOL)

    @pytest.mark.parametrize("op", ["decode", "encode"])
    def test_workers_agree_with_one_worker(self, cpu_pool, tiny_vae, op):
        data = sky_and_ground(2, 16, 19, 13) if op == "decode" else torch.rand(1, 152, 104, 3)
        kwargs = {"mode": "tiled", "tile_px": 64, "overlap_px": 16}
        one = getattr(cpu_pool(1), op)(tiny_vae, data, **kwargs)
        three = getattr(cpu_pool(3), op)(tiny_vae, data, **kwargs)
        torch.testing.assert_close(three, one, rtol=0, atol=1e-5 * one.abs().max().item())

    def test_bad_tile_geometry_names_the_inputs(self, cpu_pool, tiny_vae):
        with pytest.raises(ValueError, match="tile_size/overlap: got 64/40"):
            cpu_pool(2).decode(tiny_vae, torch.randn(1, 16, 4, 4), mode="tiled", tile_px=64, overlap_px=40)


class TestLifecycle:
    def test_two_vaes_two_jobs_then_shutdown_leaves_no_process(self, tiny_vae, tiny_sd_vae):
        pool = WorkerPool(PoolSpec.parse("cpu:2", "fp32"))
        try:
            a = pool.decode(tiny_vae, sky_and_ground(1, 16, 5, 4))
            pids = [p.pid for p in pool.procs]
            b = pool.decode(tiny_sd_vae, sky_and_ground(1, 4, 5, 4))
            assert [p.pid for p in pool.procs] == pids  # same workers, new weights
            assert a.shape == b.shape == (1, 40, 32, 3)
            folder = pool.dir
        finally:
            pool.shutdown()
        time.sleep(0.2)
        assert not any(alive(pid) for pid in pids)
        assert not os.path.exists(folder)
        assert not pool.is_running

    def test_make_room_hears_the_devices_and_a_per_worker_estimate_before_the_job(self, cpu_pool, tiny_vae):
        asked = []
        cpu_pool(2).decode(tiny_vae, sky_and_ground(1, 16, 8, 8), make_room=lambda d, n: asked.append((d, n)))
        cpu_pool(2).encode(tiny_vae, torch.rand(1, 64, 64, 3), make_room=lambda d, n: asked.append((d, n)))
        assert [d for d, _ in asked] == [("cpu", "cpu")] * 2
        share = 64 * 64 / 2  # pixels per worker; fp32 doubles the bf16 figure
        assert asked[0][1] == int(2400 * share * 2 + (1 << 30)) and asked[1][1] == int(1700 * share * 2 + (1 << 30))

    def test_progress_reaches_the_total(self, cpu_pool, tiny_vae):
        seen = []
        cpu_pool(2).decode(tiny_vae, sky_and_ground(1, 16, 4, 4), progress=lambda d, t: seen.append((d, t)))
        assert seen and seen[-1][0] == seen[-1][1]


class TestSharedFiles:
    """Output files are reused once the caller drops the image (fresh shared memory faults per 4 KiB page):
    never while a tensor on them lives, never with stale rows, and never more than keep_free of them idle."""

    def test_an_image_still_held_is_never_overwritten(self, cpu_pool, tiny_vae):
        pool = cpu_pool(3)
        first_latent, second_latent = sky_and_ground(1, 16, 7, 5, seed=1), sky_and_ground(1, 16, 7, 5, seed=2)
        first = pool.decode(tiny_vae, first_latent)
        kept = first.clone()
        row = first[0, 3]  # a view keeps the file as busy as the tensor does
        del first
        second = pool.decode(tiny_vae, second_latent)
        torch.testing.assert_close(second, reference_decode(tiny_vae, second_latent), **TOL)
        assert torch.equal(row, kept[0, 3])

    def test_a_dropped_image_lends_its_file_to_the_next_job_with_no_stale_rows(self, cpu_pool, tiny_vae):
        pool = cpu_pool(2)
        address = pool.decode(tiny_vae, sky_and_ground(1, 16, 6, 4, seed=3)).data_ptr()  # dropped at once
        for seed in (4, 5, 6):
            latent = sky_and_ground(1, 16, 6, 4, seed=seed)
            out = pool.decode(tiny_vae, latent)
            assert out.data_ptr() == address  # the same file, through the host's one mapping of it
            torch.testing.assert_close(out, reference_decode(tiny_vae, latent), **TOL)
            del out

    def test_idle_files_beyond_keep_free_are_unlinked_and_unmapped_by_the_workers(self, cpu_pool, tiny_vae):
        pool = cpu_pool(2)
        outputs = lambda: sorted(f for f in os.listdir(pool.dir) if f.startswith("output"))  # noqa: E731
        held = [pool.decode(tiny_vae, sky_and_ground(1, 16, 3, 3 + i)) for i in range(4)]  # four sizes, all held
        assert len(outputs()) >= 4
        del held
        pool.decode(tiny_vae, sky_and_ground(1, 16, 3, 8))  # the next job trims the idle ones
        assert len(outputs()) <= pool.staging.outputs.keep_free + 1
        monkeypatch_keep, pool.staging.outputs.keep_free = pool.staging.outputs.keep_free, 0
        try:
            pool.decode(tiny_vae, sky_and_ground(1, 16, 3, 9))  # trims the file the workers wrote last job
        finally:
            pool.staging.outputs.keep_free = monkeypatch_keep
        for proc in pool.procs:
            with open(f"/proc/{proc.pid}/maps") as f:
                mapped = {line.split(None, 5)[5].strip() for line in f if f"{pool.dir}/output" in line}
            assert mapped and not any(path.endswith("(deleted)") for path in mapped), mapped

    def test_an_image_outlives_the_pool(self, tiny_vae):
        pool = WorkerPool(PoolSpec.parse("cpu:2", "fp32"))
        try:
            latent = sky_and_ground(1, 16, 5, 4, seed=7)
            out = pool.decode(tiny_vae, latent)
            kept = out.clone()
        finally:
            pool.shutdown()  # unlinks the pool's folder; the image keeps its pages
        assert torch.equal(out, kept)
        torch.testing.assert_close(out, reference_decode(tiny_vae, latent), **TOL)


class TestOutputFiles:
    def test_busy_until_the_last_view_dies(self, tmp_path):
        files = shm.OutputFiles(lambda nbytes, name: str(tmp_path), keep_free=1)
        path, t = files.acquire((2, 3))
        t.fill_(7.0)
        view = t[1]
        del t
        other, u = files.acquire((2, 3))
        assert other != path and torch.equal(view, torch.full((3,), 7.0))
        del view
        again, _ = files.acquire((3, 2))  # same size, other shape: reused
        assert again == path
        del u
        assert files.trim() == [] and os.path.exists(other)  # one idle file is within keep_free

    def test_trim_unlinks_the_least_recently_used_idle_files(self, tmp_path):
        files = shm.OutputFiles(lambda nbytes, name: str(tmp_path), keep_free=1)
        paths = [files.acquire((4,))[0] for _ in range(3)]  # each tensor dropped at once: all idle
        assert len(set(paths)) == 1  # ... so each acquire reused the first
        held = [files.acquire((5,)), files.acquire((5,)), files.acquire((6,))]
        del held
        released = files.trim()
        assert len(released) == 3 and not any(os.path.exists(p) for p in released)
        assert len(os.listdir(tmp_path)) == 1


def ramp(start: int, stop: int, size: int, ramp_px: int) -> torch.Tensor:
    """Raw feathering weight of a tile spanning [start, stop) of `size`, float64: it climbs as (d + 1) / (ramp_px
    + 1) with the distance d from an edge it shares with a neighbour (reaching 1 after ramp_px values) and is
    flat against the image edge."""
    d = torch.arange(stop - start, dtype=torch.float64)
    w = torch.ones_like(d)
    if start > 0:
        w = torch.minimum(w, (d + 1) / (ramp_px + 1))
    if stop < size:
        w = torch.minimum(w, (d.flip(0) + 1) / (ramp_px + 1))
    return w


def decoded_tiles(ae, latent):
    """Tile (y0:y1, x0:x1) of `latent` [z, h, w] -> [3, 8(y1-y0), 8(x1-x0)] by the in-process module, before the
    IMAGE clamp (tiled mode blends tiles, then clamps the blend)."""

    def tile(y0, y1, x0, x1):
        with torch.inference_mode():
            return ae.decode(latent[None, :, y0:y1, x0:x1])[0]

    return tile


def encoded_tiles(ae, pixels):
    """Tile (y0:y1, x0:x1) of IMAGE `pixels` [1, H, W, 3] -> [z, (y1-y0)/8, (x1-x0)/8] by the in-process module."""
    return lambda y0, y1, x0, x1: reference_encode(ae, pixels[:, y0:y1, x0:x1])[0]


def feathered(run_tile, H, W, tile, overlap, unit, scale):
    """A plain feathered-tile reference: every tile of the grid weighted by the product of its row and column
    ramps, the weighted sum divided by the sum of the weights at each output position. Float64 [C, H', W']."""
    rows, cols = plan_tiles(H, tile, overlap, unit), plan_tiles(W, tile, overlap, unit)
    out_H, out_W, ramp_px = round(H * scale), round(W * scale), round(overlap * scale)
    acc, total = None, torch.zeros(out_H, out_W, dtype=torch.float64)
    for y0, y1 in rows:
        for x0, x1 in cols:
            oy0, oy1, ox0, ox1 = (round(v * scale) for v in (y0, y1, x0, x1))
            w = ramp(oy0, oy1, out_H, ramp_px)[:, None] * ramp(ox0, ox1, out_W, ramp_px)[None]  # [h', w']
            y = run_tile(y0, y1, x0, x1).double()  # [C, h', w']
            acc = acc if acc is not None else torch.zeros(y.shape[0], out_H, out_W, dtype=torch.float64)
            acc[:, oy0:oy1, ox0:ox1] += w * y
            total[oy0:oy1, ox0:ox1] += w
    return acc / total


class TestTiledAgainstPlainFeathering:
    """Tiled mode against `feathered` on tiles decoded (encoded) by the in-process module in fp32, so a wrong ramp
    or normalisation shows (tiled mode is approximate, but exactly this approximation), on 1, 2 and 3 workers."""

    # (batch, latent h, w), tile_px, overlap_px: tiles overlapping both ways; five tile rows over a single column
    # narrower than a tile; a ramp of 32 px. plan_tiles keeps every tile whole (the last one flush with the edge,
    # so overlaps differ in width): the only short tile is a single one spanning the image.
    CASES = [((2, 19, 13), 64, 16), ((1, 27, 5), 64, 16), ((1, 14, 14), 80, 32)]

    @pytest.mark.parametrize("shape,tile_px,overlap_px", CASES)
    def test_decode(self, cpu_pool, tiny_vae, shape, tile_px, overlap_px):
        B, h, w = shape
        latent = sky_and_ground(B, 16, h, w)
        refs = [feathered(decoded_tiles(tiny_vae, z), h, w, tile_px // 8, overlap_px // 8, 1, 8) for z in latent]
        ref = ((torch.stack(refs) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)  # [B, 8h, 8w, 3]
        err = {}  # workers -> max abs error; images are in [0, 1]
        for workers in (1, 2, 3):
            out = cpu_pool(workers).decode(tiny_vae, latent, mode="tiled", tile_px=tile_px, overlap_px=overlap_px)
            err[workers] = (out.double() - ref).abs().max().item()
        assert max(err.values()) <= TOL["atol"], err

    @pytest.mark.parametrize("H,W", [(152, 104), (216, 40)])
    def test_encode(self, cpu_pool, tiny_vae, H, W):
        pixels = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(W))
        ref = feathered(encoded_tiles(tiny_vae, pixels), H, W, 64, 16, 8, 1 / 8)  # [z, H/8, W/8]
        err = {}  # workers -> max abs error relative to the largest latent value
        for workers in (1, 2, 3):
            out = cpu_pool(workers).encode(tiny_vae, pixels, mode="tiled", tile_px=64, overlap_px=16)
            err[workers] = ((out[0].double() - ref).abs().max() / ref.abs().max()).item()
        assert max(err.values()) <= 1e-4, err
