"""An HTTP server with a fixed number of worker threads and a bounded queue, and a socket reader with a deadline.

The stdlib ThreadingHTTPServer starts a thread per connection and lets a silent connection hold it forever, so a
few hundred idle sockets hold a few hundred threads. Here `threads` workers take accepted connections from a queue
of `pending`; past that a connection gets an immediate 503 and is closed. Each read waits at most `timeout`
seconds and a whole request must arrive within `deadline` seconds, so a slow sender (one byte at a time) cannot
hold a worker either.
"""

from __future__ import annotations

import io
import json
import logging
import queue
import socket
import threading
import time
from http.server import HTTPServer

log = logging.getLogger(__name__)
_STOP = object()


class DeadlineReader(io.RawIOBase):
    """The read side of a socket where every recv waits at most `timeout` and all of them end by the deadline."""

    def __init__(self, sock: socket.socket, timeout: float, deadline: float):
        self._sock, self._timeout, self._end = sock, timeout, time.monotonic() + deadline

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not received in time")
        self._sock.settimeout(min(left, self._timeout))
        return self._sock.recv_into(b)


class BoundedHTTPServer(HTTPServer):
    request_queue_size = 128  # the listen backlog: a burst of connects waits here instead of retrying SYNs for seconds

    def __init__(self, addr, handler, *, threads: int = 16, pending: int = 64, timeout: float = 10.0,
                 deadline: float = 30.0):
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        self.request_timeout, self.request_deadline = timeout, deadline
        self._queue: queue.Queue = queue.Queue()
        self._slots = threading.BoundedSemaphore(threads + pending)  # connections accepted and not yet finished
        super().__init__(addr, handler)  # binds first: nothing to stop if the port is taken
        self._workers = [threading.Thread(target=self._work, daemon=True, name=f"ct-ray-explorer-{i}")
                         for i in range(threads)]
        for t in self._workers:
            t.start()

    def process_request(self, request, client_address):
        if self._slots.acquire(blocking=False):
            self._queue.put((request, client_address))
        else:
            self._busy(request)

    def _busy(self, request):
        body = json.dumps({"error": "server busy: too many connections, try again"}).encode()
        head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Retry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(0.5)  # never let the accept loop wait on a client
            request.sendall(head + body)
        except OSError:
            pass
        self.shutdown_request(request)

    def _work(self):
        while (item := self._queue.get()) is not _STOP:
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
                self._slots.release()

    def handle_error(self, request, client_address):
        log.debug("explorer connection from %s failed", client_address, exc_info=True)

    def server_close(self):
        super().server_close()
        while True:  # drop connections nobody will serve now, then stop the workers
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                self.shutdown_request(item[0])
                self._slots.release()
        for _ in self._workers:
            self._queue.put(_STOP)
