"""The lease client's renewal against a coordinator that closes a kept connection as the
renewal arrives (its idle timeout): sent once more, not failed."""

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
