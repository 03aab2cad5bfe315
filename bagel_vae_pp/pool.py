"""WorkerPool: one spawned process per device, kept across jobs; the messages, deadlines and faults of every kind
of job; and the one owned global registry of pools.

The host (ComfyUI's process, or the CLI) is never a rank. It starts `python -m bagel_vae_pp.worker` processes
(spawn.py), hands each a socket, and waits for replies in short slices so that a dead worker, a stuck collective, or the
user's interrupt turns into an error within seconds instead of a hang. A job is one message to every worker,
tagged with a job id that every reply carries back; a reply of an earlier job is dropped. Whatever raises while
the host waits (the interrupt, ComfyUI's progress bar on Cancel, a bug) asks every rank to stop at its next layer
and propagates at once; the next job first reads the replies the cancelled one still owes, or restarts the pool.
A worker that dies or hangs tears the whole pool down; the next job starts it again. What a job means is its
kind's business: vae_job.py on this side, jobs.py in the workers.

Who can reach the workers: jobs and replies travel over socket pairs inherited at spawn, which no other process
can open. The shared files (the ranks' FileStore, the control block, inputs, outputs, weights while they load) sit
in fresh 0700 folders (staging.py) and are created 0600, so other users (root aside) can open none of them. gloo
and NCCL listen on loopback TCP ports that every local user can connect to. A CPU worker closes its gloo listeners
once its groups are made and refuses to run with a connection that leads to another user (loopback.py): a
stranger during the start fails the start with an error, and after it cannot connect at all. NCCL accepts only
connections that first send the random 64-bit number of the communicator's id, which travels through the store
(read in NCCL's source; untested here without GPUs).
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from multiprocessing import Pipe
from multiprocessing.connection import wait

import torch

from . import shm, vae_job
from .inputs import parse_devices, resolve_dtype
from .spawn import spawn_worker, worker_env
from .staging import Staging
from .worker import CANCEL, DONE, TOTAL

log = logging.getLogger("bagel_vae_pp")
START_TIMEOUT_S = 180.0
CANCEL_GRACE_S = 3.0  # a cancelled job's ranks stop at their next layer; slower than this, the pool restarts
SHUTDOWN_GRACE_S = 5.0
KILL_WAIT_S = 5.0  # a SIGKILLed worker stuck in a driver call may never exit: it is left behind, with a warning
SLICE_S = 0.05


class WorkerError(RuntimeError):
    """A worker died, hung past its deadline, or failed; the pool has been torn down."""


@dataclass(frozen=True)
class PoolSpec:
    devices: tuple[str, ...]  # one entry per worker: "cuda:1" or "cpu"
    dtype: str  # resolved: "bf16" | "fp16" | "fp32"
    timeout_s: float  # a job still running after timeout_s + its size allowance counts as stuck

    @property
    def backend(self) -> str:
        """NCCL for distinct GPUs; gloo for CPU workers and for several workers on one GPU (a test setup that only
        a spec built directly can ask for: NCCL refuses two ranks on one device)."""
        gpus = [d for d in self.devices if d.startswith("cuda")]
        return "nccl" if len(gpus) == len(self.devices) == len(set(gpus)) else "gloo"

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
        self.staging: Staging | None = None
        self.control = None
        self.job_id = 0
        self.owed: dict[int, int] = {}  # rank -> id of the job whose reply it has not sent yet
        self.holding: dict = {}  # what the workers hold, by job kind (vae_job: the VAE module they loaded)
        self.last_replies: list[dict] = []  # the workers' replies to the last job (timings, peak memory)
        self.last_timing: dict = {}
        self.stopping = False  # shutdown() was called while a job ran on another thread

    @property
    def is_running(self) -> bool:
        return bool(self.procs)

    @property
    def dir(self) -> str | None:
        """The folder of the control file and the process group's store (on /dev/shm where it has room)."""
        return self.staging.home if self.staging else None

    # ---- lifecycle ----

    def start(self, interrupt=None) -> None:
        """Spawn the workers and wait until each has joined the group; `interrupt` may raise meanwhile (the pool
        is then removed again: a half-started group cannot be reused)."""
        with self.lock:
            if self.is_running:
                return
            try:
                self.staging = Staging()
                control = os.path.join(self.staging.home, "control")
                self.control = shm.create(control, (4,), torch.int64)
                self.control[CANCEL] = -1
                env = worker_env()
                for rank, device in enumerate(self.spec.devices):
                    host_end, child_end = Pipe(duplex=True)
                    proc = spawn_worker(child_end.fileno(), env)
                    child_end.close()
                    self.procs.append(proc)
                    self.conns.append(host_end)
                    host_end.send(
                        {
                            "rank": rank,
                            "world": len(self.spec.devices),
                            "device": device,
                            "backend": self.spec.backend,
                            "dtype": self.spec.dtype,
                            "store": os.path.join(self.staging.home, "store"),
                            "control": control,
                            "dirs": self.staging.dirs,
                            "host_pid": os.getpid(),
                        }
                    )
                self.owed = dict.fromkeys(range(len(self.procs)), 0)
                self.collect(0, "start", time.monotonic() + START_TIMEOUT_S, interrupt)
            except BaseException:
                self.kill()
                raise

    def ready(self, interrupt=None) -> None:
        """Settle what a cancelled job owes, then make sure the workers run."""
        if self.stopping:  # shutdown() stopped the pool under the last job before that job could clean up
            self.kill()
        self.settle()
        self.start(interrupt)

    def shutdown(self) -> None:
        """Ask workers to exit, kill stragglers after a few seconds, remove the pool's files. Idempotent.

        Never waits for a running job: when one runs on another thread (ComfyUI exiting mid-prompt), its workers
        are killed under it and it ends with a WorkerError saying so."""
        if not self.lock.acquire(blocking=False):
            self.stopping = True
            for proc in list(self.procs):
                proc.kill()
            staging = self.staging
            if staging is not None:
                staging.close()
            return
        try:
            for conn in self.conns:
                try:
                    conn.send({"op": "shutdown"})
                except OSError:
                    pass
            deadline = time.monotonic() + SHUTDOWN_GRACE_S
            for proc in self.procs:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            self.kill()
        finally:
            self.lock.release()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        deadline = time.monotonic() + KILL_WAIT_S
        for rank, proc in enumerate(self.procs):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("bagel_vae_pp: worker %d (pid %d) did not exit on SIGKILL; left behind", rank, proc.pid)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns, self.owed, self.holding = [], [], {}, {}
        self.control = None
        if self.staging is not None:
            self.staging.close()
            self.staging = None
        self.stopping = False

    def fail(self, message: str) -> WorkerError:
        self.kill()
        return WorkerError(message + " The pool was shut down; the next job starts it again.")

    # ---- jobs ----

    def call(self, msg: dict, what: str, timeout_s: float, interrupt=None, progress=None) -> list[dict]:
        """Run `msg` as one job on every worker and return their replies in rank order.

        Args:
            msg: the job; its "op" picks the workers' handler. A job id is added.
            what: names the job in errors ("decode", "loading the VAE").
            timeout_s: a worker silent for longer is stuck: the pool is torn down.
            interrupt: called every SLICE_S on this thread; whatever it raises cancels the job and propagates.
            progress: called with (done, total) as rank 0 reports; it may raise too (ComfyUI's bar does on Cancel).
        """
        with self.lock:
            self.ready(interrupt)
            self.job_id += 1
            job = self.job_id
            self.control[DONE], self.control[TOTAL] = 0, 0
            self.owed = dict.fromkeys(range(len(self.conns)), job)
            try:
                self.send_all({**msg, "job": job}, what)
                return self.collect(job, what, time.monotonic() + timeout_s, interrupt, progress)
            finally:
                if self.owed and self.control is not None:  # left before every reply came: stop the ranks
                    self.control[CANCEL] = job

    def collect(self, job: int, what: str, deadline: float, interrupt=None, progress=None) -> list[dict]:
        """Read job `job`'s reply from every rank in `owed`, polling for death, deadline, interrupt and progress."""
        replies: dict[int, dict] = {}
        shown = None
        while self.owed:
            waiting = {self.conns[rank]: rank for rank in self.owed}
            for conn in wait(list(waiting), timeout=SLICE_S):
                rank = waiting[conn]
                reply = self.receive(rank, what)
                if reply.get("job") != job:
                    continue  # the late reply of a job that was cancelled: never this job's
                del self.owed[rank]
                replies[rank] = reply
                if not reply["ok"]:
                    self.failed(what, rank, reply)
            for rank in self.owed:
                if self.procs[rank].poll() is not None:
                    raise self.died(rank, what)
            if progress is not None:
                now = (int(self.control[DONE]), int(self.control[TOTAL]))
                if now != shown and now[1]:
                    shown = now
                    progress(*now)
            if interrupt is not None:
                interrupt()
            if self.owed and time.monotonic() > deadline:
                raise self.fail(
                    f"{what}: no reply from worker(s) {sorted(self.owed)} "
                    f"({', '.join(self.spec.devices[r] for r in self.owed)}) before the deadline; "
                    "a worker is stuck (raise timeout_s on the pool node for very large jobs)."
                )
        return [replies[r] for r in sorted(replies)]

    def receive(self, rank: int, what: str) -> dict:
        try:
            return self.conns[rank].recv()
        except (EOFError, OSError):
            raise self.died(rank, what) from None

    def send_all(self, msg: dict, what: str) -> None:
        for rank, conn in enumerate(self.conns):
            try:
                conn.send(msg)
            except OSError:  # the socket's other end is closed: that worker is gone
                raise self.died(rank, what) from None

    def died(self, rank: int, what: str) -> WorkerError:
        if self.stopping:
            return self.fail(f"{what}: the pool was shut down while the job ran.")
        try:
            code = self.procs[rank].wait(timeout=2)
        except subprocess.TimeoutExpired:  # closed its socket but still running
            code = "none, still running"
        return self.fail(f"{what}: worker {rank} on {self.spec.devices[rank]} died (exit code {code}).")

    def failed(self, what: str, rank: int, reply: dict):
        if reply.get("cancelled"):
            raise self.fail(f"{what}: cancelled unexpectedly.")
        # The other ranks may now wait forever in a collective that this rank left, or this rank failed
        # because a peer died (gloo: "connection closed by peer"): give them a moment, and name a dead peer.
        _, dead = self.drain()
        if dead is not None:
            raise self.died(dead, what)
        message = f"{what} failed on worker {rank} ({self.spec.devices[rank]}): {reply['error']}"
        if self.owed:
            raise self.fail(message)
        raise RuntimeError(message)

    def drain(self) -> tuple[list[dict], int | None]:
        """Read the replies the `owed` ranks still owe, for at most CANCEL_GRACE_S; drop any older ones.

        Returns (replies read, a rank whose socket closed or None); ranks still silent stay in `owed`.
        """
        replies, end = [], time.monotonic() + CANCEL_GRACE_S
        while self.owed and time.monotonic() < end:
            waiting = {self.conns[rank]: rank for rank in self.owed}
            for conn in wait(list(waiting), timeout=SLICE_S):
                rank = waiting[conn]
                try:
                    reply = conn.recv()
                except (EOFError, OSError):
                    return replies, rank
                if reply.get("job") == self.owed[rank]:
                    del self.owed[rank]
                    replies.append(reply)
        return replies, None

    def settle(self) -> list[dict]:
        """Read the replies a cancelled job still owes; restart the pool if its ranks do not stop in time."""
        if not self.owed:
            return []
        replies, dead = self.drain()
        if self.owed or dead is not None:
            self.kill()
        return replies

    def decode(self, vae, latent, mode="exact", tile_px=1024, overlap_px=128, interrupt=None, progress=None,
               make_room=None, temporal_size=64, temporal_overlap=8, seed=0):  # fmt: skip
        """Decode a ComfyUI LATENT across the workers: see `vae_job.run` for the arguments.

        Returns: IMAGE [B, 8h, 8w, 3] float32 in [0, 1], on CPU."""
        return vae_job.run(self, "decode", vae, latent, mode, tile_px, overlap_px, interrupt, progress, make_room,
                           temporal_size, temporal_overlap, seed)  # fmt: skip

    def encode(self, vae, pixels, mode="exact", tile_px=1024, overlap_px=128, interrupt=None, progress=None,
               make_room=None, temporal_size=64, temporal_overlap=8):  # fmt: skip
        """Encode a ComfyUI IMAGE [B, H, W, 3] in [0, 1] to its posterior mean [B, z, H/8, W/8], raw VAE space.

        Sizes that are not multiples of 8 are centre-cropped, as core VAEEncode does. See `vae_job.run`."""
        return vae_job.run(self, "encode", vae, pixels, mode, tile_px, overlap_px, interrupt, progress, make_room,
                           temporal_size, temporal_overlap)  # fmt: skip


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
