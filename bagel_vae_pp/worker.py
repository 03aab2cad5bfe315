"""Entry point of a pool worker: `python -m bagel_vae_pp.worker --fd N`.

Started by `pool.py` as a plain subprocess, never through multiprocessing's spawn, so ComfyUI's
`main.py` is not re-executed here. The worker talks to the host over the inherited socket `N`
(pickled builtins only), joins the torch.distributed group through a FileStore in the pool's private
folder (gloo's loopback listeners are closed once the group is up: loopback.py), and exits on its own,
removing the pool's folders, when the host goes away or on SIGTERM/SIGINT (systemd or docker stopping the
service, Ctrl-C in a terminal: the whole process group gets the signal, and a host killed that way cannot
clean up).
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from . import loopback, shm
from .collectives import JobCancelled
from .graphs import GraphCache
from .jobs import Rank, run_job
from .vae_kinds import in_memory_format, vae_from_state_dict

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# GPU workers hold the model and the bands channels_last: cuDNN's 3x3 convs ran 1.3-1.6x faster in NHWC on an
# H100 (bench/conv_layouts.py). "0" keeps NCHW (for comparisons).
CHANNELS_LAST_SWITCH = "BAGEL_VAE_PP_CHANNELS_LAST"
# "1": cuDNN times its algorithms per conv shape on first use (torch.backends.cudnn.benchmark); off by default, as in
# ComfyUI, since the chosen algorithms may take larger workspaces.
CUDNN_BENCHMARK_SWITCH = "BAGEL_VAE_PP_CUDNN_BENCHMARK"
# control tensor slots, shared with the host
CANCEL, DONE, TOTAL = 0, 1, 2
# Blocked in every thread of a worker from its start (the host spawns it with them blocked, so the threads torch
# starts block them too) and taken by one thread of ours with sigwait: a Python handler would only run once the
# main thread leaves its C call, which a collective waiting for a dead peer may never do.
CLEANUP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def remove_and_exit(dirs: list[str], code: int) -> None:
    shm.remove_dirs(dirs)
    os._exit(code)


def exit_with_host(host_pid: int, dirs: list[str]) -> None:
    """Watchdogs: a SIGKILLed host cannot tell us, a stuck collective cannot read EOF: poll the parent. And a
    SIGTERM/SIGINT (to the whole process group, the host included) removes the pool's folders before exiting."""

    def watch_host():
        while os.getppid() == host_pid:
            time.sleep(0.25)
        remove_and_exit(dirs, 3)

    def take_signal():
        remove_and_exit(dirs, 128 + signal.sigwait(CLEANUP_SIGNALS))

    for sig in CLEANUP_SIGNALS:  # inherited SIG_IGN would drop them (here, on the main thread, where Python allows it)
        signal.signal(sig, signal.SIG_DFL)

    threading.Thread(target=watch_host, daemon=True, name="host-watchdog").start()
    threading.Thread(target=take_signal, daemon=True, name="signal-watchdog").start()


def check_device(device: torch.device, dtype_name: str) -> None:
    if device.type == "cuda":
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} GPU(s).")
        torch.cuda.set_device(device)
        if dtype_name == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"dtype bf16 is not supported on {device} ({torch.cuda.get_device_name(device)}); "
                "use fp32 (FLUX VAEs overflow in fp16)."
            )


