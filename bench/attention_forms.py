"""The VAE mid-block attention (one head, D = 512) on one GPU: the Triton flash kernel, the GEMM form
(kernels/gemm_attention.py) and the split form (kernels/split_attention.py), at the shapes one rank of 4 sees at
1024², 2048² and 4096², and one rank of 2 at 4096², bf16.

The split form is timed over its config sweep: each scores config with the default PV config, then each PV config
with the fastest scores config (median of 3 calls each); the first table times the fastest pair again (median of
7), the second lists every config's ms.
Error: against fp32 SDPA on the first 512 queries (fresh random inputs with non-zero means).

    python bench/attention_forms.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bagel_vae_pp import kernels  # noqa: E402
from bagel_vae_pp.kernels.split_attention import (  # noqa: E402
    DEFAULT_PV_CONFIG,
    PV_CONFIGS,
    SCORE_CONFIGS,
    split_attention,
)
from bench.timing import cuda_median_ms, extra_gib  # noqa: E402

SHAPES = [(4096, 16384), (16384, 65536), (65536, 262144), (131072, 262144)]  # (queries of one rank, keys)
SWEEP_REPEAT = 3


def sweep_split(q, k, v) -> tuple[dict, list[tuple[str, str, float]]]:
    """The fastest split_attention configs (as its keyword arguments) and every (scores, pv, ms) timed."""
    rows = []

    def timed(sc, pv):
        fn = lambda: split_attention(q, k, v, scores_config=sc, pv_config=pv)
        try:
            rows.append((sc, pv, cuda_median_ms(fn, repeat=SWEEP_REPEAT)))
        except OutOfResources as e:  # a config over the shared memory or registers: a row of the table, not a crash
            rows.append((sc, pv, float("inf")))
            print(f"{sc} / {pv}: {e}", file=sys.stderr)
        return rows[-1][2]

    best_sc = min(SCORE_CONFIGS, key=lambda sc: timed(sc, DEFAULT_PV_CONFIG))
    best_pv = min(PV_CONFIGS, key=lambda pv: timed(best_sc, pv))
    return dict(scores_config=best_sc, pv_config=best_pv), rows


def bench_shape(Lq: int, L: int, D: int, dev: torch.device) -> tuple[str, list[tuple[str, str, float]]]:
    """One row of the main table for Lq queries x L keys, and the split form's sweep there."""
    g = torch.Generator(device=dev).manual_seed(Lq)
    q = (torch.randn(1, Lq, D, device=dev, generator=g) * 0.5 + 0.1).bfloat16()
    k = (torch.randn(1, L, D, device=dev, generator=g) * 0.5 + 0.2).bfloat16()
    v = (torch.randn(1, L, D, device=dev, generator=g) + 0.5).bfloat16()
    best, sweep = sweep_split(q, k, v)
    forms = {
        "flash": lambda: kernels.attention(q, k, v),
        "gemm": lambda: kernels.gemm_attention(q, k, v),
        "split": lambda: split_attention(q, k, v, **best),
    }
    ms = {name: cuda_median_ms(fn, repeat=7) for name, fn in forms.items()}
    gib = {name: extra_gib(forms[name], dev) for name in ("gemm", "split")}
    n = 512
    ref = F.scaled_dot_product_attention(q[:, None, :n].float(), k[:, None].float(), v[:, None].float())[:, 0]
    err = {name: ((fn()[:, :n].float() - ref).norm() / ref.norm()).item() for name, fn in forms.items()}
    tflops = {name: 4 * Lq * L * D / t / 1e9 for name, t in ms.items()}
    cells = [f"{Lq} × {L}"]
    cells += [f"{ms[name]:.2f} | {tflops[name]:.0f}" for name in forms]
    cells += [f"{best['scores_config']} / {best['pv_config']}"]
    cells += [f"{err[name]:.2e}" for name in forms] + [f"{gib[name]:.2f}" for name in gib]
    return "| " + " | ".join(cells) + " |", sweep


def main():
    dev = torch.device("cuda:0")
    D = 512
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    print(
        "| queries × keys | flash ms | TFLOP/s | gemm ms | TFLOP/s | split ms | TFLOP/s | split configs (scores / PV) "
        "| flash err | gemm err | split err | gemm extra GiB | split extra GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    sweeps = []
    for Lq, L in SHAPES:
        row, sweep = bench_shape(Lq, L, D, dev)
        print(row, flush=True)
        sweeps += [(Lq, L, *entry) for entry in sweep]
    print("\nSplit-form sweep: each scores config with the default PV config, then each PV config with the best one.\n")
    print("| queries × keys | scores config | PV config | ms |")
    print("|---|---|---|---|")
    for Lq, L, sc, pv, t in sweeps:
        print(f"| {Lq} × {L} | {sc} | {pv} | {t:.2f} |")


if __name__ == "__main__":
    main()
