"""A blocking websocket client (RFC 6455, client side), enough for ComfyUI's event stream (`/ws?clientId=`).

Standard library only, like `client.py` and `tools/screenshot_editor.py` that use it: they run from any Python
3.10 without installing anything.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import struct
import urllib.parse

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 4.2.2: hashed with the key into Sec-WebSocket-Accept


class WebSocket:
    """A blocking websocket client: text and binary messages, answers pings, masks what it sends.

    `recv()` raises TimeoutError when no whole message arrives in time; bytes read so far stay buffered.
    """

    def __init__(self, url: str, timeout_s: float = 5.0):
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        self.sock = socket.create_connection((parts.hostname, port), timeout=timeout_s)
        if parts.scheme == "wss":
            self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=parts.hostname)
        key = base64.b64encode(os.urandom(16)).decode()
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.sock.sendall(
            f"GET {path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.buf = bytearray()
        while b"\r\n\r\n" not in self.buf:
            self.fill()
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        status, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        if " 101 " not in status + " " or headers.get("sec-websocket-accept") != accept:
            raise ConnectionError(f"websocket handshake with {url} failed: {status}")
        self.parts: list[bytes] = []  # fragments of a message in progress
        self.opcode = 0

    def fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("websocket closed by the server")
        self.buf += chunk

    def frame(self) -> tuple[bool, int, bytes]:
        """The next whole frame (fin, opcode, payload), consumed from the buffer only once complete."""
        while True:
            if len(self.buf) >= 2:
                fin, opcode, masked, n = self.buf[0] >> 7, self.buf[0] & 0x0F, self.buf[1] >> 7, self.buf[1] & 0x7F
                start = 2 + {126: 2, 127: 8}.get(n, 0)
                if len(self.buf) >= start:
                    if n >= 126:
                        n = int.from_bytes(self.buf[2:start], "big")
                    end = start + 4 * masked + n
                    if len(self.buf) >= end:
                        payload = bytes(self.buf[start + 4 * masked : end])
                        if masked:  # servers never mask; accept it anyway
                            mask = self.buf[start : start + 4]
                            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                        del self.buf[:end]
                        return bool(fin), opcode, payload
            self.fill()

    def recv(self) -> str | bytes | None:
        """The next message: str (text) or bytes (binary); None once the server closed the connection."""
        while True:
            fin, opcode, payload = self.frame()
            if opcode == 0x8:
                self.send(0x8, payload[:2])
                return None
            if opcode == 0x9:
                self.send(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode:
                self.opcode, self.parts = opcode, []
            self.parts.append(payload)
            if fin:
                data = b"".join(self.parts)
                return data.decode() if self.opcode == 0x1 else data

    def send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)  # 7-bit length, or 126 + 16-bit, or 127 + 64-bit; the 0x80 bit says "masked"
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def settimeout(self, timeout_s: float) -> None:
        self.sock.settimeout(timeout_s)

    def close(self) -> None:
        try:
            self.send(0x8, struct.pack("!H", 1000))
        except OSError:
            pass
        self.sock.close()
