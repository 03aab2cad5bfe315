"""WorkerPool: one spawned process per device, kept across jobs, and the one owned global registry.

The host (ComfyUI's process, or the CLI) is never a rank. It starts `python -m bagel_vae_pp.worker`
processes, hands each a socket, and waits for replies in short slices so that a dead worker, a stuck
collective, or the user's interrupt turns into an error within seconds instead of a hang. Any failure
tears the whole pool down; the next job starts it again.

Who can join: nothing listens for the pool. The process group meets through a FileStore in a fresh 0700
folder on /dev/shm with an unguessable name (mkdtemp), so the pool's "secret" is that folder: only this user
(and root) can open the store file and learn the ranks' gloo/NCCL addresses, and those sockets are bound to
loopback. Jobs and replies travel over socket pairs inherited at spawn, which no other process can open.
"""

from __future__ import annotations

import atexit
import math
import os
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing import Pipe
from multiprocessing.connection import wait

import torch
from torch import Tensor, nn

from . import shm
from .autoencoder import AutoEncoderParams, detect_params, strip_prefixes
from .inputs import check_latent, check_tiles, non_finite_error, parse_devices, prepare_pixels, resolve_dtype
from .worker import CANCEL, DONE, TOTAL

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 180.0
CANCEL_GRACE_S = 3.0
SLICE_S = 0.05
# Allowance per output megapixel per worker on top of timeout_s; CPU float32 is ~100x slower.
SECONDS_PER_MPX = {"cuda": 2.0, "cpu": 120.0}
# Peak device bytes a worker holds per pixel of its share, in bf16 (measured on 4x H200 with the Triton kernels,
# BENCHMARKS.md: 8.73 GiB for a 4096² decode band, 6.28 GiB for an encode band), rounded up; plus a base
# for weights, workspace and the CUDA context.
PEAK_BYTES_PER_PX = {"decode": 2400, "encode": 1700}
WORKER_BASE_BYTES = 1 << 30


class WorkerError(RuntimeError):
    """A worker died, hung past its deadline, or failed; the pool has been torn down."""


@dataclass(frozen=True)
class PoolSpec:
    devices: tuple[str, ...]  # one entry per worker: "cuda:1" or "cpu"
    dtype: str  # resolved: "bf16" | "fp16" | "fp32"
    timeout_s: float  # a job still running after timeout_s + its size allowance counts as stuck

    @classmethod
    def parse(cls, devices: str = "all", dtype: str = "auto", timeout_s: float = 120.0, prefer_cpu: bool = False):
        found = parse_devices(devices, torch.cuda.device_count(), prefer_cpu)
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: must be positive, got {timeout_s}.")
        return cls(found, resolve_dtype(dtype, found), float(timeout_s))


