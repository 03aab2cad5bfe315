"""The one GPU timer of the bench scripts: CUDA events around each call, median over the timed calls."""

from __future__ import annotations

import statistics

import torch


def cuda_median_ms(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median ms of `repeat` calls of fn() after `warmup` untimed ones (compilation, allocator, handles)."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
