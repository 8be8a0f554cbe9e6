"""The lease client against stand-in coordinators: a renewal that meets a kept connection
closing as it arrives (the coordinator's idle timeout) is sent once more, not failed; a
client closed while it watches a quiet event stream hangs up at once."""

from __future__ import annotations

import socket
import threading

from shared.gpu import GpuClient


def coordinator_closing_the_first_request() -> tuple[str, list[bytes]]:
    """A stand-in that reads the first request and closes without a word, then answers
    every other with a renewal."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []
    body = b'{"lease_id": "x", "fence": 1, "ttl_ms": 5000, "yield_requested": false, "free_memory": false}'

    def serve() -> None:
        for index in range(2):
            conn, _ = listener.accept()
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                seen.append(request.split(b"\r\n", 1)[0])
                if index == 0:
                    continue  # closed without an answer
                head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
                conn.sendall(head.encode() + body)

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", seen


async def test_a_renewal_that_meets_a_closing_connection_is_sent_again() -> None:
    url, seen = coordinator_closing_the_first_request()
    client = GpuClient(url, lambda: "token", watch_events=False)
    try:
        answer = client.renew("x")
    finally:
        await client.aclose()
    assert answer.status_code == 200
    assert seen == [b"POST /v1/leases/x/renew HTTP/1.1"] * 2


def coordinator_with_a_quiet_event_stream() -> tuple[str, threading.Event]:
    """A stand-in that says ``subscribed`` on /v1/events and then nothing (no ping), and
    sets the event it returns when the client hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))
    hung_up = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            event = b'event: subscribed\r\ndata: {"epoch": 1}\r\n\r\n'
            conn.sendall(head.encode() + f"{len(event):x}\r\n".encode() + event + b"\r\n")
            while conn.recv(65536):
                pass
            hung_up.set()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", hung_up


async def test_closing_the_client_hangs_up_its_event_stream() -> None:
    """Closing the stream's client did not wake the thread reading it: the connection
    stayed open until the coordinator spoke or shut down, and a coordinator shutting
    down in the tests waited 15 s for it."""
    url, hung_up = coordinator_with_a_quiet_event_stream()
    client = GpuClient(url, lambda: "token")
    assert await client.wait_subscribed(timeout_s=10)
    await client.aclose()
    assert hung_up.wait(timeout=20)  # the client's own read timeout is 45 s
