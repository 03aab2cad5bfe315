"""Planning is pure: checked exhaustively over sizes and world sizes."""

import pytest
import torch

from bagel_vae_pp.bands import (
    blend_weights,
    feather_weights,
    plan_bands,
    plan_core_tiles,
    plan_tile_deal,
    plan_tile_rows,
    plan_tiles,
)


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


# (tile, overlap) pairs as the video tiled mode accepts them (overlap below half a tile), and one beyond for placement.
CORE_TILES = [(4, 1), (4, 0), (5, 2), (16, 2), (8, 3), (3, 1), (2, 1)]


class TestCoreTiles:
    """Placement and feather of ComfyUI's tiled video decode / encode, against plain statements of its rules."""

    def test_tiles_start_every_tile_minus_overlap_and_stop_at_the_edge(self):
        for size in range(1, 80):
            for tile, overlap in CORE_TILES + [(6, 4)]:
                tiles = plan_core_tiles(size, tile, overlap)
                if size <= tile:
                    assert tiles == [(0, size)]
                    continue
                starts = [a for a, _ in tiles]
                assert starts == [k * (tile - overlap) for k in range(len(starts))]
                assert starts[-1] < size - overlap <= starts[-1] + tile - overlap  # the last start core makes
                assert all(b == min(a + tile, size) for a, b in tiles)
                assert tiles[-1][1] == size and all(nxt[0] <= cur[1] - overlap for cur, nxt in zip(tiles, tiles[1:]))

    @pytest.mark.parametrize("tile, overlap", [(4, 4), (4, 5), (4, -1)])
    def test_overlap_outside_0_to_tile_is_refused(self, tile, overlap):
        with pytest.raises(ValueError, match="must exceed overlap"):
            plan_core_tiles(10, tile, overlap)

    def test_feather_shares_are_core_masks_over_their_sum(self):
        for size in range(1, 60, 3):
            for tile, overlap in CORE_TILES:
                for scale, trim in [(1, 0), (8, 0), (4, 3)][: 3 if overlap else 2]:  # encode, decode space, time
                    tiles = plan_core_tiles(size, tile, overlap)
                    spans = [(scale * a, scale * b - trim) for a, b in tiles]
                    out, feather = scale * size - trim, scale * overlap - trim
                    masks = []
                    for a, b in spans:  # core's mask: multiply by (j + 1) / f at j and at n - 1 - j, j < f < n
                        m = [1.0] * (b - a)
                        for j in range(feather if feather < b - a else 0):
                            m[j] *= (j + 1) / feather
                            m[b - a - 1 - j] *= (j + 1) / feather
                        masks.append(torch.tensor(m, dtype=torch.float64))
                    total = torch.zeros(out, dtype=torch.float64)
                    for (a, b), m in zip(spans, masks):
                        total[a:b] += m
                    for (a, b), m, w in zip(spans, masks, feather_weights(spans, out, feather)):
                        torch.testing.assert_close(w.double(), m / total[a:b], rtol=0, atol=1e-7)

    def test_deal_gives_disjoint_owned_spans_and_strips_only_to_the_next_worker(self):
        for size in range(1, 120, 5):
            for tile, overlap in CORE_TILES:
                for scale, trim in [(1, 0), (4, 3)] if overlap else [(1, 0)]:  # time overlaps by >= 1 latent frame
                    tiles = plan_core_tiles(size, tile, overlap)
                    spans = [(scale * a, scale * b - trim) for a, b in tiles]
                    for world in range(1, 6):
                        plan = plan_tile_deal(spans, world)
                        groups = [g for g, _, _ in plan]
                        assert groups == plan_bands(len(spans), world)  # every tile once, in order
                        owned = [o for _, _, o in plan]
                        assert owned[0][0] == 0 and owned[-1][1] == scale * size - trim
                        assert all(a[1] == b[0] for a, b in zip(owned, owned[1:]))
                        for r, ((g0, g1), covered, (o0, o1)) in enumerate(plan):
                            assert covered == (spans[g0][0], max(b for _, b in spans[g0:g1]))
                            assert covered[0] == o0 <= o1 <= covered[1]
                            # what this worker covers beyond its own span lies inside the next worker's
                            assert r == len(plan) - 1 or covered[1] <= owned[r + 1][1]
                            # and no tile of another group reaches into what this worker owns, but its neighbours'
                            others = [spans[k] for k in range(len(spans)) if not g0 <= k < g1]
                            for a, b in others:
                                if a < o1 and b > o0:
                                    assert r > 0 and plan[r - 1][0][0] <= spans.index((a, b)) < plan[r - 1][0][1]
