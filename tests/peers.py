"""Raw-socket peers for the serving tests: hostile ones, and an honest one that checks.

The hostile peers speak just enough HTTP/1.1 or HTTP/2 (prior knowledge, with the ``h2``
library) to reach the server's connection handling, then go away abruptly. The honest
checks (:func:`honest_status`, :func:`h2_request`) make one complete request and read
its whole answer, so a server that stops serving shows up as an error, not a hang.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import h11
import httpx


def address(url: str) -> tuple[str, int]:
    """``(host, port)`` of an ``http://host:port`` URL."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def raw_answer(url: str, data: bytes, *, half_close: bool = False) -> tuple[h11.Response, bytes]:
    """Send ``data`` exactly as given on a fresh connection (no client library cleans it
    up) and read the whole answer, to the end of its message or of the connection."""
    client = h11.Connection(h11.CLIENT)
    # h11 reads an answer only after a request of its own: this one only sets its state
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    with socket.create_connection(address(url), timeout=30) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        response, body = None, b""
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    assert response is not None
    return response, body


def abandoned_request(url: str, head: bytes, body: bytes, *, half_close: bool) -> None:
    """Send ``head`` and a part of its body, then leave (``shutdown(SHUT_WR)`` first or not).

    Connection errors are the peer's problem, not the test's: a server that closes or
    resets first is fine here; only whether it keeps serving others is checked.
    """
    try:
        with socket.create_connection(address(url), timeout=30) as sock:
            sock.sendall(head + body)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def abandoned_h2_request(url: str, headers: list[tuple[str, str]], body: bytes) -> None:
    """Open an HTTP/2 connection (prior knowledge), start a request with part of its body,
    shut down writing and close."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, headers)
    conn.send_data(1, body)
    try:
        with socket.create_connection(address(url), timeout=30) as sock:
            sock.sendall(conn.data_to_send())
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def honest_status(url: str, path: str = "/healthz", **kwargs: object) -> int:
    """The status of one complete ``GET`` on a fresh connection."""
    with httpx.Client(base_url=url, timeout=30) as client:
        return client.get(path, **kwargs).status_code  # type: ignore[arg-type]


class H2Peer:
    """A raw HTTP/2 client connection (prior knowledge) that sends whatever it is told to,
    header bytes unvalidated, and reads events until the one it waits for."""

    def __init__(self, url: str) -> None:
        config = h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
        )
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        self.pending: list[h2.events.Event] = []
        self.sock = socket.create_connection(address(url), timeout=30)
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def wait_for(self, *kinds: type[h2.events.Event]) -> h2.events.Event:
        """The next event of one of ``kinds`` (earlier ones are skipped), reading as needed."""
        while True:
            while self.pending:
                event = self.pending.pop(0)
                if isinstance(event, kinds):
                    return event
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed the HTTP/2 connection"
            for event in self.conn.receive_data(chunk):
                if isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                self.pending.append(event)
            self.flush()

    def close(self) -> None:
        self.sock.close()


def h2_request(url: str, headers: list[tuple[str, str]], body: bytes = b"") -> tuple[int, bytes]:
    """One complete HTTP/2 request (prior knowledge): its status and body."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=not body)
    if body:
        conn.send_data(1, body, end_stream=True)
    status, data = 0, bytearray()
    with socket.create_connection(address(url), timeout=30) as sock:
        sock.sendall(conn.data_to_send())
        while True:
            chunk = sock.recv(65536)
            assert chunk, "the server closed the HTTP/2 connection before answering"
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    return status, bytes(data)
            sock.sendall(conn.data_to_send())
