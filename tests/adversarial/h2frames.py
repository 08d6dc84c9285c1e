"""Raw HTTP/2 frames for hostile clients: what a conforming library refuses to send (rapid
resets, endless CONTINUATION frames, floods, bad pseudo-headers). Requests go out as HPACK
literals without indexing (no Huffman, no table), so any header name or value can be written;
of the answers only what the tests need is read: frame types, stream ids, error codes and the
:status of a response (indexed, or a literal whose digits may be Huffman-coded)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
REFUSED_STREAM, CANCEL = 0x7, 0x8
SETTINGS_INITIAL_WINDOW_SIZE = 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _integer(value: int, prefix: int, first: int = 0) -> bytes:
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes([first | value])
    out, value = [first | limit], value - limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes([*out, value])


def block(headers: Iterable[tuple[str | bytes, str | bytes]]) -> bytes:
    """An HPACK header block of literals without indexing, new names, no Huffman coding."""
    out = b""
    for name, value in headers:
        n = name.encode() if isinstance(name, str) else name
        v = value.encode() if isinstance(value, str) else value
        out += b"\x00" + _integer(len(n), 7) + n + _integer(len(v), 7) + v
    return out


def request_headers(path: str = "/v1/chat/completions", length: int | None = None, extra=()) -> bytes:
    headers = [(":method", "POST"), (":scheme", "http"), (":authority", "router.test"), (":path", path)]
    headers.append(("content-type", "application/json"))
    if length is not None:
        headers.append(("content-length", str(length)))
    return block([*headers, *extra])


@dataclass
class Frame:
    kind: int
    flags: int
    stream: int
    payload: bytes

    @property
    def error_code(self) -> int:  # RST_STREAM and GOAWAY
        return struct.unpack(">I", self.payload[-4:] if self.kind == RST_STREAM else self.payload[4:8])[0]


class Connection:
    """A prior-knowledge h2c connection; settings are acknowledged, nothing else is automatic."""

    def __init__(self, port: int, timeout: float = 10.0, settings: bytes = b"") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0, settings))
        self.buffer = b""
        self.closed = False

    def send(self, data: bytes) -> bool:
        """False once the peer has closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self.closed = True
            return False

    def frames(self) -> Iterator[Frame]:
        """Frames as they arrive, until the connection closes (or the socket times out)."""
        while True:
            while len(self.buffer) >= 9:
                length = int.from_bytes(self.buffer[:3], "big")
                if len(self.buffer) < 9 + length:
                    break
                head, payload = self.buffer[:9], self.buffer[9 : 9 + length]
                self.buffer = self.buffer[9 + length :]
                got = Frame(head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload)
                if got.kind == SETTINGS and not got.flags & ACK:
                    self.send(frame(SETTINGS, ACK, 0))
                yield got
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                chunk = b""
            if not chunk:
                self.closed = True
                return
            self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


@dataclass
class Outcome:
    """What became of each stream: an answer's status (with its body) or a reset's error code."""

    statuses: dict[int, int]
    bodies: dict[int, bytes]
    resets: dict[int, int]
    goaway: int | None  # the error code of a GOAWAY, if one came
    closed: bool


def collect(conn: Connection, streams: set[int], until_closed: bool = False) -> Outcome:
    """Read until every stream in streams has ended (answered or reset), or the connection ends."""
    out = Outcome({}, {}, {}, None, False)
    pending = set(streams)
    for f in conn.frames():
        if f.kind == HEADERS and f.stream in pending and f.stream not in out.statuses:
            out.statuses[f.stream] = status(f.payload[_padding(f) :])
        elif f.kind == DATA and f.stream in pending:
            out.bodies[f.stream] = out.bodies.get(f.stream, b"") + f.payload
        elif f.kind == RST_STREAM:
            out.resets[f.stream] = f.error_code
            pending.discard(f.stream)
        elif f.kind == GOAWAY:
            out.goaway = f.error_code
        if f.kind in (HEADERS, DATA) and f.flags & END_STREAM:
            pending.discard(f.stream)
        if not pending and not until_closed:
            break
    out.closed = conn.closed
    return out


def _padding(f: Frame) -> int:
    start = 1 if f.flags & 0x8 else 0  # PADDED
    return start + (5 if f.flags & 0x20 else 0)  # PRIORITY


_STATIC_STATUS = {0x88: 200, 0x89: 204, 0x8A: 206, 0x8B: 304, 0x8C: 400, 0x8D: 404, 0x8E: 500}
# HPACK's Huffman codes of the ten digits (RFC 7541, Appendix B): '0'-'2' in 5 bits, '3'-'9' in 6.
_DIGITS = {"00000": "0", "00001": "1", "00010": "2"} | {format(0x19 + i, "06b"): str(3 + i) for i in range(7)}


def status(header_block: bytes) -> int:
    """The :status of a response header block (its first field, as Envoy writes it); 0 when it
    refers to the connection's dynamic table, which is not kept (a later answer, same status)."""
    while 0x20 <= header_block[0] < 0x40:  # a dynamic table size update
        header_block = header_block[1:]
    first = header_block[0]
    if first in _STATIC_STATUS:
        return _STATIC_STATUS[first]
    if first & 0x80:
        return 0
    # A literal with :status's static name (index 8): with or without indexing.
    assert first & 0x0F == 8 or first & 0x3F == 8, header_block[:8].hex()
    length_byte = header_block[1]
    raw = header_block[2 : 2 + (length_byte & 0x7F)]
    if not length_byte & 0x80:
        return int(raw)
    bits, digits = "".join(format(b, "08b") for b in raw), ""
    while len(digits) < 3:
        for size in (5, 6):
            if bits[:size] in _DIGITS:
                digits, bits = digits + _DIGITS[bits[:size]], bits[size:]
                break
        else:
            raise ValueError(f"not a Huffman-coded status: {raw.hex()}")
    return int(digits)
