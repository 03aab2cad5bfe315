"""The VAE mid-block attention (one head, D = 512) on one GPU: the Triton flash kernel against the GEMM form
(kernels/gemm_attention.py), at the shapes one rank of 4 sees at 1024², 2048² and 4096², bf16.

Error: against fp32 SDPA on the first 512 queries (fresh random inputs with non-zero means).

    python bench/attention_forms.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bagel_vae_pp import kernels  # noqa: E402
from bench.timing import cuda_median_ms  # noqa: E402

SHAPES = [(4096, 16384), (16384, 65536), (65536, 262144)]  # (queries of one rank, keys)


def main():
    dev = torch.device("cuda:0")
    D = 512
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    print("| queries × keys | flash ms | TFLOP/s | gemm ms | TFLOP/s | speed-up | flash err | gemm err | extra GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for Lq, L in SHAPES:
        g = torch.Generator(device=dev).manual_seed(Lq)
        q = (torch.randn(1, Lq, D, device=dev, generator=g) * 0.5 + 0.1).bfloat16()
        k = (torch.randn(1, L, D, device=dev, generator=g) * 0.5 + 0.2).bfloat16()
        v = (torch.randn(1, L, D, device=dev, generator=g) + 0.5).bfloat16()
        flop = 4 * Lq * L * D
        flash = cuda_median_ms(lambda q=q, k=k, v=v: kernels.attention(q, k, v), repeat=7)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        gemm = cuda_median_ms(lambda q=q, k=k, v=v: kernels.gemm_attention(q, k, v), repeat=7)
        extra = (torch.cuda.max_memory_allocated(dev) - base) / 2**30
        n = 512
        ref = F.scaled_dot_product_attention(q[:, None, :n].float(), k[:, None].float(), v[:, None].float())[:, 0]
        errs = []
        for out in (kernels.attention(q, k, v)[:, :n], kernels.gemm_attention(q, k, v)[:, :n]):
            errs.append(((out.float() - ref).norm() / ref.norm()).item())
        print(f"| {Lq} × {L} | {flash:.2f} | {flop / flash / 1e9:.0f} | {gemm:.2f} | {flop / gemm / 1e9:.0f} "
              f"| {flash / gemm:.2f} | {errs[0]:.2e} | {errs[1]:.2e} | {extra:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