class WorkerPool:
    def __init__(self, spec: PoolSpec):
        self.spec = spec
        self.lock = threading.RLock()  # one job at a time, from any thread
        self.procs: list[subprocess.Popen] = []
        self.conns = []
        self.dir = None
        self.control = None
        self.job_id = 0
        self.vae_ref = None  # weakref to the module whose weights the workers hold
        self.vae_params: AutoEncoderParams | None = None
        self.last_replies: list[dict] = []  # the workers' replies to the last job (timings, peak memory)
        self.last_timing: dict = {}
        self.owing: dict = {}  # rank -> conn of a cancelled job whose reply has not been read yet
        self.staged: tuple[str, Tensor] | None = None  # the input file kept across jobs, and its flat mapping
        self.outputs: shm.OutputFiles | None = None
        self.released: list[str] = []  # files unlinked since the last job; workers unmap them with the next

    @property
    def is_running(self) -> bool:
        return bool(self.procs)

    # ---- lifecycle ----

    def start(self) -> None:
        with self.lock:
            if self.is_running:
                return
            self.dir = shm.make_private_dir("bagel_vae_pp-")
            self.control = shm.create(os.path.join(self.dir, "control"), (4,), torch.int64)
            self.control[CANCEL] = -1
            self.outputs = shm.OutputFiles(self.dir)
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")])),
            }
            # Keep rendezvous and collectives on loopback; NVLink multicast stays off (see BENCHMARKS.md).
            for key, value in {
                "GLOO_SOCKET_IFNAME": "lo",
                "NCCL_SOCKET_IFNAME": "lo",
                "NCCL_NVLS_ENABLE": "0",
                "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1",
            }.items():
                env.setdefault(key, value)
            try:
                for rank, device in enumerate(self.spec.devices):
                    host_end, child_end = Pipe(duplex=True)
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "bagel_vae_pp.worker", "--fd", str(child_end.fileno())],
                        pass_fds=[child_end.fileno()],
                        env=env,
                        stdin=subprocess.DEVNULL,
                        cwd=PACKAGE_ROOT,
                    )
                    child_end.close()
                    self.procs.append(proc)
                    self.conns.append(host_end)
                    host_end.send(
                        {
                            "rank": rank,
                            "world": len(self.spec.devices),
                            "device": device,
                            "dtype": self.spec.dtype,
                            "store": os.path.join(self.dir, "store"),
                            "control": os.path.join(self.dir, "control"),
                            "pool_dir": self.dir,
                            "host_pid": os.getpid(),
                        }
                    )
                self.wait_all("start", time.monotonic() + START_TIMEOUT_S)
            except BaseException:
                self.kill()
                raise

    def shutdown(self) -> None:
        """Ask workers to exit, kill stragglers after a few seconds, remove shared files. Idempotent."""
        with self.lock:
            for conn in self.conns:
                try:
                    conn.send({"op": "shutdown"})
                except OSError:
                    pass
            deadline = time.monotonic() + 5.0
            for proc in self.procs:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns, self.owing = [], [], {}
        self.control = None
        self.staged, self.outputs, self.released = None, None, []
        self.vae_ref, self.vae_params = None, None
        if self.dir:
            shm.remove_dir(self.dir)
            self.dir = None

    def fail(self, message: str) -> WorkerError:
        self.kill()
        return WorkerError(message + " The pool was shut down; the next job starts it again.")

    # ---- waiting ----

    def wait_all(self, what: str, deadline: float, interrupt=None, progress=None, ranks=None) -> list[dict]:
        """Collect one reply per worker, polling for death, deadline, interrupt and progress."""
        pending = dict(enumerate(self.conns)) if ranks is None else {r: self.conns[r] for r in ranks}
        replies: dict[int, dict] = {}
        shown = None
        while pending:
            for conn in wait(list(pending.values()), timeout=SLICE_S):
                rank = next(r for r, c in pending.items() if c is conn)
                try:
                    replies[rank] = conn.recv()
                except (EOFError, OSError):
                    raise self.died(rank, what) from None
                del pending[rank]
                if not replies[rank]["ok"]:
                    return self.failed(what, rank, replies[rank], pending)
            for rank, proc in enumerate(self.procs):
                if rank in pending and proc.poll() is not None:
                    raise self.died(rank, what)
            if progress is not None and self.control is not None:
                now = (int(self.control[DONE]), int(self.control[TOTAL]))
                if now != shown and now[1]:
                    progress(*now)
                    shown = now
            if interrupt is not None:
                try:
                    interrupt()
                except BaseException:
                    self.cancel(pending)
                    raise
            if time.monotonic() > deadline:
                raise self.fail(
                    f"{what}: no reply from worker(s) {sorted(pending)} "
                    f"({', '.join(self.spec.devices[r] for r in pending)}) before the deadline; "
                    "a worker is stuck (raise timeout_s on the pool node for very large jobs)."
                )
        return [replies[r] for r in sorted(replies)]

    def send_all(self, msg: dict, what: str) -> None:
        for rank, conn in enumerate(self.conns):
            try:
                conn.send(msg)
            except OSError:  # the socket's other end is closed: that worker is gone
                raise self.died(rank, what) from None

    def died(self, rank: int, what: str) -> WorkerError:
        try:
            code = self.procs[rank].wait(timeout=2)
        except subprocess.TimeoutExpired:  # closed its socket but still running
            code = "none, still running"
        return self.fail(f"{what}: worker {rank} on {self.spec.devices[rank]} died (exit code {code}).")

    def failed(self, what: str, rank: int, reply: dict, pending: dict):
        if reply.get("cancelled"):
            raise self.fail(f"{what}: cancelled unexpectedly.")
        # The other ranks may now wait forever in a collective that this rank left, or this rank failed
        # because a peer died (gloo: "connection closed by peer"): give them a moment, and name a dead peer.
        _, silent, dead = self.drain(pending)
        if dead is not None:
            raise self.died(dead, what)
        message = f"{what} failed on worker {rank} ({self.spec.devices[rank]}): {reply['error']}"
        if silent:
            raise self.fail(message)
        raise RuntimeError(message)

    def drain(self, pending: dict) -> tuple[list[dict], dict, int | None]:
        """Read the replies `pending` ranks still owe, for at most CANCEL_GRACE_S.

        Returns (replies read, ranks still silent, a rank whose socket closed or None).
        """
        pending, replies = dict(pending), []
        end = time.monotonic() + CANCEL_GRACE_S
        while pending and time.monotonic() < end:
            for conn in wait(list(pending.values()), timeout=SLICE_S):
                rank = next(r for r, c in pending.items() if c is conn)
                try:
                    replies.append(conn.recv())
                except (EOFError, OSError):
                    return replies, pending, rank
                del pending[rank]
        return replies, pending, None

    def cancel(self, pending: dict) -> None:
        """Ask running ranks to stop at their next layer, without waiting: the caller's exception must not
        wait for a slow layer. `settle` reads their replies before the next message goes out."""
        self.control[CANCEL] = self.job_id
        self.owing = dict(pending)

    def settle(self) -> list[dict]:
        """Read the replies a cancelled job still owes; restart the pool if its ranks do not stop in time."""
        replies, silent, dead = self.drain(self.owing)
        self.owing = {}
        if silent or dead is not None:
            self.kill()
        return replies

    # ---- jobs ----

    def ensure_vae(self, vae: nn.Module) -> AutoEncoderParams:
        """Send `vae`'s weights to the workers unless they already hold this very module."""
        if self.vae_ref is not None and self.vae_ref() is vae:
            return self.vae_params
        from safetensors.torch import save_file

        sd = strip_prefixes({k: v.detach().to("cpu").contiguous() for k, v in vae.state_dict().items()})
        params = detect_params(sd)
        path = os.path.join(self.dir, "weights.safetensors")
        save_file(sd, path)
        try:
            self.send_all({"op": "load", "weights": path}, "loading the VAE")
            self.wait_all("loading the VAE", time.monotonic() + START_TIMEOUT_S)
        finally:
            shm.unlink(path)
        self.vae_ref, self.vae_params = weakref.ref(vae), params
        return params

    def run(self, op, vae, data, mode, tile_px, overlap_px, interrupt, progress, make_room):
        with self.lock:
            entered = time.time()
            self.settle()
            self.start()
            params = self.ensure_vae(vae)
            check_tiles(mode, tile_px, overlap_px, params.downscale)
            data = check_latent(data, params) if op == "decode" else prepare_pixels(data, params)
            B, s = data.shape[0], params.downscale
            if op == "decode":
                out_shape = (B, data.shape[2] * s, data.shape[3] * s, params.out_ch)
            else:
                out_shape = (B, params.z_channels, data.shape[1] // s, data.shape[2] // s)
            self.released += self.outputs.trim()
            shm.check_room(self.dir, [data.shape, out_shape], "samples" if op == "decode" else "pixels")
            checked = time.time()
            self.job_id += 1
            in_path, inp = self.input_buffer(tuple(data.shape))
            if not shm.copy_in_checked(inp, data):  # before make_room: bad input must not evict anyone's models
                raise non_finite_error("samples" if op == "decode" else "pixels", data)
            if make_room is not None:
                image_px = out_shape[1] * out_shape[2] if op == "decode" else data.shape[1] * data.shape[2]
                make_room(self.spec.devices, self.peak_bytes_per_worker(op, image_px, mode, tile_px))
            out_path, out = self.outputs.acquire(out_shape)
            self.control[DONE], self.control[TOTAL] = 0, 0
            job = {
                "op": op,
                "job": self.job_id,
                "mode": mode,
                "tile_px": tile_px,
                "overlap_px": overlap_px,
                "input": in_path,
                "input_shape": list(data.shape),
                "output": out_path,
                "output_shape": list(out_shape),
                "release": self.released,
            }
            staged = time.time()
            self.send_all(job, op)
            self.released = []
            self.last_replies = self.wait_all(
                op, time.monotonic() + self.deadline_s(out_shape, op), interrupt, progress
            )
            self.last_timing = timing(entered, checked, staged, self.last_replies)
            return out

    def input_buffer(self, shape: tuple[int, ...]) -> tuple[str, Tensor]:
        """The shared file for a job's input, kept while jobs keep its size: the first write to a fresh file
        takes a page fault per 4 KiB (15 ms for a 16 MB latent on a GPU VM); the workers keep it mapped too."""
        numel = math.prod(shape)
        if self.staged is None or self.staged[1].numel() != numel:
            if self.staged is not None:
                shm.unlink(self.staged[0])
                self.released.append(self.staged[0])
                self.staged = None
            path = os.path.join(self.dir, f"input{self.job_id}")
            self.staged = (path, shm.create(path, (numel,)))
        return self.staged[0], self.staged[1].view(shape)

    def deadline_s(self, out_shape, op) -> float:
        pixels = math.prod(out_shape[:3]) if op == "decode" else math.prod(out_shape[:1] + out_shape[2:]) * 64
        per_worker_mpx = pixels / 1e6 / len(self.spec.devices)
        kind = "cuda" if self.spec.devices[0].startswith("cuda") else "cpu"
        return self.spec.timeout_s + SECONDS_PER_MPX[kind] * per_worker_mpx

    def peak_bytes_per_worker(self, op: str, image_px: int, mode: str, tile_px: int) -> int:
        """A generous estimate of one worker's peak device memory for one batch item of `image_px` pixels."""
        share = image_px / len(self.spec.devices) if mode == "exact" else tile_px * tile_px
        dtype_bytes = 4 if self.spec.dtype == "fp32" else 2
        return int(PEAK_BYTES_PER_PX[op] * share * dtype_bytes / 2 + WORKER_BASE_BYTES)

    def decode(
        self,
        vae: nn.Module,
        latent,
        mode="exact",
        tile_px=1024,
        overlap_px=128,
        interrupt=None,
        progress=None,
        make_room=None,
    ):
        """Decode a ComfyUI LATENT across the workers.

        Args:
            vae: a module holding LDM-layout weights (our AutoEncoder or ComfyUI's first_stage_model);
                its weights are sent once and reused while the same module comes back.
            latent: [B, z, h, w] raw VAE space.
            mode: "exact" (equals the single-process decode) or "tiled" (approximate, bounded memory).
            tile_px, overlap_px: tile geometry for tiled mode, in output pixels.
            interrupt: called every few ms on this thread; whatever it raises cancels the job and propagates.
            progress: called with (done, total) as the workers advance.
            make_room: called once before the workers start, with the pool's devices and an estimate of each
                worker's peak device bytes, so the host can evict its own models from those devices.
        Returns: IMAGE [B, 8h, 8w, 3] float32 in [0, 1], on CPU.
        """
        return self.run("decode", vae, latent, mode, tile_px, overlap_px, interrupt, progress, make_room)

    def encode(
        self,
        vae: nn.Module,
        pixels,
        mode="exact",
        tile_px=1024,
        overlap_px=128,
        interrupt=None,
        progress=None,
        make_room=None,
    ):
        """Encode a ComfyUI IMAGE [B, H, W, 3] in [0, 1] to its posterior mean [B, z, H/8, W/8], raw VAE space.

        Sizes that are not multiples of 8 are centre-cropped, as core VAEEncode does. Other arguments as
        in `decode`.
        """
        return self.run("encode", vae, pixels, mode, tile_px, overlap_px, interrupt, progress, make_room)


def timing(entered: float, checked: float, staged: float, replies: list[dict]) -> dict:
    """Where a job's wall time went, in ms: host preparation (checks; then staging: the input copied into shared
    memory with its NaN/Inf check, room made on the GPUs, the output file created), hand-over to workers,
    compute, hand-back."""
    busy = [r for r in replies if "received" in r]
    received, finished = max(r["received"] for r in busy), max(r["finished"] for r in busy)
    return {
        "prepare_ms": 1000 * (staged - entered),
        "check_ms": 1000 * (checked - entered),
        "stage_ms": 1000 * (staged - checked),
        "dispatch_ms": 1000 * (received - staged),
        "compute_ms": 1000 * max(r["seconds"] for r in busy),
        "collect_ms": 1000 * (time.time() - finished),
    }


# The one process-wide state: pools by spec, so prompts reuse running workers.
_POOLS: dict[PoolSpec, WorkerPool] = {}
_POOLS_LOCK = threading.Lock()


def get_pool(spec: PoolSpec) -> WorkerPool:
    with _POOLS_LOCK:
        if spec not in _POOLS:
            _POOLS[spec] = WorkerPool(spec)
        return _POOLS[spec]


def shutdown_all() -> None:
    """Stop every pool (ComfyUI's unload, atexit); pools restart on their next job."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
    for pool in pools:
        pool.shutdown()


atexit.register(shutdown_all)


def pool_states() -> list[dict]:
    """Each pool's spec, whether its workers run, their pids and the last job's timing; JSON-ready.

    Reads without taking a pool's job lock, so a caller on ComfyUI's event loop never waits for a running job.
    """
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
    return [
        {
            "devices": list(pool.spec.devices),
            "dtype": pool.spec.dtype,
            "timeout_s": pool.spec.timeout_s,
            "running": pool.is_running,
            "worker_pids": [proc.pid for proc in list(pool.procs)],
            "last_timing": dict(pool.last_timing),
        }
        for pool in pools
    ]
