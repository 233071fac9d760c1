"""An HTTP server with a fixed number of worker threads, and a socket reader with a deadline.

The stdlib ThreadingHTTPServer starts a thread per connection and lets a silent connection hold it forever, so a
few hundred idle sockets held a few hundred threads. Here one waiter thread holds accepted connections in a
selector until they have something to read (at most `timeout` seconds, then they are closed) and only then hands
them to one of `threads` workers. Past `threads + waiting` open connections a new one takes the place of the
connection idle the longest (closed); only when every slot is being served does it get an immediate 503.
Each read waits at most `timeout` seconds and a whole request must arrive within `deadline` seconds, so a slow
sender (one byte at a time) cannot hold a worker for long either.
"""

from __future__ import annotations

import io
import json
import logging
import queue
import selectors
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

    def __init__(self, addr, handler, *, threads: int = 16, waiting: int = 256, timeout: float = 10.0,
                 deadline: float = 30.0):
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        self.request_timeout, self.request_deadline = timeout, deadline
        self._ready: queue.Queue = queue.Queue()  # connections with a request to read, for the workers
        self._new: queue.Queue = queue.Queue()  # accepted connections, for the waiter
        self._slots = threading.BoundedSemaphore(threads + waiting)  # connections accepted and not yet closed
        super().__init__(addr, handler)  # binds first: nothing to stop if the port is taken
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._threads = [threading.Thread(target=self._wait, daemon=True, name="ct-ray-explorer-wait")]
        self._threads += [threading.Thread(target=self._work, daemon=True, name=f"ct-ray-explorer-{i}")
                          for i in range(threads)]
        for t in self._threads:
            t.start()

    def process_request(self, request, client_address):
        # at the cap, the waiter makes room by closing the connection idle the longest: silent sockets (a loop
        # reopening them) must not lock out requests; only when every slot is being served does a new one get a 503
        self._new.put((request, client_address, self._slots.acquire(blocking=False)))
        self._wake()

    def _wake(self):
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is pending already (or the server is closing)

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

    def _drop(self, request):
        self.shutdown_request(request)
        self._slots.release()

    def _wait(self):
        """Hold connections until readable (-> a worker) or idle for `timeout` (-> closed); oldest first."""
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        held: dict[socket.socket, tuple] = {}  # in arrival order: (client address, since)
        running = True
        while running:
            first = next(iter(held.values()), None)
            wait = None if first is None else max(0.0, first[1] + self.request_timeout - time.monotonic())
            for key, _ in sel.select(wait):
                if key.fileobj is self._wake_r:
                    self._wake_r.recv(4096)
                    while running and not self._new.empty():
                        item = self._new.get()
                        if item is _STOP:
                            running = False
                            continue
                        sock, addr, has_slot = item
                        if not has_slot and held:  # full: the oldest idle connection makes room
                            old = next(iter(held))
                            sel.unregister(old)
                            del held[old]
                            self._drop(old)
                            has_slot = self._slots.acquire(blocking=False)
                        if not has_slot:
                            self._busy(sock)
                            continue
                        held[sock] = (addr, time.monotonic())
                        sel.register(sock, selectors.EVENT_READ)
                elif key.fileobj in held:
                    sel.unregister(key.fileobj)
                    self._ready.put((key.fileobj, held.pop(key.fileobj)[0]))
            now = time.monotonic()
            for sock, (_, since) in list(held.items()):
                if running and since + self.request_timeout > now:
                    break
                sel.unregister(sock)
                del held[sock]
                self._drop(sock)
        sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _work(self):
        while (item := self._ready.get()) is not _STOP:
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self._drop(request)

    def handle_error(self, request, client_address):
        log.debug("explorer connection from %s failed", client_address, exc_info=True)

    def server_close(self):
        super().server_close()
        if not hasattr(self, "_wake_w"):  # the bind failed (a taken port): HTTPServer closes before our set-up ran
            return
        self._new.put(_STOP)  # the waiter closes what it holds
        self._wake()
        while True:  # connections no worker will serve now
            try:
                item = self._ready.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                self._drop(item[0])
        for _ in self._threads[1:]:
            self._ready.put(_STOP)
