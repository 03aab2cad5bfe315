"""Starting one worker process: `python -m bagel_vae_pp.worker` on an inherited socket, with an environment that keeps
the ranks' rendezvous and collectives on loopback (see pool.py for who can reach them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from .worker import CLEANUP_SIGNALS

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
    # Rendezvous and collectives on loopback whatever the user's environment says (another interface would let other
    # hosts reach the ports while the pool starts); every gloo pair connected at start (loopback.py then closes the
    # listeners); no fixed, public NCCL id.
    env.update({"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo", "TORCH_GLOO_LAZY_INIT": "0"})
    env.pop("NCCL_COMM_ID", None)
    # NVLink multicast stays off (see BENCHMARKS.md), unless the user says otherwise.
    for key, value in {
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
    }.items():
        env.setdefault(key, value)
    return env


def spawn_worker(fd: int, env: dict[str, str]) -> subprocess.Popen:
    """Start `python -m bagel_vae_pp.worker` on socket `fd`, with SIGTERM and SIGINT blocked: the child inherits
    this thread's mask, and so does every thread torch starts in it; one thread of the worker takes them."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, CLEANUP_SIGNALS)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "bagel_vae_pp.worker", "--fd", str(fd)],
            pass_fds=[fd],
            env=env,
            stdin=subprocess.DEVNULL,
            cwd=PACKAGE_ROOT,
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
