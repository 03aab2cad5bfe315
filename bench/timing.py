"""The one GPU timer of the bench scripts: CUDA events around each call, median over the timed calls."""

from __future__ import annotations

import statistics

import torch


def cuda_median_ms(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median ms of `repeat` calls of fn() after `warmup` untimed ones (compilation, allocator, handles)."""
    for _ in range(warmup):
        fn()
    return statistics.median(cuda_call_ms(fn) for _ in range(repeat))


def cuda_call_ms(fn) -> float:
    """ms of one fn() on the GPU, between CUDA events on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)
