"""Expert order of a block's token rows (experts.Rows): each expert's rows one contiguous slice, batched passes too."""

import torch

from bagel_vae_pp.bagel.experts import Rows


class TestRows:
    def test_rows_pack_and_unpack_are_inverse(self):
        x = torch.arange(7.0)
        for gen in (None, slice(0, 7), slice(1, 6), slice(0, 3), slice(4, 7), slice(3, 3)):
            rows = Rows(7, gen)
            packed = rows.pack(x)
            if gen is not None and gen.stop > gen.start:
                assert packed[rows.m :].tolist() == x[gen].tolist()  # generation rows last
            assert rows.unpack(packed).tolist() == x.tolist()
            assert rows.unpack(packed, before=-x[:2]).tolist() == [-0.0, -1.0, *x.tolist()]

    def test_batched_rows_are_every_pass_s_understanding_rows_then_every_pass_s_generation_rows(self):
        rows = Rows(6, slice(1, 5), passes=2)  # pass p's token i is row 6p + i of a [12] input
        packed = rows.pack(torch.arange(12))
        assert packed.tolist() == [0, 5, 6, 11, 1, 2, 3, 4, 7, 8, 9, 10]
        assert rows.pack(torch.arange(6)).tolist() == [0, 5, 0, 5, 1, 2, 3, 4, 1, 2, 3, 4]  # one block, two passes
        assert [r for r, _ in rows.parts("und", "gen")] == [slice(0, 4), slice(4, 12)]
        assert [rows.unpack(rows.of_pass(packed, p)).tolist() for p in range(2)] == [list(range(6)), list(range(6, 12))]
        assert torch.equal(rows.join([rows.of_pass(packed, p) for p in range(2)]), packed)
