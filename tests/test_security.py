"""Issue 12 item 3: who can reach the workers.

The pool's own channels are private by construction: a 0700 folder on /dev/shm holds the store and the shared
files, and jobs travel over socket pairs inherited at spawn. gloo's ports are not: every local user can connect
to them. Here another user (uid 65534, so these tests need root) connects to every worker listener in each way
gloo reads a connection, while jobs run and while the pool starts, and the jobs' results, the workers and the
next job must be as if no one had.

Every wait is bounded: jobs by the pool's deadline, the other user's process by `Stranger.result`, threads by
join timeouts, and each test by pytest-timeout where it is installed.
"""

import json
import os
import resource
import select
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from test_pool import alive, reference_decode, sky_and_ground

from bagel_vae_pp import loopback
from bagel_vae_pp.pool import PoolSpec, WorkerError, WorkerPool

pytestmark = pytest.mark.timeout(180)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {"rtol": 0, "atol": 1e-4}
NOBODY = 65534
LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as the kernel prints them
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="acting as another user (setuid 65534) needs root")


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def tcp_listeners(pids) -> list[tuple[str, int]]:
    """(address as /proc/net/tcp* prints it, port) of every LISTEN socket the processes `pids` hold."""
    inodes = set().union(*(socket_inodes(pid) for pid in pids))
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A = TCP_LISTEN
                    address, port = fields[1].split(":")
                    found.append((address, int(port, 16)))
    return found


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---- the other user ----


class Stranger:
    """A process of user 65534, forked from this one, that runs `attack(*args) -> dict` and reports the dict.

    Forked rather than spawned: the other user may not be able to read this Python's files. The child closes every
    descriptor but `pass_fds` (it must not hold the pool's sockets), runs only code imported before the fork, and
    leaves through os._exit."""

    def __init__(self, attack, *args, pass_fds=()):
        self.read_end, write_end = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                keep = sorted({0, 1, 2, write_end, *pass_fds})
                for low, high in zip(keep, keep[1:] + [resource.getrlimit(resource.RLIMIT_NOFILE)[0]]):
                    os.closerange(low + 1, high)
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                os.write(write_end, json.dumps(attack(*args)).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)

    def done(self) -> bool:
        return bool(select.select([self.read_end], [], [], 0)[0])  # its report, or EOF if it died

    def result(self, timeout_s: float) -> dict:
        data, end = b"", time.monotonic() + timeout_s
        while time.monotonic() < end and select.select([self.read_end], [], [], end - time.monotonic())[0]:
            chunk = os.read(self.read_end, 1 << 16)
            if not chunk:
                break
            data += chunk
        if os.waitpid(self.pid, os.WNOHANG)[0] == 0:  # still running after timeout_s
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        os.close(self.read_end)
        assert data, f"the other user's process reported nothing within {timeout_s} s"
        return json.loads(data)


def knock(ports: list[int], payloads: list[bytes], hold_s: float) -> dict:
    """As the other user: one connection per payload to each port, all at once; send the payload on those that
    complete within half a second, hold them `hold_s`, close. Counts the completed connections."""
    socks = []
    for port in ports:
        for _ in payloads:
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            socks.append(sock)
    time.sleep(0.5)
    connected = 0
    for sock, payload in zip(socks, payloads * len(ports)):
        try:
            sock.getpeername()
        except OSError:  # the handshake never completed
            continue
        connected += 1
        sock.settimeout(1.0)
        try:
            sock.sendall(payload)
        except OSError:
            pass
    time.sleep(hold_s)
    for sock in socks:
        sock.close()
    return {"connected": connected}


def sequence_number(seq: int) -> bytes:
    return struct.pack("<q", seq)  # what a gloo rank writes first on a new connection: the pair's number


ATTACKS = {
    "silent": ([b""] * 4, 1.0),
    "garbage": ([os.urandom(n) for n in (1, 7, 8, 64, 1 << 16)], 1.0),
    # the numbers gloo gives its pairs (0, 1, ...), alone and followed by bytes shaped like an op's preamble
    "sequence numbers": (
        [sequence_number(s) for s in range(8)] + [sequence_number(s) + os.urandom(48) for s in range(8)],
        1.0,
    ),
    # many connections, each closed at once: without protection each would cost the worker a descriptor for good
    "churn": ([sequence_number(1000 + i) for i in range(200)], 0.0),
}


# ---- tests ----


def private_pool():
    """A cpu:2 pool of the test's own: an attack that succeeded must not break the session's shared pools."""
    pool = WorkerPool(PoolSpec.parse("cpu:2", "fp32", 20))
    yield pool
    pool.shutdown()


fresh_pool = pytest.fixture(private_pool)
attacked_pool = pytest.fixture(private_pool, scope="class")  # one for all attacks: each must leave it as it was


