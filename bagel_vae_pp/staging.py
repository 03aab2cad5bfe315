"""Where a pool's files live: a private folder on /dev/shm, and one on disk for what /dev/shm has no room for.

Jobs hand tensors to the workers through files (shm.py): the weights once per model, an input and an output
per job, plus the small control file and the process group's store. /dev/shm is the fast place, but it can be
small (Docker's default is 64 MB; the full FLUX VAE's weights alone are 335 MB in fp32) and a write into a full
tmpfs kills the writer with SIGBUS. So every file is placed by measured free space: on /dev/shm when it fits with
RESERVE_BYTES to spare, else in the private folder on disk (the temp folder, `TMPDIR`), with one log line the
first time; a job that fits neither is refused before anything is written, naming the size and the fix.

Both folders are 0700 and named after the host process (shm.make_private_dir), so the next pool removes them if
a killed host and its killed workers could not.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile

from torch import Tensor

from . import shm

log = logging.getLogger("bagel_vae_pp")
SHM_BASE = "/dev/shm"
# Left free on /dev/shm (and on disk) for everyone else: NCCL's own buffers, other pools, other programs.
RESERVE_BYTES = 16 << 20


def shm_base() -> str | None:
    return SHM_BASE if os.path.isdir(SHM_BASE) and os.access(SHM_BASE, os.W_OK) else None


def room(folder: str | None) -> int:
    """Bytes a new file may take in `folder` (0 where there is none)."""
    return max(0, shm.free_bytes(folder) - RESERVE_BYTES) if folder else 0


class Staging:
    """One pool's folders and files: the input file kept across jobs of one size, the output files (reused once
    their tensors die), and the paths unlinked since the last job (workers drop their mappings of them)."""

    def __init__(self):
        base = shm_base()
        shm.sweep_stale([b for b in (base, tempfile.gettempdir()) if b])
        self.shm_dir = shm.make_private_dir(base) if room(base) > 0 else None
        self.disk_dir = shm.make_private_dir(None)
        self.home = self.shm_dir or self.disk_dir  # the control file and the process group's store
        self.said_disk = False
        self.input: tuple[str, Tensor] | None = None
        self.outputs = shm.OutputFiles(self.place)
        self.released: list[str] = []

    @property
    def dirs(self) -> list[str]:
        """Every folder of this pool, for whoever cleans up (the host, or a worker whose host is gone)."""
        return [d for d in (self.shm_dir, self.disk_dir) if d]

    def close(self) -> None:
        shm.remove_dirs(self.dirs)
        self.input, self.released = None, []

    def place(self, nbytes: int, name: str) -> str:
        """The folder for a new file of `nbytes`: /dev/shm when it has room, else disk; raises if neither has."""
        if nbytes <= room(self.shm_dir):
            return self.shm_dir
        if nbytes <= room(self.disk_dir):
            if not self.said_disk:
                log.warning(
                    "bagel_vae_pp: /dev/shm has %s MiB free, too little for %s (%s MiB); staging it and what else "
                    "does not fit there in %s (slower). Docker: --shm-size=8g gives the pool room in memory.",
                    _mib(room(self.shm_dir)), name, _mib(nbytes), self.disk_dir,
                )  # fmt: skip
                self.said_disk = True
            return self.disk_dir
        raise ValueError(self.no_room_message(name, nbytes))

    def check_room(self, shapes: list[tuple[int, ...]], name: str) -> None:
        """Refuse up front (ValueError naming `name`) a job whose float32 files cannot all be placed."""
        free = {self.shm_dir: room(self.shm_dir), self.disk_dir: room(self.disk_dir)}
        for nbytes in sorted((math.prod(s) * 4 for s in shapes), reverse=True):
            folder = next((f for f, n in free.items() if f and nbytes <= n), None)
            if folder is None:
                total = sum(math.prod(s) for s in shapes) * 4
                raise ValueError(self.no_room_message(f"{name}: shape {tuple(shapes[0])}", total))
            free[folder] -= nbytes

    def no_room_message(self, what: str, nbytes: int) -> str:
        return (
            f"{what} needs {_mib(nbytes)} MiB of staging files, but /dev/shm has {_mib(room(self.shm_dir))} MiB "
            f"free and {tempfile.gettempdir()} {_mib(room(self.disk_dir))} MiB: use a smaller batch or image, "
            "free disk space (or point TMPDIR at a larger disk), or give the container more shared memory "
            "(docker run --shm-size=8g)."
        )

    def input_buffer(self, shape: tuple[int, ...], tag: int) -> tuple[str, Tensor]:
        """The file for a job's input, kept while jobs keep its size: the first write to a fresh file takes a page
        fault per 4 KiB (15 ms for a 16 MB latent on a GPU VM); the workers keep it mapped too."""
        numel = math.prod(shape)
        if self.input is None or self.input[1].numel() != numel:
            if self.input is not None:
                self.forget(self.input[0])
                self.input = None
            name = f"input{tag}"
            path = os.path.join(self.place(numel * 4, name), name)
            self.input = (path, shm.create(path, (numel,)))
        return self.input[0], self.input[1].view(shape)

    def write_weights(self, state_dict: dict[str, Tensor], tag: int) -> str:
        """Save a state dict for the workers to load (safetensors); the caller unlinks it once they have."""
        from safetensors.torch import save_file

        name = f"weights{tag}.safetensors"
        nbytes = sum(t.numel() * t.element_size() for t in state_dict.values()) + (1 << 20)  # + the header
        path = os.path.join(self.place(nbytes, name), name)
        shm.new_file(path, 0).close()  # 0600 before the weights are in it
        save_file(state_dict, path)
        return path

    def forget(self, path: str) -> None:
        """Unlink a file the workers may hold mapped; they drop their mapping with the next job."""
        shm.unlink(path)
        self.released.append(path)

    def take_released(self) -> list[str]:
        self.released += self.outputs.trim()
        released, self.released = self.released, []
        return released


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.0f}"
