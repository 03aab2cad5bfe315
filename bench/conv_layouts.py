"""How fast do the FLUX decoder's 3x3 convolutions run in each memory format on this GPU?

The eager decoder runs its convolutions at ~115-150 TFLOP/s, a fifth of the bf16 matrix rate. cuDNN's
tensor-core kernels want NHWC; fed NCHW they may transpose around every call. This times one 3x3 conv per
decoder level at the shapes one rank of 4 sees at 2048² (and 1024²), NCHW vs channels_last, with and
without cudnn.benchmark, plus the matrix-rate ceiling.

    python bench/conv_layouts.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.timing import cuda_median_ms  # noqa: E402


def timed(fn) -> float:
    return cuda_median_ms(fn, repeat=20, warmup=3)  # short kernels: more calls than the default


# (channels, rows, cols) of a decoder level's activations for one rank's band of a 2048² image on 4 GPUs
LEVELS_2048 = [(512, 64, 256), (512, 128, 512), (256, 256, 1024), (128, 512, 2048)]


def main():
    dev = torch.device("cuda:0")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, cudnn {torch.backends.cudnn.version()}")
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    mm = timed(lambda: a @ a)
    print(f"bf16 matmul 8192³: {mm:.2f} ms = {2 * 8192**3 / mm / 1e9:.0f} TFLOP/s")
    print("| level C×H×W | scale | NCHW ms | NCHW TFLOP/s | NHWC ms | NHWC TFLOP/s | NCHW bench | NHWC bench |")
    print("|---|---|---|---|---|---|---|---|")
    for scale in (1, 2):
        for c, h, w in LEVELS_2048:
            h, w = h // scale, w // scale
            x = torch.randn(1, c, h, w, device=dev, dtype=torch.bfloat16)
            wt = torch.randn(c, c, 3, 3, device=dev, dtype=torch.bfloat16) * 0.02
            bias = torch.randn(c, device=dev, dtype=torch.bfloat16)
            xl, wl = x.to(memory_format=torch.channels_last), wt.to(memory_format=torch.channels_last)
            flop = 2 * c * c * 9 * h * w
            cells = []
            for benchmark in (False, True):
                torch.backends.cudnn.benchmark = benchmark
                nchw = timed(lambda x=x, wt=wt, bias=bias: F.conv2d(x, wt, bias, padding=1))
                nhwc = timed(lambda xl=xl, wl=wl, bias=bias: F.conv2d(xl, wl, bias, padding=1))
                cells.append((nchw, nhwc))
            (n0, h0), (n1, h1) = cells
            same = (F.conv2d(x, wt, bias, padding=1) - F.conv2d(xl, wl, bias, padding=1)).abs().max().item()
            print(f"| {c}×{h}×{w} | 1/{scale} | {n0:.3f} | {flop / n0 / 1e9:.0f} | {h0:.3f} | {flop / h0 / 1e9:.0f} "
                  f"| {flop / n1 / 1e9:.0f} | {flop / h1 / 1e9:.0f} | (max diff {same:.1e})")  # fmt: skip
    torch.backends.cudnn.benchmark = False


if __name__ == "__main__":
    main()