def latent_and_reference(vae):
    latent = sky_and_ground(1, 16, 24, 24)  # ~0.3 s a job on 2 CPU workers: several fit in one attack
    return latent, reference_decode(vae, latent)


class TestPrivateFiles:
    def test_pool_folder_is_private_and_ours(self, cpu_pool):
        pool = cpu_pool(2)
        pool.start()
        info = os.stat(pool.dir)
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
        assert os.path.exists(os.path.join(pool.dir, "store"))  # the FileStore the ranks met through

    @needs_root
    def test_another_user_cannot_open_the_store_or_the_files(self, cpu_pool, tiny_vae):
        pool = cpu_pool(2)
        pool.decode(tiny_vae, sky_and_ground(1, 16, 4, 4))  # the input and output files exist now
        names = sorted(os.listdir(pool.dir))
        assert {"store", "control"} <= set(names) and any(n.startswith("output") for n in names)
        # the files themselves are 0644 under the usual umask: the folder's 0700 is what keeps them private
        commands = [["ls", pool.dir], ["sh", "-c", f"echo join >> {pool.dir}/store"]]
        commands += [["cat", os.path.join(pool.dir, name)] for name in names]
        for command in commands:
            result = subprocess.run(command, user=NOBODY, group=NOBODY, capture_output=True, text=True, timeout=30)
            assert result.returncode != 0 and "Permission denied" in result.stderr, (command, result)


class TestListeners:
    def test_workers_listen_on_loopback_only(self, cpu_pool):
        pool = cpu_pool(3)
        pool.start()
        pids = [p.pid for p in pool.procs]
        listeners = tcp_listeners(pids)
        print(f"\n[item 3] workers' TCP listeners: {listeners}")
        assert listeners and {address for address, _ in listeners} <= LOOPBACK  # gloo listens, on loopback only
        inodes = set().union(*(socket_inodes(pid) for pid in pids))
        with open("/proc/net/unix") as f:  # Flags with 0x10000 (__SO_ACCEPTCON): a listening unix socket
            unix = [line.split() for line in f.readlines()[1:]]
        assert not [u for u in unix if u[6] in inodes and int(u[3], 16) & 0x10000]

    def test_no_connection_completes_once_the_pool_runs(self, cpu_pool, tiny_vae):
        """gloo made every pair at start; after that its listeners must take no one (this user included)."""
        pool = cpu_pool(3)
        pool.decode(tiny_vae, sky_and_ground(1, 16, 4, 4))
        pids = [p.pid for p in pool.procs]
        fds = [open_fds(pid) for pid in pids]
        result = knock([port for _, port in tcp_listeners(pids)], [sequence_number(0)], 0.0)
        assert result == {"connected": 0}
        assert [open_fds(pid) for pid in pids] == fds

    def test_lazy_gloo_connections_stay_off_whatever_the_host_environment_says(self, monkeypatch, tiny_vae):
        """With TORCH_GLOO_LAZY_INIT gloo would connect pairs during jobs, to listeners that no longer take any: the
        pool sets it off for its workers, and a worker that finds it on refuses to start."""
        monkeypatch.setenv("TORCH_GLOO_LAZY_INIT", "1")
        pool = WorkerPool(PoolSpec.parse("cpu:2", "fp32", 20))
        try:
            latent = sky_and_ground(1, 16, 4, 4)
            torch.testing.assert_close(pool.decode(tiny_vae, latent), reference_decode(tiny_vae, latent), **TOL)
            for proc in pool.procs:
                with open(f"/proc/{proc.pid}/environ", "rb") as f:
                    assert b"TORCH_GLOO_LAZY_INIT=0" in f.read().split(b"\0")
        finally:
            pool.shutdown()
        with pytest.raises(RuntimeError, match="TORCH_GLOO_LAZY_INIT is set"):
            loopback.seal_gloo_group()

    def test_closing_and_checking_on_plain_sockets(self):
        """In a fresh process with one listener of its own: closing waits for the connection the kernel already
        completed and then takes no new one; the peer check passes this user's connection and refuses one whose
        other end has closed."""
        script = textwrap.dedent(
            """
            import socket
            from bagel_vae_pp import loopback
            server = socket.create_server(("127.0.0.1", 0))
            client = socket.create_connection(server.getsockname())
            try:
                loopback.close_listeners(timeout_s=0.5)  # no one accepts `client` here
            except RuntimeError as e:
                print("unaccepted:", e)
            late = socket.socket()
            late.settimeout(1.0)
            print("late:", late.connect_ex(server.getsockname()) != 0)
            late.close()
            accepted, _ = server.accept()
            loopback.close_listeners(timeout_s=0.5)
            loopback.check_peers()
            client.close()
            try:
                loopback.check_peers()
            except RuntimeError as e:
                print("closed:", e)
            """
        )
        result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
        assert "not accepted within 0.5 s" in lines["unaccepted"]
        assert lines["late"] == "True"  # refused or timed out: the handshake never completed
        assert "closed by its other end" in lines["closed"]


