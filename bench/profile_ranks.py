"""Profile one rank of an N-GPU exact decode (NCCL, one process per GPU, no pool) to find fixed overheads.

Prints, for rank 0: the median band-decode time with the cancel check as shipped and with it disabled,
then the top operators by CPU time and by CUDA time; writes a chrome trace when --trace is given.

    python bench/profile_ranks.py --workers 4 --size 1024
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bagel_vae_pp import collectives  # noqa: E402
from bagel_vae_pp.autoencoder import random_autoencoder  # noqa: E402
from bagel_vae_pp.bands import plan_bands  # noqa: E402
from bagel_vae_pp.collectives import Shard  # noqa: E402
from bagel_vae_pp.sharded import decode_band  # noqa: E402


def run(rank, world, size, store, trace, cpu):
    dev = torch.device("cpu") if cpu else torch.device("cuda", rank)
    if not cpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("gloo" if cpu else "nccl", store=dist.FileStore(store, world), rank=rank, world_size=world)
    ae = copy.deepcopy(random_autoencoder("tiny" if cpu else "flux")).to(dev, torch.float32 if cpu else torch.bfloat16)
    layout = torch.contiguous_format if cpu else torch.channels_last  # as the pool's workers hold it
    ae = ae.to(memory_format=layout)
    h = size // 8
    bands = plan_bands(h, world)
    shard = Shard(rank, world, dist.group.WORLD, bands)
    a, b = bands[rank]
    z = (
        torch.randn(1, 16, h, h, generator=torch.Generator().manual_seed(0))[:, :, a:b]
        .to(dev, ae.decoder.conv_in.weight.dtype)
        .contiguous(memory_format=layout)
    )

    def step():
        shard.flags.clear()
        with torch.inference_mode():
            decode_band(ae, z, shard)
        if not cpu:
            torch.cuda.synchronize()

    for lag, label in ((collectives.CANCEL_LAG, "cancel check as shipped"), (10_000, "cancel check disabled")):
        collectives.CANCEL_LAG = lag
        times = []
        for _ in range(6):
            dist.barrier()
            start = time.perf_counter()
            step()
            times.append(1000 * (time.perf_counter() - start))
        if rank == 0:
            print(f"rank 0, {world} GPUs, {size}², {label}: median {sorted(times[1:])[2]:.1f} ms", flush=True)
    with profile(activities=[ProfilerActivity.CPU] + ([] if cpu else [ProfilerActivity.CUDA])) as prof:
        step()
    if rank == 0:
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=60))
        if not cpu:
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
        if trace:
            prof.export_chrome_trace(trace)
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--trace", default=None)
    p.add_argument("--cpu", action="store_true", help="dry run on CPU with gloo and a tiny VAE")
    args = p.parse_args()
    store = f"/tmp/profile_ranks_store_{os.getpid()}"
    mp.spawn(run, args=(args.workers, args.size, store, args.trace, args.cpu), nprocs=args.workers)


if __name__ == "__main__":
    main()
