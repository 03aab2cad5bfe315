"""GPU check and micro-benchmark of the per-token FP8 quantization of fp8_e4m3fn_fast (kernels/quant.py).

One run on one GPU with FP8 tensor cores: (1) the kernel against the torch path at a velocity pass's activation
shapes (one or two batched 1024² passes: 4098 or 8196 tokens; K = 3584 into q/k/v, o_proj and gate/up, 18944
into down_proj), byte for byte and scale for scale, and both times with the kernel's traffic rate (5 bytes per bf16
element); (2) one layer's q/k/v projections at full size with each Linear quantizing x itself against x quantized
once (Fp8Rows). Times: median ms over repeats, CUDA events.

    python bench/bench_fp8_quant.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bagel_vae_pp.bagel.quantize import Fp8Rows, fp8_linear  # noqa: E402
from bagel_vae_pp.kernels import quant  # noqa: E402
from bench.timing import cuda_median_ms  # noqa: E402

DEVICE = "cuda"


def check_and_time(n: int, k: int) -> None:
    t = torch.randn(n, k, device=DEVICE) * torch.logspace(-3, 3, n, device=DEVICE)[:, None]
    t = t.to(torch.bfloat16)
    (q, s), (q_ref, s_ref) = quant.quantize_rows(t), quant._torch_quantize_rows(t, None)
    same = torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    ms_kernel = cuda_median_ms(lambda: quant.quantize_rows(t), repeat=20, warmup=3)
    ms_torch = cuda_median_ms(lambda: quant._torch_quantize_rows(t, None), repeat=20, warmup=3)
    rate = 5 * t.numel() / ms_kernel / 1e6
    print(f"| {n} x {k} | {same} | {ms_torch:.3f} | {ms_kernel:.3f} | {rate:.0f} |")


def qkv(n: int, shared: bool) -> float:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(n, 3584, device=DEVICE, generator=g).to(torch.bfloat16)
    weights = [quant.quantize_rows(torch.randn(o, 3584, device=DEVICE, generator=g)) for o in (3584, 512, 512)]

    def run():
        a = Fp8Rows.of(x) if shared else x
        return [fp8_linear(a, w, s, None) for w, s in weights]

    return cuda_median_ms(run, repeat=20, warmup=3)


def main() -> None:
    print(f"{torch.cuda.get_device_name()}\n\n| rows x K | identical | torch ms | kernel ms | kernel GB/s |")
    print("|---|---|---|---|---|")
    for n in (4098, 8196):
        for k in (3584, 18944):
            check_and_time(n, k)
    print("\n| tokens | q/k/v, each quantizes ms | q/k/v, quantized once ms |\n|---|---|---|")
    for n in (4098, 8196):
        print(f"| {n} | {qkv(n, shared=False):.3f} | {qkv(n, shared=True):.3f} |")


if __name__ == "__main__":
    main()
