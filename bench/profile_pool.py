"""Where does a pool job's wall time go on the host? Times N decodes/encodes through the pool, prints each
job's timing breakdown (check, stage, dispatch, compute, collect) and a cProfile of the host side of one.

    python bench/profile_pool.py --workers 4 --size 1024
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bagel_vae_pp.autoencoder import random_autoencoder  # noqa: E402
from bagel_vae_pp.cli import test_image  # noqa: E402
from bagel_vae_pp.pool import PoolSpec, WorkerPool  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    ae = random_autoencoder("flux", seed=0)
    devices = ",".join(map(str, range(args.workers))) if args.device == "cuda" else f"cpu:{args.workers}"
    pool = WorkerPool(PoolSpec.parse(devices, "bf16" if args.device == "cuda" else "fp32", timeout_s=600))
    latent = torch.randn(1, 16, args.size // 8, args.size // 8)
    image = test_image(args.size)
    try:
        for op, data in (("decode", latent), ("encode", image)):
            run = pool.decode if op == "decode" else pool.encode
            for i in range(args.repeat):
                start = time.perf_counter()
                run(ae, data)
                wall = 1000 * (time.perf_counter() - start)
                t = {k: round(v, 1) for k, v in pool.last_timing.items()}
                print(f"{op} {args.size}² #{i}: wall {wall:.1f} ms {json.dumps(t)}", flush=True)
            prof = cProfile.Profile()
            prof.enable()
            run(ae, data)
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(18)
    finally:
        pool.shutdown()


if __name__ == "__main__":
    main()
