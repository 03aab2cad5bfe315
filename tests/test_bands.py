"""Planning is pure: checked exhaustively over sizes and world sizes."""

import pytest
import torch

from bagel_vae_pp.bands import blend_weights, plan_bands, plan_tile_rows, plan_tiles


class TestPlanBands:
    @pytest.mark.parametrize("unit", [1, 8])
    def test_bands_cover_rows_contiguously_and_balanced(self, unit):
        for units in range(1, 70):
            for world in range(1, 10):
                bands = plan_bands(units * unit, world, unit)
                assert len(bands) == min(world, units)
                assert bands[0][0] == 0 and bands[-1][1] == units * unit
                assert all(a[1] == b[0] for a, b in zip(bands, bands[1:]))
                sizes = [(b - a) // unit for a, b in bands]
                assert all((b - a) % unit == 0 for a, b in bands)
                assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
                assert sizes == sorted(sizes, reverse=True)

    @pytest.mark.parametrize("rows,world,unit", [(0, 2, 1), (12, 2, 8), (8, 0, 1), (-8, 2, 8)])
    def test_bad_arguments_are_refused(self, rows, world, unit):
        with pytest.raises(ValueError):
            plan_bands(rows, world, unit)


class TestTiles:
    def test_tiles_cover_with_at_least_the_overlap(self):
        for size in range(1, 300, 7):
            for tile, overlap in [(16, 4), (32, 8), (64, 0), (24, 11)]:
                tiles = plan_tiles(size, tile, overlap)
                assert tiles[0][0] == 0 and tiles[-1][1] == size
                assert all(b - a == min(tile, size) for a, b in tiles)
                assert all(nxt[0] <= cur[1] - overlap for cur, nxt in zip(tiles, tiles[1:]))
                assert all(nxt[0] > cur[0] for cur, nxt in zip(tiles, tiles[1:]))

    def test_tile_starts_respect_the_unit(self):
        for size in range(64, 1000, 40):
            assert all(a % 8 == 0 for a, _ in plan_tiles(size, 128, 32, unit=8))

    def test_blend_weights_are_a_partition_of_unity(self):
        for size in range(1, 300, 5):
            for tile, overlap in [(16, 4), (40, 12), (64, 0)]:
                tiles = plan_tiles(size, tile, overlap)
                total = torch.zeros(size)
                for (a, b), w in zip(tiles, blend_weights(tiles, size, overlap)):
                    assert w.shape == (b - a,) and (w > 0).all()
                    total[a:b] += w
                torch.testing.assert_close(total, torch.ones(size), rtol=0, atol=1e-6)

    def test_tile_rows_give_each_worker_a_disjoint_band_and_the_tiles_it_needs(self):
        for rows in range(1, 200, 9):
            tiles = plan_tiles(rows, 16, 4)
            for world in range(1, 6):
                plan = plan_tile_rows(tiles, 8, world)
                assert len(plan) == min(world, len(tiles))
                assert plan[0][0][0] == 0 and plan[-1][0][1] == rows * 8
                assert all(a[0][1] == b[0][0] for a, b in zip(plan, plan[1:]))
                for (lo, hi), needed in plan:
                    touching = [i for i, (a, b) in enumerate(tiles) if a * 8 < hi and b * 8 > lo]
                    assert needed == touching
