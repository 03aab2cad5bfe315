"""How long a worker's hand-back takes: its image rows copied from the GPU into the job's shared-memory file.

Per case, the median of one [rows, W, 3] fp32 copy (a rank's share of a 4096² decode): into a fresh file's
mapping (what workers did before output files were reused: a page fault per 4 KiB during the copy), into a
file whose pages another process allocated first (posix_fallocate), into a mapping populated up front
(MAP_POPULATE), into a kept mapping registered with CUDA (what workers do now, shm.Mappings; its first job
pays the registration), and into pinned memory (the bound). Prints the machine's transparent-huge-page
settings, which decide whether shared memory could use 2 MiB pages.

    python bench/handback.py --rows 2048 --width 4096
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bagel_vae_pp import shm  # noqa: E402


def fresh_file(folder: str, nbytes: int, allocate: bool) -> str:
    fd, path = tempfile.mkstemp(dir=folder)
    os.ftruncate(fd, nbytes)
    if allocate:  # in another process, as the host would do it
        code = f"import os; os.posix_fallocate(os.open({path!r}, os.O_RDWR), 0, {nbytes})"
        subprocess.run([sys.executable, "-c", code], check=True)
    os.close(fd)
    return path


def timed_copy(src: torch.Tensor, dst: torch.Tensor) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    dst.copy_(src)
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start)


def mapped(path: str, nbytes: int, populate: bool, shape):
    fd = os.open(path, os.O_RDWR)
    start = time.perf_counter()
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
    m = mmap.mmap(fd, nbytes, flags=flags)
    t = torch.from_numpy(np.frombuffer(m, dtype=np.float32).reshape(shape))
    os.close(fd)
    return t, m, 1000 * (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    for f in ("enabled", "shmem_enabled", "defrag"):
        path = f"/sys/kernel/mm/transparent_hugepage/{f}"
        print(f, open(path).read().strip() if os.path.exists(path) else "?")
    shape = (args.rows, args.width, 3)
    nbytes = args.rows * args.width * 3 * 4
    src = torch.rand(shape, device="cuda")
    folder = tempfile.mkdtemp(dir="/dev/shm")
    cases = {}
    for name, allocate, populate in (
        ("fresh file (today)", False, False),
        ("pages allocated by another process", True, False),
        ("fresh file, MAP_POPULATE", False, True),
        ("allocated + MAP_POPULATE", True, True),
    ):
        for _ in range(args.repeat):
            path = fresh_file(folder, nbytes, allocate)
            if populate:
                dst, m, map_ms = mapped(path, nbytes, True, shape)
            else:
                start = time.perf_counter()
                dst = torch.from_file(path, shared=True, size=nbytes // 4, dtype=torch.float32).view(shape)
                map_ms, m = 1000 * (time.perf_counter() - start), None
            ms = timed_copy(src, dst)
            cases.setdefault(name, []).append((map_ms, ms))
            del dst
            if m is not None:
                m.close()
            os.unlink(path)
    # The pool's way (bagel_vae_pp/shm.py): workers keep their mapping of a reused file, registered with CUDA.
    files = shm.Mappings(torch.device("cuda"))
    path = fresh_file(folder, nbytes, False)
    start = time.perf_counter()
    dst = files.get(path, shape)
    first = [(1000 * (time.perf_counter() - start), timed_copy(src, dst))]
    cases["kept mapping, registered: first job"] = first
    cases["kept mapping, registered: later jobs"] = [(0.0, timed_copy(src, files.get(path, shape))) for _ in range(3)]
    print("registered mapping is pinned:", dst.is_pinned())
    # a refused registration (this range is registered already) must leave no error for torch's next launch
    assert not shm._register(files.maps[path][0])
    torch.ones(8, device="cuda").add_(1).sum().item()
    print("refused registration left no CUDA error behind")
    del dst
    files.clear()
    os.unlink(path)
    pinned = torch.empty(shape, pin_memory=True)
    cases["pinned (bound)"] = [(0.0, timed_copy(src, pinned)) for _ in range(args.repeat)]
    print(f"{args.rows}x{args.width}x3 fp32 = {nbytes / 2**20:.0f} MiB, {torch.cuda.get_device_name(0)}")
    for name, runs in cases.items():
        map_ms = statistics.median(r[0] for r in runs)
        copy_ms = statistics.median(r[1] for r in runs)
        print(f"{name:40s} map {map_ms:6.1f} ms  copy {copy_ms:6.1f} ms  ({nbytes / copy_ms / 1e6:.1f} GB/s)")
    os.rmdir(folder)


if __name__ == "__main__":
    main()
