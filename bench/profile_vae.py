"""Where the single-GPU time goes: the plain module vs the band path with one rank, and the top CUDA kernels.

python bench/profile_vae.py --size 1024 --dtype bf16
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bagel_vae_pp.autoencoder import random_autoencoder  # noqa: E402
from bagel_vae_pp.collectives import Shard  # noqa: E402
from bagel_vae_pp.sharded import decode_band, encode_band  # noqa: E402
from bench.timing import cuda_median_ms  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    dtype, dev = DTYPES[args.dtype], torch.device("cuda:0")
    ae = copy.deepcopy(random_autoencoder("flux")).to(dev, dtype)
    z = torch.randn(1, 16, args.size // 8, args.size // 8, device=dev, dtype=dtype)
    x = torch.rand(1, 3, args.size, args.size, device=dev, dtype=dtype) * 2 - 1
    shard = Shard(0, 1, None, [(0, args.size // 8)])
    cases = {
        "module decode": lambda: ae.decode(z),
        "band decode (1 rank)": lambda: decode_band(ae, z, shard),
        "module encode": lambda: ae.encode(x),
        "band encode (1 rank)": lambda: encode_band(ae, x, shard),
    }
    with torch.inference_mode():
        for benchmark in (False, True):
            torch.backends.cudnn.benchmark = benchmark
            for name, fn in cases.items():
                torch.cuda.reset_peak_memory_stats()
                ms = cuda_median_ms(fn)
                peak = torch.cuda.max_memory_allocated() / 2**30
                print(f"{name} (cudnn.benchmark={benchmark}): {ms:.1f} ms, peak {peak:.2f} GiB", flush=True)
        torch.backends.cudnn.benchmark = False
        for name in ("module decode", "band decode (1 rank)"):
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                cases[name]()
                torch.cuda.synchronize()
            print(f"\n## {name}: top CUDA kernels")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))


if __name__ == "__main__":
    main()
