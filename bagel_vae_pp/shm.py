"""Tensors in files under a private shared-memory folder, mapped by the host and every worker.

The host writes the input once and reads the output in place: workers write their rows straight into
the mapping, and no large tensor is ever pickled.

Files are kept and reused, because fresh shared memory is slow: the first write to each 4 KiB page of a
new file takes a page fault (a worker's copy of 96 MiB of image rows from the GPU into a fresh file took
78 ms on an H200 VM, 1.3 GB/s; into a populated, pinned mapping 2 ms — bench/handback.py). So the host
keeps an output file once the caller drops the tensor it was handed (`OutputFiles`), the input file while
jobs keep its shape, and workers keep their mappings of both, registered with CUDA as pinned memory
(`Mappings`), so later jobs of a shape copy straight between GPU and shared memory at DMA speed.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

PREFIX = "bagel_vae_pp-"


def make_private_dir(base: str | None) -> str:
    """A fresh 0700 folder in `base` (None: the temp folder), readable only by this user, named after this
    process (pid and start time) so that a later pool can tell whether its owner is still alive."""
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-{_start_time(os.getpid())}-", dir=base)


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("0" where unknown): with the pid, it names one process
    even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def sweep_stale(bases: list[str]) -> list[str]:
    """Remove this user's pool folders in `bases` whose owning process is gone (a host killed before it could
    clean up, with workers that could not either); returns what was removed."""
    removed = []
    for base in bases:
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            parts = name[len(PREFIX) :].split("-")
            if not name.startswith(PREFIX) or len(parts) < 3 or not parts[0].isdigit():
                continue
            path = os.path.join(base, name)
            try:
                if os.stat(path).st_uid != os.getuid():
                    continue
            except OSError:
                continue
            if _start_time(int(parts[0])) != parts[1] or not os.path.exists(f"/proc/{parts[0]}"):
                remove_dir(path)
                removed.append(path)
    return removed


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_dirs(paths: list[str]) -> None:
    for path in paths:
        remove_dir(path)


def free_bytes(folder: str) -> int:
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize


def new_file(path: str, nbytes: int):
    """A new zero-filled file of `nbytes`, readable and writable by this user only, open for reading and writing."""
    f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), "w+b")
    f.truncate(max(nbytes, 1))
    return f


def create(path: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A zero-filled shared tensor backed by a new file at `path` (its folder was chosen for room by staging)."""
    new_file(path, math.prod(shape) * dtype.itemsize).close()
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


@dataclass(eq=False)
class _OutputFile:
    path: str
    nbytes: int
    mapping: mmap.mmap | None  # the host's mapping, kept so a reused file's pages stay mapped here too
    busy: bool = True  # a tensor handed out still uses it


class OutputFiles:
    """The host's job output files. A file is handed out as a tensor; once every tensor and view of it is
    freed, the file waits for the next job whose output has its size. `trim` unlinks all but the `keep_free`
    most recently used free files and returns their paths, so that workers drop their mappings too.

    `place(nbytes, name)` returns the folder a new file goes to (staging picks one with room, or raises)."""

    def __init__(self, place: Callable[[int, str], str], keep_free: int = 2):
        self.place, self.keep_free = place, keep_free
        self.files: list[_OutputFile] = []  # least recently handed out first
        self.count = 0

    def find(self, nbytes: int) -> _OutputFile | None:
        return next((f for f in reversed(self.files) if not f.busy and f.nbytes == nbytes), None)

    def acquire(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> tuple[str, torch.Tensor]:
        """(path, tensor) for a job's output: a free file of this size, or a new one. Not zeroed."""
        nbytes = math.prod(shape) * dtype.itemsize
        file = self.find(nbytes)
        if file is None:
            self.count += 1
            name = f"output{self.count}"
            path = os.path.join(self.place(nbytes, name), name)
            with new_file(path, nbytes) as f:
                mapping = mmap.mmap(f.fileno(), nbytes) if nbytes else None
            file = _OutputFile(path, nbytes, mapping)
        else:
            self.files.remove(file)
            file.busy = True
        self.files.append(file)
        if nbytes == 0:
            file.busy = False
            return file.path, torch.empty(shape, dtype=dtype)
        array = np.frombuffer(file.mapping, dtype=np.uint8)  # the tensor holds it: its death frees the file
        weakref.finalize(array, _set_free, file)
        return file.path, torch.from_numpy(array).view(dtype).view(shape)

    def trim(self) -> list[str]:
        """Unlink the free files beyond `keep_free` (least recently used first); their paths."""
        free = [f for f in self.files if not f.busy]
        old = free[: max(0, len(free) - self.keep_free)]
        for file in old:
            self.files.remove(file)
            unlink(file.path)
            file.mapping = None  # unmapped with the last array that exported it
        return [file.path for file in old]


def _set_free(file: _OutputFile) -> None:
    # Runs wherever the last tensor on the file dies (any thread, inside the GC): a flag, no lock.
    file.busy = False


class Mappings:
    """A worker's mappings of the host's shared files, kept across jobs (at most `keep`, least recently used
    dropped first) and, for a CUDA worker, registered as pinned memory so copies to and from the GPU are DMA."""

    def __init__(self, device: torch.device, keep: int = 4):
        self.pin = device.type == "cuda"
        self.keep = keep
        self.maps: OrderedDict[str, tuple[torch.Tensor, bool]] = OrderedDict()  # path -> (bytes, registered)

    def get(self, path: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        numel = math.prod(shape)
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        if path not in self.maps:
            raw = torch.from_file(path, shared=True, size=os.path.getsize(path), dtype=torch.uint8)
            self.maps[path] = (raw, self.pin and _register(raw))
            while len(self.maps) > self.keep:
                self.drop(next(iter(self.maps)))
        self.maps.move_to_end(path)
        raw = self.maps[path][0]
        return raw[: numel * dtype.itemsize].view(dtype).view(shape)

    def drop(self, path: str) -> None:
        raw, registered = self.maps.pop(path, (None, False))
        if registered:
            torch.cuda.cudart().cudaHostUnregister(raw.data_ptr())

    def clear(self) -> None:
        for path in list(self.maps):
            self.drop(path)


def _register(t: torch.Tensor) -> bool:
    """Pin a shared mapping for DMA (this faults in all its pages once). False where CUDA refuses: copies
    then go through the driver's staging buffers, as they do for any pageable memory."""
    if int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0)) == 0:
        return True
    _clear_cuda_error()
    return False


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error, which a refused cudaHostRegister leaves behind: torch checks it
    after its next kernel launch and would raise it there."""
    for lib in (None, *_loaded_cudart()):
        try:
            ctypes.CDLL(lib).cudaGetLastError()
            return
        except (OSError, AttributeError):
            continue


def _loaded_cudart() -> list[str]:
    with open("/proc/self/maps") as f:
        return sorted({line.split()[-1] for line in f if "libcudart" in line})