def cpu_threads(device: torch.device, world: int) -> int:
    """CPU workers share the cores; a GPU worker only launches kernels and copies rows, so one thread keeps its
    idle OpenMP pool from competing with the host's (and the other workers') parallel CPU work."""
    return max(1, (os.cpu_count() or 1) // world) if device.type == "cpu" else 1


def group_blocks(world: int) -> list[tuple[int, int]]:
    """(first rank, size) of every subgroup a job may use: each prefix of the ranks (a VAE job with fewer bands than
    workers) and each block of an even split into consecutive blocks (BAGEL's tensor-parallel groups)."""
    prefixes = [(0, k) for k in range(2, world)]
    blocks = [(start, k) for k in range(2, world // 2 + 1) for start in range(k, world - k + 1, k)]
    return prefixes + blocks


def init_group(cfg: dict) -> dict:
    """Join the pool's process group and make every subgroup of group_blocks, keyed (first rank, size); any
    one-rank group is None. All are made here because a sealed gloo group takes no new connections later."""
    world = cfg["world"]
    groups = {(start, 1): None for start in range(world)}
    if world == 1:
        return groups
    backend = cfg["backend"]
    store = dist.FileStore(cfg["store"], world)
    dist.init_process_group(backend, store=store, rank=cfg["rank"], world_size=world)
    for start, k in group_blocks(world):  # every rank makes every group, in the same order
        groups[(start, k)] = dist.new_group(list(range(start, start + k)))
    groups[(0, world)] = dist.group.WORLD
    if backend == "gloo":  # every pair is connected now: no one may connect any more (see loopback.py)
        loopback.seal_gloo_group()
    return groups


class Worker:
    def __init__(self, cfg: dict, conn: Connection):
        self.cfg, self.conn = cfg, conn
        self.device = torch.device(cfg["device"])
        self.dtype = DTYPES[cfg["dtype"]]
        self.control = shm.attach(cfg["control"], (4,), torch.int64)
        self.model = None
        self.bagel = None  # bagel_rank.BagelRank once a BAGEL job came
        self.graphs = GraphCache() if self.device.type == "cuda" else None
        channels_last = self.device.type == "cuda" and os.environ.get(CHANNELS_LAST_SWITCH, "1") != "0"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.job_id = -1
        self.files = shm.Mappings(self.device)  # the host's input and output files, kept mapped (and pinned)
        check_device(self.device, cfg["dtype"])
        if self.dtype == torch.float32:  # fp32 asked for is fp32: no TF32 convolutions or matmuls
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = os.environ.get(CUDNN_BENCHMARK_SWITCH, "0") == "1"
        torch.set_num_threads(cpu_threads(self.device, cfg["world"]))
        self.groups = init_group(cfg)

    def rank(self) -> Rank:
        def report(done, total):
            self.control[TOTAL], self.control[DONE] = total, done

        def is_cancelled():
            return int(self.control[CANCEL]) == self.job_id

        c = self.cfg
        return Rank(
            c["rank"], c["world"], self.groups, self.device, self.dtype, is_cancelled, report, self.graphs,
            self.memory_format,
        )  # fmt: skip

    def load(self, msg: dict) -> dict:
        from safetensors.torch import load_file

        self.model = None
        if self.graphs is not None:
            self.graphs.clear()
        model = vae_from_state_dict(load_file(msg["weights"]), self.device, self.dtype)
        self.model = in_memory_format(model, self.memory_format)
        return {}

    def bagel_rank(self):
        """This worker's BAGEL share, made on the first BAGEL job (a VAE-only pool never imports the model)."""
        if self.bagel is None:
            from .bagel_rank import BagelRank

            self.bagel = BagelRank(self.cfg["rank"], self.groups, self.device)
        return self.bagel

    def job(self, msg: dict) -> dict:
        received = time.time()
        self.job_id = msg["job"]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for path in msg["release"]:
            self.files.drop(path)
        inp = self.files.get(msg["input"], tuple(msg["input_shape"]))
        out = self.files.get(msg["output"], tuple(msg["output_shape"]))
        start = time.perf_counter()
        run_job(self.model, msg, inp, out, self.rank())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        reply = {"seconds": time.perf_counter() - start, "received": received, "finished": time.time()}
        if self.device.type == "cuda":
            # What the caching allocator held at most: the memory of captured graphs (whose replays allocate nothing)
            # and blocks kept cached between jobs included, so the figure is what the device really gave us.
            reply["peak_bytes"] = torch.cuda.max_memory_reserved(self.device)
        return reply

    def serve(self) -> bool:
        """Answer the host until it says shutdown (False) or its end of the socket closes (True)."""
        handlers = {
            "load": self.load,
            "decode": self.job,
            "encode": self.job,
            "bagel_load": lambda msg: self.bagel_rank().load(msg),
            "bagel": lambda msg: self.bagel_rank().run(msg),
        }
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                return True
            if msg["op"] == "shutdown":
                return False
            try:
                reply = {"ok": True, **handlers[msg["op"]](msg)}
            except JobCancelled:
                reply = {"ok": False, "cancelled": True}
            except Exception as e:  # reported to the host, which raises it in ComfyUI
                reply = error_reply(e)
            self.conn.send({**reply, "job": msg["job"]})  # the host drops a reply of a job it gave up on


def error_reply(e: Exception) -> dict:
    return {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="inherited socket to the host")
    conn = Connection(parser.parse_args().fd)
    cfg = conn.recv()
    exit_with_host(cfg["host_pid"], cfg["dirs"])
    try:
        worker = Worker(cfg, conn)
    except Exception as e:
        conn.send({**error_reply(e), "job": 0})
        return
    conn.send({"ok": True, "pid": os.getpid(), "job": 0})
    try:
        host_gone = worker.serve()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if host_gone:  # a host that was killed cannot clean up; one that shut down already did
        shm.remove_dirs(cfg["dirs"])


if __name__ == "__main__":
    main()
