"""Where does one BAGEL guidance step spend its GPU time? Full-size random bf16 model, a 1024² latent block
against the two contexts of plain text to image (the prompt's, and the empty one of text guidance), run as
batched passes (Bagel.velocities, the default); prints both passes one after the other and batched, their extra
memory, the matmul ceiling, and the top kernels/ops of the batched step.

    python bench/profile_bagel.py --size 1024
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bagel_vae_pp.bagel.config import CONFIGS  # noqa: E402
from bagel_vae_pp.bagel.model import EMPTY_CONTEXT  # noqa: E402
from bagel_vae_pp.bagel.tiny import random_bagel  # noqa: E402
from bench.timing import cuda_median_ms, extra_gib  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--config", default="7b-mot")
    args = p.parse_args()
    dev = torch.device("cuda:0")
    model = random_bagel(CONFIGS[args.config], 0, device=dev, dtype=torch.bfloat16)
    D = model.params.llm.hidden_size
    n = (args.size // 16) ** 2
    with torch.inference_mode():
        contexts = [model.prefill_text(EMPTY_CONTEXT, list(range(1000, 1034))), EMPTY_CONTEXT]
        block = torch.randn(n + 2, D, device=dev, dtype=torch.bfloat16)
        sequential = lambda: [model.velocity(ctx, block) for ctx in contexts]
        batched = lambda: model.velocities(contexts, block)
        flop = 2 * n * sum(p.numel() for name, p in model.language_model.named_parameters() if "moe_gen" in name)
        for name, step in (("sequential", sequential), ("batched", batched)):
            ms = cuda_median_ms(step)
            print(f"{name}: 2 velocity passes of {n} latent tokens: {ms:.1f} ms, {extra_gib(step, dev):.2f} GiB "
                  f"above the model; gen-expert matmul FLOP {2 * flop / 1e12:.1f} T -> {2 * flop / ms / 1e9:.0f} "
                  "TFLOP/s")  # fmt: skip
        a = torch.randn(2 * n, D, device=dev, dtype=torch.bfloat16)
        w = torch.randn(4 * 4736, D, device=dev, dtype=torch.bfloat16)
        mm = cuda_median_ms(lambda: torch.nn.functional.linear(a, w))
        print(f"linear {2 * n}x{D} @ {D}x{w.shape[0]}: {mm:.2f} ms = {4 * n * D * w.shape[0] / mm / 1e9:.0f} TFLOP/s")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            batched()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