@needs_root
class TestAnotherUser:
    @pytest.mark.parametrize("attack", list(ATTACKS))
    def test_connecting_during_jobs_changes_nothing(self, attacked_pool, tiny_vae, attack):
        latent, reference = latent_and_reference(tiny_vae)
        attacked_pool.decode(tiny_vae, latent)
        pids = [p.pid for p in attacked_pool.procs]
        for pid in pids:  # so that descriptors kept for the stranger would run out within this test
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        fds = [open_fds(pid) for pid in pids]
        payloads, hold_s = ATTACKS[attack]
        stranger = Stranger(knock, [port for _, port in tcp_listeners(pids)], payloads, hold_s)
        jobs, end = 0, time.monotonic() + 60
        try:
            while not (jobs and stranger.done()) and time.monotonic() < end:
                torch.testing.assert_close(attacked_pool.decode(tiny_vae, latent), reference, **TOL)
                jobs += 1
        finally:
            result = stranger.result(30)
        print(f"\n[item 3] {attack}: {jobs} job(s) ran meanwhile, the stranger's connections completed: {result}")
        assert [p.pid for p in attacked_pool.procs] == pids and all(alive(pid) for pid in pids)
        assert [open_fds(pid) for pid in pids] == fds  # the workers kept nothing of the stranger
        torch.testing.assert_close(attacked_pool.decode(tiny_vae, latent), reference, **TOL)

    def test_connecting_while_the_pool_starts_fails_the_start_with_an_error(self, fresh_pool, tiny_vae):
        """The stranger offers each worker listener, as soon as it appears, the sequence numbers of the first
        pairs: where gloo still waits for a pair, that connection takes its place (measured without the check:
        the start passed, and each job then hung until its deadline while the stranger read the ranks' bytes)."""
        read_end, write_end = os.pipe()
        stranger = Stranger(offer_to_named_ports, read_end, pass_fds=[read_end])
        os.close(read_end)
        stop = threading.Event()
        watcher = threading.Thread(target=name_listeners, args=(fresh_pool, write_end, stop), daemon=True)
        watcher.start()
        started = time.monotonic()
        try:
            fresh_pool.start()
            error = None
        except (WorkerError, RuntimeError) as e:
            error = str(e)
        finally:
            seconds = time.monotonic() - started
            stop.set()
            watcher.join(10)
            os.close(write_end)
            result = stranger.result(30)
        print(f"\n[item 3] start with a stranger: {result}, after {seconds:.1f} s: {error}")
        assert not watcher.is_alive()
        latent, reference = latent_and_reference(tiny_vae)
        if result["connected"]:
            assert error is not None and f"user {NOBODY}" in error and seconds < 60
        else:  # the stranger came too late: its connections must have been refused, and the pool must be sound
            assert error is None
            torch.testing.assert_close(fresh_pool.decode(tiny_vae, latent), reference, **TOL)
        torch.testing.assert_close(fresh_pool.decode(tiny_vae, latent), reference, **TOL)  # restarts without stranger


def name_listeners(pool: WorkerPool, write_end: int, stop: threading.Event) -> None:
    """As root, while `pool` starts: write each new listening port of its workers to `write_end` (4 bytes)."""
    named = set()
    while not stop.wait(0.001):
        try:
            ports = {port for _, port in tcp_listeners([p.pid for p in list(pool.procs)])}
            for port in ports - named:
                os.write(write_end, struct.pack("<i", port))
                named.add(port)
        except OSError:  # a worker exited while its descriptors were read, or the stranger is gone
            pass


def offer_to_named_ports(read_end: int) -> dict:
    """As the other user: for each port named on `read_end`, connect at once and send the sequence numbers of
    the first pairs (0-3), one per connection; hold them until the pool has started (EOF on `read_end`)."""
    socks, connected, data = [], 0, b""
    while chunk := os.read(read_end, 4096):
        data += chunk
        while len(data) >= 4:
            (port,), data = struct.unpack("<i", data[:4]), data[4:]
            for seq in range(4):
                sock = socket.socket()
                sock.settimeout(1.0)
                try:
                    sock.connect(("127.0.0.1", port))
                    sock.sendall(sequence_number(seq))
                    connected += 1
                except OSError:  # refused once the pool is gone, timed out once a worker closed its listener
                    pass
                socks.append(sock)
    for sock in socks:
        sock.close()
    return {"connected": connected}
