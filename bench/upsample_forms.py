"""The decoder's upsample (nearest-2x, then a 3x3 conv) on one GPU: today's form, which materialises the 2x input
and convolves it (9 taps per output pixel), against sharded.upsample_conv, one conv of folded 2x2 weights for the
four output phases (16 taps per input pixel instead of 36) and one interleaving copy. At the FLUX decoder's three
upsample shapes for one rank's band of a 4096² image on 2 GPUs and on 4, bf16, channels_last, one rank (no halo).

Error: max |diff| between the two forms, and of each against today's form in fp32 (TF32 off) on the same weights.
Memory: peak allocated above what was allocated before one call (output included).

    python bench/upsample_forms.py [--cudnn-benchmark]
    python bench/upsample_forms.py --cpu    # tiny shapes in fp32: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bagel_vae_pp.collectives import Shard  # noqa: E402
from bagel_vae_pp.sharded import conv3x3, upsample_conv  # noqa: E402
from bench.timing import cuda_median_ms, extra_gib  # noqa: E402

# (channels, rows, cols) of the upsample inputs of one rank's band of a 4096² image on 2 GPUs; 4 GPUs: half the rows
SHAPES_2GPU = [(512, 256, 512), (512, 512, 1024), (256, 1024, 2048)]
SHAPES_CPU = [(16, 8, 16), (16, 16, 32), (8, 32, 64)]


def current(conv: nn.Conv2d, x, shard):
    return conv3x3(conv, F.interpolate(x, scale_factor=2.0, mode="nearest"), shard)


def median_ms(fn, dev: torch.device) -> float:
    if dev.type == "cuda":
        return cuda_median_ms(fn, repeat=10, warmup=2)
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_gib(fn, dev: torch.device) -> float:
    return extra_gib(fn, dev) if dev.type == "cuda" else float("nan")


def max_abs_diff(a, b, rows: int = 256) -> float:
    """In row chunks: a whole-tensor fp32 difference of the largest shape would be another 8 GiB."""
    return max((a[:, :, r : r + rows].float() - b[:, :, r : r + rows].float()).abs().max().item()
               for r in range(0, a.shape[2], rows))  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny fp32 shapes on the CPU (smoke test)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms first")
    args = parser.parse_args()
    dev = torch.device("cpu" if args.cpu else "cuda:0")
    dtype = torch.float32 if args.cpu else torch.bfloat16
    shapes = SHAPES_CPU if args.cpu else SHAPES_2GPU
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, cudnn {torch.backends.cudnn.version()}")
    print("| GPUs | input C×H×W | current ms | phases ms | speed-up | max diff | current vs fp32 | phases vs fp32 "
          "| current GiB | phases GiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    shard = Shard(0, 1, None, [(0, 1)])
    for gpus in (2, 4):
        for c, h, w in shapes:
            h = h * 2 // gpus
            torch.manual_seed(c + h)
            conv = nn.Conv2d(c, c, 3, padding=1).to(dev, dtype, memory_format=torch.channels_last)  # as a worker's
            x = torch.randn(1, c, h, w, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                calls = [functools.partial(form, conv, x, shard) for form in (current, upsample_conv)]
                ms = [median_ms(call, dev) for call in calls]
                gib = [peak_gib(call, dev) for call in calls]
                y_cur, y_new = (call() for call in calls)
                diff = max_abs_diff(y_cur, y_new)
                conv32 = copy.deepcopy(conv).float()
                tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
                ref = current(conv32, x.float(), shard)
                torch.backends.cudnn.allow_tf32 = tf32
                errs = [max_abs_diff(y, ref) for y in (y_cur, y_new)]
                del y_cur, y_new, ref
            print(f"| {gpus} | {c}×{h}×{w} | {ms[0]:.3f} | {ms[1]:.3f} | {ms[0] / ms[1]:.2f} | {diff:.2e} "
                  f"| {errs[0]:.2e} | {errs[1]:.2e} | {gib[0]:.2f} | {gib[1]:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
