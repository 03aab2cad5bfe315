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

import torch


def make_private_dir(prefix: str) -> str:
    """A 0700 folder on /dev/shm (or the temp dir where there is none), readable only by this user."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix=prefix, dir=base)


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def create(path: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A zero-filled shared tensor backed by a new file at `path`; refuses what the folder cannot hold."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    stat = os.statvfs(os.path.dirname(path))
    free = stat.f_bavail * stat.f_frsize
    if nbytes > free:
        raise MemoryError(
            f"shared memory: a {tuple(shape)} tensor needs {nbytes / 2**30:.2f} GiB but only "
            f"{free / 2**30:.2f} GiB is free in {os.path.dirname(path)}; use a smaller batch or image, "
            "or enlarge /dev/shm."
        )
    with open(path, "wb") as f:
        f.truncate(max(nbytes, 1))
    return attach(path, shape, dtype)


def attach(path: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    numel = math.prod(shape)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
