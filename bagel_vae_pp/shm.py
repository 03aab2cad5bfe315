"""Tensors in files under a private shared-memory folder, mapped by the host and every worker.

The host writes the input once and reads the output in place: workers write their rows straight into
the mapping, and no large tensor is ever pickled. A file is unlinked as soon as the job ends; tensors
that still map it stay valid until they are freed.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def make_private_dir(prefix: str) -> str:
    """A 0700 folder on /dev/shm (or the temp dir where there is none), readable only by this user."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix=prefix, dir=base)


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def free_bytes(folder: str) -> int:
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize


def check_room(folder: str, shapes: list[tuple[int, ...]], name: str, dtype: torch.dtype = torch.float32) -> None:
    """Refuse up front a job whose tensors `folder` cannot hold: a full /dev/shm kills writers with SIGBUS."""
    nbytes = sum(math.prod(shape) for shape in shapes) * dtype.itemsize
    free = free_bytes(folder)
    if nbytes > free:
        raise ValueError(
            f"{name}: shape {tuple(shapes[0])} needs {nbytes / 2**20:,.0f} MiB of shared memory (input and "
            f"output) but only {free / 2**20:,.0f} MiB is free in {os.path.dirname(folder)}; "
            "use a smaller batch or image, or enlarge /dev/shm."
        )


def create(path: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A zero-filled shared tensor backed by a new file at `path`; refuses what the folder cannot hold."""
    check_room(os.path.dirname(path), [shape], os.path.basename(path), dtype)
    with open(path, "wb") as f:
        f.truncate(max(math.prod(shape) * dtype.itemsize, 1))
    return attach(path, shape, dtype)


def attach(path: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    numel = math.prod(shape)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)


# The host's copy into shared memory runs in a few threads of its own, a chunk at a time, and sums each chunk
# (float64) while it is in cache to find NaN/Inf in the same pass. numpy releases the GIL; torch's CPU thread
# pool was no option: waking it cost 20-40 ms per call on a 64-core GPU VM, more than a 1024² job's compute.
COPY_THREADS = min(8, os.cpu_count() or 1)
CHUNK_BYTES = 2 * 2**20
_copier: ThreadPoolExecutor | None = None


def copy_in_checked(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """dst[:] = src for contiguous float32 CPU tensors of one shape; returns whether src holds no NaN/Inf.

    A float64 sum of float32 values cannot overflow, so it is finite exactly when every value is.
    """
    global _copier
    d, s = dst.numpy().reshape(-1), src.numpy().reshape(-1)
    step = max(1, CHUNK_BYTES // s.itemsize)

    def chunk(a: int) -> float:
        np.copyto(d[a : a + step], s[a : a + step])
        return float(d[a : a + step].sum(dtype=np.float64))

    starts = range(0, s.size, step)
    if len(starts) <= 1 or COPY_THREADS == 1:
        sums = [chunk(a) for a in starts]
    else:
        _copier = _copier or ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="bagel_vae_pp-copy")
        sums = list(_copier.map(chunk, starts))
    return math.isfinite(sum(sums))


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
