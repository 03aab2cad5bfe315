"""The decoder's upsample as a folded sub-pixel conv (sharded.upsample_conv): equal to nearest-2x + 3x3 conv in
float64 with one rank, and band by band over real gloo processes on CPU."""

import multiprocessing

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ranks import gloo_group
from torch import nn

from bagel_vae_pp.collectives import Shard
from bagel_vae_pp.kernels import is_nhwc
from bagel_vae_pp.sharded import upsample_conv

# fp32: the folded taps are summed in fp32 and each output sums 4C products (9C in the reference): ~1e-7 relative
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float64: {"rtol": 1e-12, "atol": 1e-12}}


def one_rank(conv, x):
    return upsample_conv(conv, x, Shard(0, 1, None, [(0, x.shape[2])]))


def reference64(conv, x):
    """conv(nearest2x(x)) in float64."""
    return F.conv2d(F.interpolate(x.double(), scale_factor=2.0), conv.weight.double(), conv.bias.double(), padding=1)


def random_case(c, co, h, w, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, co, 3, padding=1).to(dtype)
    with torch.no_grad():
        conv.bias.normal_()  # a visible bias, so a wrongly repeated one would show
    return conv, torch.randn(2, c, h, w, dtype=dtype) + 0.5


class TestOneRank:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("layout", ["nchw", "channels_last"])
    @pytest.mark.parametrize("c,co,h,w", [(4, 4, 5, 7), (3, 5, 4, 6), (6, 2, 1, 1), (4, 4, 1, 5), (4, 3, 6, 1)])
    def test_equals_nearest_upsample_then_conv(self, dtype, layout, c, co, h, w):
        conv, x = random_case(c, co, h, w, dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            y = one_rank(conv, x)
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), reference64(conv, x), **TOL[dtype])
        fmt = torch.channels_last if is_nhwc(x) else torch.contiguous_format
        assert is_nhwc(y) == is_nhwc(x) and y.is_contiguous(memory_format=fmt)


def band_of(x, a, b):
    """Rows a:b, channels_last again if x is (as a GPU worker's band is: `Rank.to_band`)."""
    return x[:, :, a:b].contiguous(memory_format=torch.channels_last if is_nhwc(x) else torch.contiguous_format)


def band_worker(rank, world, store_path, cases, out_path):
    """One gloo rank: its band of every case, saved as a list of tensors."""
    with gloo_group(rank, world, store_path):
        out = []
        with torch.no_grad():
            for conv, x, bands in cases:
                a, b = bands[rank]
                out.append(upsample_conv(conv, band_of(x, a, b), Shard(rank, world, dist.group.WORLD, bands)))
        torch.save(out, out_path)


# (c, co, w, bands): uneven bands, 1-row bands at the top, middle and bottom, and a 1-row image edge
BANDS = {
    2: [
        (4, 4, 7, [(0, 3), (3, 5)]),
        (3, 5, 4, [(0, 1), (1, 4)]),
        (4, 4, 6, [(0, 1), (1, 2)]),
        (4, 2, 1, [(0, 2), (2, 3)]),
    ],
    3: [(4, 4, 7, [(0, 2), (2, 3), (3, 5)]), (3, 5, 6, [(0, 1), (1, 2), (2, 3)]), (4, 3, 5, [(0, 3), (3, 5), (5, 6)])],
}


@pytest.mark.parametrize("world", [2, 3])
def test_bands_over_gloo_ranks_give_the_reference_rows(tmp_path, world):
    cases = []
    for n, (c, co, w, bands) in enumerate(BANDS[world]):
        conv, x = random_case(c, co, bands[-1][1], w, seed=n)
        if n % 2:  # the GPU workers' layout: halo rows come back as channels_last views
            x = x.contiguous(memory_format=torch.channels_last)
        cases.append((conv, x, bands))
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that has run torch's thread pools
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    store = str(tmp_path / "store")
    procs = [ctx.Process(target=band_worker, args=(r, world, store, cases, outs[r])) for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    got = [torch.load(path) for path in outs]
    for n, (conv, x, bands) in enumerate(cases):
        ref = reference64(conv, x)
        for r, (a, b) in enumerate(bands):
            assert is_nhwc(got[r][n]) == is_nhwc(band_of(x, a, b))
            torch.testing.assert_close(got[r][n].double(), ref[:, :, 2 * a : 2 * b], **TOL[torch.float32])
