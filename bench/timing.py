"""The bench scripts' GPU measures: a CUDA-event timer (median over the timed calls) and one call's extra memory."""

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


def extra_gib(fn, device) -> float:
    """Peak memory allocated during one fn() above what was allocated before it, in GiB."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30
