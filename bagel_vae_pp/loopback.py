"""A CPU worker's gloo sockets: close its listeners once the process group is up, and refuse connections it did
not make.

gloo's TCP transport listens on a loopback port that every local user can reach, and hands an incoming connection
to a pair of ranks on the 8-byte sequence number it sends first, nothing else. Measured with torch 2.13 (the cases
are in tests/test_security.py): a connection that sends the number of a pair still waiting takes that pair's
place (the other rank then waits forever, and the stranger reads what this rank sends); every other connection
is kept open, one file descriptor each, until the process ends, and when descriptors run out gloo's accept fails
and aborts the worker.

Once `init_process_group` and `new_group` return, gloo has connected every pair (unless TORCH_GLOO_LAZY_INIT is
set), so a worker needs its listeners no more: `close_listeners` attaches a socket filter that drops every packet
to them, so the kernel completes no new connection and gloo's event loop never wakes for one, and waits until
gloo has accepted those the kernel completed before. `check_peers` then requires that each connection the worker
holds leads to a socket of this user: a stranger who connected during the start makes the start fail with an
error, instead of a hang, a leak or a crash later.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import time
from dataclasses import dataclass

SO_ATTACH_FILTER = 26  # Linux
# One classic BPF instruction, BPF_RET | BPF_K with k = 0: keep 0 bytes of every packet, i.e. drop it.
DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)
LISTEN, ESTABLISHED = "0A", "01"  # TCP states as /proc/net/tcp prints them
LAZY_INIT_SWITCH = "TORCH_GLOO_LAZY_INIT"


@dataclass(frozen=True)
class TcpSocket:
    local: str  # "0100007F:A1B2": address and port in hex, as /proc/net/tcp prints them
    remote: str
    state: str
    queued: int  # a listener's connections that wait to be accepted
    uid: int
    inode: str

    @property
    def port(self) -> int:
        return int(self.local.split(":")[1], 16)


def tcp_table() -> list[TcpSocket]:
    """Every TCP socket of this network namespace (IPv4 and IPv6), whoever owns it."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except FileNotFoundError:  # no IPv6 in this kernel
            continue
        for line in lines:
            fields = line.split()
            queued = int(fields[4].split(":")[1], 16)  # tx_queue:rx_queue; rx is the accept queue of a listener
            found.append(TcpSocket(fields[1], fields[2], fields[3], queued, int(fields[7]), fields[9]))
    return found


def own_socket_fds() -> dict[str, int]:
    """Socket inode -> file descriptor, for this process."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed since listdir
            continue
        if target.startswith("socket:["):
            fds[target[len("socket:[") : -1]] = int(name)
    return fds


def close_listeners(timeout_s: float = 5.0) -> None:
    """Make every TCP listener of this process drop all packets, then wait until gloo has accepted the connections
    the kernel completed before that (so that `check_peers` sees them all).

    The listening socket stays open and registered with gloo (closing it under gloo would crash it at shutdown),
    but no connection to it completes any more: SYNs are dropped, so a client's connect times out.
    """
    fds = own_socket_fds()
    program = ctypes.create_string_buffer(DROP_ALL)
    fprog = struct.pack("@HP", 1, ctypes.addressof(program))  # struct sock_fprog {len; filter*}
    listeners = {s.inode for s in tcp_table() if s.state == LISTEN and s.inode in fds}
    for inode in listeners:
        with socket.socket(fileno=os.dup(fds[inode])) as listener:  # the dup shares gloo's socket
            listener.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    end = time.monotonic() + timeout_s
    while waiting := [s.port for s in tcp_table() if s.inode in listeners and s.queued]:
        if time.monotonic() > end:
            raise RuntimeError(
                f"connections to this worker's port(s) {waiting} were not accepted within {timeout_s} s of the "
                "pool's start; start the pool again."
            )
        time.sleep(0.01)


def check_peers() -> None:
    """Raise unless every TCP connection of this process is established with a socket of this user."""
    table = tcp_table()
    fds = own_socket_fds()
    by_ends = {(s.local, s.remote): s for s in table}
    for sock in table:
        if sock.inode not in fds or sock.state == LISTEN:
            continue
        peer = by_ends.get((sock.remote, sock.local))
        if sock.state != ESTABLISHED or peer is None:
            raise RuntimeError(
                f"a connection to this worker's port {sock.port} was closed by its other end while the pool "
                "started (another local user may have connected to it); start the pool again."
            )
        if peer.uid != os.getuid():
            raise RuntimeError(
                f"a process of user {peer.uid} connected to this worker's process-group port {sock.port} while the "
                "pool started; gloo accepts any local connection there, so the pool refuses to run with one it did "
                "not make. Start the pool again, or find that process with `ss -tnp`."
            )


def seal_gloo_group() -> None:
    """After every gloo group of this worker is made: no one can connect any more, and no one else did."""
    if os.environ.get(LAZY_INIT_SWITCH, "0").lower() in ("1", "true", "yes", "on", "y"):
        raise RuntimeError(
            f"{LAZY_INIT_SWITCH} is set: gloo would connect ranks during jobs, through ports any local user can "
            f"reach. Unset {LAZY_INIT_SWITCH} for ComfyUI."
        )
    close_listeners()
    check_peers()
